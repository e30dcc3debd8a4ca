"""LoRA SFT warm start with PEFT: the task's gold completions, loss on the completion tokens only.

    python -m essa_mpi sft --config jobs/smollm2_arithmetic.yaml     # → runs/sft/arithmetic-<hash>/
    mpiexec -n 2 python -m essa_mpi                                  # run = cached SFT, then ESSA

The adapter has ESSA's rank, alpha and target modules (``adapter.*``) and is saved in PEFT format. Its
directory name hashes everything that shapes it (model, adapter shape, task data, SFT hyperparameters,
seed), so a repeated run finds it and skips training. Hyperparameters default to the paper's appendix H.2
(batch 16, one epoch, AdamW, lr 5e-4 with linear decay). Under MPI only rank 0 trains; the other ranks
sleep until it is done (a warm start is short; use a dedicated trainer for a long SFT).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time

import numpy as np
import torch

from essa_mpi.config import SFT_CACHE, Config
from essa_mpi.rundir import Busy, RunLock, digest
from essa_mpi.tasks import Task


def sft_dir(cfg: Config, rows: list | None = None) -> str:
    """sft.output_dir, or runs/sft/<task>-<12 hex digits of the config parts and SFT rows that shape the
    adapter> (the rows' content, so an edited dataset file trains a new adapter)."""
    if cfg.sft.output_dir:
        return cfg.sft.output_dir
    d = cfg.to_dict()
    shaping = {"model": d["model"], "adapter": {k: d["adapter"][k] for k in ("rank", "alpha", "target_modules")},
               "task": {k: d["task"][k] for k in ("name", "dataset", "sft_dataset", "sft_size", "system_prompt")},
               "sft": {k: v for k, v in d["sft"].items() if k not in ("output_dir", "micro_batch",
                                                                       "gradient_checkpointing")},
               "seed": cfg.search.seed,  # (micro-batches and checkpointing change memory, not what is learned)
               "rows": digest(rows) if rows is not None else None}
    for key in ("threads", "device", "gpus_per_rank", "engine", "vllm_memory_fraction", "vllm_kv_cache_gib",
                "share_prefix", "drop_finished"):
        # where and how it runs, not what it learns
        shaping["model"].pop(key)
    key = digest(shaping)[:12]
    return os.path.join(SFT_CACHE, f"{cfg.task.name}-{key}")


def is_done(out_dir: str, rows: list | None = None) -> bool:
    """An adapter is there, and (when this program trained it) it was trained on these rows."""
    if not os.path.isfile(os.path.join(out_dir, "adapter_config.json")):
        return False
    info = os.path.join(out_dir, "sft_info.json")
    if rows is None or not os.path.isfile(info):
        return True
    with open(info) as fh:
        return json.load(fh).get("data_digest") in (None, digest(rows))


def trained_once(cfg: Config, task: Task, out_dir: str, log=print, tick=lambda: None, poll_s: float = 2.0):
    """The adapter at out_dir, trained by one job only: under the lock ``out_dir.lock`` (held, stale after its
    holder is gone, as run.lock), the holder trains while another job with the same warm start waits (calling
    tick, the waiting ranks' sign of progress), then reuses it. → train's info, or None when it was reused."""
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
    try:
        if is_done(out_dir, task.sft):
            log(f"SFT warm start: using cached {out_dir}")
            return None
        log(f"SFT warm start: training {len(task.sft)} rows -> {out_dir}")
        return train(cfg, task, out_dir, log, tick)
    finally:
        lock.release()


def check_output_dir(out_dir: str) -> None:
    """ValueError when out_dir holds files but no adapter this program wrote (sft_info.json): the SFT replaces
    the directory when it ends, and a user's folder must not go with it."""
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


def accumulate(model, batch: list, micro: int, pad_id: int) -> float:
    """Gradients of one optimizer step over ``batch`` (encoded rows), ``micro`` rows per forward/backward
    pass. Each pass's loss (the model's mean over its completion tokens) is weighted by its share of the batch's
    completion tokens, so the gradient and the loss equal one pass over the whole batch. → the batch's loss."""
    labels = [torch.tensor(y[1:]) for _, y in batch]  # the model predicts token t+1 from t: labels shift by one
    total = max(1, sum(int((y != -100).sum()) for y in labels))
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


def micro_batch(cfg: Config) -> tuple:
    """Rows per SFT forward/backward pass: sft.micro_batch, or (0) as many rows of sft.max_length tokens as
    fit this device beside the weights (plan.sft_plan; the other ranks have loaded nothing yet, so on CPU
    rank 0 may use the node's available RAM) → (rows, the plan's line)."""
    from essa_mpi import memory
    from essa_mpi.model import rank_memory
    from essa_mpi.plan import sft_plan

    s = cfg.sft
    arch = memory.arch_for(cfg.model)
    if arch is None:
        return s.micro_batch or s.batch_size, "model shape unknown here: no memory estimate"
    device = rank_memory(cfg.model, 0, 1)  # rank 0 alone: on CPU the node's available RAM
    p = sft_plan(cfg, arch, device, device.count)  # the plan preflight and `plan` print (a GPTQ base as bf16)
    if not p.fits:
        raise ValueError(f"SFT of {s.max_length}-token rows: {p.line()}: {p.reason}; set sft.gradient_checkpointing="
                         f"true, lower sft.max_length or sft.micro_batch, or use a 4-bit precision.")
    return max(1, p.rows), p.line()


def train(cfg: Config, task: Task, out_dir: str, log=print, tick=lambda: None) -> dict:
    """Train the LoRA adapter on task.sft and save it to out_dir (atomically: temp dir + rename). tick() is
    called between the stages and after every step (the waiting ranks' sign of progress, Comm.beat)."""
    tick()
    from peft import LoraConfig, get_peft_model

    from essa_mpi.model import load_model

    check_rows(task, cfg)
    t0 = time.time()
    tick()
    model, tok = load_model(cfg.model)
    tick()
    if cfg.model.precision == "gptq":  # the GPTQ base, dequantized: PEFT cannot wrap our GPTQLinear
        from essa_mpi.gptq import densify

        densify(model)
    torch.manual_seed(cfg.search.seed)  # the LoRA A init
    peft_cfg = LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, target_modules=cfg.adapter.target_modules,
                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, peft_cfg)
    s = cfg.sft
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()  # PEFT: the frozen embedding's output must carry gradients
    model.train()
    rows = [encode_row(tok, task, r, cfg.sft.max_length) for r in task.sft]
    micro, plan_line = micro_batch(cfg)
    log(f"SFT: {micro} rows per forward/backward pass, {math.ceil(s.batch_size / micro)} per step of "
        f"{s.batch_size} rows ({plan_line})")
    steps = s.epochs * math.ceil(len(rows) / s.batch_size)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 - i / steps)  # linear decay to 0
    losses, step = [], 0
    for epoch in range(s.epochs):
        order = np.random.default_rng([cfg.search.seed, 17, epoch]).permutation(len(rows))  # [rows]
        for start in range(0, len(rows), s.batch_size):
            losses.append(accumulate(model, [rows[i] for i in order[start: start + s.batch_size]], micro,
                                     tok.pad_token_id))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            tick()
            if step % max(1, steps // 10) == 0 or step == steps:
                log(f"SFT step {step}/{steps}: loss {np.mean(losses[-10:]):.4f} ({time.time() - t0:.0f} s)")
    info = {"rows": len(rows), "data_digest": digest(task.sft), "steps": steps, "micro_batch": micro,
            "final_loss": float(np.mean(losses[-10:])), "wall_s": round(time.time() - t0, 1), "config": cfg.to_dict()}
    tmp = f"{out_dir.rstrip('/')}.tmp.{socket.gethostname()}.{os.getpid()}"  # this writer's own: renamed in whole
    shutil.rmtree(tmp, ignore_errors=True)
    tick()
    model.save_pretrained(tmp)
    with open(os.path.join(tmp, "sft_info.json"), "w") as fh:
        json.dump(info, fh, indent=1)
    check_output_dir(out_dir)  # (again: the directory may have changed during the training)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return info
