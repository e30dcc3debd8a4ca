"""Run logging on rank 0: ``metrics.jsonl`` (one JSON object per generation), a tqdm progress bar, optional
TensorBoard scalars (``run.report_to=tensorboard``), and ``curves.png`` when the run ends.

Each line: generation, wall_s (since start of this process), reward_mean/std/max over the population,
sigma, allgather_bytes (this generation's record payload, all ranks, computed locally), sent_bytes (this
rank's records and trailer), eval_s / wait_s / exchange_s (slowest evaluation, this rank's wait for it, its
time in the collective), and val_reward (with val_s, the seconds validation took, best_adapter/ export
excluded) when measured.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from essa_mpi.checkpoint import writing
from essa_mpi.jsonl import read_rows


class MetricsLog:
    def __init__(self, output_dir: str, enabled: bool, progress: bool, total: int, start: int,
                 report_to: str = "none") -> None:
        self.enabled, self.t0 = enabled, time.time()
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.bar = self.tb = None
        if enabled and progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="ESSA", unit="gen", dynamic_ncols=True)
        if enabled and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {"wall_s": round(time.time() - self.t0, 3), **record}
        # one write per line; a line cut by a crash or a full disk is repaired by reconcile() on resume
        with writing(self.path, os.path.dirname(self.path), "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:  # the numbers, under the same names, at step = generation
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "generation":
                    self.tb.add_scalar(key, value, record.get("generation", 0))
        if self.bar is not None and "reward_mean" in record:
            self.bar.update(1)
            shown = {k: record[k] for k in ("reward_mean", "reward_max", "sigma", "val_reward") if k in record}
            self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()})

    def message(self, text: str, every_rank: bool = False) -> None:
        """Print on rank 0 (above the progress bar); ``every_rank``: the other ranks print theirs too."""
        if self.enabled:
            self.bar.write(text) if self.bar is not None else print(text, flush=True)
        elif every_rank:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.enabled:  # curves.png beside metrics.jsonl (python -m essa_mpi plot draws several runs)
            from essa_mpi.plot import plot

            plot([os.path.dirname(self.path)], os.path.join(os.path.dirname(self.path), "curves.png"))


def reward_stats(rewards: np.ndarray) -> dict:
    """A generation's population numbers from its [popsize] rewards (after the non-finite repair): the same
    float64 computation for the live line and for a line reconcile() re-creates from the checkpoint.

    >>> reward_stats(np.array([0.5, 0.25, 0.0], np.float32))
    {'reward_mean': 0.25, 'reward_std': 0.2041241452319315, 'reward_max': 0.5}
    """
    r = rewards.astype(np.float64)  # [popsize]
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "reward_max": float(r.max())}


def reconcile(path: str, generation: int, rewards: np.ndarray, sigmas: list, revalidate: bool = True) -> tuple:
    """Make metrics.jsonl agree with the checkpoint a resume starts from (rank 0): drop incomplete lines, the
    generations past the checkpoint and (``revalidate``) the checkpoint generation's validation, which the
    resume measures again; re-create from the
    checkpoint's records ([generation, popsize] rewards, the replayed sigma after each) any generation's line
    the log lacks (a kill between checkpoint and log). Every generation then appears exactly once.
    → (rows kept, note or None). The file is replaced whole (temp file, rename)."""
    rows, problems = read_rows(path) if os.path.isfile(path) else ([], [])
    last = {m.get("generation"): i for i, m in enumerate(rows) if "reward_mean" in m}  # a generation's newest line
    kept, seen = [], set()
    for i, m in enumerate(rows):
        g = m.get("generation", 0)
        if not isinstance(g, int) or g > generation or (g == generation and "val_reward" in m and revalidate):
            continue
        if "reward_mean" in m:
            if last[g] != i:  # an older line of the same generation (a run killed and resumed before this fix)
                continue
            seen.add(g)
        kept.append(m)
    restored = [g for g in range(1, generation + 1) if g not in seen]
    for g in restored:
        kept.append({"generation": g, **reward_stats(rewards[g - 1]), "sigma": float(sigmas[g - 1]),
                     "restored_from_checkpoint": True})
    kept.sort(key=lambda m: (m.get("generation", 0), "reward_mean" not in m))  # stable: a generation's line first
    with writing(path + ".tmp", os.path.dirname(path)) as fh:
        fh.writelines(json.dumps(m) + "\n" for m in kept)
    os.replace(path + ".tmp", path)
    notes = ([f"dropped {len(problems)} damaged line(s) ({', '.join(f'line {n}: {w}' for n, w in problems[:3])})"]
             if problems else []) + ([f"re-created generation(s) {restored} from the checkpoint"] if restored else [])
    return kept, (f"WARNING: {path}: {'; '.join(notes)}." if notes else None)
