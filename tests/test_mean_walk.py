import os
import sys

import numpy as np
from test_cli_mpi import mpirun, tiny_args

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "experiments"))
from mean_walk import walk  # noqa: E402


def test_replay_of_a_real_run_is_exact_and_measures_the_mean_from_outside(tiny_dir, tmp_path):
    """A 4-generation run under mpiexec; the walk replays it to the checkpoint's fingerprint, and its last
    ratio equals the distance of the exported mean (read from the checkpoint file, not from the replay)."""
    import h5py

    out = tmp_path / "w"
    res = mpirun(2, tiny_args(tiny_dir, out, 4))
    assert res.returncode == 0, res.stderr[-2000:]
    w = walk(str(out))
    assert w["exact"] and len(w["ratio"]) == 4 and w["step_scale"] == "uniform"
    with h5py.File(out / "checkpoint.h5", "r") as f:
        mean = f["cma/mean"][()]  # [n]: the offsets from the start after generation 4
    assert np.isclose(w["ratio"][-1], np.linalg.norm(mean) / (1.0 * np.sqrt(len(mean))), rtol=2e-3)  # sigma0=1.0
    assert [g for g, _ in w["val"]] == [0, 2, 4]
