"""The ESSA loop (Alg. 1): seeds → candidates → evaluate → Allgather → tell → checkpoint → log.

    mpiexec -n 2 python -m essa_mpi --config jobs/smollm2_arithmetic.yaml
    mpiexec -n 2 python -m essa_mpi --resume runs/essa          # continue a killed run

Every rank holds the same CMA-ES; rank r evaluates its contiguous share of the popsize x batch (candidate,
prompt) rows, every rank's count within one of the others', and sends one 8-byte (seed, reward) record per whole
candidate and one per prompt of a candidate it shares with a neighbour (``essa_mpi.shares``). Only rank 0 writes
files.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from essa_mpi import checkpoint, stages, watchdog
from essa_mpi.comm import RECORD, Comm, first_error, ranks_text
from essa_mpi.config import Config, step_scale, validation_due
from essa_mpi.export import export_adapter
from essa_mpi.memory import loaded_bytes, peak_memory, rows_per_call, trim_host_memory
from essa_mpi.metrics import MetricsLog, reward_stats
from essa_mpi.model import load_model
from essa_mpi.population import PopulationEvaluator
from essa_mpi.rundir import check_identity, keep_best, past_validation
from essa_mpi.search import SeededCMA
from essa_mpi.shares import local_values, record_counts
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors, load_lora_factors
from essa_mpi.tasks import Task, batch_indices

DIAGONAL_ABOVE = 500  # covariance=auto: full CMA-ES up to this solution length, diagonal beyond


@dataclass
class Parts:
    task: Task
    adapter: SVDLoRA
    evaluator: PopulationEvaluator
    search: SeededCMA


def build(cfg: Config, comm: Comm, task: Task) -> Parts:
    """Load the model on this rank and wire adapter, evaluator and search (Alg. 1, lines 1-7)."""
    stages.reached("load", comm.rank)
    threads = cfg.model.threads or comm.threads
    torch.set_num_threads(threads)
    rows = rows_per_call(cfg, comm.local_rank, comm.local_size, task.prompt_tokens, cfg.task.max_new_tokens)
    engine = None
    if cfg.model.engine == "vllm":  # vLLM holds the weights; SVD-LoRA needs only the modules' names and shapes
        from essa_mpi.vllm_engine import load_engine

        mine = sum(p.cands.stop - p.cands.start for p in comm.share(cfg.search.popsize, cfg.task.batch_size))
        model, tok, engine = load_engine(cfg, comm.local_rank, comm.local_size, mine, threads,
                                         rows[0], task.prompt_tokens + cfg.task.max_new_tokens)
    else:
        model, tok = load_model(cfg.model, comm.local_rank, comm.local_size)
    a = cfg.adapter
    if a.path:
        factors = load_lora_factors(model, a.path, a.target_modules, a.rank)
    else:
        factors = fresh_lora_factors(model, a.target_modules, a.rank, a.alpha, cfg.search.seed)
    adapter = SVDLoRA.attach(model, factors, a.fraction, seed=cfg.search.seed)
    stds = None
    if step_scale(cfg) == "singular":
        values = adapter.searched_values()  # [n]
        stds = np.maximum(values, 1e-3 * values.max())  # a rank-deficient SFT factor's zero values still move
    search = make_search(cfg, adapter.solution_length, stds)
    if engine is None:
        ev = PopulationEvaluator(model, tok, adapter, task, cfg.task.max_new_tokens, rows[0], cfg.model.share_prefix,
                                 cfg.model.drop_finished)
    else:
        from essa_mpi.vllm_engine import VLLMEvaluator

        ev = VLLMEvaluator(engine, tok, adapter, task, cfg.task.max_new_tokens, rows[0], a.alpha)
    ev.memory_note = f"{rows[0]} rows per generate call ({rows[1]})"
    return Parts(task, adapter, ev, search)


def make_search(cfg: Config, n: int, stds: np.ndarray | None) -> SeededCMA:
    """The CMA-ES of cfg.search over n values (Alg. 1, line 7); stds [n]: per-coordinate step multipliers."""
    s = cfg.search
    diagonal = s.covariance == "diagonal" or (s.covariance == "auto" and n > DIAGONAL_ABOVE)
    return SeededCMA(n, s.popsize, s.sigma0, diagonal, s.seed, stds, s.diagonal_decoding and not diagonal, s.mean_lr)


def validate(p: Parts, comm: Comm, solution: np.ndarray | None, generation: int = 0) -> dict:
    """Validation metrics of one solution (None = the base model) on the held-out prompts, split over ranks:
    {"val_reward": mean reward, "val_nonfinite": rows whose reward was NaN/inf, "val_<detail>": ...}."""
    keys = ["reward", "nonfinite"] + (sorted(p.task.details([], [])) if p.task.details else [])
    mine = p.task.val[comm.rank:: comm.size]
    sums = p.evaluator.score(solution, mine) if mine else {}
    local = np.array([v for k in keys for v in sums.get(k, (0.0, 0))], dtype=np.float64)  # [2*len(keys)]
    total = comm.allreduce_sum(local, f"validation at generation {generation}").reshape(len(keys), 2)  # [keys, 2]
    out = {f"val_{k}": float(num / max(den, 1)) for k, (num, den) in zip(keys, total)}
    out["val_nonfinite"] = int(total[1, 0])
    return out


def worst_for_nonfinite(rewards: np.ndarray) -> tuple:
    """Candidates whose reward is NaN/inf get the generation's worst finite reward (0 if none is finite).

    >>> worst_for_nonfinite(np.array([0.5, np.nan, 0.25], np.float32))
    (array([0.5 , 0.25, 0.25], dtype=float32), 1)
    """
    r, bad = rewards.copy(), ~np.isfinite(rewards)
    r[bad] = r[~bad].min() if (~bad).any() else 0.0
    return r, int(bad.sum())


def check_finite(log: MetricsLog, where: str, bad: int, total: int, what: str) -> None:
    """A note when some rewards were NaN/inf (they count as 0 in validation, as the worst in a generation);
    ValueError when all were: the reward function, not the search, is what to fix (the same on every rank)."""
    if bad and bad == total:
        raise ValueError(f"{where}: all {total} {what} were not finite (NaN or inf): the reward function returns no "
                         f"usable number; fix it (NaN is for a row that cannot be scored)")
    if bad:
        log.message(f"WARNING: {where}: {bad} of {total} {what} were not finite (NaN or inf)")


def repair(search: SeededCMA, comm: Comm, log: MetricsLog, generation: int, fingerprints: np.ndarray) -> bool:
    """When the ranks' CMA-ES fingerprints (from the exchange) differ, rank 0 broadcasts its state and every
    rank adopts it. True if a repair happened. Never in a healthy run: the check costs no extra collective."""
    if (fingerprints == fingerprints[0]).all():
        return False
    es = comm.bcast(search.get_es() if comm.rank == 0 else None)
    if comm.rank != 0:
        search.set_es(es)
    msg = f"generation {generation}: CMA-ES states diverged across ranks; adopted rank 0's state"
    warnings.warn(msg, stacklevel=2)
    log.message("WARNING: " + msg)
    return True


def step(p: Parts, cfg: Config, comm: Comm, g: int) -> dict:
    """One generation → {"records": [popsize] (seed, reward), "X": candidates [popsize, n], "fingerprints":
    every rank's CMA-ES fingerprint when it drew them [world], "eval_s": every rank's evaluation seconds
    [world], "exchange_s": this rank's seconds in the exchange}; all but the last identical on every rank."""
    popsize, B = cfg.search.popsize, cfg.task.batch_size
    fingerprint = p.search.fingerprint()  # the state the candidates come from; checked in the same exchange
    seeds = p.search.seeds(g)  # [popsize] uint32
    X = p.search.ask(seeds)  # [popsize, n] — every rank draws all; Alg. 1, line 10
    share = comm.share(popsize, B)  # at most 3 pieces: (candidates, prompts) rectangles
    idx = batch_indices(len(p.task.train), B, cfg.search.seed, g)  # [B]
    t = time.perf_counter()
    rewards = p.evaluator.share_rewards(X, [p.task.train[i] for i in idx], share)  # per piece [C_i, P_i]; l. 11
    eval_s = time.perf_counter() - t
    stages.reached(f"generation {g + 1}", comm.rank)
    t = time.perf_counter()
    records, fingerprints, seconds = comm.exchange_rewards(seeds, local_values(share, rewards), B, fingerprint, eval_s,
                                                           f"generation {g + 1}'s record exchange")  # Alg. 1, l. 13
    return {"records": records, "X": X, "fingerprints": fingerprints, "eval_s": seconds,
            "exchange_s": time.perf_counter() - t}


def update(p: Parts, gen: dict) -> tuple:
    """Alg. 1, line 14: the local CMA-ES update from the gathered records → (updated, non-finite count)."""
    records = gen["records"]
    records["reward"], nonfinite = worst_for_nonfinite(records["reward"])  # identical on every rank
    return p.search.tell(records["seed"], records["reward"]), nonfinite


def generation_metrics(p: Parts, cfg: Config, comm: Comm, gen: dict, sent: int) -> dict:
    """One metrics.jsonl line's numbers: population rewards, sigma, bytes and seconds of the exchange."""
    slow = int(gen["eval_s"].argmax())
    slowest = float(gen["eval_s"][slow])
    return {**reward_stats(gen["records"]["reward"]), "sigma": p.search.sigma,
            "allgather_bytes": RECORD.itemsize * sum(record_counts(cfg.search.popsize, cfg.task.batch_size,
                                                                    comm.size)),  # records of all ranks
            "sent_bytes": sent,  # this rank's records and trailer
            "eval_s": round(slowest, 4),  # the slowest rank's evaluation
            "slowest_rank": slow, "slowest_host": comm.hosts[slow],
            "wait_s": round(slowest - float(gen["eval_s"][comm.rank]), 4),  # how long this rank waited for it
            "exchange_s": round(gen["exchange_s"], 6),  # this rank's time in the collective, waiting included
            **peak_memory()}


def replay(p: Parts, state: checkpoint.RunState) -> list:
    """Rebuild the CMA-ES state from the checkpoint's (seed, reward) history and check its fingerprint.
    → sigma after each generation (what that generation's metrics line holds)."""
    sigmas = []
    for g in range(state.generation):
        p.search.tell(state.seeds[g], state.rewards[g])
        sigmas.append(p.search.sigma)
    if p.search.fingerprint() != state.fingerprint:
        raise ValueError("replaying the checkpoint's history did not reproduce its CMA-ES state (different "
                         "cma/numpy version or edited config?); resume with the versions that wrote it.")
    return sigmas


def hosts_line(hosts: list) -> str:
    """Every rank's host, ranks grouped.

    >>> hosts_line(["a (n1)", "a (n1)", "a (n2)", "a (n2)"])
    'ranks 0-1 on a (n1); ranks 2-3 on a (n2)'
    """
    groups: dict = {}
    for r, h in enumerate(hosts):
        groups.setdefault(h, []).append(r)
    return "; ".join(f"rank{'s' if len(rs) > 1 else ''} {ranks_text(rs)} on {h}" for h, rs in groups.items())


def announce(p: Parts, cfg: Config, comm: Comm, log: MetricsLog, start: int) -> None:
    """Log the search size and this rank's memory after loading (weights as stored, peak resident)."""
    log.message(f"hosts: {hosts_line(comm.hosts)}")
    log.message(f"ESSA: {comm.size} ranks, solution_length={p.adapter.solution_length} "
                f"({len(p.adapter.modules)} matrices x 2 x {p.adapter.k}), popsize={cfg.search.popsize}")
    model = p.evaluator.model
    where = sorted({str(t.device) for t in model.parameters()})
    if cfg.model.engine == "vllm":  # the model here is a weightless skeleton; vLLM holds the weights
        where = [f"a vLLM engine ({'cpu' if p.evaluator.engine.on_cpu else 'cuda'})"]
    backend = f", GPTQ kernels: {model.gptq_backend}" if hasattr(model, "gptq_backend") else ""
    log.message(f"rank {comm.rank} (local {comm.local_rank}/{comm.local_size}): model on {','.join(where)}{backend}",
                every_rank=True)
    ignored = getattr(model, "ignored_decoding", None)
    if ignored:  # model.own_decoding: the search decodes greedily as task.* says, whatever the model ships
        values = ", ".join(f"{k}={v}" for k, v in ignored.items())
        log.message(f"the model's generation_config.json is ignored ({values}): decoding is greedy as configured")
    log.message(p.evaluator.memory_note)
    memory = {"weights_bytes": loaded_bytes(model), **peak_memory()}
    log.message(f"memory per rank ({cfg.model.precision}): weights {memory['weights_bytes'] / 2**20:.1f} MiB, "
                f"peak resident {memory['peak_rss_bytes'] / 2**20:.0f} MiB after loading")
    log.log({"generation": start, "memory_after_load": memory})


def run(cfg: Config, comm: Comm, task: Task, state: checkpoint.RunState | None = None,
        start_label: str = "start", identity: dict | None = None) -> dict:
    """Alg. 1, lines 8-16. ``state`` continues a checkpointed run; ``start_label`` names the adapter the
    search starts from in the summary ("SFT" for a warm start); ``identity`` (rank 0) goes into every
    checkpoint, with the SVD bases' digest added here."""
    out, lead = cfg.run.output_dir, comm.rank == 0
    p = build(cfg, comm, task)
    identity = {**(identity or {}), "svd_bases": p.adapter.digest()}
    if state is not None:  # every rank built its own bases: all must match the checkpoint's
        first_error(comm, lambda: check_identity(state.identity, {"svd_bases": identity["svd_bases"]}, out))
    sigmas = replay(p, state) if state is not None else []
    val, base = past_validation(cfg, lead, state, sigmas)
    start = 0 if state is None else state.generation
    log = MetricsLog(out, lead, cfg.run.progress, cfg.run.generations, start, cfg.run.report_to)
    announce(p, cfg, comm, log, start)
    hist = checkpoint.History.fresh(cfg.search.popsize) if state is None else checkpoint.History.of(state)
    t0, slowest = time.time(), 0.0
    if cfg.task.val_size and cfg.task.val_base and state is None:
        stages.reached("base validation", comm.rank)
        metrics = validate(p, comm, None)
        check_finite(log, "the base model's validation", metrics["val_nonfinite"], len(p.task.val), "rewards")
        base = metrics["val_reward"]
        log.log({"generation": 0, "val_base_reward": base})
    for g in range(start, cfg.run.generations + 1):
        if validation_due(cfg, g):  # same on every rank
            stages.reached(f"validation {g}", comm.rank)
            t = time.perf_counter()
            metrics = validate(p, comm, p.search.mean, g)
            val_s = time.perf_counter() - t  # validation alone: exporting best_adapter/ is run time, not val_s
            slowest = max(slowest, val_s) if g > start else slowest
            check_finite(log, f"validation at generation {g}", metrics["val_nonfinite"], len(p.task.val), "rewards")
            val[g] = metrics["val_reward"]
            if lead:
                keep_best(p.adapter, p.search.mean, cfg, val, g)
            log.log({"generation": g, **metrics, "val_s": round(val_s, 2)})
        if g == cfg.run.generations:
            break
        trim_host_memory()  # keeps the peak resident memory from creeping up generation by generation
        sent = comm.bytes_sent
        gen = step(p, cfg, comm, g)
        repaired = repair(p.search, comm, log, g + 1, gen["fingerprints"])
        if repaired:  # the candidates came from diverged states: evaluate this generation again
            gen = step(p, cfg, comm, g)
        updated, nonfinite = update(p, gen)
        check_finite(log, f"generation {g + 1}", nonfinite, cfg.search.popsize, "candidates' rewards")
        slowest = max(slowest, float(gen["eval_s"].max()))
        comm.stall_timeout_s = watchdog.adapted(cfg.run.stall_timeout_s, slowest)  # the first generation measured
        hist.add(gen["records"], gen["X"])
        line = {"generation": g + 1, **generation_metrics(p, cfg, comm, gen, comm.bytes_sent - sent),
                **({} if updated else {"flat_skipped": True}), **({"state_repaired": True} if repaired else {}),
                **({"nonfinite_candidates": nonfinite} if nonfinite else {})}
        with watchdog.critical():  # SIGINT/SIGTERM wait for a complete checkpoint and its metrics line
            stages.reached(f"checkpoint {g + 1}", comm.rank)
            if lead:
                checkpoint.save(os.path.join(out, checkpoint.FILENAME), hist.state(cfg, p.search, g + 1, identity))
            log.log(line)
    summary = finish(p, cfg, comm, log, val, base, start_label)
    summary["wall_s"] = round(time.time() - t0, 1)
    if lead:
        with checkpoint.writing(os.path.join(out, "summary.json"), out) as fh:
            json.dump(summary, fh, indent=1)
    log.close()
    return summary


def finish(p: Parts, cfg: Config, comm: Comm, log: MetricsLog, val: dict, base, start_label: str) -> dict:
    """Rank 0 exports the adapter; every rank returns the summary (validation history and chain)."""
    stages.reached("export", comm.rank)
    if comm.rank == 0:
        export_adapter(p.adapter, p.search.mean, os.path.join(cfg.run.output_dir, "adapter"), cfg.adapter.alpha,
                       cfg.model.name_or_path)
    summary = {"generations": cfg.run.generations, "ranks": comm.size, "hosts": comm.hosts,
               "solution_length": p.adapter.solution_length, "val_reward": val}
    if val and 0 in val:
        summary["val_chain"] = {**({"base": base} if base is not None else {}), start_label: val[0],
                                "ESSA": val[max(val)]}
        log.message("validation reward: " + " -> ".join(f"{k} {v:.3f}" for k, v in summary["val_chain"].items()))
    if val:
        g = max(sorted(val), key=lambda k: val[k])  # the first generation with the highest validation
        summary["best_val"] = {"generation": g, "val_reward": val[g], "adapter": "best_adapter"}
        log.message(f"best validation {val[g]:.3f} at generation {g}: best_adapter/ (the final mean: adapter/)")
    return summary


