"""jobs/essa.sbatch and srun against a real SLURM of 2 simulated nodes (``tools/slurm_local.sh up --nodes 2``).

Skipped where ``sbatch`` is absent; CI (.ci/run) brings the cluster up before the tests. Every job of the module
is submitted at once (``cluster``) and runs side by side; each test reads one job's directory and log. The tiny
run has an SFT warm start, validation and an export, so a job can be cut at every stage (essa_mpi/stages.py).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_cli_mpi import ENV, history, mpirun, tiny_args

from essa_mpi import checkpoint

pytestmark = pytest.mark.skipif(shutil.which("sbatch") is None,
                                reason="sbatch not found: no SLURM here (run tools/slurm_local.sh up as root)")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GENERATIONS = 4  # validations at 0, 2 and 4 (task.val_every=2): "validation 4" is the last
CPU = ["--gpus-per-node=0", "--cpus-per-task=1"]
TWO_NODES = ["--nodes=2", "--ntasks-per-node=2", *CPU]  # the command line: 4 ranks, 2 per node
# every stage of a run, in the order a run meets them: the requeued job is cut once at each
REQUEUE_AT = ["start", "sft", "load", "base validation", "generation 2", "checkpoint 3", "validation 4", "export"]


def job_args(tiny_dir, out):
    """The tiny run with an SFT warm start of its own (sft.output_dir beside the run: no job shares it)."""
    return [a for a in tiny_args(tiny_dir, out, GENERATIONS) if a != "adapter.warm_start=none"] + [
        "adapter.warm_start=sft", f"sft.output_dir={out}_sft"]


def squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def submit(out, tiny_dir, options, env=None) -> str:
    cmd = ["sbatch", "--parsable", *options, f"--chdir={REPO}", f"--output={out}.log", "jobs/essa.sbatch",
           "jobs/smollm2_arithmetic.yaml", *job_args(tiny_dir, out)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0]


def wait_done(job: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while squeue_state(job) not in ("", "COMPLETED", "FAILED"):
        assert time.time() < deadline, f"job {job} still {squeue_state(job)} after {timeout} s"
        time.sleep(0.5)


def release(job: str, requeued_at: float, limit: float = 120) -> None:
    """A requeued job waits ~2 minutes (reason BeginTime): start it now. Credentials revoked by the requeue are
    compared in whole seconds: a restart within the same second was killed ("Job credential revoked",
    slurmctld 22.05), so not before 2 s."""
    deadline = time.time() + limit
    while squeue_state(job) != "PENDING":
        assert time.time() < deadline, f"requeued job {job} is {squeue_state(job)}, never PENDING"
        time.sleep(0.2)
    time.sleep(max(0.0, requeued_at + 2.0 - time.time()))
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)


def held(log, name: str) -> bool:
    return os.path.exists(log) and f"hold {name}" in open(log).read().splitlines()


def wait_held(log, name: str, job: str, limit: float = 300) -> None:
    deadline = time.time() + limit
    while not held(log, name):
        assert time.time() < deadline and squeue_state(job) not in ("", "FAILED"), f"job {job} never held at {name}"
        time.sleep(0.2)


def requeue_at_every_stage(job: str, log) -> list:
    """scontrol requeue each time rank 0 holds at the next stage of REQUEUE_AT. → [(stage, seconds to restart)]."""
    cuts = []
    for stage in REQUEUE_AT:
        wait_held(log, stage, job)
        t = time.time()
        subprocess.run(["scontrol", "requeue", job], check=True)
        release(job, t)
        cuts.append((stage, round(time.time() - t, 1)))
    return cuts


def release_time_limit_requeue(job: str, out, limit: float = 600) -> None:
    """The job requeues itself after the time-limit warning: release its BeginTime hold once it is pending."""
    deadline = time.time() + limit
    while "== requeued:" not in (read(f"{out}.log") if os.path.exists(f"{out}.log") else ""):
        assert time.time() < deadline and squeue_state(job) not in ("", "FAILED", "COMPLETED"), read(f"{out}.log")
        time.sleep(0.5)
    release(job, time.time())  # the script requeues right after its line: release waits 2 s from here


def rank_pid(job: str, rank: int) -> int:
    """PID of the python process of SLURM task ``rank`` of job (found through /proc/PID/environ)."""
    want = {f"SLURM_JOB_ID={job}".encode(), f"SLURM_PROCID={rank}".encode()}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = set(fh.read().split(b"\0"))
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if want <= env and b"essa_mpi" in cmd and b"python" in cmd:
            return int(pid)
    raise AssertionError(f"rank {rank} of job {job} not found")


@pytest.fixture(scope="module")
def cluster(tiny_dir, tmp_path_factory):
    """Every job at once: two nodes uninterrupted; requeued at every stage; a time limit that requeues itself;
    one that makes no progress; a rank SIGKILLed mid-run (then the same command again). The references are
    mpiexec -n 4 and -n 2 on this host (the SFT's gradient sum follows the rank count, to float rounding)."""
    base = tmp_path_factory.mktemp("slurm")
    out = {k: base / k for k in ("two_nodes", "requeued", "time_limit", "no_progress", "killed", "mpiexec",
                                 "mpiexec2")}
    logs = {k: base / f"{k}.stages" for k in out}

    def staged(name, hold):
        return {**ENV, "ESSA_STAGE_LOG": str(logs[name]), "ESSA_STAGE_HOLD": hold}

    jobs = {"two_nodes": submit(out["two_nodes"], tiny_dir, TWO_NODES),
            "requeued": submit(out["requeued"], tiny_dir, ["--nodes=2", "--ntasks-per-node=1", *CPU],
                               staged("requeued", ",".join(REQUEUE_AT))),
            # SLURM sends the warning 0-30 s before --signal's time (its time-limit check runs every 30 s): with
            # 4 minutes and @60, 150-180 s into the job, long after generation 2's checkpoint
            "time_limit": submit(out["time_limit"], tiny_dir, ["--nodes=2", "--ntasks-per-node=1", "--time=4",
                                                               "--signal=B:USR1@60", *CPU],
                                 staged("time_limit", "generation 3")),
            "no_progress": submit(out["no_progress"], tiny_dir, ["--nodes=1", "--ntasks-per-node=2", "--time=2",
                                                                 "--signal=B:USR1@60", *CPU],
                                  staged("no_progress", "start*")),
            "killed": submit(out["killed"], tiny_dir, TWO_NODES, staged("killed", "generation 2"))}
    found, failed = {}, []

    def kill_rank_3():
        wait_held(logs["killed"], "generation 2", jobs["killed"])
        os.kill(rank_pid(jobs["killed"], 3), signal.SIGKILL)

    def watch(name, fn, *args):  # a watcher's failure fails the fixture (a thread's exception is otherwise lost)
        def body():
            try:
                found[name] = fn(*args)
            except BaseException as exc:  # reported below
                failed.append(f"{name}: {exc!r}")
        return threading.Thread(target=body)

    watchers = [watch("cuts", requeue_at_every_stage, jobs["requeued"], logs["requeued"]),
                watch("time_limit", release_time_limit_requeue, jobs["time_limit"], out["time_limit"]),
                watch("killed", kill_rank_3)]
    for w in watchers:
        w.start()
    for n, ref in ((4, "mpiexec"), (2, "mpiexec2")):  # every rank trains a share of the SFT: per rank count
        res = mpirun(n, job_args(tiny_dir, out[ref]), timeout=600)
        assert res.returncode == 0, res.stderr[-3000:]
    for w in watchers:
        w.join(timeout=900)
    for job in jobs.values():
        wait_done(job)
    assert not failed, failed
    again = submit(out["killed"], tiny_dir, TWO_NODES, staged("killed", "generation 2"))  # the same command
    wait_done(again)
    return {"out": out, "jobs": jobs, "cuts": found.get("cuts"), "logs": logs}


def read(path) -> str:
    with open(path) as fh:
        return fh.read()


def deterministic(out) -> list:
    """metrics.jsonl without times, memory and hosts: what two runs of one config must share."""
    keep = ("generation", "reward_mean", "reward_std", "reward_max", "sigma", "val_reward", "val_base_reward")
    rows = [json.loads(line) for line in read(os.path.join(out, "metrics.jsonl")).splitlines()]
    return [{k: r[k] for k in keep if k in r} for r in rows if "reward_mean" in r or "val_reward" in r]


def same_run(x, y) -> None:
    """x (a job's directory, its log at x.log) ran as y did; a failure shows the log's last lines."""
    log = f"{x}.log"
    tail = read(log)[-4000:] if os.path.exists(log) else f"(no log at {log})"
    assert os.path.isfile(os.path.join(x, "adapter", "adapter_model.safetensors")), tail
    a, b = history(str(x)), history(str(y))
    assert a.generation == b.generation == GENERATIONS
    assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.rewards, b.rewards) and a.fingerprint == b.fingerprint
    for name in ("best_adapter", "adapter"):
        assert read_bytes(x, name) == read_bytes(y, name), name
    assert deterministic(x) == deterministic(y)


def read_bytes(out, name) -> bytes:
    with open(os.path.join(out, name, "adapter_model.safetensors"), "rb") as fh:
        return fh.read()


def test_two_nodes_form_one_world_equal_to_mpiexec(cluster):
    out = cluster["out"]["two_nodes"]
    text = read(f"{out}.log")
    assert "ESSA: 4 ranks" in text and "on 2 node(s)" in text and "srun --mpi=pmi2" in text, text[-3000:]
    assert "0: hosts: ranks 0-1 on" in text, "every line carries its rank (srun --label)"
    summary = json.loads(read(os.path.join(out, "summary.json")))
    nodes = [h.split("(")[-1].rstrip(")") for h in summary["hosts"]]
    assert nodes == ["n1", "n1", "n2", "n2"], summary["hosts"]
    rows = [json.loads(line) for line in read(os.path.join(out, "metrics.jsonl")).splitlines()]
    slowest = [r for r in rows if "slowest_rank" in r]
    assert len(slowest) == GENERATIONS and all(r["slowest_host"] == summary["hosts"][r["slowest_rank"]]
                                               for r in slowest)
    same_run(out, cluster["out"]["mpiexec"])


def test_a_job_requeued_at_every_stage_ends_as_an_uninterrupted_run(cluster):
    out = cluster["out"]["requeued"]
    assert [c[0] for c in cluster["cuts"]] == REQUEUE_AT, cluster["cuts"]
    text = read(f"{out}.log")
    assert all(f"attempt {k} " in text for k in range(1, len(REQUEUE_AT) + 2)), "an attempt's log was lost"
    same_run(out, cluster["out"]["mpiexec2"])


def test_a_time_limit_requeues_the_job_which_then_ends_as_an_uninterrupted_run(cluster):
    out = cluster["out"]["time_limit"]
    text = read(f"{out}.log")
    assert "== time limit near" in text and "stopped for the time limit (SIGUSR1" in text, text[-3000:]
    assert "== requeued: progress -1/0 -> 2/1" in text and "attempt 2 " in text, text[-3000:]
    same_run(out, cluster["out"]["mpiexec2"])


def test_a_time_limited_job_without_progress_stops_with_its_line(cluster):
    out, job = cluster["out"]["no_progress"], cluster["jobs"]["no_progress"]
    text = read(f"{out}.log")
    assert "essa_mpi: the time limit ended attempt 1 before it checkpointed a generation or finished a stage" in text
    assert "attempt 2 " not in text and not os.path.exists(os.path.join(out, checkpoint.FILENAME))
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobState=FAILED" in state and "Restarts=0" in state, state


def test_a_killed_rank_is_named_and_the_same_command_resumes(cluster):
    out = cluster["out"]["killed"]
    text = read(f"{out}.log")
    line = next((x for x in text.splitlines() if x.startswith("essa_mpi: rank 3 on n2 was killed by SIGKILL")), "")
    assert "(out of memory?" in line and f"the last checkpoint in {out} is kept" in line, text[-3000:]
    assert "resume" in text.split("attempt 1 ")[-1] or "--resume" in line
    same_run(out, cluster["out"]["mpiexec"])


def test_srun_without_pmi_stops_every_process(tiny_dir, tmp_path):
    """srun --mpi=none: two one-rank worlds. Each process must stop with one line, before loading the model."""
    cmd = ["srun", "--mpi=none", "-n", "2", sys.executable, "-m", "essa_mpi", *tiny_args(tiny_dir, tmp_path / "x")]
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
    assert res.returncode != 0
    lines = [line for line in res.stderr.splitlines() if line.startswith("essa_mpi: error:")]
    assert len(lines) == 2 and all("SLURM_STEP_NUM_TASKS=2" in x and "--mpi=pmi2" in x for x in lines), res.stderr
    assert "Traceback" not in res.stderr and "solution_length" not in res.stdout
    assert not os.path.exists(tmp_path / "x" / checkpoint.FILENAME)
