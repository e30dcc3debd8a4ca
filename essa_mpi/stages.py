"""The stages of a run, named where they begin, so that a test (or a user chasing a cluster problem) can see
how far a job got and cut it at a chosen moment: a requeue, a kill or a time limit at any stage must continue.

    ESSA_STAGE_LOG=/tmp/stages.txt   # rank 0 appends each stage's name as it begins
    ESSA_STAGE_HOLD="generation 2"   # ... and waits there for good (once: the log records the hold), until a
                                     # requeue, scancel or kill ends it; "NAME*" holds at every attempt;
                                     # "load,generation 2" holds at each named stage once, in turn

Stages, in order: ``resolve`` (config checked; hub names and node-local copies next, stage.py), ``read`` (rank
0 reads the datasets), ``start`` (imports and checks done, run.output_dir claimed), ``sft`` (the warm start
trains; ``sft step K`` after each step),
``load`` (the search's model load), ``base validation``,
``generation K`` (K = 1.., its evaluation done, before the exchange), ``checkpoint K`` (inside the write's
critical section: SIGTERM waits for it), ``validation K``, ``export``. Without ESSA_STAGE_LOG this is a no-op.
"""

from __future__ import annotations

import os
import time


def reached(name: str, rank: int = 0) -> None:
    log = os.environ.get("ESSA_STAGE_LOG")
    if not log or rank != 0:
        return
    try:
        with open(log) as fh:
            seen = fh.read().splitlines()
    except FileNotFoundError:
        seen = []
    holds = [h.strip() for h in os.environ.get("ESSA_STAGE_HOLD", "").split(",")]
    holding = f"{name}*" in holds or (name in holds and f"hold {name}" not in seen)
    with open(log, "a") as fh:
        fh.write(f"{name}\n" + (f"hold {name}\n" if holding else ""))
    while holding:  # the test ends this process (requeue, signal); the other ranks wait in their collective
        time.sleep(1)
