"""Do the vLLM and Hugging Face engines give the same completions and rewards for the same candidates?

    python tools/checks/check_vllm_parity.py                                   # embedded SmolLM2, fp32
    python tools/checks/check_vllm_parity.py --model DIR --adapter runs/sft/arithmetic-e1e63073270b --candidates 8

Builds the SVD-LoRA adapter as a run does (an SFT adapter, or a fresh one), draws candidates as generation 0
draws them (σ0 x N(0, I) offsets, seed 0), and generates the same (candidate, prompt) rows greedily with
``PopulationEvaluator`` (HF) and ``VLLMEvaluator`` (vLLM). Prints and writes (``--out``) the share of rows
whose completions are identical and whose rewards are equal; also the base model without adapter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def compare(hf: list, vl: list, rewards_hf: np.ndarray, rewards_vl: np.ndarray) -> dict:
    same = [a == b for a, b in zip(hf, vl)]
    return {"rows": len(hf), "same_completion": float(np.mean(same)), "same_reward": float(np.mean(rewards_hf ==
            rewards_vl)), "examples_differing": [[a, b] for a, b, s in zip(hf, vl, same) if not s][:5]}


def parity(model_cfg, adapter_path: str | None, candidates: int, prompts: int, sigma: float, task_name: str,
           max_new_tokens: int, seed: int = 0) -> dict:
    """Both engines on the same candidates → {"lora": compare(...), "base": compare(...), timings}."""
    import torch

    from essa_mpi.config import TaskConfig
    from essa_mpi.model import load_model
    from essa_mpi.population import PopulationEvaluator
    from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors, load_lora_factors
    from essa_mpi.tasks import build_task, score_rows
    from essa_mpi.vllm_engine import VLLMEngine, VLLMEvaluator, model_dir, skeleton

    torch.manual_seed(seed)
    task = build_task(TaskConfig(name=task_name, val_size=prompts, max_new_tokens=max_new_tokens), seed)
    examples = task.val[:prompts]
    model, tok = load_model(model_cfg)
    targets, rank, alpha = ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0

    def factors(m):
        if adapter_path:
            return load_lora_factors(m, adapter_path, targets, rank)
        fs = fresh_lora_factors(m, targets, rank, alpha, seed)
        g = torch.Generator().manual_seed(seed)
        for f in fs:  # a fresh B is 0; give it values so candidates differ in both factors
            f.B = torch.randn(f.B.shape, generator=g, dtype=torch.float64) * 0.05
        return fs

    hf_adapter = SVDLoRA.attach(model, factors(model), 1.0, seed=seed)
    rng = np.random.default_rng(seed)
    offsets = sigma * rng.standard_normal((candidates, hf_adapter.solution_length))  # [C, n]
    hf = PopulationEvaluator(model, tok, hf_adapter, task, max_new_tokens, max_rows=10**6)
    t = time.perf_counter()
    hf_lora, hf_base = hf.completions(offsets, examples), hf.generate(None, hf.encode(examples))
    t_hf = time.perf_counter() - t
    path = model_dir(model_cfg)
    sk = skeleton(path)
    vl_adapter = SVDLoRA.attach(sk, factors(sk), 1.0, seed=seed)
    assert vl_adapter.digest() == hf_adapter.digest()
    engine = VLLMEngine(model_cfg, path, max_loras=candidates, lora_rank=rank, max_rows=candidates * prompts,
                        threads=torch.get_num_threads(), seed=seed)
    try:
        vl = VLLMEvaluator(engine, tok, vl_adapter, task, max_new_tokens, max_rows=10**6, lora_alpha=alpha)
        t = time.perf_counter()
        vl_lora, vl_base = vl.completions(offsets, examples), vl.generate(None, vl.encode(examples))
        t_vl = time.perf_counter() - t
    finally:
        engine.close()

    def rewards(texts, n):
        return score_rows(task, texts, examples * n)

    return {"lora": compare(hf_lora, vl_lora, rewards(hf_lora, candidates), rewards(vl_lora, candidates)),
            "base": compare(hf_base, vl_base, rewards(hf_base, 1), rewards(vl_base, 1)),
            "hf_s": round(t_hf, 2), "vllm_s": round(t_vl, 2),
            "distinct_completions_hf": len(set(hf_lora)), "mean_reward_hf": float(rewards(hf_lora, candidates).mean())}


def main(argv: list | None = None) -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    from essa_mpi.config import EMBEDDED_MODEL, ModelConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--adapter", help="PEFT LoRA directory (rank 4, q/k/v/o); default: a fresh one with random B")
    ap.add_argument("--task", default="arithmetic")
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--out", help="write the result as JSON here")
    args = ap.parse_args(argv)
    cfg = ModelConfig(name_or_path=args.model, precision=args.precision, device="cpu")
    result = {"model": args.model, "precision": args.precision, "adapter": args.adapter, "task": args.task,
              "candidates": args.candidates, "prompts": args.prompts, "sigma": args.sigma,
              **parity(cfg, args.adapter, args.candidates, args.prompts, args.sigma, args.task, args.max_new_tokens)}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
