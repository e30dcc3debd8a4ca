import os
import shutil
import subprocess
import sys

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


def state_at(generation, popsize=4):
    rng = np.random.default_rng(generation)
    return checkpoint.RunState(
        generation=generation, data_cursor=8 * generation, config_yaml=f"search:\n  popsize: {popsize}\n",
        seeds=rng.integers(0, 2**32, (generation, popsize), dtype=np.uint32),
        rewards=rng.random((generation, popsize), dtype=np.float32),
        cma={"mean": rng.random(3), "sigma": np.float64(0.2), "C": np.eye(3)}, fingerprint=generation,
        identity={"model": "abc"})


def test_previous_checkpoint_is_kept_and_no_temp_file_left(tmp_path):
    path = str(tmp_path / checkpoint.FILENAME)
    for g in (1, 2, 3):
        checkpoint.save(path, state_at(g))
    assert sorted(os.listdir(tmp_path)) == [checkpoint.FILENAME, checkpoint.PREVIOUS]
    assert checkpoint.load(path).generation == 3
    assert checkpoint.load(str(tmp_path / checkpoint.PREVIOUS)).generation == 2
    assert checkpoint.load(path).identity == {"model": "abc"}


def corrupt_truncate(path):
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def corrupt_flip(path):
    """Flip one byte inside the stored rewards (found by value, so the HDF5 structure stays readable)."""
    data = bytearray(open(path, "rb").read())
    target = checkpoint.load(path).rewards.tobytes()[:8]
    at = data.find(target)
    assert at > 0
    data[at] ^= 0x40
    open(path, "wb").write(bytes(data))


def corrupt_empty(path):
    open(path, "wb").close()


def corrupt_foreign(path):
    import h5py

    with h5py.File(path, "w") as f:
        f["weights"] = np.zeros(3)


def corrupt_edit_config(path):
    import h5py

    with h5py.File(path, "r+") as f:
        f.attrs["config"] = "search:\n  popsize: 8\n"


@pytest.mark.parametrize("damage,message", [
    (corrupt_truncate, "not a readable ESSA checkpoint"), (corrupt_flip, "fails its checksum"),
    (corrupt_empty, "not a readable ESSA checkpoint"), (corrupt_foreign, "not a readable ESSA checkpoint"),
    (corrupt_edit_config, "fails its checksum")])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage, message):
    path = str(tmp_path / checkpoint.FILENAME)
    checkpoint.save(path, state_at(2))
    checkpoint.save(path, state_at(3))
    damage(path)
    with pytest.raises(ValueError, match=message) as err:
        checkpoint.load(path)
    assert "\n" not in str(err.value)
    state, note = checkpoint.load_latest(str(tmp_path))
    assert state.generation == 2 and message in note and checkpoint.PREVIOUS in note


def test_damaged_checkpoint_without_previous_is_one_clear_error(tmp_path):
    path = str(tmp_path / checkpoint.FILENAME)
    checkpoint.save(path, state_at(1))
    corrupt_truncate(path)
    with pytest.raises(ValueError, match="truncated, corrupt or from another program"):
        checkpoint.load_latest(str(tmp_path))


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs (needs root, as in CI); skipped elsewhere."""
    from conftest import tmpfs

    with tmpfs(tmp_path / "disk", "size=64k") as mnt:
        yield mnt


def test_disk_full_keeps_previous_and_leaves_no_temp_file(tiny_disk):
    path = str(tiny_disk / checkpoint.FILENAME)
    checkpoint.save(path, state_at(1))
    big = state_at(2)
    big.cma["C"] = np.eye(120)  # 115 KB: more than the disk holds
    kept = r"No space left on device; the previous checkpoint \(if any\) is kept"
    with pytest.raises(checkpoint.CheckpointWriteError, match=kept):
        checkpoint.save(path, big)
    assert sorted(os.listdir(tiny_disk)) == [checkpoint.FILENAME]
    assert checkpoint.load(path).generation == 1


def test_dense_gguf_copies_go_to_a_private_per_user_cache(tmp_path, monkeypatch):
    from essa_mpi.model import dense_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    root = dense_cache_dir()
    assert root == str(tmp_path / "essa_mpi" / "dense") and os.stat(root).st_mode & 0o777 == 0o700
    os.chmod(root, 0o777)  # loosened by someone: tightened again before use
    assert os.stat(dense_cache_dir()).st_mode & 0o777 == 0o700


@pytest.mark.skipif(not shutil.which("strace"), reason="needs strace (fault injection)")
def test_checkpoints_are_written_and_read_where_file_locks_fail(tmp_path):
    """NFS without a lock daemon: every flock lock fails with ENOLCK (injected by strace). h5py's default
    open fails there (checked first, so this test can fail); checkpoint.save and load do not lock at all."""
    inject = ["strace", "-f", "-qq", "-o", os.devnull, "-e", "trace=flock", "-e", "inject=flock:error=ENOLCK",
              sys.executable, "-c"]  # (HDF5 locks with flock; Python itself needs fcntl, so that stays)
    path = str(tmp_path / checkpoint.FILENAME)
    env = {k: v for k, v in os.environ.items() if k != "HDF5_USE_FILE_LOCKING"}  # (importing checkpoint sets it)
    plain = subprocess.run(inject + [f"import h5py; h5py.File({path!r}, 'w').close()"], capture_output=True, text=True,
                           env=env)
    assert plain.returncode != 0 and "unable to lock file" in plain.stderr, plain.stderr[-500:]
    code = f"""
import numpy as np
from essa_mpi import checkpoint
s = checkpoint.RunState(generation=1, data_cursor=3, config_yaml="x: 1", seeds=np.ones((1, 2), np.uint32),
                        rewards=np.ones((1, 2), np.float32), cma={{"mean": np.zeros(3)}}, fingerprint=5)
checkpoint.save({path!r}, s)
checkpoint.save({path!r}, s)  # the second keeps the first as checkpoint.prev.h5
print(checkpoint.load_latest({os.path.dirname(path)!r})[0].generation)
"""
    res = subprocess.run(inject + [code], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "1", res.stderr[-2000:]


def test_a_write_failure_names_its_cause_not_always_a_full_disk():
    """An output directory made read-only mid-run used to read "Free space (disk full or quota?)"."""
    import errno

    from essa_mpi.checkpoint import write_failed

    said = {code: str(write_failed("r/checkpoint.h5", OSError(code, os.strerror(code), "r/checkpoint.h5.tmp"), "r"))
            for code in (errno.EACCES, errno.EROFS, errno.ENOSPC)}
    assert "No permission to write r/checkpoint.h5.tmp: give the run back write permission on r" in said[errno.EACCES]
    assert "The filesystem of r/checkpoint.h5.tmp is read-only now: remount it writable" in said[errno.EROFS]
    assert "Free space (disk full or quota?), then --resume r." in said[errno.ENOSPC]
    assert all("Free space" not in said[c] for c in (errno.EACCES, errno.EROFS))
