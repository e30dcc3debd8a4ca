import numpy as np
import pytest

from essa_mpi.config import TaskConfig
from essa_mpi.population import PopulationEvaluator
from essa_mpi.shares import candidate_rewards
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
from essa_mpi.tasks import build_task

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture()
def evaluator(tiny_dir):
    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model

    model, tok = load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))
    task = build_task(TaskConfig(name="toy", val_size=4), seed=0)
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, TARGETS, 4, 8.0, seed=0), fraction=1.0)
    return PopulationEvaluator(model, tok, adapter, task, max_new_tokens=8, max_rows=1000)


@pytest.mark.parametrize("max_rows", [1000, 10])  # one generate call, or groups of whole candidates
def test_batched_equals_one_candidate_at_a_time(evaluator, max_rows):
    evaluator.max_rows = max_rows
    examples = evaluator.task.train[:5]
    X = np.random.default_rng(0).standard_normal((6, evaluator.adapter.solution_length))  # [C, n]
    batched = evaluator.completions(X, examples)
    sequential = sum((evaluator.completions(X[c:c + 1], examples) for c in range(len(X))), [])
    assert batched == sequential
    assert len(set(batched)) > len(examples), "candidates should produce different generations"
    rewards = candidate_rewards(evaluator.prompt_rewards(batched, examples, len(X)))
    assert rewards.shape == (6,) and rewards.std() > 0


def test_zero_offsets_on_fresh_adapter_equal_base_model(evaluator):
    examples = evaluator.task.train[:3]
    zero = np.zeros((2, evaluator.adapter.solution_length))
    base = evaluator.generate(None, evaluator.encode(examples))
    assert evaluator.completions(zero, examples) == base * 2  # B = 0: delta W = 0


def test_non_finite_row_reward_marks_the_candidate(evaluator):
    evaluator.task.reward = lambda completions, **_: [1.0, float("nan")] * (len(completions) // 2)
    rows = [{"prompt": "p", "answer": ""}] * 2
    # a NaN prompt reward makes the candidate's NaN (run.py ranks it worst and logs it), never a silent 0
    assert np.isnan(candidate_rewards(evaluator.prompt_rewards(["a", "b"], rows, 1))).all()


def test_score_counts_non_finite_rows(evaluator):
    evaluator.task.reward = lambda completions, **_: [float("nan")] + [1.0] * (len(completions) - 1)
    sums = evaluator.score(None, evaluator.task.val[:4])
    assert sums["reward"] == (3.0, 4) and sums["nonfinite"] == (1, 4)


@pytest.mark.parametrize("bad, match", [(lambda completions, **_: [1.0], "returned 1 values for 2"),
                                        (lambda completions, **_: 1 / 0, "raised ZeroDivisionError")])
def test_broken_reward_is_an_error_naming_it(evaluator, bad, match):
    evaluator.task.reward = bad
    with pytest.raises(RuntimeError, match=match):
        evaluator.prompt_rewards(["a", "b"], [{"prompt": "p", "answer": ""}] * 2, 1)


@pytest.fixture(scope="module")
def shipped_decoding(tiny_dir, tmp_path_factory):
    """The tiny model again, now shipping a generation_config.json as Qwen2.5-Instruct does (sampling values,
    a repetition penalty), made strong enough to change every greedy completion."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("shipped") / "model"
    shutil.copytree(tiny_dir, out)
    cfg = json.loads((out / "generation_config.json").read_text())
    cfg.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=50.0, no_repeat_ngram_size=1)
    (out / "generation_config.json").write_text(json.dumps(cfg))
    return str(out)


def test_a_models_generation_config_changes_no_completion(tiny_dir, shipped_decoding):
    """Search and validation decode greedily as configured, and eval samples with temperature and top_p only,
    whatever the model's generation_config.json holds (transformers fills unset values from it)."""
    import torch

    from essa_mpi.config import Config, ModelConfig
    from essa_mpi.evaluate import sample
    from essa_mpi.model import load_model

    task = build_task(TaskConfig(name="toy", val_size=4), seed=0)
    X = np.random.default_rng(0).standard_normal((3, 2 * 8 * 4))  # [C, n]: 8 matrices x 2 x r=4
    out, draws = [], []
    for path in (tiny_dir, shipped_decoding):
        model, tok = load_model(ModelConfig(name_or_path=path, device="cpu"))
        adapter = SVDLoRA.attach(model, fresh_lora_factors(model, TARGETS, 4, 8.0, seed=0), fraction=1.0)
        ev = PopulationEvaluator(model, tok, adapter, task, max_new_tokens=8, max_rows=1000)
        out.append(ev.completions(X, task.train[:4]) + ev.generate(None, ev.encode(task.val)))
        adapter.clear()
        cfg = Config()
        cfg.eval.k, cfg.eval.max_new_tokens = 2, 8
        torch.manual_seed(0)
        draws.append(sample(model, tok, ["1+1", "2+3"], cfg))
    assert out[0] == out[1] and draws[0] == draws[1]
    assert model.ignored_decoding["repetition_penalty"] == 50.0  # said in the run's first lines
