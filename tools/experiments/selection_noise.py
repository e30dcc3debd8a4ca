"""How well one generation's mini-batch picks the candidates that are better on validation.

    python tools/experiments/selection_noise.py adapter.path=runs/sft/arithmetic-fee7ac7b774f \\
        search.step_scale=singular \\
        --name selection_noise_worked_singular
    python tools/experiments/selection_noise.py --table selection_noise_worked_singular selection_noise_worked_uniform

Draws generation 0's population exactly as a run does (same config, seeds and search), scores every
candidate on the validation rows and on a pool of training prompts, then draws --draws random mini-batches
of each size in --batch-sizes from the pool and selects the top mu candidates (pycma's parent number) by
mini-batch reward, as CMA-ES does. Reported per batch size:

- ``selection_gain``: mean validation reward of the selected candidates minus the population's mean,
- ``oracle_gain``: the same when the validation rewards themselves pick the top mu,
- ``spearman``: rank correlation of mini-batch and validation rewards (mean over draws),

plus the validation reward of the search mean (the start), how many candidates beat it, the rank correlation
of the whole pool with validation (``pool_val_spearman``: near 0 means two disjoint prompt sets disagree on which
candidates are better, so the differences are below what either set can resolve), and how many pool prompts
separate the candidates at all (``informative_prompts``). A ratio
selection_gain / oracle_gain near 0 means the generation's ranking is chance. Writes
tools/results/NAME.json (one process, no MPI needed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/<group>/ -> the repository


def average_ranks(a: np.ndarray) -> np.ndarray:
    """[C] values → [C] ranks 0..C-1, tied values sharing their mean rank.

    >>> average_ranks(np.array([0.5, 0.25, 0.5]))
    array([1.5, 0. , 1.5])
    """
    r = np.empty(len(a))
    r[np.argsort(a, kind="stable")] = np.arange(len(a))
    _, inv = np.unique(a, return_inverse=True)
    return (np.bincount(inv, r) / np.bincount(inv))[inv]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two [C] vectors (average ranks for ties).

    >>> round(spearman(np.array([1., 2., 3.]), np.array([10., 30., 20.])), 3)
    0.5
    """
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def selection_stats(pool: np.ndarray, val: np.ndarray, batch: int, draws: int, mu: int, seed: int) -> dict:
    """pool [C, P] prompt rewards, val [C] validation rewards → gains of top-mu selection by random
    mini-batches of `batch` pool prompts (ties broken at random, as the ranking of equal rewards is arbitrary)."""
    rng = np.random.default_rng(seed)
    gains, rhos = [], []
    for _ in range(draws):
        cols = rng.choice(pool.shape[1], size=batch, replace=False)  # [batch]
        mini = pool[:, cols].mean(axis=1)  # [C]
        order = np.lexsort((rng.random(len(mini)), -mini))  # best first, random among ties
        gains.append(val[order[:mu]].mean() - val.mean())
        rhos.append(spearman(mini, val))
    oracle = np.sort(val)[::-1][:mu].mean() - val.mean()
    return {"batch": batch, "selection_gain": float(np.mean(gains)), "selection_gain_sd": float(np.std(gains)),
            "oracle_gain": float(oracle), "ratio": float(np.mean(gains) / oracle) if oracle > 0 else None,
            "spearman": float(np.mean(rhos))}


def table(names: list, results: str = os.path.join(ROOT, "tools", "results")) -> str:
    """Markdown: one row per results file (the step-size trade-off: larger steps, more separable, worse)."""
    lines = ["| overrides | candidates' val (min / mean / max) | above start | prompts that separate (of pool) "
             "| pool vs val Spearman | Spearman, gain / oracle gain at 48 prompts (points) |",
             "|---|---|---|---|---|---|"]
    for name in names:
        with open(os.path.join(results, f"{name}.json")) as fh:
            d = json.load(fh)
        val = np.array(d["candidate_val_rewards"])  # [popsize]
        pool = np.array(d["pool_rewards"])  # [popsize, pool]
        b = next(x for x in d["by_batch"] if x["batch"] == 48)
        shown = " ".join(o for o in d["overrides"] if not o.startswith("adapter.path")) or "(defaults)"
        lines.append(f"| {shown} "
                     f"| {val.min():.3f} / {val.mean():.3f} / {val.max():.3f} (start {d['start_val_reward']:.3f}) "
                     f"| {d['candidates_above_start']} of {len(val)} "
                     f"| {int((pool.std(axis=0) > 0).sum())} of {d['pool']} "
                     f"| {spearman(pool.mean(axis=1), val):+.2f} | {b['spearman']:+.2f}, "
                     f"{100 * b['selection_gain']:+.2f} / {100 * b['oracle_gain']:+.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", type=int, default=96, help="training prompts every candidate is scored on")
    ap.add_argument("--batch-sizes", default="12,24,48")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--name", default="selection_noise")
    ap.add_argument("--table", nargs="+", metavar="NAME", help="print the markdown table of these results files")
    ap.add_argument("overrides", nargs="*", help="essa_mpi key=value overrides (adapter.path, search.*, task.*)")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    sys.path.insert(0, ROOT)
    from essa_mpi import run
    from essa_mpi.comm import Comm
    from essa_mpi.config import load_config
    from essa_mpi.tasks import build_task

    cfg = load_config(None, args.overrides)
    task = build_task(cfg.task, cfg.search.seed)
    p = run.build(cfg, Comm(), task)
    t0 = time.time()
    X = p.search.ask(p.search.seeds(0))  # [popsize, n]: generation 0's candidates, as a run draws them
    start = p.evaluator.row_rewards(np.zeros((1, X.shape[1]), np.float32), task.val).mean()  # the search mean
    val = p.evaluator.row_rewards(X, task.val).mean(axis=1)  # [popsize]
    pool_rows = [task.train[i] for i in np.random.default_rng(1).choice(len(task.train), args.pool, replace=False)]
    pool = p.evaluator.row_rewards(X, pool_rows)  # [popsize, pool]
    mu = p.search.es.sp.weights.mu  # the parents pycma recombines (popsize // 2 by default)
    out = {"overrides": args.overrides, "popsize": cfg.search.popsize, "mu": mu, "pool": args.pool,
           "val_problems": len(task.val), "start_val_reward": float(start), "candidate_val_rewards": val.tolist(),
           "candidates_above_start": int((val > start).sum()), "scoring_s": round(time.time() - t0, 1),
           "pool_val_spearman": spearman(pool.mean(axis=1), val),  # the whole pool's ranking against validation's
           "informative_prompts": int((pool.std(axis=0) > 0).sum()),  # pool prompts on which candidates differ
           "pool_rewards": pool.tolist(),  # [popsize, pool]: recompute the statistics without regenerating
           "by_batch": [selection_stats(pool, val, b, args.draws, mu, seed=b)
                        for b in (int(x) for x in args.batch_sizes.split(","))]}
    with open(os.path.join(ROOT, "tools", "results", f"{args.name}.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k not in ("candidate_val_rewards", "pool_rewards")}, indent=1))


if __name__ == "__main__":
    main()
