"""Rows of tools/checks/fault_table.py's tables, written by the tests that assert them (only when
$ESSA_FAULT_TABLE names a JSONL file), so the table and the tests cannot drift apart.

Kinds: ``corpus`` (a bad input to a run), ``fault`` (something that happens to a run), ``tool`` (a bad argument to
a side command: plan, seed_sweep, grpo_baseline, latency). ``text`` comes from ``error_line(stderr)``, which notes
whether that stderr held a Python traceback.
"""

from __future__ import annotations

import json
import os

_last = {"traceback": None}  # whether the stderr error_line() last read held a Python traceback


def record(kind: str, name: str, code: int, seconds: float, text: str, kept: str = "") -> None:
    path = os.environ.get("ESSA_FAULT_TABLE")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"kind": kind, "name": name, "exit": code, "seconds": round(seconds, 2),
                                 "message": text, "kept": kept, "traceback": _last["traceback"]}) + "\n")


def error_line(err: str, prefix: str = "essa_mpi:") -> str:
    """The line a user reads: the first that starts with prefix (a tool's own name for the side tools)."""
    _last["traceback"] = "Traceback" in err
    return next((line for line in err.splitlines() if line.startswith(prefix)), f"(no line from {prefix[:-1]})")


def tool(name: str, code: int, err: str, seconds: float = 0.0) -> None:
    """A side command's row (called in-process): its exit code and the first line it printed to stderr."""
    _last["traceback"] = "Traceback" in err
    record("tool", name, code, seconds, next((x for x in err.splitlines() if x.strip()), "(nothing on stderr)"))
