"""MATH answer extraction and normalisation, applied to the gold answer and the response alike before
math-verify compares them.

    final_answer(r"... so the total is $\\boxed{\\$32,\\!348}$.")   # '32348'

Follows the MATH reference grader (Hendrycks et al., ``is_equiv``/``strip_string`` as lm-evaluation-harness's
``hendrycks_math/utils.py`` implements it) and Minerva's ``normalize_final_answer`` for the parts that are
formatting, not mathematics: escaped dollar signs, ``\\!`` and ``{,}`` thousands separators, degree signs,
percent signs, ``\\left``/``\\right``, and ``\\text{ units}`` on the right. The answer of a solution or
response is its **last** ``\\boxed{}`` (or ``\\fbox{}``, ``\\boxed x``), as the reference's
``last_boxed_only_string`` takes it; solutions with several boxed answers are graded on the last one.
What is mathematics (fractions, roots, intervals, sets) is left to math-verify.
"""

from __future__ import annotations

import re

_REMOVE = ("\\!", "\\$", "\\left", "\\right", "^{\\circ}", "^\\circ", "\\%", "%", "\\,", "\\;", "\\:")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_TEXT = re.compile(r"\\(?:text|textbf|mbox|mathrm)\{([^{}]*)\}")


def last_boxed_answer(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, ``\\fbox{...}`` or ``\\boxed x`` (Hendrycks'
    ``last_boxed_only_string`` + ``remove_boxed``); None when there is none.

    >>> last_boxed_answer(r"first \\boxed{1}, then \\boxed{\\frac{2}{3}}.")
    '\\\\frac{2}{3}'
    >>> last_boxed_answer(r"is $\\boxed 9$."), last_boxed_answer(r"= \\boxed {17}."), last_boxed_answer("no") is None
    ('9', '17', True)
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].removeprefix("\\boxed").removeprefix("\\fbox").lstrip(" ")  # "\\boxed {17}" is braced too
    if not rest.startswith("{"):  # "\\boxed 9$": up to the closing $
        return rest.split("$")[0].strip() or None
    depth = 0
    for i, ch in enumerate(rest):
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return rest[1:i]
    return None


def normalize(answer: str) -> str:
    """Strip what the MATH reference strips as formatting; keep the mathematics.

    >>> normalize(r"\\$32,\\!348"), normalize(r"\\$18.90"), normalize(r"1{,}000"), normalize(r"45^\\circ")
    ('32348', '18.90', '1000', '45')
    >>> normalize(r"12\\text{ inches}"), normalize(r"\\text{(C)}"), normalize(r"\\left( 1, 2 \\right)")
    ('12', '(C)', '( 1, 2 )')
    >>> normalize("k = 5"), normalize("2x - y = 0")
    ('5', '2x - y = 0')
    """
    s = answer.replace("\n", " ")
    for token in _REMOVE:
        s = s.replace(token, "")
    s = s.replace("{,}", ",")
    # Units on the right (reference: remove_right_units splits at "\text{ "): "12\text{ inches}" -> "12".
    head = re.split(r"\\(?:text|mbox)\{\s", s, maxsplit=1)[0]
    if head.strip():
        s = head
    s = _TEXT.sub(r"\1", s).strip()  # \text{(C)} -> (C) (Minerva: keep the text's content)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")  # 32,348 -> 32348 (Minerva: "Normalize 100,000 -> 100000")
    lhs, eq, rhs = s.partition("=")
    if eq and "=" not in rhs and len(lhs.strip()) <= 2:  # reference: "k = 5" -> "5" (a short left side only)
        s = rhs
    return s.strip(" .")


def final_answer(text: str) -> str | None:
    """The normalised last boxed answer of a solution or response, or None when it boxes nothing.

    >>> final_answer(r"Cost: $\\boxed{\\$1,\\!657}$."), final_answer("just 7") is None
    ('1657', True)
    """
    boxed = last_boxed_answer(text)
    return None if boxed is None else normalize(boxed)
