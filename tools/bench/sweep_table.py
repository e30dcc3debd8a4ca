"""One table from several seeds of ``bench_vs_grpo.py``: each method's start, best and end, read against its own
start, and the training minutes to start + 5 and start + 10 points; then mean ± half the spread over the seeds.

    python tools/bench/sweep_table.py tools/results/sweep_bare300_s0.json tools/results/sweep_bare300_s1.json

A method is a run name (``ESSA``, ``GRPO lr=1e-4``, ...); its row lists only the seeds whose file has it. Each curve is
[(training seconds, validation accuracy)] as bench_vs_grpo.py wrote it (points past the budget + 5% dropped).
"""

from __future__ import annotations

import argparse
import json

from bench_vs_grpo import time_to  # the first validation at or above a target, or None: one home


def row(curve: list) -> dict:
    """Start, best, end of one run (fractions) and the seconds to start + 5 / + 10 points."""
    start = curve[0][1]
    return {"start": start, "best": max(v for _, v in curve), "end": curve[-1][1],
            "to5": time_to(curve, start + 0.05), "to10": time_to(curve, start + 0.10)}


def mean_half_spread(xs: list) -> str:
    """'+1.2 ± 0.3' in points: the mean and half the spread (max − min) / 2 over the seeds."""
    pts = [100 * x for x in xs]
    mean = sum(pts) / len(pts)
    return f"{mean:+.2f} ± {(max(pts) - min(pts)) / 2:.2f}" if len(pts) > 1 else f"{mean:+.2f} (1 seed)"


def minutes(t: float | None) -> str:
    return "never" if t is None else f"{t / 60:.1f}"


def table(summaries: list) -> str:
    methods = list(dict.fromkeys(name for s in summaries for name in s["curves"] if s["curves"][name]))
    lines = ["| run | seeds | start | best | end | best − start (pts) | end − start (pts) | min to +5 / +10 |",
             "|---|---|---|---|---|---|---|---|"]
    for name in methods:
        rows = [(s["seed"], row(s["curves"][name])) for s in summaries if s["curves"].get(name)]
        col = {k: " / ".join(f"{r[k]:.3f}" for _, r in rows) for k in ("start", "best", "end")}
        reach = " / ".join(f"{minutes(r['to5'])}, {minutes(r['to10'])}" for _, r in rows)
        lines.append(f"| {name} | {' / '.join(str(s) for s, _ in rows)} | {col['start']} | {col['best']} | "
                     f"{col['end']} | {mean_half_spread([r['best'] - r['start'] for _, r in rows])} | "
                     f"{mean_half_spread([r['end'] - r['start'] for _, r in rows])} | {reach} |")
    return "\n".join(lines)


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summaries", nargs="+", help="bench_vs_grpo.py JSON files, one per seed")
    args = ap.parse_args(argv)
    summaries = []
    for path in args.summaries:
        with open(path) as fh:
            summaries.append(json.load(fh))
    print(table(summaries))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
