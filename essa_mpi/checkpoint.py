"""HDF5 checkpoint of an ESSA run, written atomically after every generation (rank 0).

    save(path, state)            # temp file + os.replace: a crash never leaves a half-written checkpoint
    state = load(path)

Layout of ``checkpoint.h5`` (no pickle anywhere)::

    attrs: generation (completed), data_cursor, solution_length, popsize, fingerprint, config (YAML text)
    history/seeds   uint32  [generations, popsize]   the seeds of every evaluated candidate
    history/rewards float32 [generations, popsize]   their rewards (the gathered 8-byte records)
    cma/<name>      float64/int64                    SeededCMA.state_arrays(): mean, sigma, C or sigma_vec, ...
    solutions/mean  float64 [n]                      search mean (what export uses)
    solutions/best  float64 [n], attrs reward        best candidate seen (by mini-batch reward)

Resume replays the (seed, reward) history through a fresh CMA-ES, which is exactly the computation every
rank did, and checks the result against the stored fingerprint; the rest of the run is then bit-identical.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import h5py
import numpy as np

FILENAME = "checkpoint.h5"


@dataclass
class RunState:
    generation: int  # generations completed
    data_cursor: int
    config_yaml: str
    seeds: np.ndarray  # [G, popsize] uint32
    rewards: np.ndarray  # [G, popsize] float32
    cma: dict = field(default_factory=dict)
    fingerprint: int = 0
    best: np.ndarray | None = None
    best_reward: float = -np.inf


def save(path: str, s: RunState) -> None:
    tmp = path + ".tmp"
    with h5py.File(tmp, "w") as f:
        f.attrs.update(generation=s.generation, data_cursor=s.data_cursor, config=s.config_yaml,
                       fingerprint=np.uint64(s.fingerprint), popsize=s.seeds.shape[1] if s.seeds.size else 0,
                       solution_length=len(s.cma["mean"]))
        f.create_dataset("history/seeds", data=s.seeds.astype(np.uint32))
        f.create_dataset("history/rewards", data=s.rewards.astype(np.float32))
        for key, value in s.cma.items():
            f.create_dataset(f"cma/{key}", data=value)
        f.create_dataset("solutions/mean", data=s.cma["mean"])
        if s.best is not None:
            f.create_dataset("solutions/best", data=s.best).attrs["reward"] = s.best_reward
    os.replace(tmp, path)


def load(path: str) -> RunState:
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; --resume takes the run's output_dir, which holds {FILENAME}.")
    with h5py.File(path, "r") as f:
        best = f["solutions/best"] if "solutions/best" in f else None
        return RunState(
            generation=int(f.attrs["generation"]), data_cursor=int(f.attrs["data_cursor"]),
            config_yaml=str(f.attrs["config"]), seeds=f["history/seeds"][()], rewards=f["history/rewards"][()],
            cma={k: v[()] for k, v in f["cma"].items()}, fingerprint=int(f.attrs["fingerprint"]),
            best=None if best is None else best[()],
            best_reward=-np.inf if best is None else float(best.attrs["reward"]))
