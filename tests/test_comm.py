import numpy as np
import pytest

from essa_mpi.comm import RECORD, split_counts


def test_record_is_eight_bytes():
    assert RECORD.itemsize == 8
    rec = np.zeros(3, RECORD)
    assert rec.view(np.uint8).nbytes == 24


@pytest.mark.parametrize("popsize,world", [(16, 2), (10, 3), (7, 7), (5, 1), (96, 128 // 2)])
def test_split_is_contiguous_and_balanced(popsize, world):
    counts = split_counts(popsize, world)
    assert sum(counts) == popsize and len(counts) == world
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)
