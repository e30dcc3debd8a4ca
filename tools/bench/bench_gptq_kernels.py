"""GPTQ on this machine: PyTorch's fused int4 matmul against dequantize-per-call, per layer and per generation.

    python -m essa_mpi quantize --out runs/smollm2-gptq-g64 --group-size 64  # once (4 min on 2 cores)
    python tools/bench/bench_gptq_kernels.py --model runs/smollm2-gptq-g64   # -> tools/results/bench_gptq_kernels.json

Layers: SmolLM2-135M's shapes (576 -> 576, 576 -> 1536, 1536 -> 576; group 64) at 1 .. 30,720 rows, bf16.
Generation: ``PopulationEvaluator.completions`` on the checkpoint, one rank's share of the default's population
(8 candidates x 48 arithmetic prompts, 12 new tokens, greedy), with ``GPTQLinear`` as shipped (fused kernel for
decoding steps, dequantize for prefill) and with the fused kernel switched off (dequantize everywhere, the code
before); completions compared row by row. ``--threads`` as a rank would use them.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def random_layer(n_out: int, n_in: int, group: int):
    from essa_mpi.gptq import GPTQLinear, pack

    gen = torch.Generator().manual_seed(0)
    layer = GPTQLinear(n_in, n_out, n_in // group, bias=False, dtype=torch.bfloat16)
    layer.qweight.copy_(pack(torch.randint(0, 16, (n_in, n_out), generator=gen), 0))  # [in/8, out]
    layer.qzeros.copy_(pack(torch.randint(0, 15, (n_in // group, n_out), generator=gen), 1))  # [groups, out/8]
    layer.scales.copy_((torch.rand(n_in // group, n_out, generator=gen) * 0.01).half())  # [groups, out]
    layer.g_idx.copy_(torch.arange(n_in) // group)
    return layer


def best_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def layers(group: int) -> list:
    from essa_mpi.gptq import int4_matmul

    out = []
    for n_out, n_in in ((576, 576), (1536, 576), (576, 1536)):
        layer = random_layer(n_out, n_in, group)
        packed = layer.fused(torch.device("cpu"))
        for rows in (1, 48, 384, 768, 8192, 30720):
            x = torch.randn(rows, n_in, dtype=torch.bfloat16)
            reps = 20 if rows <= 768 else 3
            deq = best_ms(lambda x=x, lay=layer: torch.nn.functional.linear(x, lay.dequantize()), reps)
            fused = best_ms(lambda x=x, w=packed: int4_matmul(x, *w), reps)
            out.append({"out": n_out, "in": n_in, "rows": rows, "dequantize_ms": round(deq, 3),
                        "fused_ms": round(fused, 3), "fused_over_dequantize": round(fused / deq, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def generation(model_path: str, candidates: int, prompts: int, new_tokens: int, reps: int) -> dict:
    from essa_mpi.config import ModelConfig, TaskConfig
    from essa_mpi.gptq import GPTQLinear
    from essa_mpi.model import load_model
    from essa_mpi.population import PopulationEvaluator
    from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
    from essa_mpi.tasks import build_task

    model, tok = load_model(ModelConfig(name_or_path=model_path, precision="gptq", device="cpu"))
    task = build_task(TaskConfig(name="arithmetic", val_size=8), seed=0)
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, 0), 1.0)
    ev = PopulationEvaluator(model, tok, adapter, task, new_tokens, max_rows=4096)
    X = np.random.default_rng(0).standard_normal((candidates, adapter.solution_length)) * 0.1  # [C, n]
    rows = task.train[:prompts]
    layers_ = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    result, texts = {}, {}
    for mode in ("dequantize_everywhere", "fused_decoding") * reps:
        for m in layers_:
            m.kernel = {torch.device("cpu"): None} if mode == "dequantize_everywhere" else {}
        t = time.perf_counter()
        texts[mode] = ev.completions(X, rows)
        result.setdefault(mode + "_s", []).append(round(time.perf_counter() - t, 2))
    result["fused_layers"] = sum(m.kernel.get(torch.device("cpu")) is not None for m in layers_)
    result["gptq_layers"] = len(layers_)
    result["same_completions"] = float(np.mean([a == b for a, b in zip(*texts.values())]))
    result["rows"], result["new_tokens"] = len(texts["fused_decoding"]), new_tokens
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a GPTQ checkpoint of the embedded model (group 64); none: layers only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--candidates", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "bench_gptq_kernels.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "torch": torch.__version__, "layers": layers(64)}
    if args.model:
        report["generation"] = generation(args.model, args.candidates, args.prompts, args.new_tokens, args.reps)
        print(json.dumps(report["generation"]), flush=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
