import os

import numpy as np
import pytest

from essa_mpi import checkpoint


def test_roundtrip_without_pickle(tmp_path):
    path = str(tmp_path / checkpoint.FILENAME)
    state = checkpoint.RunState(
        generation=2, data_cursor=64, config_yaml="search:\n  popsize: 4\n",
        seeds=np.array([[1, 2, 3, 4], [5, 6, 7, 2**32 - 1]], np.uint32),
        rewards=np.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.6, 0.7, 0.8]], np.float32),
        cma={"mean": np.arange(3.0), "sigma": np.float64(0.2), "C": np.eye(3)}, fingerprint=2**63 + 5,
        best=np.ones(3), best_reward=0.8)
    checkpoint.save(path, state)
    assert not os.path.exists(path + ".tmp")
    back = checkpoint.load(path)
    assert back.generation == 2 and back.data_cursor == 64 and back.fingerprint == 2**63 + 5
    assert np.array_equal(back.seeds, state.seeds) and back.seeds.dtype == np.uint32
    assert np.array_equal(back.rewards, state.rewards)
    assert np.array_equal(back.cma["C"], np.eye(3)) and back.best_reward == pytest.approx(0.8)
    assert back.config_yaml == state.config_yaml


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--resume takes the run's output_dir"):
        checkpoint.load(str(tmp_path / checkpoint.FILENAME))
