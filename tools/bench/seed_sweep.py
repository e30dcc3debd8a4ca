"""ESSA against GRPO over seeds (issue 34): every arm x every seed from one SFT start, one training budget each;
then per arm the distribution over seeds, rank tests between pairs of arms, and a plot.

    A=runs/sft/arithmetic-68748a3963b1    # the bare-gold 300 start in fp32 (tools/results/README.md, seeds_*)
    python tools/bench/seed_sweep.py --adapter $A --runs runs/seeds_bare300 --seeds 0-4 \\
        --arms "ESSA uniform" "GRPO lr 3e-4 fp32"                     # about 13 min of wall clock per run
    python tools/bench/seed_sweep.py --runs runs/seeds_bare300 --report --name seeds_bare300 \\
        --test "ESSA uniform" "GRPO lr 3e-4 fp32"                     # JSON, table and plot under tools/results/
    python tools/bench/seed_sweep.py --runs runs/seeds_bare300 --report --name seeds_bare300 \\
        --previous tools/results/seeds_bare300.json ...               # on a new machine: earlier runs from the JSON
    python tools/bench/seed_sweep.py --adapter $A --runs runs/calib --seeds 0 --arms "ESSA uniform" --budget-s 130
        # the new machine's speed: the same validations per generation, the seconds they took; then with --report
        # --rescale "ESSA uniform=1.5" the earlier machine's runs also appear on this machine's clock
    A=runs/sft/arithmetic-e1e63073270b    # the restated 300 start: python -m essa_mpi sft model.precision=fp32
    python tools/bench/seed_sweep.py --adapter $A --runs runs/seeds_restated300 --seeds 0-4 \\
        --arms "ESSA default" "GRPO lr 1e-4 fp32"

What the seed decides (``--seeds``; it is search.seed for both methods, with task.seed=0 so the 200 validation
problems, the training rows and the start never move): ESSA's CMA-ES candidates and its mini-batch order; GRPO's
training-row order, TRL's sampler and the sampled completions. Nothing else is random.

Runs go seed-major (every arm of seed 0, then of seed 1, ...), so a sweep cut short stays balanced. A finished
run (a validation at or past the budget) is kept; an unfinished one is moved aside (``s<seed>.unfinished-<time>``)
and run again. Each run is ``bench_vs_grpo.essa`` / ``bench_vs_grpo.grpo``: 2 cores, 10 minutes of training,
validation excluded from the clock, every method validated by essa_mpi's evaluator on the same problems.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

from bench_vs_grpo import RESULTS, curve, essa, grpo  # one home for how a run is launched and read
from sweep_table import row

# per-run metrics the rank test compares; "gain" is final - start, for arms whose starts differ (bf16 vs fp32)
TESTED = ("final", "gain", "best", "min_to_5", "min_to_10")
ESSA_PAPER = ["model.precision=fp32", "search.step_scale=uniform", "search.mean_lr=1", "task.batch_size=24"]
ARMS = {  # name -> (method, GRPO learning rate, overrides); the names are the results' row labels
    "ESSA uniform": ("essa", None, ESSA_PAPER),  # the paper's setting (uniform steps, mean_lr 1, 24 prompts), fp32
    "ESSA default": ("essa", None, []),  # today's defaults: bf16, singular steps, mean_lr 0.5, 48 prompts
    "GRPO lr 3e-4 fp32": ("grpo", 3e-4, ["model.precision=fp32"]),
    # the issue-34 check at full length: the rows in task.train's own order (seed 0 still seeds TRL's trainer)
    "GRPO lr 3e-4 fp32 task order": ("grpo", 3e-4, ["model.precision=fp32", "--order=identity"]),
    "GRPO lr 3e-4 bf16": ("grpo", 3e-4, []),
    "GRPO lr 1e-4 fp32": ("grpo", 1e-4, ["model.precision=fp32"]),
    "GRPO lr 1e-4 bf16": ("grpo", 1e-4, []),
}


def slug(arm: str) -> str:
    """'GRPO lr 3e-4 fp32' -> 'grpo_lr_3e-4_fp32': the arm's folder under --runs."""
    return arm.lower().replace(" ", "_")


def run_dir(runs: str, arm: str, seed: int) -> str:
    return os.path.join(runs, slug(arm), f"s{seed}")


def finished(out: str, budget_s: float) -> bool:
    """The run validated at or past its training budget (its last act before it stops)."""
    path = os.path.join(out, "metrics.jsonl")
    return os.path.exists(path) and any(t >= budget_s for t, _ in curve(out))


def launch(args, arm: str, seed: int, sft_dir: str) -> None:
    """One run of one arm at one seed, through bench_vs_grpo's launchers (the same settings as its sweeps)."""
    method, lr, overrides = ARMS[arm]
    out = run_dir(args.runs, arm, seed)
    if finished(out, args.budget_s):
        return
    if os.path.exists(out):  # killed part-way: keep it for inspection, measure again from the start
        os.rename(out, f"{out}.unfinished-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    ns = argparse.Namespace(budget_s=args.budget_s, sft_size=300, seed=seed, essa_val_every=3, prompts=8, group=8,
                            val_every_s=120.0, grpo=overrides)
    print(f"seed_sweep: {arm}, seed {seed} -> {out}", flush=True)
    if method == "essa":
        essa(ns, sft_dir, out, overrides)
    else:
        grpo(ns, sft_dir, "grpo", lr, out)


def seeds_of(spec: str) -> list:
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2' -> [0, 2]; ValueError saying what is wrong otherwise.

    >>> seeds_of("0-4"), seeds_of("0,2")
    ([0, 1, 2, 3, 4], [0, 2])
    >>> seeds_of("5-1")
    Traceback (most recent call last):
    ...
    ValueError: --seeds 5-1 is an empty range; write LOW-HIGH with LOW <= HIGH (e.g. 0-4) or a list (0,2,5)
    """
    fix = "write LOW-HIGH with LOW <= HIGH (e.g. 0-4) or a list (0,2,5)"
    parts = spec.split("-") if "-" in spec.strip("-") else spec.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--seeds {spec} is not seeds (whole numbers from 0 up); {fix}")
    values = [int(p) for p in parts]
    if "-" in spec.strip("-"):
        if len(values) != 2 or values[0] > values[1]:
            raise ValueError(f"--seeds {spec} is an empty range; {fix}")
        return list(range(values[0], values[1] + 1))
    return values


def run_summary(out: str, budget_s: float) -> dict:
    """One run: its curve (points past the budget + 5% dropped, as bench_vs_grpo does for every method), final
    and best validation, minutes of training to start + 5 / + 10 points (None: never), and steps taken."""
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        steps = max(json.loads(line).get("generation", 0) for line in fh if line.strip())
    return {**of_points(curve(out), budget_s), "steps": steps}


def of_points(points: list, budget_s: float) -> dict:
    """The curve cut at the budget + 5 %, its start, final and best validation, minutes to start + 5 / + 10."""
    points = [(t, v) for t, v in points if t <= 1.05 * budget_s]
    r = row(points)
    return {"curve": points, "start": r["start"], "final": r["end"], "best": r["best"],
            "min_to_5": None if r["to5"] is None else round(r["to5"] / 60, 2),
            "min_to_10": None if r["to10"] is None else round(r["to10"] / 60, 2)}


def on_this_clock(runs: dict, factor: float, budget_s: float) -> dict:
    """An arm's runs from a machine `factor` times faster, put on this machine's clock: every training second
    times factor, then the budget cut again. The factor is the calibration run's (the same arm and seed rerun
    here, whose validations per generation must match the earlier run's). Steps within the cut are unknown."""
    return {s: {**of_points([(round(t * factor, 1), v) for t, v in r["curve"]], budget_s), "steps": None}
            for s, r in runs.items()}


def spread(values: list) -> dict:
    """Median and range over seeds; None (never reached) counts as +inf, so a median of None means most never did."""
    xs = sorted(math.inf if v is None else v for v in values)
    med = statistics.median(xs)
    fin = lambda x: None if math.isinf(x) else round(x, 4)  # noqa: E731
    return {"median": fin(med), "min": fin(xs[0]), "max": fin(xs[-1]), "n": len(xs),
            "censored": sum(v is None for v in values)}


def rank_test(a: list, b: list) -> dict:
    """Two-sided Mann-Whitney U of arm a against arm b, its p-value from every split of the pooled runs into groups
    of the two sizes (252 for 5 and 5: exact, ties included); never-reached times rank last (as +inf), tied."""
    from scipy.stats import PermutationMethod, mannwhitneyu

    xa, xb = [math.inf if v is None else v for v in a], [math.inf if v is None else v for v in b]
    if len(set(xa) | set(xb)) == 1:  # all equal (every run censored, say): no evidence either way
        return {"U": len(xa) * len(xb) / 2, "p": 1.0, "method": "all values tied"}
    splits = math.comb(len(xa) + len(xb), len(xa))
    res = mannwhitneyu(xa, xb, alternative="two-sided", method=PermutationMethod(n_resamples=max(9999, splits)))
    return {"U": float(res.statistic), "p": round(float(res.pvalue), 4), "method": f"exact, {splits} splits"}


def report(args) -> dict:
    """Every finished run under --runs, plus (with --previous) the runs of an earlier report's JSON that --runs
    lacks: run folders are not kept between machines, the JSON keeps every curve. A folder wins over the JSON."""
    arms = previous_runs(getattr(args, "previous", None))  # {arm: {seed: run summary}}
    for arm in ARMS:
        folder = os.path.join(args.runs, slug(arm))
        seeds = sorted(int(d[1:]) for d in os.listdir(folder) if d[1:].isdigit()) if os.path.isdir(folder) else []
        arms.setdefault(arm, {}).update({s: run_summary(run_dir(args.runs, arm, s), args.budget_s) for s in seeds
                                         if finished(run_dir(args.runs, arm, s), args.budget_s)})
    for arm, factor in getattr(args, "rescale", None) or []:
        if arms.get(arm):
            arms[f"{arm} (clock x {factor:g})"] = on_this_clock(arms[arm], factor, args.budget_s)
    arms = {arm: {s: {**r, "gain": round(r["final"] - r["start"], 4)} for s, r in sorted(runs.items())}
            for arm, runs in arms.items()}  # gain derived here for both sources (older JSONs lack it)
    arms = {arm: {"seeds": runs, **{k: spread([r[k] for r in runs.values()]) for k in (*TESTED, "steps")}}
            for arm, runs in arms.items() if runs}
    out = {"budget_s": args.budget_s, "runs": args.runs, "arms": arms}
    out["tests"] = []  # one per --test pair whose two arms both have finished runs
    for pair in args.test or []:
        if all(x in arms for x in pair):
            a, b = (list(arms[x]["seeds"].values()) for x in pair)
            out["tests"].append({"arms": pair, **{k: rank_test([r[k] for r in a], [r[k] for r in b])
                                                  for k in TESTED}})
    return out


def previous_runs(path: str | None) -> dict:
    """{arm: {seed: run summary}} from an earlier --report JSON (whose seed keys are strings)."""
    if not path:
        return {}
    with open(path) as fh:
        prev = json.load(fh)
    return {arm: {int(s): r for s, r in a["seeds"].items()} for arm, a in prev["arms"].items()
            if arm in ARMS}  # measured arms only: a "(clock x F)" arm is derived again from --rescale, or dropped


def table(summary: dict) -> str:
    """Markdown: per arm the seeds, then median [min, max] of final, final - start, best, minutes to + 5 / + 10."""
    def cell(s: dict, spec: str) -> str:
        f = (lambda x: "never" if x is None else format(x, spec))
        never = f", {s['censored']} never" if s["censored"] else ""
        return f"{f(s['median'])} [{f(s['min'])}, {f(s['max'])}]{never}"

    lines = ["| arm | seeds | start | final validation | final − start | best validation | min to start + 5 "
             "| min to start + 10 | steps taken |", "|---|---|---|---|---|---|---|---|---|"]
    for arm, a in summary["arms"].items():
        starts = sorted({r["start"] for r in a["seeds"].values()})
        lines.append(f"| {arm} | {a['final']['n']} | {' / '.join(f'{s:.3f}' for s in starts)} | "
                     f"{cell(a['final'], '.3f')} | {cell(a['gain'], '+.3f')} | {cell(a['best'], '.3f')} | "
                     f"{cell(a['min_to_5'], '.1f')} | "
                     f"{cell(a['min_to_10'], '.1f')} | {steps(a['steps'])} |")
    for t in summary.get("tests", []):
        lines.append("")
        lines.append(f"Mann-Whitney U, {t['arms'][0]} vs {t['arms'][1]} (two-sided): " + "; ".join(
            f"{k} U = {t[k]['U']:.1f}, p = {t[k]['p']:.4f} ({t[k]['method']})" for k in TESTED))
    return "\n".join(lines)


def steps(s: dict) -> str:
    """'39 [39, 42]', or '–' for runs put on another clock (their steps within the cut are unknown)."""
    return "–" if s["censored"] else f"{s['median']:.0f} [{s['min']:.0f}, {s['max']:.0f}]"


def held(points: list, t: float) -> float:
    """The run's validation at training second t: its last validation at or before t (a step function), or its
    start before that (the first validation ends a fraction of a second into the clock)."""
    before = [v for s, v in points if s <= t]
    return before[-1] if before else points[0][1]


def plot(summary: dict, out: str, title: str) -> None:
    """Every seed a thin line, the arm's median over seeds (of the step functions, every 2 s) thick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.8))
    grid = [2.0 * i for i in range(int(1.05 * summary["budget_s"] // 2) + 1)]  # training seconds, as far as points go
    for i, (arm, a) in enumerate(summary["arms"].items()):
        color = f"C{i}"
        curves = [r["curve"] for r in a["seeds"].values()]
        for c in curves:
            t, v = zip(*c)
            ax.plot([x / 60 for x in t], v, color=color, lw=0.7, alpha=0.45, drawstyle="steps-post")
        med = [statistics.median(held(c, t) for c in curves) for t in grid]
        ax.plot([t / 60 for t in grid], med, color=color, lw=2.8, drawstyle="steps-post",
                label=f"{arm}: " + (f"median of {len(curves)} seeds" if len(curves) > 1 else "1 seed")
                + f" (final {a['final']['median']:.3f})")
    ax.set_xlabel("training wall clock, validation excluded (min)")
    ax.set_ylabel("validation accuracy (200 problems)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def rescale_of(text: str) -> tuple:
    """'ESSA uniform=1.5' -> ('ESSA uniform', 1.5); ValueError naming the text when it is not ARM=FACTOR."""
    arm, _, factor = text.rpartition("=")
    try:
        f = float(factor)
    except ValueError:
        f = math.nan
    if arm not in ARMS or not f > 0:
        raise ValueError(repr(text))
    return arm, f


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True, help="the sweep's folder: <runs>/<arm>/s<seed>/ per run")
    ap.add_argument("--adapter", help="the SFT adapter every run starts from (needed to run, not to --report)")
    ap.add_argument("--seeds", default="0-4", help="'0-4' or '0,2,5'")
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=[])
    ap.add_argument("--budget-s", type=float, default=600.0, help="training seconds per run (validation excluded)")
    ap.add_argument("--report", action="store_true", help="summarise the finished runs under --runs")
    ap.add_argument("--name", help="results file stem under tools/results/ (with --report)")
    ap.add_argument("--title", default="SmolLM2-135M arithmetic, 2 CPU cores, 10 minutes of training per run")
    ap.add_argument("--previous", help="an earlier --report JSON whose runs count too where --runs lacks them")
    ap.add_argument("--test", nargs=2, action="append", metavar=("ARM_A", "ARM_B"),
                    help="rank-test these two arms (repeat the flag for more pairs)")
    ap.add_argument("--rescale", action="append", default=[], metavar="ARM=FACTOR",
                    help="also report ARM's runs on this machine's clock: their training seconds x FACTOR (a run "
                         "from a faster machine; FACTOR from rerunning one of its runs here)")
    args = ap.parse_args(argv)
    try:
        seeds = seeds_of(args.seeds)
    except ValueError as e:
        print(f"seed_sweep: {e}", file=sys.stderr)
        return 2
    try:
        args.rescale = [rescale_of(x) for x in args.rescale]
    except ValueError as e:
        print(f"seed_sweep: --rescale {e}: pass ARM=FACTOR with ARM one of {list(ARMS)} and FACTOR > 0 "
              "(e.g. --rescale 'ESSA uniform=1.5')", file=sys.stderr)
        return 2
    if not args.arms and not args.report:
        print("seed_sweep: nothing to do; pass --arms (with --adapter) to run, or --report to summarise",
              file=sys.stderr)
        return 2
    if args.arms:
        if not args.adapter or not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
            print(f"seed_sweep: --adapter {args.adapter} is not an adapter folder; make it with python -m essa_mpi "
                  "sft (see this file's docstring)", file=sys.stderr)
            return 2
        for seed in seeds:  # seed-major: a sweep cut short stays balanced across arms
            for arm in args.arms:
                launch(args, arm, seed, args.adapter)
    if args.report:
        if not os.path.isdir(args.runs) and not args.previous:
            print(f"seed_sweep: --runs {args.runs} is not a folder of runs; pass the folder a sweep wrote (or "
                  "--previous with an earlier report's JSON)", file=sys.stderr)
            return 2
        if args.previous and not os.path.isfile(args.previous):
            print(f"seed_sweep: --previous {args.previous} is not a file; pass a JSON an earlier --report --name "
                  "wrote (tools/results/<name>.json)", file=sys.stderr)
            return 2
        summary = report(args)
        if not summary["arms"]:
            print(f"seed_sweep: no finished run under --runs {args.runs}; nothing to report (no file written)",
                  file=sys.stderr)
            return 2
        print(table(summary))
        for pair in args.test or []:
            if not any(t["arms"] == pair for t in summary["tests"]):
                print(f"seed_sweep: no rank test: --test names {pair}, finished runs exist for "
                      f"{list(summary['arms'])}", file=sys.stderr)
        if args.name:
            with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as fh:
                json.dump(summary, fh, indent=1)
            with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as fh:
                fh.write(table(summary) + "\n")
            plot(summary, os.path.join(RESULTS, f"{args.name}.png"), args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
