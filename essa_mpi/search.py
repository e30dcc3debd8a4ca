"""CMA-ES (pycma) over a flat vector, with candidates drawn from uint32 seeds any rank can recompute.

    search = SeededCMA(dim=480, popsize=16, sigma0=0.3, diagonal=False, seed=0)
    seeds = search.seeds(generation)            # [popsize] uint32
    X = search.ask(seeds)                       # [popsize, dim] offsets
    search.tell(seeds, rewards)                 # rewards: higher is better

Candidate k of generation g uses seed_{g,k} = SeedSequence([seed, g, k]) → uint32. pycma draws its
standard normals through the ``randn`` option; we hand it one row per seed (``default_rng(seed_k)``),
so pycma's own sampling (B·D transform, diagonal decoding, bookkeeping) stays in charge and every rank
that knows the seeds builds bit-identical candidates (Alg. 1, lines 7, 10 and 14).

Sign convention: ESSA maximises reward, pycma minimises, so ``tell`` passes ``-reward``.
"""

from __future__ import annotations

import hashlib
import sys
import warnings

import numpy as np

# Every rank imports pycma. At import it also loads matplotlib.pyplot and scipy.stats when they are installed
# (cma/s.py for plotting, cma/fitness_models.py for surrogate models; neither is used here), which took 1.4 s of
# each rank's 3.3 s start-up on our CI machine and, on a cluster, reads their files from the shared filesystem
# on every rank. They are hidden only while cma imports (it falls back by itself); later imports see them again.
_HIDDEN = [m for m in ("matplotlib", "scipy") if m not in sys.modules]
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pycma warns that matplotlib.pyplot is missing: cma.plot() is not used
    sys.modules.update(dict.fromkeys(_HIDDEN))  # a None entry makes `import x` raise ImportError
    try:
        import cma
    finally:
        for _m in _HIDDEN:
            del sys.modules[_m]


class SeededNormal:
    """pycma ``randn(number, dim)`` replacement: row i is N(0, I) from ``default_rng(seeds[i])``."""

    def __init__(self) -> None:
        self.seeds: list = []

    def __call__(self, number: int, dim: int) -> np.ndarray:
        if number != len(self.seeds):
            raise RuntimeError(f"pycma asked for {number} samples but {len(self.seeds)} seeds are queued")
        rows = [np.random.default_rng(int(s)).standard_normal(dim) for s in self.seeds]
        self.seeds = []
        return np.stack(rows)  # [number, dim]


class SeededCMA:
    """pycma CMAEvolutionStrategy whose samples are functions of (state, seeds) only.

    Two ranks with the same arguments draw the same candidates and reach the same state:

    >>> a, b = (SeededCMA(dim=6, popsize=4, sigma0=0.5, diagonal=False, seed=3) for _ in range(2))
    >>> seeds = a.seeds(0)
    >>> bool((a.ask(seeds) == b.ask(seeds)).all())
    True
    >>> rewards = -np.abs(a.ask(seeds)).sum(axis=1)  # [popsize]: best near zero offsets
    >>> a.tell(seeds, rewards), b.tell(seeds, rewards), a.fingerprint() == b.fingerprint()
    (True, True, True)
    >>> a.tell(a.seeds(1), np.zeros(4))  # a flat generation ranks nothing: no update
    False
    """

    def __init__(self, dim: int, popsize: int, sigma0: float, diagonal: bool, seed: int,
                 stds: np.ndarray | None = None, diagonal_decoding: bool = False, mean_lr: float = 1.0) -> None:
        """stds [dim]: per-coordinate multipliers of sigma0 (pycma ``CMA_stds``; None = 1 everywhere).
        diagonal_decoding: pycma's ``CMA_diagonal_decoding`` (learns per-coordinate scales on top of a full C).
        mean_lr: pycma's ``CMA_cmean``, the mean's learning rate c_m (1 = the standard update, Alg. 1 line 14);
        below 1 the mean moves that fraction of the way to the selected candidates ("mutate large, inherit
        small", the standard remedy for noisy rankings)."""
        self.dim, self.popsize, self.seed = dim, popsize, seed
        self.randn = SeededNormal()
        opts = {
            "popsize": popsize,
            "CMA_diagonal": bool(diagonal),
            "CMA_mirrors": 0,  # mirrored samples would break "one seed, one candidate"
            # CSA step size: TPA would inject mean-shift samples that come from no seed.
            "AdaptSigma": cma.sigma_adaptation.CMAAdaptSigmaCSA,
            "mean_shift_line_samples": False,
            "randn": self.randn,
            "seed": np.nan,  # pycma must not reseed numpy's global RNG; our seeds drive sampling
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
            "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolstagnation": int(1e9),  # the run decides when to stop
            "CMA_diagonal_decoding": float(diagonal_decoding),
            "CMA_cmean": float(mean_lr),
        }
        if stds is not None:
            assert np.shape(stds) == (dim,) and np.all(np.asarray(stds) > 0), "stds must be [dim] and positive"
            opts["CMA_stds"] = np.asarray(stds, dtype=np.float64)  # [dim]
        # Alg. 1, line 7: same initial state on every rank (mean = zero offsets from the SFT values).
        self.es = cma.CMAEvolutionStrategy(np.zeros(dim), sigma0, opts)

    def seeds(self, generation: int) -> np.ndarray:
        """uint32 seeds of generation g, candidate k = 0..popsize-1."""
        return np.array([np.random.SeedSequence([self.seed, generation, k]).generate_state(1, np.uint32)[0]
                         for k in range(self.popsize)], dtype=np.uint32)  # [popsize]

    def ask(self, seeds: np.ndarray) -> np.ndarray:
        """Alg. 1, line 10: x_k = m + sigma * B D z_k with z_k drawn from seed k (sec. 3.2, step 1)."""
        assert len(seeds) == self.popsize
        self.randn.seeds = [int(s) for s in seeds]
        return np.asarray(self.es.ask())  # [popsize, dim]

    def tell(self, seeds: np.ndarray, rewards: np.ndarray) -> bool:
        """Alg. 1, line 14: rebuild the population from the seeds, one local CMA-ES update.

        Returns False, leaving the state untouched, when every candidate earned the same reward: such a
        generation ranks nothing (common with 0/1 rewards on small mini-batches), and pycma would move the
        mean by an arbitrary step and inflate sigma ("flat fitness"). Deterministic, so all ranks agree.
        """
        rewards = np.asarray(rewards, dtype=np.float64)
        # Rebuild first, flat or not: the live ranks called ask() this generation, which may run pycma's
        # delayed eigendecomposition; a replay from the checkpoint must do the same to reach the same state.
        X = self.ask(seeds)  # [popsize, dim]
        if np.all(rewards == rewards[0]):
            return False
        self.es.tell(list(X), (-rewards).tolist())  # maximise reward
        return True

    @property
    def mean(self) -> np.ndarray:
        return np.array(self.es.mean)  # [dim]

    @property
    def sigma(self) -> float:
        return float(self.es.sigma)

    def state_arrays(self) -> dict:
        """The numeric CMA-ES state (what the checkpoint stores and the fingerprint hashes)."""
        es = self.es
        state = {
            "mean": np.asarray(es.mean, dtype=np.float64),
            "sigma": np.float64(es.sigma),
            "pc": np.asarray(es.pc, dtype=np.float64),
            "ps": np.asarray(getattr(es.adapt_sigma, "ps", np.zeros(self.dim)), dtype=np.float64),
            "countiter": np.int64(es.countiter),
            "countevals": np.int64(es.countevals),
        }
        scaling = getattr(es.sigma_vec, "scaling", None)
        state["sigma_vec"] = np.broadcast_to(np.asarray(1.0 if scaling is None else scaling, float), (self.dim,)).copy()
        C = getattr(es.sm, "C", None)
        if C is not None:
            state["C"] = np.asarray(C, dtype=np.float64)  # [dim, dim]
        return state

    def fingerprint(self) -> int:
        """64-bit hash of state_arrays(): equal on all ranks iff their states are bit-identical."""
        h = hashlib.sha256()
        for key, value in sorted(self.state_arrays().items()):
            h.update(key.encode())
            h.update(np.ascontiguousarray(value).tobytes())
        return int.from_bytes(h.digest()[:8], "little")

    # pycma objects pickle; used only for the rank-0 repair broadcast, never for checkpoints.
    def get_es(self) -> cma.CMAEvolutionStrategy:
        return self.es

    def set_es(self, es: cma.CMAEvolutionStrategy) -> None:
        self.es = es
        self.randn = es.opts["randn"]
        es.sm.randn = self.randn
