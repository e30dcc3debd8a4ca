"""Run under mpiexec -n 2: rank 1's CMA-ES state is perturbed; sync_search must restore rank 0's."""

import numpy as np

from essa_mpi.comm import Comm
from essa_mpi.metrics import MetricsLog
from essa_mpi.run import sync_search
from essa_mpi.search import SeededCMA


def main() -> None:
    comm = Comm()
    quiet = MetricsLog(".", False, False, 1, 0)
    search = SeededCMA(12, 4, 0.3, False, seed=0)
    search.tell(search.seeds(0), np.arange(4.0))
    reference = search.fingerprint()
    assert not sync_search(search, comm, quiet, 1), "no repair expected yet"
    if comm.rank == 1:
        search.es.mean[3] += 0.5
    assert sync_search(search, comm, quiet, 2) and search.fingerprint() == reference
    search.tell(search.seeds(1), np.arange(4.0))  # the repaired rank keeps working in step
    assert comm.fingerprints_agree(search.fingerprint())
    print(f"rank {comm.rank} REPAIRED_OK", flush=True)


if __name__ == "__main__":
    main()
