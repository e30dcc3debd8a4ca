"""LoRA SFT warm start with PEFT: the task's gold completions, loss on the completion tokens only.

    python -m essa_mpi sft --config jobs/smollm2_arithmetic.yaml     # → runs/sft/arithmetic-<hash>/
    mpiexec -n 2 python -m essa_mpi                                  # run = cached SFT, then ESSA

The adapter has ESSA's rank, alpha and target modules (``adapter.*``) and is saved in PEFT format. Its
directory name hashes everything that shapes it (model, adapter shape, task data, SFT hyperparameters,
seed), so a repeated run finds it and skips training. Hyperparameters default to the paper's appendix H.2
(batch 16, one epoch, AdamW, lr 5e-4 with linear decay). Under MPI every rank trains (``Team``): each takes its
share of every global batch, the LoRA gradient is summed over the ranks once per step, rank 0 writes the
adapter, and every sft.save_every steps its own checkpoint (``<output_dir>.resume.pt``), which a requeued
job continues from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from essa_mpi.config import SFT_CACHE, Config
from essa_mpi.rundir import Busy, RunLock, digest
from essa_mpi.tasks import Task


@dataclass
class Team:
    """The ranks that train together, built from comm.Comm by cli.warm_start (one rank: these defaults).
    allreduce sums a float32 array over the ranks (the same result on every rank); bcast hands rank 0's
    object to all.

    Why one Allreduce through comm.py and not torch.distributed: the MPI world exists already (no second
    rendezvous, no MASTER_ADDR and port to agree on under srun), the stall watchdog guards it like every other
    collective, and the gradient is a LoRA's (Qwen2.5-7B, rank 8 on Q/K/V/O: 5 M values, 20 MB), whose host copy
    is milliseconds; NCCL earns its keep on full-model gradients, which ESSA never trains."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    allreduce: Callable[[np.ndarray], np.ndarray] = lambda a: a
    bcast: Callable[[Any], Any] = lambda o: o


def shaping(cfg: Config, rows: list | None = None) -> dict:
    """The config parts and SFT rows that shape the adapter (its cache key, its checkpoint's key)."""
    d = cfg.to_dict()
    out = {"model": d["model"], "adapter": {k: d["adapter"][k] for k in ("rank", "alpha", "target_modules")},
           "task": {k: d["task"][k] for k in ("name", "dataset", "sft_dataset", "sft_size", "system_prompt")},
           "sft": {k: v for k, v in d["sft"].items() if k not in ("output_dir", "micro_batch", "gradient_checkpointing",
                                                                   "save_every")},
           "seed": cfg.search.seed,  # (micro-batches and checkpointing change memory, not what is learned)
           "rows": digest(rows) if rows is not None else None}
    for key in ("threads", "device", "gpus_per_rank", "engine", "vllm_memory_fraction", "vllm_kv_cache_gib",
                "share_prefix", "drop_finished"):
        # where and how it runs, not what it learns
        out["model"].pop(key)
    if out["model"]["revision"] is None:  # (added later: keys of adapters cached before stay what they were)
        out["model"].pop("revision")
    return out


def sft_dir(cfg: Config, rows: list | None = None) -> str:
    """sft.output_dir, or runs/sft/<task>-<12 hex digits of the config parts and SFT rows that shape the
    adapter> (the rows' content, so an edited dataset file trains a new adapter)."""
    if cfg.sft.output_dir:
        return cfg.sft.output_dir
    return os.path.join(SFT_CACHE, f"{cfg.task.name}-{digest(shaping(cfg, rows))[:12]}")


def is_done(out_dir: str, rows: list | None = None) -> bool:
    """An adapter is there, and (when this program trained it) it was trained on these rows."""
    if not os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return False
    info = os.path.join(out_dir, "sft_info.json")
    if rows is None or not os.path.isfile(info):
        return True
    with open(info) as fh:
        return json.load(fh).get("data_digest") in (None, digest(rows))


def claim(out_dir: str, rows: list, log=print, tick=lambda: None, poll_s: float = 2.0) -> tuple:
    """Rank 0: the lock ``out_dir.lock`` (held, stale after its holder is gone, as run.lock), so that one job
    trains the adapter while another with the same warm start waits (calling tick, its waiting ranks' sign of
    progress) and then reuses it. → (lock, True when the adapter is there already)."""
    parent, name = os.path.split(os.path.abspath(out_dir))
    said = False
    while True:
        try:
            lock = RunLock.acquire(parent, f"{name}.lock")
            break
        except Busy as exc:
            if not said:
                log(f"SFT warm start: another job trains this adapter ({str(exc).split(' is in use by ')[-1]}); "
                    f"waiting for it")
                said = True
            tick()
            time.sleep(poll_s)
    return lock, is_done(out_dir, rows)


def check_output_dir(out_dir: str) -> None:
    """ValueError when out_dir holds files but no adapter this program wrote (sft_info.json), or its
    ``.resume.pt`` beside it is not an SFT checkpoint: the SFT replaces both, and a user's files must not go."""
    resume = resume_file(out_dir)
    if os.path.isfile(resume) and read_state(resume, mmap=True) is None:
        raise ValueError(not_ours(resume))
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    ours = ("sft_info.json", "adapter_config.json")
    if not any(os.path.isfile(os.path.join(out_dir, name)) for name in ours):
        found = ", ".join(sorted(os.listdir(out_dir))[:3])
        raise ValueError(f"sft.output_dir={out_dir} holds files that are not an SFT adapter ({found} ...); the SFT "
                         f"would replace them: choose an empty or new directory.")


def check_rows(task: Task, cfg: Config) -> None:
    if not task.sft:
        raise ValueError(f"task {cfg.task.name} has no SFT completions; give task.sft_dataset=FILE.jsonl with "
                         f"'prompt' and 'completion' columns, an adapter with adapter.path, or set "
                         f"adapter.warm_start=none.")


def encode_row(tok, task: Task, row: dict, max_length: int) -> tuple:
    """→ (input_ids [T], labels [T]) with labels -100 on the prompt (loss on the completion only)."""
    prompt = tok.apply_chat_template(task.messages(row["prompt"]), tokenize=False, add_generation_prompt=True)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    c_ids = tok(row["completion"] + tok.eos_token, add_special_tokens=False)["input_ids"]
    ids = (p_ids + c_ids)[:max_length]
    labels = ([-100] * len(p_ids) + c_ids)[:max_length]
    return ids, labels


def collate(batch: list, pad_id: int) -> dict:
    """Right-pad (input_ids, labels) pairs → tensors [B, T]; padding is masked out of attention and loss."""
    T = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), T), -100, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
    for i, (x, y) in enumerate(batch):
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def completion_tokens(batch: list) -> int:
    """Tokens the loss counts in ``batch`` (encoded rows): the model predicts token t+1 from t, labels shift."""
    return sum(sum(1 for t in y[1:] if t != -100) for _, y in batch)


def accumulate(model, batch: list, micro: int, pad_id: int, total: int | None = None) -> float:
    """Gradients of one optimizer step over ``batch`` (encoded rows), ``micro`` rows per forward/backward
    pass. Each pass's loss (the model's mean over its completion tokens) is weighted by its share of the
    ``total`` completion tokens (default: the batch's; a rank's share of a global batch passes the global
    batch's), so the gradient and the loss equal one pass over the whole batch. → the batch's loss."""
    total = max(1, completion_tokens(batch) if total is None else total)
    loss_sum = 0.0
    for m in range(0, len(batch), micro):
        part = collate(batch[m: m + micro], pad_id)  # [micro, T]
        n = int((part["labels"][:, 1:] != -100).sum())
        if n == 0:
            continue
        loss = model(**{k: v.to(model.device) for k, v in part.items()}).loss * (n / total)
        loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def micro_batch(cfg: Config, local_rank: int = 0, local_size: int = 1) -> tuple:
    """Rows per SFT forward/backward pass: sft.micro_batch, or (0) as many rows of sft.max_length tokens as
    fit this rank's device (or, on CPU, its share of the node's RAM) beside the weights (plan.sft_plan)
    → (rows, the plan's line)."""
    from essa_mpi import memory
    from essa_mpi.memory import rank_memory
    from essa_mpi.plan import sft_plan

    s = cfg.sft
    arch = memory.arch_for(cfg.model)
    if arch is None:
        return s.micro_batch or s.batch_size, "model shape unknown here: no memory estimate"
    device = rank_memory(cfg.model, local_rank, local_size)
    p = sft_plan(cfg, arch, device, device.count)  # the plan preflight and `plan` print (a GPTQ base as bf16)
    if not p.fits:
        raise ValueError(f"SFT of {s.max_length}-token rows: {p.line()}: {p.reason}; set sft.gradient_checkpointing="
                         f"true, lower sft.max_length or sft.micro_batch, or use a 4-bit precision.")
    return max(1, p.rows), p.line()


def resume_file(out_dir: str) -> str:
    return f"{out_dir.rstrip('/')}.resume.pt"


def trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def read_state(path: str, mmap: bool = False) -> dict | None:
    """The SFT checkpoint at path, or None when the file is not one (mmap: tensors mapped, not read)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # not a torch file, or one holding more than tensors and plain values
        return None
    return state if isinstance(state, dict) and "key" in state else None


def not_ours(path: str) -> str:
    return (f"{path} is not an SFT checkpoint of essa_mpi, and the SFT writes its own there; move it away or "
            f"choose another sft.output_dir.")


def load_state(path: str, key: str, team: Team, log) -> dict | None:
    """The SFT checkpoint at path (rank 0 reads it, every rank gets it) when it is of this very SFT (key)."""
    state = None
    if team.rank == 0 and os.path.isfile(path):
        state = read_state(path)
        if state is None:  # check_output_dir refused it before; it changed since
            raise ValueError(not_ours(path))
        if state["key"] != key:
            log(f"SFT: {path} belongs to another SFT configuration; starting from step 0")
            state = None
    return team.bcast(state)


def save_state(path: str, key: str, step: int, losses: list, model, opt, sched) -> None:
    """Rank 0: adapter, optimizer, scheduler and data position (the step: the order is the seed's), atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save({"key": key, "step": step, "losses": losses, "lora": {n: p.detach().cpu() for n, p in
                trainable(model).items()}, "opt": opt.state_dict(), "sched": sched.state_dict()}, tmp)
    os.replace(tmp, path)


def reduce_gradients(params: list, loss: float, team: Team) -> float:
    """Sum every rank's gradient (and loss) of its share of the batch: one Allreduce of the flat fp32 LoRA
    gradient. → the batch's loss."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).float().cpu()
                      for p in params] + [torch.tensor([loss])])  # [P + 1]
    flat = torch.from_numpy(team.allreduce(flat.numpy()))  # [P + 1]: summed over the ranks
    offset = 0
    for p in params:
        p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.device, p.dtype)
        offset += p.numel()
    return float(flat[-1])


def peft_model(cfg: Config, team: Team):
    """The base model with a fresh LoRA of ESSA's shape (the same init on every rank: the seed), training mode."""
    from peft import LoraConfig, get_peft_model

    from essa_mpi.model import load_model

    model, tok = load_model(cfg.model, team.local_rank, team.local_size)
    if cfg.model.precision == "gptq":  # the GPTQ base, dequantized: PEFT cannot wrap our GPTQLinear
        from essa_mpi.gptq import densify

        densify(model)
    torch.manual_seed(cfg.search.seed)  # the LoRA A init
    peft_cfg = LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, target_modules=cfg.adapter.target_modules,
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    if cfg.sft.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # PEFT: the frozen embedding's output must carry gradients
    model.train()
    return model, tok


def train(cfg: Config, task: Task, out_dir: str, log=print, team: Team | None = None,
          saved=lambda step: None) -> dict:
    """Train the LoRA adapter on task.sft on every rank of team and save it to out_dir from rank 0 (atomically:
    temp dir + rename); continue from the SFT's checkpoint when there is one. saved(step) on rank 0 after each
    checkpoint (what a time-limited job gained: rundir.stage_done)."""
    from essa_mpi import stages

    team = team or Team()
    check_rows(task, cfg)
    t0 = time.time()
    model, tok = peft_model(cfg, team)
    s = cfg.sft
    rows = [encode_row(tok, task, r, s.max_length) for r in task.sft]
    micro, plan_line = micro_batch(cfg, team.local_rank, team.local_size)
    log(f"SFT: {team.size} rank(s), {micro} rows per forward/backward pass, step of {s.batch_size} rows "
        f"({plan_line})")
    per_epoch = math.ceil(len(rows) / s.batch_size)
    steps = s.epochs * per_epoch
    params = list(trainable(model).values())
    opt = torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)  # linear decay to 0
    key, path = digest(shaping(cfg, task.sft)), resume_file(out_dir)
    state = load_state(path, key, team, log)
    losses, first = [], 0
    if state is not None:
        with torch.no_grad():
            for n, p in trainable(model).items():
                p.copy_(state["lora"][n])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        losses, first = state["losses"], state["step"]
        log(f"SFT: resuming at step {first}/{steps} from {path}")
    for step in range(first, steps):
        epoch, start = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.search.seed, 17, epoch]).permutation(len(rows))  # [rows]
        batch = [rows[i] for i in order[start * s.batch_size: (start + 1) * s.batch_size]]  # the global batch
        mine = batch[team.rank::team.size]  # this rank's share (interleaved: similar lengths on every rank)
        loss = accumulate(model, mine, micro, tok.pad_token_id, completion_tokens(batch))
        losses.append(reduce_gradients(params, loss, team))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if team.rank == 0 and s.save_every and done % s.save_every == 0 and done < steps:
            save_state(path, key, done, losses, model, opt, sched)
            saved(done)
        stages.reached(f"sft step {done}", team.rank)
        if done % max(1, steps // 10) == 0 or done == steps:
            log(f"SFT step {done}/{steps}: loss {np.mean(losses[-10:]):.4f} ({time.time() - t0:.0f} s)")
    info = {"rows": len(rows), "data_digest": digest(task.sft), "steps": steps, "steps_run": steps - first,
            "resumed_at": first, "ranks": team.size, "micro_batch": micro, "losses": [round(x, 6) for x in losses],
            "final_loss": float(np.mean(losses[-10:])), "wall_s": round(time.time() - t0, 1), "config": cfg.to_dict()}
    if team.rank == 0:
        save_adapter(model, info, out_dir)
        if os.path.exists(path):
            os.remove(path)
    return info


def save_adapter(model, info: dict, out_dir: str) -> None:
    tmp = f"{out_dir.rstrip('/')}.tmp.{socket.gethostname()}.{os.getpid()}"  # this writer's own: renamed in whole
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "sft_info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    check_output_dir(out_dir)  # (again: the directory may have changed during the training)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
