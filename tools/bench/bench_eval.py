"""Throughput of population-batched evaluation (one rank's share of a generation).

    python tools/bench/bench_eval.py                       # embedded SmolLM2-135M, writes tools/results/bench_eval.json
    python tools/bench/bench_eval.py --candidates 8 --prompts 16 --new-tokens 24 12 --repeats 3

Three ways to produce the same rows and the same number of new tokens (min_new_tokens = max_new_tokens,
greedy), each timed end to end (tokenised prompts → token ids):
  batched     all C candidates x P prompts in one generate call, per-row singular values (essa_mpi's path)
  base        the plain base model (no adapter branch) on the same C x P rows: the ceiling
  sequential  one candidate at a time (C generate calls of P rows)
Targets (issue #2): batched >= 0.9 x base, batched >= 1.4 x sequential at C = 8 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch

from essa_mpi.config import PRECISIONS, ModelConfig, TaskConfig
from essa_mpi.model import load_model
from essa_mpi.population import PopulationEvaluator
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
from essa_mpi.tasks import build_task

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")  # tools/results

def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench(ev: PopulationEvaluator, C: int, P: int, new_tokens: int, repeats: int, seed: int) -> dict:
    ev.gen_cfg.max_new_tokens = ev.gen_cfg.min_new_tokens = new_tokens
    examples = ev.task.train[:P]
    enc = ev.encode(examples)  # [P, T]
    enc_rows = ev.encode(examples * C)  # [C*P, T], same padding as the repeated batch
    X = np.random.default_rng(seed).standard_normal((C, ev.adapter.solution_length)) * 0.3  # [C, n]
    ways = {
        "batched": lambda: ev.generate(X, enc),
        "base": lambda: ev.generate(None, enc_rows),
        "sequential": lambda: [ev.generate(X[c:c + 1], enc) for c in range(C)],
    }
    ways["batched"]()  # warm-up
    tokens = C * P * new_tokens
    seconds = {k: [] for k in ways}
    for _ in range(repeats):  # interleaved so that drifts hit all three alike
        for k, fn in ways.items():
            seconds[k].append(timed(fn))
    best = {k: min(v) for k, v in seconds.items()}
    return {"candidates": C, "prompts": P, "new_tokens": new_tokens, "prompt_tokens": int(enc["input_ids"].shape[1]),
            "seconds": seconds, "tokens_per_s": {k: round(tokens / s, 1) for k, s in best.items()},
            "batched_over_base": round(best["base"] / best["batched"], 3),
            "batched_over_sequential": round(best["sequential"] / best["batched"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[24, 12])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=os.path.join(RESULTS, "bench_eval.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    model, tok = load_model(ModelConfig(name_or_path=args.model, device=args.device, precision=args.precision))
    task = build_task(TaskConfig(name="arithmetic", val_size=0), seed=0)
    factors = fresh_lora_factors(model, ["q_proj", "k_proj", "v_proj", "o_proj"], args.rank, 2.0 * args.rank, 0)
    adapter = SVDLoRA.attach(model, factors, fraction=1.0)
    ev = PopulationEvaluator(model, tok, adapter, task, max_new_tokens=1, max_rows=10**9)
    results = [bench(ev, args.candidates, args.prompts, n, args.repeats, seed=0) for n in args.new_tokens]
    report = {"model": args.model, "device": args.device, "precision": args.precision, "threads": args.threads,
              "lora_rank": args.rank, "solution_length": adapter.solution_length, "torch": torch.__version__,
              "cpu": platform.processor() or platform.machine(), "results": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    for r in results:
        print(f"new_tokens={r['new_tokens']}: tok/s {r['tokens_per_s']}  batched/base={r['batched_over_base']}  "
              f"batched/sequential={r['batched_over_sequential']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
