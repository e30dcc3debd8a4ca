import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from selection_noise import average_ranks, selection_stats, spearman  # noqa: E402


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
