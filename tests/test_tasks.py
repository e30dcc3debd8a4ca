import json
import re

import mpi_rewards
import numpy as np
import pytest

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import batch_indices, build_task, score_rows
from essa_mpi.tasks.arithmetic import arithmetic_reward
from essa_mpi.tasks.gsm8k import gold_answer, gsm8k_reward
from essa_mpi.tasks.toy import alnum_fraction_reward


@pytest.mark.parametrize("name", ["arithmetic", "toy"])
def test_builtin_tasks_are_seeded_and_held_out(name):
    a = build_task(TaskConfig(name=name, val_size=32), seed=3)
    b = build_task(TaskConfig(name=name, val_size=32), seed=3)
    assert a.train[:5] == b.train[:5] and a.val == b.val and len(a.val) == 32
    assert a.sft == b.sft and len(a.sft) > 0
    if name == "arithmetic":
        val, train, sft = ({e["prompt"] for e in rows} for rows in (a.val, a.train, a.sft))
        assert not val & train and not val & sft and not train & sft


def test_task_seed_fixes_the_problems_whatever_the_search_seed():
    fixed = [build_task(TaskConfig(val_size=16, seed=0), seed=s) for s in (0, 1)]
    assert fixed[0].val == fixed[1].val and fixed[0].sft == fixed[1].sft
    assert build_task(TaskConfig(val_size=16), seed=1).val != fixed[0].val  # None: search.seed draws them


def test_arithmetic_answers_are_correct():
    for e in build_task(TaskConfig(val_size=50), seed=0).val:
        q = e["prompt"].removeprefix("What is ").split("?")[0]
        assert str(eval(q)) == e["answer"]  # noqa: S307 - our own generated "a op b"


def test_arithmetic_sft_gold_restates_the_problem_and_scores_full_reward():
    task = build_task(TaskConfig(val_size=8, sft_size=40), seed=0)
    answers = []
    for row in task.sft:
        lhs, rhs = row["completion"].split(" = ")
        assert row["prompt"] == f"What is {lhs}? Answer with just the number."
        answers.append(str(eval(lhs)))  # noqa: S307 - our own generated "a op b"
        assert rhs == answers[-1]
    assert arithmetic_reward([r["completion"] for r in task.sft], answer=answers) == [1.0] * 40


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


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_gsm8k_local_jsonl_splits_sft_search_and_validation(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"w <<1+1=2>>2\n#### {i}"}
                                              for i in range(40)])
    task = build_task(TaskConfig(name="gsm8k", dataset=path, val_size=8, batch_size=4, sft_size=10), seed=0)
    assert len(task.sft) == 10 and len(task.train) == 22 and task.val[0] == {"prompt": "q32", "answer": "32"}
    assert task.sft[3] == {"prompt": "q3", "completion": "w 2\nThe final answer is \\boxed{3}."}
    assert "boxed" in task.system_prompt


@pytest.mark.parametrize("name, columns", [("gsm8k", "['question', 'answer']"), ("math", "['problem', 'solution']"),
                                           ("custom", "['prompt']")])
def test_dataset_without_needed_columns_is_an_error(tmp_path, name, columns):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x"}] * 20)
    cfg = TaskConfig(name=name, dataset=path, val_dataset=path, val_size=4, batch_size=2, reward_fn="json:dumps")
    with pytest.raises(ValueError, match=re.escape(f"row 1 lacks the column(s) {columns}")):
        build_task(cfg, seed=0)


def test_bad_jsonl_line_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(ValueError, match="line 2: not valid JSON"):
        build_task(TaskConfig(name="custom", dataset=str(path), reward_fn="json:dumps", val_size=1), seed=0)


def test_math_task_from_local_files(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"problem": f"p{i}", "solution": f"so \\boxed{{{i}}}"}
                                               for i in range(20)] + [{"problem": "nogold", "solution": "none"}])
    val = write_jsonl(tmp_path / "v.jsonl", [{"problem": "v", "answer": "\\frac12"}])
    task = build_task(TaskConfig(name="math", dataset=train, val_dataset=val, sft_size=5, batch_size=2), seed=0)
    assert task.sft[0] == {"prompt": "p0", "completion": "so \\boxed{0}"}
    assert len(task.train) == 15 and task.train[0]["answer"] == "5"  # the row without a gold answer is skipped
    assert task.reward(["it is 0.5", "\\boxed{1/3}"], answer=["\\frac12"] * 2) == [1.0, 0.0]


def double_length(completions, **columns):
    """A custom reward for the tests: uses a dataset column besides the completion."""
    return [2.0 * len(c) + len(t) for c, t in zip(completions, columns["tag"])]


def test_custom_task_passes_every_column_to_the_reward(tmp_path):
    rows = [{"prompt": f"p{i}", "tag": "ab", "completion": "done"} for i in range(10)]
    cfg = TaskConfig(name="custom", dataset=write_jsonl(tmp_path / "c.jsonl", rows), val_size=2, sft_size=3,
                     batch_size=2, reward_fn="test_tasks:double_length")
    task = build_task(cfg, seed=0)
    assert len(task.sft) == 3 and len(task.train) == 5 and "completion" not in task.train[0]
    assert score_rows(task, ["xyz", ""], task.train[:2]).tolist() == [8.0, 2.0]


@pytest.mark.parametrize("path, match", [("no_such_module:f", "cannot be imported"),
                                         ("json:no_such_function", "cannot be imported"),
                                         ("json:__doc__", "not callable")])
def test_unusable_reward_fn_is_an_error(path, match):
    with pytest.raises(ValueError, match=match):
        build_task(TaskConfig(name="toy", reward_fn=path, val_size=2), seed=0)


@pytest.mark.parametrize("reward, match", [(lambda completions, **_: [1.0], "returned 1 values for 2"),
                                           (lambda completions, **_: {}["x"], "raised KeyError"),
                                           (lambda completions, **_: ["a", "b"], "returned str 'a' for completion 0"),
                                           (lambda completions, **_: None, "returned NoneType None"),
                                           (lambda completions, **_: __import__("sys").exit(0),
                                            r"called sys.exit\(0\)"),
                                           (mpi_rewards.os_exit_0, r"called os._exit\(0\)"),
                                           (mpi_rewards.keyboard_interrupt, "raised KeyboardInterrupt"),
                                           (mpi_rewards.zero_d_array, r"returned an array of shape \(\)"),
                                           (mpi_rewards.too_big, "returned 1e\\+39 for completion 0, beyond the "
                                                                 "float32 range")])
def test_broken_reward_output_is_an_error_naming_it(reward, match):
    task = build_task(TaskConfig(name="toy", val_size=2), seed=0)
    task.reward = reward
    with pytest.raises(RuntimeError, match=match):
        score_rows(task, ["a", "b"], task.train[:2])


def test_a_reward_that_changes_the_working_directory_or_sigterm_is_put_back():
    import os
    import signal

    task = build_task(TaskConfig(name="toy", val_size=2), seed=0)
    task.reward = mpi_rewards.changes_cwd_and_sigterm
    cwd, handler = os.getcwd(), signal.getsignal(signal.SIGTERM)
    with pytest.warns(UserWarning, match=r"changed SIGTERM, the working directory \(to /\); put back"):
        score_rows(task, ["a", "b"], task.train[:2])
    assert os.getcwd() == cwd and signal.getsignal(signal.SIGTERM) is handler


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


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "a"}\n{"text": "b"}\n' * 10, "row 2 lacks the column(s) ['prompt']"),
    ('{"prompt": "a"}\n[1, 2]\n', "line 2: a JSON list, not an object"),
    (b'{"prompt": "a"}\n{"prompt": "\xff\xfe"}\n', "is not UTF-8 text"),
])
def test_every_jsonl_row_is_checked_and_the_file_named(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    cfg = TaskConfig(name="custom", dataset=str(path), val_size=1, batch_size=1, reward_fn="json:dumps")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        build_task(cfg, seed=0)
    assert "d.jsonl" in str(err.value)
