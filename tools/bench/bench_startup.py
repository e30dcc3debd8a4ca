"""Time to first generation under SLURM: launch -> the first generation's start, split by stage, today's code
beside an earlier commit's, at several ranks x simulated nodes.

    sudo bash tools/slurm_local.sh up --nodes 4
    python tools/bench/bench_startup.py --before a71949b                 # -> tools/results/bench_startup.json
    python tools/bench/bench_startup.py --before a71949b --shapes 1x1,2x2 --model /path/to/model

The split is measured from outside the ranks: the bench polls rank 0's stage log (ESSA_STAGE_LOG, one line as
each stage begins) and metrics.jsonl (the base validation's row is written as the first generation starts),
and stamps each line when it appears. Stages: imports (launch -> resolve, or -> start where a commit has no
resolve stage), resolve + stage (hub names, node-local copies), read (datasets) + checks, SFT (warm start),
load (the search's model), base validation. The embedded model by default, a short SFT, one generation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
REPO = os.path.dirname(HERE)
MARKS = ["resolve", "read", "start", "sft", "load", "base validation"]  # rank 0's stage log, in order


def run_args(out: str, sft_dir: str, model: str | None) -> list:
    return [*([f"model.name_or_path={model}"] if model else []), "model.device=cpu", "task.batch_size=4",
            "task.val_size=8", "task.max_new_tokens=16", "task.sft_size=32", "sft.batch_size=16",
            "search.popsize=8", "run.generations=1", "run.progress=false", f"run.output_dir={out}",
            f"sft.output_dir={sft_dir}"]


def watch(proc, stages_log: str, metrics: str, t0: float) -> dict:
    """Seconds from launch at which each stage line (and the base validation row) appeared."""
    seen: dict = {}
    while proc.poll() is None:
        if os.path.exists(stages_log):
            for line in open(stages_log).read().splitlines():
                seen.setdefault(line, round(time.time() - t0, 2))
        if "first generation" not in seen and os.path.exists(metrics) and '"val_base_reward"' in open(metrics).read():
            seen["first generation"] = round(time.time() - t0, 2)
            proc.terminate()  # srun ends the step: what comes after is not measured here
            proc.wait()
            return seen
        time.sleep(0.05)
    return seen


def split(seen: dict) -> dict:
    """Stage durations from the stamps (a stage a commit does not mark folds into the one before)."""
    marks = [(m, seen[m]) for m in MARKS if m in seen] + [("first generation", seen.get("first generation"))]
    out, prev, name = {}, 0.0, "imports"
    for m, t in marks:
        if t is None:
            break
        out[name] = round(t - prev, 2)
        prev, name = t, {"resolve": "resolve + stage", "read": "read + checks", "start": "claim",
                         "sft": "SFT", "load": "load", "base validation": "base validation"}.get(m, m)
    out["total"] = seen.get("first generation")
    return out


def one(tree: str, nodes: int, ranks: int, model: str | None, base: str, label: str) -> dict:
    out, sft_dir = os.path.join(base, f"{label}_{ranks}x{nodes}"), os.path.join(base, f"{label}_{ranks}x{nodes}_sft")
    stages_log = f"{out}.stages"
    env = {**os.environ, "ESSA_STAGE_LOG": stages_log, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = ["srun", f"--nodes={nodes}", f"--ntasks={ranks}", "--cpus-per-task=1", "--mpi=pmi2", f"--chdir={tree}",
           sys.executable, "-m", "essa_mpi", *run_args(out, sft_dir, model)]
    t0 = time.time()
    with open(f"{out}.log", "wb") as log:  # a file, not a pipe: nobody reads a pipe while the bench polls
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        seen = watch(proc, stages_log, os.path.join(out, "metrics.jsonl"), t0)
    if "first generation" not in seen:
        with open(f"{out}.log", encoding="utf-8", errors="replace") as fh:
            raise SystemExit(f"bench_startup: {label} {ranks}x{nodes} failed ({proc.returncode}):\n{fh.read()[-3000:]}")
    return {"code": label, "ranks": ranks, "nodes": nodes, "seconds": split(seen)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the earlier commit to compare with (checked out to a temp dir)")
    ap.add_argument("--shapes", default="1x1,2x2,4x2,8x4", help="RANKSxNODES, comma-separated")
    ap.add_argument("--model", help="model.name_or_path (default: the embedded model)")
    ap.add_argument("--previous", help="a JSON-lines file of rows printed by an earlier, cut run: kept, not rerun")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_startup.json"))
    args = ap.parse_args()
    base = tempfile.mkdtemp(prefix="bench_startup_")
    before = os.path.join(base, "before")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", before, args.before], check=True,
                   capture_output=True)
    rows = [json.loads(line) for line in open(args.previous)] if args.previous else []
    try:
        for shape in args.shapes.split(","):
            ranks, nodes = (int(x) for x in shape.lower().split("x"))
            for label, tree in (("before", before), ("now", REPO)):
                if any(r["code"] == label and (r["ranks"], r["nodes"]) == (ranks, nodes) for r in rows):
                    continue
                rows.append(one(tree, nodes, ranks, args.model, base, label))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", before], capture_output=True)
    with open(args.out, "w") as fh:
        json.dump({"before": args.before, "now": subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                   capture_output=True, text=True).stdout.strip(), "host_cores": os.cpu_count(), "rows": rows}, fh,
                  indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
