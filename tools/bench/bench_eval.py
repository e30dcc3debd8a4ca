"""Throughput of one rank's share of a generation, per engine: tokens/s for the same rows and token counts.

    python tools/bench/bench_eval.py     # embedded SmolLM2-135M: both engines, fp32 + bf16 → bench_eval.json
    python tools/bench/bench_eval.py --engines hf --precisions fp32 --candidates 8 --new-tokens 24 12 --repeats 3

Ways (greedy, every row generates exactly N new tokens; timed end to end from token ids to token ids):
  hf_batched    all C candidates x P prompts in one HF generate call, per-row singular values (model.engine=hf)
  hf_base       the plain HF base model on the same C x P rows (no adapter branch): HF's ceiling
  vllm_base     vLLM on the same C x P rows without LoRA: vLLM's ceiling
  vllm_lora     vLLM with each candidate a LoRA adapter, rebuilt and written each call (model.engine=vllm)
  hf_sequential one candidate at a time (--sequential; issue 2's baseline)
--decoding (issue 35): the greedy paths of model.engine=hf on answers that end at EOS, not forced lengths —
  generate (transformers, today's path), loop (decode.greedy with neither saving: its loop alone), prefix
  (model.share_prefix only), drop (model.drop_finished only), both (the default) — at the default's shape
  (16 candidates x 48 arithmetic prompts x 12 tokens) and a long one (4 x 16 GSM8K questions x 256 tokens
  under a ~150-token system prompt): seconds per call, tokens/s of the answers, and the share of
  completions equal to generate's → bench_decode.json.
    python tools/bench/bench_eval.py --decoding --precisions bf16 fp32 --repeats 3
The process re-executes itself with tcmalloc and Intel OpenMP preloaded when vLLM is installed (as a
model.engine=vllm run does), so both engines are measured with the same allocator and OpenMP.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np
import torch

from essa_mpi.config import ModelConfig, TaskConfig
from essa_mpi.model import load_model
from essa_mpi.population import PopulationEvaluator
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
from essa_mpi.tasks import build_task

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "results")  # tools/results
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def timed(fn, repeats: int) -> float:
    """Best of repeats wall seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def offsets(adapter: SVDLoRA, C: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((C, adapter.solution_length)) * 0.3  # [C, n]


def factors(model, rank: int) -> list:
    fs = fresh_lora_factors(model, TARGETS, rank, 2.0 * rank, 0)
    g = torch.Generator().manual_seed(0)
    for f in fs:  # a fresh B is 0: give it values so the LoRA path is not a no-op
        f.B = torch.randn(f.B.shape, generator=g, dtype=torch.float64) * 0.05
    return fs


def hf_ways(args, precision: str, task) -> dict:
    """{(C, N): {way: seconds}} for the HF engine at one precision."""
    model, tok = load_model(ModelConfig(name_or_path=args.model, device=args.device, precision=precision))
    adapter = SVDLoRA.attach(model, factors(model, args.rank), fraction=1.0)
    ev = PopulationEvaluator(model, tok, adapter, task, max_new_tokens=1, max_rows=10**9)
    examples = task.train[: args.prompts]
    enc = ev.encode(examples)  # [P, T]
    out = {}
    for C in args.candidates:
        X, rows = offsets(adapter, C), ev.encode(examples * C)  # [C, n], [C*P, T] padded as the repeated batch
        for N in args.new_tokens:
            ev.gen_cfg.max_new_tokens = ev.gen_cfg.min_new_tokens = N
            ev.generate(X, enc)  # warm-up
            ways = {"hf_batched": lambda X=X: ev.generate(X, enc), "hf_base": lambda rows=rows: ev.generate(None, rows)}
            if args.sequential:
                ways["hf_sequential"] = lambda X=X, C=C: [ev.generate(X[c:c + 1], enc) for c in range(C)]
            out[(C, N)] = {k: timed(fn, args.repeats) for k, fn in ways.items()}
            print(precision, C, N, out[(C, N)], flush=True)
    return out


def vllm_ways(args, precision: str, task) -> dict:
    """{(C, N): {way: seconds}} for the vLLM engine at one precision (a fresh engine per precision)."""
    from vllm import SamplingParams

    from essa_mpi.model import load_tokenizer
    from essa_mpi.vllm_engine import VLLMEngine, VLLMEvaluator, model_dir, skeleton

    cfg = ModelConfig(name_or_path=args.model, device=args.device, precision=precision)
    path = model_dir(cfg)
    sk, tok = skeleton(path, precision), load_tokenizer(cfg)
    adapter = SVDLoRA.attach(sk, factors(sk, args.rank), fraction=1.0)
    engine = VLLMEngine(cfg, path, max(args.candidates), args.rank, max(args.candidates) * args.prompts,
                        threads=args.threads, prefix_caching=args.vllm_prefix_caching)
    ev = VLLMEvaluator(engine, tok, adapter, task, 1, 10**9, lora_alpha=2.0 * args.rank)
    examples = task.train[: args.prompts]
    enc = ev.encode(examples)
    out = {}
    for C in args.candidates:
        X = offsets(adapter, C)
        for N in args.new_tokens:
            ev.params = SamplingParams(temperature=0.0, max_tokens=N, min_tokens=N, ignore_eos=True, detokenize=False)
            ev.generate(X, enc)  # warm-up
            ways = {"vllm_base": lambda C=C: ev.generate(None, enc * C), "vllm_lora": lambda X=X: ev.generate(X, enc)}
            out[(C, N)] = {k: timed(fn, args.repeats) for k, fn in ways.items()}
            print(precision, C, N, out[(C, N)], flush=True)
    engine.close()
    return out


DECODING = {"generate": (False, False), "prefix": (True, False), "drop": (False, True), "both": (True, True)}
LONG_SYSTEM = ("You are a patient math tutor. Read the problem carefully and work through it one step at a time. "
               "For every step, say which quantities you combine and why, write the arithmetic out in full, and "
               "check that the units match. Keep whole numbers as whole numbers and round money to cents only at "
               "the end. When the problem gives a rate, turn it into a per-unit amount first. When it mentions a "
               "percentage, convert it to a fraction of the right base. After the last step, restate the question "
               "in one sentence and confirm that your number answers it. Then place your final answer, a number "
               "alone with no units, in \\boxed{}.")  # ~150 tokens in SmolLM2's tokenizer


def decoding_shapes(data: str) -> dict:
    """name → (candidates, task config, prompts, new tokens): the default's shape and a long-generation one."""
    return {"default": (16, TaskConfig(name="arithmetic", val_size=0), 48, 12),
            "long": (4, TaskConfig(name="gsm8k", dataset=os.path.join(data, "gsm8k", "train.jsonl"), val_size=0,
                                   sft_size=0, system_prompt=LONG_SYSTEM), 16, 256)}


def loop_only(ev: PopulationEvaluator, X: np.ndarray, enc: dict) -> list:
    """decode.greedy with neither saving: how its own loop compares with generate's (bench row "loop")."""
    from essa_mpi.decode import greedy, unpadded

    prompts = unpadded(enc)
    ev.adapter.set_candidates(X)
    new = greedy(ev.model, ev.adapter, prompts, len(X), ev.gen_cfg.max_new_tokens, ev.gen_cfg.eos_token_id,
                 ev.gen_cfg.pad_token_id, share_prefix=False, drop_finished=False)
    ev.adapter.clear()
    return ev.tok.batch_decode(new, skip_special_tokens=True)


def decoding_ways(args, precision: str) -> list:
    """Issue 35's rows at one precision: seconds per generate call of each greedy path (best of repeats), the
    answers' tokens/s, and the share of completions equal to transformers' generate."""
    model, tok = load_model(ModelConfig(name_or_path=args.model, device=args.device, precision=precision))
    adapter = SVDLoRA.attach(model, factors(model, args.rank), fraction=1.0)
    rows = []
    for shape, (C, tcfg, P, N) in decoding_shapes(args.data).items():
        if shape not in args.shapes:
            continue
        task = build_task(tcfg, seed=0)
        examples, X = task.train[:P], offsets(adapter, C)
        evs = {way: PopulationEvaluator(model, tok, adapter, task, N, 10**9, *flags) for way, flags in DECODING.items()}
        enc = evs["generate"].encode(examples)  # [P, T]
        texts, seconds = {}, {}
        for way, ev in [("generate", evs["generate"]), ("loop", None), *list(evs.items())[1:]]:
            gen = ev.generate if ev else functools.partial(loop_only, evs["generate"])
            gen(X[:1], enc)  # warm-up

            def call(gen=gen, way=way, X=X, enc=enc, texts=texts):
                texts[way] = gen(X, enc)  # [C*P] completions
            seconds[way] = timed(call, args.repeats)
            print(precision, shape, way, round(seconds[way], 2), flush=True)
        ref = texts["generate"]
        tokens = sum(len(t) for t in tok(ref, add_special_tokens=False)["input_ids"])  # the answers' tokens
        rows.append({"precision": precision, "shape": shape, "candidates": C, "prompts": P, "new_tokens": N,
                     "prompt_tokens": [int(n) for n in enc["attention_mask"].sum(1).aminmax()],
                     "answer_tokens": tokens, "seconds": {k: round(v, 3) for k, v in seconds.items()},
                     "tokens_per_s": {k: round(tokens / v, 1) for k, v in seconds.items()},
                     "vs_generate": {k: round(v / seconds["generate"], 3) for k, v in seconds.items()},
                     "equal_to_generate": {k: round(sum(a == b for a, b in zip(t, ref)) / len(ref), 4)
                                           for k, t in texts.items()}})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=["hf", "vllm"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--candidates", type=int, nargs="+", default=[1, 8], help="candidates per rank (λ/rank)")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[12, 128])
    ap.add_argument("--repeats", type=int, default=1, help="timed repeats per way after one warm-up (best kept)")
    ap.add_argument("--sequential", action="store_true", help="also time one candidate at a time (HF)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--vllm-prefix-caching", type=int, choices=[0, 1], default=None,
                    help="vLLM's enable_prefix_caching (default: essa_mpi.vllm_engine.PREFIX_CACHING)")
    ap.add_argument("--long-system", action="store_true", help="the ~150-token system prompt of --decoding's long "
                    "shape before every arithmetic prompt (a shared head for prefix caching)")
    ap.add_argument("--decoding", action="store_true", help="time the greedy paths of issue 35 instead")
    ap.add_argument("--shapes", nargs="+", default=["default", "long"], choices=["default", "long"])
    ap.add_argument("--data", default=os.path.join(os.path.dirname(RESULTS), "..", "..", "shared", "data"))
    ap.add_argument("--out", default=None, help="default: tools/results/bench_eval.json (bench_decode.json)")
    args = ap.parse_args()
    args.out = args.out or os.path.join(RESULTS, "bench_decode.json" if args.decoding else "bench_eval.json")
    if args.decoding:
        torch.set_num_threads(args.threads)
        rows = [r for precision in args.precisions for r in decoding_ways(args, precision)]
        report = {"model": args.model, "device": args.device, "threads": args.threads, "lora_rank": args.rank,
                  "repeats": args.repeats, "torch": torch.__version__, "results": rows}
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
        print(json.dumps(rows, indent=1))
        print(f"wrote {args.out}")
        return
    if "vllm" in args.engines and args.device == "cpu":
        from essa_mpi.vllm_engine import preload_env

        env = preload_env(dict(os.environ))
        if env:
            os.execve(sys.executable, [sys.executable, *sys.argv], env)

    torch.set_num_threads(args.threads)
    system = LONG_SYSTEM if args.long_system else None
    task = build_task(TaskConfig(name="arithmetic", val_size=0, system_prompt=system), seed=0)
    rows = []
    for precision in args.precisions:  # HF first: vLLM's in-process engine pins the process's OpenMP threads
        seconds = {key: dict(w) for key, w in hf_ways(args, precision, task).items()} if "hf" in args.engines else {}
        if "vllm" in args.engines:
            for key, w in vllm_ways(args, precision, task).items():
                seconds.setdefault(key, {}).update(w)
        for (C, N), ways in seconds.items():
            tokens = C * args.prompts * N
            rows.append({"precision": precision, "candidates": C, "prompts": args.prompts, "new_tokens": N,
                         "seconds": {k: round(v, 3) for k, v in ways.items()},
                         "tokens_per_s": {k: round(tokens / v, 1) for k, v in ways.items()}})
    report = {"model": args.model, "device": args.device, "threads": args.threads, "lora_rank": args.rank,
              "repeats": args.repeats, "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "ld_preload": os.environ.get("LD_PRELOAD", ""), "results": rows}
    try:
        import vllm

        report["vllm"] = vllm.__version__
    except ImportError:
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(markdown(rows))
    print(f"wrote {args.out}")


def markdown(rows: list) -> str:
    """One table: tokens/s per way, a row per (precision, candidates, new tokens)."""
    ways = [w for w in ("hf_batched", "hf_base", "vllm_lora", "vllm_base", "hf_sequential")
            if any(w in r["tokens_per_s"] for r in rows)]
    lines = ["| precision | candidates × prompts | new tokens | " + " | ".join(ways) + " |",
             "|---|---|---|" + "---|" * len(ways)]
    for r in rows:
        vals = [str(r["tokens_per_s"].get(w, "–")) for w in ways]
        lines.append(f"| {r['precision']} | {r['candidates']} × {r['prompts']} | {r['new_tokens']} | "
                     + " | ".join(vals) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
