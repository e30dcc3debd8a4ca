"""Faults and bad input under a real mpiexec: nothing hangs, nothing a user made is overwritten, a resume
never continues the wrong run and never refuses a valid one.

The bad-input corpus is ``tests/bad_inputs.py``; ``tools/checks/fault_table.py`` prints both tables with timings.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from bad_inputs import CASES, case_args, make_files
from conftest import tmpfs
from fault_rows import error_line, record
from test_cli_mpi import ENV, HERE, history, launch, metrics, mpirun, tiny_args

from essa_mpi import checkpoint


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    return make_files(str(tmp_path_factory.mktemp("bad")), tiny_dir)


def leftover_ranks(marker: str) -> list:
    """PIDs of processes whose command line mentions marker (a run's unique directory)."""
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    return [p for p in out if int(p) != os.getpid()]


def ranks_gone(marker: str, within_s: float = 5.0) -> bool:
    """No process of the run (its command line mentions marker) is left within_s seconds after mpiexec returned
    (a rank that MPI_Abort killed can take a moment to disappear)."""
    deadline = time.time() + within_s
    while leftover_ranks(marker):
        if time.time() > deadline:
            return False
        time.sleep(0.1)
    return True


def run_case(args: list, files: dict, timeout: int = 120) -> tuple:
    env = {**ENV, "PYTHONPATH": f"{HERE}:{files['root']}"}
    t = time.time()
    res = subprocess.run(launch(2, args), capture_output=True, text=True, timeout=timeout, env=env)
    return res, time.time() - t


REAL_PROCESS_CASES = ["YAML malformed", "resume missing", "dataset missing", "output_dir holds files",
                      "prompt longer than the context"]  # also as real processes: one line, no rank left


@pytest.fixture(scope="module")
def corpus(files, tiny_dir, tmp_path_factory):
    """Every case in one mpiexec -n 2 job (tests/corpus_driver.py): {case: exit, stdout, stderr, seconds}."""
    tmp = tmp_path_factory.mktemp("corpus")
    (tmp / "files.json").write_text(json.dumps(files))
    env = {**ENV, "PYTHONPATH": f"{HERE}:{files['root']}"}
    cmd = launch(2, [])[:-3] + [sys.executable, os.path.join(HERE, "corpus_driver.py"), str(tmp / "files.json"),
                                tiny_dir, str(tmp / "out"), str(tmp / "result.json")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((tmp / "result.json").read_text())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_corpus(case, files, corpus):
    got = corpus[case]
    lines = got["stderr"].strip().splitlines()
    record("corpus", case, got["exit"], got["seconds"], error_line(got["stderr"]))
    assert got["exit"] == 2, got["stderr"][-2000:]
    assert len(lines) == 1 and lines[0].startswith("essa_mpi: error: ") and CASES[case][1] in lines[0], got["stderr"]
    assert "solution_length" not in got["stdout"], "a model was loaded"
    if case == "output_dir holds files":
        assert open(os.path.join(files["root"], "has_files", "notes.txt")).read() == "my notes\n"


@pytest.mark.parametrize("case", REAL_PROCESS_CASES)
def test_bad_input_as_a_real_process(case, files, tiny_dir, tmp_path):
    make_args, fragment = CASES[case]
    out = tmp_path / "run"
    res, seconds = run_case(case_args(make_args(files), tiny_dir, str(out)), files)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("essa_mpi: error: ") and fragment in lines[0], res.stderr[-2000:]
    assert ranks_gone(str(out)), "a rank outlived mpiexec"


def start(args: list, env=None) -> subprocess.Popen:
    return subprocess.Popen(launch(2, args), env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def wait_for_generation(out, generation: int, proc: subprocess.Popen, limit: float = 120) -> None:
    deadline = time.time() + limit
    path = os.path.join(out, checkpoint.FILENAME)
    while time.time() < deadline and proc.poll() is None:
        try:
            if os.path.exists(path) and history(str(out)).generation >= generation:
                return
        except ValueError:  # caught mid-rename
            pass
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of generation {generation}: {proc.poll()}")


def rank_pid(marker: str, rank: int) -> int:
    """PID of MPI rank ``rank`` of the run whose command line mentions marker (its output directory)."""
    for pid in leftover_ranks(marker):
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                if f"PMI_RANK={rank}".encode() in fh.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    raise AssertionError(f"rank {rank} not found")


def test_hung_reward_stops_the_job_naming_the_function(tiny_dir, tmp_path):
    out, marker = tmp_path / "hang", tmp_path / "hang_now"
    env = {**ENV, "ESSA_HANG": str(marker)}
    proc = start(tiny_args(tiny_dir, out, 200) + ["task.reward_fn=mpi_rewards:hangs_on_rank_1_after_marker",
                                                  "task.reward_timeout_s=3"], env)
    wait_for_generation(out, 2, proc)
    marker.touch()
    t = time.time()
    _, err = proc.communicate(timeout=60)
    record("fault", "reward never returns on rank 1 (reward_timeout_s=3)", proc.returncode, time.time() - t,
           error_line(err), f"checkpoint at generation {history(str(out)).generation}; resumed to the end")
    assert proc.returncode == 3 and time.time() - t < 30
    assert "reward function hangs_on_rank_1_after_marker did not return within task.reward_timeout_s=3 s" in err
    assert "Traceback" not in err and ranks_gone(str(out))
    assert history(str(out)).generation >= 2  # a checkpoint to resume (resumes after a stop: the tests below)


def test_stopped_rank_is_named_by_the_stall_watchdog(tiny_dir, tmp_path):
    out = tmp_path / "stop"
    proc = start(tiny_args(tiny_dir, out, 2000) + ["run.stall_timeout_s=4"])
    wait_for_generation(out, 2, proc)
    os.kill(rank_pid(str(out), 1), signal.SIGSTOP)
    t = time.time()
    _, err = proc.communicate(timeout=60)
    seconds = time.time() - t
    record("fault", "rank 1 SIGSTOPped (stall_timeout_s=4)", proc.returncode, seconds, error_line(err),
           f"checkpoint at generation {history(str(out)).generation}; stale lock taken over on resume")
    assert proc.returncode == 3 and seconds < 20, (proc.returncode, seconds, err[-2000:])
    assert ("did not complete within run.stall_timeout_s=4 s: rank 1 on " in err
            and "(no answer: stopped, killed, or hung outside Python) did not arrive" in err), err[-2000:]
    assert ranks_gone(str(out))
    res = mpirun(2, ["--resume", str(out), "run.generations=" + str(history(str(out)).generation + 1)])
    assert res.returncode == 0, res.stderr[-2000:]  # the stale lock of the killed rank 0 is taken over


def test_stall_line_names_the_rank_that_never_arrives_not_the_late_ones(tiny_dir, tmp_path):
    """4 ranks: after the marker, ranks 1 and 2 reach the record exchange 2 and 4 s after rank 0 (within the
    6 s deadline, past the 2 s the watchdog used to listen), rank 3 never does. Only rank 3 is named, with its
    host; it is alive (sleeping in its reward), and the line says so."""
    out, marker = tmp_path / "skew", tmp_path / "skew_now"
    env = {**ENV, "ESSA_SKEW_MARKER": str(marker), "ESSA_SKEW": "1:2,2:4,3:-1"}
    args = tiny_args(tiny_dir, out, 2000) + ["task.reward_fn=mpi_rewards:skewed", "run.stall_timeout_s=6",
                                             "task.val_size=0"]
    proc = subprocess.Popen(launch(4, args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    wait_for_generation(out, 2, proc, limit=180)
    marker.touch()
    t = time.time()
    _, err = proc.communicate(timeout=90)
    record("fault", "ranks 1, 2 late by 2 and 4 s, rank 3 never arrives (stall_timeout_s=6)", proc.returncode,
           time.time() - t, error_line(err), f"checkpoint at generation {history(str(out)).generation}")
    line = error_line(err)
    assert proc.returncode == 3 and "did not complete within run.stall_timeout_s=6 s" in line, err[-3000:]
    assert f"rank 3 on {os.uname().nodename}" in line and "(alive, last in generation" in line, line
    assert "rank 1 on" not in line and "rank 2 on" not in line, line
    assert ranks_gone(str(out))


@pytest.mark.parametrize("stopped", [0])  # rank 1 stopped takes the same path (the gradient sum), rank 0 names it
def test_a_rank_stopped_during_the_sft_warm_start_is_named(tiny_dir, tmp_path, stopped):
    """Every rank trains the SFT and sums its gradient once a step: a rank stopped mid-training (many epochs of
    the toy rows) leaves the other waiting in that sum, which names it within run.stall_timeout_s."""
    out, sft_dir = tmp_path / "sftstop", tmp_path / "sftstop_adapter"
    args = [a for a in tiny_args(tiny_dir, out) if a != "adapter.warm_start=none"]
    proc = start(args + ["adapter.warm_start=sft", f"sft.output_dir={sft_dir}", "sft.epochs=1000",
                         "run.stall_timeout_s=10"])
    for line in proc.stdout:  # rank 0 says it starts training (flushed; mpiexec forwards it)
        if "SFT warm start: training" in line:
            break
    time.sleep(3)  # into the SFT steps (imports and load take a few seconds)
    os.kill(rank_pid(str(out), stopped), signal.SIGSTOP)
    t = time.time()
    _, err = proc.communicate(timeout=60)
    seconds = time.time() - t
    record("fault", f"rank {stopped} SIGSTOPped during the SFT warm start (stall_timeout_s=10)", proc.returncode,
           seconds, error_line(err), "the SFT's last checkpoint (sft.save_every steps)")
    assert proc.returncode == 3 and seconds < 30, (proc.returncode, seconds, err[-2000:])
    # stopped in a step's gradient sum, or (every sft.save_every steps) in its checkpoint's
    said = re.search(r"the SFT (gradient sum|checkpoint) did not complete within run.stall_timeout_s=10 s: rank "
                     rf"{stopped} on ", err)
    assert (said and "(no answer: stopped, killed, or hung outside Python) did not arrive; no generation was "
            "checkpointed yet; run the same command again (the SFT warm start continues from its own checkpoint)"
            in err), err[-2000:]
    assert error_line(err).startswith(f"essa_mpi: error on rank {1 - stopped}:") and not sft_dir.exists()
    assert ranks_gone(str(out))


def test_an_sft_longer_than_the_stall_timeout_ends(tiny_dir, tmp_path):
    """A healthy SFT warm start longer than twice run.stall_timeout_s=4 ends, and the run after it completes:
    the deadline is per gradient sum (once a step), not for the whole SFT."""
    out, sft_dir = tmp_path / "beats", tmp_path / "beats_adapter"
    args = [a for a in tiny_args(tiny_dir, out) if a != "adapter.warm_start=none"]
    res = mpirun(2, args + ["adapter.warm_start=sft", f"sft.output_dir={sft_dir}", "sft.epochs=120",
                            "run.stall_timeout_s=4"], timeout=240)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (sft_dir / "adapter_config.json").exists() and history(str(out)).generation == 3
    sft_s = json.loads((sft_dir / "sft_info.json").read_text())["wall_s"]
    assert sft_s > 2 * 4, f"the SFT took {sft_s} s, not over twice the stall timeout: raise sft.epochs"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_every_rank_with_one_line_and_keeps_the_checkpoint(tiny_dir, tmp_path, sig, code):
    out = tmp_path / "sig"
    proc = start(tiny_args(tiny_dir, out, 2000))
    wait_for_generation(out, 2, proc)
    t = time.time()
    proc.send_signal(sig)  # mpiexec forwards it to every rank, as srun does for scancel
    _, err = proc.communicate(timeout=60)
    record("fault", f"{signal.Signals(sig).name} to mpiexec", proc.returncode, time.time() - t, error_line(err),
           f"checkpoint at generation {history(str(out)).generation} (+ previous); lock released")
    assert proc.returncode == code and time.time() - t < 10
    lines = [line for line in err.splitlines() if "stopped by" in line]
    assert sorted(line.split(" stopped")[0] for line in lines) == ["essa_mpi: rank 0", "essa_mpi: rank 1"], err
    assert "Traceback" not in err
    assert f"stopped by {signal.Signals(sig).name}; the last checkpoint is kept; continue with --resume {out}" in err
    assert sorted(os.listdir(out)) == ["best_adapter", "checkpoint.h5", "checkpoint.prev.h5", "config.yaml",
                                       "essa_run.json", "metrics.jsonl"]
    stopped_at = history(str(out)).generation
    assert 2 <= stopped_at < 2000
    if sig == signal.SIGTERM:  # what either signal keeps resumes (once is enough: the same files)
        assert mpirun(2, ["--resume", str(out), f"run.generations={stopped_at + 1}"]).returncode == 0


HOLD_RANK_0 = """import os, sys, time
class Hold:  # rank 0 stops in the import of essa_mpi.cli, its start-up signal handler already set, until killed
    def find_spec(self, name, path=None, target=None):
        while name == "essa_mpi.cli" and os.environ.get("PMI_RANK") == "0":
            time.sleep(0.1)
sys.meta_path.insert(0, Hold())
"""


def test_a_signal_while_one_rank_starts_and_its_peer_waits_in_mpi_init_ends_the_job(tiny_dir, tmp_path):
    """Rank 0 still importing, rank 1 inside MPI_Init waiting for it (C code, where no Python handler runs): a
    SIGTERM to mpiexec ends both at once. Before, rank 0 left with its start-up line and rank 1 waited in MPI_Init
    for good (a CI run hung 60 s on it)."""
    (tmp_path / "hold").mkdir()
    (tmp_path / "hold" / "sitecustomize.py").write_text(HOLD_RANK_0)
    out = tmp_path / "held"
    proc = start(tiny_args(tiny_dir, out), {**ENV, "PYTHONPATH": f"{tmp_path / 'hold'}:{ENV['PYTHONPATH']}"})
    deadline = time.time() + 60
    while time.time() < deadline:  # rank 1 has loaded libmpi: it is in MPI_Init, which cannot finish
        try:
            if "libmpi" in open(f"/proc/{rank_pid(str(out), 1)}/maps").read():
                break
        except (AssertionError, OSError):
            pass
        time.sleep(0.05)
    time.sleep(0.5)
    t = time.time()
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    record("fault", "SIGTERM while rank 0 imports and rank 1 waits in MPI_Init", proc.returncode, time.time() - t,
           error_line(err), "nothing (before generation 1)")
    assert time.time() - t < 10 and ranks_gone(str(out)), err[-2000:]
    assert proc.returncode != 0 and "essa_mpi: stopped by SIGTERM while starting; nothing was written." in err, err


def test_one_run_per_directory(tiny_dir, tmp_path):
    out = tmp_path / "live"
    proc = start(tiny_args(tiny_dir, out, 2000))
    try:
        wait_for_generation(out, 1, proc)
        t = time.time()  # even with run.overwrite=true; a --resume takes the same lock (RunLock.acquire)
        res = mpirun(2, [*tiny_args(tiny_dir, out), "run.overwrite=true"], timeout=120)
        record("fault", "second run (run.overwrite=true) into a live run's directory", res.returncode,
               time.time() - t, error_line(res.stderr), "the live run untouched")
        assert res.returncode == 2 and f"run.output_dir={out} is in use by pid" in res.stderr, res.stderr[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert not os.path.exists(out / "run.lock"), "the lock outlived its run"


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    """(A whole run taking over the lock of a rank killed by MPI_Abort: the stall watchdog test's resume.)"""
    from essa_mpi import rundir

    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / rundir.LOCK).write_text(f'{{"host": "{os.uname().nodename}", "pid": {dead.pid}, "start": null}}')
    rundir.RunLock.acquire(str(tmp_path)).release()
    assert not (tmp_path / rundir.LOCK).exists()


def test_overwrite_replaces_only_essa_outputs(tiny_dir, tmp_path, uninterrupted6):
    """(A plain rerun into a run's directory is refused: test_cli_mpi.py::test_existing_checkpoint_needs_resume.)"""
    out = tmp_path / "ow"
    shutil.copytree(uninterrupted6, out)  # a finished run's directory (a copy: the fixture is shared)
    (out / "notes.txt").write_text("mine")
    assert (out / "best_adapter").is_dir()
    res = mpirun(2, tiny_args(tiny_dir, out, 2) + ["run.overwrite=true", "task.val_size=0"])
    assert res.returncode == 0 and (out / "notes.txt").read_text() == "mine"
    assert not (out / "best_adapter").exists(), "a best adapter of the replaced run must not survive"
    assert history(str(out)).generation == 2 and len([m for m in metrics(str(out)) if "reward_mean" in m]) == 2


def test_resume_refuses_a_changed_model_or_changed_task_data(tiny_dir, tmp_path):
    """One run on a copy of the model and a data file of its own; a resume after either changed is refused, and
    the checkpoint is kept."""
    from tiny import save_tiny

    model, data, out = tmp_path / "model", tmp_path / "d.jsonl", tmp_path / "run"
    shutil.copytree(tiny_dir, model)
    data.write_text("".join(f'{{"prompt": "Write words: p{i}"}}\n' for i in range(30)))
    args = tiny_args(str(model), out, 2) + ["task.name=custom", f"task.dataset={data}",
                                            "task.reward_fn=mpi_rewards:nan_for_some"]
    assert mpirun(2, args).returncode == 0
    kept = (out / checkpoint.FILENAME).read_bytes()
    original = data.read_text()
    data.write_text(original.replace("p7", "p8"))
    t = time.time()
    res = mpirun(2, ["--resume", str(out), "run.generations=3"])
    record("fault", "resume after the dataset was edited", res.returncode, time.time() - t, error_line(res.stderr),
           "checkpoint untouched")
    assert res.returncode == 2 and "the task's training or validation rows changed" in res.stderr, res.stderr[-2000:]
    data.write_text(original)
    save_tiny(str(model))  # same shapes, same config: other weights (a different seed would do the same)
    with open(model / "model.safetensors", "r+b") as fh:
        fh.seek(-8, os.SEEK_END)
        fh.write(b"\x01" * 8)
    t = time.time()
    res = mpirun(2, ["--resume", str(out), "run.generations=3"])
    record("fault", "resume after the model's weights changed", res.returncode, time.time() - t,
           error_line(res.stderr), "checkpoint untouched")
    assert res.returncode == 2 and "the model files at model.name_or_path changed" in res.stderr, res.stderr[-2000:]
    assert (out / checkpoint.FILENAME).read_bytes() == kept


def test_corrupt_latest_checkpoint_falls_back_and_resumes_bit_identically(tmp_path, uninterrupted6):
    full, broken = uninterrupted6, tmp_path / "broken"
    shutil.copytree(full, broken)  # a finished 6-generation run (a copy: the fixture is shared)
    with open(broken / checkpoint.FILENAME, "r+b") as fh:
        fh.truncate(1000)
    t = time.time()
    res = mpirun(2, ["--resume", str(broken), "run.generations=6"])
    record("fault", "resume with a truncated checkpoint.h5", res.returncode, time.time() - t,
           next(line for line in res.stderr.splitlines() if "WARNING" in line), "fell back to checkpoint.prev.h5 "
           "(generation 5); final state bit-identical to an uninterrupted run")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Resuming from" in res.stderr and "generation 5" in res.stderr
    a, b = history(str(full)), history(str(broken))
    assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.rewards, b.rewards)
    assert all(np.array_equal(a.cma[k], b.cma[k]) for k in a.cma)
    gens = [m["generation"] for m in metrics(str(broken)) if "reward_mean" in m]
    assert gens == [1, 2, 3, 4, 5, 6], "metrics.jsonl cut back to the checkpoint used, no generation twice"


def test_resume_after_a_flat_last_generation_with_full_covariance(tiny_dir, tmp_path):
    """Issue 11 item 8 end to end: 0/1 reward, full covariance, the checkpoint's last generation flat."""
    args = ["task.reward_fn=mpi_rewards:rare_one", "search.covariance=full", "task.val_size=0"]
    ref = tmp_path / "ref"
    assert mpirun(2, tiny_args(tiny_dir, ref, 12) + args).returncode == 0
    flat = [m["generation"] for m in metrics(str(ref)) if m.get("flat_skipped")]
    moved = [m["generation"] for m in metrics(str(ref)) if "reward_mean" in m and not m.get("flat_skipped")]
    stops = [g for g in flat if any(m < g for m in moved) and g < 12]
    assert stops, f"need a flat generation after an update: flat {flat}"
    cut = tmp_path / "cut"
    assert mpirun(2, tiny_args(tiny_dir, cut, stops[0]) + args).returncode == 0
    res = mpirun(2, ["--resume", str(cut), "run.generations=12"])
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = history(str(ref)), history(str(cut))
    assert all(np.array_equal(a.cma[k], b.cma[k]) for k in a.cma)


def test_disk_full_is_one_clear_line(tiny_dir, tmp_path):
    with tmpfs(tmp_path / "disk", "size=24k") as disk:
        t = time.time()
        res = mpirun(2, tiny_args(tiny_dir, disk / "run", 50) + ["search.covariance=full"])
        record("fault", "disk full (24 KiB tmpfs)", res.returncode, time.time() - t, error_line(res.stderr),
               f"{sorted(os.listdir(disk / 'run'))}, no temp file")
        assert res.returncode == 1
        line = error_line(res.stderr)  # the disk fills in the checkpoint or in best_adapter/, by a few bytes
        assert "No space left on device" in line and "the previous checkpoint (if any) is kept" in line, line
        assert "Traceback" not in res.stderr and "Segmentation" not in res.stderr, res.stderr[-3000:]
        assert not [n for n in os.listdir(disk / "run") if n.endswith((".tmp", ".new"))]


def test_reward_that_exits_the_process_ends_every_rank(tiny_dir, tmp_path):
    out = tmp_path / "exit"
    t = time.time()
    res = mpirun(2, tiny_args(tiny_dir, out) + ["task.reward_fn=mpi_rewards:exits_process"], timeout=60)
    record("fault", "reward calls os._exit(3) on every rank", res.returncode, time.time() - t,
           error_line(res.stderr), "nothing to keep (before generation 1)")
    assert res.returncode == 1 and ranks_gone(str(out)), res.stderr[-2000:]
    assert "reward function exits_process called os._exit(3); a reward must return" in res.stderr
    assert "No generation was checkpointed yet; run the same command again" in res.stderr  # not "--resume"


def test_deadline_fires_once_for_a_block_that_overruns(monkeypatch):
    """The deadline stops a block that does not finish in time, and only that one (the stop hook records the
    call and ends the timer thread instead of the process)."""
    from essa_mpi import watchdog

    stopped = []

    def stop(code):
        stopped.append(code)
        raise SystemExit  # ends the timer thread before watchdog.stop's own os._exit

    monkeypatch.setitem(watchdog._state, "stop", stop)
    with watchdog.deadline(0.1, lambda: "took too long"):
        time.sleep(1.5)  # the timer fires at 0.1 s and waits 0.5 s for the line to get out
    with watchdog.deadline(5, lambda: "never"):
        pass
    time.sleep(0.2)
    assert stopped == [watchdog.TIMEOUT_EXIT]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_lock_of_a_killed_unreaped_process_is_stale(tmp_path):
    """A SIGKILLed rank 0 can linger as a zombie (a container's init that does not reap): not a live holder."""
    from essa_mpi import rundir

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": child.pid,
                                                       "start": rundir._start_ticks(child.pid)}))
        with pytest.raises(ValueError, match=f"in use by pid {child.pid}"):
            rundir.RunLock.acquire(str(tmp_path))
        child.kill()
        time.sleep(0.2)  # killed, not waited for: a zombie
        assert rundir._stat(child.pid)[0] == "Z"
        rundir.RunLock.acquire(str(tmp_path)).release()
    finally:
        child.kill()
        child.wait()


def test_overwrite_never_removes_what_the_run_reads(tmp_path):
    """adapter.path inside the run's own best_adapter/: run.overwrite=true stops instead of deleting it."""
    from essa_mpi.rundir import clear_for_fresh_run

    (tmp_path / "best_adapter").mkdir()
    (tmp_path / "best_adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match=r"run.overwrite=true would remove .*best_adapter, which "
                                         r"adapter.path=.*best_adapter reads; copy it out"):
        clear_for_fresh_run(str(tmp_path), True, {"adapter.path": str(tmp_path / "best_adapter")})
    assert (tmp_path / "best_adapter" / "adapter_config.json").exists() and (tmp_path / "metrics.jsonl").exists()
    clear_for_fresh_run(str(tmp_path), True, {"adapter.path": None})
    assert not (tmp_path / "best_adapter").exists()


@pytest.mark.parametrize("kind", ["lock holding a JSON list", "lock is a directory", "log is a directory"])
def test_run_directory_files_of_the_wrong_kind(tmp_path, kind):
    from essa_mpi.rundir import LOCK, RunLock

    if kind == "lock holding a JSON list":  # not a record a live run wrote: taken over, as an empty lock is
        (tmp_path / LOCK).write_text("[1, 2]")
        RunLock.acquire(str(tmp_path)).release()
        return
    (tmp_path / (LOCK if kind == "lock is a directory" else "metrics.jsonl")).mkdir()
    with pytest.raises(ValueError, match=r"is a directory, where essa_mpi keeps a file of that name; move it away"):
        RunLock.acquire(str(tmp_path))


def test_side_commands_refuse_bad_arguments_with_one_line(tmp_path, capsys):
    from essa_mpi import comm, plot, quantize

    assert quantize.main(["--model", "/missing/model", "--out", str(tmp_path / "q")]) == 2
    assert quantize.main(["--out", str(tmp_path / "q"), "--samples", "0"]) == 2
    assert plot.main([str(tmp_path), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "neither an existing path" in err[0] and "--samples 0 must be >= 1" in err[1]
    assert "is a directory; give the PNG file" in err[2] and not (tmp_path / "q").exists()
    with pytest.raises(SystemExit) as stop:
        comm.main(["--help"])  # was ignored: the check ran instead
    assert stop.value.code == 0 and "launch-check" in capsys.readouterr().out


def test_a_stall_in_the_first_validation_advises_what_works(tiny_dir, tmp_path):
    """Rank 1 hangs in the base model's validation, before any checkpoint: the line says to run the same command
    again (a run cut before its first checkpoint starts again in its directory), never --resume."""
    out, marker = tmp_path / "run", tmp_path / "hang"
    marker.write_text("")
    env = {**ENV, "ESSA_HANG": str(marker)}
    t = time.time()
    args = tiny_args(tiny_dir, out) + ["task.reward_fn=mpi_rewards:hangs_on_rank_1_after_marker",
                                       "task.reward_timeout_s=0", "run.stall_timeout_s=8"]
    res = subprocess.run(launch(2, args), env=env, capture_output=True, text=True, timeout=120)
    record("fault", "rank 1 hung in the first validation (stall_timeout_s=8)", res.returncode, time.time() - t,
           error_line(res.stderr), "nothing (no checkpoint yet)")
    line = error_line(res.stderr)
    assert res.returncode == 3 and "validation at generation 0 did not complete" in line, res.stderr[-2000:]
    assert "no generation was checkpointed yet; run the same command again" in line and "--resume" not in line
