"""Benchmark evaluation: avg@k and pass@k (unbiased) with sampling, problems split over ranks.

    mpiexec -n 4 python -m essa_mpi eval --config jobs/eval_math.yaml
    python -m essa_mpi eval eval.benchmarks=gsm8k eval.data_dir=../shared/data eval.k=4 eval.pass_k=4 \\
        eval.adapters=base,SFT=runs/sft/gsm8k-0123abcd,ESSA=runs/gsm8k/adapter

Each row of the table is the base model (``base``) or a PEFT adapter directory (an SFT warm start or
the ``adapter/`` an ESSA run exports). Every problem gets ``eval.k`` samples (temperature, top-p);
avg@k is the mean accuracy over all samples, pass@k the unbiased estimator. Writes
``eval.output_dir``/eval.json and eval.md (the shape of the paper's Tables 3-4).
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

from essa_mpi.comm import Comm
from essa_mpi.config import Config, split_label
from essa_mpi.tasks.benchmarks import display_name, load_benchmark, pass_at_k
from essa_mpi.tasks.gsm8k import SYSTEM_PROMPT
from essa_mpi.tasks.verify import math_equal


def sample(model, tok, prompts: list, cfg: Config, rows: int = 256) -> list:
    """eval.k sampled completions per prompt → [len(prompts)][k] strings, in chunks of ``rows`` rows."""
    from essa_mpi.decode import decoding

    e = cfg.eval
    gen = decoding(tok, e.max_new_tokens, e.temperature, e.top_p, e.k)
    per_call = max(1, rows // e.k)
    out = []
    for start in range(0, len(prompts), per_call):
        texts = [chat(tok, p) for p in prompts[start: start + per_call]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)  # [P, T]
        with torch.no_grad():
            ids = model.generate(**enc, generation_config=gen)  # [P*k, T + new], k samples per prompt in a row
        flat = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)  # [P*k]
        out += [flat[i * e.k: (i + 1) * e.k] for i in range(len(texts))]
    return out


def chat(tok, prompt: str) -> str:
    return tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}],
                                   tokenize=False, add_generation_prompt=True)


def sample_vllm(engine, lora: str | None, tok, prompts: list, cfg: Config, seed: int) -> list:
    """The same draw on a VLLMEngine (model.engine=vllm): eval.k completions per prompt, the adapter directory
    as a LoRA request; request i samples with seed + i (repeatable, independent of batching)."""
    from vllm import SamplingParams

    e = cfg.eval
    ids = tok([chat(tok, p) for p in prompts], add_special_tokens=False)["input_ids"]
    params = [SamplingParams(n=e.k, temperature=e.temperature, top_p=e.top_p, max_tokens=e.max_new_tokens,
                             seed=seed + i, detokenize=False, stop_token_ids=[tok.eos_token_id])
              for i in range(len(ids))]
    outs = engine.generate(ids, params, None if lora is None else [lora] * len(ids))
    return [tok.batch_decode(o, skip_special_tokens=True) for o in outs]  # [len(prompts)][k]


def score_benchmark(draw, rows: list, cfg: Config, comm: Comm) -> dict:
    """This rank's share of rows (strided) → summed over ranks: avg@k, pass@k, n. draw(prompts) → [[k strings]]."""
    mine = rows[comm.rank:: comm.size]
    local = np.zeros(3)  # [sum of per-problem accuracy, sum of pass@k, problems]
    if mine:
        samples = draw([r["prompt"] for r in mine])
        for row, outs in zip(mine, samples):
            c = sum(math_equal(o, row["answer"]) for o in outs)
            local += [c / cfg.eval.k, pass_at_k(cfg.eval.k, c, cfg.eval.pass_k), 1]
    total = comm.allreduce_sum(local)
    n = max(total[2], 1)
    return {f"avg@{cfg.eval.k}": 100 * total[0] / n, f"pass@{cfg.eval.pass_k}": 100 * total[1] / n,
            "n": int(total[2])}


def with_adapter(model, path: str | None):
    """The base model, or a PeftModel wrapping it with the adapter at path (``unload()`` restores it)."""
    if path is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, path).eval()


def markdown(results: dict, k: int, pass_k: int) -> str:
    """Paper Tables 3-4 shape: benchmarks as columns, an avg@k block and a pass@k block of method rows."""
    benches = list(next(iter(results.values())))
    lines = ["| Method | " + " | ".join(display_name(b) for b in benches) + " | Avg |",
             "|---" * (len(benches) + 2) + "|"]
    for metric in (f"avg@{k}", f"pass@{pass_k}"):
        lines.append(f"| **{metric}** |" + " |" * (len(benches) + 1))
        for label, by_bench in results.items():
            vals = [by_bench[b][metric] for b in benches]
            lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {np.mean(vals):.1f} |")
    return "\n".join(lines) + "\n"


def evaluate(cfg: Config, comm: Comm) -> dict:
    from essa_mpi.memory import rows_per_call
    from essa_mpi.model import load_model, load_tokenizer

    e = cfg.eval
    benches = [load_benchmark(b, e.data_dir, e.limit) for b in e.benchmarks]
    threads = cfg.model.threads or comm.threads
    torch.set_num_threads(threads)
    seed = cfg.search.seed * 100_003 + comm.rank  # sampling differs per rank, repeatable
    tok = load_tokenizer(cfg.model)
    longest = max((len(tok(chat(tok, r["prompt"]), add_special_tokens=False)["input_ids"]) for _, rows in benches
                   for r in rows), default=0)
    per_call, note = rows_per_call(cfg, comm.local_rank, comm.local_size, longest, e.max_new_tokens)
    if comm.rank == 0:
        print(f"eval: {per_call} rows per generate call ({note})", flush=True)
    if cfg.model.engine == "vllm":
        from essa_mpi.vllm_engine import VLLMEngine, adapter_rank, model_dir

        ranks = [adapter_rank(split_label(a)[1]) for a in e.adapters if split_label(a)[1] != "base"]
        engine = VLLMEngine(cfg.model, model_dir(cfg.model), 1, max(ranks, default=1), per_call,
                            comm.local_rank, comm.local_size, threads, cfg.search.seed, longest + e.max_new_tokens)
    else:
        model, tok = load_model(cfg.model, comm.local_rank, comm.local_size)
    results, timing = {}, {}
    for entry in e.adapters:
        label, path = split_label(entry)
        path = None if path == "base" else path
        t0 = time.time()
        if cfg.model.engine == "vllm":
            def draw(ps, path=path):
                return sample_vllm(engine, path, tok, ps, cfg, seed)
        else:
            torch.manual_seed(seed)
            wrapped = with_adapter(model, path)

            def draw(ps, wrapped=wrapped):
                return sample(wrapped, tok, ps, cfg, per_call)
        results[label] = {b: score_benchmark(draw, rows, cfg, comm) for b, rows in benches}
        if cfg.model.engine != "vllm":
            model = wrapped.unload() if wrapped is not model else model
        timing[label] = round(time.time() - t0, 1)
    report = {"k": e.k, "pass_k": e.pass_k, "temperature": e.temperature, "top_p": e.top_p,
              "max_new_tokens": e.max_new_tokens, "ranks": comm.size, "wall_s": timing, "results": results}
    if comm.rank == 0:
        os.makedirs(e.output_dir, exist_ok=True)
        with open(os.path.join(e.output_dir, "eval.json"), "w") as fh:
            json.dump(report, fh, indent=1)
        with open(os.path.join(e.output_dir, "eval.md"), "w") as fh:
            fh.write(markdown(results, e.k, e.pass_k))
    return report
