"""Math benchmarks for ``python -m essa_mpi eval``: loading, gold answers, and the pass@k estimator.

    rows = load_benchmark("aime24", data_dir="../shared/data/mathbench")   # [{"prompt", "answer"}]
    pass_at_k(n=8, c=2, k=4)                                               # unbiased estimate

Local layout (``eval.data_dir``): ``<name>/test.jsonl``, as in Qwen2.5-Math's ``evaluation/data``; any
JSONL file also works (``LABEL=path``). Without a local copy, each name loads its Hugging Face dataset.
Gold answers: the ``answer`` column (GSM8K: the text after ``####``), else OlympiadBench's
``final_answer`` list, else the last ``\\boxed{}`` of ``solution``; graded with math-verify.
"""

from __future__ import annotations

import os

import numpy as np

from essa_mpi.config import BENCHMARKS, split_label
from essa_mpi.tasks.data import load_rows
from essa_mpi.tasks.math_answer import last_boxed_answer


def parse_entry(entry: str) -> tuple:
    """'LABEL=path' | known name | path → (label, source).

    >>> parse_entry("aime24"), parse_entry("MATH500=data/math500.jsonl")
    (('aime24', 'aime24'), ('MATH500', 'data/math500.jsonl'))
    """
    if "=" in entry or entry in BENCHMARKS:
        return split_label(entry)
    return os.path.splitext(os.path.basename(entry))[0], entry


def display_name(label: str) -> str:
    return BENCHMARKS[label][0] if label in BENCHMARKS else label


def gold(row: dict) -> str | None:
    """Gold answer of one benchmark row (see the module docstring for the order).

    >>> gold({"answer": "Natalia...\\n#### 72"}), gold({"final_answer": ["$\\\\frac{1}{2}$"]})
    ('72', '\\\\frac{1}{2}')
    >>> gold({"solution": "so \\\\boxed{5}."}), gold({"answer": 27.0})
    ('5', '27.0')
    """
    answer = row.get("answer")
    if answer is not None and str(answer).strip():
        answer = str(answer)
        return answer.split("####")[-1].strip().replace(",", "") if "####" in answer else answer
    final = row.get("final_answer")
    if final:
        first = final[0] if isinstance(final, list) else final
        return str(first).strip().strip("$").strip()
    return last_boxed_answer(row.get("solution") or "")


def load_benchmark(entry: str, data_dir: str | None = None, limit: int = 0) -> tuple:
    """→ (label, [{"prompt", "answer"}]) for a name, path or LABEL=path; rows without gold are dropped."""
    label, src = parse_entry(entry)
    local = os.path.join(data_dir, src, "test.jsonl") if data_dir and src in BENCHMARKS else None
    if local and os.path.isfile(local):
        rows = load_rows(local)
    elif src in BENCHMARKS:
        _, hub_id, config, split = BENCHMARKS[src]
        rows = load_rows(hub_id, split, config)
    else:
        rows = load_rows(src)
    out = [{"prompt": r.get("problem") or r.get("question"), "answer": g} for r in rows if (g := gold(r)) is not None]
    out = [r for r in out if r["prompt"]]
    if not out:
        raise ValueError(f"benchmark {entry!r}: no row has a 'problem'/'question' and a gold answer "
                         f"('answer', 'final_answer' or a \\boxed{{}} 'solution').")
    return label, out[:limit] if limit else out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    >>> pass_at_k(8, 0, 4), pass_at_k(8, 8, 1), round(pass_at_k(4, 1, 2), 4)
    (0.0, 1.0, 0.5)
    """
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))
