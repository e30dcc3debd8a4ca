"""The launcher's view of the job, as plain functions of the environment (no mpi4py): how many processes
the launcher started, whether MPI joined them into one world, and which GPUs a rank owns.

    check_world(os.environ, comm.size, MPI.Get_library_version())   # ValueError if the launch split
    gpu_ids(local_rank=1, local_size=4, gpus_per_rank=2, visible=8)  # [2, 3]

A launcher whose process-management interface (PMI) the MPI library does not speak starts N processes that
each initialise MPI alone: N one-rank "worlds" that all run the whole job into the same output directory
and exit 0 (``srun --mpi=none``, or ``srun --mpi=pmix`` with an MPICH built without PMIx). We compare the
launcher's own count with the world MPI formed and stop before anything heavy starts.
"""

from __future__ import annotations

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
