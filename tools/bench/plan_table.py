"""``python -m essa_mpi plan`` for every jobs/*.yaml on 8 x 80 GiB (H100) and 8 x 141 GiB (H200) nodes, today's
memory model beside an earlier commit's: rows per generate call and estimated peak, search / eval / SFT.

    python tools/bench/plan_table.py --before 05f223d        # -> tools/results/plan_table.json, a markdown table

Both trees read the same model configs (tests/data/model_configs: the published config.json fields, the reward
model's included) and load no weights. Today's search row is the hf engine's (what a rank without vLLM uses, and
vLLM's most sequences at once); the engine line says which engine a GPU rank takes.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
REPO = os.path.dirname(HERE)
CONFIGS = os.path.join(REPO, "tests", "data", "model_configs")
ROW = re.compile(r"^\s+(search|hf|eval|sft)\s+(\d+) rows per (?:call|SFT pass): peak\s+([\d.]+) of ([\d.]+)")


def plan(tree: str, job: str, gib: int) -> dict:
    """{part: (rows, peak GiB)} and the engine and terms lines of one plan call from ``tree``."""
    env = {**os.environ, "PYTHONPATH": tree}
    gpus = ["--gpus-per-node", "0", "--ram-gib", "24"] if "smollm2" in job else ["--gib-per-gpu", str(gib)]
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "plan", "--config", job, "--model-config", CONFIGS, *gpus],
                         cwd=tree, env=env, capture_output=True, text=True)
    out: dict = {"exit": res.returncode, "terms": []}
    for line in res.stdout.splitlines():
        m = ROW.match(line)
        if m:
            out["search" if m.group(1) == "hf" else m.group(1)] = [int(m.group(2)), float(m.group(3))]
        elif line.strip().startswith("engine:"):
            out["engine"] = line.strip()[len("engine: "):]
        elif line.startswith("         "):
            out["terms"].append(line.strip())
        elif "search (vLLM)" in line:
            out["vllm"] = line.split(":", 1)[1].strip()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the earlier commit")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "plan_table.json"))
    args = ap.parse_args()
    tree = os.path.join(tempfile.mkdtemp(prefix="plan_table_"), "before")
    subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", tree, args.before], check=True,
                   capture_output=True)
    rows = []
    try:
        for job in sorted(glob.glob(os.path.join(REPO, "jobs", "*.yaml"))):
            for gib in (80, 141):
                if "smollm2" in job and gib == 141:
                    continue
                rows.append({"job": os.path.basename(job), "gib": gib, "before": plan(tree, job, gib),
                             "now": plan(REPO, job, gib)})
    finally:
        subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", tree], capture_output=True)
    with open(args.out, "w") as fh:
        json.dump({"before": args.before, "rows": rows}, fh, indent=1)
    cell = lambda p, k: f"{p[k][0]} · {p[k][1]:.1f}" if k in p else "–"  # noqa: E731
    print("| job | GPU GiB | search before → now (rows · peak GiB) | eval before → now | SFT before → now "
          "| engine now |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b, n = r["before"], r["now"]
        gib = "CPU 24" if "smollm2" in r["job"] else r["gib"]
        engine = n.get("engine", "").replace("model.engine=auto: ", "")
        engine = "vLLM (hf where it does not import)" if engine.startswith("vllm") else engine
        print(f"| {r['job']} | {gib} | {cell(b, 'search')} → {cell(n, 'search')} | {cell(b, 'eval')} → "
              f"{cell(n, 'eval')} | {cell(b, 'sft')} → {cell(n, 'sft')} | {engine} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
