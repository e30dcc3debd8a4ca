"""Benchmark evaluation: avg@k / pass@k bookkeeping, the table, and a real 2-rank run."""

import json
import os

import pytest
from test_cli_mpi import mpirun

from essa_mpi import evaluate
from essa_mpi.comm import Comm
from essa_mpi.config import load_config
from essa_mpi.tasks.benchmarks import load_benchmark, pass_at_k


@pytest.fixture()
def bench(tmp_path):
    rows = [{"problem": "1+1?", "answer": "2"}, {"question": "half?", "answer": "0.5"},
            {"problem": "x?", "solution": "so \\boxed{3}"}, {"problem": "no gold"}]
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_gold_answers_and_rows_without_gold_dropped(bench):
    label, rows = load_benchmark(f"toy={bench}")
    assert label == "toy" and [r["answer"] for r in rows] == ["2", "0.5", "3"]
    assert len(load_benchmark(bench, limit=2)[1]) == 2


def test_unbiased_pass_at_k_matches_brute_force():
    from itertools import combinations

    n, c, k = 6, 2, 3
    draws = list(combinations([1] * c + [0] * (n - c), k))
    assert pass_at_k(n, c, k) == pytest.approx(sum(any(d) for d in draws) / len(draws))


def test_avg_and_pass_from_samples(monkeypatch, tiny_dir, bench, tmp_path):
    answers = {"1+1?": ["\\boxed{2}", "3", "2", "x"], "half?": ["$\\frac12$", "1/2", "\\boxed{0.5}", "0.50"],
               "x?": ["no", "no", "no", "no"]}
    monkeypatch.setattr(evaluate, "sample", lambda model, tok, prompts, cfg, rows=256: [answers[p] for p in prompts])
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.device=cpu", f"eval.benchmarks=toy={bench}",
                             "eval.k=4", "eval.pass_k=2", f"eval.output_dir={tmp_path}"])
    report = evaluate.evaluate(cfg, Comm())
    res = report["results"]["base"]["toy"]
    assert res["n"] == 3
    assert res["avg@4"] == pytest.approx(100 * (2 / 4 + 4 / 4 + 0) / 3)
    assert res["pass@2"] == pytest.approx(100 * (pass_at_k(4, 2, 2) + 1 + 0) / 3)
    table = open(tmp_path / "eval.md").read()
    assert "| **avg@4** |" in table and "| **pass@2** |" in table and "| base | 50.0 |" in table


def test_two_ranks_base_and_adapter(tiny_dir, bench, tmp_path):
    from peft import LoraConfig, get_peft_model

    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model

    model, _ = load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))
    adapter = str(tmp_path / "adapter")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    res = mpirun(2, ["eval", f"model.name_or_path={tiny_dir}", "model.device=cpu", "model.threads=1",
                     f"eval.benchmarks=toy={bench}", "eval.k=2", "eval.pass_k=1", "eval.max_new_tokens=4",
                     f"eval.adapters=base,SFT={adapter}", f"eval.output_dir={tmp_path}/out"])
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.load(open(tmp_path / "out" / "eval.json"))
    assert report["ranks"] == 2 and set(report["results"]) == {"base", "SFT"}
    assert all(r["toy"]["n"] == 3 for r in report["results"].values())  # 2 + 1 problems on the two ranks
    assert os.path.isfile(tmp_path / "out" / "eval.md")


def test_bad_eval_input_is_an_error(tiny_dir, tmp_path):
    res = mpirun(2, ["eval", f"model.name_or_path={tiny_dir}", "eval.benchmarks=nosuchbench", "eval.k=2",
                     "eval.pass_k=1", "eval.max_new_tokens=8"])
    assert res.returncode == 2 and "neither a known benchmark" in res.stderr
    res = mpirun(1, ["eval", f"model.name_or_path={tiny_dir}", "eval.adapters=/nonexistent", "eval.max_new_tokens=8"])
    assert res.returncode == 2 and "not a PEFT adapter directory" in res.stderr
    res = mpirun(1, ["eval", f"model.name_or_path={tiny_dir}"])
    assert res.returncode == 2 and "eval.max_new_tokens=1024 does not fit the model's context of 256" in res.stderr
