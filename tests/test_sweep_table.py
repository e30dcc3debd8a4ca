import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench"))
from sweep_table import row, table  # noqa: E402


def test_each_run_is_read_against_its_own_start():
    r = row([(0, 0.10), (120, 0.12), (240, 0.21), (360, 0.18)])  # [(training s, validation)]
    assert r == {"start": 0.10, "best": 0.21, "end": 0.18, "to5": 240, "to10": 240}
    assert row([(0, 0.3), (60, 0.34)])["to5"] is None  # never reached: None, printed "never"


def test_two_seeds_give_mean_and_half_spread_and_a_missing_run_is_one_seed():
    s0 = {"seed": 0, "curves": {"ESSA": [(0, 0.10), (300, 0.20)], "GRPO lr=1e-4": [(0, 0.10), (300, 0.09)]}}
    s1 = {"seed": 1, "curves": {"ESSA": [(0, 0.10), (300, 0.14)]}}
    lines = table([s0, s1]).splitlines()
    essa, grpo = lines[2].split(" | "), lines[3].split(" | ")
    assert essa[1] == "0 / 1" and essa[5] == "+7.00 ± 3.00" and essa[7].startswith("5.0, 5.0 / never")
    assert grpo[1] == "0" and grpo[5] == "+0.00 (1 seed)" and grpo[6] == "-1.00 (1 seed)"
