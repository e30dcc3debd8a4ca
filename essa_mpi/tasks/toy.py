"""toy: a smoke-test task any model can move, even a tiny random one.

Reward = fraction of the completion's characters that are ASCII letters or digits, so it depends on the
candidate through the generated text. Used by the tests (a random model cannot do arithmetic) and handy
to check a cluster setup end to end in seconds.
"""

from __future__ import annotations

import numpy as np

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task

WORDS = ["apple", "seven", "river", "blue", "count", "stone", "nine", "cloud", "fast", "green"]


def alnum_fraction_reward(completions: list, **_) -> list:
    """Share of ASCII letters and digits in each completion (0.0 for an empty one).

    >>> alnum_fraction_reward(["a1-?", "", "ok"])
    [0.5, 0.0, 1.0]
    """
    return [sum(ch.isascii() and ch.isalnum() for ch in c) / len(c) if c else 0.0 for c in completions]


def build(cfg: TaskConfig, seed: int) -> Task:
    rng = np.random.default_rng([seed, 13])

    def prompts(n: int) -> list:
        return [{"prompt": "Write words: " + " ".join(rng.choice(WORDS, 3)), "answer": ""} for _ in range(n)]

    sft = [{"prompt": r["prompt"], "completion": r["prompt"].removeprefix("Write words: ")} for r in prompts(64)]
    return Task(train=prompts(512), val=prompts(cfg.val_size), system_prompt=None, reward=alnum_fraction_reward,
                sft=sft)
