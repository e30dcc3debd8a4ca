"""Command line: ``python -m essa_mpi [--config FILE.yaml] [--resume DIR] [section.key=value ...]``.

    mpiexec -n 2 python -m essa_mpi                                     # embedded default
    mpiexec -n 4 python -m essa_mpi --config jobs/smollm2_arithmetic.yaml search.popsize=32
    srun -n 128 python -m essa_mpi --config jobs/my_job.yaml
    mpiexec -n 4 python -m essa_mpi --resume runs/essa run.generations=200   # continue (run.* overrides only)

Every rank parses and validates the same input; a bad value stops all ranks with one message and exit
code 2 before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from essa_mpi import checkpoint
from essa_mpi.comm import Comm, first_error
from essa_mpi.config import apply_overrides, config_from_dict, help_text, load_config, validate


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m essa_mpi", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ESSA: gradient-free LLM alignment by CMA-ES over SVD-LoRA singular values, over MPI.\n"
                    "Launch with mpiexec/srun; with no --config it runs the embedded default "
                    "(SmolLM2-135M-Instruct on arithmetic).",
        epilog="options (set in the YAML file or as section.key=value):\n" + help_text())
    ap.add_argument("--config", help="YAML file with sections model/adapter/search/task/run.")
    ap.add_argument("--resume", metavar="DIR", help="continue the run whose output_dir is DIR from its checkpoint.")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values.")
    return ap


def prepare(args: argparse.Namespace, world_size: int) -> tuple:
    """→ (validated Config, RunState or None). Raises ValueError with the fix on bad input."""
    state = None
    if args.resume:
        if args.config:
            raise ValueError("--resume uses the config stored in the checkpoint; drop --config.")
        bad = [o for o in args.overrides if not o.startswith("run.")]
        if bad:
            raise ValueError(f"--resume accepts only run.* overrides (e.g. run.generations=200), got {bad}.")
        state = checkpoint.load(os.path.join(args.resume, checkpoint.FILENAME))
        data = apply_overrides(yaml.safe_load(state.config_yaml), args.overrides + [f"run.output_dir={args.resume}"])
        cfg = config_from_dict(data)
        if cfg.run.generations < state.generation:
            raise ValueError(f"run.generations={cfg.run.generations} but the checkpoint already has "
                             f"{state.generation} generations; raise run.generations.")
    else:
        cfg = load_config(args.config, args.overrides)
        ckpt = os.path.join(cfg.run.output_dir, checkpoint.FILENAME)
        if os.path.exists(ckpt):
            raise ValueError(f"{cfg.run.output_dir} already holds a checkpoint; continue it with --resume "
                             f"{cfg.run.output_dir}, or set run.output_dir to a new directory.")
    validate(cfg, world_size)
    return cfg, state


def main(argv: list | None = None) -> int:
    args = parser().parse_args(argv)
    comm = Comm()
    try:
        cfg, state = first_error(comm, lambda: prepare(args, comm.size))
        from essa_mpi.tasks import build_task  # datasets are read (and checked) before any model load

        task = first_error(comm, lambda: build_task(cfg.task, cfg.search.seed))
    except ValueError as exc:
        if comm.rank == 0:
            print(f"essa_mpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if state is None and comm.rank == 0:
        metrics = os.path.join(cfg.run.output_dir, "metrics.jsonl")
        if os.path.exists(metrics):
            os.remove(metrics)  # left by a run that died before its first checkpoint
    from essa_mpi.run import run

    summary = run(cfg, comm, task, state)
    if comm.rank == 0:
        print(json.dumps(summary), flush=True)
    return 0
