"""Task registry: a task owns its data, prompt template, reward and validation metric.

    task = build_task(TaskConfig(name="arithmetic"), seed=0)
    idx = batch_indices(len(task.train), batch_size=32, seed=0, generation=g)   # [32]
    scores = score_rows(task, completions, rows)                               # [len(rows)] float64

Rows are dicts with a ``prompt`` and any other columns (``answer``, ``instruction_id_list`` ...).
Reward functions follow TRL's signature ``f(completions: list[str], **columns) -> list[float]``: every
column of the rows is passed as a list aligned with ``completions``. Sign convention, stated once for
the whole package: **higher reward is better; ESSA maximises it** (``search.py`` hands pycma the negated
reward, since pycma minimises).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import signal
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from essa_mpi import watchdog
from essa_mpi.config import TaskConfig


@dataclass
class Task:
    """Prompts with gold columns; ``val`` is held out from ``train``, ``sft`` is disjoint from both."""

    train: list  # [{"prompt": str, **columns}]
    val: list
    system_prompt: str | None
    reward: Callable[..., list]
    sft: list = field(default_factory=list)  # [{"prompt": str, "completion": str}]
    # Extra validation metrics: f(completions, rows) -> {name: (sum, count)}; summed over ranks.
    details: Callable[[list, list], dict] | None = None
    notes: list = field(default_factory=list)  # warnings for rank 0 to print before the run
    prompt_tokens: int = 0  # the longest prompt with its chat template (population.fit_prompts), for memory.plan

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


def columns(rows: list) -> dict:
    """Rows → {column: [value per row]} (the keys of the first row).

    >>> columns([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}])
    {'prompt': ['a', 'b'], 'answer': ['1', '2']}
    """
    return {key: [r.get(key) for r in rows] for key in rows[0]} if rows else {}


def score_rows(task: Task, completions: list, rows: list) -> np.ndarray:
    """The task reward of each (completion, row) pair → [N] float64; NaN stays NaN for the caller to log.

    A reward that raises, exits the process (``sys.exit``) or returns anything but one number per completion is
    a bug in the reward: RuntimeError naming it (and the first bad row).
    """
    name = getattr(task.reward, "__qualname__", type(task.reward).__name__)
    try:
        with guarded(name):
            values = task.reward(completions, **columns(rows))
    except SystemExit as exc:  # a reward may not end the rank: the others would wait for its records
        raise RuntimeError(f"reward function {name} called sys.exit({exc.code!r}); a reward must return one float "
                           f"per completion (raise an exception for an error).") from None
    except _Exited as exc:
        raise RuntimeError(str(exc)) from None
    except (Exception, KeyboardInterrupt) as exc:  # Ctrl-C itself is handled by watchdog, never raised here
        raise RuntimeError(f"reward function {name} raised {type(exc).__name__}: {exc}") from exc
    return as_rewards(values, len(completions), name)


class _Exited(Exception):
    """os._exit called by a reward (``guarded``)."""


@contextlib.contextmanager
def guarded(name: str):
    """Around a reward call: ``os._exit`` from the reward raises instead (a rank that vanished with exit code 0
    left the job to end 'successfully' with no line and no checkpoint), and a working directory or SIGINT/
    SIGTERM handler the reward changed is put back, with a warning (relative run paths and Ctrl-C must keep
    working). Running user rewards in a process of their own would also contain forks and daemons, but the
    reward models need the rank's own GPU and weights; this keeps them in the rank."""
    real_exit, cwd, pid = os._exit, os.getcwd(), os.getpid()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    main = threading.current_thread()

    def refuse(code: int = 0):
        if threading.current_thread() is not main or os.getpid() != pid:  # the watchdogs' own exits pass, and so
            real_exit(code)  # does every exit of a process the reward forked (a multiprocessing worker's)
        raise _Exited(f"reward function {name} called os._exit({code}); a reward must return one float per "
                      f"completion (raise an exception for an error)")

    os._exit = refuse
    try:
        yield
    finally:
        os._exit = real_exit
        changed = [s.name for s, h in handlers.items() if signal.getsignal(s) is not h]
        for s, h in handlers.items():
            signal.signal(s, h)
        if os.getcwd() != cwd:
            changed.append(f"the working directory (to {os.getcwd()})")
            os.chdir(cwd)
        if changed:
            warnings.warn(f"reward function {name} changed {', '.join(changed)}; put back", stacklevel=3)


def as_rewards(values, n: int, name: str) -> np.ndarray:
    """A reward function's return value → [n] float64, or RuntimeError saying what is wrong with it.

    >>> as_rewards([1, 0.5, True], 3, "f")
    array([1. , 0.5, 1. ])
    >>> as_rewards(["0.5"], 1, "f")
    Traceback (most recent call last):
    RuntimeError: reward function f returned str '0.5' for completion 0; it must return one float per completion.
    """
    if isinstance(values, np.ndarray) and values.ndim != 1:
        raise RuntimeError(f"reward function {name} returned an array of shape {values.shape}; it must return one "
                           f"float per completion ({n}), a list or 1-d array.")
    if not isinstance(values, (list, tuple, np.ndarray)):
        raise RuntimeError(f"reward function {name} returned {type(values).__name__} {_short(values)}; it must return "
                           f"a list with one float per completion ({n}).")
    if len(values) != n:
        raise RuntimeError(f"reward function {name} returned {len(values)} values for {n} completions; it must return "
                           f"one float per completion.")
    for i, v in enumerate(values):
        if not isinstance(v, (int, float, np.integer, np.floating, np.bool_)):
            raise RuntimeError(f"reward function {name} returned {type(v).__name__} {_short(v)} for completion {i}; "
                               f"it must return one float per completion.")
        try:
            big = np.isfinite(float(v)) and abs(float(v)) > np.finfo(np.float32).max  # records carry float32: inf
        except OverflowError:  # an int past float64
            big = True
        if big:
            raise RuntimeError(f"reward function {name} returned {_short(v)} for completion {i}, beyond the float32 "
                               f"range (±3.4e38) the reward records carry; scale the reward down.")
    return np.asarray(values, dtype=np.float64).reshape(-1)  # [n]


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def with_timeout(reward: Callable, seconds: float) -> Callable:
    """reward, stopped (with the whole job: ``watchdog.deadline``) when one call takes over ``seconds``;
    0 = no limit. A hung reward would otherwise leave every other rank waiting in the exchange forever."""
    if not seconds:
        return reward
    name = getattr(reward, "__qualname__", type(reward).__name__)

    @functools.wraps(reward)
    def timed(completions: list, **columns) -> list:
        message = lambda: (f"reward function {name} did not return within task.reward_timeout_s={seconds:g} s "  # noqa: E731
                           f"({len(completions)} completions); fix it, or raise task.reward_timeout_s.")
        with watchdog.deadline(seconds, message):
            return reward(completions, **columns)

    return timed


def load_callable(path: str) -> Callable:
    """'package.module:function' or 'package.module.function' → the callable."""
    module, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"task.reward_fn={path!r} cannot be imported ({exc}); make sure {module!r} is on "
                         f"PYTHONPATH on every rank and defines {attr!r}.") from None
    except BaseException as exc:  # the module itself is broken: SyntaxError, an exception at import time
        where = f" ({exc.filename}, line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ValueError(f"task.reward_fn={path!r}: importing {module!r} raised {type(exc).__name__}: "
                         f"{getattr(exc, 'msg', None) or exc}{where}; fix that module.") from None
    if not callable(fn):
        raise ValueError(f"task.reward_fn={path!r} is not callable; point it at a function "
                         f"f(completions, **columns) -> list[float].")
    return fn


def build_task(cfg: TaskConfig, seed: int) -> Task:
    """The task's data, prompts and reward; seed (search.seed) draws the data unless task.seed is set."""
    from essa_mpi.tasks.data import sft_rows

    seed = seed if cfg.seed is None else cfg.seed

    # The registry is config.TASKS (what TaskConfig.name accepts): task NAME is the module essa_mpi.tasks.NAME,
    # whose build(cfg, seed) -> Task owns its data, prompts and reward.
    task = importlib.import_module(f"essa_mpi.tasks.{cfg.name}").build(cfg, seed)
    if cfg.reward_fn:
        task.reward = load_callable(cfg.reward_fn)
    task.reward = with_timeout(task.reward, cfg.reward_timeout_s)
    if cfg.sft_dataset:
        task.sft = sft_rows(cfg.sft_dataset)
    if cfg.system_prompt is not None:
        task.system_prompt = cfg.system_prompt or None
    if cfg.val_size and len(task.val) < cfg.val_size:  # all are used; say so once
        task.notes.append(f"WARNING: task.val_size={cfg.val_size} but the validation data has {len(task.val)} rows; "
                          f"validating on those {len(task.val)} (set task.val_size={len(task.val)} to silence this).")
    if len(task.train) < cfg.batch_size:
        raise ValueError(f"task {cfg.name} has {len(task.train)} training prompts, fewer than task.batch_size="
                         f"{cfg.batch_size}; lower task.batch_size or give a larger dataset.")
    return task
