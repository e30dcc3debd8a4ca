"""math: competition mathematics (PRM800K-style training problems, MATH-500 validation).

Data: training problems from the Hugging Face dataset ``DigitalLearningGmbH/MATH-lighteval`` (the MATH
train split, ``problem`` + ``solution``) or a local JSONL with ``problem`` and ``solution``; validation on
MATH-500 (``HuggingFaceH4/MATH-500``, the PRM800K test split: ``problem``, ``answer``) or a local JSONL
(``task.val_dataset``). The gold answer is the ``answer`` column, else the last ``\\boxed{}`` of the
solution. The first ``task.sft_size`` training rows are the SFT split (gold solutions as completions).
Reward 1 when math-verify finds the response's final answer equal to the gold one (gold parsed first;
``verify.math_equal``: ``0.5``, ``\\frac12`` and ``1/2`` are all equal), else 0. Both answers are first
normalised as the MATH reference grader normalises them (``math_answer``: the last boxed answer, ``\\$``,
``\\!`` and ``{,}`` separators, units); every MATH-500 and MATH train solution then scores 1 against its
own gold (``tools/checks/check_math_grading.py``).
"""

from __future__ import annotations

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.data import load_rows, require_columns
from essa_mpi.tasks.gsm8k import SYSTEM_PROMPT  # the paper's math system prompt (appendix H)
from essa_mpi.tasks.math_answer import last_boxed_answer
from essa_mpi.tasks.verify import math_equal

DEFAULT_TRAIN = "DigitalLearningGmbH/MATH-lighteval"
DEFAULT_VAL = "HuggingFaceH4/MATH-500"


def math_reward(completions: list, answer: list, **_) -> list:
    """1.0 when the response's final answer is mathematically equal to the gold answer.

    >>> math_reward([r"\\boxed{\\frac{1}{2}}", "1/2", r"\\boxed{2}", ""], answer=["0.5"] * 4)
    [1.0, 1.0, 0.0, 0.0]
    """
    return [float(math_equal(c, a)) for c, a in zip(completions, answer)]


def gold(row: dict) -> str | None:
    """The ``answer`` column if present, else the last ``\\boxed{}`` (or ``\\boxed 9``) of ``solution``.

    >>> gold({"solution": r"so $x = \\boxed{\\frac{1}{2}}$."}), gold({"solution": r"is $\\boxed 9$."})
    ('\\\\frac{1}{2}', '9')
    """
    if row.get("answer"):
        return str(row["answer"])
    return last_boxed_answer(row.get("solution") or "")


def with_gold(rows: list, where: str) -> list:
    """Rows → {"prompt", "answer"}, skipping rows with no recoverable gold answer (an error if all are)."""
    out = [{"prompt": r["problem"], "answer": g} for r in rows if (g := gold(r))]
    if rows and not out:
        raise ValueError(f"{where}: no row has an 'answer' column or a \\boxed{{}} solution; give MATH-style rows.")
    return out


def build(cfg: TaskConfig, seed: int) -> Task:
    train_rows = load_rows(cfg.dataset or DEFAULT_TRAIN, "train")
    val_rows = load_rows(cfg.val_dataset or DEFAULT_VAL, "test")
    require_columns(train_rows, ["problem", "solution"], "math training data")
    require_columns(val_rows, ["problem"], "math validation data")
    n_sft = min(cfg.sft_size, len(train_rows) // 2)
    sft = [{"prompt": r["problem"], "completion": r["solution"]} for r in train_rows[:n_sft]]
    train = with_gold(train_rows[n_sft:], "math training data")
    val = with_gold(val_rows[: cfg.val_size], "math validation data")
    return Task(train=train, val=val, system_prompt=SYSTEM_PROMPT, reward=math_reward, sft=sft)
