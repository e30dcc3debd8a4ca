"""Reliability round 2 under a real mpiexec: user code that leaves the process, a read-only output directory,
the metrics log after kills at random points, and the warnings that replace silent choices."""

import json
import os
import random
import shutil
import signal
import subprocess
import time

import pytest
from conftest import tmpfs
from fault_rows import error_line, record
from test_cli_mpi import history, metrics, mpirun, tiny_args
from test_faults import ranks_gone, start, wait_for_generation

from essa_mpi import checkpoint


@pytest.mark.parametrize("fn, extra, says", [
    ("sys_exit_0", [], "called sys.exit(0)"),
    ("sys_exit_1_on_rank_1", ["run.stall_timeout_s=10"], "called sys.exit(1)"),
])
def test_reward_that_exits_fails_in_one_line(tiny_dir, tmp_path, fn, extra, says):
    """sys.exit inside a reward is a failure named after the function (exit 1, every rank ends at once, no rank
    reported as hung). A reward returning None or strings is named likewise: test_tasks.py checks each such
    return in process, test_debug_keeps_the_traceback one of them end to end."""
    out = tmp_path / "run"
    t = time.time()
    res = mpirun(2, tiny_args(tiny_dir, out) + [f"task.reward_fn=mpi_rewards:{fn}", *extra], timeout=120)
    seconds = time.time() - t
    record("fault", f"reward {fn}", res.returncode, seconds, error_line(res.stderr), "nothing (before generation 1)")
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"reward function {fn} {says}" in error_line(res.stderr), res.stderr[-2000:]
    assert "Traceback" not in res.stderr and "did not arrive" not in res.stderr, res.stderr[-2000:]
    assert seconds < 60 and ranks_gone(str(out))


def test_debug_keeps_the_traceback(tiny_dir, tmp_path):
    res = mpirun(2, tiny_args(tiny_dir, tmp_path / "run") + ["task.reward_fn=mpi_rewards:returns_none", "--debug"])
    assert res.returncode == 1 and "Traceback" in res.stderr, res.stderr[-2000:]
    assert "reward function returns_none returned NoneType None; it must return a list" in res.stderr


def test_read_only_output_dir_is_one_line_on_every_rank(tiny_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "ro,size=64k") as ro:
        t = time.time()
        res = mpirun(2, tiny_args(tiny_dir, ro / "run") + ["run.stall_timeout_s=10"], timeout=60)
        record("corpus", "output_dir on a read-only filesystem", res.returncode, time.time() - t,
               error_line(res.stderr))
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(lines) == 1, res.stderr[-2000:]
        assert f"run.output_dir='{ro}/run' cannot be created in '{ro}' (read-only)" in lines[0]


def test_an_output_directory_made_read_only_mid_run_is_named(tiny_dir, tmp_path):
    """The filesystem under run.output_dir remounted read-only after generation 1 (as root, chmod would not stop
    the writes): the line names the read-only filesystem and the path, where it used to blame a full disk; the
    checkpoint already written stays readable."""
    with tmpfs(tmp_path / "disk", "size=64m") as disk:
        out = disk / "run"
        proc = start(tiny_args(tiny_dir, out, 400) + ["run.stall_timeout_s=20"])
        wait_for_generation(out, 1, proc)
        t = time.time()
        while subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode:
            assert time.time() < t + 30 and proc.poll() is None, "could not remount read-only mid-run"
            time.sleep(0.02)  # busy while a rank has a file open for writing
        _, err = proc.communicate(timeout=120)
        record("fault", "output filesystem remounted read-only mid-run", proc.returncode, time.time() - t,
               error_line(err), "the last checkpoint")
        assert proc.returncode == 1 and "Traceback" not in err, err[-2000:]
        assert "is read-only now: remount it writable" in error_line(err) and str(out) in error_line(err), err[-2000:]
        assert "Free space" not in err and history(str(out)).generation >= 1
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)


def test_resume_from_the_previous_checkpoint_when_the_latest_is_gone(tmp_path, uninterrupted6):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted6, out)  # a finished 6-generation run (a copy: the fixture is shared)
    os.remove(out / checkpoint.FILENAME)
    res = mpirun(2, ["--resume", str(out), "run.generations=7"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{out}/{checkpoint.FILENAME} is missing; resuming from" in res.stderr and "(generation 5)" in res.stderr
    assert history(str(out)).generation == 7
    assert [m["generation"] for m in metrics(str(out)) if "reward_mean" in m] == [1, 2, 3, 4, 5, 6, 7]


def test_warnings_replace_silent_choices(tiny_dir, tmp_path):
    """A validation set smaller than task.val_size, a key given twice, a prompt cut to fit: one line each."""
    data, val = tmp_path / "d.jsonl", tmp_path / "v.jsonl"
    data.write_text("".join(json.dumps({"prompt": ("word " * 400) if i == 5 else f"p{i}"}) + "\n" for i in range(30)))
    val.write_text("".join(json.dumps({"prompt": f"v{i}"}) + "\n" for i in range(2)))
    args = tiny_args(tiny_dir, tmp_path / "run", 1) + [
        "task.name=custom", f"task.dataset={data}", f"task.val_dataset={val}",
        "task.reward_fn=mpi_rewards:nan_for_some", "task.long_prompts=truncate", "search.sigma0=0.5"]
    res = mpirun(2, args)
    assert res.returncode == 0, res.stderr[-2000:]
    warned = [line for line in res.stderr.splitlines() if "WARNING" in line or "long_prompts" in line]
    assert warned == [
        "WARNING: task.name is given 2 times on the command line ('toy', 'custom'); using 'custom'; search.sigma0 is "
        "given 2 times on the command line ('1.0', '0.5'); using '0.5'.",
        "WARNING: task.val_size=4 but the validation data has 2 rows; validating on those 2 (set task.val_size=2 to "
        "silence this).",
        "task.long_prompts=truncate: cut 1 prompt(s) to fit the context of 256 tokens"], res.stderr[-3000:]


def test_empty_lock_file_is_stale(tmp_path):
    from essa_mpi import rundir

    (tmp_path / rundir.LOCK).write_text("")
    rundir.RunLock.acquire(str(tmp_path)).release()
    assert not (tmp_path / rundir.LOCK).exists()


KEYS = ("reward_mean", "reward_std", "reward_max", "sigma")


def log_records(out) -> dict:
    """{generation: (population numbers)} and {generation: val_reward}, asserting each appears once."""
    rows = metrics(str(out))  # json.loads of every line: a cut or damaged line fails here
    gens = [m["generation"] for m in rows if "reward_mean" in m]
    vals = [m["generation"] for m in rows if "val_reward" in m]
    assert len(gens) == len(set(gens)) and len(vals) == len(set(vals)), (gens, vals)
    return ({m["generation"]: tuple(m[k] for k in KEYS) for m in rows if "reward_mean" in m},
            {m["generation"]: m["val_reward"] for m in rows if "val_reward" in m})


@pytest.mark.parametrize("seed", [0, 1])  # each seed kills several times at random points (CI time: two)
def test_metrics_log_after_kills_at_random_points_equals_an_uninterrupted_run(tiny_dir, tmp_path, seed,
                                                                              uninterrupted6):
    """Run, kill (SIGKILL of every process, or SIGTERM) at a random point, cut the log's last line as a crash
    mid-append would, resume; repeat; the log then parses line by line and holds every generation exactly
    once, with the numbers of an uninterrupted run."""
    n, rng, ref = 6, random.Random(seed), uninterrupted6
    out = tmp_path / "killed"
    args = tiny_args(tiny_dir, out, n)
    for _ in range(2):  # two kills, then a resume to the end
        proc = start(args)
        wait_for_generation(out, rng.randint(1, n - 1), proc)
        time.sleep(rng.uniform(0, 0.6))  # into validation, the next generation, the checkpoint or the log
        os.killpg(proc.pid, rng.choice([signal.SIGKILL, signal.SIGTERM]))
        proc.communicate(timeout=60)
        if rng.random() < 0.5:
            with open(out / "metrics.jsonl", "a") as fh:
                fh.write('{"generation": 99, "reward_me')  # a line cut by a crash or a full disk
        args = ["--resume", str(out)]
    res = mpirun(2, args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert log_records(out) == log_records(ref)


def test_a_reward_that_uses_a_multiprocessing_pool_runs_as_without_it(tiny_dir, tmp_path):
    """The workers a reward forks exit as they would without essa_mpi (the os._exit guard is the rank's own, by
    pid; the rank's signal handling is not inherited): the same rewards and adapter as the plain reward, exit 0,
    no error line, no wait at exit, no process of the job left; and none left when the job aborts."""
    runs, seconds = {}, {}
    for fn in ("alnum", "alnum_pool"):
        t = time.time()
        res = mpirun(2, tiny_args(tiny_dir, tmp_path / fn) + [f"task.reward_fn=mpi_rewards:{fn}"], timeout=180)
        seconds[fn] = time.time() - t
        assert res.returncode == 0 and "error" not in res.stderr, res.stderr[-2000:]
        assert ranks_gone(str(tmp_path / fn), within_s=1.0), "a pool worker outlived the job"
        runs[fn] = history(str(tmp_path / fn))
    assert (runs["alnum"].rewards == runs["alnum_pool"].rewards).all() and len(set(runs["alnum"].rewards.flat)) > 3
    adapters = [(tmp_path / fn / "adapter" / "adapter_model.safetensors").read_bytes() for fn in runs]
    assert adapters[0] == adapters[1]
    assert seconds["alnum_pool"] < seconds["alnum"] + 15, seconds  # the old code waited ~44 s at exit
    record("fault", "reward on a multiprocessing.Pool(2)", 0, seconds["alnum_pool"], "(no line: a normal run)",
           f"the plain reward's rewards and adapter; {seconds['alnum']:.1f} s without the pool; no process left")
    t = time.time()
    res = mpirun(2, tiny_args(tiny_dir, tmp_path / "abort") + ["task.reward_fn=mpi_rewards:alnum_pool_then_raise",
                                                              "run.stall_timeout_s=20"], timeout=180)
    record("fault", "reward on a Pool(2) raises after the pool started", res.returncode, time.time() - t,
           error_line(res.stderr), "nothing (before generation 1); no process left")
    assert res.returncode != 0 and "boom after the pool started" in res.stderr, res.stderr[-2000:]
    assert ranks_gone(str(tmp_path / "abort")), "a pool worker outlived the aborted job"
