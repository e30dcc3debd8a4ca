"""Many simulated SLURM nodes on one host: a tiny ESSA run at 4 ranks per node, against mpiexec -n 1.

    sudo bash tools/slurm_local.sh up --nodes 8
    python tools/bench/bench_nodes.py                       # 4 x 4 and 8 x 4 ranks -> tools/results/bench_nodes.json
    python tools/bench/bench_nodes.py --shapes 2x2,4x4      # NODESxRANKS_PER_NODE
    python tools/bench/bench_nodes.py --shapes 8x4 --set model.precision=fp32 --out /tmp/fp32.json

Each rank runs under ``/usr/bin/time`` (its peak RSS is measured from outside the process, by the kernel's
accounting); wall time is srun's launch to its end (nearly all of it the ranks' imports on this 2-core host).
The best adapter of every shape must be bit-identical to the one-rank run's: the trajectory does not depend on
the number of ranks or nodes. Tiny random model (tests/tiny.py), popsize 16 x 3 prompts, 3 generations.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))
RSS = re.compile(r"^\s*(?:\d+: )?essa-rss rank (\d+) node (\S+) maxrss_kib (\d+)$")


def run_args(model: str, out: str, extra: tuple = ()) -> list:
    return [f"model.name_or_path={model}", "model.device=cpu", "model.threads=1", "adapter.rank=2",
            "adapter.warm_start=none", "task.name=toy", "task.batch_size=3", "task.val_size=4", "task.val_every=3",
            "task.max_new_tokens=6", "search.popsize=16", "search.sigma0=1.0", "run.generations=3",
            "run.progress=false", f"run.output_dir={out}", *extra]


def adapter_bytes(out: str) -> bytes:
    with open(os.path.join(out, "best_adapter", "adapter_model.safetensors"), "rb") as fh:
        return fh.read()


def shape_run(nodes: int, per_node: int, model: str, base: str, reference: bytes, extra: tuple) -> dict:
    out = os.path.join(base, f"n{nodes}x{per_node}")
    # bash in each task fills in its rank and node; time(1) reports the python process's peak RSS when it ends
    rank = f"{shlex.quote(sys.executable)} -m essa_mpi {' '.join(map(shlex.quote, run_args(model, out, extra)))}"
    script = f'exec /usr/bin/time -f "essa-rss rank $SLURM_PROCID node $SLURMD_NODENAME maxrss_kib %M" {rank}'
    cmd = ["srun", "--label", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--cpus-per-task=1", "--mpi=pmi2",
           "bash", "-c", script]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
    wall = time.time() - t
    if res.returncode:
        raise SystemExit(f"bench_nodes: {nodes}x{per_node} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    ranks = sorted((int(m[1]), m[2], int(m[3]) / 2**20) for m in map(RSS.match, res.stderr.splitlines()) if m)
    assert len(ranks) == nodes * per_node, res.stderr[-2000:]
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    rss = [r[2] for r in ranks]
    return {"nodes": nodes, "ranks_per_node": per_node, "ranks": len(ranks), "wall_s": round(wall, 1),
            "peak_rss_gib_per_rank": {"min": round(min(rss), 3), "median": round(sorted(rss)[len(rss) // 2], 3),
                                      "max": round(max(rss), 3)},
            "peak_rss_gib_total": round(sum(rss), 2), "distinct_nodes": len(set(summary["hosts"])),
            "best_adapter_equals_one_rank": adapter_bytes(out) == reference}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4x4,8x4", help="NODESxRANKS_PER_NODE, comma-separated")
    ap.add_argument("--set", nargs="*", default=(), metavar="KEY=VALUE", help="more overrides for every run")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_nodes.json"))
    args = ap.parse_args()
    from tiny import save_tiny

    base = tempfile.mkdtemp(prefix="bench_nodes_")
    model = save_tiny(os.path.join(base, "tiny"))
    one = os.path.join(base, "n1")
    subprocess.run([sys.executable, "-m", "essa_mpi", *run_args(model, one, args.set)], check=True, capture_output=True,
                   cwd=REPO)
    reference = adapter_bytes(one)
    rows = []
    for shape in args.shapes.split(","):
        nodes, per_node = (int(x) for x in shape.lower().split("x"))
        rows.append(shape_run(nodes, per_node, model, base, reference, args.set))
        print(json.dumps(rows[-1]), flush=True)
    with open(args.out, "w") as fh:
        json.dump({"host_cores": os.cpu_count(), "overrides": list(args.set), "rows": rows}, fh, indent=1)
    return 0 if all(r["best_adapter_equals_one_rank"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
