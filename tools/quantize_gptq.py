"""Kept for old scripts: the same as ``python -m essa_mpi quantize`` (essa_mpi/quantize.py)."""

import sys

from essa_mpi.quantize import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
