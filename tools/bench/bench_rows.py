"""Rows per generate call on this CPU, and the default config's seconds per generation beside an earlier commit.

    python tools/bench/bench_rows.py --curve                      # rows-per-call curve -> tools/results/bench_rows.json
    python tools/bench/bench_rows.py --before 81f75b3 --repeats 2 # side by side, mpiexec -n 2 (same file, merged)
    python tools/bench/bench_rows.py --split 05f223d              # popsize 6 on 4, 3 on 2 ranks: before, now

--curve: ``mpiexec -n 2`` runs of the embedded default (bf16, 1 thread per rank, as the default job) with
adapter.warm_start=none, task.val_size=0, one generation of popsize 32 x 64 prompts = 1,024 rows per rank,
for run.max_rows in 64 ... 1,024 and auto; seconds of evaluation per row from metrics.jsonl (the slowest rank's
eval_s), and the rows per call the run said it used (its "rows per generate call" line).

--before: the default config (``adapter.warm_start=none task.val_size=0 run.generations=2``, seed 0), today's
tree and the earlier commit's (checked out to a temp dir, imported first through PYTHONPATH), alternating, each
``mpiexec -n 2``; seconds per generation = eval_s of each generation line (evaluation only, the exchange is
microseconds), median over generations and repeats.

--split: search.popsize=6 on ``mpiexec -n 4`` and 3 on 2 (2 generations of the default's 48 prompts; 2 ranks
on this 2-core host are each alone on a core, as ranks on their own GPUs are), the earlier commit
(whole candidates per rank) and today's tree (rows split evenly); rows per rank counted outside the code under
test, by the task's reward (tools/bench/count_rows.py appends each call's rows to a file per rank), and the
wall seconds per generation (the slowest rank's eval_s).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
REPO = os.path.dirname(HERE)
OUT = os.path.join(HERE, "results", "bench_rows.json")
_beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
MPIEXEC = _beside if os.path.isfile(_beside) else shutil.which("mpiexec")
DEFAULT = ["adapter.warm_start=none", "task.val_size=0", "run.progress=false"]


def run(tree: str, out: str, extra: list, n: int = 2, env: dict | None = None) -> dict:
    """One ``mpiexec -n N python -m essa_mpi`` from ``tree`` → {"eval_s": [per generation], "rows_line": str}."""
    env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join([tree, os.path.join(HERE, "bench")]),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [MPIEXEC, "-n", str(n), sys.executable, "-m", "essa_mpi", *DEFAULT, *extra, f"run.output_dir={out}"]
    res = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        gens = [json.loads(line) for line in fh if '"reward_mean"' in line]
    said = re.search(r"(\d+) rows per generate call[^\n]*", res.stdout + res.stderr)
    return {"eval_s": [g["eval_s"] for g in gens], "rows_line": said.group(0) if said else None,
            "reward_mean": [g["reward_mean"] for g in gens]}


def curve(base: str, points: list) -> list:
    rows = []
    for want in points:
        got = run(REPO, os.path.join(base, f"rows{want}"), ["search.popsize=32", "task.batch_size=64",
                                                           "run.generations=1", f"run.max_rows={want}"])
        per_row = got["eval_s"][0] / 1024
        rows.append({"max_rows": want, "eval_s": got["eval_s"][0], "ms_per_row": round(1000 * per_row, 2),
                     "rows_line": got["rows_line"]})
        print(rows[-1], flush=True)
    return rows


def checkout(base: str, commit: str) -> str:
    tree = os.path.join(base, f"tree-{commit}")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, commit], check=True, capture_output=True)
    return tree


def side_by_side(base: str, before: str, repeats: int) -> dict:
    tree = checkout(base, before)
    out = {"before": [], "now": []}
    try:
        for i in range(repeats):
            for label, where in (("before", tree), ("now", REPO)):
                got = run(where, os.path.join(base, f"{label}{i}"), ["run.generations=2"])
                out[label].append(got)
                print(label, got, flush=True)
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
    med = {k: statistics.median([s for r in v for s in r["eval_s"]]) for k, v in out.items()}
    return {"before_commit": before, "runs": out, "median_eval_s": med,
            "ratio_now_to_before": round(med["now"] / med["before"], 3)}


def split(base: str, before: str, popsize: int, n: int) -> dict:
    """popsize on n ranks: rows per rank per generation (counted at the reward) and seconds per generation."""
    tree, out = checkout(base, before), {}
    try:
        for label, where in (("before", tree), ("now", REPO)):
            prefix = os.path.join(base, f"rows-{label}-{popsize}x{n}")
            got = run(where, os.path.join(base, f"split-{label}-{popsize}x{n}"),
                      [f"search.popsize={popsize}", "run.generations=2", "task.reward_fn=count_rows:reward"], n=n,
                      env={"ESSA_ROWS": prefix})
            rows = []
            for r in range(n):
                with open(f"{prefix}.{r}") as fh:
                    rows.append(sum(int(x) for x in fh.read().split()) // 2)  # per generation
            out[label] = {**got, "rows_per_rank": rows, "spread": max(rows) - min(rows)}
            print(label, out[label], flush=True)
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
    return {"before_commit": before, "popsize": popsize, "ranks": n, **out}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--curve", action="store_true", help="the rows-per-call curve")
    ap.add_argument("--points", default="64,128,256,512,1024,auto", help="run.max_rows values of the curve")
    ap.add_argument("--before", help="an earlier commit to compare the default config's generation time with")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each tree, alternating")
    ap.add_argument("--split", metavar="COMMIT", help="an uneven population, this commit beside today's tree")
    ap.add_argument("--split-shapes", default="6x4,3x2", help="popsize x ranks of --split")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    result = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    base = tempfile.mkdtemp(prefix="bench_rows_")
    try:
        if args.curve:
            result["curve"] = curve(base, args.points.split(","))
        if args.before:
            result["side_by_side"] = side_by_side(base, args.before, args.repeats)
        if args.split:
            result["split"] = [split(base, args.split, *map(int, shape.split("x")))
                               for shape in args.split_shapes.split(",")]
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result["commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                      text=True).stdout.strip()
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "side_by_side"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
