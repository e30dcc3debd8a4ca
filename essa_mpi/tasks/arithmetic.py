"""Built-in arithmetic task: two-digit +, -, and x by one digit, procedurally generated and seeded.

The embedded default. The prompt asks for just the number; reward 1 when the last integer of the
response equals the answer (``answers.last_integer``), else 0. The SFT gold restates the problem before
the answer ("56 + 28 = 84"), the format this model computes in: SmolLM2-135M trained on 1,500 bare-number
golds validates at 0.255 (1/65 products right), on the same 1,500 problems restated at 0.390 (20/65;
tools/results/scale_sweep_*.md, issue 12).
"""

from __future__ import annotations

import numpy as np

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.answers import last_integer

TRAIN_POOL = 5000
SYSTEM_PROMPT = "You are a calculator."


def problem(rng: np.random.Generator) -> tuple:
    """One (expression, answer) pair: a+b, a-b with a, b two-digit, or a*d with d one-digit."""
    op = int(rng.integers(3))
    a = int(rng.integers(10, 100))
    b = int(rng.integers(10, 100)) if op < 2 else int(rng.integers(2, 10))
    sym, ans = [("+", a + b), ("-", a - b), ("*", a * b)][op]
    return f"{a} {sym} {b}", str(ans)


def question(expression: str) -> str:
    """The prompt for "a op b"."""
    return f"What is {expression}? Answer with just the number."


def arithmetic_reward(completions: list, answer: list, **_) -> list:
    """1.0 when the last integer of the completion equals the answer, else 0.0.

    >>> arithmetic_reward(["85", "57 + 28 = 85", "The answer is 84.", "none"], answer=["85"] * 4)
    [1.0, 1.0, 0.0, 0.0]
    """
    return [float(last_integer(c) == a) for c, a in zip(completions, answer)]


def build(cfg: TaskConfig, seed: int) -> Task:
    """Validation, ESSA training and SFT problems from one seeded stream; no question appears twice."""
    rng = np.random.default_rng([seed, 11])
    seen: set = set()

    def draw(n: int) -> list:
        pairs = []
        while len(pairs) < n:
            expr, ans = problem(rng)
            if expr not in seen:
                seen.add(expr)
                pairs.append((expr, ans))
        return pairs

    val, train, sft = draw(cfg.val_size), draw(TRAIN_POOL), draw(cfg.sft_size)
    val, train = ([{"prompt": question(e), "answer": a} for e, a in rows] for rows in (val, train))
    sft = [{"prompt": question(e), "completion": f"{e} = {a}"} for e, a in sft]  # gold "56 + 28 = 84"
    return Task(train=train, val=val, system_prompt=SYSTEM_PROMPT, reward=arithmetic_reward, sft=sft)
