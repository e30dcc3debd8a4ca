"""The GRPO baseline's trainer settings are pinned: the values that made it train step for step like the
independent minimal script (tools/checks/grpo_minimal.py; tools/results/README.md, grpo_reconcile)."""

import argparse
import os
import sys

from fault_rows import tool

from essa_mpi.config import load_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools", "bench"))
import grpo_baseline  # noqa: E402

# What tools/checks/grpo_minimal.py writes out for 8 prompts x 8 completions at lr 3e-4 (the issue-25 runs).
MINIMAL = dict(learning_rate=3e-4, lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=64,
               num_generations=8, max_completion_length=12, temperature=1.0, beta=0.0, gradient_checkpointing=False,
               seed=0, bf16=False, use_cpu=True)


def settings(engine="hf"):
    args = argparse.Namespace(out="out", lr=3e-4, prompts=8, group=8, temperature=1.0, engine=engine)
    return grpo_baseline.grpo_settings(args, load_config(None, []))


def test_settings_match_the_minimal_script():
    s = settings()
    assert {k: s[k] for k in MINIMAL} == MINIMAL
    assert "use_vllm" not in s


def test_vllm_engine_is_trl_colocate_mode():
    s = settings("vllm")
    assert s["use_vllm"] is True and s["vllm_mode"] == "colocate"
    assert {k: s[k] for k in MINIMAL} == MINIMAL  # the engine changes nothing else


def test_trl_defaults_the_baseline_relies_on():
    from trl import GRPOConfig  # in the test extra, pinned to the version the baseline was reconciled with

    c = GRPOConfig(**settings())
    assert (c.loss_type, c.top_p, c.top_k, c.num_iterations, c.scale_rewards) == ("dapo", 1.0, 0, 1, "group")


def test_the_seed_decides_the_row_order_and_identity_keeps_the_tasks():
    a, b = grpo_baseline.row_order(300, 0, "seed"), grpo_baseline.row_order(300, 1, "seed")
    assert sorted(a) == list(range(300)) and (a != b).any() and (a == grpo_baseline.row_order(300, 0, "seed")).all()
    assert grpo_baseline.row_order(300, 7, "identity").tolist() == list(range(300))


def test_bad_config_input_is_one_line_before_any_training(tmp_path, capsys):
    for args, says in ((["--config", "/no/such.yaml"], "config file '/no/such.yaml' does not exist"),
                       (["search.popsze=3"], "did you mean 'search.popsize'"),
                       (["task.batch_size=0"], "task.batch_size=0 must be >= 1")):
        code = grpo_baseline.main(["--out", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        tool(f"grpo_baseline {' '.join(args)}", code, err)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
