"""essa_mpi: ESSA (Evolutionary Strategies for Scalable Alignment) over MPI.

Run the embedded default (SmolLM2-135M-Instruct on arithmetic) on two ranks::

    mpiexec -n 2 python -m essa_mpi

Sign convention, stated once for the whole package: ESSA *maximises* reward; pycma *minimises*, so
``search.SeededCMA.tell`` hands pycma the negated rewards.
"""

__version__ = "0.1.0"
