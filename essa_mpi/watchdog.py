"""Stop a run instead of letting it hang: deadlines on blocking work, clean exits on SIGINT and SIGTERM.

    configure(rank=comm.rank, stop=comm.abort)       # how a deadline or signal ends the job
    with deadline(60, lambda: "reward f did not return within 60 s"):
        f(...)                                       # past 60 s: one line on stderr, then stop(3)
    install_signal_handlers(lambda: "the last checkpoint is kept")   # SIGINT/SIGTERM: one line, exit
    with critical():                                 # a signal arriving here waits for the block's end
        checkpoint.save(...)

A deadline fires on a timer thread, so it stops work that never returns to Python (a C call, a frozen
peer in MPI) — by ending the process or the MPI job, not by raising: a hung call cannot be unwound.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

TIMEOUT_EXIT = 3  # exit status of a job stopped by a deadline (reward or stall timeout)
TIME_LIMIT_EXIT = 75  # SIGUSR1 (jobs/essa.sbatch's --signal before the time limit): stopped to be requeued
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
_guard = threading.Lock()  # critical() against the signal thread
_state = {"rank": None, "stop": None, "critical": 0, "pending": None, "on_exit": [], "describe": None}


def configure(rank: int, stop: Callable[[int], None] | None = None) -> None:
    """stop(code) ends the whole job (MPI Abort under mpiexec); default: this process, os._exit(code)."""
    _state.update(rank=rank, stop=stop)


def say(text: str) -> None:
    """One line on stderr, prefixed like every essa_mpi error, flushed before anything is killed."""
    sys.stderr.write(f"essa_mpi: error on rank {_state['rank'] or 0}: {text}\n")
    sys.stderr.flush()


def stop(code: int) -> None:
    """End the job: this rank's exit hooks (the run lock), a moment for the launcher to forward the line just
    said, then the stop hook (MPI Abort takes every rank down)."""
    _run_hooks()
    time.sleep(0.5)
    (_state["stop"] or os._exit)(code)
    os._exit(code)  # a stop hook that returned (no MPI) must still end this process


@contextlib.contextmanager
def deadline(seconds: float, message: Callable[[], str]):
    """Run the block; if it has not finished after ``seconds`` (0 = never), say message() (which may take
    a moment to find out more, e.g. which ranks are missing) and stop the job."""
    if not seconds:
        yield
        return

    def fire() -> None:
        say(message())
        stop(TIMEOUT_EXIT)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def adapted(configured_s: float, slowest_s: float, factor: float = 4.0, floor_s: float = 300.0) -> float:
    """The stall deadline once a generation has been measured: ``factor`` x the slowest generation (or
    validation) so far, never below min(configured, floor): a 20-minute generation of a 32B model is never
    cut, a 30-second one that stalls is caught in minutes. 0 (the watchdog off) stays 0.

    >>> adapted(1800, 1200), adapted(1800, 30), adapted(4, 0.5), adapted(0, 99)
    (4800.0, 300.0, 4.0, 0.0)
    """
    return float(max(min(configured_s, floor_s), factor * slowest_s)) if configured_s else 0.0


def on_exit(hook: Callable[[], None]) -> None:
    """Register cleanup run before a signal or a deadline ends the process (e.g. releasing the run lock)."""
    _state["on_exit"].append(hook)


def _run_hooks() -> None:
    for hook in _state["on_exit"]:
        with contextlib.suppress(Exception):
            hook()


def _exit_on(signum: int) -> None:
    _run_hooks()
    name = signal.Signals(signum).name
    if _state["rank"] is None:  # before configure(): MPI is still starting (the line __main__'s handler says)
        sys.stderr.write(f"essa_mpi: stopped by {name} while starting; nothing was written.\n")
        sys.stderr.flush()
        os._exit(128 + signum)
    tail = _state["describe"]() if _state["describe"] else ""
    why = "for the time limit (SIGUSR1 from sbatch --signal)" if signum == signal.SIGUSR1 else f"by {name}"
    sys.stderr.write(f"essa_mpi: rank {_state['rank']} stopped {why}{'; ' + tail if tail else ''}\n")
    sys.stderr.flush()
    os._exit(TIME_LIMIT_EXIT if signum == signal.SIGUSR1 else 128 + signum)


def _handle(signum: int) -> None:
    with _guard:
        if _state["critical"]:
            _state["pending"] = signum
            return
    _exit_on(signum)


def _listen(fd: int) -> None:
    """Helper thread: the C-level signal handler writes each signal number to the wakeup pipe at once,
    even while the main thread is blocked inside an MPI call (where Python handlers cannot run)."""
    while True:
        for signum in os.read(fd, 64):
            if signum in STOP_SIGNALS:
                _handle(signum)


def install_signal_handlers(describe: Callable[[], str] | None = None) -> None:
    """SIGINT and SIGTERM end this rank with one line (describe() says what was kept), exit 128+signum;
    no traceback, no half-written file. The launcher (mpiexec, srun) delivers them to every rank. SIGUSR1
    (the time limit is near: jobs/essa.sbatch) does the same with exit TIME_LIMIT_EXIT: the current generation
    is abandoned, the last checkpoint stays, and the batch script requeues the job. Main thread only
    (signal.set_wakeup_fd); calling it again only changes describe."""
    _state["describe"] = describe
    if _state.get("listening"):
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda *_: None)  # the Python-level handler does nothing: _listen acts
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_listen, args=(read,), daemon=True, name="essa-signals").start()
    _state["listening"] = True
    os.register_at_fork(after_in_child=_not_a_rank)


def _not_a_rank() -> None:
    """In a process the rank forks (a reward's multiprocessing Pool or Process, a daemon): none of the rank's
    signal handling. The wakeup pipe is the rank's (a SIGTERM to a pool worker would stop the rank), and the
    no-op handlers would make the worker ignore the SIGTERM that ends it (Pool.terminate waited, workers were
    left running). Default handlers, no exit hooks, and SIGTERM when the rank dies (Linux PR_SET_PDEATHSIG), so
    nothing of the job outlives an aborted rank."""
    with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    for sig in STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    _state.update(on_exit=[], listening=False, stop=None, describe=None)
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@contextlib.contextmanager
def critical():
    """Defer SIGINT/SIGTERM/SIGUSR1 until the block ends (a checkpoint write), then act on them."""
    with _guard:
        _state["critical"] += 1
    try:
        yield
    finally:
        with _guard:
            _state["critical"] -= 1
            pending = _state["pending"] if not _state["critical"] else None
        if pending is not None:
            _exit_on(pending)
