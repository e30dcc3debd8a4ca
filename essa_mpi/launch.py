"""The launcher's view of the job, as plain functions of the environment (no mpi4py): how many processes
the launcher started, whether MPI joined them into one world, and which GPUs a rank owns.

    check_world(os.environ, comm.size, MPI.Get_library_version())   # ValueError if the launch split
    gpu_ids(local_rank=1, local_size=4, gpus_per_rank=2, visible=8)  # [2, 3]
    bind_gpus(os.environ, gpus_per_rank=1, node_gpus=8)              # "3" for the 4th rank of a node: before CUDA

A launcher whose process-management interface (PMI) the MPI library does not speak starts N processes that
each initialise MPI alone: N one-rank "worlds" that all run the whole job into the same output directory
and exit 0 (``srun --mpi=none``, or ``srun --mpi=pmix`` with an MPICH built without PMIx). We compare the
launcher's own count with the world MPI formed and stop before anything heavy starts.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Mapping

# Most specific first: an mpiexec started inside an srun step sets its own PMI_SIZE, while SLURM's step
# variables leak through from outside; the innermost launcher's count is the one MPI must match.
SIZE_VARIABLES = (
    ("OMPI_COMM_WORLD_SIZE", "Open MPI's mpirun"),
    ("PMI_SIZE", "a PMI-1/PMI-2 launcher (mpiexec/Hydra, srun --mpi=pmi2)"),
    ("SLURM_STEP_NUM_TASKS", "srun"),
)
FIX = ("with srun, pick the PMI your MPI speaks: --mpi=pmi2 for the mpich wheel that pip install brings, "
       "--mpi=pmix for Open MPI (jobs/essa.sbatch picks it; SLURM_MPI_TYPE overrides); or build mpi4py against the "
       "site MPI (pip install --no-binary=mpi4py --force-reinstall mpi4py) and uninstall the mpich wheel")


def expected_world(env: Mapping[str, str]) -> tuple | None:
    """(processes the launcher started, the variable that says so), or None outside a launcher.

    >>> expected_world({"SLURM_STEP_NUM_TASKS": "4"}), expected_world({})
    ((4, 'SLURM_STEP_NUM_TASKS'), None)
    >>> expected_world({"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "2"})  # mpiexec inside a one-task step
    (2, 'PMI_SIZE')
    """
    for name, _ in SIZE_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value), name
    return None


def check_world(env: Mapping[str, str], world_size: int, library: str = "") -> None:
    """ValueError (one line: the cause and the fix) when the launcher started more processes than MPI joined.

    >>> check_world({"SLURM_STEP_NUM_TASKS": "2"}, 2)
    >>> check_world({"SLURM_STEP_NUM_TASKS": "2"}, 1, "MPICH Version: 5.0.2")
    Traceback (most recent call last):
    ...
    ValueError: srun started 2 processes (SLURM_STEP_NUM_TASKS=2) but MPI (MPICH Version: 5.0.2) joined them into worlds of 1: the launcher and the MPI library do not share a PMI, so each process would run the whole job alone; with srun, pick the PMI your MPI speaks: --mpi=pmi2 for the mpich wheel that pip install brings, --mpi=pmix for Open MPI (jobs/essa.sbatch picks it; SLURM_MPI_TYPE overrides); or build mpi4py against the site MPI (pip install --no-binary=mpi4py --force-reinstall mpi4py) and uninstall the mpich wheel.
    """
    found = expected_world(env)
    if found is None or found[0] <= world_size:
        return
    n, name = found
    who = dict(SIZE_VARIABLES)[name]
    lib = " ".join((library.strip().splitlines() or ["?"])[0].split())
    raise ValueError(f"{who} started {n} processes ({name}={n}) but MPI ({lib}) joined them into worlds of "
                     f"{world_size}: the launcher and the MPI library do not share a PMI, so each process would "
                     f"run the whole job alone; {FIX}.")


def srun_mpi_plugin(library: str) -> str:
    """The ``srun --mpi`` plugin that forms one world with this MPI library (../shared/NOTES.md, measured):
    Open MPI speaks PMIx; MPICH (the PyPI wheel included), Intel MPI and MVAPICH speak PMI-2.

    >>> srun_mpi_plugin("MPICH Version: 5.0.2"), srun_mpi_plugin("Open MPI v4.1.4, package: Debian")
    ('pmi2', 'pmix')
    """
    return "pmix" if "open mpi" in library.lower() else "pmi2"


def gpu_ids(local_rank: int, local_size: int, gpus_per_rank: int, visible: int) -> list:
    """CUDA device indices this rank owns: ``[local_rank*g, (local_rank+1)*g)`` of the GPUs this process
    sees. When every process sees exactly g GPUs (SLURM's per-task binding, ``--gpus-per-task=g`` or
    ``--gpu-bind``, gives each task its own CUDA_VISIBLE_DEVICES), the rank owns all of them.

    >>> gpu_ids(0, 4, 1, 4), gpu_ids(3, 4, 2, 8), gpu_ids(5, 8, 2, 2)
    ([0], [6, 7], [0, 1])
    >>> gpu_ids(0, 8, 2, 8)
    Traceback (most recent call last):
    ...
    ValueError: 8 ranks on this node x model.gpus_per_rank=2 need 16 GPUs but this process sees 8 (CUDA_VISIBLE_DEVICES / SLURM's GPU binding); launch at most 4 ranks per node, or lower model.gpus_per_rank to 1.
    """
    if gpus_per_rank < 1:
        raise ValueError(f"model.gpus_per_rank={gpus_per_rank} must be >= 1.")
    if visible == gpus_per_rank:
        return list(range(visible))
    if local_size * gpus_per_rank > visible:
        raise ValueError(f"{local_size} ranks on this node x model.gpus_per_rank={gpus_per_rank} need "
                         f"{local_size * gpus_per_rank} GPUs but this process sees {visible} (CUDA_VISIBLE_DEVICES "
                         f"/ SLURM's GPU binding); launch at most {max(1, visible // gpus_per_rank)} ranks per node, "
                         f"or lower model.gpus_per_rank to {max(1, visible // local_size)}.")
    return list(range(local_rank * gpus_per_rank, (local_rank + 1) * gpus_per_rank))


# The launcher's word on this process's place on its node, innermost launcher first (as SIZE_VARIABLES):
# (local rank variable, local size variable, who sets them). SLURM's size comes from the step's task layout.
LOCAL_VARIABLES = (
    ("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE", "Open MPI's mpirun"),
    ("MPI_LOCALRANKID", "MPI_LOCALNRANKS", "MPICH/Intel MPI's mpiexec (Hydra)"),
    ("SLURM_LOCALID", None, "srun"),
)
BOUND = "ESSA_GPU_SLOT"  # "local_rank/local_size/variable": set with CUDA_VISIBLE_DEVICES, checked against MPI


def tasks_on_node(layout: str, node: int) -> int | None:
    """Tasks SLURM put on node index ``node`` from a layout like SLURM_STEP_TASKS_PER_NODE ("4(x2),3").

    >>> tasks_on_node("4(x2),3", 0), tasks_on_node("4(x2),3", 2), tasks_on_node("8", 0), tasks_on_node("2", 5)
    (4, 3, 8, None)
    """
    counts = []
    for part in layout.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts[node] if 0 <= node < len(counts) else None


def local_slot(env: Mapping[str, str]) -> tuple | None:
    """(local rank, ranks on this node, the variable that says so) from the launcher, before MPI starts; None
    outside a launcher that says.

    >>> local_slot({"SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "8(x2)", "SLURM_NODEID": "1"})
    (3, 8, 'SLURM_LOCALID')
    >>> local_slot({"SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    (1, 2, 'MPI_LOCALRANKID')
    >>> local_slot({}), local_slot({"SLURM_LOCALID": "0"})
    (None, None)
    """
    for rank_var, size_var, _ in LOCAL_VARIABLES:
        rank = env.get(rank_var, "").strip()
        if not rank.isdigit():
            continue
        if size_var:
            size = env.get(size_var, "").strip()
            size = int(size) if size.isdigit() else None
        else:  # srun: the step's layout (mpiexec inside an allocation leaves the batch step's behind)
            node = env.get("SLURM_NODEID", "0").strip()
            size = next((tasks_on_node(env[v], int(node) if node.isdigit() else 0)
                         for v in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE")
                         if env.get(v)), None)
        if size and int(rank) < size:
            return int(rank), size, rank_var
    return None


def node_gpus() -> int:
    """NVIDIA GPUs on this node, from the driver's /proc entries (or /dev/nvidiaN): no CUDA call, so
    CUDA_VISIBLE_DEVICES can still be set afterwards. 0 on a machine without the NVIDIA driver."""
    found = glob.glob("/proc/driver/nvidia/gpus/*")
    return len(found) or len([d for d in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", d)])


def bind_gpus(env: Mapping[str, str], gpus_per_rank: int, node_gpus: int) -> str | None:
    """The CUDA_VISIBLE_DEVICES this rank must have before anything starts CUDA (CUDA reads the variable once
    per process), or None to leave it alone: the launcher bound the rank already (it sees exactly
    ``gpus_per_rank`` GPUs: ``srun --gpus-per-task``), no GPU is visible, the local rank is unknown, or the
    node has too few GPUs (``gpu_ids`` then says so with the numbers, after MPI starts). A list the
    launcher set (SLURM's GPUs of this job on a shared node) is split, never widened.

    >>> bind_gpus({"MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "8"}, 1, node_gpus=8)
    '3'
    >>> bind_gpus({"SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}, 2, 8)
    '6,7'
    >>> bind_gpus({"SLURM_LOCALID": "1", "SLURM_STEP_TASKS_PER_NODE": "2", "CUDA_VISIBLE_DEVICES": "5"}, 1, 8)
    >>> bind_gpus({"MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "4"}, 1, node_gpus=0)
    """
    preset = env.get("CUDA_VISIBLE_DEVICES")
    visible = [x.strip() for x in preset.split(",") if x.strip()] if preset is not None else \
        [str(i) for i in range(node_gpus)]
    slot = local_slot(env)
    if not visible or len(visible) == gpus_per_rank or slot is None or gpus_per_rank < 1:
        return None
    rank, size, _ = slot
    if size * gpus_per_rank > len(visible):
        return None
    return ",".join(visible[rank * gpus_per_rank: (rank + 1) * gpus_per_rank])


def bind_rank(gpus_per_rank: int, env: dict | None = None) -> str | None:
    """Set this process's CUDA_VISIBLE_DEVICES (``bind_gpus``) and remember the slot it came from (``BOUND``)
    for ``check_slot``. → the value set, or None. Call before torch, vLLM or bitsandbytes can touch CUDA."""
    env = os.environ if env is None else env
    value = bind_gpus(env, gpus_per_rank, node_gpus() if "CUDA_VISIBLE_DEVICES" not in env else 0)
    if value is not None:
        rank, size, var = local_slot(env)
        env["CUDA_VISIBLE_DEVICES"], env[BOUND] = value, f"{rank}/{size}/{var}"
    return value


def check_slot(env: Mapping[str, str], local_rank: int, local_size: int) -> None:
    """ValueError when the launcher's local rank, on which ``bind_rank`` chose this rank's GPUs, is not
    MPI's (its shared-memory split of the node): two ranks would share a GPU.

    >>> check_slot({BOUND: "1/2/MPI_LOCALRANKID"}, 1, 2)
    >>> check_slot({BOUND: "1/2/MPI_LOCALRANKID"}, 0, 4)
    Traceback (most recent call last):
    ...
    ValueError: the launcher placed this process as local rank 1 of 2 (MPI_LOCALRANKID) and chose its GPUs from that, but MPI counts it as local rank 0 of 4 on this node; GPUs would be shared between ranks: bind GPUs in the launcher (srun --gpus-per-task=G, or CUDA_VISIBLE_DEVICES per rank).
    """
    bound = env.get(BOUND, "").split("/")
    if len(bound) != 3 or (int(bound[0]), int(bound[1])) == (local_rank, local_size):
        return
    raise ValueError(f"the launcher placed this process as local rank {bound[0]} of {bound[1]} ({bound[2]}) and "
                     f"chose its GPUs from that, but MPI counts it as local rank {local_rank} of {local_size} on "
                     f"this node; GPUs would be shared between ranks: bind GPUs in the launcher (srun "
                     f"--gpus-per-task=G, or CUDA_VISIBLE_DEVICES per rank).")


def threads_per_rank(mine: set, node: list) -> int:
    """Compute threads for a rank bound to the cores ``mine`` (its affinity mask) when the node's ranks hold
    ``node`` (every local rank's mask, its own included): its cores divided among the ranks whose masks
    overlap it. A launcher that binds each rank to its own cores (srun --cpu-bind, cpus-per-task) gives it all
    of them; unbound ranks on one cgroup split it; never os.cpu_count(), which counts cores the job was not given.

    >>> threads_per_rank({0, 1, 2, 3}, [{0, 1, 2, 3}, {4, 5, 6, 7}]), threads_per_rank({0, 1, 2, 3}, [{0, 1, 2, 3}] * 2)
    (4, 2)
    >>> threads_per_rank({0}, [{0}] * 4)
    1
    """
    sharing = sum(1 for other in node if set(other) & set(mine)) or 1
    return max(1, len(mine) // sharing)


def on_cpu(cfg) -> bool:
    """model.device resolved: cpu, or auto on a machine without CUDA."""
    import torch  # here: launch's other functions run before anything imports torch

    return cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())


def vllm_import_problem() -> str | None:
    """None when ``import vllm`` works here, else what went wrong, in a few words."""
    try:
        import vllm  # noqa: F401
    except Exception as exc:  # not installed, or built for another torch/CUDA: either way hf serves
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}".rstrip(": ")
    return None


def choose_engine(cfg, cuda: bool, import_problem=vllm_import_problem) -> tuple:
    """model.engine → (the engine this rank uses, why, in one line). auto: vLLM where the rank has a CUDA device,
    the precision is one vLLM runs here (fp32, bf16) and vLLM imports; hf otherwise (on CPU the own batched path
    is the faster: tools/results/README.md, "Engines").

    >>> choose_engine(type("M", (), {"engine": "auto", "precision": "bf16"}), cuda=False)
    ('hf', 'model.engine=auto: hf (no CUDA device on this rank)')
    >>> choose_engine(type("M", (), {"engine": "auto", "precision": "bf16"}), True, lambda: None)[0]
    'vllm'
    """
    if cfg.engine != "auto":
        return cfg.engine, f"model.engine={cfg.engine} (as set)"
    if not cuda:
        return "hf", "model.engine=auto: hf (no CUDA device on this rank)"
    if cfg.precision not in ("fp32", "bf16"):
        return "hf", f"model.engine=auto: hf (model.precision={cfg.precision}; vLLM runs fp32 or bf16 here)"
    problem = import_problem()
    if problem:
        return "hf", (f"model.engine=auto: hf (vLLM does not import: {problem}; pip install -e '.[vllm]' for the "
                      f"faster engine on GPUs)")
    return "vllm", "model.engine=auto: vllm (a CUDA device, and vLLM imports)"


def placement(cfg, local_rank: int, local_size: int) -> tuple:
    """→ (this rank's first device, accelerate max_memory over its GPUs when it spreads the model over
    several, else None). GPUs per rank: ``launch.gpu_ids`` over what this process sees; after
    ``launch.bind_rank`` that is exactly the rank's own, devices 0..g-1."""
    import torch

    if on_cpu(cfg):
        return torch.device("cpu"), None
    if not torch.cuda.is_available():
        raise ValueError("model.device=cuda but CUDA is not available; use model.device=cpu or auto.")
    ids = gpu_ids(local_rank, local_size, cfg.gpus_per_rank, torch.cuda.device_count())
    if cfg.engine == "vllm" and ids[0] != 0:  # vLLM always starts at device 0 of what the process sees
        raise ValueError(f"model.engine=vllm: local rank {local_rank} of {local_size} sees "
                         f"{torch.cuda.device_count()} GPUs, so its engine would share GPU 0 with rank 0; the "
                         f"launcher named no local rank to bind GPUs by (SLURM_LOCALID, MPI_LOCALRANKID, "
                         f"OMPI_COMM_WORLD_LOCAL_RANK): launch with srun or mpiexec, or bind GPUs in the launcher "
                         f"(srun --gpus-per-task={cfg.gpus_per_rank}).")
    if len(ids) == 1:
        return torch.device("cuda", ids[0]), None
    # accelerate fills the listed GPUs in order and never touches the others (other ranks' GPUs)
    return torch.device("cuda", ids[0]), {i: torch.cuda.get_device_properties(i).total_memory for i in ids}
