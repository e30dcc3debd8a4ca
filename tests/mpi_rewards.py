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


def hangs_on_rank_1(completions, **_):
    """Never returns on rank 1 (a reward server that stopped answering); alphanumeric fraction elsewhere."""
    import time

    while _rank() == 1:
        time.sleep(1)
    return [sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]


def slow_after_marker(completions, **_):
    """Sleeps 1 s per call once the file named by $ESSA_SLOW exists (lets a test stop a rank mid-run)."""
    import os
    import time

    if os.path.exists(os.environ.get("ESSA_SLOW", "/nonexistent")):
        time.sleep(1)
    return [sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]


def exits_process(completions, **_):
    import os

    os._exit(3)


def zero_one(completions, **_):
    """0/1 reward that is mostly 0 (flat generations are common): 1 when the completion has a digit."""
    return [float(any(ch.isdigit() for ch in c)) for c in completions]
