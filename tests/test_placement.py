"""GPU placement at the torch.cuda boundary, with a fake driver (tests/cuda_spy.py): every rank's GPUs are in
CUDA_VISIBLE_DEVICES before the first CUDA call, for both engines, one and two GPUs per rank, three launchers."""

import json
import os
import subprocess
import sys

import pytest
from test_cli_mpi import ENV, MPIEXEC

HERE = os.path.dirname(os.path.abspath(__file__))
SPY = os.path.join(HERE, "cuda_spy.py")


def base_args(tiny_dir, out):
    return [f"model.name_or_path={tiny_dir}", "model.device=cuda", "adapter.rank=2", "adapter.warm_start=none",
            "task.name=toy", "task.batch_size=3", "task.val_size=4", "run.progress=false", "run.generations=1",
            f"run.output_dir={out}/{{rank}}"]


CASES = [  # (id, node GPUs, launcher, extra args, GPUs per rank)
    ("hf-tp1-hydra", 8, "hydra", ["model.engine=hf"], 1),
    ("vllm-tp1-srun", 8, "srun", ["model.engine=vllm"], 1),
    ("hf-g2-ompi", 16, "ompi", ["model.engine=hf", "model.gpus_per_rank=2"], 2),
    ("vllm-tp2-hydra", 16, "hydra", ["model.engine=vllm", "model.gpus_per_rank=2"], 2),
]


def spy(cases, out_json, tmp_path, launch=None):
    path = tmp_path / "cases.json"
    path.write_text(json.dumps(cases))
    cmd = (launch or []) + [sys.executable, SPY, str(out_json), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def eight_ranks(tiny_dir, tmp_path_factory):
    """Each case's 8 simulated local ranks, run through cli.main up to placing the model."""
    tmp = tmp_path_factory.mktemp("spy")
    cases = [{"gpus": n, "local_size": 8, "launcher": who, "args": base_args(tiny_dir, tmp / name) + extra}
             for name, n, who, extra, _ in CASES]
    cases += [{"gpus": 8, "local_size": 4, "launcher": "srun", "preset": "{rank}",  # srun --gpus-per-task=1
               "args": base_args(tiny_dir, tmp / "bound")},
              {"gpus": 8, "local_size": 2, "launcher": "hydra", "preset": "4,5,6,7",  # this job's half of the node
               "args": base_args(tiny_dir, tmp / "split") + ["model.gpus_per_rank=2"]},
              {"gpus": 8, "local_size": 2, "launcher": "hydra",  # every rank trains the SFT warm start
               "args": base_args(tiny_dir, tmp / "sft") + ["adapter.warm_start=sft",
                                                           f"sft.output_dir={tmp}/sft_adapter_{{rank}}"]}]
    cases += [{"gpus": 2, "local_size": 2, "launcher": "hydra", "args": base_args(tiny_dir, tmp / "auto")},
              {"gpus": 2, "local_size": 2, "launcher": "hydra", "no_vllm": True,
               "args": base_args(tiny_dir, tmp / "auto_hf")}]
    res = spy(cases, tmp / "out.json", tmp)
    assert res.returncode == 0, res.stderr[-3000:]
    names = [c[0] for c in CASES] + ["bound", "split", "sft", "auto", "auto_hf"]
    return {**dict(zip(names, json.loads((tmp / "out.json").read_text()))), "stderr": res.stderr}


@pytest.mark.parametrize("name,gpus,launcher,extra,g", CASES, ids=[c[0] for c in CASES])
def test_no_cuda_call_before_the_ranks_gpus_are_set(eight_ranks, name, gpus, launcher, extra, g):
    for r, rank in enumerate(eight_ranks[name]):
        mine = list(range(r * g, (r + 1) * g))
        assert rank["exit"] == "reached", rank
        assert rank["first_call"][1] == ",".join(map(str, mine)), rank  # the variable at the first CUDA call
        assert rank["env_at_init"] == ",".join(map(str, mine)), rank
        assert rank["model_gpus"] == mine, rank  # the weights (hf) or the engine (vLLM, tp workers included)
        assert rank["current_gpu"] == mine[0], rank  # where a reward model or any helper lands


@pytest.mark.parametrize("name", ["vllm-tp1-srun", "vllm-tp2-hydra"])
def test_vllm_engines_spawn_their_workers_and_take_no_decoding_from_the_model(eight_ranks, name):
    """(Each engine's port range follows MPI's local rank, which the one-process simulation cannot vary:
    vllm_engine.engine_env's doctest.)"""
    ranks = eight_ranks[name]
    assert all((r["vllm"]["spawn"] == "spawn") == (r["vllm"]["tp"] > 1) for r in ranks)
    assert all(os.path.basename(r["vllm"]["generation_config"]).startswith("essa_mpi-vllm-") for r in ranks)


def test_engine_auto_takes_vllm_on_a_gpu_where_it_imports_and_hf_where_it_does_not(eight_ranks):
    """The default model.engine=auto, with the fake driver's GPUs: the fake vLLM imports → every rank builds a vLLM
    engine on its GPU; vLLM's import raises → every rank loads the model with transformers on its GPU. The first
    lines say which and why."""
    assert [("vllm" in r, r["model_gpus"]) for r in eight_ranks["auto"]] == [(True, [0]), (True, [1])]
    assert [("vllm" in r, r["model_gpus"]) for r in eight_ranks["auto_hf"]] == [(False, [0]), (False, [1])]
    assert "model.engine=auto: vllm (a CUDA device, and vLLM imports)" in eight_ranks["stderr"]
    assert eight_ranks["stderr"].count("model.engine=auto: hf (vLLM does not import: ModuleNotFoundError") == 2


def test_a_launchers_own_binding_is_kept_and_a_jobs_gpu_list_is_split(eight_ranks):
    bound, split = eight_ranks["bound"], eight_ranks["split"]
    assert [r["model_gpus"] for r in bound] == [[0], [1], [2], [3]]
    assert [r["env_at_init"] for r in split] == ["4,5", "6,7"] and [r["model_gpus"] for r in split] == [[4, 5], [6, 7]]


def test_each_rank_trains_the_sft_on_its_own_gpu(eight_ranks):
    """The SFT warm start's model (loaded before the search's) goes to the rank's own GPU on every rank."""
    for r, rank in enumerate(eight_ranks["sft"]):
        assert rank["exit"] == "reached" and rank["model_gpus"] == [r] and rank["current_gpu"] == r, rank
        assert rank["first_call"][1] == str(r), rank


def test_real_mpiexec_ranks_bind_by_hydras_local_rank_and_mpi_confirms_it(tiny_dir, tmp_path):
    args = [a for a in base_args(tiny_dir, tmp_path) if not a.startswith("run.output_dir")]
    case = [{"gpus": 2, "local_size": 2, "launcher": "real", "args": args + [f"run.output_dir={tmp_path}/run"]}]
    res = spy(case, tmp_path / "out.{rank}.json", tmp_path, [MPIEXEC, "-n", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    seen = [json.loads((tmp_path / f"out.{r}.json").read_text())[0][0] for r in (0, 1)]
    assert [s["env_at_init"] for s in seen] == ["0", "1"] and [s["model_gpus"] for s in seen] == [[0], [1]]


def test_a_wrong_local_rank_from_the_launcher_is_refused_before_loading(tiny_dir, tmp_path):
    """Both processes told they are local rank 0 would share GPU 0: MPI's node split catches it, exit 2."""
    case = [{"gpus": 2, "local_size": 2, "launcher": "real", "args": base_args(tiny_dir, tmp_path / "run")}]
    (tmp_path / "cases.json").write_text(json.dumps(case))
    cmd = [MPIEXEC, "-n", "2", "sh", "-c",
           f'MPI_LOCALRANKID=0 exec {sys.executable} {SPY} {tmp_path}/out.{{rank}}.json {tmp_path}/cases.json']
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 0, res.stderr[-3000:]  # the spy itself ends normally; main returned 2 on both ranks
    seen = [json.loads((tmp_path / f"out.{r}.json").read_text())[0][0] for r in (0, 1)]
    assert [s["exit"] for s in seen] == [2, 2]
    assert "MPI counts it as local rank 1 of 2" in res.stderr and "srun --gpus-per-task" in res.stderr
