"""Task registry: a task owns its data, prompt template, reward and validation metric.

    task = build_task(TaskConfig(name="arithmetic"), seed=0)
    idx = batch_indices(len(task.train), batch_size=32, seed=0, generation=g)   # [32]
    rewards = task.reward([completion, ...], answer=[gold, ...])               # list[float] in [0, 1]

Reward functions follow TRL's signature ``f(completions: list[str], **columns) -> list[float]``;
higher is better (ESSA maximises reward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from essa_mpi.config import TaskConfig


@dataclass
class Task:
    """Prompts with gold answers; ``val`` is held out from ``train``."""

    train: list  # [{"prompt": str, "answer": str}]
    val: list
    system_prompt: Optional[str]
    reward: Callable[..., list]

    def messages(self, prompt: str) -> list:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + [{"role": "user", "content": prompt}]


def batch_indices(n: int, batch_size: int, seed: int, generation: int) -> np.ndarray:
    """Generation g's mini-batch: positions [g*B, (g+1)*B) of a stream of seeded per-epoch permutations.

    The data cursor is g*B, so any rank (and a resumed run) recomputes the same batch.
    >>> batch_indices(10, 4, 0, 0).tolist() == batch_indices(10, 4, 0, 0).tolist()
    True
    """
    start = generation * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, i = divmod(pos, n)
        perm = np.random.default_rng([seed, 7, epoch]).permutation(n)  # [n]
        out.append(perm[i])
    return np.array(out, dtype=np.int64)  # [batch_size]


def build_task(cfg: TaskConfig, seed: int) -> Task:
    from essa_mpi.tasks import arithmetic, gsm8k, toy

    registry = {"arithmetic": arithmetic.build, "gsm8k": gsm8k.build, "toy": toy.build}
    task = registry[cfg.name](cfg, seed)
    if cfg.system_prompt is not None:
        task.system_prompt = cfg.system_prompt or None
    if len(task.train) < cfg.batch_size:
        raise ValueError(f"task {cfg.name} has {len(task.train)} training prompts, fewer than task.batch_size="
                         f"{cfg.batch_size}; lower task.batch_size or give a larger dataset.")
    return task
