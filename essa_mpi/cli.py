"""Command line: ``python -m essa_mpi [run|sft|eval] [--config FILE.yaml] [section.key=value ...]``.

    mpiexec -n 2 python -m essa_mpi                          # embedded default: cached SFT, then ESSA
    mpiexec -n 4 python -m essa_mpi --config jobs/smollm2_arithmetic.yaml search.popsize=32
    srun -n 128 python -m essa_mpi --config jobs/my_job.yaml
    mpiexec -n 4 python -m essa_mpi --resume runs/essa run.generations=200   # continue (run.* overrides only)
    python -m essa_mpi sft --config jobs/gsm8k.yaml          # the LoRA SFT warm start alone
    mpiexec -n 4 python -m essa_mpi eval --config jobs/eval_math.yaml eval.adapters=base,runs/essa/adapter
    python -m essa_mpi plot | latency | quantize | plan | launch-check ...   # each with its own --help

Every rank parses and validates the same input; a bad value stops all ranks with one message and exit
code 2 before any model is loaded. An unexpected error on any rank stops all ranks (exit code 1); a
reward or collective past its timeout stops them with exit code 3; SIGINT/SIGTERM stop each rank with
one line (exit 130/143). The last checkpoint is kept in every case, so ``--resume`` continues after the
fix. Rank 0 holds ``run.output_dir/run.lock`` for the whole run: one run per directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import importlib
import json
import os
import sys
import traceback

import yaml

from essa_mpi import checkpoint, rundir, stages, watchdog
from essa_mpi.comm import Comm, Refused, first_error, same_everywhere
from essa_mpi.config import (
    RunConfig,
    apply_overrides,
    config_from_dict,
    help_text,
    load_config,
    repeated_keys,
    validate,
)
from essa_mpi.launch import bind_rank, check_slot, check_world, node_gpus
from essa_mpi.preflight import check
from essa_mpi.stage import localize

PACKAGE = os.path.dirname(os.path.abspath(__file__))
COMMANDS = {"run": "ESSA search (default): SFT warm start if configured, then CMA-ES over SVD-LoRA.",
            "sft": "Train (or find cached) the LoRA SFT warm start and print its directory.",
            "eval": "avg@k / pass@k on math benchmarks for the base model and adapters (eval.* options).",
            "latency": "Appendix B's iteration-time model, ESSA vs gradient methods (latency --help); no MPI.",
            "plot": "Curves of runs from their metrics.jsonl: plot RUN_DIR [RUN_DIR ...] -o curves.png; no MPI.",
            "quantize": "A 4-bit GPTQ checkpoint of a model for model.precision=gptq (quantize --help); no MPI.",
            "plan": "Memory per rank from the model's config.json: rows per call, peak GiB per GPU, fits or the fix "
                    "(plan --help); no MPI, no weights.",
            "launch-check": "Every process prints its rank, the world size and the MPI library; exit 2 if the launch "
                            "split into one-rank worlds (--srun-mpi: the srun --mpi plugin to use)."}
TOOLS = {"latency": "essa_mpi.latency_report", "plot": "essa_mpi.plot", "quantize": "essa_mpi.quantize",
         "plan": "essa_mpi.plan",
         "launch-check": "essa_mpi.comm"}  # commands that take their own arguments: module.main(argv)


def parser(command: str = "run") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=f"python -m essa_mpi {command}", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="ESSA: gradient-free LLM alignment by CMA-ES over SVD-LoRA singular values, over MPI.\n"
                    "Commands (first argument; default run):\n"
                    + "\n".join(f"  {k:5s} {v}" for k, v in COMMANDS.items())
                    + "\nWith no --config the embedded default runs (SmolLM2-135M-Instruct on arithmetic).",
        epilog="options (set in the YAML file or as section.key=value):\n" + help_text())
    ap.add_argument("--config", help="YAML file with sections model/adapter/search/task/sft/eval/run.")
    ap.add_argument("--debug", action="store_true", help="print the Python traceback of an error as well as its "
                                                         "one line (also: ESSA_DEBUG=1).")
    if command == "run":
        ap.add_argument("--resume", metavar="DIR", help="continue the run whose output_dir is DIR from its checkpoint.")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="override config values.")
    return ap


def prepare(args: argparse.Namespace, world_size: int, command: str = "run", files: bool = True) -> tuple:
    """→ (checked Config, RunState or None, note or None). Raises ValueError with the fix on bad input.
    files: also check the files the config names (rank 0 does, for all: one read of the shared filesystem)."""
    state, note = None, None
    if getattr(args, "resume", None) == "":
        raise ValueError("--resume needs the run's output_dir (e.g. --resume runs/smollm2_arithmetic); to start a "
                         "fresh run, leave --resume out.")
    if getattr(args, "resume", None):
        if args.config:
            raise ValueError("--resume uses the config stored in the checkpoint; drop --config.")
        bad = [o for o in args.overrides if not o.startswith("run.")]
        if bad:
            raise ValueError(f"--resume accepts only run.* overrides (e.g. run.generations=200), got {bad}.")
        overrides = [o for o in args.overrides if not same_dir(o, "run.output_dir=", args.resume)]
        other = [o for o in overrides if o.startswith("run.output_dir=")]
        if other:
            raise ValueError(f"--resume {args.resume} continues the run in that directory, but {other[0]} names "
                             f"another; drop {other[0]} (to continue elsewhere, copy the directory there first).")
        state, note = checkpoint.load_latest(args.resume)
        data = apply_overrides(yaml.safe_load(state.config_yaml), overrides + [f"run.output_dir={args.resume}"])
        cfg = config_from_dict(data)
        if cfg.search.popsize != state.seeds.shape[1]:
            raise ValueError(f"{args.resume}: the stored search.popsize={cfg.search.popsize} does not match the "
                             f"checkpoint's history ({state.seeds.shape[1]} per generation); it was not written "
                             f"by this run.")
        if cfg.run.generations < state.generation:
            raise ValueError(f"run.generations={cfg.run.generations} but the checkpoint already has "
                             f"{state.generation} generations; raise run.generations.")
    else:
        cfg = load_config(args.config, args.overrides)
    check(cfg, world_size, command) if files else validate(cfg, world_size, command)
    return cfg, state, "\n".join(n for n in (note, repeated_keys(args.overrides)) if n) or None


def same_dir(override: str, prefix: str, path: str) -> bool:
    """override is prefix + a path naming the same directory as path.

    >>> same_dir("run.output_dir=runs/a/", "run.output_dir=", "runs/a"), same_dir("run.seed=1", "run.output_dir=", "a")
    (True, False)
    """
    return override.startswith(prefix) and os.path.abspath(override[len(prefix):]) == os.path.abspath(path)


def claim(cfg, state, task, command: str):
    """Rank 0, before anything is written: lock run.output_dir, then refuse a directory a fresh run would
    overwrite, or a resume whose model, adapter or data changed. → the lock (None for sft/eval)."""
    if command != "run":
        return None
    try:
        lock = rundir.RunLock.acquire(cfg.run.output_dir)
    except OSError as exc:  # preflight checked the path; this is a race or a filesystem that refuses writes
        raise ValueError(f"run.output_dir={cfg.run.output_dir}: cannot create or lock it ({exc.strerror}: "
                         f"{exc.filename}); choose a writable directory.") from None
    try:
        if state is None:
            inputs = {"adapter.path": cfg.adapter.path, "task.dataset": cfg.task.dataset,
                      "task.val_dataset": cfg.task.val_dataset, "task.sft_dataset": cfg.task.sft_dataset,
                      "model.name_or_path": cfg.model.name_or_path}
            out = cfg.run.output_dir
            rundir.clear_for_fresh_run(out, cfg.run.overwrite, inputs, mine=rundir.owns(out, cfg))
            rundir.take_ownership(out, cfg)
        else:
            rundir.check_identity(state.identity, rundir.identity(cfg, task), cfg.run.output_dir)
    except BaseException:
        lock.release()
        raise
    return lock


def check_placement(cfg, comm: Comm) -> tuple:
    """The devices load_model will use and the engine, decided before loading → (cfg with model.engine chosen,
    ``launch.choose_engine``, and why). ValueError when MPI's split of the node is not the launcher's local rank
    the GPUs were bound by (``launch.check_slot``), ranks on this node x model.gpus_per_rank exceed the GPUs this
    process sees (naming both), or model.device=cuda has no CUDA. The chosen engine is what config.yaml keeps,
    so a resumed run generates with the engine it started with."""
    from essa_mpi.launch import choose_engine, placement

    if comm.size > 1:  # a one-rank world: check_world already compared the launcher's count with MPI's
        check_slot(os.environ, comm.local_rank, comm.local_size)
    device, _ = placement(cfg.model, comm.local_rank, comm.local_size)
    engine, why = choose_engine(cfg.model, device.type == "cuda")
    if engine != cfg.model.engine:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, engine=engine))
        placement(cfg.model, comm.local_rank, comm.local_size)  # vLLM's own placement rule
    return cfg, why


def input_digests(cfg, task) -> dict:
    """What every rank must agree on before the first generation: each config section and the task's rows."""
    d = cfg.to_dict()
    out = {f"config section {name}": rundir.digest(section) for name, section in d.items()}
    if task is not None:
        out.update({"training rows": rundir.digest(task.train), "validation rows": rundir.digest(task.val),
                    "SFT rows": rundir.digest(task.sft)})
    return out


def check_rank_memory(cfg, comm: Comm, task, state, command: str) -> None:
    """The memory model's preflight, before any rank loads weights: the search (``memory.check_memory``) and
    the SFT warm start (``plan.sft_plan``) on every rank."""
    from essa_mpi import memory
    from essa_mpi.memory import check_memory, rank_memory
    from essa_mpi.plan import sft_fix, sft_plan

    if command == "run":
        check_memory(cfg, comm.local_rank, comm.local_size, task.prompt_tokens)
    arch = memory.arch_for(cfg.model) if needs_sft(cfg, state, command) else None
    if arch is not None:  # every rank trains its share of the SFT
        device = rank_memory(cfg.model, comm.local_rank, comm.local_size)
        p = sft_plan(cfg, arch, device, device.count)
        if not p.fits:
            raise ValueError(f"the SFT warm start of {cfg.sft.max_length}-token rows: {p.line()}: {p.reason}; "
                             f"{sft_fix(cfg, arch, device)}.")


def needs_sft(cfg, state, command: str) -> bool:
    return command == "sft" or (state is None and cfg.adapter.path is None and cfg.adapter.warm_start == "sft")


def load_task(cfg, state, command: str, comm: Comm):
    """The task, before any model load: rank 0 reads the datasets (files or hub) and broadcasts their rows,
    every rank builds the same task from them and checks them (None for eval)."""
    if command == "eval":
        return None
    from essa_mpi.tasks import build_task, data

    stages.reached("read", comm.rank)

    def read() -> tuple:
        with data.recording() as rows:
            return build_task(cfg.task, cfg.search.seed), rows

    task, rows = first_error(comm, lambda: read() if comm.rank == 0 else (None, None))
    rows = comm.bcast(rows, label="the dataset rows rank 0 read")

    def build():
        with data.given(rows):
            return check_task(cfg, state, command, task if task is not None else build_task(cfg.task, cfg.search.seed))

    return first_error(comm, build)


def check_task(cfg, state, command: str, task):
    """The SFT rows and output directory; the prompts against the tokenizer and the model's context."""
    from essa_mpi import sft
    from essa_mpi.model import load_tokenizer
    from essa_mpi.modelfiles import model_facts
    from essa_mpi.population import fit_prompts

    if needs_sft(cfg, state, command):
        sft.check_rows(task, cfg)
        sft.check_output_dir(sft.sft_dir(cfg, task.sft))
    if command == "run":  # before any model loads: the tokenizer and the context from the model's header
        note = fit_prompts(task, load_tokenizer(cfg.model), (model_facts(cfg.model) or {}).get("context"),
                           cfg.task.max_new_tokens, cfg.task.long_prompts)
        task.notes += [note] if note else []
    return task


def warm_start(cfg, comm: Comm, task, saved=lambda step: None) -> tuple:
    """The SFT adapter, cached or trained by every rank (rank 0 holds the adapter's lock meanwhile; the others
    sleep while it waits for another job that trains the same one); saved(step): sft.train's. → (directory,
    info or None)."""
    import torch

    from essa_mpi import sft
    from essa_mpi.memory import release_memory

    out, lock, say = sft.sft_dir(cfg, task.sft), None, (lambda m: print(m, flush=True))
    if comm.rank == 0:
        try:
            lock, cached = sft.claim(out, task.sft, log=say, tick=comm.beat)
        except BaseException:
            comm.idle_bcast(2)
            raise
        comm.idle_bcast(int(cached))
    else:
        cached = comm.idle_bcast()
        if cached == 2:
            raise RuntimeError("the SFT warm start failed on rank 0 (its error is printed above)")
    try:
        if cached:
            if comm.rank == 0:
                print(f"SFT warm start: using cached {out}", flush=True)
            return out, None
        torch.set_num_threads(cfg.model.threads or comm.threads)
        stages.reached("sft", comm.rank)
        if comm.rank == 0:
            print(f"SFT warm start: training {len(task.sft)} rows on {comm.size} rank(s) -> {out}", flush=True)
        team = sft.Team(comm.rank, comm.size, comm.local_rank, comm.local_size,
                        lambda a: comm.allreduce_sum(a, "the SFT gradient sum").astype(a.dtype),  # summed in fp64
                        lambda o: comm.bcast(o, label="the SFT checkpoint"))
        info = sft.train(cfg, task, out, log=say if comm.rank == 0 else (lambda m: None), team=team, saved=saved)
        release_memory()  # the SFT model is gone: hand its memory back before the search loads
        return out, info
    finally:
        if lock is not None:
            lock.release()


def command_run(cfg, comm: Comm, task, state) -> dict:
    from essa_mpi.run import run

    if needs_sft(cfg, state, "run"):
        gained = lambda step: rundir.stage_done(cfg.run.output_dir, f"sft checkpoint {step}")
        cfg.adapter.path, _ = warm_start(cfg, comm, task, gained)
        if comm.rank == 0:
            rundir.stage_done(cfg.run.output_dir, "sft")
    identity = rundir.identity(cfg, task) if comm.rank == 0 else {}  # stored in every checkpoint
    return run(cfg, comm, task, state, start_label="SFT" if cfg.adapter.path else "start", identity=identity)


def command_sft(cfg, comm: Comm, task, state) -> dict:
    out, info = warm_start(cfg, comm, task)
    details = {k: v for k, v in (info or {}).items() if k != "config"}
    return {"adapter": out, "cached": info is None, **details}


def command_eval(cfg, comm: Comm, task, state) -> dict:
    from essa_mpi.evaluate import evaluate

    return evaluate(cfg, comm)


def early_config(args: argparse.Namespace, command: str):
    """The config as main will read it, before MPI and before anything can start CUDA, for the decisions
    that must come first (the rank's GPUs, the preload re-exec); None on bad input, which prepare() reports."""
    if command not in COMMANDS or command in TOOLS:
        return None
    try:
        if getattr(args, "resume", None):
            return config_from_dict(yaml.safe_load(checkpoint.load_latest(args.resume)[0].config_yaml))
        return load_config(args.config, args.overrides)
    except Exception:
        return None


def bind(cfg) -> None:
    """This rank's GPUs into CUDA_VISIBLE_DEVICES from the launcher's local rank (``launch.bind_rank``), first
    thing: CUDA reads the variable once per process, so every later user (both engines, any tensor
    parallelism, the reward model, eval) sees only this rank's GPUs as devices 0..g-1."""
    if cfg is not None and cfg.model.device != "cpu":
        bind_rank(cfg.model.gpus_per_rank)


def preload(cfg, command: str) -> None:
    """model.engine=vllm on CPU: re-execute this process with tcmalloc and Intel OpenMP preloaded, as vLLM's
    CPU docs ask (it doubled the engine's throughput here). Before MPI starts: the exec keeps the PID the
    launcher knows. The environment (with this rank's CUDA_VISIBLE_DEVICES) goes with it."""
    if command not in ("run", "eval") or cfg is None or cfg.model.engine != "vllm" or cfg.model.device == "cuda":
        return
    if cfg.model.device == "auto" and (os.environ.get("CUDA_VISIBLE_DEVICES") or node_gpus()):
        return  # auto on a GPU node resolves to cuda; asking torch here would start CUDA
    from essa_mpi.vllm_engine import preload_env

    env = preload_env(dict(os.environ))
    if env:
        os.execve(sys.executable, [sys.executable, "-m", "essa_mpi", *sys.argv[1:]], env)


def main(argv: list | None = None) -> int:
    from_shell = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    if command in TOOLS:
        return importlib.import_module(TOOLS[command]).main(argv)
    args = parser(command).parse_intermixed_args(argv)  # overrides may stand on both sides of an option
    early = early_config(args, command)
    bind(early)  # before anything below can start CUDA
    if from_shell:
        preload(early, command)
        if early is not None:  # bad input (early is None) stops in prepare(), before torch is needed
            from essa_mpi.model import import_transformers

            import_transformers()  # without scikit-learn: 0.8 s less per rank
    debug = args.debug or os.environ.get("ESSA_DEBUG", "") not in ("", "0")
    # Signals from here on are read by a helper thread, so a rank blocked in MPI (a peer that was stopped while
    # starting never arrives) still ends; nothing to keep, nothing to say but the signal until the run starts.
    watchdog.install_signal_handlers()
    comm = Comm()
    watchdog.configure(comm.rank, comm.abort if comm.size > 1 else None)
    try:  # every process of a launch that split into one-rank worlds says so (each is its own rank 0)
        check_world(os.environ, comm.size, comm.library)
    except ValueError as exc:
        print(f"essa_mpi: error: {exc}", file=sys.stderr, flush=True)
        return 2
    comm.stall_timeout_s = RunConfig.stall_timeout_s  # the default guards the checks until the config is known
    lock = None
    try:
        cfg, state, note = first_error(comm, lambda: prepare(args, comm.size, command, files=comm.rank == 0))
        comm.stall_timeout_s = cfg.run.stall_timeout_s
        cfg, why = first_error(comm, lambda: check_placement(cfg, comm))
        notes = [why, *localize(cfg, comm)]  # hub names resolved by rank 0, model files copied once per node
        task = load_task(cfg, state, command, comm)
        first_error(comm, lambda: same_everywhere(comm, input_digests(cfg, task)))
        first_error(comm, lambda: check_rank_memory(cfg, comm, task, state, command))
        lock = first_error(comm, lambda: claim(cfg, state, task, command) if comm.rank == 0 else None)
    except Refused as exc:
        if comm.rank == 0:
            print(f"essa_mpi: error: {exc}", file=sys.stderr, flush=True)
        return 1 if exc.unexpected else 2
    for line in (note, *notes, *(task.notes if task else [])):
        if line and comm.rank == 0:
            print(line, file=sys.stderr, flush=True)
    try:
        return execute(cfg, comm, task, state, command, lock, debug)
    finally:
        if lock is not None:
            lock.release()


def describe(exc: BaseException, tail: str) -> str:
    """The one line for an error that ended the run; --debug adds the traceback.

    >>> describe(OSError(28, "No space left on device", "runs/x/summary.json"), "")
    'could not write runs/x/summary.json: No space left on device; free space or choose another run.output_dir.'
    >>> describe(IsADirectoryError(21, "Is a directory", "runs/x/metrics.jsonl"), "")
    'could not use runs/x/metrics.jsonl: Is a directory; remove or rename it (a file is expected there).'
    """
    if isinstance(exc, SystemExit):
        return (f"sys.exit({exc.code!r}) was called inside the run (by a reward or other user code?), which is "
                f"not a finished run; raise an exception instead.{tail}")
    if isinstance(exc, OSError) and exc.filename:
        return f"could not {os_error_fix(exc)}{tail}"
    frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    if isinstance(exc, (RuntimeError, ValueError)) and (frame is None or frame.filename.startswith(PACKAGE)):
        return f"{str(exc).rstrip('.')}.{tail}"  # raised by essa_mpi itself: its messages say what to do
    where = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(exc).__name__}: {exc}{where}; rerun with --debug for the traceback.{tail}"


OS_FIXES = {  # errno -> (verb, what to do): an OSError said by what it is, not all as a full disk
    errno.ENOSPC: ("write", "free space or choose another run.output_dir"),
    errno.EDQUOT: ("write", "your disk quota is full: free space or choose another run.output_dir"),
    errno.EACCES: ("use", "no permission: fix the permissions or choose another path"),
    errno.EPERM: ("use", "not permitted (immutable or owned by another user?): choose another path"),
    errno.EROFS: ("write", "the filesystem is read-only: choose a writable run.output_dir"),
    errno.EISDIR: ("use", "remove or rename it (a file is expected there)"),
    errno.ENOTDIR: ("use", "a part of the path is a file, not a directory: fix the path"),
    errno.ENAMETOOLONG: ("use", "the path is too long: choose a shorter run.output_dir"),
    errno.ENOENT: ("find", "it does not exist (a relative path after user code changed the working directory?): "
                           "fix the path or give an absolute one"),
}


def os_error_fix(exc: OSError) -> str:
    verb, fix = OS_FIXES.get(exc.errno, ("use", "fix the path or choose another run.output_dir"))
    return f"{verb} {exc.filename}: {exc.strerror}; {fix}."


def stopped_note(out: str) -> str:
    """What a signal leaves: a checkpoint to resume, or (the SFT warm start, the model load) none yet."""
    if os.path.isfile(os.path.join(out, checkpoint.FILENAME)):
        return f"the last checkpoint is kept; continue with --resume {out}"
    return ("no generation was checkpointed yet; run the same command again (the SFT warm start continues from its "
            "own checkpoint)")


def execute(cfg, comm: Comm, task, state, command: str, lock, debug: bool = False) -> int:
    """Run the command with the watchdogs armed; every failure ends every rank with one line."""
    if lock is not None:
        watchdog.on_exit(lock.release)
    out = cfg.run.output_dir

    def kept() -> str:  # the failure line's tail, decided when it happens (is there a checkpoint yet?)
        note = stopped_note(out) if command == "run" else ""
        return f" {note[:1].upper()}{note[1:]}." if note else ""

    watchdog.install_signal_handlers((lambda: stopped_note(out)) if command == "run" else None)
    if command == "run":
        comm.after_stall = lambda: stopped_note(out)
    stages.reached("start", comm.rank)
    try:
        result = {"run": command_run, "sft": command_sft, "eval": command_eval}[command](cfg, comm, task, state)
    except Refused as exc:  # found on every rank alike (first_error): no rank is left waiting
        if comm.rank == 0:
            print(f"essa_mpi: error: {exc}", file=sys.stderr, flush=True)
        return 1 if exc.unexpected else 2
    except (Exception, SystemExit) as exc:  # one rank's failure must stop all ranks, never leave them waiting
        if debug:
            traceback.print_exc()
        watchdog.say(describe(exc, "" if isinstance(exc, checkpoint.CheckpointWriteError) else kept()))
        if comm.size > 1:
            watchdog.stop(1)  # releases the lock, lets the line through, aborts every rank
        return 1
    if comm.rank == 0:
        print(json.dumps(result), flush=True)
    return 0
