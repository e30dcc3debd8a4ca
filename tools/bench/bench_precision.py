"""Precision benchmark (paper Table 2 shape): one short ESSA run per base-weight precision, side by side.

    python tools/bench/bench_precision.py              # embedded model, arithmetic, CPU, one shared fp32 SFT start
    python tools/bench/bench_precision.py --sft each   # each precision trains its own SFT start on its own base
    python tools/bench/bench_precision.py --ranks 1 --generations 4 --model /path/to/model --device cuda

For each precision (fp32, bf16, int8, int4, gptq) it runs ``mpiexec -n RANKS python -m essa_mpi`` with the
same seeds and settings from an SFT warm start (cached by config), and reads back from the run's metrics:
model weight bytes (all, and the decoder layers that get quantized) and peak resident memory of rank 0,
validation accuracy of the base model (--sft each), of the SFT start (generation 0) and after the run, and
seconds per generation. gptq first makes a GPTQ checkpoint with python -m essa_mpi quantize (cached). Writes
tools/results/bench_precision.json (or bench_precision_own_sft.json) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from essa_mpi.config import PRECISIONS

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
MPIEXEC = MPIEXEC if os.path.isfile(MPIEXEC) else shutil.which("mpiexec")


def essa(extra: list, ranks: int) -> subprocess.CompletedProcess:
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "essa_mpi", *extra]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return res


def sft_adapter(model: str, precision: str, common: list) -> str:
    """Train (or reuse, cached by config) the SFT warm start on `model` at `precision` → adapter directory."""
    res = essa(["sft", f"model.name_or_path={model}", f"model.precision={precision}", *common], 1)
    return json.loads(res.stdout.strip().splitlines()[-1])["adapter"]


def gptq_checkpoint(args: argparse.Namespace) -> str:
    """python -m essa_mpi quantize of --model with default calibration, made once under --work."""
    out = os.path.join(args.work, "gptq_model")
    if not os.path.isfile(os.path.join(out, "config.json")):
        subprocess.run([sys.executable, "-m", "essa_mpi", "quantize", "--model", args.model, "--out", out],
                       check=True)
    return out


def summarize(out_dir: str) -> dict:
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    vals = [r for r in rows if "val_reward" in r]
    gens = [r for r in rows if "reward_mean" in r]
    loaded = next(r["memory_after_load"] for r in rows if "memory_after_load" in r)
    gaps = [b["wall_s"] - a["wall_s"] for a, b in zip(gens, gens[1:]) if "val_reward" not in b]
    base = [r["val_base_reward"] for r in rows if "val_base_reward" in r]
    return {**({"val_base": base[0]} if base else {}), "weights_bytes": loaded["weights_bytes"],
            "peak_rss_bytes": max([loaded["peak_rss_bytes"]] + [r["peak_rss_bytes"] for r in gens]),
            "val_sft": vals[0]["val_reward"], "val_after": vals[-1]["val_reward"],
            "seconds_per_generation": round(sum(gaps) / len(gaps), 2) if gaps else None}


def layer_bytes(model: str, precision: str, device: str) -> int:
    """Bytes of the decoder layers alone (what int8/int4/gptq quantize; embeddings, norms and head stay bf16)."""
    from essa_mpi.config import ModelConfig
    from essa_mpi.memory import loaded_bytes
    from essa_mpi.model import load_model

    lm, _ = load_model(ModelConfig(name_or_path=model, precision=precision, device=device))
    return loaded_bytes(lm.get_decoder().layers)


def table(results: dict) -> str:
    bf16 = results.get("bf16", {})  # empty if bf16 failed or was not run
    lines = ["| precision | weights MiB | vs bf16 | decoder layers vs bf16 | peak RSS MiB | val base | val SFT "
             "| val after ESSA | s / generation |", "|---|---|---|---|---|---|---|---|---|"]
    for p, r in results.items():
        if "error" in r:
            lines.append(f"| {p} | failed: see JSON | | | | | | | |")
            continue
        ratio, layers = (f"{r[key] / bf16[key]:.2f}" if bf16.get(key) else "-" for key in ("weights_bytes",
                                                                                       "layer_bytes"))
        base = f"{r['val_base']:.3f}" if "val_base" in r else "-"
        lines.append(f"| {p} | {r['weights_bytes'] / 2**20:.1f} | {ratio} | {layers} "
                     f"| {r['peak_rss_bytes'] / 2**20:.0f} | {base} | {r['val_sft']:.3f} | {r['val_after']:.3f} "
                     f"| {r['seconds_per_generation']} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--val-size", type=int, default=200)
    ap.add_argument("--sft", choices=["fp32", "each"], default="fp32",
                    help="fp32: one SFT warm start trained in fp32, shared by every precision (isolates what "
                         "quantizing the base costs a fixed adapter); each: every precision trains its own warm "
                         "start on its own base (QLoRA-style, what `model.precision=P` does by default) and the "
                         "base model is validated too")
    ap.add_argument("--work", default="runs/bench_precision")
    ap.add_argument("--out", help="default: tools/results/bench_precision[_own_sft].json")
    ap.add_argument("--merge", action="store_true", help="update the given precisions in an existing --out file")
    args = ap.parse_args()
    stem = "bench_precision_own_sft" if args.sft == "each" else "bench_precision"
    args.out = args.out or os.path.join(HERE, "results", f"{stem}.json")

    common = [f"model.device={args.device}", f"task.val_size={args.val_size}", f"task.val_every={args.generations}",
              f"run.generations={args.generations}", "run.progress=false",
              f"task.val_base={str(args.sft == 'each').lower()}"]
    shared = None if args.sft == "each" else sft_adapter(args.model, "fp32", common)
    results, t0 = {}, time.time()
    if args.merge and os.path.isfile(args.out):  # keep the precisions measured before
        with open(args.out) as fh:
            results = {p: r for p, r in json.load(fh)["results"].items() if p not in args.precisions}
    for p in args.precisions:
        model = gptq_checkpoint(args) if p == "gptq" else args.model
        out = os.path.join(args.work, f"{p}-sft_{args.sft}")
        shutil.rmtree(out, ignore_errors=True)
        try:
            adapter = shared or sft_adapter(model, p, common)
            essa([f"model.name_or_path={model}", f"model.precision={p}", f"adapter.path={adapter}",
                        f"run.output_dir={out}", *common], args.ranks)
        except RuntimeError as exc:  # record it and go on with the other precisions
            results[p] = {"error": str(exc)[-1500:]}
            print(p, "FAILED", str(exc)[-500:], flush=True)
            continue
        results[p] = {**summarize(out), "layer_bytes": layer_bytes(model, p, args.device), "sft_adapter": adapter}
        print(p, results[p], flush=True)
    results = {p: results[p] for p in PRECISIONS if p in results}
    report = {"model": args.model, "device": args.device, "ranks": args.ranks, "generations": args.generations,
              "val_size": args.val_size, "sft": args.sft, "wall_s": round(time.time() - t0, 1),
              "results": results, "table": table(results)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(report, fh, indent=1)
    print(report["table"])


if __name__ == "__main__":
    main()
