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
        with open(self.path, "a") as fh:
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
