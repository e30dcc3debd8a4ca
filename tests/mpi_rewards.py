"""Reward functions for the MPI tests (importable by every rank through PYTHONPATH=tests)."""


def raises_on_long(completions, **_):
    if any(len(c) > 2 for c in completions):
        raise RuntimeError("boom: reward server unreachable")
    return [0.0] * len(completions)


def nan_for_some(completions, **_):
    """NaN for completions of odd length, else the alphanumeric fraction."""
    return [float("nan") if len(c) % 2 else sum(ch.isalnum() for ch in c) / max(len(c), 1) for c in completions]
