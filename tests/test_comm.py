import numpy as np
import pytest

from essa_mpi.comm import RECORD


def test_record_is_eight_bytes():
    assert RECORD.itemsize == 8
    rec = np.zeros(3, RECORD)
    assert rec.view(np.uint8).nbytes == 24


def test_exchange_carries_records_fingerprint_and_seconds_in_one_call():
    """One-rank world (no mpiexec): what goes in comes back, the 64-bit fingerprint bit-exact."""
    from essa_mpi.comm import Comm

    comm = Comm()
    local = np.zeros(3, RECORD)
    local["seed"], local["reward"] = [7, 8, 2**32 - 1], [0.5, -1.0, np.nan]
    records, fps, seconds = comm.exchange(local, [3], 2**64 - 12345, 1.25)
    assert records.tobytes() == local.tobytes() and fps.tolist() == [2**64 - 12345] and seconds.tolist() == [1.25]
    assert comm.bytes_sent == 3 * 8 + 16


def test_first_error_shares_any_failure_not_only_bad_input():
    """A filesystem error or a bug before the first collective must reach every rank too (no rank left waiting):
    bad input is Refused (exit 2), anything else Refused with unexpected=True (exit 1)."""

    from essa_mpi.comm import Comm, Refused, first_error

    comm = Comm()

    def fails(exc):
        raise exc

    with pytest.raises(Refused) as bad:
        first_error(comm, lambda: fails(ValueError("task.batch_size=0 must be >= 1.")))
    assert not bad.value.unexpected and str(bad.value) == "task.batch_size=0 must be >= 1."
    with pytest.raises(Refused) as other:
        first_error(comm, lambda: fails(NotADirectoryError(20, "Not a directory", "runs/x/run.lock")))
    assert other.value.unexpected and "NotADirectoryError" in str(other.value) and "runs/x/run.lock" in str(other.value)
    assert first_error(comm, lambda: 7) == 7
