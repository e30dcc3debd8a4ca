"""Reading metrics.jsonl (one JSON object per line, appended by a run that may have been killed mid-line): the one
reader that the run's resume (``metrics.reconcile``) and the curves (``plot``) both use.

    rows, problems = read_rows("runs/x/metrics.jsonl")   # [dict], [(line number, what is wrong)]
"""

from __future__ import annotations

import json


def read_rows(path: str) -> tuple:
    """metrics.jsonl → (rows, problems): every line that is a JSON object, and [(line number, what is wrong)]
    for the others (a line cut by a crash mid-append, text that is not JSON, JSON that is not an object)."""
    rows, problems = [], []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                problems.append((number, "not complete JSON (cut off mid-write?)"))
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                problems.append((number, f"a JSON {type(row).__name__}, not an object"))
    return rows, problems
