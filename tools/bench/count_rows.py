"""A task reward that counts the rows it scores: the arithmetic task's reward, and each call's row count appended
to ``$ESSA_ROWS.<rank>`` (bench_rows.py --split counts every rank's rows from outside the evaluator).

    ESSA_ROWS=/tmp/rows PYTHONPATH=tools/bench mpiexec -n 4 python -m essa_mpi task.reward_fn=count_rows:reward
"""

import os

from essa_mpi.tasks.arithmetic import arithmetic_reward


def reward(completions: list, answer: list, **kw) -> list:
    rank = os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    with open(f"{os.environ['ESSA_ROWS']}.{rank}", "a") as fh:
        fh.write(f"{len(completions)}\n")
    return arithmetic_reward(completions, answer, **kw)
