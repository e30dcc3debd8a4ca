"""python -m essa_mpi plot, and what a run logs for people to look at (curves.png, TensorBoard)."""

import json
import os
import subprocess
import sys

import pytest
from test_cli_mpi import ENV, metrics, mpirun, tiny_args

from essa_mpi.plot import series


def write_metrics(path, rows):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


RESUMED = [{"wall_s": 1.0, "generation": 0, "val_reward": 0.1}, {"wall_s": 5.0, "generation": 1, "reward_mean": 0.2,
           "reward_max": 0.5, "sigma": 0.4}, {"wall_s": 9.0, "generation": 2, "val_reward": 0.3},
           {"wall_s": 2.0, "generation": 3, "reward_mean": 0.3, "reward_max": 0.6, "sigma": 0.35},  # resumed
           {"wall_s": 4.0, "generation": 4, "val_reward": 0.4}]


def test_wall_clock_continues_across_resumes():
    s = series(RESUMED)
    assert [w for _, w, _ in s["val"]] == [1.0, 9.0, 13.0]
    assert [g for g, *_ in s["gen"]] == [1, 3] and s["gen"][1][3] == 0.35


def test_plot_command_writes_one_png_for_several_runs(tmp_path):
    write_metrics(tmp_path / "a", RESUMED)
    write_metrics(tmp_path / "b", RESUMED[:3])
    out = tmp_path / "c.png"
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "plot", str(tmp_path / "a"), str(tmp_path / "b"),
                          "--labels", "A,B", "-o", str(out)], capture_output=True, text=True, env=ENV)
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20000
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "plot", str(tmp_path / "missing")], capture_output=True,
                         text=True, env=ENV)
    assert res.returncode == 2 and "metrics.jsonl does not exist" in res.stderr


@pytest.mark.parametrize("tail, args, message", [
    ('{"generation": 4, "reward_me', [], "metrics.jsonl, line 5: not complete JSON (cut off mid-write?)"),
    ("[1, 2]\n", [], "metrics.jsonl, line 5: a JSON list, not an object"),
    ("", ["-o", "/no/such/dir/c.png"], "-o /no/such/dir/c.png: its directory does not exist"),
])
def test_plot_refuses_a_damaged_log_or_a_missing_directory_in_one_line(tmp_path, tail, args, message):
    write_metrics(tmp_path / "a", RESUMED[:4])
    with open(tmp_path / "a" / "metrics.jsonl", "a") as fh:
        fh.write(tail)
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "plot", str(tmp_path / "a"), *args], capture_output=True,
                         text=True, env=ENV, cwd=tmp_path)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("essa_mpi: error: "), res.stderr
    assert message in lines[0]


def test_tensorboard_logs_the_metrics_lines(tiny_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    res = mpirun(2, tiny_args(tiny_dir, out, 2) + ["run.report_to=tensorboard"])
    assert res.returncode == 0, res.stderr[-2000:]
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    val = [(e.step, round(e.value, 6)) for e in events.Scalars("val_reward")]
    assert val == [(m["generation"], round(m["val_reward"], 6)) for m in metrics(str(out)) if "val_reward" in m]
    assert len(events.Scalars("reward_mean")) == 2 and (out / "curves.png").exists()
