"""ESSA against GRPO and SVD-GRPO: the embedded model, arithmetic, one SFT start, one training-time budget.

    python tools/bench/bench_vs_grpo.py                                  # 20 min per run: about 2.5 h on 2 cores
    python tools/bench/bench_vs_grpo.py --budget-s 480 --name bench_vs_grpo_quick --runs runs/vs_grpo_quick  # a look
    python tools/bench/bench_vs_grpo.py --replot                         # JSON and PNG from the run directories
    python tools/bench/bench_vs_grpo.py --variant b96 'task.batch_size=96'  # one more ESSA setting beside the main one
    python tools/bench/bench_vs_grpo.py --adapter runs/sft/X --sft-size 300 --seed 1 --runs runs/sweep_s1  # a given
                                                                         # start, a second search / trainer seed

1. The SFT adapter every method starts from: ``python -m essa_mpi sft`` with task.sft_size (1,500 by default,
   the strong start at which ESSA stalled before).
2. ESSA: ``mpiexec -n 2 python -m essa_mpi`` from that adapter, 1 thread per rank; stopped with SIGTERM (a
   clean stop that keeps the checkpoint) once its training clock passes the budget. Each ``--variant`` is one
   more ESSA run; the targets use the best ESSA run against the best gradient run (GRPO or SVD-GRPO).
3. GRPO (TRL, PEFT LoRA) and SVD-GRPO: ``tools/bench/grpo_baseline.py``, 2 threads, one run per learning rate.
Every method is validated by essa_mpi's evaluator on the same 200 held-out problems (greedy, same tokens,
same grader); the training clock excludes validation for all of them (wall_s minus the val_s logged so far).
--seed is search.seed for every method, with task.seed=0 so the problems and the start stay put: it decides
ESSA's candidates and mini-batch order, and GRPO's row order, trainer seed and sampling (grpo_baseline.py).
Output: tools/results/bench_vs_grpo.json (curves, best accuracy, time to reach the other side's best) and
bench_vs_grpo.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/<group>/ -> the repository
RESULTS = os.path.join(ROOT, "tools", "results")


def curve(run_dir: str) -> list:
    """[(training seconds, validation reward)] of a run: wall_s minus the validation seconds so far."""
    out, paused = [], 0.0
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for m in map(json.loads, fh):
            if "val_reward" in m:
                paused += m.get("val_s", 0.0)  # logged when validation ended: its own seconds count too
                out.append((round(m["wall_s"] - paused, 1), m["val_reward"]))
    return out


def time_to(points: list, target: float) -> float | None:
    return next((t for t, v in points if v >= target - 1e-9), None)


def wall_limit(budget_s: float) -> float:
    """Wall seconds a run of this training budget may take at most: loading, validation and slack included."""
    return 2 * budget_s + 1200


def sft_adapter(sft_size: int, overrides: list = ()) -> str:
    """The SFT adapter every method starts from: ``python -m essa_mpi sft`` (trained once, then cached)."""
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "sft", f"task.sft_size={sft_size}", *overrides], cwd=ROOT,
                         capture_output=True, text=True, check=True, timeout=3600)  # 1,500 rows: ~6 min here
    return json.loads(res.stdout.strip().splitlines()[-1])["adapter"]


def data(args) -> list:
    """Overrides every method gets: the same problems (task.seed 0: validation and training rows do not move
    with --seed), the rows after the SFT rows, and the search / trainer seed."""
    return [f"task.sft_size={args.sft_size}", "task.seed=0", f"search.seed={args.seed}"]


def essa(args, sft_dir: str, out: str, overrides: list) -> None:
    """Run ESSA until its training clock passes the budget, then SIGTERM (keeps the checkpoint)."""
    cmd = ["mpiexec", "-n", "2", sys.executable, "-m", "essa_mpi", *data(args), f"adapter.path={sft_dir}",
           "model.threads=1", f"task.val_every={args.essa_val_every}", "task.val_base=false", "run.generations=100000",
           "run.progress=false", f"run.output_dir={out}", *overrides]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    hard_stop = time.time() + wall_limit(args.budget_s)
    while proc.poll() is None:
        time.sleep(5)
        if time.time() > hard_stop:  # never reached the budget (stuck loading, say): do not wait forever
            proc.send_signal(signal.SIGTERM)
            proc.wait()
            raise RuntimeError(f"ESSA run {out} exceeded {wall_limit(args.budget_s):.0f} s of wall clock; see its log")
        metrics = os.path.join(out, "metrics.jsonl")
        if not os.path.exists(metrics):
            continue
        with open(metrics) as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        trained = rows[-1]["wall_s"] - sum(m.get("val_s", 0.0) for m in rows) if rows else 0.0
        if trained >= args.budget_s and "val_reward" in rows[-1]:
            proc.send_signal(signal.SIGTERM)
    proc.wait()


def grpo(args, sft_dir: str, method: str, lr: float, out: str) -> None:
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench", "grpo_baseline.py"), "--method", method,
                    "--adapter", sft_dir, "--lr", str(lr), "--budget-s", str(args.budget_s), "--threads", "2",
                    "--prompts", str(args.prompts), "--group", str(args.group), "--val-every-s",
                    str(args.val_every_s), "--out", out, *data(args), *args.grpo], cwd=ROOT, check=True,
                   timeout=wall_limit(args.budget_s),
                   env={**os.environ,
                        "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))})


def start_adapter(run_dir: str) -> dict | None:
    """The SFT adapter a run started from: its path, row count and the digest of its SFT rows."""
    try:
        with open(os.path.join(run_dir, "config.yaml")) as fh:
            path = yaml.safe_load(fh)["adapter"]["path"]
        with open(os.path.join(ROOT, path, "sft_info.json")) as fh:
            info = json.load(fh)
    except (OSError, KeyError, TypeError):
        return None
    return {"path": path, "rows": info.get("rows"), "data_digest": info.get("data_digest")}


def summarize(runs: dict, args) -> dict:
    # a run stops at its first validation past the budget; with slow generations that can be minutes later,
    # so points beyond budget + 5% are dropped: every method is judged on the same clock
    curves = {name: [(t, v) for t, v in curve(d) if t <= 1.05 * args.budget_s]
              for name, d in runs.items() if os.path.exists(os.path.join(d, "metrics.jsonl"))}
    best = {name: max(v for _, v in c) for name, c in curves.items() if c}
    grpo_names = [n for n in best if "GRPO" in n]  # GRPO and SVD-GRPO: every gradient run counts
    essa_names = [n for n in best if n.startswith("ESSA")]  # the main run and each --variant
    essa_best, out = max((best[n] for n in essa_names), default=None), {}
    if grpo_names and essa_best is not None:
        g = max(grpo_names, key=best.get)
        reached = [t for t in (time_to(curves[n], best[g]) for n in essa_names) if t is not None]
        t_essa, t_grpo = min(reached, default=None), time_to(curves[g], best[g])
        rose = t_grpo is not None and t_grpo > 0  # a best at t = 0 is the start: no time to compare
        out = {"best_grpo_run": g, "best_essa_run": max(essa_names, key=best.get),
               "essa_time_to_grpo_best_s": t_essa, "grpo_time_to_its_best_s": t_grpo,
               "grpo_time_to_essa_best_s": time_to(curves[g], essa_best),
               "target_essa_within_half_grpo_time": (t_essa is not None and t_essa <= 0.5 * t_grpo) if rose else None,
               "target_essa_best_at_least_grpo_best": essa_best >= best[g]}
    start = curves.get("ESSA", [(0, None)])[0][1]
    return {"budget_s": args.budget_s, "sft_size": args.sft_size, "seed": args.seed,
            "sft_adapter": start_adapter(runs["ESSA"]),
            "grpo": {"prompts_per_step": args.prompts,
            "group_size": args.group, "threads": 2, "beta": 0.0, "temperature": 1.0, "overrides": args.grpo},
            "essa": {"ranks": 2, "threads_per_rank": 1, "overrides": args.essa,
                     "variants": {label: o.split() for label, o in args.variant or []}}, "start_val_reward": start,
            "curves": curves, "best": best, **out,
            "target_plus_5_points": None if start is None or essa_best is None else essa_best - start >= 0.05}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=1200.0)
    ap.add_argument("--sft-size", type=int, default=1500)
    ap.add_argument("--adapter", help="start from this SFT adapter instead of `python -m essa_mpi sft` with "
                    "--sft-size (which still sets the rows the methods train on: those after the SFT rows)")
    ap.add_argument("--seed", type=int, default=0, help="search.seed of ESSA and the GRPO trainer seed")
    ap.add_argument("--lrs", default="1e-5,1e-4,3e-4", help="GRPO learning rates (the sweep)")
    ap.add_argument("--svd-lrs", default="1e-2", help="SVD-GRPO learning rates")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--val-every-s", type=float, default=120.0)
    ap.add_argument("--essa-val-every", type=int, default=3)
    ap.add_argument("--essa", nargs="*", default=[], metavar="section.key=value", help="ESSA overrides")
    ap.add_argument("--grpo", nargs="*", default=[], metavar="section.key=value",
                    help="GRPO / SVD-GRPO overrides (e.g. model.precision=fp32)")
    ap.add_argument("--variant", nargs=2, action="append", metavar=("LABEL", "OVERRIDES"),
                    help="one more ESSA run, e.g. --variant batch96 'task.batch_size=96' (runs/.../essa_LABEL)")
    ap.add_argument("--runs", default=os.path.join(ROOT, "runs", "vs_grpo"))
    ap.add_argument("--replot", action="store_true")
    ap.add_argument("--name", default="bench_vs_grpo", help="results file stem under tools/results/")
    args = ap.parse_args()
    runs = {"ESSA": os.path.join(args.runs, "essa")}
    variants = {f"ESSA {label}": o.split() for label, o in args.variant or []}
    runs.update({name: os.path.join(args.runs, "essa_" + name[5:]) for name in variants})
    runs.update({f"GRPO lr={lr}": os.path.join(args.runs, f"grpo_lr{lr}") for lr in args.lrs.split(",") if lr})
    runs.update({f"SVD-GRPO lr={lr}": os.path.join(args.runs, f"svd_grpo_lr{lr}") for lr in args.svd_lrs.split(",")
                 if lr})
    if not args.replot:
        sft_dir = args.adapter or sft_adapter(args.sft_size)
        for name, out in runs.items():
            if os.path.exists(os.path.join(out, "metrics.jsonl")):
                continue  # measured already: --runs keeps finished runs, delete one to measure it again
            if name.startswith("ESSA"):
                essa(args, sft_dir, out, variants.get(name, args.essa))
            else:
                grpo(args, sft_dir, "svd-grpo" if name.startswith("SVD") else "grpo", float(name.split("=")[1]), out)
    summary = summarize(runs, args)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    plot_curves(summary, os.path.join(RESULTS, f"{args.name}.png"))
    print(json.dumps({k: v for k, v in summary.items() if k != "curves"}, indent=1))
    return 0


def plot_curves(summary: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    p = summary["start_val_reward"]
    if p is not None:  # one validation pass's binomial standard error around the start: the noise floor
        se = (p * (1 - p) / 200) ** 0.5
        ax.axhspan(p - se, p + se, color="grey", alpha=0.15, label=f"start ± 1 SE ({se:.3f})")
    for name, points in summary["curves"].items():
        if points:
            t, v = zip(*points)
            ax.plot([x / 60 for x in t], v, marker="o", ms=3, label=f"{name} (best {max(v):.3f})",
                    lw=2.5 if name.startswith("ESSA") else 1.2)
    ax.set_xlabel("training wall clock, validation excluded (min)")
    ax.set_ylabel("validation accuracy (200 problems)")
    ax.set_title(f"SmolLM2-135M arithmetic from a {summary['sft_size']}-problem SFT start, 2 CPU cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
