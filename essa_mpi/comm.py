"""The only module that imports mpi4py: rank split, the 8-byte record Allgatherv, state repair.

What crosses the network each generation is one ``RECORD`` per candidate (Alg. 1, line 13)::

    RECORD = np.dtype([("seed", "<u4"), ("reward", "<f4")])   # 8 bytes

plus one 8-byte state fingerprint per rank. Everything else every rank derives from the config and seeds.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np

RECORD = np.dtype([("seed", "<u4"), ("reward", "<f4")])
assert RECORD.itemsize == 8


def split_counts(popsize: int, world: int) -> list:
    """Contiguous split of the population: the first popsize % world ranks get one more candidate.

    >>> split_counts(10, 3)
    [4, 3, 3]
    """
    base, extra = divmod(popsize, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


class Comm:
    """Thin wrapper over ``MPI.COMM_WORLD`` (works without mpiexec as a one-rank world)."""

    def __init__(self) -> None:
        from mpi4py import MPI  # here, not at import time, so the algorithm modules never need MPI

        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        node.Free()
        self.bytes_sent = 0  # payload bytes this rank sent through allgather_records (for the metrics)

    def my_slice(self, popsize: int) -> slice:
        counts = split_counts(popsize, self.size)
        start = sum(counts[: self.rank])
        return slice(start, start + counts[self.rank])

    def allgather_records(self, local: np.ndarray, popsize: int) -> np.ndarray:
        """Allgatherv of RECORDs in rank order → the population's [popsize] records on every rank.

        A (u4, f4) structured array has no direct MPI datatype, so it travels as raw bytes.
        """
        assert local.dtype == RECORD
        counts = [c * RECORD.itemsize for c in split_counts(popsize, self.size)]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        send = np.ascontiguousarray(local).view(np.uint8)  # [local * 8] bytes
        recv = np.empty(sum(counts), dtype=np.uint8)  # [popsize * 8] bytes
        self.world.Allgatherv(send, [recv, counts, displs, self.MPI.BYTE])
        self.bytes_sent += send.nbytes
        return recv.view(RECORD)  # [popsize]

    def allreduce_sum(self, values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values, dtype=np.float64)
        self.world.Allreduce(np.asarray(values, dtype=np.float64), out, op=self.MPI.SUM)
        return out

    def fingerprints_agree(self, fingerprint: int) -> bool:
        """Allgather each rank's 8-byte state fingerprint; True when all are equal."""
        mine = np.array([fingerprint], dtype=np.uint64)
        everyone = np.empty(self.size, dtype=np.uint64)
        self.world.Allgather(mine, everyone)
        return bool((everyone == everyone[0]).all())

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return self.world.bcast(obj, root=root)

    def idle_bcast(self, value: int = 0, root: int = 0, poll_s: float = 0.5) -> int:
        """Broadcast a small int from root while the other ranks sleep between polls: a blocking MPI call
        spins a core, which would slow the root's single-rank work (e.g. the SFT warm start)."""
        buf = np.array([value], dtype=np.int64)
        req = self.world.Ibcast(buf, root=root)
        while not req.Test():
            time.sleep(poll_s)
        return int(buf[0])

    def abort(self, code: int = 1) -> None:
        """Stop every rank (an unexpected error on one rank must not leave the others waiting)."""
        self.world.Abort(code)


def first_error(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if it raises ValueError anywhere, raise the same message everywhere."""
    try:
        result, message = fn(), None
    except ValueError as exc:
        result, message = None, str(exc)
    messages = comm.world.allgather(message)
    failed = [m for m in messages if m is not None]
    if failed:
        raise ValueError(failed[0])
    return result


def default_threads(local_size: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, local_size))
