"""``python -m essa_mpi plan``: what a job needs per rank, from the model's config.json alone (no weights loaded).

    python -m essa_mpi plan --config jobs/math.yaml                          # an 8 x 80 GiB node (H100)
    python -m essa_mpi plan --config jobs/math.yaml --gib-per-gpu 141        # an H200 node
    python -m essa_mpi plan --config jobs/fig5_qwen2.5-72b_bf16.yaml model.gpus_per_rank=4 --ranks-per-node 2
    python -m essa_mpi plan --config jobs/helpsteer.yaml --model-config path/to/config.json

For the search (task.max_new_tokens), eval (eval.max_new_tokens, eval.k samples per prompt) and the SFT warm
start (sft.max_length, sft.micro_batch): the rank's devices, its weights, rows per generate call (or per SFT
pass), the estimated peak GiB per device, and whether it fits, with the fix when it does not (essa_mpi/memory.py).
The model's config.json comes from model.name_or_path (a directory, or the Hugging Face cache), or --model-config
(a file, or a directory of ``<owner>--<name>.json`` files). Prompts are taken as --prompt-tokens long (the run
measures them; ``plan`` loads no tokenizer). Exit 0 when every part fits, 1 when one does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from essa_mpi import memory
from essa_mpi.config import load_config, validate
from essa_mpi.launch import choose_engine


def arch_of(cfg, model_config: str | None, name: str | None = None) -> memory.Arch:
    """The Arch of the policy (or of the model ``name``, e.g. the reward model) from --model-config (a file, or a
    directory holding <owner>--<name>.json) or from what memory.arch_for finds locally."""
    if name is not None:
        cfg = dataclasses.replace(cfg, model=memory.named(cfg.model, name))
        model_config = model_config if model_config and os.path.isdir(model_config) else None
    path = model_config
    if path and os.path.isdir(path):
        path = os.path.join(path, cfg.model.name_or_path.replace("/", "--") + ".json")
        path = path if os.path.isfile(path) else None  # not there: the model's own files (a local model)
    elif path and not os.path.isfile(path):
        raise ValueError(f"--model-config: {path} not found; give the model's config.json.")
    if path:
        try:
            with open(path) as fh:
                data = json.load(fh)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--model-config: {path} is not readable JSON ({exc}); give the model's config.json."
                             ) from None
        return memory.Arch.from_config(data, f"--model-config {path}")

    arch = memory.arch_for(cfg.model)
    if arch is None:
        raise ValueError(f"{cfg.model.name_or_path}: its config.json is not here (nor in the Hugging Face cache); "
                         f"download it (huggingface-cli download {cfg.model.name_or_path} config.json) or pass "
                         f"--model-config FILE.")
    return arch


def rows_for(cfg, args, arch: memory.Arch, device: memory.Device) -> list:
    """[(part, memory.Plan, fix)] for the search, eval and the SFT warm start of this config."""
    m, t, e = cfg.model, cfg.task, cfg.eval
    want = None if cfg.run.max_rows == "auto" else cfg.run.max_rows
    out = []
    for part, new in (("search", t.max_new_tokens), ("eval", e.max_new_tokens)):
        reward = memory.reward_for(cfg, args.prompt_tokens + new, lambda n: arch_of(cfg, args.model_config, n))
        p = memory.plan(arch, m.precision, args.prompt_tokens, new, device, cfg.run.memory_headroom, want,
                        reward if part == "search" else None)
        fix = "run.max_rows=auto"
        if p.rows == 0:  # only changes that fit: more GPUs per rank (within the node), a 4-bit precision
            fix = ", ".join(first_fits(cfg, args, arch, device, prompt=args.prompt_tokens, new=new) +
                            [f"or lower {part.replace('search', 'task')}.max_new_tokens"])
        out.append((part, p, fix))
    if cfg.adapter.path is None and cfg.adapter.warm_start == "sft":
        p = sft_plan(cfg, arch, device, device.count)
        out.append(("sft", p, "" if p.fits else sft_fix(cfg, arch, device)))
    return out


def first_fits(cfg, args, arch: memory.Arch, device: memory.Device, prompt: int, new: int) -> list:
    """The fixes that would make one row fit: the fewest GPUs per rank the node has that hold it, and a 4-bit
    precision where it holds; on CPU, fewer ranks per node; where nothing here fits, that larger GPUs are needed."""
    m, out = cfg.model, []
    if device.kind != "cuda":
        return ["fewer ranks per node"]
    node = args.gpus_per_node or device.count
    for g in (2, 4, 8, 16):
        if device.count < g <= node and memory.plan(arch, m.precision, prompt, new, memory.Device(
                "cuda", device.memory, g), cfg.run.memory_headroom).fits:
            out.append(f"model.gpus_per_rank={g}")
            break
    if m.precision in ("fp32", "bf16", "int8"):
        for p in ("int4", "gptq"):
            if memory.plan(arch, p, prompt, new, device, cfg.run.memory_headroom).fits:
                out.append(f"model.precision={p} (4-bit)")
                break
    return out or [f"nothing on {node} x {device.memory / memory.GiB:.0f} GiB GPUs per node: larger GPUs"]


def sft_plan(cfg, arch: memory.Arch, device: memory.Device, gpus: int, checkpointing: bool | None = None):
    """The SFT warm start on rank 0's ``gpus`` devices (a GPTQ base is trained dequantized: bf16)."""
    s = cfg.sft
    precision = "bf16" if cfg.model.precision == "gptq" else cfg.model.precision
    ckpt = s.gradient_checkpointing if checkpointing is None else checkpointing
    return memory.sft_plan(arch, precision, s.max_length, memory.Device(device.kind, device.memory, gpus),
                           s.batch_size, ckpt, cfg.run.memory_headroom, s.micro_batch)


def sft_fix(cfg, arch: memory.Arch, device: memory.Device) -> str:
    """The cheapest change that makes the SFT fit: checkpointing, then more GPUs for the sft command."""
    if not cfg.sft.gradient_checkpointing and sft_plan(cfg, arch, device, device.count, True).fits:
        return "sft.gradient_checkpointing=true"
    for g in (2, 4, 8):
        if device.kind == "cuda" and g > device.count and sft_plan(cfg, arch, device, g, True).fits:
            return (f"train it beforehand on {g} GPUs (python -m essa_mpi sft --config JOB model.gpus_per_rank={g} "
                    f"sft.gradient_checkpointing=true) and set adapter.path")
    return "a lower sft.max_length, or train it elsewhere and set adapter.path"


def report(cfg, args) -> tuple:
    """→ (lines to print, every part fits)."""
    arch = arch_of(cfg, args.model_config)
    m = cfg.model
    g = m.gpus_per_rank
    if args.gpus_per_node:
        ranks = args.ranks_per_node or args.gpus_per_node // g
        if ranks * g > args.gpus_per_node:
            raise ValueError(f"{ranks} ranks per node x model.gpus_per_rank={g} need more than the node's "
                             f"{args.gpus_per_node} GPUs; lower --ranks-per-node or model.gpus_per_rank.")
        gib = memory.REPORTED_GIB.get(args.gib_per_gpu, args.gib_per_gpu)
        device = memory.Device("cuda", int(gib * memory.GiB), g)
        where = f"{ranks} ranks per node, each on {g} x {gib:g} GiB GPU(s)"
    else:
        ranks = args.ranks_per_node or 1
        device = memory.Device("cpu", int(args.ram_gib * memory.GiB / ranks))
        where = f"{ranks} ranks on a CPU node of {args.ram_gib:g} GiB"
    engine, why = choose_engine(m, device.kind == "cuda", lambda: None)
    if m.engine == "auto" and engine == "vllm":
        why = "model.engine=auto: vllm on these GPUs where vLLM imports on the nodes (hf rows below where it does not)"
    name = m.name_or_path if not (args.model_config and os.path.isfile(args.model_config)) else \
        f"the model of {args.model_config}"
    lines = [f"{name} ({m.precision}): {where}; prompts of {args.prompt_tokens} tokens",
             f"  engine: {why}",
             f"  weights {memory.weight_bytes(arch, m.precision) / memory.GiB:.1f} GiB in all"]
    ok = True
    if engine == "vllm" and device.kind == "cuda":
        tokens = args.prompt_tokens + cfg.task.max_new_tokens
        reward = memory.reward_for(cfg, tokens, lambda n: arch_of(cfg, args.model_config, n))
        problem = memory.vllm_check(arch, m.precision, tokens, device.memory, m.vllm_memory_fraction, g, reward)
        ok = problem is None
        lines.append(f"  search (vLLM): {'fits' if ok else 'DOES NOT FIT: ' + problem}")
    for part, p, fix in rows_for(cfg, args, arch, device):
        if part == "search" and engine == "vllm" and device.kind == "cuda":
            part = "hf"  # the rows a rank falls back to without vLLM (and vLLM's most sequences at once)
        unit = "rows per SFT pass" if part == "sft" else "rows per call"
        verdict = "fits" if p.fits else f"DOES NOT FIT ({p.reason}); fix: {fix}"
        lines.append(f"  {part:6s} {p.rows:5d} {unit}: peak {p.peak / memory.GiB:6.1f} of "
                     f"{p.budget / memory.GiB:.1f} GiB per device; {verdict}")
        if p.terms:
            lines.append(f"         {p.terms}")
        ok &= p.fits
    return lines, ok


def check_numbers(args) -> None:
    """plan's own options: ValueError naming the option and what it must be."""
    for name, value, low in (("--prompt-tokens", args.prompt_tokens, 1), ("--gpus-per-node", args.gpus_per_node, 0),
                             ("--ranks-per-node", args.ranks_per_node, 0)):
        if value < low:
            raise ValueError(f"{name}={value} must be at least {low}.")
    for name, value in (("--gib-per-gpu", args.gib_per_gpu), ("--ram-gib", args.ram_gib)):
        if not value > 0:
            raise ValueError(f"{name}={value:g} must be a positive number of GiB.")


def main(argv: list) -> int:
    ap = argparse.ArgumentParser(prog="python -m essa_mpi plan", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the job's YAML file (default: the embedded default)")
    ap.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0: plan for a CPU node)")
    ap.add_argument("--gib-per-gpu", type=float, default=80.0,
                    help="memory of one GPU in GiB (H100: 80, H200: 141; planned as the totals the devices report, "
                         "79.6 and 140.4 GiB)")
    ap.add_argument("--ranks-per-node", type=int, default=0, help="default: GPUs per node / model.gpus_per_rank")
    ap.add_argument("--ram-gib", type=float, default=24.0, help="a CPU node's available RAM (--gpus-per-node 0)")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="the longest prompt, chat template included")
    ap.add_argument("--model-config", help="the model's config.json, or a directory of <owner>--<name>.json")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_intermixed_args(argv)  # overrides may stand on both sides of an option
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, 1, "run")  # the very checks a run makes of these values (the files a run reads aside)
        check_numbers(args)
        lines, ok = report(cfg, args)
    except ValueError as exc:
        print(f"essa_mpi plan: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if ok else 1
