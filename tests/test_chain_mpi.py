"""End-to-end under mpiexec: the SFT warm start chained before ESSA (cached), and reward failures."""

import json
import os
import time

from fault_rows import error_line, record
from test_cli_mpi import metrics, mpirun, tiny_args


def test_sft_then_essa_chain_reuses_the_cached_adapter(tiny_dir, tmp_path):
    sft_dir = tmp_path / "sft"
    chain = [a for a in tiny_args(tiny_dir, tmp_path / "a") if a != "adapter.warm_start=none"]
    chain += ["adapter.warm_start=sft", f"sft.output_dir={sft_dir}", "sft.learning_rate=1e-2"]
    first = mpirun(2, chain)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "SFT warm start: training 64 rows" in first.stdout and (sft_dir / "adapter_config.json").exists()
    summary = json.loads(first.stdout.strip().splitlines()[-1])
    assert list(summary["val_chain"]) == ["base", "SFT", "ESSA"]
    assert summary["val_chain"]["base"] != summary["val_chain"]["SFT"], "the SFT adapter changed nothing"
    stamp = os.path.getmtime(sft_dir / "adapter_model.safetensors")
    second = mpirun(2, [a.replace(str(tmp_path / "a"), str(tmp_path / "b")) for a in chain])
    assert second.returncode == 0 and f"using cached {sft_dir}" in second.stdout
    assert os.path.getmtime(sft_dir / "adapter_model.safetensors") == stamp


def test_sft_command_alone(tiny_dir, tmp_path):
    res = mpirun(1, ["sft", f"model.name_or_path={tiny_dir}", "model.device=cpu", "adapter.rank=2", "task.name=toy",
                     "task.val_size=2", f"sft.output_dir={tmp_path}/s"])
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["adapter"] == f"{tmp_path}/s" and out["cached"] is False and out["steps"] == 4


def test_reward_that_raises_stops_every_rank_with_its_name(tiny_dir, tmp_path):
    res = mpirun(2, tiny_args(tiny_dir, tmp_path / "r") + ["task.reward_fn=mpi_rewards:raises_on_long"], timeout=120)
    assert res.returncode != 0
    assert "reward function raises_on_long raised RuntimeError: boom" in res.stderr


def test_nan_rewards_count_as_worst_and_are_logged(tiny_dir, tmp_path):
    out = tmp_path / "n"
    res = mpirun(2, tiny_args(tiny_dir, out) + ["task.reward_fn=mpi_rewards:nan_for_some"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(str(out))
    flagged = [m for m in rows if m.get("nonfinite_candidates") or m.get("val_nonfinite")]
    assert flagged, "non-finite rewards were not logged"
    assert all(m["reward_mean"] == m["reward_mean"] for m in rows if "reward_mean" in m)  # no NaN reaches CMA-ES


def test_a_reward_that_is_never_finite_fails_in_one_line(tiny_dir, tmp_path):
    """A reward returning NaN for every completion used to end with exit 0 and "validation 0.000", no word."""
    t = time.time()
    res = mpirun(2, tiny_args(tiny_dir, tmp_path / "n") + ["task.reward_fn=mpi_rewards:all_nan"])
    record("fault", "reward returns NaN for every completion", res.returncode, time.time() - t,
           error_line(res.stderr), "nothing (before generation 1)")
    assert res.returncode == 1, res.stderr[-3000:]
    assert ("the base model's validation: all 4 rewards were not finite (NaN or inf): the reward function returns "
            "no usable number") in res.stderr, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
