"""Population-batched generation speed on a randomly initialised model of a real architecture, per precision.

    python tools/bench/bench_gpu.py                                  # Qwen2.5-7B shape on cuda: bf16, int8, int4, gptq
    python tools/bench/bench_gpu.py --arch tiny --device cpu --precisions bf16,gptq --new-tokens 4   # smoke test

Speed does not depend on weight values, so the weights are random (nothing is downloaded): the model is built
from its config, saved once as safetensors (plus a GPTQ checkpoint with random 4-bit codes), and each
precision is loaded through essa_mpi's own ``load_model``, with SVD-LoRA attached to q/k/v/o and ``popsize``
candidates x ``prompts`` rows generated in one call, exactly as a rank does. Reported per precision:
tokens/s with candidates (and of the plain base model on the same rows), weights bytes, peak GPU memory,
load seconds, and the GPTQ kernel backend. Writes tools/results/bench_gpu.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
ARCHS = {  # Qwen2 configs as published with the models (config.json)
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def save_random(arch: str, out: str, device: str) -> str:
    """A random bf16 model of ``arch`` in ``out`` (config + safetensors), built on ``device`` (fast on a GPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**ARCHS[arch], max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    return out


def save_random_gptq(dense: str, out: str, group_size: int = 128) -> str:
    """A GPTQ checkpoint (essa_mpi.gptq format) with random 4-bit codes for every decoder linear layer."""
    from safetensors.torch import load_file, save_file

    from essa_mpi.gptq import save_gptq_metadata

    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for name in sorted(f for f in os.listdir(dense) if f.endswith(".safetensors")):
        state, new = load_file(os.path.join(dense, name)), {}
        for key, t in state.items():
            if ".layers." in key and key.endswith("_proj.weight"):
                n_out, n_in = t.shape  # [out, in]
                base = key[: -len(".weight")]
                groups = (n_in + group_size - 1) // group_size
                new[f"{base}.qweight"] = torch.randint(-2**31, 2**31 - 1, (n_in // 8, n_out), generator=g,
                                                       dtype=torch.int64).to(torch.int32)  # [in/8, out]
                new[f"{base}.qzeros"] = torch.full((groups, n_out // 8), 0x77777777, dtype=torch.int32)  # zero 8
                new[f"{base}.scales"] = torch.full((groups, n_out), 1e-2, dtype=torch.float16)  # [groups, out]
                new[f"{base}.g_idx"] = (torch.arange(n_in) // group_size).to(torch.int32)  # [in]
            else:
                new[key] = t
        save_file(new, os.path.join(out, name), metadata={"format": "pt"})
    for name in os.listdir(dense):
        if name.endswith(".json") and not os.path.exists(os.path.join(out, name)):
            with open(os.path.join(dense, name)) as src, open(os.path.join(out, name), "w") as dst:
                dst.write(src.read())
    save_gptq_metadata(out, group_size)
    return out


def measure(path: str, precision: str, device: str, args: argparse.Namespace) -> dict:
    """Load at ``precision`` the way a rank does, attach SVD-LoRA, time one population-batched generate."""
    from essa_mpi.memory import loaded_bytes
    from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    model = _load(path, precision, device)
    load_s = time.time() - t0
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, ["q_proj", "k_proj", "v_proj", "o_proj"], args.rank,
                                                      2.0 * args.rank, 0), 1.0)
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab - 10, (args.prompts, args.prompt_len), generator=torch.Generator().manual_seed(0))
    rows = ids.repeat(args.popsize, 1).to(model.device)  # [popsize*prompts, T], candidate-major
    mask = torch.ones_like(rows)
    offsets = torch.randn(args.popsize, adapter.solution_length, generator=torch.Generator().manual_seed(1)) * 0.3

    def timed(with_adapter: bool) -> float:
        adapter.set_candidates(offsets) if with_adapter else adapter.clear()
        model.generate(input_ids=rows[:, :8], attention_mask=mask[:, :8], max_new_tokens=2, do_sample=False)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.time()
        out = model.generate(input_ids=rows, attention_mask=mask, max_new_tokens=args.new_tokens,
                             min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == rows.shape[1] + args.new_tokens
        return time.time() - t

    with torch.no_grad():
        t_pop, t_base = timed(True), timed(False)
    tokens = rows.shape[0] * args.new_tokens
    result = {"precision": precision, "rows": rows.shape[0], "new_tokens": args.new_tokens, "load_s": round(load_s, 1),
              "population_tokens_per_s": round(tokens / t_pop, 1), "base_tokens_per_s": round(tokens / t_base, 1),
              "population_vs_base": round(t_base / t_pop, 3), "weights_bytes": loaded_bytes(model),
              "gptq_backend": getattr(model, "gptq_backend", None)}
    if device == "cuda":
        result["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(result), flush=True)
    return result  # model and adapter go with this frame (timed() is local too)


def _load(path: str, precision: str, device: str):
    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model

    return load_model(ModelConfig(name_or_path=path, precision=precision, device=device))[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen2.5-7b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--precisions", default="bf16,int8,int4,gptq")
    ap.add_argument("--popsize", type=int, default=8, help="candidates in one generate call")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of the SVD-LoRA adapter")
    ap.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_gpu.json"))
    args = ap.parse_args()
    precisions = [p for p in args.precisions.split(",") if p]
    work = args.workdir or tempfile.mkdtemp(prefix="essa_bench_gpu_")
    t0 = time.time()
    dense = save_random(args.arch, os.path.join(work, "dense"), args.device if args.device == "cuda" else "cpu")
    gptq = save_random_gptq(dense, os.path.join(work, "gptq")) if "gptq" in precisions else None
    print(f"random {args.arch} checkpoints written in {time.time() - t0:.0f} s", flush=True)
    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    for pkg in ("transformers", "bitsandbytes", "gptqmodel"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception:
            env[pkg] = None
    results = []
    for p in precisions:
        try:
            results.append(measure(gptq if p == "gptq" else dense, p, args.device, args))
        except Exception as exc:  # one precision failing (say a missing kernel) must not lose the others
            results.append({"precision": p, "error": f"{type(exc).__name__}: {exc}"[:500]})
            print(json.dumps(results[-1]), flush=True)
        write(args, env, results, t0)  # after every precision: a timeout keeps what was measured
    print(f"wrote {args.out}")


def write(args: argparse.Namespace, env: dict, results: list, t0: float) -> None:
    """The JSON so far, replaced atomically (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".part", "w") as fh:
        json.dump({"arch": args.arch, "settings": {k: v for k, v in vars(args).items() if k not in ("out", "workdir")},
                   "env": env, "results": results, "done": len(results) == len(args.precisions.split(",")),
                   "wall_s": round(time.time() - t0, 1)}, fh, indent=1)
    os.replace(args.out + ".part", args.out)

if __name__ == "__main__":
    main()
