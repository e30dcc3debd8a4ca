"""The memory model: bytes of the weights per device, of one generated row, and the most rows per call that fit.

    arch = Arch.from_config(json.load(open("config.json")))              # or arch_for(cfg.model): found locally
    p = plan(arch, "bf16", prompt=512, new=1024, device=Device("cuda", 79.6 * 2**30))
    p.rows, p.peak, p.fits                                                # rows per generate call, bytes, bool

From the model's config alone (no weights loaded), as ``accelerate estimate-memory`` does. b = bytes of the
compute dtype (4 for fp32, 2 for bf16 and the quantized precisions). A generate call has two moments of
peak memory, and a row's bytes are the larger of the two (each grows with the rows, so the larger per row wins
at any row count):

    prefill   the prompt's KV cache (layers x kv_heads x head_dim x 2 x b x prompt) + one layer's activations over
              the prompt (prompt x (4 hidden + 3 q + 2 kv + 3 ffn) x b: Q, K and V expanded to every query head,
              as SDPA with a padding mask needs; + the fp32 SVD-LoRA branch's copy of a projection's output) + the
              mask (prompt^2 bytes) + the last position's logits (vocab x 4)
    decode    the whole KV cache (prompt + new tokens) + the last step's transients: one layer's K/V expanded to all
              query heads (heads x head_dim x 2 x b x tokens), one layer's K/V copied as the cache grows, and the
              logits (vocab x 4 bytes x 3: logits, scores, the argmax pass)

What both moments hold: the runtime (CUDA context and cuBLAS workspace, or on CPU the Python process with torch
and transformers), the rank's share of the weights, and a reward model's weights on the rank's first device
(``Reward``: loaded at first use, kept). The reward model scores after generation, when the cache is gone: its
own moment is its batch's forward (``Reward.moment``), and the larger of the two moments decides. A rank over g
GPUs (accelerate's layer map) holds 1/g of the weights and of the KV cache on each, and a whole transient on the
busiest. Rows per call are those that fit ``memory_headroom`` of the device: a GPU's total as
``torch.cuda.mem_get_info`` reports it (H100: 79.6 GiB, H200: 140.4 GiB), or on CPU the available RAM divided by
the ranks on the node. Checked against measured peaks in tools/results/README.md ("Memory model").

This rank's plan (``rank_memory``, ``rows_per_call``, ``check_memory``) takes its devices from
``launch.placement`` and the model's shape from ``modelfiles``; what is measured once a model is loaded
(``loaded_bytes``, ``peak_memory``) lives at the end, with the calls that hand memory back.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

GiB = 2**30
COMPUTE_BYTES = {"fp32": 4, "bf16": 2, "int8": 2, "int4": 2, "gptq": 2}  # activations and KV cache
# Bytes per weight of the decoder's linear layers as stored, quantization constants included (bitsandbytes
# int8: a fp32 scale per row; NF4: +6 % absmax, measured in memory.loaded_bytes; GPTQ: fp16 scale and packed zero
# per 128-value group). Embeddings, norms and the head keep the compute dtype.
LINEAR_BYTES = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int4": 0.53, "gptq": 0.5 + 2.5 / 128}
RUNTIME = {"cuda": 1.0 * GiB, "cpu": 0.75 * GiB}  # CUDA context + workspace; CPU: python + torch + transformers
# What torch.cuda.mem_get_info reports as the total of a GPU sold as 80 / 141 GB (H100 SXM / H200): ``plan``
# takes a nominal --gib-per-gpu as these, a run reads its own devices.
REPORTED_GIB = {80.0: 79.6, 141.0: 140.4}
# run.max_rows=auto on CPU: at most this many rows per generate call, however many fit. Past it a call gets slower
# per row on this CPU (the rows-per-call curve, tools/results/bench_rows.json: a decoding step's activations and
# the KV cache it reads fall out of the caches); on a GPU, as many as fit.
CPU_ROWS = 256


@dataclass(frozen=True)
class Arch:
    """What memory depends on, from a model's config.json (Llama / Qwen2 / Mistral family names)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False

    @classmethod
    def from_config(cls, c: dict, source: str = "config.json") -> Arch:
        """From a config.json mapping; ValueError naming ``source``, the key and what is wrong with it.

        >>> Arch.from_config({"hidden_size": "32"}, "x.json")
        Traceback (most recent call last):
        ...
        ValueError: x.json: hidden_size='32' must be a whole number (a JSON number, not a string); fix the file.
        """
        if not isinstance(c, dict):
            raise ValueError(f"{source}: a model config is a JSON object of fields (hidden_size, num_hidden_layers, "
                             f"...), not a {type(c).__name__}; give the model's config.json.")
        text = c.get("text_config")
        c = {**c, **(text if isinstance(text, dict) else {})}  # multimodal configs nest the language model's

        def whole(key: str, default=None) -> int:
            v = c.get(key, default)
            if v is None:
                raise ValueError(f"{source}: {key} is missing; give the model's own config.json.")
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{source}: {key}={v!r} must be a whole number (a JSON number, not a string); fix "
                                 f"the file.")
            if v < 1:
                raise ValueError(f"{source}: {key}={v} must be at least 1; fix the file.")
            return v

        hidden, heads = whole("hidden_size"), whole("num_attention_heads")
        return cls(layers=whole("num_hidden_layers"), hidden=hidden, heads=heads,
                   kv_heads=whole("num_key_value_heads", c.get("num_key_value_heads") or heads),
                   head_dim=whole("head_dim", c.get("head_dim") or max(1, hidden // heads)),
                   intermediate=whole("intermediate_size"), vocab=whole("vocab_size"),
                   tied=bool(c.get("tie_word_embeddings")))

    @classmethod
    def from_facts(cls, f: dict) -> Arch | None:
        """From ``modelfiles.model_facts`` (config.json or a GGUF header); None where a number is missing."""
        keys = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab")
        if not all(f.get(k) for k in keys):
            return None
        return cls(**{k: int(f[k]) for k in keys}, tied=bool(f.get("tied")))

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear layers (what quantization packs), biases ignored."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate)

    @property
    def other_params(self) -> int:
        """Embedding, head (unless tied), norms: kept in the compute dtype at every precision."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden


def named(model_cfg, name: str):
    """model_cfg for another model (a reward model): ``name`` as name_or_path, no GGUF file of the policy's."""
    import dataclasses

    return dataclasses.replace(model_cfg, name_or_path=name, gguf_file=None)


def arch_for(model_cfg) -> Arch | None:
    """The Arch of model.name_or_path from its local config.json or GGUF header; None for a hub id whose config
    is not in the local cache."""
    from essa_mpi.modelfiles import model_facts

    return Arch.from_facts(model_facts(model_cfg) or {})


def weight_bytes(arch: Arch, precision: str) -> int:
    """The whole model's weights as loaded at ``precision``.

    >>> round(weight_bytes(QWEN25_7B, "bf16") / GiB, 1), round(weight_bytes(QWEN25_7B, "gptq") / GiB, 1)
    (14.2, 5.2)
    """
    return int(arch.linear_params * LINEAR_BYTES[precision] + arch.other_params * COMPUTE_BYTES[precision])


def kv_bytes(arch: Arch, precision: str, tokens: int) -> int:
    """KV cache of one row of ``tokens`` tokens, all layers."""
    return arch.layers * arch.kv_heads * arch.head_dim * 2 * COMPUTE_BYTES[precision] * tokens


def prefill_bytes(arch: Arch, precision: str, prompt: int, g: int = 1) -> int:
    """One row at the prefill moment: its prompt's K/V in every layer (1/g of it on each of g GPUs), one layer's
    activations over the prompt (K/V expanded to the query heads), the mask and the last position's logits.

    >>> prefill_bytes(QWEN25_7B, "bf16", 512) / 2**20  # worked in tests/test_memory.py
    123.830078125
    """
    b = COMPUTE_BYTES[precision]
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    layer = prompt * ((4 * arch.hidden + 3 * q + 2 * kv + 3 * arch.intermediate) * b + 2 * max(arch.hidden, q) * 4)
    return math.ceil(kv_bytes(arch, precision, prompt) / g) + layer + prompt * prompt + arch.vocab * 4


def decode_bytes(arch: Arch, precision: str, tokens: int, g: int = 1) -> int:
    """One row at the last decoding step, ``tokens`` = prompt + new: the whole KV cache (1/g of it on each of g
    GPUs), one layer's K/V expanded to every query head (SDPA with a padding mask: transformers' repeat_kv), one
    layer's K/V copied as the cache grows (torch.cat), and the logits with their scores.

    >>> decode_bytes(QWEN25_7B, "bf16", 1536) / 2**20  # worked in tests/test_memory.py
    109.740234375
    """
    b = COMPUTE_BYTES[precision]
    expanded = arch.heads * arch.head_dim * 2 * b * tokens
    cache = kv_bytes(arch, precision, tokens)
    return math.ceil(cache / g) + expanded + cache // arch.layers + arch.vocab * 4 * 3


@dataclass(frozen=True)
class Reward:
    """A reward model on the rank's first device: its weights (kept from first use) and one scoring batch of
    ``batch`` rows of ``tokens`` (prompt + answer, chat template included) as its own moment."""

    arch: Arch
    precision: str
    batch: int
    tokens: int

    @property
    def weights(self) -> int:
        """A sequence classifier has no LM head: the untied head's vocab x hidden is not there."""
        head = 0 if self.arch.tied else self.arch.vocab * self.arch.hidden * COMPUTE_BYTES[self.precision]
        return weight_bytes(self.arch, self.precision) - head

    @property
    def moment(self) -> int:
        """One forward over the batch: every row's prefill (the cache a causal LM's forward builds included)."""
        return self.batch * prefill_bytes(self.arch, self.precision, self.tokens)


@dataclass(frozen=True)
class Device:
    """What a rank plans for: ``kind`` cuda or cpu, ``memory`` bytes per device (a GPU's total, or on CPU this
    rank's share of the available RAM), ``count`` devices the rank spreads over."""

    kind: str
    memory: int
    count: int = 1


@dataclass(frozen=True)
class Plan:
    """One rank's plan: rows per call, bytes per device (weights, a reward model's weights, one row, peak at those
    rows), and whether it fits."""

    rows: int
    weights: int
    row: int
    peak: int
    budget: int
    fits: bool
    reason: str = ""
    reward: int = 0  # a reward model's weights on this device
    moment: str = "generation"  # which moment is the peak: generation, or the reward model's batch
    terms: str = ""  # a row's bytes at its larger moment, in parts (plan prints them)
    runtime: int = 0  # what the process holds before any weight (RUNTIME)

    def line(self) -> str:
        rm = f" + reward model {self.reward / GiB:.1f} GiB" if self.reward else ""
        at = ", at the reward model's batch" if self.moment == "reward" else ""
        return (f"runtime {self.runtime / GiB:.1f} GiB + weights {self.weights / GiB:.1f} GiB{rm} + {self.rows} rows "
                f"x {self.row / GiB * 1024:.1f} MiB "
                f"= {self.peak / GiB:.1f} GiB{at} of {self.budget / GiB:.1f} GiB per device")


def plan(arch: Arch, precision: str, prompt: int, new: int, device: Device, headroom: float = 0.9,
         want: int | None = None, reward: Reward | None = None) -> Plan:
    """Rows per generate call for rows of ``prompt`` + ``new`` tokens: ``want`` (a set run.max_rows) or as
    many as fit, at most 4,096 on a GPU and CPU_ROWS on a CPU. fits is False when the weights, or one row beside
    them, exceed the budget.

    >>> p = plan(QWEN25_7B, "bf16", 512, 1024, Device("cuda", int(79.6 * GiB)))
    >>> p.fits, p.rows, round(p.peak / GiB, 1)
    (True, 466, 71.5)
    """
    g = device.count
    weights = math.ceil(weight_bytes(arch, precision) / g)
    kept = reward.weights if reward else 0
    pre, dec = prefill_bytes(arch, precision, prompt, g), decode_bytes(arch, precision, prompt + new, g)
    row = max(pre, dec)
    cache = math.ceil(kv_bytes(arch, precision, prompt if pre >= dec else prompt + new) / g)
    terms = (f"a row at {'prefill' if pre >= dec else 'the last decoding step'}: KV cache {cache / 2**20:.1f} MiB + "
             f"transients {(row - cache) / 2**20:.1f} MiB (the other moment: {min(pre, dec) / 2**20:.1f} MiB)")
    if reward:
        terms += (f"; reward model {reward.weights / GiB:.1f} GiB kept + its batch of {reward.batch} "
                  f"{reward.moment / GiB:.1f} GiB after generation")
    budget = int(device.memory * headroom)
    held = RUNTIME[device.kind] + weights + kept  # what both moments hold
    room = budget - held
    most = int(max(0, room // row))
    rows = want if want is not None else min(4096 if device.kind == "cuda" else CPU_ROWS, most)
    gen, rm = max(rows, 1) * row, reward.moment if reward else 0
    peak, moment = int(held + max(gen, rm)), ("reward" if rm > gen else "generation")
    fields = dict(weights=weights, row=row, peak=peak, budget=budget, reward=kept, moment=moment, terms=terms,
                  runtime=RUNTIME[device.kind])
    if room <= 0:
        return Plan(0, fits=False, reason="the runtime and the weights alone exceed it" if not kept or room + kept <= 0
                    else "the runtime, the weights and the reward model's exceed it", **fields)
    if most < 1:
        return Plan(0, fits=False, reason="not one row fits beside the weights", **fields)
    if rm > room:
        return Plan(rows, fits=False, reason=f"the reward model's batch of {reward.batch} needs {rm / GiB:.1f} GiB "
                    f"beside the weights", **fields)
    return Plan(rows, fits=peak <= budget,
                reason="" if peak <= budget else f"run.max_rows={rows} exceeds the {most} rows that fit", **fields)


def vllm_check(arch: Arch, precision: str, tokens: int, gpu_memory: int, fraction: float, tp: int,
               reward: Reward | None = None) -> str | None:
    """None when a vLLM engine's share of a GPU (``fraction`` of ``gpu_memory``) holds its weights (÷ tp), its
    runtime and the KV cache of one sequence of ``tokens`` (÷ tp), and the rest of the GPU holds the rank's own
    runtime and a reward model (weights and its batch); else the problem in words."""
    weights = weight_bytes(arch, precision) / tp
    kv = kv_bytes(arch, precision, tokens) / tp
    room = fraction * gpu_memory - RUNTIME["cuda"] - weights
    if room < kv:
        return (f"a vLLM engine over {tp} GPU(s) holds {weights / GiB:.1f} GiB of weights per GPU, but "
                f"model.vllm_memory_fraction={fraction} of {gpu_memory / GiB:.1f} GiB leaves "
                f"{max(room, 0) / GiB:.1f} GiB beside them for the KV cache, and one {tokens}-token sequence needs "
                f"{kv / GiB:.2f} GiB; raise model.vllm_memory_fraction, model.gpus_per_rank, or lower "
                f"task.max_new_tokens")
    if reward is None:
        return None
    need = RUNTIME["cuda"] + reward.weights + reward.moment
    if (1 - fraction) * gpu_memory >= need:
        return None
    most = math.floor((1 - need / gpu_memory) * 100) / 100
    return (f"the reward model needs {need / GiB:.1f} GiB beside the vLLM engine on the rank's first GPU (weights "
            f"{reward.weights / GiB:.1f} GiB, a batch of {reward.batch} rows {reward.moment / GiB:.1f} GiB, runtime), "
            f"but model.vllm_memory_fraction={fraction} leaves {(1 - fraction) * gpu_memory / GiB:.1f} GiB of "
            f"{gpu_memory / GiB:.1f} GiB; set model.vllm_memory_fraction={most:.2f} or lower")


def sft_row_bytes(arch: Arch, precision: str, tokens: int, checkpointing: bool) -> int:
    """One SFT row of ``tokens`` tokens in a forward + backward pass of LoRA training: the activations kept
    for the backward pass (every layer's, or with gradient checkpointing each layer's input plus one layer
    recomputed), and the logits over the vocabulary in fp32 with their log-softmax and gradient.

    >>> [round(sft_row_bytes(LLAMA31_8B, "bf16", 2048, ckpt) / GiB, 1) for ckpt in (False, True)]
    [15.2, 3.8]
    """
    b = COMPUTE_BYTES[precision]
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    layer = tokens * (8 * arch.hidden + 2 * q + 2 * kv + 4 * arch.intermediate) * b  # kept for backward
    kept = (arch.layers * tokens * arch.hidden * b + layer) if checkpointing else arch.layers * layer
    return kept + tokens * arch.vocab * 4 * 3


def sft_plan(arch: Arch, precision: str, tokens: int, device: Device, batch: int, checkpointing: bool,
             headroom: float = 0.9, want: int = 0) -> Plan:
    """Rows per SFT micro-batch (``want``, or as many as fit, at most ``batch``): gradients accumulate over
    batch / rows micro-batches.

    >>> sft_plan(LLAMA31_8B, "bf16", 2048, Device("cuda", 80 * GiB), 128, False).rows
    3
    """
    weights = math.ceil(weight_bytes(arch, precision) / device.count)
    row = math.ceil(sft_row_bytes(arch, precision, tokens, checkpointing) / device.count)
    budget = int(device.memory * headroom)
    room = budget - RUNTIME[device.kind] - weights
    most = int(max(0, room // row))
    rows = want or min(batch, most)
    peak = int(RUNTIME[device.kind] + weights + max(rows, 1) * row)
    if most < 1:
        reason = "the runtime and the weights alone exceed it" if room <= 0 else "not one row fits beside the weights"
        return Plan(0, weights, row, peak, budget, False, reason, runtime=RUNTIME[device.kind])
    return Plan(rows, weights, row, peak, budget, peak <= budget,
                "" if peak <= budget else f"sft.micro_batch={rows} exceeds the {most} rows that fit",
                runtime=RUNTIME[device.kind])


# The shipped jobs' architectures (config.json as published; the tests keep the files themselves).
QWEN25_7B = Arch(layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128, intermediate=18944, vocab=152064)
LLAMA31_8B = Arch(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)


# This rank's plan (devices from launch.placement; the model's shape from its config.json, no weights)


def available_ram() -> int:
    """Bytes of RAM free for new allocations (MemAvailable; the page cache counts as free)."""
    try:
        with open("/proc/meminfo") as fh:
            info = dict(line.split(":", 1) for line in fh)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


REWARD_BATCH = 8  # tasks.reward_model.RewardModelScorer's rows per forward


def reward_for(cfg, tokens: int, arch_of=None) -> Reward | None:
    """The reward model a run loads beside the policy on the rank's first device (task.name=reward_model), scoring
    rows of ``tokens``, as stored (bf16 for the published ones); None without one, or where its config.json is not
    here to size from (arch_of(name) → Arch or None; default: found locally like the policy's)."""
    name = cfg.task.reward_model if cfg.task.name == "reward_model" else None
    if not name:
        return None
    arch = (arch_of or (lambda n: arch_for(named(cfg.model, n))))(name)
    return None if arch is None else Reward(arch, "bf16", REWARD_BATCH, tokens)


def rank_memory(cfg, local_rank: int, local_size: int):
    """What this rank may plan for (memory.Device): its GPUs' memory (the smallest total that
    ``torch.cuda.mem_get_info`` reports: an H100 80GB reports 79.6 GiB) and how many it spreads over, or on CPU the
    node's available RAM divided by the ranks on the node."""
    import torch

    from essa_mpi.launch import placement

    device, spread = placement(cfg, local_rank, local_size)
    if device.type == "cuda":
        ids = list(spread) if spread else [device.index]
        return Device("cuda", min(torch.cuda.mem_get_info(i)[1] for i in ids), len(ids))  # (free, total) as reported
    return Device("cpu", available_ram() // max(1, local_size))


def memory_plan(cfg, local_rank: int, local_size: int, prompt_tokens: int, new_tokens: int, rows: int | str):
    """memory.plan for this rank from the model's config.json (no weights loaded): rows per generate call
    (``rows``: run.max_rows, an int or "auto") → memory.Plan, or None where the model's shape is not known
    locally (a hub id not in the cache)."""
    arch = arch_for(cfg.model)
    if arch is None:
        return None
    return plan(arch, cfg.model.precision, prompt_tokens, new_tokens, rank_memory(cfg.model, local_rank, local_size),
                cfg.run.memory_headroom, None if rows == "auto" else rows, reward_for(cfg, prompt_tokens + new_tokens))


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
    m, new = cfg.model, cfg.task.max_new_tokens
    arch = arch_for(m)
    if arch is None:
        return
    dev = rank_memory(m, local_rank, local_size)
    if m.engine == "vllm" and dev.kind == "cuda":
        problem = vllm_check(arch, m.precision, prompt_tokens + new, dev.memory, m.vllm_memory_fraction,
                             m.gpus_per_rank, reward_for(cfg, prompt_tokens + new))
        if problem:
            raise ValueError(f"{problem}.")
        return
    if m.engine == "vllm":
        return  # vLLM on CPU: model.vllm_kv_cache_gib sizes the cache
    p = memory_plan(cfg, local_rank, local_size, prompt_tokens, new, cfg.run.max_rows)
    if not p.fits:
        where = f"{dev.count} GPU(s)" if dev.kind == "cuda" else "this rank's share of the RAM"
        more = f"model.gpus_per_rank={2 * m.gpus_per_rank}, " if dev.kind == "cuda" else "fewer ranks per node, "
        rows = "run.max_rows=auto, " if cfg.run.max_rows != "auto" else ""
        if cfg.run.memory_headroom < 0.5:  # the budget, not the model, is what is small: say so first
            rows = (f"a run.memory_headroom above {cfg.run.memory_headroom:g} (the share it plans for; 0.9 usual), "
                    + rows)
        raise ValueError(f"{m.name_or_path} at {m.precision} on {where}: {p.line()}: {p.reason}; use {rows}{more}"
                         f"a 4-bit precision (int4, gptq), or lower task.max_new_tokens ({new}).")


# Measured, not planned: what the loaded model and this process hold


def loaded_bytes(model) -> int:
    """Bytes of the model's parameters and buffers as stored (packed for int8/int4/gptq), with the
    quantization constants bitsandbytes keeps on its parameters rather than in buffers (NF4 absmax and
    code: +6% over the packed int4 weights; int8 row scales)."""
    import torch

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

    import torch

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

    import torch

    out = {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    return out
