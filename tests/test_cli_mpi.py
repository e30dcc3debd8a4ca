"""End-to-end runs of ``python -m essa_mpi`` under a real ``mpiexec`` with a tiny random model."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from essa_mpi import checkpoint

# The mpich wheel puts mpiexec beside the interpreter; a system MPI puts it on PATH.
_beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
MPIEXEC = _beside if os.path.isfile(_beside) else shutil.which("mpiexec")
assert MPIEXEC, "mpiexec not found: pip install mpich (or load your cluster's MPI module)"
HERE = os.path.dirname(__file__)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONWARNINGS": "ignore::FutureWarning", "PYTHONPATH": HERE}  # tests/mpi_rewards.py on every rank


def tiny_args(tiny_dir, out, generations=3):
    return [f"model.name_or_path={tiny_dir}", "model.device=cpu", "model.threads=1", "adapter.rank=2",
            "adapter.warm_start=none", "task.name=toy", "task.batch_size=3", "task.val_size=4", "task.val_every=2",
            "task.max_new_tokens=6",
            "search.popsize=7", "search.sigma0=1.0", f"run.generations={generations}", "run.progress=false",
            f"run.output_dir={out}"]


def launch(n, args):
    return [MPIEXEC, "-n", str(n), sys.executable, "-m", "essa_mpi", *args]


def mpirun(n, args, timeout=300):
    return subprocess.run(launch(n, args), capture_output=True, text=True, timeout=timeout, env=ENV)


def history(out):
    return checkpoint.load(os.path.join(out, checkpoint.FILENAME))


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def runs_by_ranks(tiny_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("ranks")
    out = {}
    for n in (1, 2, 3):
        res = mpirun(n, tiny_args(tiny_dir, base / f"n{n}"))
        assert res.returncode == 0, res.stderr[-3000:]
        out[n] = str(base / f"n{n}")
    return out


def test_identical_trajectories_for_1_2_3_ranks(runs_by_ranks):
    ref = history(runs_by_ranks[1])
    assert ref.generation == 3 and ref.seeds.shape == (3, 7)
    assert ref.rewards.std() > 0, "rewards must vary, or equal trajectories prove nothing"
    for n in (2, 3):
        other = history(runs_by_ranks[n])
        assert np.array_equal(other.seeds, ref.seeds)
        assert np.array_equal(other.rewards, ref.rewards), f"-n {n} rewards differ from -n 1"
        for key in ref.cma:
            assert np.array_equal(other.cma[key], ref.cma[key]), f"-n {n}: CMA-ES {key} differs"
        assert other.fingerprint == ref.fingerprint


def test_allgather_payload_is_8_bytes_per_record(runs_by_ranks):
    """7 candidates x 3 prompts: one rank sends 7 records; 2 ranks hold 11 and 10 rows and share candidate 3
    (its 3 prompts as records: 9); 3 ranks hold 7 rows each and share candidates 2 and 4 (11 records)."""
    for n, out in runs_by_ranks.items():
        gens = [m for m in metrics(out) if "reward_mean" in m]
        assert len(gens) == 3 and all(m["allgather_bytes"] == 8 * {1: 7, 2: 9, 3: 11}[n] for m in gens), n
        vals = [m for m in metrics(out) if "val_reward" in m]
        assert [m["generation"] for m in vals] == [0, 2, 3]


def test_outputs_exist_and_summary_printed(runs_by_ranks):
    out = runs_by_ranks[2]
    for name in ("config.yaml", "summary.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "curves.png"):
        assert os.path.isfile(os.path.join(out, name)), name


def wait_for_stage(log, name: str, proc, limit: float = 240) -> None:
    """Until the stage log (essa_mpi/stages.py) says rank 0 holds at stage name."""
    deadline = time.time() + limit
    while f"hold {name}" not in (log.read_text() if log.exists() else ""):
        assert time.time() < deadline and proc.poll() is None, f"never held at {name}: {proc.poll()}"
        time.sleep(0.05)


@pytest.mark.parametrize("stage", ["load", "validation 0"])
def test_run_cut_before_its_first_checkpoint_starts_again_in_its_own_directory(tiny_dir, tmp_path, uninterrupted6,
                                                                                stage):
    """Killed (SIGKILL, as a node failure or a requeue) before any checkpoint: config.yaml, metrics.jsonl and the
    lock are there, no checkpoint. The same command runs again there and ends as an uninterrupted run; another
    config is still refused (before essa_run.json, every such rerun was)."""
    out, log = tmp_path / "cut", tmp_path / "stages.txt"
    env = {**ENV, "ESSA_STAGE_LOG": str(log), "ESSA_STAGE_HOLD": stage}
    proc = subprocess.Popen(launch(2, tiny_args(tiny_dir, out, generations=6)), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_stage(log, stage, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / checkpoint.FILENAME).exists() and (out / "essa_run.json").exists()
    (out / "notes.txt").write_text("the user's")
    other = mpirun(2, tiny_args(tiny_dir, out, generations=7))
    assert other.returncode == 2 and "but no checkpoint; choose a new run.output_dir" in other.stderr, other.stderr
    res = mpirun(2, tiny_args(tiny_dir, out, generations=6), timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = history(str(uninterrupted6)), history(str(out))
    assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.rewards, b.rewards) and b.generation == 6
    with open(uninterrupted6 / "best_adapter/adapter_model.safetensors", "rb") as x, \
            open(out / "best_adapter/adapter_model.safetensors", "rb") as y:
        assert x.read() == y.read()
    assert (out / "notes.txt").read_text() == "the user's"


def test_killed_run_resumes_bit_identically(tiny_dir, tmp_path, uninterrupted6):
    full, killed = uninterrupted6, tmp_path / "killed"
    proc = subprocess.Popen(launch(2, tiny_args(tiny_dir, killed, generations=6)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = killed / checkpoint.FILENAME
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists() and history(str(killed)).generation >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = history(str(killed)).generation
    assert 2 <= stopped_at < 6, "the kill must land mid-run, or the resume proves nothing"
    res = mpirun(2, ["--resume", str(killed)])
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = history(str(full)), history(str(killed))
    assert b.generation == 6
    assert np.array_equal(a.seeds, b.seeds) and np.array_equal(a.rewards, b.rewards)
    for key in a.cma:
        assert np.array_equal(a.cma[key], b.cma[key]), key
    with open(full / "adapter/adapter_model.safetensors", "rb") as x, \
            open(killed / "adapter/adapter_model.safetensors", "rb") as y:
        assert x.read() == y.read()
    summaries = [json.loads((d / "summary.json").read_text()) for d in (full, killed)]
    assert summaries[1]["val_reward"] == summaries[0]["val_reward"] and len(summaries[0]["val_reward"]) == 4
    assert summaries[1]["val_chain"] == summaries[0]["val_chain"], "a resume keeps the validation history"


def test_continuing_a_finished_run_keeps_its_last_validation_and_best(runs_by_ranks, tmp_path):
    """A 3-generation run validates at 0, 2 and 3 (the last); continued to 5 it validates 4 and 5, and the
    generation-3 line, which nothing measures again, stays in metrics.jsonl, summary.json and the best."""
    out = tmp_path / "run"
    shutil.copytree(runs_by_ranks[1], out)  # a copy: the fixture's runs are shared
    before = json.loads((out / "summary.json").read_text())
    res = mpirun(1, ["--resume", str(out), "run.generations=5"])
    assert res.returncode == 0, res.stderr[-3000:]
    after = json.loads((out / "summary.json").read_text())
    vals = [m["generation"] for m in metrics(str(out)) if "val_reward" in m]
    assert vals == [0, 2, 3, 4, 5] and list(after["val_reward"]) == ["0", "2", "3", "4", "5"]
    assert after["val_reward"]["3"] == before["val_reward"]["3"]
    best = max(after["val_reward"].values())
    assert after["best_val"]["val_reward"] == best
    assert after["best_val"]["generation"] == min(int(g) for g, v in after["val_reward"].items() if v == best)


@pytest.mark.parametrize("what", ["config", "data"])
def test_ranks_that_read_different_inputs_stop_before_the_first_generation(tiny_dir, tmp_path, what):
    """An MPMD launch with another popsize on rank 1 (it used to die in an MPI 'message truncated' abort) stops;
    a dataset path that holds other rows on one rank's node (a stale copy; here: another working directory)
    no longer matters: rank 0 reads the rows for every rank."""
    out = tmp_path / "run"
    for d, rows in (("a", 40), ("b", 41)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "data.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(rows)))
    args = tiny_args(tiny_dir, out, 2) + ["task.name=custom", "task.dataset=data.jsonl",
                                          "task.reward_fn=mpi_rewards:constant"]
    rank = [sys.executable, "-m", "essa_mpi", *args]
    other = rank + ["search.popsize=8"] if what == "config" else rank
    cmd = [MPIEXEC, "-n", "1", "-wdir", str(tmp_path / "a"), *rank, ":", "-n", "1", "-wdir",
           str(tmp_path / ("a" if what == "config" else "b")), *other]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    if what == "data":
        assert res.returncode == 0 and history(str(out)).generation == 2, res.stderr[-3000:]
        return
    assert res.returncode == 2, res.stderr[-3000:]
    assert "the ranks read different config section search (ranks 0: " in res.stderr and "; ranks 1: " in res.stderr
    assert not (out / "checkpoint.h5").exists()


def test_existing_checkpoint_needs_resume(runs_by_ranks, tiny_dir):
    res = mpirun(2, tiny_args(tiny_dir, runs_by_ranks[1]), timeout=120)
    assert res.returncode != 0 and "--resume" in res.stderr


@pytest.mark.parametrize("extra,message", [
    (["search.popsze=8"], "did you mean 'search.popsize'"),
    (["search.popsize=one"], "expected int"),
    (["adapter.fraction=0.2"], "0 singular values to search"),
    (["search.popsize=2"], "must be in [3, 65536]"),
    (["model.name_or_path=/missing/model"], "neither an existing path"),
    (["adapter.path=/missing/adapter"], "has no adapter_config.json"),
    (["task.name=gsm8k", "task.dataset=/missing/gsm8k.jsonl"], "does not exist"),
    (["task.name=poetry"], "task.name='poetry' is not one of"),
    (["task.name=custom", "task.dataset=tests/tiny.py"], "needs task.dataset (JSONL or id with a 'prompt' column) and"),
    (["task.reward_fn=mpi_rewards:no_such"], "cannot be imported"),
    (["task.name=ifeval", "task.dataset=" + os.path.join(HERE, "data", "ifeval_sample.jsonl"),
      "adapter.warm_start=sft"], "has no SFT completions"),
])
def test_bad_input_stops_every_rank_before_model_load(tiny_dir, tmp_path, extra, message):
    res = mpirun(2, tiny_args(tiny_dir, tmp_path / "bad") + extra, timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("essa_mpi: error:") == 1 and message in res.stderr, res.stderr[-2000:]
    assert "solution_length" not in res.stdout, "a model was loaded"


def test_uneven_population_splits_evenly_and_equals_one_rank(tiny_dir, tmp_path):
    """-n 4 with popsize 6 x 3 prompts: 18 rows as 5, 5, 4, 4 (split by whole candidates it was 6, 6, 3, 3),
    counted at the reward function; records, CMA-ES arrays and the adapter equal -n 1's."""
    runs = {}
    for n in (1, 4):
        out = tmp_path / f"n{n}"
        env = {**ENV, "ESSA_ROWS": str(tmp_path / f"rows{n}")}
        args = tiny_args(tiny_dir, out) + ["search.popsize=6", "task.val_size=0",
                                           "task.reward_fn=mpi_rewards:counts_rows"]
        res = subprocess.run(launch(n, args), capture_output=True, text=True, timeout=300, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        runs[n] = history(str(out))
    rows = [sum(map(int, (tmp_path / f"rows4.{r}").read_text().split())) for r in range(4)]
    assert rows == [15, 15, 12, 12], rows  # 3 generations
    ref, split = runs[1], runs[4]
    assert ref.rewards.shape == (3, 6) and len(np.unique(ref.rewards)) > 3, "rewards must vary"
    assert np.array_equal(split.seeds, ref.seeds) and np.array_equal(split.rewards, ref.rewards)
    for key in ref.cma:
        assert np.array_equal(split.cma[key], ref.cma[key]), key
    adapters = [(tmp_path / f"n{n}" / "adapter" / "adapter_model.safetensors").read_bytes() for n in (1, 4)]
    assert adapters[0] == adapters[1]
    gens = [m for m in metrics(str(tmp_path / "n4")) if "reward_mean" in m]
    # ranks 0-3 send 1 + 2, 1 + 1 + 1, 2 + 2, 1 + 1 records: candidates 1, 3 and 4 are split over two ranks
    assert all(m["allgather_bytes"] == 8 * 12 for m in gens), gens[0]["allgather_bytes"]


def test_more_ranks_than_candidate_prompt_pairs(tiny_dir, tmp_path):
    res = mpirun(4, tiny_args(tiny_dir, tmp_path / "bad") + ["search.popsize=3", "task.batch_size=1"], timeout=120)
    assert res.returncode == 2 and "4 ranks but search.popsize=3 x task.batch_size=1" in res.stderr


def test_adapter_rank_mismatch(tiny_dir, tmp_path, runs_by_ranks):
    exported = os.path.join(runs_by_ranks[1], "adapter")  # rank 2
    res = mpirun(2, tiny_args(tiny_dir, tmp_path / "bad") + [f"adapter.path={exported}", "adapter.rank=4"], 120)
    assert res.returncode != 0 and "has rank r=2 but adapter.rank=4" in res.stderr


@pytest.mark.parametrize("step_scale", ["uniform", "singular"])
def test_warm_start_from_exported_adapter(tiny_dir, runs_by_ranks, step_scale):
    """From an adapter, search.step_scale=singular gives coordinate i the step sigma0 x its singular value
    (pycma's sigma_vec, as a checkpoint stores it), recomputed here from the adapter file itself. In process:
    run.build is what the CLI calls (a whole run from an adapter: test_chain_mpi.py, from the SFT warm start)."""
    import torch

    from essa_mpi.comm import Comm
    from essa_mpi.config import ModelConfig, load_config
    from essa_mpi.model import load_model
    from essa_mpi.run import build
    from essa_mpi.svd_lora import SVDLoRA, load_lora_factors
    from essa_mpi.tasks import build_task

    exported = os.path.join(runs_by_ranks[1], "adapter")
    cfg = load_config(None, tiny_args(tiny_dir, "unused", generations=1) + [f"adapter.path={exported}",
                                                                            f"search.step_scale={step_scale}"])
    threads = torch.get_num_threads()
    try:  # build sets torch's threads (model.threads=1): this process's other tests keep theirs
        scales = build(cfg, Comm(), build_task(cfg.task, cfg.search.seed)).search.state_arrays()["sigma_vec"]  # [n]
    finally:
        torch.set_num_threads(threads)
    model = load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))[0]
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    values = SVDLoRA.attach(model, load_lora_factors(model, exported, targets, 2), 1.0).searched_values()  # [n]
    expect = np.maximum(values, 1e-3 * values.max()) if step_scale == "singular" else np.ones_like(values)
    np.testing.assert_allclose(scales, expect, rtol=1e-6)


def test_state_repair_under_mpiexec():
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi_repair.py")],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("REPAIRED_OK") == 2 and "diverged" in res.stderr


def test_help_explains_options():
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "--help"], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0 and "search.popsize" in res.stdout and "--resume" in res.stdout


def collective_calls(tiny_dir, tmp_path, generations, extra=()):
    """Collective calls per rank of a 2-rank run, counted by a proxy around mpi4py's COMM_WORLD."""
    prefix = tmp_path / f"counts{generations}"
    args = tiny_args(tiny_dir, tmp_path / f"g{generations}", generations) + list(extra)
    res = subprocess.run([MPIEXEC, "-n", "2", sys.executable, os.path.join(HERE, "mpi_count.py"), str(prefix), *args],
                         capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]
    counts = []
    for rank in (0, 1):
        with open(f"{prefix}.{rank}.json") as fh:
            counts.append(json.load(fh))
    return counts


def collective_counts(tiny_dir, tmp_path, generations, extra=()):
    return [c["counts"] for c in collective_calls(tiny_dir, tmp_path, generations, extra)]


@pytest.fixture(scope="module")
def counted_runs(tiny_dir, tmp_path_factory):
    """{generations: (per-rank collective calls, output directory)} of 2-rank runs without validation, 0 and 20
    generations, counted by the proxy."""
    base = tmp_path_factory.mktemp("counted")
    return {g: (collective_calls(tiny_dir, base, g, ["task.val_size=0"]), base / f"g{g}") for g in (0, 20)}


def test_one_collective_per_generation(counted_runs):
    """The steady state is the paper's communication model: one record exchange per generation, nothing else
    (the state check and the logged bytes ride in it). Counted over 20 generations against a 0-generation run."""
    base, run = ([c["counts"] for c in counted_runs[g][0]] for g in (0, 20))
    for rank in (0, 1):
        per_generation = {k: (run[rank].get(k, 0) - base[rank].get(k, 0)) / 20 for k in {*run[rank], *base[rank]}}
        per_generation = {k: v for k, v in per_generation.items() if v}
        assert per_generation == {"Allgatherv": 1.0}, per_generation
    gens = [m for m in metrics(str(counted_runs[20][1])) if "reward_mean" in m]
    assert len(gens) == 20 and all(m["sent_bytes"] in (8 * 5 + 16, 8 * 4 + 16) for m in gens)  # 11 / 10 rows


def test_logged_allgather_bytes_equal_the_bytes_mpi_received(counted_runs):
    """allgather_bytes (computed by essa_mpi from the record counts) against the receive sizes handed to
    mpi4py's Allgatherv, seen by the counting proxy: the records plus one 16-byte trailer per rank."""
    calls, out = counted_runs[20]
    gens = [m for m in metrics(str(out)) if "reward_mean" in m]
    for rank in (0, 1):
        received = calls[rank]["allgatherv_received_bytes"]
        assert received == [m["allgather_bytes"] + 2 * 16 for m in gens] and received[0] == 9 * 8 + 32


def test_validation_adds_one_reduction(tiny_dir, tmp_path):
    run = collective_counts(tiny_dir, tmp_path, 4, ["task.val_every=2", "task.val_base=false"])  # val at 0, 2, 4
    base = collective_counts(tiny_dir, tmp_path, 0, ["task.val_every=2", "task.val_base=false"])  # val at 0
    extra = {k: run[0].get(k, 0) - base[0].get(k, 0) for k in {*run[0], *base[0]}}
    assert {k: v for k, v in extra.items() if v} == {"Allgatherv": 4, "Allreduce": 2}


def _lora_tensors(adapter_dir):
    from safetensors.numpy import load_file
    return load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))


def test_best_validated_mean_is_exported(runs_by_ranks, tiny_dir, tmp_path):
    out = runs_by_ranks[1]
    val = {m["generation"]: m["val_reward"] for m in metrics(out) if "val_reward" in m}  # {0, 2, 3}
    best = min(g for g in val if val[g] == max(val.values()))  # ties: the earlier generation
    with open(os.path.join(out, "best_adapter", "essa_best.json")) as fh:
        assert json.load(fh) == {"generation": best, "val_reward": val[best]}
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh)["best_val"]["generation"] == best
    assert sorted(os.listdir(out)).count("best_adapter.old") == 0
    # the same mean again, from outside: a run that stops at the best generation exports it as its adapter/;
    # at generation 0 that is the start, whose offsets are zero: B of a fresh adapter is zero
    got = _lora_tensors(os.path.join(out, "best_adapter"))
    if best == 0:
        assert all(not v.any() for k, v in got.items() if "lora_B" in k)
        want = None
    else:
        short = tmp_path / "short"
        assert mpirun(1, tiny_args(tiny_dir, short, generations=best)).returncode == 0
        want = _lora_tensors(str(short / "adapter"))
    for key in (want or {}):
        assert np.array_equal(got[key], want[key]), key
    assert val[best] > val[0] or best == 0

