"""The ceiling of ESSA's search space: supervised training of the searched singular values alone.

    python tools/experiments/svd_sft.py --adapter runs/sft/arithmetic-XXXX --lr 1e-2 task.sft_size=3000 \\
        --name svd_sft_3000

The SFT adapter is decomposed exactly as ESSA decomposes it (essa_mpi.svd_lora), and the offsets of the
searched singular values — ESSA's solution vector, ``solution_length`` numbers — are the only trainable
tensor (``grpo_baseline.svd_model``, paper Fig. 8's SVD-GRPO parameterisation). They are trained by gradient
descent on the task's SFT rows (``task.sft_size``; the first rows are the ones the adapter itself was trained
on) with sft.py's loss (completion tokens only), AdamW, linear decay, ``sft.batch_size`` and ``sft.epochs``.
If validation reaches what full-LoRA SFT on the same rows reaches, the points lie inside ESSA's space and the
search is the bottleneck; if it stays at the start, no search over these values can find them.
Writes tools/results/NAME.json (validation before and after, the loss curve, seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/<group>/ -> repo
sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))

from grpo_baseline import NoBranch, svd_model  # noqa: E402

from essa_mpi.config import load_config  # noqa: E402
from essa_mpi.memory import rows_per_call  # noqa: E402
from essa_mpi.model import load_model  # noqa: E402
from essa_mpi.population import PopulationEvaluator  # noqa: E402
from essa_mpi.sft import collate, encode_row  # noqa: E402
from essa_mpi.tasks import build_task  # noqa: E402


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="the SFT adapter whose singular values are trained")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", required=True, help="results file stem under tools/results/")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)
    cfg = load_config(None, args.overrides)
    torch.set_num_threads(args.threads)
    task = build_task(cfg.task, cfg.search.seed)
    model, tok = load_model(cfg.model)
    model, adapter = svd_model(model, cfg, args.adapter)
    offsets = model.essa_singular_value_offsets  # [solution_length], zeros: the SFT adapter itself
    rows = rows_per_call(cfg, 0, 1, 128, cfg.task.max_new_tokens)[0]  # run.max_rows, or what fits
    evaluator = PopulationEvaluator(model, tok, NoBranch(), task, cfg.task.max_new_tokens, rows)

    def val() -> float:
        model.eval()
        with torch.no_grad():
            sums = evaluator.score(None, task.val)
        return sums["reward"][0] / max(sums["reward"][1], 1)

    t0, start = time.time(), val()
    print(f"start: val {start:.3f} ({time.time() - t0:.0f} s)", flush=True)
    rows = [encode_row(tok, task, r, cfg.sft.max_length) for r in task.sft]
    s = cfg.sft
    steps = s.epochs * math.ceil(len(rows) / s.batch_size)
    opt = torch.optim.AdamW([offsets], lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)  # linear decay to 0, as sft.py
    losses, t_train = [], time.time()
    model.train()
    for epoch in range(s.epochs):
        order = np.random.default_rng([cfg.search.seed, 17, epoch]).permutation(len(rows))  # [rows]
        for begin in range(0, len(rows), s.batch_size):
            batch = collate([rows[i] for i in order[begin: begin + s.batch_size]], tok.pad_token_id)
            loss = model(**batch).loss  # mean over completion tokens
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if len(losses) % max(1, steps // 10) == 0:
                print(f"step {len(losses)}/{steps}: loss {np.mean(losses[-10:]):.4f} "
                      f"({time.time() - t_train:.0f} s)", flush=True)
    train_s, end = time.time() - t_train, val()
    out = {"adapter": args.adapter, "sft_rows": len(rows), "lr": args.lr, "steps": steps,
           "solution_length": adapter.solution_length, "val_start": start, "val_end": end,
           "offset_norm": float(offsets.detach().norm()), "train_s": round(train_s, 1),
           "loss": [round(x, 4) for x in losses[:: max(1, steps // 50)]], "overrides": args.overrides}
    print(json.dumps({k: v for k, v in out.items() if k != "loss"}), flush=True)
    with open(os.path.join(ROOT, "tools", "results", f"{args.name}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
