"""Answer extraction and numeric comparison shared by the math tasks.

Normalisation follows the GSM8K reference grader (openai/grade-school-math): the gold answer is the text
after ``####`` with thousands separators removed; a response's answer is its last ``\\boxed{}`` if any
(``math_answer.last_boxed_answer``), else its last number, compared numerically.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from essa_mpi.tasks.math_answer import last_boxed_answer  # the one last-\boxed{} extractor

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_INTEGER = re.compile(r"-?\d+")


def last_integer(text: str) -> str | None:
    """Last integer in text (a leading minus kept).

    >>> last_integer("47 + 38 = 85.")
    '85'
    >>> last_integer("no digits") is None
    True
    """
    found = _INTEGER.findall(text)
    return found[-1] if found else None


def final_number(text: str) -> str | None:
    """The response's final answer: last ``\\boxed{}`` content, else the last number.

    >>> final_number("It costs $1,200 in total.")
    '1,200'
    """
    boxed = last_boxed_answer(text)
    if boxed is not None:
        found = _NUMBER.findall(boxed)
        return found[-1] if found else boxed.strip()
    found = _NUMBER.findall(text)
    return found[-1] if found else None


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Exact numeric equality after removing thousands separators and trailing zeros.

    >>> numbers_equal("18.00", "18"), numbers_equal("1,000", "1000"), numbers_equal(None, "3")
    (True, True, False)
    """
    if pred is None:
        return False
    try:
        return Decimal(pred.replace(",", "").strip()) == Decimal(gold.replace(",", "").strip())
    except InvalidOperation:
        return False
