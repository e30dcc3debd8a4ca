"""The memory model, `python -m essa_mpi plan` over every shipped job, the preflight that refuses what cannot fit."""

import glob
import json
import os
import shutil

import pytest

from essa_mpi import memory
from essa_mpi.config import load_config
from essa_mpi.plan import main as plan_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "tests", "data", "model_configs")
JOBS = sorted(glob.glob(os.path.join(ROOT, "jobs", "*.yaml")))
GiB = memory.GiB


def arch(name):
    with open(os.path.join(CONFIGS, name + ".json")) as fh:
        return memory.Arch.from_config(json.load(fh))


@pytest.mark.parametrize("name,params", [("Qwen--Qwen2.5-7B-Instruct", 7.62e9), ("Qwen--Qwen2.5-32B-Instruct", 32.8e9),
                                         ("Qwen--Qwen2.5-72B-Instruct", 72.7e9),
                                         ("meta-llama--Llama-3.1-8B-Instruct", 8.03e9)])
def test_weights_match_the_published_parameter_counts(name, params):
    a = arch(name)
    assert abs(memory.weight_bytes(a, "bf16") / 2 - params) / params < 0.01  # biases and norms aside
    assert memory.weight_bytes(a, "gptq") < 0.4 * memory.weight_bytes(a, "bf16")


def test_kv_cache_per_token_is_layers_x_kv_heads_x_head_dim_x_2_x_dtype():
    assert memory.kv_bytes(arch("Qwen--Qwen2.5-7B-Instruct"), "bf16", 1) == 28 * 4 * 128 * 2 * 2
    assert memory.kv_bytes(arch("meta-llama--Llama-3.1-8B-Instruct"), "fp32", 10) == 32 * 8 * 128 * 2 * 4 * 10


def test_rows_follow_the_memory_and_spread_halves_the_weights_and_cache():
    a = arch("Qwen--Qwen2.5-32B-Instruct")
    one = memory.plan(a, "bf16", 512, 1024, memory.Device("cuda", 80 * GiB))
    big = memory.plan(a, "bf16", 512, 1024, memory.Device("cuda", 141 * GiB))
    two = memory.plan(a, "bf16", 512, 1024, memory.Device("cuda", 80 * GiB, 2))
    assert 0 < one.rows < big.rows and one.fits and big.fits and two.weights * 2 >= one.weights > two.weights
    assert one.peak <= one.budget < one.peak + one.row  # as many rows as fit, and not one more
    small = memory.plan(a, "bf16", 512, 1024, memory.Device("cuda", 40 * GiB))
    assert not small.fits and small.reason == "the weights alone exceed it"
    too_many = memory.plan(a, "bf16", 512, 1024, memory.Device("cuda", 80 * GiB), want=512)
    assert not too_many.fits and "run.max_rows=512 exceeds" in too_many.reason


def test_vllm_72b_over_two_80gib_gpus_at_085_leaves_no_cache():
    problem = memory.vllm_check(arch("Qwen--Qwen2.5-72B-Instruct"), "bf16", 1536, 80 * GiB, 0.85, 2)
    assert problem and "leaves 0.0 GiB" in problem
    assert memory.vllm_check(arch("Qwen--Qwen2.5-72B-Instruct"), "bf16", 1536, 80 * GiB, 0.85, 4) is None


@pytest.mark.parametrize("gib", [80, 141])
@pytest.mark.parametrize("job", JOBS, ids=[os.path.basename(j) for j in JOBS])
def test_every_shipped_job_fits_an_8_gpu_node(job, gib, capsys):
    """Search and eval fit on H100 and H200 nodes; the SFT warm start fits or the plan says how to train it."""
    gpus = ["--gpus-per-node", "0"] if "smollm2" in job else ["--gib-per-gpu", str(gib)]
    code = plan_main(["--config", job, "--model-config", CONFIGS, *gpus])
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()[2:]}
    assert "fits" in lines["search"] and "fits" in lines["eval"], out
    if code:
        assert "72b" in job and "train it beforehand on" in lines["sft"], out
    else:
        assert "DOES NOT FIT" not in out


def test_plan_refuses_a_set_max_rows_that_does_not_fit(capsys):
    job = os.path.join(ROOT, "jobs", "math.yaml")
    assert plan_main(["--config", job, "--model-config", CONFIGS, "run.max_rows=4096"]) == 1
    assert "run.max_rows=4096 exceeds the" in capsys.readouterr().out
    assert plan_main(["--config", job, "model.name_or_path=nobody/nothing"]) == 2


@pytest.fixture
def qwen32_dir(tmp_path):
    """A local 'model' that is only Qwen2.5-32B's config.json: all preflight reads."""
    shutil.copy(os.path.join(CONFIGS, "Qwen--Qwen2.5-32B-Instruct.json"), tmp_path / "config.json")
    return str(tmp_path)


def test_preflight_refuses_weights_that_cannot_fit_naming_numbers_and_fix(qwen32_dir, monkeypatch):
    monkeypatch.setattr(memory, "rank_memory", lambda *a: memory.Device("cuda", 48 * GiB))
    cfg = load_config(None, [f"model.name_or_path={qwen32_dir}", "task.max_new_tokens=1024"])
    with pytest.raises(ValueError, match=r"weights 61\.0 GiB .* of 43\.2 GiB per device: the weights alone "
                                         r"exceed it; use model.gpus_per_rank=2"):
        memory.check_memory(cfg, 0, 8, prompt_tokens=300)
    monkeypatch.setattr(memory, "rank_memory", lambda *a: memory.Device("cuda", 80 * GiB))
    memory.check_memory(cfg, 0, 8, prompt_tokens=300)  # fits: no error
    rows, note = memory.rows_per_call(cfg, 0, 8, 300, 1024)
    assert rows > 0 and note.startswith("run.max_rows=auto: weights 61.0 GiB")
