"""Run under mpiexec -n 2: rank 1's CMA-ES state is perturbed; the fingerprints that ride in the exchange must
show it, and repair must restore rank 0's state."""

import numpy as np

from essa_mpi.comm import RECORD, Comm
from essa_mpi.metrics import MetricsLog
from essa_mpi.run import repair
from essa_mpi.search import SeededCMA


def fingerprints(comm: Comm, search: SeededCMA) -> np.ndarray:
    local = np.zeros(1, RECORD)
    _, fps, _ = comm.exchange(local, [1] * comm.size, search.fingerprint(), 0.0)
    return fps


def main() -> None:
    comm = Comm()
    quiet = MetricsLog(".", False, False, 1, 0)
    search = SeededCMA(12, 4, 0.3, False, seed=0)
    search.tell(search.seeds(0), np.arange(4.0))
    reference = search.fingerprint()
    assert not repair(search, comm, quiet, 1, fingerprints(comm, search)), "no repair expected yet"
    if comm.rank == 1:
        search.es.mean[3] += 0.5
    fps = fingerprints(comm, search)
    assert fps[0] != fps[1], "the exchange must carry each rank's own fingerprint"
    assert repair(search, comm, quiet, 2, fps) and search.fingerprint() == reference
    search.tell(search.seeds(1), np.arange(4.0))  # the repaired rank keeps working in step
    fps = fingerprints(comm, search)
    assert (fps == fps[0]).all()
    print(f"rank {comm.rank} REPAIRED_OK", flush=True)


if __name__ == "__main__":
    main()
