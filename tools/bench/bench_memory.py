"""The memory model (essa_mpi/memory.py) against measured peaks: one rank on the embedded model, CPU, bf16.

    python tools/bench/bench_memory.py                      # -> tools/results/bench_memory.json
    python tools/bench/bench_memory.py --shapes 96x40x12    # rows x prompt tokens x new tokens

Each shape runs in a fresh process (peak resident memory is per process): load the model as a rank does,
attach SVD-LoRA (rank 4), then one ``PopulationEvaluator`` generate call of ``rows`` rows (4 candidates x rows/4
prompts of ``prompt`` tokens each, every row forced to ``new`` tokens), and read the peak RSS. The estimate is
``memory.plan(...).peak`` for the same numbers; the ratio measured / estimated is what the model must get within
25 % (issue 33).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHAPES = ("96x40x12", "384x40x12", "64x300x64")


def one(rows: int, prompt: int, new: int) -> dict:
    import numpy as np
    import torch

    from essa_mpi import memory
    from essa_mpi.config import ModelConfig, TaskConfig
    from essa_mpi.memory import loaded_bytes
    from essa_mpi.model import load_model
    from essa_mpi.modelfiles import model_facts
    from essa_mpi.population import PopulationEvaluator
    from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
    from essa_mpi.tasks import build_task

    torch.set_num_threads(2)
    cfg = ModelConfig(precision="bf16", device="cpu")
    model, tok = load_model(cfg)
    task = build_task(TaskConfig(name="toy", val_size=4), seed=0)
    task.system_prompt = None
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, 0), 1.0)
    ev = PopulationEvaluator(model, tok, adapter, task, new, max_rows=rows)
    ev.gen_cfg.min_new_tokens = new  # every row to the end: the cache's full length
    words = "seven plus eleven is eighteen and " * (prompt // 4 + 8)
    ids = tok(words, add_special_tokens=False)["input_ids"]
    chat = len(tok(ev.texts([{"prompt": ""}])[0], add_special_tokens=False)["input_ids"])  # template tokens
    examples = [{"prompt": tok.decode(ids[i: i + prompt - chat]), "answer": ""} for i in range(rows // 4)]
    enc = ev.encode(examples)
    T = enc["input_ids"].shape[1]  # [P, T]
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    X = np.random.default_rng(0).standard_normal((4, adapter.solution_length)) * 0.1  # [C, n]
    ev.generate(X, enc)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    arch = memory.Arch.from_facts(model_facts(cfg))
    est = memory.plan(arch, "bf16", T, new, memory.Device("cpu", 1 << 50), 1.0, want=rows)
    return {"rows": rows, "prompt_tokens": T, "new_tokens": new, "measured_peak_rss_gib": round(peak / 2**30, 3),
            "estimated_peak_gib": round(est.peak / 2**30, 3), "measured_over_estimated": round(peak / est.peak, 3),
            "rss_after_load_gib": round(loaded / 2**30, 3), "weights_gib": round(loaded_bytes(model) / 2**30, 3),
            "estimated_weights_gib": round(est.weights / 2**30, 3), "estimated_row_mib": round(est.row / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "bench_memory.json"))
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(*map(int, args.one.split("x")))))
        return
    results = []
    for shape in args.shapes.split(","):
        res = subprocess.run([sys.executable, __file__, "--one", shape], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": ROOT})
        if res.returncode:
            raise SystemExit(res.stderr[-2000:])
        results.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"model": "smollm2-135m-instruct (embedded), bf16, CPU", "results": results}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
