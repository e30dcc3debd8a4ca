"""HDF5 checkpoint of an ESSA run, written atomically after every generation (rank 0).

    save(path, state)            # temp file, fsync, rename; the previous one kept as checkpoint.prev.h5
    state, note = load_latest(out_dir)   # checkpoint.h5, or checkpoint.prev.h5 when the latest is damaged

Layout of ``checkpoint.h5`` (no pickle anywhere)::

    attrs: generation (completed), data_cursor, solution_length, popsize, fingerprint, config (YAML text),
           identity (JSON: model, adapter, task data, SVD bases digests), checksum (sha256 of all the rest)
    history/seeds   uint32  [generations, popsize]   the seeds of every evaluated candidate
    history/rewards float32 [generations, popsize]   their rewards (the gathered 8-byte records)
    cma/<name>      float64/int64                    SeededCMA.state_arrays(): mean, sigma, C or sigma_vec, ...
    solutions/mean  float64 [n]                      search mean (what export uses)
    solutions/best  float64 [n], attrs reward        best candidate seen (by mini-batch reward)

A crash at any point leaves a complete checkpoint.h5 or checkpoint.prev.h5 (never only a temp file): the
new file is fsynced before the rename and the directory after it. A file that fails its checksum, is
truncated or is not an ESSA checkpoint is refused with one line (ValueError), never a traceback.

Resume replays the (seed, reward) history through a fresh CMA-ES, which is exactly the computation every
rank did, and checks the result against the stored fingerprint; the rest of the run is then bit-identical.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
from dataclasses import dataclass, field

import numpy as np

# HDF5 locks every file it opens (flock); on NFS without a lock daemon that fails with ENOLCK ("unable to lock
# file"), which would read as a corrupt checkpoint. One writer (rank 0 under run.lock) and atomic renames make
# the lock useless here: off for every file, before h5py loads HDF5 (locking=False below says it per file too).
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")
import h5py  # noqa: E402

FILENAME, PREVIOUS = "checkpoint.h5", "checkpoint.prev.h5"


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
    identity: dict = field(default_factory=dict)


class CheckpointWriteError(RuntimeError):
    """The checkpoint (or best_adapter/) could not be written (disk full, quota, permissions); the previous
    checkpoint is intact."""


def write_failed(what: str, exc: Exception, run_dir: str) -> CheckpointWriteError:
    """The one line for a run output that could not be written (checkpoint, best_adapter/)."""
    where = getattr(exc, "filename", None) or what
    fix = {errno.EACCES: f"no permission to write {where}: give the run back write permission on {run_dir}",
           errno.EPERM: f"not permitted to write {where}: give the run back write permission on {run_dir}",
           errno.EROFS: f"the filesystem of {where} is read-only now: remount it writable",
           }.get(getattr(exc, "errno", None), "free space (disk full or quota?)")
    return CheckpointWriteError(f"could not write {what}: {getattr(exc, 'strerror', None) or exc}; the previous "
                                f"checkpoint (if any) is kept. {fix[:1].upper()}{fix[1:]}, then --resume {run_dir}.")


@contextlib.contextmanager
def writing(path: str, run_dir: str, mode: str = "w"):
    """open(path, mode) for a run output; an OSError (disk full, quota, read-only) becomes write_failed's line."""
    try:
        with open(path, mode) as fh:
            yield fh
    except OSError as exc:
        raise write_failed(path, exc, run_dir) from None


def _arrays(s: RunState) -> dict:
    """Every dataset of the file, by HDF5 path."""
    out = {"history/seeds": s.seeds.astype(np.uint32), "history/rewards": s.rewards.astype(np.float32),
           **{f"cma/{k}": np.asarray(v) for k, v in s.cma.items()}, "solutions/mean": np.asarray(s.cma["mean"])}
    if s.best is not None:
        out["solutions/best"] = np.asarray(s.best)
    return out


def _attrs(s: RunState) -> dict:
    return {"generation": int(s.generation), "data_cursor": int(s.data_cursor), "config": s.config_yaml,
            "fingerprint": np.uint64(s.fingerprint), "popsize": int(s.seeds.shape[1]) if s.seeds.size else 0,
            "solution_length": len(s.cma["mean"]), "best_reward": float(s.best_reward),
            "identity": json.dumps(s.identity, sort_keys=True)}


def checksum(attrs: dict, arrays: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(attrs):
        h.update(f"{key}={attrs[key]!s}".encode())
    for key in sorted(arrays):
        a = np.ascontiguousarray(arrays[key])
        h.update(f"{key}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: str, s: RunState) -> None:
    """Write s to path atomically; the file it replaces becomes checkpoint.prev.h5 in the same directory."""
    tmp, directory = path + ".tmp", os.path.dirname(os.path.abspath(path))
    attrs, arrays = _attrs(s), _arrays(s)
    for leftover in (tmp, os.path.join(directory, PREVIOUS + ".tmp")):  # from a process killed mid-save
        if os.path.exists(leftover):
            os.remove(leftover)
    buffer = io.BytesIO()  # HDF5 in memory, then one plain write: a full disk is a clean OSError, not h5py noise
    with h5py.File(buffer, "w") as f:
        f.attrs.update(attrs)
        f.attrs["checksum"] = checksum(attrs, arrays)
        for key, value in arrays.items():
            f.create_dataset(key, data=value)
    try:
        with open(tmp, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        if os.path.exists(path):  # keep the previous checkpoint: a hard link, so path itself never goes missing
            prev = os.path.join(directory, PREVIOUS)
            os.link(path, prev + ".tmp")
            os.replace(prev + ".tmp", prev)
        os.replace(tmp, path)
        _fsync(directory)
    except OSError as exc:
        raise write_failed(f"the checkpoint {path}", exc, directory) from None
    finally:
        for leftover in (tmp, os.path.join(directory, PREVIOUS + ".tmp")):
            if os.path.exists(leftover):
                os.remove(leftover)


def load(path: str) -> RunState:
    """The checkpoint at path; ValueError (one line) when it is missing, damaged or not an ESSA checkpoint."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}; --resume takes the run's output_dir, which holds {FILENAME}.")
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = {k: f.attrs[k] for k in f.attrs if k != "checksum"}
            arrays = {}
            f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                         else None)
            stored = str(f.attrs.get("checksum", ""))
        state = _state(attrs, arrays)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a readable ESSA checkpoint ({type(exc).__name__}: {exc}); it is truncated, "
                         f"corrupt or from another program.") from None
    if checksum({k: attrs[k] for k in _attrs(state)}, _arrays(state)) != stored:
        raise ValueError(f"{path} fails its checksum: it was edited or damaged after it was written.")
    return state


def _state(attrs: dict, arrays: dict) -> RunState:
    cma = {k[4:]: v for k, v in arrays.items() if k.startswith("cma/")}
    s = RunState(generation=int(attrs["generation"]), data_cursor=int(attrs["data_cursor"]),
                 config_yaml=str(attrs["config"]), seeds=arrays["history/seeds"], rewards=arrays["history/rewards"],
                 cma=cma, fingerprint=int(attrs["fingerprint"]), best=arrays.get("solutions/best"),
                 best_reward=float(attrs["best_reward"]), identity=json.loads(str(attrs["identity"])))
    if s.seeds.shape != s.rewards.shape or len(s.seeds) != s.generation or "mean" not in cma:
        raise ValueError(f"history of {s.seeds.shape} seeds and {s.rewards.shape} rewards for {s.generation} "
                         f"generations")
    return s


def load_latest(out_dir: str) -> tuple:
    """→ (RunState, note): checkpoint.h5, or checkpoint.prev.h5 with a note saying why when the latest is
    damaged (a crash or a full disk while it was written) or missing. ValueError when neither is usable."""
    latest, prev = os.path.join(out_dir, FILENAME), os.path.join(out_dir, PREVIOUS)
    try:
        return load(latest), None
    except ValueError as exc:
        if not os.path.isfile(prev):
            raise
        if not os.path.isfile(latest):  # deleted by hand, or lost with a node: the previous one still counts
            state = load(prev)
            return state, (f"WARNING: {latest} is missing; resuming from {prev} (generation {state.generation}) "
                           f"instead.")
        try:
            state = load(prev)
        except ValueError:
            raise exc from None
        return state, f"WARNING: {exc} Resuming from {prev} (generation {state.generation}) instead."


@dataclass
class History:
    """The (seed, reward) records of every generation so far, plus the best candidate seen."""

    seeds: np.ndarray  # [generations, popsize] uint32
    rewards: np.ndarray  # [generations, popsize] float32
    best: np.ndarray | None
    best_reward: float

    @classmethod
    def fresh(cls, popsize: int) -> History:
        return cls(np.zeros((0, popsize), np.uint32), np.zeros((0, popsize), np.float32), None, -np.inf)

    @classmethod
    def of(cls, state: RunState) -> History:
        return cls(state.seeds, state.rewards, state.best, state.best_reward)

    def add(self, records: np.ndarray, X: np.ndarray) -> None:
        r = records["reward"].astype(np.float64)
        if r.max() > self.best_reward:
            self.best, self.best_reward = X[int(r.argmax())], float(r.max())
        self.seeds = np.vstack([self.seeds, records["seed"]])  # [g+1, popsize]
        self.rewards = np.vstack([self.rewards, records["reward"]])  # [g+1, popsize]

    def state(self, cfg, search, generation: int, identity: dict) -> RunState:
        """The checkpoint of generation (cfg: the run's Config, search: its SeededCMA)."""
        return RunState(
            generation=generation, data_cursor=generation * cfg.task.batch_size, config_yaml=cfg.to_yaml(),
            seeds=self.seeds, rewards=self.rewards, cma=search.state_arrays(), fingerprint=search.fingerprint(),
            best=self.best, best_reward=self.best_reward, identity=identity)
