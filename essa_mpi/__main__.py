"""``python -m essa_mpi`` → :func:`essa_mpi.cli.main`."""

from essa_mpi.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
