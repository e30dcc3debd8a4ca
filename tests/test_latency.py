"""Appendix B's model (doctests in essa_mpi/latency.py hold the hand-computed examples) and its command."""

import json
import math
import os
import subprocess
import sys

import pytest
from fault_rows import tool

from essa_mpi import latency as L


def test_lemma_b1_split_is_the_minimum():
    args = dict(b_grad=512, gpus=16, m_fb=2, eta_fb=0.05, m_gen=1, eta_gen=0.02)
    best = L.theta_star(args["m_fb"], args["eta_fb"], args["m_gen"], args["eta_gen"])
    t = lambda th: L.t_fb_gen_grad(th, **args)  # noqa: E731
    assert all(t(best) <= t(th) + 1e-12 for th in [i / 100 for i in range(1, 100)])
    assert t(best) == pytest.approx(512 / 16 * (2 * 0.05 + 0.02))


@pytest.mark.parametrize("gpus", [1, 8, 128])
def test_theorem_b2_bound_is_sufficient(gpus):
    """Under the theorem's worst case (m_fb = 1, one generation instance over all G GPUs: m_gen = G), any
    population below the bound has a faster iteration than the ideal gradient pipeline; far above it, slower."""
    kw = dict(b_grad=512, b_essa=64, gpus=gpus, eta_fb=0.05, eta_gen=0.02, m_params=15.2e9, peak_bw=25e9)
    n = L.population_bound(**kw)
    grad = L.t_grad_ideal(512, gpus, 1, 0.05, gpus, 0.02, 15.2e9, 25e9)
    assert L.t_essa(max(1, math.ceil(n) - 1), 64, gpus, gpus, 0.02, 25e9) < grad  # strictly below
    assert L.t_essa(int(3 * n) + 1, 64, gpus, gpus, 0.02, 25e9) > grad


def test_latency_command_prints_a_table_and_a_png(tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"end_to_end": {"eta_gen_s": 0.5, "eta_fb_s": 0.25},
                                 "exchange": [{"fit": {"latency_s": 1e-4, "bandwidth_Bps": 1e9}}]}))
    png = tmp_path / "lat.png"
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "latency", "--from-bench", str(bench), "--gpus", "1,8",
                          "--eta-fb", "0.1", "-o", str(png)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "eta_gen 0.5 s, eta_fb 0.1 s" in res.stdout  # from the bench, but the command line wins
    rows = [line.split() for line in res.stdout.splitlines() if line.strip().split()[:1] in (["1"], ["8"])]
    assert [r[0] for r in rows] == ["1", "8"]
    assert float(rows[0][1]) == pytest.approx(L.t_essa(128, 256, 1, 1, 0.5, 1e9, 1e-4), rel=1e-3)
    assert os.path.getsize(png) > 1000


@pytest.mark.parametrize("args, message", [
    (["--gpus", "0,8"], "--gpus '0,8': give GPU counts of at least 1"),
    (["--latency=-1"], "--latency=-1 means nothing here; give a finite number >= 0"),
    (["--model-bytes=-5"], "--model-bytes=-5 means nothing here"),
    (["--m-gen=0"], "--m-gen=0 means nothing here; give a finite number > 0"),
    (["--m-fb=-1"], "--m-fb=-1 means nothing here"),
    (["--eta-gen=nan"], "--eta-gen=nan means nothing here"),
    (["-o", "/no/such/dir/lat.png"], "-o /no/such/dir/lat.png: its directory does not exist"),
    (["--from-bench", "/no/such/bench.json"], "--from-bench /no/such/bench.json: not a readable"),
])
def test_latency_command_rejects_arguments_that_mean_nothing(args, message):
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "latency", *args] + ([] if "-o" in args else ["-o", ""]),
                         capture_output=True, text=True, timeout=60)
    lines = res.stderr.splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("essa_mpi: error: "), res.stderr
    assert message in lines[0] and not res.stdout, res.stderr


@pytest.mark.parametrize("content, field", [({"end_to_end": [1, 2]}, "end_to_end"),
                                            ({"exchange": [{"fit": {}}]}, "exchange[-1].fit"),
                                            ({"end_to_end": {"eta_gen_s": "fast"}}, "end_to_end.eta_gen_s"),
                                            ({"exchange": [1]}, "exchange[-1].fit")])
def test_a_malformed_bench_file_is_one_line_naming_the_field(tmp_path, content, field, capsys):
    from essa_mpi.latency_report import main

    path = tmp_path / "bench.json"
    path.write_text(json.dumps(content))
    code = main(["--from-bench", str(path), "-o", ""])
    err = capsys.readouterr().err
    tool(f"latency --from-bench holding {json.dumps(content)}", code, err)
    assert code == 2 and len(err.splitlines()) == 1 and f"--from-bench {path}: {field}" in err, err
