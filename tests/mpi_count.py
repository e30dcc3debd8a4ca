"""Run ``python -m essa_mpi ARGS`` under mpiexec with every collective call on MPI.COMM_WORLD counted at the
mpi4py boundary (a proxy in place of mpi4py's COMM_WORLD, not essa_mpi's own counters).

    mpiexec -n 2 python tests/mpi_count.py COUNTS_PREFIX section.key=value ...   # writes COUNTS_PREFIX.<rank>.json
"""

import json
import sys

from mpi4py import MPI

COLLECTIVES = {"Allgather", "Allgatherv", "Allreduce", "Alltoall", "Barrier", "Bcast", "Gather", "Ibcast", "Reduce",
               "Scatter", "Split", "Split_type", "allgather", "allreduce", "alltoall", "barrier", "bcast", "gather",
               "reduce", "scatter"}


class CountingComm:
    """Forwards everything to the real communicator, counting calls of collective methods by name."""

    def __init__(self, comm) -> None:
        self._comm, self.counts, self.received = comm, {}, []

    def __getattr__(self, name):
        attr = getattr(self._comm, name)
        if name not in COLLECTIVES or not callable(attr):
            return attr

        def counted(*args, **kwargs):
            self.counts[name] = self.counts.get(name, 0) + 1
            if name == "Allgatherv":  # recvbuf spec [buffer, counts, displacements, type]: bytes received
                self.received.append(int(sum(args[1][1])))
            return attr(*args, **kwargs)

        return counted


def main() -> int:
    prefix, args = sys.argv[1], sys.argv[2:]
    world = CountingComm(MPI.COMM_WORLD)
    MPI.COMM_WORLD = world  # essa_mpi.comm reads MPI.COMM_WORLD when Comm() is built
    from essa_mpi.cli import main as essa_main

    rc = essa_main(args)
    with open(f"{prefix}.{world._comm.Get_rank()}.json", "w") as fh:
        json.dump({"counts": world.counts, "allgatherv_received_bytes": world.received}, fh)
    return rc


if __name__ == "__main__":
    sys.exit(main())
