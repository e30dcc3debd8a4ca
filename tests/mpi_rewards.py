"""Reward functions for the MPI tests (importable by every rank through PYTHONPATH=tests)."""


def raises_on_long(completions, **_):
    if any(len(c) > 2 for c in completions):
        raise RuntimeError("boom: reward server unreachable")
    return [0.0] * len(completions)


def nan_for_some(completions, **_):
    """NaN for completions of odd length, else the alphanumeric fraction."""
    return [float("nan") if len(c) % 2 else sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]


def _rank() -> int:
    import os

    return int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))


def exits_process(completions, **_):
    import os

    os._exit(3)


def rare_one(completions, **_):
    """0/1 reward, 1 for about one completion in 20 (by a hash of its text): flat generations are common."""
    import zlib

    return [float(zlib.crc32(c.encode()) % 20 == 0) for c in completions]


def hangs_on_rank_1_after_marker(completions, **_):
    """Never returns on rank 1 once the file named by $ESSA_HANG exists; alphanumeric fraction otherwise."""
    import os
    import time

    while _rank() == 1 and os.path.exists(os.environ.get("ESSA_HANG", "/nonexistent")):
        time.sleep(1)
    return [sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]


def sys_exit_0(completions, **_):
    import sys

    sys.exit(0)


def sys_exit_1_on_rank_1(completions, **_):
    import sys

    if _rank() == 1:
        sys.exit(1)
    return [0.0] * len(completions)


def returns_none(completions, **_):
    return None


def constant(completions, **_):
    return [0.5] * len(completions)


def os_exit_0(completions, **_):
    import os

    os._exit(0)


def changes_cwd_and_sigterm(completions, **_):
    import os
    import signal

    os.chdir("/")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return [0.0] * len(completions)


def zero_d_array(completions, **_):
    import numpy as np

    return np.array(0.5)


def too_big(completions, **_):
    return [1e39] * len(completions)


def keyboard_interrupt(completions, **_):
    raise KeyboardInterrupt


def skewed(completions, **_):
    """Alphanumeric fraction; once the file named by $ESSA_SKEW_MARKER exists, rank r first sleeps the seconds
    $ESSA_SKEW gives it ("1:2,2:4,3:-1": rank 1 two seconds, rank 2 four, rank 3 for good): ranks that reach
    the record exchange far apart, and one that never does."""
    import os
    import time

    if os.path.exists(os.environ.get("ESSA_SKEW_MARKER", "/nonexistent")):
        delays = dict(item.split(":") for item in os.environ.get("ESSA_SKEW", "").split(",") if item)
        delay = float(delays.get(str(_rank()), 0))
        end = time.time() + (delay if delay >= 0 else 1e9)
        while time.time() < end:
            time.sleep(0.1)
    return [sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]


def counts_rows(completions, **_):
    """Alphanumeric fraction; appends how many completions it scored to $ESSA_ROWS.<rank> (rows counted from
    outside the evaluator: at the reward, the user's side of the boundary)."""
    import os

    with open(f"{os.environ['ESSA_ROWS']}.{_rank()}", "a") as fh:
        fh.write(f"{len(completions)}\n")
    return [sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]


def _alnum(c: str) -> float:
    return sum(ch.isalnum() for ch in c) / max(len(c), 1)


def alnum(completions, **_):
    """The alphanumeric fraction of each completion (the pool rewards' reference)."""
    return [_alnum(c) for c in completions]


_POOL = None


def alnum_pool(completions, **_):
    """alnum, computed by a multiprocessing.Pool(2) kept across calls (as a user caching a pool would), plus a
    daemon Process forked and joined each call."""
    import multiprocessing

    global _POOL
    if _POOL is None:
        _POOL = multiprocessing.get_context("fork").Pool(2)
    p = multiprocessing.get_context("fork").Process(target=_alnum, args=("x",), daemon=True)
    p.start()
    p.join()
    return _POOL.map(_alnum, completions)


def alnum_pool_then_raise(completions, **_):
    """alnum_pool, then on the second call rank 1 raises: the job aborts with the pool's workers alive."""
    global _CALLS
    _CALLS = globals().get("_CALLS", 0) + 1
    out = alnum_pool(completions)
    if _CALLS == 2 and _rank() == 1:
        raise RuntimeError("boom after the pool started")
    return out


def all_nan(completions, **_):
    return [float("nan")] * len(completions)
