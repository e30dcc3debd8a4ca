import json

import numpy as np
import pytest

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import batch_indices, build_task
from essa_mpi.tasks.arithmetic import arithmetic_reward
from essa_mpi.tasks.gsm8k import gold_answer, gsm8k_reward
from essa_mpi.tasks.toy import alnum_fraction_reward


@pytest.mark.parametrize("name", ["arithmetic", "toy"])
def test_builtin_tasks_are_seeded_and_held_out(name):
    a = build_task(TaskConfig(name=name, val_size=32), seed=3)
    b = build_task(TaskConfig(name=name, val_size=32), seed=3)
    assert a.train[:5] == b.train[:5] and a.val == b.val and len(a.val) == 32
    if name == "arithmetic":
        assert not {e["prompt"] for e in a.val} & {e["prompt"] for e in a.train}


def test_arithmetic_answers_are_correct():
    for e in build_task(TaskConfig(val_size=50), seed=0).val:
        q = e["prompt"].removeprefix("What is ").split("?")[0]
        assert str(eval(q)) == e["answer"]  # noqa: S307 - our own generated "a op b"


@pytest.mark.parametrize("completion,answer,reward", [
    ("85", "85", 1.0), ("47 + 38 = 85", "85", 1.0), ("-12", "-12", 1.0), ("12", "-12", 0.0),
    ("85 is wrong, 86", "85", 0.0), ("", "85", 0.0), ("eighty-five", "85", 0.0),
])
def test_arithmetic_reward(completion, answer, reward):
    assert arithmetic_reward([completion], answer=[answer]) == [reward]


@pytest.mark.parametrize("completion,answer,reward", [
    ("so the answer is \\boxed{18}.", "18", 1.0), ("\\boxed{1,000}", "1000", 1.0), ("It is 18.00", "18", 1.0),
    ("\\boxed{18} but maybe 20", "18", 1.0), ("I think 17", "18", 0.0), ("no number", "18", 0.0),
    ("\\boxed{}", "18", 0.0), ("-3 degrees", "-3", 1.0),
])
def test_gsm8k_reward(completion, answer, reward):
    assert gsm8k_reward([completion], answer=[answer]) == [reward]


def test_gsm8k_gold_requires_marker():
    assert gold_answer("a\n#### 2,500") == "2500"
    with pytest.raises(ValueError, match="####"):
        gold_answer("no marker")


def test_gsm8k_local_jsonl(tmp_path):
    rows = [{"question": f"q{i}", "answer": f"work\n#### {i}"} for i in range(40)]
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    task = build_task(TaskConfig(name="gsm8k", dataset=str(path), val_size=8, batch_size=4), seed=0)
    assert len(task.train) == 32 and task.val[0] == {"prompt": "q32", "answer": "32"}
    assert "boxed" in task.system_prompt


def test_gsm8k_missing_columns_is_an_error(tmp_path):
    path = tmp_path / "g.jsonl"
    path.write_text("\n".join(json.dumps({"text": "x"}) for _ in range(20)))
    with pytest.raises(ValueError, match="need columns question and answer"):
        build_task(TaskConfig(name="gsm8k", dataset=str(path), val_size=4, batch_size=2), seed=0)


def test_batch_too_large_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than task.batch_size"):
        build_task(TaskConfig(name="toy", batch_size=10_000, val_size=2), seed=0)


def test_batches_cover_an_epoch_then_reshuffle():
    first_epoch = np.concatenate([batch_indices(12, 4, seed=1, generation=g) for g in range(3)])
    assert sorted(first_epoch.tolist()) == list(range(12))
    assert not np.array_equal(batch_indices(12, 4, 1, 3), batch_indices(12, 4, 1, 0))
    assert np.array_equal(batch_indices(12, 4, 1, 2), batch_indices(12, 4, 1, 2))


def test_toy_reward():
    assert alnum_fraction_reward(["ab", "--", ""]) == [1.0, 0.0, 0.0]
