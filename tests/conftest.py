import contextlib
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_tiny  # noqa: E402

# The test command runs 2 xdist workers, a file at a time, in this order (--dist loadfile
# --no-loadscope-reorder): the longest files first, so no worker is left alone with one at the end. Much of
# their time is waiting (SLURM's time-limit warning, stall deadlines, subprocess start-up), which the other
# worker's tests fill.
FIRST = ("test_slurm.py", "test_faults.py", "test_cli_mpi.py", "test_reliability.py", "test_vllm_engine.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))


@contextlib.contextmanager
def tmpfs(path, options: str):
    """A tmpfs mounted at path (created) with mount options such as "size=24k" or "ro": a full disk or a
    read-only filesystem for a test. Needs root, as in CI; skipped elsewhere."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def uninterrupted6(tiny_dir, tmp_path_factory):
    """The output directory of one uninterrupted 6-generation tiny run on 2 ranks (test_cli_mpi.tiny_args): the
    reference that killed, cut and resumed runs must equal. Shared by the tests that compare against it, which
    only read it."""
    from test_cli_mpi import mpirun, tiny_args

    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    res = mpirun(2, tiny_args(tiny_dir, out, 6))
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) loaded the way the run loads them."""
    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model

    return load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))
