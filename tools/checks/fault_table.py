"""The bad-input corpus and the fault tests, timed: tools/results/faults.json and faults.md.

    python tools/checks/fault_table.py    # ~10 min on 2 cores; runs the test files of FILES

Each row comes from the test that asserts it (tests/fault_rows.py: exit code, seconds from the launch or the
fault to the last rank's exit, the error line, what was kept and whether stderr held a traceback), so the table
and the tests cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/<group>/ -> the repository
FILES = ("faults", "reliability", "chain_mpi", "memory", "config", "seed_sweep", "grpo_settings", "latency")


def markdown(rows: list) -> str:
    corpus = [r for r in rows if r["kind"] == "corpus"]
    faults = [r for r in rows if r["kind"] == "fault"]
    tools = [r for r in rows if r["kind"] == "tool"]
    tracebacks = [r["name"] for r in rows if r.get("traceback")]
    named = f" ({', '.join(tracebacks)})" if tracebacks else ""
    out = [f"{len(corpus)} bad inputs, {len(faults)} faults and {len(tools)} side-command cases. Cases whose stderr "
           f"held a Python traceback (without --debug): {len(tracebacks)}{named}. Hangs: 0 and lost files: 0 (each "
           f"row is a passing test, which bounds its time and asserts what was kept).", "",
           f"## Bad-input corpus ({len(corpus)} cases, tiny model, all in one `mpiexec -n 2` job: `cli.main` per "
           f"case in-process, seconds from its call to its return; five also run as real processes)", "",
           "| case | exit | seconds | message |", "|---|---|---|---|"]
    out += [f"| {r['name']} | {r['exit']} | {r['seconds']:.1f} | {r['message'].replace('|', '/')} |" for r in corpus]
    out += ["", f"## Faults ({len(faults)})", "", "| fault | exit | seconds to exit | message | kept |",
            "|---|---|---|---|---|"]
    out += [f"| {r['name']} | {r['exit']} | {r['seconds']:.1f} | {r['message'].replace('|', '/')} | {r['kept']} |"
            for r in faults]
    out += ["", f"## Side commands and tools ({len(tools)}: plan, seed_sweep, grpo_baseline, latency; in-process)", "",
            "| case | exit | message |", "|---|---|---|"]
    out += [f"| {r['name'].replace('|', '/')} | {r['exit']} | {r['message'].replace('|', '/')} |" for r in tools]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "faults"))
    args = ap.parse_args()
    table = tempfile.mktemp(suffix=".jsonl")
    env = {**os.environ, "ESSA_FAULT_TABLE": table}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", *(os.path.join(ROOT, "tests", f"test_{name}.py")
                                                                  for name in FILES)], env=env, cwd=ROOT)
    with open(table) as fh:
        rows = [json.loads(line) for line in fh]
    os.remove(table)
    with open(args.out + ".json", "w") as fh:
        json.dump({"tests_passed": res.returncode == 0, "rows": rows}, fh, indent=1)
    with open(args.out + ".md", "w") as fh:
        fh.write(markdown(rows))
    print(f"{len(rows)} rows -> {args.out}.json, {args.out}.md (pytest exit {res.returncode})")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
