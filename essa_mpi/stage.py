"""Start-up's first steps, each done once: resolve (rank 0 turns hub names into local paths for the whole job)
and stage (the first rank of each node copies the model's files to node-local disk; its node's ranks load
that copy and never touch the shared filesystem for them).

    notes = localize(cfg, comm)    # every rank; afterwards modelfiles.resolve(cfg.model) names the local copy

At 128 ranks this turns 128 hub resolutions into one and 128 reads of every weight file into one per node.
The config keeps the names the user gave (digests, checkpoints and essa_run.json compare those); only
``modelfiles.LOCAL`` says where the files are on this rank. Dataset rows take another road: rank 0 reads
them and broadcasts the rows (cli.load_task), they are small.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import time

from essa_mpi import modelfiles, stages
from essa_mpi.comm import Comm, first_error, host_label
from essa_mpi.config import EMBEDDED_MODEL, Config
from essa_mpi.preflight import looks_like_hub_id

GiB = 2**30
# what the loaders read from a model directory (transformers, tokenizers, safetensors, vLLM, GPTQ); skipped:
# other formats of the same weights (original/*.pth, *.bin beside safetensors, *.gguf not named), READMEs, images
NEEDED = re.compile(r"[^/]+\.(json|safetensors|model|tiktoken|txt|py|jinja)")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja"]
MARK = ".essa_staged.json"  # written last: the copy is whole when it names the source's current files


def hub_names(cfg: Config) -> dict:
    """{config key: (hub id, revision)} of the model and reward model given by hub name."""
    out = {}
    if cfg.model.name_or_path != EMBEDDED_MODEL and looks_like_hub_id(cfg.model.name_or_path):
        out["model.name_or_path"] = (cfg.model.name_or_path, cfg.model.revision)
    rm = cfg.task.reward_model
    if cfg.task.name == "reward_model" and rm and looks_like_hub_id(rm):
        out["task.reward_model"] = (rm, None)
    return out


def fetch(key: str, name: str, revision: str | None) -> str:
    """Rank 0: the local directory of hub model ``name`` (downloaded into HF_HOME unless it is there; with
    HF_HUB_OFFLINE=1 only from there). ValueError naming the key and the fix."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(name, revision=revision, allow_patterns=HUB_PATTERNS)
    except Exception as exc:  # network, auth, missing repo or revision, offline cache miss: one line for all
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{key}={name!r}{f' (revision {revision})' if revision else ''}: could not resolve it on "
                         f"the Hugging Face hub ({type(exc).__name__}: {why[:200]}); check the name, the revision "
                         f"and HF_TOKEN, or download it beforehand into HF_HOME (huggingface-cli download {name}) "
                         f"and set HF_HUB_OFFLINE=1, or give a local directory.") from None


def go_offline() -> None:
    """Every rank but 0: nothing may reach the hub (the paths are local; this also stops implicit lookups)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub

        hub.HF_HUB_OFFLINE = True  # read once at import, which has happened
    except ImportError:
        pass


def stage_root(setting: str, env) -> str | None:
    """The node-local directory of run.stage_dir, or None to read in place.

    >>> stage_root("auto", {"SLURM_JOB_ID": "7", "TMPDIR": "/scratch"}), stage_root("auto", {"TMPDIR": "/x"})
    ('/scratch', None)
    >>> stage_root("none", {"SLURM_JOB_ID": "7"}), stage_root("/local", {})
    (None, '/local')
    """
    if setting == "none":
        return None
    if setting != "auto":
        return setting
    if not env.get("SLURM_JOB_ID"):
        return None
    return env.get("SLURM_TMPDIR") or env.get("TMPDIR") or "/tmp"


def model_files(path: str, gguf: str | None) -> list:
    """Names (relative to path) of the files the loaders read: the GGUF file, or the directory's config,
    tokenizer and weights (*.bin only where there is no safetensors)."""
    if gguf:
        return [gguf]
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))
    keep = [n for n in names if NEEDED.fullmatch(n)]
    if not any(n.endswith(".safetensors") for n in keep):
        keep += [n for n in names if n.endswith(".bin")]
    return keep


def listing(path: str, names: list) -> dict:
    """{name: [size, mtime_ns]} of the source files (what a whole, current copy must match)."""
    return {n: [(st := os.stat(os.path.join(path, n))).st_size, st.st_mtime_ns] for n in names}


def copy_model(path: str, gguf: str | None, dest: str) -> tuple:
    """Copy the model's files from path to dest (atomic: a temp directory renamed); reuse a whole copy (a
    requeued job). → (bytes copied, seconds)."""
    names = model_files(path, gguf)
    want = listing(path, names)
    mark = os.path.join(dest, MARK)
    if os.path.isfile(mark):
        with open(mark) as fh:
            if json.load(fh) == want:
                return 0, 0.0
        shutil.rmtree(dest, ignore_errors=True)
    t = time.time()
    part = f"{dest}.part{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    try:
        for n in names:
            shutil.copyfile(os.path.join(path, n), os.path.join(part, n))  # copy_file_range/sendfile: in the kernel
        with open(os.path.join(part, MARK), "w") as fh:
            json.dump(want, fh)
    except BaseException:
        shutil.rmtree(part, ignore_errors=True)
        raise
    shutil.rmtree(dest, ignore_errors=True)  # a copy without its mark (cut before it was whole)
    os.replace(part, dest)
    return sum(size for size, _ in want.values()), time.time() - t


def stage_node(sources: dict, root: str, node_dir: str, keep: bool) -> tuple:
    """The first rank of a node: copy every source {key: (path, gguf)} under root/node_dir. → ({key: (local
    path, gguf)}, bytes, seconds, note or None). Too little space: nothing copied, a note, the shared paths."""
    need = sum(sum(s for s, _ in listing(p, model_files(p, g)).values()) for p, g in sources.values())
    base = os.path.join(root, node_dir)
    os.makedirs(base, mode=0o700, exist_ok=True)
    free = shutil.disk_usage(base).free
    if need > free:
        return {}, 0, 0.0, (f"run.stage_dir={root}: the model files need {need / GiB:.1f} GiB on {host_label()}, "
                            f"{free / GiB:.1f} GiB free; reading them from the shared path instead (set "
                            f"run.stage_dir to a larger node-local disk, or none).")
    if not keep:
        atexit.register(shutil.rmtree, base, True)
    local, copied, seconds = {}, 0, 0.0
    for key, (path, gguf) in sources.items():
        dest = os.path.join(base, re.sub(r"\W", "_", key))
        try:
            n, s = copy_model(path, gguf, dest)
        except OSError as exc:  # the disk filled meanwhile, or refuses: the shared path still works
            return {}, 0, 0.0, (f"run.stage_dir={root}: could not copy {path} on {host_label()} ({exc.strerror}: "
                                f"{exc.filename}); reading it from the shared path instead.")
        local[key], copied, seconds = (dest, gguf), copied + n, seconds + s
    return local, copied, seconds, None


def sources(cfg: Config) -> dict:
    """{config key: (local path, gguf)} of the model files every rank loads (after hub names are resolved)."""
    out = {"model.name_or_path": modelfiles.resolve(cfg.model)}
    rm = cfg.task.reward_model
    if cfg.task.name == "reward_model" and rm:
        out["task.reward_model"] = (modelfiles.local_path(rm), None)
    return {k: v for k, v in out.items() if os.path.isdir(v[0])}


def localize(cfg: Config, comm: Comm) -> list:
    """Resolve hub names on rank 0 (broadcast), then stage on the first rank of each node (run.stage_dir).
    Every rank calls it; afterwards modelfiles.LOCAL points this rank's loaders at local files. → lines for
    rank 0 to print."""
    stages.reached("resolve", comm.rank)
    names = hub_names(cfg)
    fetched = first_error(comm, lambda: {k: fetch(k, *v) for k, v in names.items()} if comm.rank == 0 else None)
    if names:
        fetched = comm.bcast(fetched, label="the hub names rank 0 resolved")
    if comm.rank != 0:
        go_offline()
    config_names = {"model.name_or_path": cfg.model.name_or_path, "task.reward_model": cfg.task.reward_model}
    for key, path in (fetched or {}).items():
        modelfiles.LOCAL[config_names[key]] = (path, cfg.model.gguf_file if key == "model.name_or_path" else None)
    root = stage_root(cfg.run.stage_dir, os.environ)
    if root is None:
        return []
    # one directory per job and node: the attempts of a requeued job reuse it; outside SLURM the leader's pid
    # keeps two runs on one host apart (each removes its own at exit)
    job = os.environ.get("SLURM_JOB_ID") or f"pid{os.getpid()}"
    node_dir = f"essa_mpi-{job}-{re.sub(r'[^A-Za-z0-9_.-]', '_', host_label())}"
    src = sources(cfg)
    staged = first_error(comm, lambda: stage_node(src, root, node_dir, cfg.run.keep_stage)
                         if comm.local_rank == 0 else None)
    every = comm.allgather(staged, label="the node-local copies of the model files")
    local = every[comm.node_leader][0]
    for key, where in local.items():
        modelfiles.LOCAL[config_names[key]] = where
    copied = [e for e in every if e is not None]
    slowest = max(e[2] for e in copied)
    size = max(e[1] for e in copied)
    notes = [e[3] for e in copied if e[3]][:1]
    if any(e[0] for e in copied):
        notes.append(f"model files staged once per node to {root}/{node_dir[:node_dir.rindex('-')]}-<node> on "
                     f"{sum(1 for e in copied if e[0])} node(s): {size / GiB:.2f} GiB copied, slowest node "
                     f"{slowest:.1f} s{'' if cfg.run.keep_stage else ' (removed at exit)'}")
    return notes
