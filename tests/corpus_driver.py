"""Every bad-input case in one MPI job: each rank calls ``cli.main`` once per case, in this process.

    mpiexec -n 2 python tests/corpus_driver.py FILES_JSON TINY_DIR OUT_DIR RESULT_JSON

The corpus tests argument and file handling, which ends before any model loads (exit 2, one line); starting
two fresh ranks for each of its ~70 cases cost most of the suite's minutes in imports. Here the imports happen
once; what each case printed to stdout and stderr is captured per case (rank 0 writes the results). A few cases
still run as real processes (test_faults.REAL_PROCESS_CASES), which also check that no rank outlives mpiexec.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time


def main() -> int:
    files_json, tiny_dir, out_root, result = sys.argv[1:5]
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [here]
    with open(files_json) as fh:
        files = json.load(fh)
    sys.path.insert(0, files["root"])  # the reward modules the cases name
    from bad_inputs import CASES, case_args

    from essa_mpi import cli

    results = {}
    cwd = os.getcwd()
    for i, (name, (make_args, _)) in enumerate(CASES.items()):
        args = case_args(make_args(files), tiny_dir, os.path.join(out_root, f"case{i}"))
        out, err, t = io.StringIO(), io.StringIO(), time.time()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(args))
            except SystemExit as exc:  # argparse's own errors
                code = exc.code if isinstance(exc.code, int) else 1
        os.chdir(cwd)
        results[name] = {"exit": code, "stdout": out.getvalue(), "stderr": err.getvalue(),
                         "seconds": round(time.time() - t, 2)}
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_rank() == 0:
        with open(result, "w") as fh:
            json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
