import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "experiments"))
from selection_noise import average_ranks, selection_stats, spearman, table  # noqa: E402


def test_a_batch_that_sees_the_validation_ranking_selects_like_the_oracle():
    rng = np.random.default_rng(0)
    val = np.linspace(0.3, 0.5, 16)  # [C] distinct validation rewards
    pool = np.repeat(val[:, None], 20, axis=1)  # [C, P]: every prompt ranks the candidates as validation does
    s = selection_stats(pool, val, batch=5, draws=20, mu=8, seed=0)
    assert s["selection_gain"] == s["oracle_gain"] > 0 and s["ratio"] == 1.0 and s["spearman"] == 1.0
    noise = (rng.random((16, 400)) < 0.4).astype(float)  # [C, P]: rewards unrelated to validation
    s = selection_stats(noise, val, batch=24, draws=400, mu=8, seed=1)
    assert abs(s["ratio"]) < 0.2 and abs(s["spearman"]) < 0.1


def test_ties_share_their_rank():
    assert average_ranks(np.array([2.0, 1.0, 2.0, 0.0])).tolist() == [2.5, 1.0, 2.5, 0.0]
    assert spearman(np.ones(4), np.arange(4.0)) == 0.0


def test_table_row_reads_the_stored_rewards(tmp_path):
    """The table's row comes from the stored per-prompt rewards: prompts that separate, pool vs val ranking."""
    val = [0.3, 0.4, 0.5]  # [C]
    pool = [[0, 0, 1, 0], [0, 1, 1, 0], [1, 1, 1, 0]]  # [C, P]: prompts 0 and 1 separate, ranked like val
    by_batch = [{"batch": 48, "spearman": 0.5, "selection_gain": 0.01, "oracle_gain": 0.02}]
    (tmp_path / "r.json").write_text(json.dumps({"overrides": ["adapter.path=x", "search.sigma0=2"], "pool": 4,
                                                 "candidate_val_rewards": val, "pool_rewards": pool,
                                                 "start_val_reward": 0.45, "candidates_above_start": 1,
                                                 "by_batch": by_batch}))
    row = table(["r"], str(tmp_path)).splitlines()[-1]
    assert row == ("| search.sigma0=2 | 0.300 / 0.400 / 0.500 (start 0.450) | 1 of 3 | 2 of 4 | +1.00 "
                   "| +0.50, +1.00 / +2.00 |")
