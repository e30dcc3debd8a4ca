"""What jobs/essa.sbatch asks around its srun step: how far the run is, whether to requeue after the time-limit
warning (``--signal=B:USR1@SECONDS``), and who died when the step failed.

    tok=$(python -m essa_mpi.slurm progress RUN_DIR)          # before the step: how far the run is
    ...                                                        # USR1: the ranks stop, the checkpoint stays
    python -m essa_mpi.slurm decide RUN_DIR "$tok" "$SLURM_RESTART_COUNT" MAX && scontrol requeue "$SLURM_JOB_ID"
    tail -n 300 LOG | python -m essa_mpi.slurm killed RUN_DIR  # srun's task lines -> one essa_mpi line

``decide`` exits 0 when the job should be requeued, else 1 after one line saying why: run.max_requeues time-limit
requeues are used up, or this attempt gained nothing (no generation checkpointed and no stage such as the SFT
warm start finished) — the next attempt would be cut at the same place, for ever. No torch, no MPI: it reads
checkpoint.h5 and essa_run.json only.
"""

from __future__ import annotations

import re
import sys

from essa_mpi import checkpoint
from essa_mpi.rundir import read_owner


def progress(out_dir: str) -> str:
    """'GENERATIONS/STAGES': generations in the latest readable checkpoint (-1: none) and stages finished.

    >>> progress("/nonexistent")
    '-1/0'
    """
    try:
        generation = checkpoint.load_latest(out_dir)[0].generation
    except ValueError:
        generation = -1
    return f"{generation}/{len(read_owner(out_dir).get('stages', []))}"


def decide(before: str, after: str, restarts: int, cap: int) -> tuple:
    """→ (requeue?, the line that says why not). ``restarts``: SLURM_RESTART_COUNT (0 in the first attempt).

    >>> decide("3/1", "7/1", 0, 10)[0], decide("3/1", "3/1", 0, 10)[0], decide("3/1", "7/1", 10, 10)[0]
    (True, False, False)
    """
    attempt = restarts + 1
    if restarts >= cap:
        return False, (f"the time limit ended attempt {attempt}, and the job was requeued {restarts} times "
                       f"(run.max_requeues={cap}); not requeued again: submit the same command to continue, or "
                       f"raise run.max_requeues.")
    if after == before:
        return False, (f"the time limit ended attempt {attempt} before it checkpointed a generation or finished a "
                       f"stage (progress {after} generations/stages, as at its start); a requeue would be cut at "
                       f"the same place: raise --time (or the --signal margin), then submit the same command.")
    return True, ""


SIGNALS = {"Killed": ("SIGKILL", "out of memory? The kernel's OOM killer sends SIGKILL: see dmesg on that node, "
                               "or sacct -j JOBID -o MaxRSS; python -m essa_mpi plan estimates the need"),
           "Segmentation fault": ("SIGSEGV", "a crash in native code (a GPU driver, a CUDA or MPI library)"),
           "Bus error": ("SIGBUS", "a file mapped by the rank changed or vanished, or /dev/shm is full"),
           "Aborted": ("SIGABRT", "a library aborted (its message is above)")}
TASK_LINE = re.compile(r"srun: error: (\S+): tasks? ([\d,\-]+): (.+)$")


def killed(lines: list, out_dir: str) -> list:
    """srun's lines about tasks that died by a signal → one essa_mpi line per node and signal, naming the ranks,
    the node, the signal, its likely cause and how to continue. Tasks srun itself terminated afterwards
    (--kill-on-bad-exit: "Terminated") are the consequence, not the cause, and are left out.

    >>> killed(["srun: error: n2: task 3: Killed", "srun: error: n1: tasks 0-2: Terminated"], "runs/x")[0][:60]
    'essa_mpi: rank 3 on n2 was killed by SIGKILL (out of memory?'
    """
    out = []
    for line in lines:
        m = TASK_LINE.search(line.strip())
        if not m or m.group(3).strip() not in SIGNALS:
            continue
        node, ranks, (name, cause) = m.group(1), m.group(2), SIGNALS[m.group(3).strip()]
        plural = "s" if "," in ranks or "-" in ranks else ""
        out.append(f"essa_mpi: rank{plural} {ranks} on {node} {'were' if plural else 'was'} killed by {name} "
                   f"({cause}); {next_step(out_dir)}")
    return out


def next_step(out_dir: str) -> str:
    """How to continue a run that was cut: resume from its checkpoint, or start it again (the directory is its own)."""
    if progress(out_dir).startswith("-1/"):
        return f"no generation was checkpointed in {out_dir}: submit the same command again (it starts over there)."
    return (f"the last checkpoint in {out_dir} is kept: submit the same sbatch command again, or run "
            f"python -m essa_mpi --resume {out_dir} under srun/mpiexec.")


def main(argv: list) -> int:
    if len(argv) == 2 and argv[0] == "progress":
        print(progress(argv[1]))
        return 0
    if len(argv) == 5 and argv[0] == "decide":
        ok, why = decide(argv[2], progress(argv[1]), int(argv[3] or 0), int(argv[4]))
        if not ok:
            print(f"essa_mpi: {why}", file=sys.stderr, flush=True)
        return 0 if ok else 1
    if len(argv) == 2 and argv[0] == "killed":
        for line in killed(sys.stdin.read().splitlines(), argv[1]):
            print(line, file=sys.stderr, flush=True)
        return 0
    print("usage: python -m essa_mpi.slurm progress RUN_DIR | decide RUN_DIR BEFORE RESTARTS MAX | killed RUN_DIR",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
