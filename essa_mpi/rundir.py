"""One run per output directory: the lock, the overwrite policy, and the identity a resume must match.

    lock = RunLock.acquire("runs/x")     # ValueError naming the holder when a live run has it
    clear_for_fresh_run("runs/x", overwrite=False, mine=owns("runs/x", cfg))   # refuses a directory with files
    take_ownership("runs/x", cfg)        # essa_run.json: this run's config digest and SLURM job
    ident = identity(cfg, task)          # {"model": hex, "adapter": hex, "task_data": hex}
    check_identity(stored, ident, "runs/x")          # ValueError naming what changed
    lock.release()

The lock is a file created with ``link()`` (atomic on NFS, unlike O_EXCL on old clients; flock is not
used because it is unreliable on shared filesystems), holding host, pid, process start time and SLURM
job id. A heartbeat thread touches it every HEARTBEAT_S. A lock is stale when its process is gone (same
host), when it belongs to an earlier attempt of this SLURM job (requeue), or when its heartbeat is older
than STALE_S (another host).

``essa_run.json`` says which run owns the directory (the digest of its config, the SLURM job and attempt, the
stages it finished). A requeued or re-submitted job with the same config that was cut before its first
checkpoint (loading, the SFT warm start, the base validation) finds its own partial outputs there and redoes
them; a different config, or a folder without that record, is refused as before.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import threading
import time

import numpy as np

from essa_mpi.checkpoint import write_failed, writing
from essa_mpi.config import validation_due
from essa_mpi.metrics import reconcile

LOCK, OWNER = "run.lock", "essa_run.json"
HEARTBEAT_S, STALE_S = 30.0, 300.0
# What essa_mpi writes into run.output_dir: the only names run.overwrite=true (or a rerun of the owner) removes.
OUTPUTS = (OWNER, "checkpoint.h5", "checkpoint.prev.h5", "checkpoint.h5.tmp", "metrics.jsonl", "summary.json",
           "config.yaml", "adapter", "best_adapter", "best_adapter.new", "best_adapter.old", "curves.png",
           "tensorboard")


def _stat(pid: int) -> list:
    """Fields 3.. of /proc/PID/stat (state, ppid, ...; start time at index 19), [] if unknown (no procfs)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), None if unknown."""
    fields = _stat(pid)
    return fields[19] if len(fields) > 19 else None


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    fields = _stat(pid)
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped (containers whose init does not reap)
        return False
    return ticks is None or _start_ticks(pid) in (None, ticks)  # a reused pid has another start time


class Busy(ValueError):
    """The lock is held by a live run (the message names it)."""


class RunLock:
    """The lock file of one run directory, held by rank 0 for the whole run (or ``name`` in a directory: the
    lock of one SFT cache entry)."""

    def __init__(self, path: str, record: dict) -> None:
        self.path, self.record = path, record
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)
        self._beat.start()

    @classmethod
    def acquire(cls, out_dir: str, name: str = LOCK) -> RunLock:
        os.makedirs(out_dir, exist_ok=True)
        check_kinds(out_dir)
        path = os.path.join(out_dir, name)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_ticks(os.getpid()),
              "job": os.environ.get("SLURM_JOB_ID"), "user": os.environ.get("USER"), "since": time.ctime()}
        tmp = f"{path}.{me['host']}.{me['pid']}"
        with open(tmp, "w") as fh:
            json.dump(me, fh)
        try:
            for _ in range(2):  # the second try follows the removal of a stale lock
                try:
                    os.link(tmp, path)
                    return cls(path, me)
                except FileExistsError:
                    if os.stat(tmp).st_nlink == 2:  # NFS: the link was made, its reply lost
                        return cls(path, me)
                holder = _read(path)
                if not _stale(holder, path, me):
                    raise Busy(f"run.output_dir={out_dir} is in use by pid {holder.get('pid')} on "
                                     f"{holder.get('host')} (since {holder.get('since')}; {path}); wait for that "
                                     f"run, stop it, or choose another run.output_dir.")
                _remove_stale(path)
            raise ValueError(f"could not lock {path}: another run keeps taking it; choose another run.output_dir.")
        finally:
            os.unlink(tmp)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if _read(self.path) == self.record:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def _read(path: str) -> dict:
    """The lock's record; {} for anything that is not one (empty, not JSON, a JSON list)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_kinds(out_dir: str) -> None:
    """ValueError when a name essa_mpi writes as a file (its lock, log, checkpoint, summary, config) is a
    directory in out_dir: the run would fail at its first write, after the model load."""
    for name in (LOCK, OWNER, "checkpoint.h5", "checkpoint.prev.h5", "metrics.jsonl", "summary.json", "config.yaml"):
        full = os.path.join(out_dir, name)
        if os.path.isdir(full):
            raise ValueError(f"{full} is a directory, where essa_mpi keeps a file of that name; move it away or "
                             f"choose another run.output_dir.")


def _stale(holder: dict, path: str, me: dict) -> bool:
    if not holder:  # empty or not JSON: RunLock writes the record before linking it in, so no live run left it
        return True
    if holder.get("job") and holder.get("job") == me["job"] and holder.get("pid") != me["pid"]:
        return True  # an earlier attempt of this SLURM job (requeued): SLURM ended it before the restart
    if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int):
        return not _alive(holder["pid"], holder.get("start"))
    try:
        return time.time() - os.stat(path).st_mtime > STALE_S  # another host: no heartbeat for STALE_S
    except FileNotFoundError:
        return True


def _remove_stale(path: str) -> None:
    """Rename, then delete: of two runs that found the same stale lock, only one removes it."""
    aside = f"{path}.stale.{os.getpid()}"
    try:
        os.rename(path, aside)
        os.unlink(aside)
    except FileNotFoundError:
        pass


def clear_for_fresh_run(out_dir: str, overwrite: bool, inputs: dict | None = None, mine: bool = False) -> None:
    """A fresh run needs a directory without essa_mpi outputs or other files; run.overwrite=true removes
    essa_mpi's own outputs (OUTPUTS) and leaves anything else, but never what the run reads (``inputs``:
    {config key: path}, e.g. an adapter.path inside out_dir/best_adapter). ``mine`` (``owns``): the same run,
    requeued before its first checkpoint: its own outputs are removed as with overwrite; other files stay."""
    present = sorted(n for n in os.listdir(out_dir) if not n.startswith(LOCK))
    if not present:
        return
    if mine and "checkpoint.h5" not in present:
        overwrite = True
    if not overwrite:
        if "checkpoint.h5" in present:
            raise ValueError(f"{out_dir} already holds a checkpoint; continue it with --resume {out_dir}, set "
                             f"run.output_dir to a new directory, or run.overwrite=true to start over there.")
        raise ValueError(f"run.output_dir={out_dir} already holds {', '.join(present[:5])}"
                         f"{' ...' if len(present) > 5 else ''} but no checkpoint; choose a new run.output_dir, or "
                         f"set run.overwrite=true to replace essa_mpi's outputs there.")
    doomed = [os.path.join(out_dir, n) for n in present if n in OUTPUTS]
    for key, path in (inputs or {}).items():
        real = os.path.realpath(path) if path else None
        hit = next((d for d in doomed if real and (real == os.path.realpath(d) or
                                                   real.startswith(os.path.realpath(d) + os.sep))), None)
        if hit:
            raise ValueError(f"run.overwrite=true would remove {hit}, which {key}={path} reads; copy it out of "
                             f"{out_dir} first (or point {key} at the copy), or choose another run.output_dir.")
    for full in doomed:
        shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)


def config_digest(cfg) -> str:
    return digest(cfg.to_dict())


def read_owner(out_dir: str) -> dict:
    """essa_run.json of out_dir, {} when there is none (or it is not one)."""
    return _read(os.path.join(out_dir, OWNER))


def owns(out_dir: str, cfg) -> bool:
    """out_dir was started by a run of this very config (the same job requeued, or re-submitted)."""
    return read_owner(out_dir).get("config") == config_digest(cfg)


def take_ownership(out_dir: str, cfg) -> None:
    """Rank 0 of a fresh run, after clear_for_fresh_run: essa_run.json names this run."""
    mark(out_dir, {"config": config_digest(cfg), "job": os.environ.get("SLURM_JOB_ID"),
                   "attempt": int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1, "host": socket.gethostname(),
                   "since": time.ctime(), "stages": []}, fresh=True)


def mark(out_dir: str, fields: dict, fresh: bool = False) -> None:
    """Merge fields into essa_run.json (written whole to a temp file, then renamed: never half a record)."""
    path = os.path.join(out_dir, OWNER)
    record = {**({} if fresh else _read(path)), **fields}
    with writing(path + ".tmp", out_dir) as fh:
        json.dump(record, fh, indent=1)
    os.replace(path + ".tmp", path)


def stage_done(out_dir: str, name: str) -> None:
    """Rank 0: record a finished stage (e.g. "sft") in essa_run.json: what a time-limited attempt gained."""
    stages = read_owner(out_dir).get("stages", [])
    if name not in stages:
        mark(out_dir, {"stages": [*stages, name]})


def digest(obj) -> str:
    """16 hex digits of sha256 over JSON (sorted keys): rows, configs.

    >>> digest([{"prompt": "1+1", "answer": "2"}])
    'e555c92bd49d21ea'
    """
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(paths: list, edge: int = 1 << 20) -> str:
    """Cheap content hash of files: name, size and the first and last ``edge`` bytes of each (a model's
    weight files are GBs; a changed checkpoint changes its header or its tail)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = os.path.getsize(p)
        h.update(f"{os.path.basename(p)}:{size}".encode())
        with open(p, "rb") as fh:
            h.update(fh.read(edge))
            if size > 2 * edge:
                fh.seek(-edge, os.SEEK_END)
                h.update(fh.read(edge))
    return h.hexdigest()[:16]


WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".json", ".model")


def model_digest(path: str, gguf: str | None) -> str:
    """The model's config and weight files (a local directory or GGUF); a hub id by its name."""
    if gguf:
        return file_digest([os.path.join(path, gguf)])
    if os.path.isdir(path):
        return file_digest([os.path.join(path, n) for n in os.listdir(path) if n.endswith(WEIGHTS)])
    return digest({"hub": path})


def identity(cfg, task) -> dict:
    """What defines the objective, besides the config: model files, SFT adapter files, task rows."""
    from essa_mpi.modelfiles import resolve

    adapter = cfg.adapter.path
    return {"model": model_digest(*resolve(cfg.model, local=False)),
            "adapter": file_digest([os.path.join(adapter, n) for n in ("adapter_config.json",
                                                                       "adapter_model.safetensors")])
            if adapter and os.path.isdir(adapter) else "none",
            "task_data": digest([task.train, task.val])}


WHAT = {"model": "the model files at model.name_or_path", "adapter": "the adapter files at adapter.path",
        "task_data": "the task's training or validation rows", "svd_bases": "the SVD bases of the adapter "
        "(another torch or LAPACK build?)"}


def check_identity(stored: dict, current: dict, out_dir: str) -> None:
    """ValueError naming everything that differs from what the checkpoint was written with."""
    changed = [k for k in current if k in stored and stored[k] != current[k]]
    if changed:
        raise ValueError(f"--resume {out_dir}: {'; '.join(WHAT[k] for k in changed)} changed since the checkpoint "
                         f"was written ({', '.join(f'{k} {stored[k]} -> {current[k]}' for k in changed)}); restore "
                         f"them, or start fresh with a new run.output_dir.")


def past_validation(cfg, lead: bool, state, sigmas: list) -> tuple:
    """Rank 0 starts the run's files: config.yaml; on resume, metrics.jsonl made to agree with the checkpoint
    (metrics.reconcile; sigmas: the replayed sigma after each generation) → (validation before it
    {generation: reward}, base-model reward or None), read from those lines, so summary.json keeps the whole
    history."""
    val, base, out = {}, None, cfg.run.output_dir
    if not lead:
        return val, base
    with writing(os.path.join(out, "config.yaml"), out) as fh:
        fh.write(cfg.to_yaml())
    if state is None:
        return val, base
    restore_best(out)
    # the resume validates its first generation again when one is due there (every rank decides alike, without
    # reading this file); the same state gives the same value, so that line is dropped, not duplicated; when
    # none is due (a finished run continued to more generations), the line is the only record and stays
    again = validation_due(cfg, state.generation)
    kept, note = reconcile(os.path.join(out, "metrics.jsonl"), state.generation, state.rewards, sigmas, again)
    if note:
        print(note, file=sys.stderr, flush=True)
    for m in kept:
        if "val_reward" in m:
            val[m["generation"]] = m["val_reward"]
        base = m.get("val_base_reward", base)
    return val, base


def keep_best(adapter, mean, cfg, val: dict, g: int) -> None:
    """Rank 0: when generation g's validation beats every earlier one, export mean (the search mean, [n]) of the
    SVD-LoRA adapter to best_adapter/ (like TRL's load_best_model_at_end, but kept beside the final adapter/).
    Ties keep the earlier generation. The directory is swapped in whole, so a kill leaves the previous best or
    the new one, never half of one."""
    if val[g] <= max((v for k, v in val.items() if k < g), default=-np.inf):
        return
    from safetensors import SafetensorError  # a full disk inside save_file is not an OSError

    from essa_mpi.export import export_adapter

    out = cfg.run.output_dir
    new, old, best = (os.path.join(out, name) for name in ("best_adapter.new", "best_adapter.old", "best_adapter"))
    shutil.rmtree(new, ignore_errors=True)
    try:
        export_adapter(adapter, mean, new, cfg.adapter.alpha, cfg.model.name_or_path)
        with open(os.path.join(new, "essa_best.json"), "w") as fh:
            json.dump({"generation": g, "val_reward": val[g]}, fh)
    except (OSError, SafetensorError) as exc:
        shutil.rmtree(new, ignore_errors=True)
        raise write_failed(new, exc, out) from None
    shutil.rmtree(old, ignore_errors=True)
    if os.path.isdir(best):
        os.rename(best, old)
    os.rename(new, best)
    shutil.rmtree(old, ignore_errors=True)


def restore_best(out: str) -> None:
    """A kill between keep_best's two renames leaves only best_adapter.old: put it back (on resume)."""
    old, best = os.path.join(out, "best_adapter.old"), os.path.join(out, "best_adapter")
    if os.path.isdir(old) and not os.path.isdir(best):
        os.rename(old, best)
