"""How far the CMA-ES mean has wandered from the start, replayed from a run's checkpoint history.

    python tools/experiments/mean_walk.py runs/vs_grpo_eq/essa runs/vs_grpo_eq/essa_singular

When a generation's mini-batch ranks its candidates at chance (tools/experiments/selection_noise.py), each mean update
(Alg. 1, line 14) is a step in a random direction, and the steps add up like a random walk; CSA adapts sigma
far too slowly in ~1,000 dimensions to stop it (c_sigma ≈ (mu_eff + 2) / (n + mu_eff + 5) ≈ 0.007). This
replays the (seed, reward) history with essa_mpi's own SeededCMA and prints, per generation, the distance of
the mean from the start divided by the expected distance of one generation-0 candidate (sigma0 · ||stds||),
beside the run's validation rewards. Above 1 the mean is farther out than a typical first candidate.

The replay is exact (``exact``: its state fingerprint equals the checkpoint's) for step_scale=uniform. For
step_scale=singular the initial per-coordinate scales are the SFT singular values, which the checkpoint does
not keep (pycma folds the diagonal covariance into sigma_vec as it adapts); the replay then uses the final
sigma_vec, a few percent off, and says ``exact: false``. No model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tools/<group>/ -> the repository


def walk(run_dir: str) -> dict:
    """Replay run_dir's checkpoint history → {"ratio": [G] |mean_g| / (sigma0 ||stds||), "val": [[g, reward]],
    "exact": bool}."""
    from essa_mpi import checkpoint
    from essa_mpi.config import config_from_dict, step_scale
    from essa_mpi.run import make_search

    state = checkpoint.load(os.path.join(run_dir, checkpoint.FILENAME))
    cfg = config_from_dict(yaml.safe_load(state.config_yaml))  # the config the checkpoint was written with
    sigma_vec = state.cma["sigma_vec"]  # [n]: the final per-coordinate scales
    n = len(sigma_vec)
    stds = sigma_vec if step_scale(cfg) == "singular" else None  # uniform starts from ones: exact
    es = make_search(cfg, n, stds)
    first = cfg.search.sigma0 * np.linalg.norm(np.ones(n) if stds is None else stds)  # one gen-0 offset's norm
    ratio = []
    for g in range(state.generation):
        es.tell(state.seeds[g], state.rewards[g])  # Alg. 1, line 14, as the run did
        ratio.append(float(np.linalg.norm(es.mean) / first))  # the start is the zero offset
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        val = [[m["generation"], m["val_reward"]] for m in map(json.loads, fh) if "val_reward" in m]
    return {"run": run_dir, "step_scale": step_scale(cfg), "ratio": [round(r, 3) for r in ratio], "val": val,
            "exact": es.fingerprint() == state.fingerprint}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with checkpoint.h5 and metrics.jsonl)")
    args = ap.parse_args()
    sys.path.insert(0, ROOT)
    for run in args.runs:
        print(json.dumps(walk(run)))


if __name__ == "__main__":
    main()
