"""GSM8K: grade-school math word problems (Cobbe et al., 2021).

Data: the Hugging Face dataset ``openai/gsm8k`` (config ``main``; train for search, test for validation),
or a local path: a directory with ``train.jsonl`` and ``test.jsonl``, or one JSONL file whose last
``val_size`` rows are held out. Rows have ``question`` and ``answer`` (gold after ``####``).
Reward 1 on an exact numeric match of the final answer (``answers.final_number``: last ``\\boxed{}``, else
last number), following the reference grader's normalisation (``answers`` module docstring).
"""

from __future__ import annotations

import json
import os

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.answers import final_number, numbers_equal

DEFAULT_DATASET = "openai/gsm8k"
SYSTEM_PROMPT = "Please reason step by step and place your final answer in \\boxed{}."  # paper, appendix H


def gold_answer(solution: str) -> str:
    """Text after ``####`` without thousands separators.

    >>> gold_answer("She pays 2*3=6 dollars.\\n#### 1,006")
    '1006'
    """
    if "####" not in solution:
        raise ValueError(f"GSM8K answer without '####' gold marker: {solution[:80]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def gsm8k_reward(completions: list, answer: list, **_) -> list:
    """1.0 when the final number of the completion equals the gold answer.

    >>> gsm8k_reward(["... so \\\\boxed{18}", "18.0", "about 17"], answer=["18", "18", "18"])
    [1.0, 1.0, 0.0]
    """
    return [float(numbers_equal(final_number(c), a)) for c, a in zip(completions, answer)]


def _read_jsonl(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _rows(cfg: TaskConfig) -> tuple:
    src = cfg.dataset or DEFAULT_DATASET
    if os.path.isdir(src):
        return _read_jsonl(os.path.join(src, "train.jsonl")), _read_jsonl(os.path.join(src, "test.jsonl"))
    if os.path.isfile(src):
        rows = _read_jsonl(src)
        if len(rows) <= cfg.val_size:
            raise ValueError(f"{src} has {len(rows)} rows, not more than task.val_size={cfg.val_size}; lower it.")
        return rows[: len(rows) - cfg.val_size], rows[len(rows) - cfg.val_size:]
    from datasets import load_dataset  # hub access only when a hub id is given

    ds = load_dataset(src, "main")
    return list(ds["train"]), list(ds["test"])


def build(cfg: TaskConfig, seed: int) -> Task:
    train_rows, val_rows = _rows(cfg)
    for row in train_rows[:1] + val_rows[:1]:
        missing = {"question", "answer"} - set(row)
        if missing:
            raise ValueError(f"gsm8k rows need columns question and answer; {cfg.dataset} lacks {sorted(missing)}.")

    def convert(rows: list) -> list:
        return [{"prompt": r["question"], "answer": gold_answer(r["answer"])} for r in rows]

    return Task(train=convert(train_rows), val=convert(val_rows)[: cfg.val_size], system_prompt=SYSTEM_PROMPT,
                reward=gsm8k_reward)
