"""First contact with a GPU: the checks only a GPU can answer, in under 8 minutes on one GPU.

    python tools/bench/gpu_first_contact.py                  # -> tools/results/gpu_first_contact.json
    python tools/bench/gpu_first_contact.py --out /tmp/x.json # on a CPU: a dry run, every check skipped with a reason
    python tools/bench/gpu_first_contact.py --device cpu --arch tiny --out /tmp/x.json   # the checks' code on a CPU

Made for the day a GPU machine is lent (random weights of a real architecture, nothing downloaded or installed;
vLLM and bitsandbytes are used only where the machine already has them). The JSON is rewritten after every
check, so a timeout keeps what was found. Checks:

- ``cuda_reads_visible_devices_once``: the premise of ``launch.bind_rank`` on this driver: CUDA_VISIBLE_DEVICES
  set before the first CUDA call hides the GPU, set after it changes nothing.
- ``ranks_on_own_gpus``: N = min(8, GPUs) processes started as local ranks 0..N-1 (MPICH Hydra's variables),
  each binding through ``cli.bind`` before torch starts CUDA: every rank sees one GPU, all different (UUIDs).
  Skipped with one GPU.
- ``gptq_cuda``: GPTQ layers of Qwen2.5-7B's shapes (``--arch``) on the GPU: the SVD-LoRA branch on the layer's device,
  PyTorch's fused int4 kernel taken and equal to the dequantized weight, and its time against dequantize per
  rows (1 .. 4096), which places the decode/prefill choice of ``gptq.GPTQLinear``.
- ``bf16_left_padded_generation``: a random Qwen2.5-1.5B-shaped model in bf16 through ``load_model`` and
  ``PopulationEvaluator``: left-padded rows of different lengths under 4 candidates, every logit finite, and the
  share of rows whose greedy completion equals the same row generated alone (no padding).
- ``hf_vs_vllm``: completion agreement of the two engines on that model (``check_vllm_parity``), where vLLM imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tools", "bench"), os.path.join(ROOT, "tools",
                                                                                                      "checks")]


class Skip(Exception):
    """A check that cannot run here; its message is the reason."""


def cuda_reads_visible_devices_once(args) -> dict:
    code = ("import os, torch; {before}; n = torch.cuda.device_count(); os.environ['CUDA_VISIBLE_DEVICES'] = ''; "
            "print(n, torch.cuda.device_count())")
    before = run_py(code.format(before="os.environ['CUDA_VISIBLE_DEVICES'] = ''"))
    after = run_py(code.format(before="torch.cuda.is_available()"))
    ok = before.split()[0] == "0" and after.split()[0] == after.split()[1] != "0"
    return {"ok": ok, "set_before_first_call": before, "set_after_first_call": after}


def ranks_on_own_gpus(args) -> dict:
    import torch

    n = min(8, torch.cuda.device_count())
    if n < 2:
        raise Skip(f"needs 2 or more GPUs, this machine has {n}")
    code = ("import sys; sys.argv = ['essa_mpi', 'model.device=cuda']; from essa_mpi import cli; "
            "cli.bind(cli.early_config(cli.parser().parse_args(sys.argv[1:]), 'run')); import os, torch; "
            "print(os.environ['CUDA_VISIBLE_DEVICES'], torch.cuda.device_count(), "
            "torch.cuda.get_device_properties(0).uuid)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    seen = [run_py(code, {**env, "MPI_LOCALRANKID": str(r), "MPI_LOCALNRANKS": str(n)}).split() for r in range(n)]
    ok = [s[0] for s in seen] == [str(r) for r in range(n)] and {s[1] for s in seen} == {"1"} and \
        len({s[2] for s in seen}) == n
    return {"ok": ok, "ranks": n, "seen": seen}


def gptq_cuda(args) -> dict:
    import torch
    from bench_gpu import ARCHS

    from essa_mpi.gptq import GPTQLinear, int4_matmul, pack
    from essa_mpi.svd_lora import LoraFactors, SVDLoRALinear, layer_device

    a = ARCHS["qwen2.5-7b" if args.arch == "qwen2.5-1.5b" else args.arch]
    h, kv = a["hidden_size"], a["hidden_size"] // a["num_attention_heads"] * a["num_key_value_heads"]
    dev, g = torch.device(args.device), min(128, h // 2)
    out = {"ok": True, "shapes": []}
    for n_out, n_in in ((h, h), (kv, h), (a["intermediate_size"], h), (h, a["intermediate_size"])):
        gen = torch.Generator().manual_seed(0)
        layer = GPTQLinear(n_in, n_out, n_in // g, bias=False, dtype=torch.bfloat16)
        layer.qweight.copy_(pack(torch.randint(0, 16, (n_in, n_out), generator=gen), 0))
        layer.qzeros.copy_(pack(torch.randint(0, 16, (n_in // g, n_out), generator=gen), 1))
        layer.scales.copy_((torch.rand(n_in // g, n_out, generator=gen) * 0.01).half())
        layer.g_idx.copy_(torch.arange(n_in) // g)
        layer.to(dev)
        factors = LoraFactors("x", torch.randn(8, n_in), torch.randn(n_out, 8))  # A [r, in], B [out, r]
        branch = SVDLoRALinear(layer, factors, 0, layer_device(layer))
        shape = {"out": n_out, "in": n_in, "branch_device": str(branch.V_A.device),
                 "fused": layer.fused(dev) is not None, "ms": {}}
        W = layer.dequantize()
        for rows in (1, 16, 64, 128, 512, 4096):
            x = torch.randn(rows, n_in, device=dev, dtype=torch.bfloat16)
            paths = {"dequantize": lambda x=x, lay=layer: torch.nn.functional.linear(x, lay.dequantize())}
            if shape["fused"]:
                paths["fused"] = lambda x=x, lay=layer: int4_matmul(x, *lay.kernel[dev])
                err = (paths["fused"]().float() - torch.nn.functional.linear(x, W).float()).abs().max().item()
                shape.setdefault("max_abs_err", 0.0)
                shape["max_abs_err"] = max(shape["max_abs_err"], err)
            shape["ms"][rows] = {k: round(cuda_ms(f), 4) for k, f in paths.items()}
        out["shapes"].append(shape)
        out["ok"] &= shape["fused"] and shape["branch_device"].startswith(args.device)
    return out


def cuda_ms(fn, reps: int = 20) -> float:
    import torch

    fn()
    if not torch.cuda.is_available():  # the CPU smoke run
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def random_model(work: str, arch: str, device: str) -> str:
    """A random Qwen2-architecture bf16 model of ``arch``'s shape (Qwen2.5-1.5B by default) with the tests' byte
    tokenizer (its vocabulary), saved once."""
    import torch
    from bench_gpu import ARCHS
    from tiny import make_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    path = os.path.join(work, arch)
    if not os.path.isdir(path):
        tok = make_tokenizer()
        arch = {**ARCHS[arch], "vocab_size": len(tok)}
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(Qwen2Config(**arch, max_position_embeddings=4096)).to(torch.bfloat16)
        model.save_pretrained(path)
        tok.save_pretrained(path)
    return path


def bf16_left_padded_generation(args) -> dict:
    import numpy as np
    import torch

    from essa_mpi.config import ModelConfig, TaskConfig
    from essa_mpi.model import load_model
    from essa_mpi.population import PopulationEvaluator
    from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
    from essa_mpi.tasks import build_task

    path = random_model(args.workdir, args.arch, args.device)
    model, tok = load_model(ModelConfig(name_or_path=path, device=args.device, precision="bf16"))
    task = build_task(TaskConfig(name="toy", val_size=4), seed=0)
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, 0), 1.0)
    ev = PopulationEvaluator(model, tok, adapter, task, max_new_tokens=16, max_rows=4096)
    rows = task.train[:12]
    X = np.random.default_rng(0).standard_normal((4, adapter.solution_length)) * 0.5  # [C, n]
    enc = ev.encode(rows)  # [P, T], left-padded
    ids, mask = enc["input_ids"].repeat(4, 1), enc["attention_mask"].repeat(4, 1)  # [C*P, T]
    adapter.set_candidates(X)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits  # [C*P, T, vocab]
    adapter.clear()
    real = mask.bool()  # [C*P, T]
    finite = bool(torch.isfinite(logits[real]).all())
    batched = ev.completions(X, rows)  # [C*P]
    alone = [ev.completions(X[c:c + 1], [r])[0] for c in range(4) for r in rows]
    same = float(np.mean([a == b for a, b in zip(batched, alone)]))
    return {"ok": finite and same >= 0.9, "finite_logits": finite, "same_as_unpadded": same,
            "pad_lengths": sorted(set((~enc["attention_mask"].bool()).sum(1).tolist()))}


def hf_vs_vllm(args) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise Skip("vLLM is not installed on this machine (nothing can be installed there)") from None
    from check_vllm_parity import parity

    from essa_mpi.config import ModelConfig

    res = parity(ModelConfig(name_or_path=random_model(args.workdir, args.arch, args.device), device=args.device,
                             precision="bf16"), None,
                 candidates=4, prompts=16, sigma=0.5, task_name="toy", max_new_tokens=16)
    return {"ok": res["lora"]["same_completion"] >= 0.9, **res}


CHECKS = [cuda_reads_visible_devices_once, ranks_on_own_gpus, gptq_cuda, bf16_left_padded_generation, hf_vs_vllm]
GPU_ONLY = (cuda_reads_visible_devices_once, ranks_on_own_gpus)


def run_py(code: str, env: dict | None = None) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**(env or os.environ), "PYTHONPATH": ROOT})
    if res.returncode:
        raise RuntimeError(res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}")
    return res.stdout.strip().splitlines()[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "tools", "results", "gpu_first_contact.json"))
    ap.add_argument("--workdir", default=None, help="where the random model goes (default: a temp dir)")
    ap.add_argument("--device", default="cuda", help="cpu: run the checks that need no GPU on the CPU (smoke test)")
    ap.add_argument("--arch", default="qwen2.5-1.5b", help="bench_gpu.ARCHS shape of the random model (tiny: smoke)")
    args = ap.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="essa_first_contact_")
    import torch

    report = {"env": {"torch": torch.__version__, "cuda": torch.cuda.is_available() and torch.cuda.get_device_name(0),
                      "device": args.device, "arch": args.arch}, "checks": {}}
    for check in CHECKS:
        t = time.time()
        try:
            if args.device == "cuda" and not torch.cuda.is_available():
                raise Skip("no CUDA device on this machine")
            if args.device != "cuda" and check in GPU_ONLY:
                raise Skip("needs CUDA itself")
            result = {"status": "ok", **check(args)}
            result["status"] = "ok" if result.pop("ok") else "failed"
        except Skip as why:
            result = {"status": "skipped", "reason": str(why)}
        except Exception as exc:  # one check failing must not lose the others
            result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:800]}
        result["seconds"] = round(time.time() - t, 1)
        report["checks"][check.__name__] = result
        print(check.__name__, json.dumps(result)[:300], flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".part", "w") as fh:  # after every check: a timeout keeps what was found
            json.dump(report, fh, indent=1)
        os.replace(args.out + ".part", args.out)
    return 0 if all(c["status"] in ("ok", "skipped") for c in report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
