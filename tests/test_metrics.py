"""metrics.reconcile: the log a resume starts from agrees with its checkpoint, each generation exactly once."""

import json

import numpy as np

from essa_mpi.jsonl import read_rows
from essa_mpi.metrics import reconcile


def write(path, lines):
    path.write_text("".join(line if isinstance(line, str) else json.dumps(line) + "\n" for line in lines))


def test_reconcile_cuts_damage_and_later_generations_and_recreates_missing_ones(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write(log, [{"generation": 0, "val_base_reward": 0.1}, {"generation": 0, "val_reward": 0.2},
                {"generation": 1, "reward_mean": 0.5, "sigma": 0.9}, "[1, 2]\n",
                {"generation": 2, "val_reward": 0.3},  # due again on resume from generation 2: dropped
                {"generation": 3, "reward_mean": 0.7}, '{"generation": 4, "rew'])
    rewards = np.array([[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]], np.float32)  # [3 generations, popsize 2]
    rows, note = reconcile(str(log), 2, rewards, [0.9, 0.8])
    assert [(m["generation"], sorted(m)[-1]) for m in rows] == [(0, "val_base_reward"), (0, "val_reward"),
                                                              (1, "sigma"), (2, "sigma")]
    assert rows[3] == {"generation": 2, "reward_mean": 0.5, "reward_std": 0.25, "reward_max": 0.75, "sigma": 0.8,
                       "restored_from_checkpoint": True}
    assert note == (f"WARNING: {log}: dropped 2 damaged line(s) (line 4: a JSON list, not an object, line 7: not "
                    f"complete JSON (cut off mid-write?)); re-created generation(s) [2] from the checkpoint.")
    assert read_rows(str(log)) == (rows, [])
    assert reconcile(str(log), 2, rewards, [0.9, 0.8]) == (rows, None)  # a second resume changes nothing


def test_reconcile_without_a_log_recreates_every_generation(tmp_path):
    rows, note = reconcile(str(tmp_path / "metrics.jsonl"), 2, np.ones((2, 3), np.float32), [0.5, 0.4])
    assert [m["generation"] for m in rows] == [1, 2] and "re-created generation(s) [1, 2]" in note


def test_two_lines_for_one_generation_keep_the_newest(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write(log, [{"generation": 1, "reward_mean": 0.1, "sigma": 1.0},
                {"generation": 1, "reward_mean": 0.5, "sigma": 0.9}])
    rows, _ = reconcile(str(log), 1, np.array([[0.5, 0.5]], np.float32), [0.9])
    assert rows == [{"generation": 1, "reward_mean": 0.5, "sigma": 0.9}]


def test_a_validation_nothing_measures_again_is_kept(tmp_path):
    log = tmp_path / "metrics.jsonl"
    write(log, [{"generation": 3, "reward_mean": 0.5}, {"generation": 3, "val_reward": 1.0}])
    rows, _ = reconcile(str(log), 3, np.array([[0.5]] * 3, np.float32), [0.9] * 3, revalidate=False)
    assert {"generation": 3, "val_reward": 1.0} in rows
    rows, _ = reconcile(str(log), 3, np.array([[0.5]] * 3, np.float32), [0.9] * 3, revalidate=True)
    assert {"generation": 3, "val_reward": 1.0} not in rows
