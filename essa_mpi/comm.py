"""The only module that imports mpi4py: rank split, the 8-byte record Allgatherv, state repair.

What crosses the network each generation is one ``RECORD`` per candidate (Alg. 1, line 13)::

    RECORD = np.dtype([("seed", "<u4"), ("reward", "<f4")])   # 8 bytes

plus a 16-byte trailer per rank in the same call: its CMA-ES state fingerprint (8 bytes; the ranks compare
them to catch a diverged state) and the seconds it spent evaluating (for the wait-for-the-slowest-rank
metric). That one Allgatherv is the only collective of a generation; validation adds one Allreduce.
Everything else every rank derives from the config and seeds.

Which rows each rank evaluates, and which records it sends for them, is ``essa_mpi.shares`` (the
popsize x batch (candidate, prompt) rows split evenly; a rank holding part of a candidate sends one record per
prompt it scored, and every rank averages them in prompt order, as a one-rank run does).
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from essa_mpi import shares, watchdog
from essa_mpi.launch import threads_per_rank

RECORD = np.dtype([("seed", "<u4"), ("reward", "<f4")])
assert RECORD.itemsize == 8
BEAT_TAG = 7078  # point-to-point tag of beat()
QUERY_TAG, ANSWER_TAG = 7079, 7080  # the stall diagnosis: "how many collectives have you entered?" and the answer
LISTEN_S = 0.5  # how often a rank's listener thread looks for such a question (nothing is sent in a healthy run)


def host_label() -> str:
    """This process's host, with SLURM's node name where it differs (simulated nodes share one hostname)."""
    host, node = socket.gethostname(), os.environ.get("SLURMD_NODENAME")
    return f"{host} ({node})" if node and node != host else host


def _beat_interval(stall_timeout_s: float) -> float:
    """Seconds between beats: several per stall timeout, so one late poll never reads as a stall.

    >>> _beat_interval(1800), _beat_interval(4), _beat_interval(0)
    (60.0, 0.5, 60.0)
    """
    return min(60.0, max(0.5, stall_timeout_s / 8)) if stall_timeout_s else 60.0


def init_mpi():
    """``from mpi4py import MPI``, which runs MPI_Init: here, not at import time, so the algorithm modules never
    need MPI. MPI_Init waits in C for every rank (with the GIL held), where no Python signal handler can run:
    a SIGTERM from scancel or mpiexec would wait there for good once a peer had already exited (seen in CI:
    a rank stopped while importing, its peer hung in MPI_Init). So SIGINT, SIGTERM and SIGUSR1 take their default
    action, ending the process at once, for as long as MPI_Init runs; the caller's handlers come back after."""
    held = {sig: signal.signal(sig, signal.SIG_DFL) for sig in watchdog.STOP_SIGNALS}
    try:
        from mpi4py import MPI
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
    return MPI


class Comm:
    """Thin wrapper over ``MPI.COMM_WORLD`` (works without mpiexec as a one-rank world)."""

    def __init__(self) -> None:
        MPI = init_mpi()
        self.MPI = MPI
        self.world = MPI.COMM_WORLD
        self.rank = self.world.Get_rank()
        self.size = self.world.Get_size()
        node = self.world.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_rank, self.local_size = node.Get_rank(), node.Get_size()
        mine = node.allgather((self.rank, sorted(cores())))  # once, at start: world rank and CPU affinity mask
        node.Free()
        self.node_leader = mine[0][0]  # world rank of this node's local rank 0 (reads for the node: stage.py)
        masks = [m for _, m in mine]
        self.threads = threads_per_rank(cores(), masks)  # torch threads of this rank (launch.threads_per_rank)
        self.library = MPI.Get_library_version().strip()  # names the MPI actually loaded
        self.hosts = self.world.allgather(host_label())  # [world]: every rank's host, for the lines naming ranks
        self.entered, self.last_label = 0, "start-up"  # watched collectives entered so far (same order on all ranks)
        self._quit = threading.Event()
        if self.size > 1:
            threading.Thread(target=self._answer, daemon=True, name="essa-stall-answers").start()
            atexit.register(self._quit.set)  # runs before mpi4py's MPI_Finalize (registered earlier, LIFO)
        self.bytes_sent = 0  # bytes this rank sent through exchange (for the metrics)
        self.stall_timeout_s = 0.0  # run.stall_timeout_s: the watchdog on collectives (0 = off)
        # what a stall line tells the user to do (is there a checkpoint yet? cli.execute knows)
        self.after_stall: Callable[[], str] = lambda: "run the same command again"
        self._beats, self._beat_reqs, self._last_beat = 0, [], 0.0  # beat() since the last idle_bcast

    def share(self, popsize: int, batch: int) -> list:
        """This rank's pieces of the generation's (candidate, prompt) rows (``shares.shares``)."""
        return shares.shares(popsize, batch, self.size)[self.rank]

    def exchange(self, local: np.ndarray, counts: list, fingerprint: int, eval_s: float,
                 label: str = "the record exchange") -> tuple:
        """The generation's one collective (Alg. 1, line 13): Allgatherv of every rank's RECORDs (rank r sends
        counts[r]) followed by its 16-byte trailer → (records [sum(counts)] in rank order, fingerprints [world]
        uint64, evaluation seconds [world] float32), identical on every rank.

        A (u4, f4) structured array has no direct MPI datatype, so everything travels as raw bytes.
        """
        assert local.dtype == RECORD and len(local) == counts[self.rank]
        trailer = np.zeros(2, dtype=RECORD)  # [2]: fingerprint (as 8 raw bytes), then (rank, eval seconds)
        trailer[:1].view(np.uint64)[0] = np.uint64(fingerprint)
        trailer[1] = (self.rank, eval_s)
        send = np.concatenate([np.ascontiguousarray(local), trailer]).view(np.uint8)  # [(local + 2) * 8] bytes
        sizes = [(c + 2) * RECORD.itemsize for c in counts]
        displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()
        recv = np.empty(sum(sizes), dtype=np.uint8)  # [(sum(counts) + 2 * world) * 8] bytes
        with self.watch(label):
            self.world.Allgatherv(send, [recv, sizes, displs, self.MPI.BYTE])
        self.bytes_sent += send.nbytes
        chunks = [recv[d: d + n].view(RECORD) for d, n in zip(displs, sizes)]  # per rank: [counts[r] + 2]
        records = np.concatenate([c[:-2] for c in chunks])  # [sum(counts)]
        fingerprints = np.array([c[-2:-1].view(np.uint64)[0] for c in chunks], dtype=np.uint64)  # [world]
        seconds = np.array([c[-1]["reward"] for c in chunks], dtype=np.float32)  # [world]
        return records, fingerprints, seconds

    def exchange_rewards(self, seeds: np.ndarray, values: np.ndarray, batch: int, fingerprint: int, eval_s: float,
                         label: str = "the record exchange") -> tuple:
        """This rank's record rewards → every candidate's reward, in candidate order, on every rank.

        seeds [popsize] uint32 (the generation's, same on every rank); values [my records] float32 (this rank's
        share, ``shares.local_values``). → (records [popsize] RECORD, fingerprints [world] uint64, evaluation
        seconds [world] float32)."""
        popsize = len(seeds)
        counts = shares.record_counts(popsize, batch, self.size)
        expected = shares.record_seeds(popsize, batch, self.size, seeds)  # [sum(counts)]
        start = sum(counts[: self.rank])
        local = np.empty(len(values), dtype=RECORD)  # [my records]
        local["seed"], local["reward"] = expected[start: start + len(values)], values
        gathered, fingerprints, seconds = self.exchange(local, counts, fingerprint, eval_s, label)
        # seeds depend only on (search.seed, g, k), never on the CMA-ES state: they agree even across diverged ranks
        assert (gathered["seed"] == expected).all(), "gathered seeds differ"
        records = np.empty(popsize, dtype=RECORD)  # [popsize]
        records["seed"], records["reward"] = seeds, shares.gathered_rewards(popsize, batch, self.size,
                                                                            gathered["reward"])
        return records, fingerprints, seconds

    def allreduce_sum(self, values: np.ndarray, label: str = "validation") -> np.ndarray:
        out = np.empty_like(values, dtype=np.float64)
        with self.watch(label):
            self.world.Allreduce(np.asarray(values, dtype=np.float64), out, op=self.MPI.SUM)
        return out

    def where(self, rank: int) -> str:
        return f"rank {rank} on {self.hosts[rank]}"

    def watch(self, label: str):
        """Watchdog around one blocking collective: past stall_timeout_s, find out which ranks are missing,
        say so in one line and abort the job (watchdog.deadline)."""
        self.entered, self.last_label = self.entered + 1, label
        return watchdog.deadline(self.stall_timeout_s, lambda: self._missing_ranks(label))

    def _answer(self) -> None:
        """Listener thread: answer a stalled rank's question with (collectives entered, the last one's label).
        Only iprobe while all is well: no message, no collective."""
        status = self.MPI.Status()
        while not self._quit.wait(LISTEN_S):
            while not self._quit.is_set() and self.world.iprobe(source=self.MPI.ANY_SOURCE, tag=QUERY_TAG,
                                                                 status=status):
                asker = status.Get_source()
                self.world.recv(source=asker, tag=QUERY_TAG)
                self.world.send((self.entered, self.last_label), dest=asker, tag=ANSWER_TAG)

    def _grace_s(self) -> float:
        """Seconds a stopping rank waits for the others' word before it acts alone."""
        return min(10.0, max(2.0, self.stall_timeout_s / 10))

    def _missing_ranks(self, label: str) -> str:
        """Runs on the watchdog thread of a rank whose deadline passed in collective number ``entered`` (the
        main thread is blocked in it; mpi4py initialises MPI_THREAD_MULTIPLE). It asks every other rank's
        listener how many collectives that rank has entered: at least as many = arrived (a late rank that came
        before the deadline is never blamed); fewer = alive but elsewhere; no answer within the grace period =
        stopped, killed, or hung outside Python. The lowest arrived rank says the line; the others wait for its
        Abort. Called only when the job is stopping."""
        grace, mine = self._grace_s(), self.entered
        what = f"{label} did not complete within run.stall_timeout_s={self.stall_timeout_s:g} s"
        for r in range(self.size):
            if r != self.rank:
                self.world.isend(mine, dest=r, tag=QUERY_TAG)
        answers, status, end = {}, self.MPI.Status(), time.time() + grace
        while time.time() < end and len(answers) < self.size - 1:
            while self.world.iprobe(source=self.MPI.ANY_SOURCE, tag=ANSWER_TAG, status=status):
                answers[status.Get_source()] = self.world.recv(source=status.Get_source(), tag=ANSWER_TAG)
            time.sleep(0.05)
        arrived = [self.rank] + [r for r, (n, _) in answers.items() if n >= mine]
        if min(arrived) != self.rank:
            time.sleep(2 * grace)  # the lowest arrived rank names the missing ones and aborts the job meanwhile
            return f"{what}; {self.where(min(arrived))} was to name the missing ranks and did not."
        missing = [r for r in range(self.size) if r not in arrived]
        silent = "no answer: stopped, killed, or hung outside Python"
        said = "; ".join(f"{self.where(r)} ({'alive, last in ' + answers[r][1] if r in answers else silent})"
                         for r in missing)
        return (f"{what}: {said + ' did not arrive' if said else 'although every rank arrived (an MPI fault?)'}; "
                f"{self.after_stall()} after the fix, or raise run.stall_timeout_s if this step really takes that "
                f"long.")

    def bcast(self, obj: Any, root: int = 0, label: str = "the state repair broadcast") -> Any:
        with self.watch(label):
            return self.world.bcast(obj, root=root)

    def allgather(self, obj: Any, label: str) -> list:
        """Every rank's small object, in rank order (start-up only: the generation loop sends RECORDs)."""
        with self.watch(label):
            return self.world.allgather(obj)

    def beat(self) -> None:
        """A sign of progress from the rank doing single-rank work while the others wait in idle_bcast (called
        by that work, e.g. once per SFT step): at most one empty message to every other rank per interval."""
        now = time.time()
        if self.size == 1 or now - self._last_beat < _beat_interval(self.stall_timeout_s):
            return
        self._last_beat, self._beats = now, self._beats + 1
        self._beat_reqs += [self.world.issend(None, dest=r, tag=BEAT_TAG) for r in range(self.size) if r != self.rank]

    def idle_bcast(self, value: int = 0, root: int = 0, poll_s: float = 0.5, label: str = "the SFT warm start") -> int:
        """Broadcast a small int from root while the other ranks sleep between polls: a blocking MPI call
        spins a core, which would slow the root's single-rank work (``label``, e.g. the SFT warm start).

        The waiting ranks count root's beat()s: none for run.stall_timeout_s stops the job with one line (a hung
        or stopped root would otherwise leave every rank waiting forever). Root also sends how many beats it
        sent, so each waiting rank receives every one and no message is left unmatched."""
        buf = np.array([value, self._beats], dtype=np.int64)  # [2]: value, beats root sent
        req = self.world.Ibcast(buf, root=root)
        if self.rank == root:
            with self.watch(f"the end of {label}"):  # a stopped waiting rank never receives its beats
                req.Wait()
                self.MPI.Request.waitall(self._beat_reqs)  # every waiting rank has received its beats
            self._beat_reqs, self._beats, self._last_beat = [], 0, 0.0
            return value
        self.entered, self.last_label = self.entered + 1, f"the end of {label}"  # as root's watch() counts it
        heard, last = 0, time.time()
        while not req.Test():
            while self.world.iprobe(source=root, tag=BEAT_TAG):
                self.world.recv(source=root, tag=BEAT_TAG)
                heard, last = heard + 1, time.time()
            if self.stall_timeout_s and time.time() - last > self.stall_timeout_s:
                self._stalled_root(root, label)
            time.sleep(poll_s)
        for _ in range(int(buf[1]) - heard):  # beats sent before the broadcast, still in flight
            self.world.recv(source=root, tag=BEAT_TAG)
        return int(buf[0])

    def _stalled_root(self, root: int, label: str) -> None:
        """No beat from root for stall_timeout_s: the first waiting rank says so and stops the job; the others
        follow after a grace period in case that rank is gone too."""
        first = 1 if root == 0 else 0
        if self.rank != first:
            time.sleep(self._grace_s())
        watchdog.say(f"rank {root} showed no progress in {label} for run.stall_timeout_s={self.stall_timeout_s:g} s "
                     f"(stopped, hung, or on a frozen node or filesystem); nothing of it was saved: rerun after the "
                     f"fix, or raise run.stall_timeout_s if one step or the model load really takes that long.")
        watchdog.stop(watchdog.TIMEOUT_EXIT)

    def abort(self, code: int = 1) -> None:
        """Stop every rank (an unexpected error on one rank must not leave the others waiting)."""
        self.world.Abort(code)


class Refused(ValueError):
    """A failure found on some rank and raised on every rank by first_error: a clean exit, no abort. Bad input
    (a ValueError) exits 2; anything else (``unexpected``: a filesystem error, a bug) exits 1."""

    def __init__(self, message: str, unexpected: bool = False) -> None:
        super().__init__(message)
        self.unexpected = unexpected


def first_error(comm: Comm, fn: Callable[[], Any]) -> Any:
    """Run fn on every rank; if it fails anywhere, raise the first rank's message everywhere (Refused), so no
    rank is left waiting in a later collective for one that failed."""
    try:
        result, message = fn(), None
    except ValueError as exc:
        result, message = None, (str(exc), False)
    except (Exception, SystemExit) as exc:
        result, message = None, (f"{type(exc).__name__}: {exc}", True)
    with comm.watch("a check every rank makes (first_error)"):
        messages = comm.world.allgather(message)
    failed = [m for m in messages if m is not None]
    if failed:
        raise Refused(*failed[0])
    return result


def same_everywhere(comm: Comm, digests: dict) -> None:
    """One allgather at start of every rank's {input: digest}: ValueError (the same on every rank) naming the
    first input the ranks disagree on and which ranks hold which, e.g. an MPMD launch or a stale node-local
    copy of a dataset. Later collectives assume every rank draws and evaluates the same population."""
    with comm.watch("the start-up check that every rank read the same inputs"):
        every = comm.world.allgather(digests)
    for key in digests:
        groups: dict = {}
        for r, d in enumerate(every):
            groups.setdefault(d.get(key), []).append(r)
        if len(groups) > 1:
            held = "; ".join(f"ranks {ranks_text(rs)}: {str(d)[:8]}" for d, rs in groups.items())
            raise ValueError(f"the ranks read different {key} ({held}); every rank must get the same config and "
                             f"data files: launch one command for all ranks, and give every node the same copy.")


def ranks_text(ranks: list) -> str:
    """Rank numbers, runs shortened.

    >>> ranks_text([0, 1, 2, 5])
    '0-2,5'
    """
    out, start = [], ranks[0]
    for a, b in zip(ranks, ranks[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)


def cores() -> set:
    """The CPU cores this process may run on (its affinity mask, which a launcher's binding narrows)."""
    return set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))


def library_version() -> str:
    """The MPI library mpi4py loaded, without initialising MPI (allowed before MPI_Init since MPI-3)."""
    import mpi4py

    mpi4py.rc.initialize = False
    from mpi4py import MPI

    return " ".join(MPI.Get_library_version().split())


def main(argv: list) -> int:
    """``python -m essa_mpi launch-check --srun-mpi``: the srun --mpi plugin for the loaded MPI (no MPI_Init).
    ``srun -n 2 python -m essa_mpi launch-check``: each process prints its rank, the world size and the MPI
    library, and exits 2 if the launch did not form one world (the check every essa_mpi run makes first).
    ``python -m essa_mpi.comm`` is the same entry, kept for old scripts."""
    import argparse

    from essa_mpi.launch import check_world, srun_mpi_plugin

    ap = argparse.ArgumentParser(prog="python -m essa_mpi launch-check", description=main.__doc__)
    ap.add_argument("--srun-mpi", action="store_true", help="print the srun --mpi plugin for the loaded MPI (no MPI)")
    args = ap.parse_args(argv)
    if args.srun_mpi:
        print(srun_mpi_plugin(library_version()))
        return 0
    comm = Comm()
    print(f"rank {comm.rank} of {comm.size} on {os.uname().nodename} "
          f"(local {comm.local_rank} of {comm.local_size}): {' '.join(comm.library.split())[:60]}", flush=True)
    try:
        check_world(os.environ, comm.size, comm.library)
    except ValueError as exc:
        print(f"essa_mpi: error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
