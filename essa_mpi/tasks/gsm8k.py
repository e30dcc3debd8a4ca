"""GSM8K: grade-school math word problems (Cobbe et al., 2021).

Data: the Hugging Face dataset ``openai/gsm8k`` (config ``main``; train for SFT + search, test for
validation), or a local path: a directory with ``train.jsonl`` and ``test.jsonl``, or one JSONL file whose
last ``val_size`` rows are held out (``task.val_dataset`` overrides). Rows have ``question`` and ``answer``
(the worked solution, gold after ``####``). The first ``task.sft_size`` training rows are the SFT split
(paper, Table 5: 1,495 SFT / 5,978 search), their solutions rewritten to end in ``\\boxed{}``.
Reward 1 on an exact numeric match of the final answer (``answers.final_number``: last ``\\boxed{}``,
else last number), following the reference grader's normalisation (``answers`` module docstring).
"""

from __future__ import annotations

import os
import re

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.answers import final_number, numbers_equal
from essa_mpi.tasks.data import load_rows, require_columns, split_tail

DEFAULT_DATASET = "openai/gsm8k"
SYSTEM_PROMPT = "Please reason step by step and place your final answer in \\boxed{}."  # paper, appendix H
_CALC = re.compile(r"<<[^>]*>>")


def gold_answer(solution: str) -> str:
    """Text after ``####`` without thousands separators.

    >>> gold_answer("She pays 2*3=6 dollars.\\n#### 1,006")
    '1006'
    """
    if "####" not in solution:
        raise ValueError(f"GSM8K answer without '####' gold marker: {solution[:80]!r}")
    return solution.split("####")[-1].strip().replace(",", "")


def sft_completion(solution: str) -> str:
    """The worked solution without calculator annotations, ending in the boxed answer.

    >>> sft_completion("2*3=<<2*3=6>>6 dollars.\\n#### 6")
    '2*3=6 dollars.\\nThe final answer is \\\\boxed{6}.'
    """
    steps = _CALC.sub("", solution.split("####")[0]).strip()
    return f"{steps}\nThe final answer is \\boxed{{{gold_answer(solution)}}}."


def gsm8k_reward(completions: list, answer: list, **_) -> list:
    """1.0 when the final number of the completion equals the gold answer.

    >>> gsm8k_reward(["... so \\\\boxed{18}", "18.0", "about 17"], answer=["18", "18", "18"])
    [1.0, 1.0, 0.0]
    """
    return [float(numbers_equal(final_number(c), a)) for c, a in zip(completions, answer)]


def _splits(cfg: TaskConfig) -> tuple:
    src = cfg.dataset or DEFAULT_DATASET
    if cfg.val_dataset:
        return load_rows(src, "train", "main"), load_rows(cfg.val_dataset, "test", "main")
    if os.path.isfile(src):
        return split_tail(load_rows(src), cfg.val_size, f"task.dataset={src}")
    return load_rows(src, "train", "main"), load_rows(src, "test", "main")


def build(cfg: TaskConfig, seed: int) -> Task:
    train_rows, val_rows = _splits(cfg)
    require_columns(train_rows, ["question", "answer"], "gsm8k training data")
    require_columns(val_rows or train_rows, ["question", "answer"], "gsm8k validation data")

    def convert(rows: list) -> list:
        return [{"prompt": r["question"], "answer": gold_answer(r["answer"])} for r in rows]

    n_sft = min(cfg.sft_size, len(train_rows) // 2)
    sft = [{"prompt": r["question"], "completion": sft_completion(r["answer"])} for r in train_rows[:n_sft]]
    return Task(train=convert(train_rows[n_sft:]), val=convert(val_rows)[: cfg.val_size],
                system_prompt=SYSTEM_PROMPT, reward=gsm8k_reward, sft=sft)
