"""jobs/essa.sbatch and srun against a real SLURM (slurmctld + slurmd; ``tools/slurm_local.sh up`` makes one).

Skipped where ``sbatch`` is absent. CI (.ci/run) brings the single-node cluster up before the tests.
"""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from test_cli_mpi import ENV, history, mpirun, tiny_args

from essa_mpi import checkpoint

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None,
                                reason="sbatch not found: no SLURM here (run tools/slurm_local.sh up as root)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATIONS = 20  # long enough that a requeue at generation 2 lands mid-run
CPU_NODE = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]  # the CPU-node command line


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def submit(out, tiny_dir, generations=GENERATIONS) -> str:
    cmd = ["sbatch", "--parsable", *CPU_NODE, f"--chdir={REPO}", f"--output={out}.log", "jobs/essa.sbatch",
           "jobs/smollm2_arithmetic.yaml", *tiny_args(tiny_dir, out, generations)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def wait_done(job: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while squeue_state(job) not in ("", "COMPLETED"):
        assert time.time() < deadline, f"job {job} still {squeue_state(job)} after {timeout} s"
        time.sleep(0.5)


def generation(out) -> int:
    try:
        return history(str(out)).generation
    except Exception:  # not written yet, or mid-rename
        return -1


def requeue_mid_run(job: str, out) -> int:
    """Requeue once the run has checkpointed generation 2; release the requeue hold (SLURM holds a requeued
    job ~2 minutes, reason BeginTime) with StartTime=now. → the generation the first attempt reached."""
    deadline = time.time() + 300
    while generation(out) < 2:
        assert time.time() < deadline and squeue_state(job) != "", "the job never reached generation 2"
        time.sleep(0.1)
    subprocess.run(["scontrol", "requeue", job], check=True)
    requeued_at = time.time()
    stopped_at = generation(out)
    while squeue_state(job) != "PENDING":
        assert time.time() < deadline, f"requeued job {job} is {squeue_state(job)}, never PENDING"
        time.sleep(0.2)
    # Credentials revoked by the requeue are compared in whole seconds: a restart within the same second
    # was killed ("Killing non-startable batch JobId=61: Job credential revoked", slurmctld 22.05, a CI run).
    time.sleep(max(0.0, requeued_at + 2.0 - time.time()))
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    return stopped_at


@pytest.fixture(scope="module")
def jobs(tiny_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    full, requeued = base / "full", base / "requeued"
    a, b = submit(full, tiny_dir), submit(requeued, tiny_dir)
    stopped_at = requeue_mid_run(b, requeued)
    wait_done(a), wait_done(b)
    ref = base / "mpiexec"
    res = mpirun(2, tiny_args(tiny_dir, ref, GENERATIONS))
    assert res.returncode == 0, res.stderr[-3000:]
    return {"full": full, "requeued": requeued, "mpiexec": ref, "stopped_at": stopped_at}


def log(out) -> str:
    with open(f"{out}.log") as fh:
        return fh.read()


def same_run(x, y) -> None:
    a, b = history(str(x)), history(str(y))
    assert a.generation == b.generation == GENERATIONS
    assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.rewards, b.rewards)
    for key in a.cma:
        assert np.array_equal(a.cma[key], b.cma[key]), key
    assert a.fingerprint == b.fingerprint


def test_sbatch_forms_one_world_of_two_ranks(jobs):
    text = log(jobs["full"])
    assert "ESSA: 2 ranks" in text and "srun --mpi=pmi2" in text, text[-3000:]
    assert os.path.isfile(os.path.join(jobs["full"], "adapter", "adapter_model.safetensors"))


def test_sbatch_records_equal_mpiexec(jobs):
    same_run(jobs["full"], jobs["mpiexec"])


def test_requeued_job_resumes_bit_identically(jobs):
    assert 2 <= jobs["stopped_at"] < GENERATIONS, "the requeue must land mid-run"
    text = log(jobs["requeued"])
    assert "attempt 1 " in text and "attempt 2 " in text, "the log of the first attempt was lost"
    same_run(jobs["requeued"], jobs["full"])
    with open(os.path.join(jobs["full"], "adapter", "adapter_model.safetensors"), "rb") as x, \
            open(os.path.join(jobs["requeued"], "adapter", "adapter_model.safetensors"), "rb") as y:
        assert x.read() == y.read()


def test_srun_without_pmi_stops_every_process(tiny_dir, tmp_path):
    """srun --mpi=none: two one-rank worlds. Each process must stop with one line, before loading the model."""
    cmd = ["srun", "--mpi=none", "-n", "2", sys.executable, "-m", "essa_mpi", *tiny_args(tiny_dir, tmp_path / "x")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("essa_mpi: error:")]
    assert len(lines) == 2 and all("SLURM_STEP_NUM_TASKS=2" in x and "--mpi=pmi2" in x for x in lines), res.stderr
    assert "Traceback" not in res.stderr and "solution_length" not in res.stdout
    assert not os.path.exists(tmp_path / "x" / checkpoint.FILENAME)
