import pickle

import numpy as np
import pytest

from essa_mpi.search import SeededCMA


def quadratic_reward(X):
    """Higher is better: peak at x = 1."""
    return -np.sum((X - 1.0) ** 2, axis=1)


def test_seeds_are_uint32_and_recomputable():
    a, b = SeededCMA(10, 8, 0.3, False, seed=5), SeededCMA(10, 8, 0.3, False, seed=5)
    assert a.seeds(3).dtype == np.uint32
    assert np.array_equal(a.seeds(3), b.seeds(3))
    assert not np.array_equal(a.seeds(3), a.seeds(4))
    assert not np.array_equal(a.seeds(3), SeededCMA(10, 8, 0.3, False, seed=6).seeds(3))


def test_candidate_k_depends_only_on_state_and_its_seed():
    s = SeededCMA(10, 4, 0.3, False, seed=0)
    seeds = s.seeds(0)
    X = s.ask(seeds)
    swapped = s.ask(seeds[[1, 0, 2, 3]])
    assert np.array_equal(X[[1, 0, 2, 3]], swapped)
    assert np.array_equal(X, s.ask(seeds)), "asking again must not change the candidates"


@pytest.mark.parametrize("diagonal", [False, True])
def test_same_history_gives_identical_state_and_maximises(diagonal):
    a, b = SeededCMA(8, 8, 0.5, diagonal, seed=1), SeededCMA(8, 8, 0.5, diagonal, seed=1)
    start = quadratic_reward(a.mean[None])[0]
    for g in range(40):
        seeds = a.seeds(g)
        r = quadratic_reward(a.ask(seeds))
        a.tell(seeds, r)
        b.tell(seeds, r)  # b never evaluated anything: it rebuilds the population from the seeds
        assert a.fingerprint() == b.fingerprint()
    assert quadratic_reward(a.mean[None])[0] > start + 4.0, "reward must rise (ESSA maximises)"
    assert ("C" in a.state_arrays()) == (not diagonal)


def test_fingerprint_sees_a_perturbation_and_pickle_repairs_it():
    a, b = SeededCMA(6, 4, 0.3, False, seed=0), SeededCMA(6, 4, 0.3, False, seed=0)
    b.es.mean[0] += 1e-12
    assert a.fingerprint() != b.fingerprint()
    b.set_es(pickle.loads(pickle.dumps(a.get_es())))
    assert a.fingerprint() == b.fingerprint()
    seeds = a.seeds(0)
    assert np.array_equal(a.ask(seeds), b.ask(seeds))


def test_flat_generation_leaves_state_untouched():
    s = SeededCMA(6, 4, 0.3, False, seed=0)
    before = s.fingerprint()
    assert s.tell(s.seeds(0), np.zeros(4)) is False
    assert s.fingerprint() == before
    assert s.tell(s.seeds(0), np.array([0.0, 0.0, 0.25, 0.0])) is True
    assert s.fingerprint() != before


def test_replay_reproduces_live_state_after_flat_generations():
    """Issue 11, item 8: live ranks ask() every generation (pycma may run its delayed eigendecomposition
    there), replay from a checkpoint only tells; with full covariance, 0/1 rewards and a flat last generation
    the two must still agree. n=64, lambda=16 as in the report (42 of 60 checkpoints failed before)."""
    live = SeededCMA(64, 16, 0.5, False, seed=3)
    rng = np.random.default_rng(0)
    history, flat_checked = [], 0
    for g in range(60):
        seeds = live.seeds(g)
        live.ask(seeds)  # what run.step does
        rewards = (rng.random(16) < (0.03 if g % 3 else 0.5)).astype(np.float32)  # often all zero
        live.tell(seeds, rewards)
        history.append((seeds, rewards))
        if np.all(rewards == rewards[0]):
            replay = SeededCMA(64, 16, 0.5, False, seed=3)
            for s, r in history:
                replay.tell(s, r)
            assert replay.fingerprint() == live.fingerprint(), f"generation {g + 1}"
            flat_checked += 1
    assert flat_checked >= 10


@pytest.mark.parametrize("diagonal,decoding", [(True, False), (False, False), (False, True)])
def test_per_coordinate_stds_scale_each_step_and_replay(diagonal, decoding):
    """search.step_scale=singular: coordinate i's initial spread is sigma0 * stds[i] (pycma CMA_stds); the
    state (sigma_vec included) still follows from the seeds alone, with or without diagonal decoding."""
    stds = np.array([0.01, 0.1, 1.0, 0.5])
    a = SeededCMA(4, 200, 0.2, diagonal, seed=0, stds=stds, diagonal_decoding=decoding)
    b = SeededCMA(4, 200, 0.2, diagonal, seed=0, stds=stds, diagonal_decoding=decoding)
    spread = a.ask(a.seeds(0)).std(axis=0)  # [4]
    np.testing.assert_allclose(spread / (0.2 * stds), 1.0, rtol=0.15)
    for g in range(5):
        r = quadratic_reward(a.ask(a.seeds(g)))
        a.tell(a.seeds(g), r)
        b.tell(a.seeds(g), r)
    assert a.fingerprint() == b.fingerprint()
    assert not np.allclose(a.state_arrays()["sigma_vec"], 1.0), "the checkpoint must hold the scales"


def test_mean_lr_moves_the_mean_that_fraction_of_the_standard_step():
    """search.mean_lr (pycma CMA_cmean): same population, same ranking; the mean takes c_m of the step."""
    full, damped = SeededCMA(12, 8, 0.5, True, seed=2), SeededCMA(12, 8, 0.5, True, seed=2, mean_lr=0.25)
    seeds = full.seeds(0)
    X = full.ask(seeds)  # [8, 12]
    assert np.array_equal(X, damped.ask(seeds))
    full.tell(seeds, quadratic_reward(X))
    damped.tell(seeds, quadratic_reward(X))
    np.testing.assert_allclose(damped.mean, 0.25 * full.mean, rtol=1e-12, atol=1e-15)
    assert np.abs(full.mean).max() > 0.01


@pytest.mark.parametrize("preloaded", ["", "import matplotlib.pyplot, scipy.stats; "])
def test_importing_the_search_skips_pycmas_plotting_and_stats_imports(preloaded):
    """pycma loads matplotlib.pyplot and scipy.stats at import (1.4 s of a rank's start-up); essa_mpi.search
    hides them while cma imports, then both import normally. A fresh interpreter counts what got loaded."""
    import subprocess
    import sys

    code = (preloaded + "import sys, warnings; warnings.simplefilter('error'); import essa_mpi.search as s; "
            "print(sorted(m for m in ('matplotlib', 'scipy', 'scipy.stats') if m in sys.modules)); "
            "print(s.cma.s._pyplot is not None); import matplotlib.pyplot, scipy.stats; print('imports ok'); "
            "x = s.SeededCMA(dim=3, popsize=4, sigma0=0.5, diagonal=False, seed=0); print(x.ask(x.seeds(0)).shape)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    loaded, pyplot, ok, shape = res.stdout.split("\n")[:4]
    if preloaded:  # already paid for by the caller: nothing is hidden, pycma gets its pyplot
        assert loaded == "['matplotlib', 'scipy', 'scipy.stats']" and pyplot == "True"
    else:
        assert loaded == "[]" and pyplot == "False"
    assert ok == "imports ok" and shape == "(4, 3)"
