"""The ESSA loop (Alg. 1): seeds → candidates → evaluate → Allgather → tell → checkpoint → log.

    mpiexec -n 2 python -m essa_mpi --config jobs/smollm2_arithmetic.yaml
    mpiexec -n 2 python -m essa_mpi --resume runs/essa          # continue a killed run

Every rank holds the same CMA-ES; rank r evaluates its contiguous share of the population and sends one
8-byte (seed, reward) record per candidate. Only rank 0 writes files.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from essa_mpi import checkpoint
from essa_mpi.comm import RECORD, Comm, default_threads
from essa_mpi.config import Config, searched_per_factor
from essa_mpi.export import export_adapter
from essa_mpi.metrics import MetricsLog
from essa_mpi.model import load_model
from essa_mpi.population import PopulationEvaluator
from essa_mpi.search import SeededCMA
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors, load_lora_factors
from essa_mpi.tasks import Task, batch_indices, build_task

DIAGONAL_ABOVE = 500  # covariance=auto: full CMA-ES up to this solution length, diagonal beyond


@dataclass
class Parts:
    task: Task
    adapter: SVDLoRA
    evaluator: PopulationEvaluator
    search: SeededCMA


def build(cfg: Config, comm: Comm, task: Task) -> Parts:
    """Load the model on this rank and wire adapter, evaluator and search (Alg. 1, lines 1-7)."""
    torch.set_num_threads(cfg.model.threads or default_threads(comm.local_size))
    model, tok = load_model(cfg.model, comm.local_rank)
    a = cfg.adapter
    if a.path:
        factors = load_lora_factors(model, a.path, a.target_modules, a.rank)
    else:
        factors = fresh_lora_factors(model, a.target_modules, a.rank, a.alpha, cfg.search.seed)
    adapter = SVDLoRA.attach(model, factors, a.fraction, seed=cfg.search.seed)
    assert adapter.k == searched_per_factor(cfg)
    n = adapter.solution_length
    diagonal = cfg.search.covariance == "diagonal" or (cfg.search.covariance == "auto" and n > DIAGONAL_ABOVE)
    search = SeededCMA(n, cfg.search.popsize, cfg.search.sigma0, diagonal, cfg.search.seed)
    ev = PopulationEvaluator(model, tok, adapter, task, cfg.task.max_new_tokens, cfg.run.max_rows)
    return Parts(task, adapter, ev, search)


def validate_mean(p: Parts, comm: Comm) -> float:
    """Validation accuracy at the search mean; the held-out prompts are split over ranks."""
    mine = p.task.val[comm.rank:: comm.size]
    local = p.evaluator.score_mean(p.search.mean, mine) if mine else 0.0
    total = comm.allreduce_sum(np.array([local, len(mine)]))
    return float(total[0] / max(total[1], 1))


def sync_search(search: SeededCMA, comm: Comm, log: MetricsLog, generation: int) -> bool:
    """Compare CMA-ES fingerprints; on a mismatch rank 0 broadcasts its state. True if a repair happened."""
    if comm.fingerprints_agree(search.fingerprint()):
        return False
    es = comm.bcast(search.get_es() if comm.rank == 0 else None)
    if comm.rank != 0:
        search.set_es(es)
    msg = f"generation {generation}: CMA-ES states diverged across ranks; adopted rank 0's state"
    warnings.warn(msg)
    log.message("WARNING: " + msg)
    return True


def step(p: Parts, cfg: Config, comm: Comm, g: int) -> tuple:
    """One generation → (gathered records [popsize] (seed, reward), candidates [popsize, n], whether
    CMA-ES updated); all identical on all ranks."""
    seeds = p.search.seeds(g)  # [popsize] uint32
    X = p.search.ask(seeds)  # [popsize, n] — every rank draws all; Alg. 1, line 10
    mine = comm.my_slice(cfg.search.popsize)
    idx = batch_indices(len(p.task.train), cfg.task.batch_size, cfg.search.seed, g)  # [batch]
    batch = [p.task.train[i] for i in idx]
    local = np.empty(mine.stop - mine.start, dtype=RECORD)
    local["seed"] = seeds[mine]
    local["reward"] = p.evaluator.evaluate(X[mine], batch)  # Alg. 1, line 11
    records = comm.allgather_records(local, cfg.search.popsize)  # Alg. 1, line 13
    assert (records["seed"] == seeds).all(), "gathered seeds differ from this rank's seeds"
    updated = p.search.tell(records["seed"], records["reward"])  # Alg. 1, line 14
    return records, X, updated


def replay(p: Parts, state: checkpoint.RunState) -> None:
    """Rebuild the CMA-ES state from the checkpoint's (seed, reward) history and check its fingerprint."""
    for g in range(state.generation):
        p.search.tell(state.seeds[g], state.rewards[g])
    if p.search.fingerprint() != state.fingerprint:
        raise ValueError("replaying the checkpoint's history did not reproduce its CMA-ES state (different "
                         "cma/numpy version or edited config?); resume with the versions that wrote it.")


def run(cfg: Config, comm: Comm, task: Task, state: checkpoint.RunState | None = None) -> dict:
    """Alg. 1, lines 8-16. ``state`` continues a checkpointed run."""
    out = cfg.run.output_dir
    lead = comm.rank == 0
    if lead:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as fh:
            fh.write(cfg.to_yaml())
    p = build(cfg, comm, task)
    start = 0 if state is None else state.generation
    log = MetricsLog(out, lead, cfg.run.progress, cfg.run.generations, start)
    log.message(f"ESSA: {comm.size} ranks, solution_length={p.adapter.solution_length} "
                f"({len(p.adapter.modules)} matrices x 2 x {p.adapter.k}), popsize={cfg.search.popsize}")
    seeds = np.zeros((0, cfg.search.popsize), np.uint32) if state is None else state.seeds
    rewards = np.zeros((0, cfg.search.popsize), np.float32) if state is None else state.rewards
    best, best_reward = (None, -np.inf) if state is None else (state.best, state.best_reward)
    if state is not None:
        replay(p, state)
    val = {}
    t0 = time.time()
    for g in range(start, cfg.run.generations + 1):
        if cfg.task.val_size and (g % cfg.task.val_every == 0 or g == cfg.run.generations) and (g > start or g == 0):
            val[g] = validate_mean(p, comm)
            log.log({"generation": g, "val_accuracy": val[g]})
        if g == cfg.run.generations:
            break
        sent = comm.bytes_sent
        records, X, updated = step(p, cfg, comm, g)
        repaired = sync_search(p.search, comm, log, g + 1)
        r = records["reward"].astype(np.float64)
        if r.max() > best_reward:
            best, best_reward = X[int(r.argmax())], float(r.max())
        seeds, rewards = np.vstack([seeds, records["seed"]]), np.vstack([rewards, records["reward"]])
        if lead:
            checkpoint.save(os.path.join(out, checkpoint.FILENAME), checkpoint.RunState(
                generation=g + 1, data_cursor=(g + 1) * cfg.task.batch_size, config_yaml=cfg.to_yaml(),
                seeds=seeds, rewards=rewards, cma=p.search.state_arrays(), fingerprint=p.search.fingerprint(),
                best=best, best_reward=best_reward))
        log.log({"generation": g + 1, "reward_mean": float(r.mean()), "reward_std": float(r.std()),
                 "reward_max": float(r.max()), "sigma": p.search.sigma,
                 "allgather_bytes": int(comm.allreduce_sum(np.array([comm.bytes_sent - sent]))[0]),
                 **({} if updated else {"flat_skipped": True}), **({"state_repaired": True} if repaired else {})})
    if lead:
        export_adapter(p.adapter, p.search.mean, os.path.join(out, "adapter"), cfg.adapter.alpha,
                       cfg.model.name_or_path)
    summary = {"generations": cfg.run.generations, "ranks": comm.size, "wall_s": round(time.time() - t0, 1),
               "solution_length": p.adapter.solution_length, "val_accuracy": val}
    if lead:
        with open(os.path.join(out, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=1)
    log.close()
    return summary
