"""The bad-input corpus: each case is command-line arguments (over the tiny-model run) that must end every
rank with exit code 2 and one line naming the problem, before any model loads.

    python tools/checks/fault_table.py          # runs the corpus and the faults, writes tools/results/faults.{json,md}

``make_files(root, tiny_dir)`` writes the broken files the cases point at; ``CASES`` maps a case id to
(function of the files → extra arguments, a fragment the one error line must contain).
"""

from __future__ import annotations

import json
import os


def case_args(extra: list, tiny_dir: str, out: str) -> list:
    """A case's full command line: its extra arguments over the tiny-model run writing to out (a resume or an
    eval keeps its own form)."""
    from test_cli_mpi import tiny_args

    if extra[0] == "--resume":
        return extra
    if extra[0] == "eval":
        return ["eval", *tiny_args(tiny_dir, out), *extra[1:]]
    return tiny_args(tiny_dir, out) + extra


def make_files(root: str, tiny_dir: str) -> dict:
    """Broken configs, datasets, reward modules, models and adapters under root → {name: path}."""
    f = {"root": root, "tiny": tiny_dir}

    def write(name: str, content) -> str:
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(content if isinstance(content, bytes) else content.encode())
        f[name] = path
        return path

    write("list.yaml", "- search\n- task\n")
    write("scalar.yaml", "42\n")
    write("malformed.yaml", "search:\n  popsize: [16\n")
    write("duplicate.yaml", "search:\n  popsize: 8\n  popsize: 16\n")
    write("section.yaml", "search: 5\n")
    write("latin1.yaml", "search:\n  popsize: 8 # caf\xe9\n".encode("latin-1"))
    rows = [{"prompt": f"p{i}"} for i in range(40)]
    write("ok.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write("latin1.jsonl", ('{"prompt": "caf\xe9"}\n' * 40).encode("latin-1"))
    write("badline.jsonl", '{"prompt": "a"}\n{"prompt": \n')
    write("norow.jsonl", "".join(json.dumps(r) + "\n" for r in rows[:30]) + '{"text": "x"}\n')
    write("listrow.jsonl", '{"prompt": "a"}\n[1, 2]\n')
    write("rewards_syntax.py", "def f(completions, **_):\n    return [0.0] * len(completions\n")
    write("rewards_raise.py", "raise RuntimeError('no reward server configured')\n")
    os.makedirs(os.path.join(root, "empty_model"), exist_ok=True)
    f["empty_model"] = os.path.join(root, "empty_model")
    write("garbage_model/config.json", "{not json")
    adapter = {"r": 2, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "peft_type": "LORA"}
    write("garbage_adapter/adapter_config.json", json.dumps(adapter))
    write("garbage_adapter/adapter_model.safetensors", os.urandom(512))
    f["foreign_adapter"] = foreign_adapter(os.path.join(root, "foreign_adapter"))
    write("not_a_checkpoint/checkpoint.h5", b"\x89HDF\r\n\x1a\n" + os.urandom(200))
    write("has_files/notes.txt", "my notes\n")
    write("a_file", "not a directory\n")
    write("nogold.jsonl", "".join(json.dumps({"problem": f"{i}+1"}) + "\n" for i in range(5)))
    f["no_eos_model"] = without_eos(tiny_dir, os.path.join(root, "no_eos_model"))
    write("long_prompt.jsonl", "".join(json.dumps({"prompt": ("word " * 400) if i == 17 else f"p{i}"}) + "\n"
                                       for i in range(40)))
    return f


def without_eos(tiny_dir: str, out: str) -> str:
    """The tiny model whose tokenizer has neither eos_token nor pad_token."""
    import shutil

    shutil.copytree(tiny_dir, out)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as fh:
        conf = json.load(fh)
    with open(path, "w") as fh:
        json.dump({**conf, "eos_token": None, "pad_token": None}, fh)
    return out


def foreign_adapter(out: str) -> str:
    """A PEFT LoRA (r=2, q/k/v/o) of a tiny model 64 wide: the tiny test model is 32 wide."""
    from peft import LoraConfig, get_peft_model
    from tiny import make_model

    model = get_peft_model(make_model(300, hidden=64), LoraConfig(r=2, lora_alpha=4, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj"]))
    model.save_pretrained(out)
    return out


CASES = {
    "unknown key": (lambda f: ["search.popsze=8"], "did you mean 'search.popsize'"),
    "wrong type": (lambda f: ["search.popsize=one"], "expected int"),
    "popsize below pycma's minimum": (lambda f: ["search.popsize=2"], "must be in [3, 65536]"),
    "popsize 2**40": (lambda f: ["search.popsize=1099511627776"], "must be in [3, 65536]"),
    "sigma0 nan": (lambda f: ["search.sigma0=nan"], "search.sigma0=nan is not a finite number"),
    "sigma0 .inf": (lambda f: ["search.sigma0=.inf"], "search.sigma0=inf is not a finite number"),
    "sigma0 1e308": (lambda f: ["search.sigma0=1e308"], "must be in (0, 100]"),
    "sigma0 negative": (lambda f: ["search.sigma0=-1"], "must be in (0, 100]"),
    "singular steps from a fresh adapter": (lambda f: ["search.step_scale=singular", "adapter.warm_start=none"],
                                            "set search.step_scale=uniform or adapter.warm_start=sft"),
    "mean_lr 0": (lambda f: ["search.mean_lr=0"], "search.mean_lr=0.0 must be in (0, 1]"),
    "mean_lr above 1": (lambda f: ["search.mean_lr=1.5"], "search.mean_lr=1.5 must be in (0, 1]"),
    "diagonal decoding without full C": (lambda f: ["search.diagonal_decoding=true", "search.covariance=diagonal"],
                                         "search.diagonal_decoding=true needs a full covariance"),
    "fraction leaves nothing": (lambda f: ["adapter.fraction=0.2"], "0 singular values to search"),
    "fraction nan": (lambda f: ["adapter.fraction=nan"], "adapter.fraction=nan is not a finite number"),
    "max_new_tokens over context": (lambda f: ["task.max_new_tokens=100000"],
                                    "does not fit the model's context of 256"),
    "max_new_tokens 0": (lambda f: ["task.max_new_tokens=0"], "task.max_new_tokens=0 must be >= 1"),
    "threads -1": (lambda f: ["model.threads=-1"], "model.threads=-1 must be >= 0"),
    "batch_size 0": (lambda f: ["task.batch_size=0"], "task.batch_size=0 must be >= 1"),
    "max_rows 0": (lambda f: ["run.max_rows=0"], "run.max_rows=0 must be >= 1"),
    "vllm engine int8": (lambda f: ["model.engine=vllm", "model.precision=int8"],
                         "model.engine=vllm runs model.precision=fp32 or bf16, not int8"),
    "vllm memory fraction 0": (lambda f: ["model.engine=vllm", "model.vllm_memory_fraction=0"],
                               "model.vllm_memory_fraction=0.0 must be in (0, 1]"),
    "engine sglang": (lambda f: ["model.engine=sglang"], "model.engine"),
    "seed negative": (lambda f: ["search.seed=-1"], "must fit in uint32"),
    "seed 2**32": (lambda f: ["search.seed=4294967296"], "must fit in uint32"),
    "stall timeout negative": (lambda f: ["run.stall_timeout_s=-1"], "run.stall_timeout_s=-1.0 must be >= 0"),
    "reward timeout nan": (lambda f: ["task.reward_timeout_s=nan"], "is not a finite number"),
    "adapter rank beyond width": (lambda f: ["adapter.rank=100"], "exceeds the width of k_proj"),
    "int4 on a 32-wide model": (lambda f: ["model.precision=int4"], "divisible by 64"),
    "cuda without CUDA": (lambda f: ["model.device=cuda"], "CUDA is not available"),
    "model path missing": (lambda f: ["model.name_or_path=/missing/model"], "neither an existing path"),
    "empty model directory": (lambda f: [f"model.name_or_path={f['empty_model']}"], "directory without config.json"),
    "garbage config.json": (lambda f: [f"model.name_or_path={f['root']}/garbage_model"], "is not readable JSON"),
    "adapter path missing": (lambda f: ["adapter.path=/missing/adapter"], "has no adapter_config.json"),
    "adapter rank mismatch": (lambda f: [f"adapter.path={f['foreign_adapter']}", "adapter.rank=4"],
                              "has rank r=2 but adapter.rank=4"),
    "adapter from another model": (lambda f: [f"adapter.path={f['foreign_adapter']}"], "trained on another model"),
    "garbage safetensors": (lambda f: [f"adapter.path={f['root']}/garbage_adapter"],
                            "is not a readable safetensors file"),
    "unknown task": (lambda f: ["task.name=poetry"], "task.name='poetry' is not one of"),
    "custom task without reward": (lambda f: ["task.name=custom", f"task.dataset={f['ok.jsonl']}"],
                                   "needs task.dataset (JSONL or id with a 'prompt' column) and"),
    "dataset missing": (lambda f: ["task.name=custom", "task.dataset=/missing/d.jsonl", "task.reward_fn=json:dumps"],
                        "does not exist"),
    "dataset not UTF-8": (lambda f: ["task.name=custom", f"task.dataset={f['latin1.jsonl']}",
                                     "task.reward_fn=json:dumps"], "latin1.jsonl is not UTF-8 text"),
    "dataset bad JSON line": (lambda f: ["task.name=custom", f"task.dataset={f['badline.jsonl']}",
                                         "task.reward_fn=json:dumps"], "badline.jsonl, line 2: not valid JSON"),
    "later row without prompt": (lambda f: ["task.name=custom", f"task.dataset={f['norow.jsonl']}",
                                            "task.reward_fn=json:dumps"], "row 31 lacks the column(s) ['prompt']"),
    "row that is a list": (lambda f: ["task.name=custom", f"task.dataset={f['listrow.jsonl']}",
                                      "task.reward_fn=json:dumps"], "line 2: a JSON list, not an object"),
    "reward_fn not a path": (lambda f: ["task.reward_fn=not a path"], "is not a dotted path"),
    "reward_fn missing": (lambda f: ["task.reward_fn=mpi_rewards:no_such"], "cannot be imported"),
    "reward module SyntaxError": (lambda f: ["task.reward_fn=rewards_syntax:f"], "raised SyntaxError"),
    "reward module raises on import": (lambda f: ["task.reward_fn=rewards_raise:f"],
                                       "raised RuntimeError: no reward server configured"),
    "YAML list": (lambda f: ["--config", f["list.yaml"]], "is a YAML list, not a mapping of sections"),
    "YAML scalar": (lambda f: ["--config", f["scalar.yaml"]], "is a YAML int, not a mapping of sections"),
    "YAML malformed": (lambda f: ["--config", f["malformed.yaml"]], "malformed.yaml', line"),
    "YAML duplicate key": (lambda f: ["--config", f["duplicate.yaml"]], "duplicate key 'popsize'"),
    "YAML section not a mapping": (lambda f: ["--config", f["section.yaml"]],
                                   "config section 'search' must be a mapping"),
    "YAML not UTF-8": (lambda f: ["--config", f["latin1.yaml"]], "is not UTF-8 text"),
    "config file missing": (lambda f: ["--config", "/missing.yaml"], "does not exist"),
    "override without =": (lambda f: ["popsize"], "not of the form section.key=value"),
    "output_dir holds files": (lambda f: [f"run.output_dir={f['root']}/has_files"],
                               "holds notes.txt but no checkpoint"),
    "resume missing": (lambda f: ["--resume", "/missing/run"], "no checkpoint at /missing/run"),
    "resume not a checkpoint": (lambda f: ["--resume", f"{f['root']}/not_a_checkpoint"],
                                "is not a readable ESSA checkpoint"),
    "resume with --config": (lambda f: ["--resume", f"{f['root']}/not_a_checkpoint", "--config", f["list.yaml"]],
                             "drop --config"),
    "resume with a search override": (lambda f: ["--resume", f"{f['root']}/not_a_checkpoint", "search.popsize=8"],
                                      "accepts only run.* overrides"),
    "resume of an empty path": (lambda f: ["--resume", ""], "--resume needs the run's output_dir"),
    "resume with another output_dir": (lambda f: ["--resume", f"{f['root']}/not_a_checkpoint",
                                                  "run.output_dir=/elsewhere"], "drop run.output_dir=/elsewhere"),
    "output_dir is a file": (lambda f: [f"run.output_dir={f['a_file']}"], "is a file, not a directory"),
    "output_dir under a file": (lambda f: [f"run.output_dir={f['a_file']}/run"], "lies under the file"),
    "sft output under a file": (lambda f: ["adapter.warm_start=sft", f"sft.output_dir={f['a_file']}/sft"],
                                "sft.output_dir="),
    "eval benchmark without golds": (lambda f: ["eval", "eval.max_new_tokens=6", f"eval.benchmarks={f['nogold.jsonl']}",
                                                "eval.adapters=base"], "and a gold answer"),
    "vLLM on CPU below head_dim 32": (lambda f: ["model.engine=vllm", "model.precision=fp32"],
                                      "vLLM's CPU attention takes head_dim 32 or more"),
    "truncate that cannot fit": (lambda f: ["task.long_prompts=truncate", "task.max_new_tokens=250"],
                                 "task.long_prompts=truncate cannot fit training row 0"),
    "sft output_dir holding a user's files": (lambda f: ["adapter.warm_start=sft",
                                                         f"sft.output_dir={f['root']}/has_files"],
                                              "holds files that are not an SFT adapter"),
    "override with a comment sign": (lambda f: ["search.popsize=8 #3"], "search.popsize='8 #3' has type str"),
    "prompt longer than the context": (lambda f: ["task.name=custom", f"task.dataset={f['long_prompt.jsonl']}",
                                                  "task.reward_fn=json:dumps"],
                                       "training row 17 is "),
    "eval adapter from another model": (lambda f: ["eval", "eval.max_new_tokens=6",
                                                   f"eval.adapters={f['foreign_adapter']}"],
                                        "the adapter was trained on another model; give one of this model in "
                                        "eval.adapters"),
    "eval adapter with damaged safetensors": (lambda f: ["eval", "eval.max_new_tokens=6",
                                                              f"eval.adapters={f['root']}/garbage_adapter"],
                                              "is not a readable safetensors file"),
    "tokenizer without eos_token": (lambda f: [f"model.name_or_path={f['no_eos_model']}"],
                                    "has no eos_token, so greedy decoding cannot tell where an answer ends"),
    "memory_headroom 0.02": (lambda f: ["run.memory_headroom=0.02"], "use a run.memory_headroom above 0.02"),
}
