"""essa_mpi: ESSA (Evolutionary Strategies for Scalable Alignment) over MPI.

Run the embedded default (SmolLM2-135M-Instruct on arithmetic) on two ranks::

    mpiexec -n 2 python -m essa_mpi

Sign convention, stated once for the whole package: ESSA *maximises* reward; pycma *minimises*, so
``search.SeededCMA.tell`` hands pycma the negated rewards.
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (imported by peft on every rank, in every precision) tries to fetch an optional CPU kernel from the
# Hugging Face hub when it is imported and logs "Failed to load CPU gemm_4bit_forward from kernels-community"
# when it cannot (offline nodes, no `kernels` package); it then uses its own kernels, so the line is noise users
# read as an error. Its other warnings still show.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
