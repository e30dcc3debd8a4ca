"""MATH grading: a reference solution scores 1 against its own gold answer; a neighbour's answer scores 0.

The cases are real rows of MATH-500 and MATH train (ends of their solutions), which the grader missed before
answers were normalised (currency, thousands separators) and the last boxed answer was taken.
"""

import json
import os

import pytest

from essa_mpi.tasks.math import gold, math_reward
from essa_mpi.tasks.math_answer import final_answer, last_boxed_answer, normalize

# (gold answer, end of the reference solution)
MATH500_CURRENCY = [
    (r"\$32,\!348", r"$\$24,\!000 \cdot 1.01^{30} \approx \boxed{\$32,\!348}$, to the nearest dollar."),
    (r"\$18.90", r"a total of $54(\$0.15)+27(\$0.40)=\boxed{\$18.90}$."),
    (r"\$36", "Thus the original price was\n\n$$\\frac{\\$14.40}{.4}=\\boxed{\\$36}$$"),
]
TRAIN_MISSES = [  # currency, a spaced currency sign, and a solution with two boxed answers (the last is gold)
    (r"\$ 1500", r"the price of the bike must have been $10 \times \$150=\boxed{\$ 1500}$."),
    (r"\$3.54", r"we see that three enchiladas and four tacos total $2.70 + .84 = \boxed{\$3.54}$."),
    (r"\$306,\!956.63", r"This present value is \[\frac{\$500,\!000}{(1+0.05)^{10}} \approx \boxed{\$306,\!956.63}.\]"),
    (r"\$4813.24", r"in $18$ years is $2000(1+.05)^{18}=\boxed{\$4813.24}$."),
    ("(8,38)", r"we find the points of intersection to be $\boxed{(-2,18)}$ and $\boxed{(8,38)}$."),
    ("1", "the answer is $\\boxed{1}$.\n\nAlternatively, ... so $c = \\boxed{1}$."),
]


@pytest.mark.parametrize("answer,solution", MATH500_CURRENCY + TRAIN_MISSES)
def test_reference_solution_scores_one(answer, solution):
    assert gold({"solution": solution}) == answer  # the last boxed answer, as the reference takes it
    assert math_reward([solution], answer=[answer]) == [1.0]
    assert math_reward([solution], answer=[gold({"solution": solution})]) == [1.0]  # gold taken from the solution


@pytest.mark.parametrize("response,answer", [
    (r"\boxed{\$32,348}", "32348"), (r"\boxed{32348}", r"\$32,\!348"), (r"\boxed{1{,}000}", "1000"),
    (r"\boxed{12\text{ inches}}", "12"), (r"\boxed{45^\circ}", "45"), (r"\boxed{25\%}", "25"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}"), (r"\boxed{\left( 1, 2 \right)}", "(1,2)"),
    (r"\boxed{k = 5}", "5"), (r"\boxed{2x + 3}", "y = 2x + 3"),  # a short left side is a name, as in the reference
])
def test_formatting_is_not_mathematics(response, answer):
    assert math_reward([response], answer=[answer]) == [1.0]


@pytest.mark.parametrize("response,answer", [
    (r"\boxed{\$32,349}", r"\$32,\!348"), (r"\boxed{(-2,18)}", "(8,38)"), (r"\boxed{36}", r"\$3.6"),
    (r"\boxed{1,2}", "12"),  # a pair, not a thousands separator
    (r"\boxed{2x - y + 2z - 18 = 0}", "0"),  # MATH train row 7268 against row 7269's gold: an equation is not 0
])
def test_different_answers_still_score_zero(response, answer):
    assert math_reward([response], answer=[answer]) == [0.0]


def test_last_boxed_and_normalise():
    assert last_boxed_answer(r"\boxed{a} then \fbox{b}") == "b"
    assert last_boxed_answer(r"\boxed{unclosed") is None
    assert normalize(r"1,234,567.5") == "1234567.5" and normalize("1,23") == "1,23"
    assert final_answer(r"no box here") is None


def test_neighbour_answers_score_zero():
    """Row i's solution against row i+1's gold (MATH-500 style rows): a grader that equates anything fails."""
    rows = [(a, s) for a, s in MATH500_CURRENCY + TRAIN_MISSES[:4]]
    answers, solutions = [a for a, _ in rows], [s for _, s in rows]
    assert math_reward(solutions[:-1], answer=answers[1:]) == [0.0] * (len(rows) - 1)
    assert math_reward(solutions, answer=answers) == [1.0] * len(rows)


MATH500 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "math", "math500_test.jsonl")


@pytest.mark.skipif(not os.path.isfile(MATH500), reason="../shared/data/math/math500_test.jsonl is not here")
def test_math500_slice_gold_and_neighbours():
    with open(MATH500) as fh:
        rows = [json.loads(line) for line in fh][:60]
    solutions, answers = [r["solution"] for r in rows], [r["answer"] for r in rows]
    assert math_reward(solutions, answer=answers) == [1.0] * 60
    assert sum(math_reward(solutions[:-1], answer=answers[1:])) <= 1  # ~0: only true duplicates
