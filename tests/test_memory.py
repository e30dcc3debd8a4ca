"""The memory model, `python -m essa_mpi plan` over every shipped job, the preflight that refuses what cannot fit."""

import glob
import json
import os
import shutil

import pytest
from fault_rows import tool

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
    assert not small.fits and small.reason == "the runtime and the weights alone exceed it"
    too_many = memory.plan(a, "bf16", 512, 1024, memory.Device("cuda", 80 * GiB), want=512)
    assert not too_many.fits and "run.max_rows=512 exceeds" in too_many.reason


MiB = 2**20
Q7 = "Qwen--Qwen2.5-7B-Instruct"  # 28 layers, hidden 3584, 28 heads, 4 KV heads, head_dim 128, ffn 18944, vocab 152064


def test_prefill_moment_worked_by_hand():
    """Qwen2.5-7B, bf16, a 512-token prompt, one row:
    prompt KV cache   28 layers x 4 kv heads x 128 x 2 (K, V) x 2 bytes x 512       = 29,360,128 B = 28.0 MiB
    one layer's work  512 x ((4 x 3584 + 3 x 3584 + 2 x 512 + 3 x 18944) x 2 + 2 x 3584 x 4 (fp32 LoRA copy))
                      = 512 x (82,944 x 2 + 28,672) = 512 x 194,560                  = 99,614,720 B = 95.0 MiB
    mask              512 x 512 bytes                                                 =    262,144 B
    last logits       152,064 x 4                                                     =    608,256 B
    total                                                                             = 129,845,248 B"""
    assert memory.prefill_bytes(arch(Q7), "bf16", 512) == 29_360_128 + 99_614_720 + 262_144 + 608_256
    assert memory.prefill_bytes(arch(Q7), "bf16", 512, g=2) == 29_360_128 // 2 + 99_614_720 + 262_144 + 608_256


def test_decode_moment_worked_by_hand():
    """Qwen2.5-7B, bf16, 512 + 1024 = 1536 tokens, one row at the last step:
    KV cache               28 x 4 x 128 x 2 x 2 x 1536                = 88,080,384 B = 84.0 MiB
    K/V expanded for SDPA  28 query heads x 128 x 2 x 2 x 1536 (one layer) = 22,020,096 B = 21.0 MiB
    the cache's growth     one layer's K/V copied: 88,080,384 / 28     =  3,145,728 B
    logits                 152,064 x 4 x 3                             =  1,824,768 B"""
    assert memory.decode_bytes(arch(Q7), "bf16", 1536) == 88_080_384 + 22_020_096 + 3_145_728 + 1_824_768


def test_the_larger_moment_and_what_both_hold_decide_the_rows():
    """H100 as reported (79.6 GiB) x headroom 0.9 = 76,922,864,271 B; runtime 1 GiB (1,073,741,824 B) and the
    weights (15,230,974,976 B) are held at both moments, leaving 60,618,147,471 B; a row is the larger moment,
    129,845,248 B (prefill, above, over decode's 115,070,976 B): 60,618,147,471 // 129,845,248 = 466 rows. The
    old model added the full cache to the prefill activations (84 + 92 MiB a row) and planned 80 GiB: 338 rows."""
    a, dev = arch(Q7), memory.Device("cuda", int(79.6 * GiB))
    p = memory.plan(a, "bf16", 512, 1024, dev)
    room = int(dev.memory * 0.9) - memory.RUNTIME["cuda"] - memory.weight_bytes(a, "bf16")
    assert p.row == 129_845_248 and p.rows == int(room // 129_845_248) == 466 and p.fits
    assert "a row at prefill: KV cache 28.0 MiB" in p.terms
    longer = memory.plan(a, "bf16", 512, 4096, dev)  # a long answer: the decode moment is the larger
    assert longer.row == memory.decode_bytes(a, "bf16", 4608) and "last decoding step" in longer.terms


def test_reward_model_weights_and_batch_worked_by_hand():
    """ArmoRM-Llama3-8B (Llama-3-8B shape, a sequence classifier: no LM head), bf16:
    weights  Llama-3.1-8B's 16,060,522,496 B - its head 128,256 x 4096 x 2 = 15,009,849,344 B = 13.98 GiB;
    its batch of 8 rows of 1024 tokens: 8 x prefill_bytes(1024) (each row's cache, one layer, mask, logits).
    Both moments hold the reward weights; its batch comes after generation, so the larger moment decides."""
    rm = memory.Reward(arch("RLHFlow--ArmoRM-Llama3-8B-v0.1"), "bf16", 8, 1024)
    llama = arch("meta-llama--Llama-3.1-8B-Instruct")
    assert rm.weights == memory.weight_bytes(llama, "bf16") - 128_256 * 4096 * 2 == 15_009_849_344
    assert rm.moment == 8 * memory.prefill_bytes(llama, "bf16", 1024)
    dev = memory.Device("cuda", int(79.6 * GiB))
    alone, beside = memory.plan(llama, "bf16", 512, 512, dev), memory.plan(llama, "bf16", 512, 512, dev, reward=rm)
    assert beside.reward == rm.weights and beside.rows == int((alone.budget - memory.RUNTIME["cuda"] - alone.weights
                                                              - rm.weights) // beside.row) < alone.rows
    few = memory.plan(llama, "bf16", 512, 512, dev, want=1, reward=rm)  # one row: the reward's batch is the peak
    assert few.moment == "reward" and few.peak == int(memory.RUNTIME["cuda"] + few.weights + rm.weights + rm.moment)


def test_vllm_leaves_the_reward_model_its_share_or_says_the_fraction():
    llama, rm = arch("meta-llama--Llama-3.1-8B-Instruct"), memory.Reward(arch("RLHFlow--ArmoRM-Llama3-8B-v0.1"),
                                                                          "bf16", 8, 1024)
    gpu = int(79.6 * GiB)
    problem = memory.vllm_check(llama, "bf16", 1024, gpu, 0.85, 1, rm)
    assert problem and "set model.vllm_memory_fraction=0.78 or lower" in problem  # 1 - (1 + 13.98 + 2.43) / 79.6
    assert memory.vllm_check(llama, "bf16", 1024, gpu, 0.78, 1, rm) is None


def test_a_gpus_total_is_what_mem_get_info_reports(monkeypatch):
    """rank_memory reads torch.cuda.mem_get_info's total (an H100 reports 79.6 GiB), not a nominal 80."""
    import torch

    from essa_mpi import launch

    monkeypatch.setattr(launch, "placement", lambda *a: (torch.device("cuda", 0), None))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=None: (70 * GiB, 85_520_809_984))  # 79.65 GiB
    assert memory.rank_memory(load_config(None, []).model, 0, 1) == memory.Device("cuda", 85_520_809_984, 1)


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
    with pytest.raises(ValueError, match=r"runtime 1\.0 GiB \+ weights 61\.0 GiB .* of 43\.2 GiB per device: the "
                                         r"runtime and the weights alone exceed it; use model.gpus_per_rank=2"):
        memory.check_memory(cfg, 0, 8, prompt_tokens=300)
    monkeypatch.setattr(memory, "rank_memory", lambda *a: memory.Device("cuda", 80 * GiB))
    memory.check_memory(cfg, 0, 8, prompt_tokens=300)  # fits: no error
    rows, note = memory.rows_per_call(cfg, 0, 8, 300, 1024)
    assert rows > 0 and note.startswith("run.max_rows=auto: runtime 1.0 GiB + weights 61.0 GiB")


def test_plan_names_the_engine_and_why(capsys):
    job = os.path.join(ROOT, "jobs", "gsm8k.yaml")
    plan_main(["--config", job, "--model-config", CONFIGS])
    assert "engine: model.engine=auto: vllm on these GPUs where vLLM imports" in capsys.readouterr().out
    plan_main(["--config", job, "--model-config", CONFIGS, "--gpus-per-node", "0", "--ram-gib", "512"])
    assert "engine: model.engine=auto: hf (no CUDA device on this rank)" in capsys.readouterr().out
    plan_main(["--config", job, "--model-config", CONFIGS, "model.precision=int4"])
    assert "auto: hf (model.precision=int4; vLLM runs fp32 or bf16 here)" in capsys.readouterr().out


@pytest.mark.parametrize("overrides", [["run.max_rows=-1"], ["sft.micro_batch=-1"], ["run.memory_headroom=1.5"],
                                       ["search.popsize=1"], ["adapter.fraction=1.5"], ["task.batch_size=0"],
                                       ["task.max_new_tokens=0"], ["model.vllm_memory_fraction=0"],
                                       ["model.engine=vllm", "model.precision=int4"]])
def test_plan_refuses_what_a_run_refuses_with_the_same_line(overrides, capsys):
    """plan applies config.validate, the very checks a run makes of the values (it used to print "fits")."""
    from essa_mpi.config import validate

    with pytest.raises(ValueError) as exc:
        validate(load_config(None, overrides), 1, "run")
    code = plan_main(["--gpus-per-node", "0", *overrides])
    err = capsys.readouterr().err
    tool(f"plan {' '.join(overrides)}", code, err)
    assert code == 2 and str(exc.value) in err


@pytest.mark.parametrize("args, says", [(["--prompt-tokens", "0"], "--prompt-tokens=0 must be at least 1"),
                                        (["--prompt-tokens", "-5"], "--prompt-tokens=-5 must be at least 1"),
                                        (["--gib-per-gpu", "0"], "--gib-per-gpu=0 must be a positive number")])
def test_plan_refuses_its_own_bad_numbers(args, says, capsys):
    code = plan_main(["--gpus-per-node", "0", *args])
    err = capsys.readouterr().err
    tool(f"plan {' '.join(args)}", code, err)
    assert code == 2 and says in err


@pytest.mark.parametrize("content, says", [
    ({"num_hidden_layers": 2}, "hidden_size is missing"),
    ([1, 2], "a model config is a JSON object of fields"),
    ({**json.load(open(os.path.join(CONFIGS, "Qwen--Qwen2.5-7B-Instruct.json"))), "num_attention_heads": 0},
     "num_attention_heads=0 must be at least 1"),
    ({**json.load(open(os.path.join(CONFIGS, "Qwen--Qwen2.5-7B-Instruct.json"))), "hidden_size": "32"},
     "hidden_size='32' must be a whole number"),
    ("{not json", "is not readable JSON"),
])
def test_plan_model_config_problems_are_one_line_naming_file_and_key(tmp_path, content, says, capsys):
    path = tmp_path / "config.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    job = os.path.join(ROOT, "jobs", "gsm8k.yaml")
    code = plan_main(["--config", job, "--model-config", str(path)])
    err = capsys.readouterr().err
    tool(f"plan --model-config: {says}", code, err)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(path) in err and says in err, err


def test_a_tiny_headroom_is_named_as_the_cause(qwen32_dir, monkeypatch):
    """run.memory_headroom=0.02 used to be reported as weights that cannot fit, with no word of the headroom."""
    monkeypatch.setattr(memory, "rank_memory", lambda *a: memory.Device("cuda", 80 * GiB))
    cfg = load_config(None, [f"model.name_or_path={qwen32_dir}", "run.memory_headroom=0.02"])
    with pytest.raises(ValueError, match=r"use a run.memory_headroom above 0.02 \(the share it plans for"):
        memory.check_memory(cfg, 0, 8, prompt_tokens=300)


def test_plan_suggests_only_what_fits_and_names_the_model_planned(capsys):
    """72B on 24 GiB GPUs: the old fix, model.gpus_per_rank=2, still could not fit (68 GiB a GPU); 8 does."""
    cfg72 = os.path.join(CONFIGS, "Qwen--Qwen2.5-72B-Instruct.json")
    job = os.path.join(ROOT, "jobs", "gsm8k.yaml")
    code = plan_main(["--config", job, "--model-config", cfg72, "--gib-per-gpu", "24"])
    out = capsys.readouterr().out
    tool("plan of a 72B model on 24 GiB GPUs", code, next(x for x in out.splitlines() if "fix:" in x).strip())
    assert code == 1
    assert out.startswith(f"the model of {cfg72} (bf16)")
    assert "fix: model.gpus_per_rank=8, or lower task.max_new_tokens" in out and "gpus_per_rank=2" not in out
