"""Curves of one or more runs from their metrics.jsonl (matplotlib): ``python -m essa_mpi plot``.

    python -m essa_mpi plot runs/smollm2_arithmetic -o curves.png
    python -m essa_mpi plot runs/a runs/b --labels "sigma0=0.5,sigma0=0.1" -o compare.png

Four panels, several runs on each (the look of the paper's Figs. 4-5): validation reward against wall
clock and against generation, the population's mean and best reward per generation, and sigma. Wall clock
continues across resumes (each process restarts its own clock, so the curve adds the time of the earlier
attempts). Any file in the metrics.jsonl format plots: tools/bench/grpo_baseline.py writes one too.
"""

from __future__ import annotations

import argparse
import os
import sys

from essa_mpi.jsonl import read_rows


def read_metrics(run_dir: str) -> list:
    """The rows of a run's metrics.jsonl; ValueError naming the first line that is not a JSON object."""
    path = run_dir if run_dir.endswith(".jsonl") else os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; give a run's output_dir (it holds metrics.jsonl).")
    rows, problems = read_rows(path)
    if problems:
        line, what = problems[0]
        raise ValueError(f"{path}, line {line}: {what}; --resume of that run repairs its log, or delete the line.")
    return rows


def series(rows: list) -> dict:
    """metrics.jsonl rows → {"val": [(generation, wall_s, reward)], "gen": [(generation, mean, max, sigma)]}
    with wall_s made monotonic over resumed attempts."""
    val, gen, offset, last = [], [], 0.0, 0.0
    for m in rows:
        wall = m.get("wall_s", 0.0)
        if wall + offset < last - 1e-9:  # a new attempt started its clock at 0
            offset = last
        last = wall + offset
        if "val_reward" in m:
            val.append((m["generation"], last, m["val_reward"]))
        if "reward_mean" in m:
            gen.append((m["generation"], m["reward_mean"], m.get("reward_max"), m.get("sigma")))
    return {"val": val, "gen": gen}


def plot(run_dirs: list, out: str, labels: list | None = None, title: str | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    if len(labels) != len(run_dirs):
        raise ValueError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run.")
    fig, ax = plt.subplots(2, 2, figsize=(11, 7.5))
    for d, label in zip(run_dirs, labels):
        s = series(read_metrics(d))
        if s["val"]:
            g, wall, r = zip(*s["val"])
            ax[0, 0].plot([w / 60 for w in wall], r, marker="o", ms=3, label=label)
            ax[0, 1].plot(g, r, marker="o", ms=3, label=label)
        if s["gen"]:
            g, mean, best, sigma = zip(*s["gen"])
            line = ax[1, 0].plot(g, mean, label=f"{label} mean")[0]
            if all(b is not None for b in best):  # GRPO logs have no population maximum
                ax[1, 0].plot(g, best, ls="--", color=line.get_color(), label=f"{label} max")
            if any(x is not None for x in sigma):
                ax[1, 1].plot(g, sigma, label=label)
    for a, (x, y) in zip(ax.flat, [("wall clock (min)", "validation reward"), ("generation", "validation reward"),
                                   ("generation", "population reward"), ("generation", "CMA-ES sigma")]):
        a.set_xlabel(x)
        a.set_ylabel(y)
        a.grid(alpha=0.3)
        if a.has_data():
            a.legend(fontsize=8)
    fig.suptitle(title or "ESSA: " + ", ".join(labels))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list) -> int:
    ap = argparse.ArgumentParser(prog="python -m essa_mpi plot", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run output_dir(s) or metrics.jsonl file(s)")
    ap.add_argument("-o", "--out", default="curves.png", help="PNG to write (default curves.png)")
    ap.add_argument("--labels", help="comma-separated legend labels, one per run (default: directory names)")
    ap.add_argument("--title")
    args = ap.parse_args(argv)
    try:
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            raise ValueError(f"-o {args.out}: its directory does not exist; create it or choose another path.")
        if os.path.isdir(args.out):
            raise ValueError(f"-o {args.out} is a directory; give the PNG file to write (e.g. {args.out}/curves.png).")
        print(plot(args.runs, args.out, args.labels.split(",") if args.labels else None, args.title))
    except ValueError as exc:
        print(f"essa_mpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0
