"""tools/bench/seed_sweep.py: distributions over seeds, the rank test, and which runs count as finished."""

import argparse
import json
import os
import sys

import pytest
from fault_rows import tool

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench"))
import seed_sweep  # noqa: E402


def fake_run(root, arm, seed, vals, step_s=120.0, val_s=10.0):
    """A run folder whose metrics.jsonl validates `vals` every step_s training seconds (val_s each)."""
    out = seed_sweep.run_dir(str(root), arm, seed)
    os.makedirs(out)
    with open(os.path.join(out, "metrics.jsonl"), "w") as fh:
        for i, v in enumerate(vals):
            fh.write(json.dumps({"generation": 3 * i, "wall_s": i * step_s + (i + 1) * val_s, "val_reward": v,
                                 "val_s": val_s}) + "\n")
    return out


def test_median_range_and_never_counted_as_last():
    s = seed_sweep.spread([3.0, None, 1.0, None, None])
    assert (s["median"], s["min"], s["max"], s["censored"]) == (None, 1.0, None, 3)  # most never reached it
    assert seed_sweep.spread([0.2, 0.1, 0.3])["median"] == 0.2


def test_rank_test_separates_clean_samples_and_ties_give_no_evidence():
    t = seed_sweep.rank_test([0.30, 0.31, 0.32, 0.33, 0.34], [0.10, 0.11, 0.12, 0.13, 0.14])
    assert t["U"] == 25 and t["p"] == round(2 / 252, 4) and t["method"] == "exact, 252 splits"  # two-sided
    assert seed_sweep.rank_test([0.3, 0.3, 0.32, 0.33, 0.34], [0.1, 0.11, 0.3, 0.13, 0.14])["p"] == round(6 / 252, 4)
    assert seed_sweep.rank_test([None] * 5, [None] * 5)["p"] == 1.0
    assert seed_sweep.rank_test([1.0, 2.0, None], [None, None, None])["U"] < 4.5  # reached beats never


def test_report_reads_finished_runs_only_and_tests_the_named_arms(tmp_path):
    for seed in range(3):
        fake_run(tmp_path, "ESSA uniform", seed, [0.10, 0.20, 0.25, 0.30, 0.30, 0.31])
        fake_run(tmp_path, "GRPO lr 3e-4 fp32", seed, [0.10, 0.10, 0.12 + 0.01 * seed, 0.13, 0.14, 0.15])
    fake_run(tmp_path, "GRPO lr 3e-4 fp32", 3, [0.10, 0.30])  # killed after 2 minutes: not counted
    assert not seed_sweep.finished(seed_sweep.run_dir(str(tmp_path), "GRPO lr 3e-4 fp32", 3), 600)
    pairs = [["ESSA uniform", "GRPO lr 3e-4 fp32"], ["GRPO lr 3e-4 fp32", "ESSA uniform"],
             ["ESSA default", "ESSA uniform"]]
    args = argparse.Namespace(runs=str(tmp_path), budget_s=600.0, test=pairs)
    summary = seed_sweep.report(args)
    essa, grpo = summary["arms"]["ESSA uniform"], summary["arms"]["GRPO lr 3e-4 fp32"]
    assert essa["final"]["n"] == grpo["final"]["n"] == 3
    assert essa["final"]["median"] == 0.31 and essa["min_to_10"]["median"] == 2.0  # 0.20 at 120 s: + 10 points
    assert grpo["min_to_10"]["censored"] == 3 and grpo["best"]["median"] == 0.15
    # each pair with runs on both sides is tested, in its own order; ESSA default has none, so no third test
    assert [(t["arms"], t["final"]["U"]) for t in summary["tests"]] == [(pairs[0], 9.0), (pairs[1], 0.0)]
    lines = seed_sweep.table(summary).splitlines()
    assert lines[2].startswith("| ESSA uniform | 3 | 0.100 | 0.310 [0.310, 0.310] | +0.210 [+0.210, +0.210] |")
    assert "never [never, never], 3 never" in lines[3] and "Mann-Whitney U" in lines[-1]
    assert sum(line.startswith("Mann-Whitney U") for line in lines) == 2


def test_an_unfinished_run_is_moved_aside_and_run_again(tmp_path, monkeypatch):
    out = fake_run(tmp_path, "ESSA uniform", 0, [0.1, 0.2])
    launched = []
    monkeypatch.setattr(seed_sweep, "essa", lambda ns, sft, o, ov: launched.append((ns.seed, o, ov)))
    args = argparse.Namespace(runs=str(tmp_path), budget_s=600.0)
    seed_sweep.launch(args, "ESSA uniform", 0, "adapter")
    assert launched == [(0, out, seed_sweep.ESSA_PAPER)] and not os.path.exists(out)
    assert [d for d in os.listdir(os.path.dirname(out)) if d.startswith("s0.unfinished-")]
    fake_run(tmp_path, "ESSA uniform", 0, [0.1, 0.2, 0.2, 0.2, 0.2, 0.2])  # a finished run is kept
    seed_sweep.launch(args, "ESSA uniform", 0, "adapter")
    assert len(launched) == 1


def test_held_is_a_step_function_that_starts_at_the_start():
    points = [(0.2, 0.10), (120.0, 0.20), (240.0, 0.15)]  # [(training s, validation)]
    assert [seed_sweep.held(points, t) for t in (0.0, 119.0, 120.0, 600.0)] == [0.10, 0.10, 0.20, 0.15]


def test_an_earlier_reports_runs_count_where_the_folders_lack_them(tmp_path):
    for seed in range(2):
        fake_run(tmp_path / "old", "ESSA uniform", seed, [0.10, 0.20, 0.25, 0.30, 0.30, 0.30 + 0.01 * seed])
    args = argparse.Namespace(runs=str(tmp_path / "old"), budget_s=600.0, test=None)
    old = seed_sweep.report(args)
    for r in old["arms"]["ESSA uniform"]["seeds"].values():
        del r["gain"]  # reports written before "gain" was a metric lack it
    with open(tmp_path / "old.json", "w") as fh:
        json.dump(old, fh)  # what --report --name wrote; the folders are gone on a new machine
    fake_run(tmp_path / "new", "ESSA uniform", 1, [0.10, 0.12, 0.12, 0.12, 0.12, 0.12])  # a folder wins
    fake_run(tmp_path / "new", "GRPO lr 1e-4 bf16", 0, [0.10, 0.11, 0.12, 0.13, 0.14, 0.15])
    args = argparse.Namespace(runs=str(tmp_path / "new"), budget_s=600.0, test=None,
                              previous=str(tmp_path / "old.json"))
    arms = seed_sweep.report(args)["arms"]
    assert [r["final"] for r in arms["ESSA uniform"]["seeds"].values()] == [0.30, 0.12]
    assert [r["gain"] for r in arms["ESSA uniform"]["seeds"].values()] == [0.20, 0.02]  # from the JSON, and a folder
    assert list(arms) == ["ESSA uniform", "GRPO lr 1e-4 bf16"] and arms["GRPO lr 1e-4 bf16"]["final"]["n"] == 1


def test_a_rank_test_of_an_arm_without_runs_says_so(tmp_path, capsys):
    fake_run(tmp_path, "ESSA uniform", 0, [0.10, 0.20, 0.25, 0.30, 0.30, 0.31])
    assert seed_sweep.main(["--runs", str(tmp_path), "--report", "--test", "ESSA uniform", "ESSA default"]) == 0
    err = capsys.readouterr().err
    assert "no rank test" in err and "'ESSA default'" in err and "['ESSA uniform']" in err
    assert len(err.splitlines()) == 1


def test_a_missing_previous_report_is_one_clear_line(tmp_path, capsys):
    assert seed_sweep.main(["--runs", str(tmp_path), "--report", "--previous", str(tmp_path / "no.json")]) == 2
    err = capsys.readouterr().err
    assert f"--previous {tmp_path / 'no.json'} is not a file" in err and len(err.splitlines()) == 1


def test_runs_of_a_faster_machine_on_this_clock(tmp_path):
    for seed in range(2):
        fake_run(tmp_path, "ESSA uniform", seed, [0.10, 0.20, 0.25, 0.30, 0.30, 0.31])  # every 120 s to 600 s
    pairs = [["ESSA uniform (clock x 1.5)", "ESSA uniform"]]
    args = argparse.Namespace(runs=str(tmp_path), budget_s=600.0, test=pairs, rescale=[("ESSA uniform", 1.5)])
    summary = seed_sweep.report(args)
    fast, here = summary["arms"]["ESSA uniform"], summary["arms"]["ESSA uniform (clock x 1.5)"]
    assert fast["final"]["median"] == 0.31 and fast["min_to_10"]["median"] == 2.0  # as measured
    # 0, 180, 360, 540 s kept; 720 and 900 s are past the budget + 5 % on this clock
    assert [p for p in here["seeds"][0]["curve"]] == [(0.0, 0.10), (180.0, 0.20), (360.0, 0.25), (540.0, 0.30)]
    assert here["final"]["median"] == 0.30 and here["min_to_10"]["median"] == 3.0
    assert summary["tests"][0]["final"]["U"] == 0.0  # every rescaled final below every measured one
    line = next(x for x in seed_sweep.table(summary).splitlines() if x.startswith("| ESSA uniform (clock x 1.5) |"))
    assert line.endswith("| – |")  # steps within the cut are unknown
    with open(tmp_path / "old.json", "w") as fh:
        json.dump(summary, fh)  # a later report reads the measured arm back, never the derived one
    args = argparse.Namespace(runs=str(tmp_path / "none"), budget_s=600.0, test=None,
                              previous=str(tmp_path / "old.json"))
    assert list(seed_sweep.report(args)["arms"]) == ["ESSA uniform"]


def test_a_bad_rescale_is_one_clear_line(tmp_path, capsys):
    for bad in ("ESSA uniform", "ESSA uniform=fast", "ESSA uniform=0", "ESSA paper=1.5"):
        assert seed_sweep.main(["--runs", str(tmp_path), "--report", "--rescale", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"seed_sweep: --rescale '{bad}': ") and "ARM=FACTOR" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args, says", [
    (["--seeds", "5-1", "--arms", "ESSA uniform"], "--seeds 5-1 is an empty range"),
    (["--seeds", "abc", "--report"], "--seeds abc is not seeds"),
    (["--seeds", "-1", "--report"], "--seeds -1 is not seeds"),
    ([], "nothing to do; pass --arms"),
    (["--report", "--name", "would_be_overwritten"], "no finished run under --runs"),
])
def test_bad_arguments_are_one_line_and_write_nothing(tmp_path, capsys, args, says):
    """Each used to exit 0 having done nothing, trace back, or (--report --name on an empty folder) overwrite a
    results file with an empty table."""
    code = seed_sweep.main(["--runs", str(tmp_path), *args])
    err = capsys.readouterr().err
    tool(f"seed_sweep {' '.join(args) or '(no arguments)'}", code, err)
    assert code == 2 and says in err and len(err.splitlines()) == 1, err
    assert not os.path.exists(os.path.join(seed_sweep.RESULTS, "would_be_overwritten.json"))


def test_report_on_a_missing_folder_is_one_line(tmp_path, capsys):
    code = seed_sweep.main(["--runs", str(tmp_path / "none"), "--report"])
    err = capsys.readouterr().err
    tool("seed_sweep --report on a missing folder", code, err)
    assert code == 2 and "is not a folder of runs" in err
