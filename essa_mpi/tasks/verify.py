"""Symbolic answer checking with math-verify, under a timeout that also works off the main thread.

    math_equal(r"... so the answer is \\boxed{\\frac12}", "0.5")   # True  (gold second, parsed first)

math-verify's own timeouts use ``signal.alarm``, which only works on the main thread of the main
interpreter (its ``parse``/``verify`` raise elsewhere). We switch them off and time each check ourselves:
on the main thread with ``signal.setitimer``; on any other thread in a one-process worker pool that is
terminated and replaced when a check runs over time. A check that times out or fails counts as wrong.
"""

from __future__ import annotations

import logging
import multiprocessing
import re
import signal
import threading
from collections.abc import Callable

from essa_mpi.tasks.math_answer import final_answer, normalize

TIMEOUT_S = 5.0
_MATH_MODE = re.compile(r"(?<!\\)\$")  # an unescaped $: the gold is LaTeX text, not a bare answer
_pool = None


def _answers(response: str, gold: str) -> tuple:
    """(response answer, gold answer, each a normalised last boxed answer?) as math-verify should read them:
    without a boxed answer, the response as it is (math-verify's own extraction) and a bare gold normalised."""
    pred, g = final_answer(response), final_answer(gold)
    if g is None and not _MATH_MODE.search(gold):
        g = normalize(gold)
    return (response if pred is None else pred), (gold if g is None else g), pred is not None, g is not None


def _parse_and_verify(response: str, gold: str) -> bool:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout disabled": we time the whole check
    pred, g, pred_bare, gold_bare = _answers(response, gold)
    if pred_bare and gold_bare and ("=" in pred) != ("=" in g):
        return False  # an equation is not its right-hand side ("2x - y = 0" is not "0"), as in the reference
    gold_parsed = parse(f"${g}$" if gold_bare else g, parsing_timeout=None)
    pred_parsed = parse(f"${pred}$" if pred_bare else pred, parsing_timeout=None)
    return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _on_main_thread(fn: Callable, args: tuple, seconds: float):
    def expire(*_):
        raise TimeoutError(f"check took more than {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _in_worker(fn: Callable, args: tuple, seconds: float):
    global _pool
    if _pool is None:  # spawn: never fork an MPI rank
        _pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return _pool.apply_async(fn, args).get(timeout=seconds)
    except multiprocessing.TimeoutError:
        _pool.terminate()  # the stuck check dies with its worker; the next call starts a fresh one
        _pool = None
        raise TimeoutError(f"check took more than {seconds} s") from None


def run_with_timeout(fn: Callable, args: tuple, seconds: float = TIMEOUT_S):
    """fn(*args), or TimeoutError after ``seconds`` — on the main thread or any other."""
    if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
        return _on_main_thread(fn, args, seconds)
    return _in_worker(fn, args, seconds)


def math_equal(response: str, gold: str, timeout_s: float = TIMEOUT_S) -> bool:
    """True when the response's final answer equals gold (math-verify: gold first, then the response).
    Both are normalised first (``math_answer``: the last boxed answer, currency, thousands separators, units).

    >>> math_equal(r"so \\boxed{\\frac{1}{2}}", "0.5"), math_equal("it is 1/2", r"\\frac12")
    (True, True)
    >>> math_equal(r"\\boxed{4}", "3"), math_equal("no idea", "3")
    (False, False)
    >>> math_equal(r"It costs $\\boxed{\\$32,\\!348}$.", r"\\$32,\\!348")
    True
    """
    try:
        return bool(run_with_timeout(_parse_and_verify, (response, gold), timeout_s))
    except Exception:  # timeout or a parser failure on malformed LaTeX: not a correct answer
        return False
