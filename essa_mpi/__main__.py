"""``python -m essa_mpi`` → :func:`essa_mpi.cli.main`.

Until the run installs its own handlers (``watchdog.install_signal_handlers``), the imports take seconds on
every rank (torch, transformers; vLLM's preload re-exec does them twice): a Ctrl-C or SIGTERM then ends the
rank with one line and exit 128 + signal, instead of a KeyboardInterrupt traceback per rank or a crash in
a half-imported extension.
"""

import os
import signal


def _stopped_while_starting(signum, _frame) -> None:
    name = signal.Signals(signum).name
    os.write(2, f"essa_mpi: stopped by {name} while starting; nothing was written.\n".encode())
    os._exit(128 + signum)


for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):  # USR1: the time limit (jobs/essa.sbatch)
    signal.signal(_sig, _stopped_while_starting)

from essa_mpi.cli import main  # noqa: E402  (after the handlers: this import is what takes seconds)

if __name__ == "__main__":
    raise SystemExit(main())
