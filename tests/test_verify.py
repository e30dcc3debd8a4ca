"""math-verify answer checking: equivalent forms, malformed answers, timeouts on and off the main thread."""

import threading
import time

import pytest

from essa_mpi.tasks import verify
from essa_mpi.tasks.math import math_reward


@pytest.mark.parametrize("response, gold", [
    (r"so \boxed{0.5}", r"\frac12"), (r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{1/2}", r"\frac{1}{2}"),
    ("The answer is 1/2", "0.5"), (r"\boxed{\dfrac{1}{2}}", "1/2"),
    (r"\boxed{\frac{\sqrt3}{2}}", r"\frac{\sqrt{3}}{2}"),
    (r"\boxed{(1, 2)}", "(1,2)"), (r"\boxed{72}", "72.0"), (r"$x = \boxed{-3}$", "-3"),
])
def test_equivalent_answers_are_equal(response, gold):
    assert verify.math_equal(response, gold)


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{0.51}", "0.5"), ("no answer at all", "3"), ("", "3"), (r"\boxed{\frac{1}{", "0.5"),
    (r"\boxed{}", "1"), (r"\boxed{2}", r"\frac12"), ("}}}{{{\\\\", "7"),
])
def test_wrong_malformed_or_missing_answers_are_not_equal(response, gold):
    assert not verify.math_equal(response, gold)


def test_math_reward_values():
    assert math_reward([r"\boxed{\frac12}", "1/2", "none"], answer=["0.5"] * 3) == [1.0, 1.0, 0.0]


def test_works_off_the_main_thread():
    out = []
    t = threading.Thread(target=lambda: out.append(math_reward([r"\boxed{1/2}", r"\boxed{3}"], answer=["0.5"] * 2)))
    t.start()
    t.join(timeout=120)
    assert out == [[1.0, 0.0]]


@pytest.mark.parametrize("on_main_thread", [True, False])
def test_timeout_stops_a_slow_check(on_main_thread):
    result = []

    def call():
        t0 = time.time()
        try:
            verify.run_with_timeout(time.sleep, (30,), seconds=0.5)
            result.append("finished")
        except TimeoutError:
            result.append(time.time() - t0)

    if on_main_thread:
        call()
    else:
        t = threading.Thread(target=call)
        t.start()
        t.join(timeout=60)
    assert result and result[0] != "finished" and result[0] < 20
