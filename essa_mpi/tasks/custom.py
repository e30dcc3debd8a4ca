"""custom: your prompts, your reward function.

    task.name=custom task.dataset=prompts.jsonl task.reward_fn=my_rewards:brevity

``task.dataset``: a JSONL file (or hub id) with a ``prompt`` column and any other columns; the last
``task.val_size`` rows are held out unless ``task.val_dataset`` is given. An optional ``completion``
column feeds the SFT warm start (its first ``task.sft_size`` rows, kept out of the search rows).
``task.reward_fn``: ``f(completions, **columns) -> list[float]`` (TRL's convention), one float per
completion, higher is better; every column of the rows (``prompt`` included) is passed by name.
A reward that raises or returns the wrong number of values stops the run with its name; NaN or inf
counts as the generation's worst fitness and is logged.
"""

from __future__ import annotations

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.data import held_out, load_rows, require_columns


def _unset_reward(completions: list, **_) -> list:
    raise RuntimeError("task.name=custom needs task.reward_fn")


def build(cfg: TaskConfig, seed: int) -> Task:
    rows = load_rows(cfg.dataset, "train")
    require_columns(rows, ["prompt"], f"task.dataset={cfg.dataset}")
    train, val = held_out(rows, cfg, ["prompt"], cfg.dataset)
    sft = [{"prompt": r["prompt"], "completion": r["completion"]} for r in train[: cfg.sft_size] if r.get("completion")]
    drop = lambda r: {k: v for k, v in r.items() if k != "completion"}  # noqa: E731
    return Task(train=[drop(r) for r in train[len(sft):]], val=[drop(r) for r in val], system_prompt=None,
                reward=_unset_reward, sft=sft)
