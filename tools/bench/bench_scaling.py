"""Scaling benchmarks: ESSA's per-generation exchange against gradient all-reduces, and ESSA end to end.

    python tools/bench/bench_scaling.py            # all parts -> tools/results/bench_scaling.json and bench_scaling.png
    python tools/bench/bench_scaling.py --quick    # the same shape in under 5 minutes (fewer sizes, generations, rows)
    python tools/bench/bench_scaling.py --launcher "srun --mpi=pmi2" --worlds 2,8,32,128   # inside a SLURM allocation

a. Exchange cost under real ``mpiexec`` for worlds of 2..64 processes (oversubscribed here, no model): ESSA's
   exchange (``Comm.exchange``: one Allgatherv of 8-byte records at lambda = world, plus each rank's 16-byte
   trailer) against an Allreduce of the LoRA gradient of a Qwen2.5-7B r=16 q/k/v/o adapter (bf16 bytes from
   its config) and of the full bf16 gradient of Qwen2.5-7B. All-reduces are measured up to the sizes that fit
   in memory; per world, latency + bytes/bandwidth is fitted and extrapolated (each number says which).
b. End to end on the embedded model, one core per rank: seconds per generation at 1 and 2 ranks with lambda
   fixed at 16 (strong scaling) and with lambda = 8 x ranks (weak scaling); per generation the share in the
   exchange and in waiting for the slowest rank (from each rank's evaluation seconds in the exchange trailer).
c. Validation accuracy against wall clock at 1 and 2 ranks on the embedded default (Fig. 3's shape here).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tools/
ROOT = os.path.dirname(HERE)
QWEN7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, params=7.62e9)  # Qwen2.5-7B config.json


def lora_grad_bytes(rank: int = 16, bytes_per: int = 2) -> int:
    """bf16 gradient bytes of a rank-r LoRA on q/k/v/o of Qwen2.5-7B: r (n_in + n_out) per projection.

    >>> lora_grad_bytes()  # 28 layers x 16 x (7168 + 4096 + 4096 + 7168) params x 2 bytes
    20185088
    """
    h, kv = QWEN7B["hidden"], QWEN7B["kv_heads"] * QWEN7B["head_dim"]
    per_layer = rank * ((h + h) + (h + kv) + (h + kv) + (h + h))  # q, k, v, o
    return QWEN7B["layers"] * per_layer * bytes_per


FULL_GRAD_BYTES = int(QWEN7B["params"] * 2)  # bf16 gradient of the whole model


def mpiexec() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return beside if os.path.isfile(beside) else "mpiexec"


# --------------------------------------------------------------------------------------------- part a (worker)
def exchange_worker(args: argparse.Namespace) -> None:
    """Under mpiexec/srun: time Comm.exchange and Allreduce; rank 0 writes the slowest rank's times."""
    from mpi4py import MPI

    from essa_mpi.comm import RECORD, Comm

    comm = Comm()
    w = comm.size
    local = np.zeros(1, RECORD)  # lambda = world: one candidate per rank

    def timed(fn, reps: int) -> float:
        fn()  # warm-up
        comm.world.Barrier()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        mine = (time.perf_counter() - t) / reps
        return comm.world.allreduce(mine, op=MPI.MAX)

    out = {"world": w, "essa_exchange_s": timed(lambda: comm.exchange(local, [1] * w, 123, 0.0), args.reps),
           "essa_bytes_per_rank": 8 + 16, "allreduce": []}
    for size in args.sizes:
        if 2 * size * w > args.memory_budget:
            continue
        send = np.ones(max(1, size // 2), np.float16)  # bf16-sized elements; float16 has the same bytes
        recv = np.empty_like(send)
        reps = max(2, min(args.reps, int(2e8 // max(size * w, 1))))
        t = timed(lambda send=send, recv=recv: comm.world.Allreduce(send, recv, op=MPI.SUM), reps)
        out["allreduce"].append({"bytes": send.nbytes, "seconds": t, "reps": reps})
    if comm.rank == 0:
        with open(args.out, "w") as fh:
            json.dump(out, fh)


def fit_latency_bandwidth(points: list) -> tuple:
    """Least squares seconds = latency + bytes / bandwidth over (bytes, seconds) points → (latency s, bytes/s).

    >>> fit_latency_bandwidth([(0, 1e-5), (1e6, 1e-3 + 1e-5)])
    (1e-05, 1000000000.0)
    """
    x = np.array([p[0] for p in points], float)
    y = np.array([p[1] for p in points], float)
    slope, intercept = np.polyfit(x, y, 1)
    return float(max(intercept, 0.0)), float(1.0 / slope) if slope > 0 else float("inf")


def part_a(args: argparse.Namespace) -> list:
    rows = []
    for w in args.worlds:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
            path = fh.name
        cmd = [*LAUNCHER, "-n", str(w), sys.executable, os.path.abspath(__file__), "--worker", "exchange", "--out",
               path, "--reps", str(args.reps), "--sizes", ",".join(map(str, args.sizes))]
        t = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        if res.returncode != 0:
            raise SystemExit(f"world {w}: {res.stderr[-2000:]}")
        with open(path) as fh:
            row = json.load(fh)
        os.remove(path)
        pts = [(a["bytes"], a["seconds"]) for a in row["allreduce"]]
        lat, bw = fit_latency_bandwidth(pts)
        measured = {a["bytes"]: a["seconds"] for a in row["allreduce"]}
        lora = lora_grad_bytes()
        row["fit"] = {"latency_s": lat, "bandwidth_Bps": bw, "points": len(pts)}
        row["lora_grad_allreduce"] = ({"bytes": lora, "seconds": measured[lora], "how": "measured"}
                                      if lora in measured else {"bytes": lora, "seconds": lat + lora / bw,
                                                                "how": "fitted"})
        row["full_grad_allreduce"] = {"bytes": FULL_GRAD_BYTES, "seconds": lat + FULL_GRAD_BYTES / bw, "how": "fitted"}
        print(f"world {w:3d}: ESSA exchange {row['essa_exchange_s'] * 1e6:9.1f} us | LoRA-grad all-reduce "
              f"{row['lora_grad_allreduce']['seconds'] * 1e3:9.2f} ms ({row['lora_grad_allreduce']['how']}) | full "
              f"grad {row['full_grad_allreduce']['seconds']:8.1f} s (fitted) | {time.time() - t:.0f} s", flush=True)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------- parts b and c (runs)
LAUNCHER = [mpiexec()]  # --launcher "srun --mpi=pmi2" inside a SLURM allocation


def essa_run(ranks: int, out: str, overrides: list, timeout: int = 7200) -> list:
    """LAUNCHER -n ranks python -m essa_mpi (embedded default, one torch thread per rank) → metrics lines."""
    cmd = [*LAUNCHER, "-n", str(ranks), sys.executable, "-m", "essa_mpi", "model.threads=1", "run.progress=false",
           f"run.output_dir={out}", *overrides]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        lines = [json.loads(line) for line in fh]
    print(f"  -n {ranks} {' '.join(overrides)}: {time.time() - t:.0f} s", flush=True)
    return lines


def generation_times(lines: list) -> dict:
    """Per-generation seconds (wall between consecutive generation lines, validation excluded) and shares."""
    gens = [m for m in lines if "reward_mean" in m]
    walls = np.diff([m["wall_s"] for m in gens])  # [G-1]: generation 1's wall includes start-up
    per = lambda key: float(np.median([m[key] for m in gens[1:]]))  # noqa: E731
    seconds = float(np.median(walls))
    # rank 0's time in the collective = waiting for the slowest rank + the exchange itself
    exchange = float(np.median([max(0.0, m["exchange_s"] - m["wait_s"]) for m in gens[1:]]))
    return {"generations": len(gens), "s_per_generation": seconds, "eval_s": per("eval_s"), "wait_s": per("wait_s"),
            "exchange_s": exchange, "exchange_share": exchange / seconds, "wait_share": per("wait_s") / seconds,
            "sent_bytes": gens[-1]["sent_bytes"]}


def curve(lines: list) -> list:
    return [{"generation": m["generation"], "wall_s": m["wall_s"], "val_reward": m["val_reward"]}
            for m in lines if "val_reward" in m]


def part_b(args: argparse.Namespace, work: str) -> dict:
    """Strong and weak scaling runs. --quick also validates them at the start and the end (outside the timed
    generations), which stands in for part c's curves."""
    val = [f"task.val_size={args.val_size}", f"task.val_every={10**6}"] if args.quick else ["task.val_size=0"]
    common = val + ["task.val_base=false", f"run.generations={args.generations}", f"task.batch_size={args.batch}",
                    "adapter.warm_start=none"]  # speed does not depend on the start
    out = {}
    for name, ranks, popsize in (("strong_1", 1, 16), ("strong_2", 2, 16), ("weak_1", 1, 8), ("weak_2", 2, 16)):
        lines = essa_run(ranks, os.path.join(work, name), common + [f"search.popsize={popsize}"])
        out[name] = {"ranks": ranks, "popsize": popsize, **generation_times(lines)}
        if args.quick and name.startswith("strong"):
            out.setdefault("curves", {})[f"ranks_{ranks}"] = curve(lines)
    s1, s2 = out["strong_1"]["s_per_generation"], out["strong_2"]["s_per_generation"]
    out["strong_efficiency"] = s1 / (2 * s2)
    # appendix B's per-sample times on this machine, one core: generation (population-batched) and SFT step
    out["eta_gen_s"] = out["strong_1"]["eval_s"] / (16 * args.batch)
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "fb"], capture_output=True,
                         text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})
    out["eta_fb_s"] = float(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 else None
    out["weak_efficiency"] = out["weak_1"]["s_per_generation"] / out["weak_2"]["s_per_generation"]
    return out


def part_c(args: argparse.Namespace, work: str) -> dict:
    out = {}
    for ranks in (1, 2):
        lines = essa_run(ranks, os.path.join(work, f"curve_{ranks}"),
                         [f"run.generations={args.curve_generations}", f"task.val_every={args.val_every}",
                          f"task.val_size={args.val_size}", "task.val_base=false"])
        out[f"ranks_{ranks}"] = curve(lines)
    return out


def eta_fb(rows: int = 16, steps: int = 3) -> float:
    """Forward-backward seconds per sample of one LoRA SFT step on the embedded model (1 thread, arithmetic SFT
    rows, rank 4 on q/k/v/o, as the default's warm start): eta_fb of appendix B, measured."""
    import torch
    from peft import LoraConfig, get_peft_model

    from essa_mpi.config import Config
    from essa_mpi.model import load_model
    from essa_mpi.sft import collate, encode_row
    from essa_mpi.tasks import build_task

    torch.set_num_threads(1)
    cfg = Config()
    task = build_task(cfg.task, cfg.search.seed)
    model, tok = load_model(cfg.model)
    model = get_peft_model(model, LoraConfig(r=cfg.adapter.rank, lora_alpha=cfg.adapter.alpha, lora_dropout=0.0,
                                             target_modules=cfg.adapter.target_modules, task_type="CAUSAL_LM"))
    model.train()
    batch = collate([encode_row(tok, task, r, cfg.sft.max_length) for r in task.sft[:rows]], tok.pad_token_id)
    times = []
    for _ in range(steps + 1):
        t = time.perf_counter()
        model(**batch).loss.backward()
        times.append(time.perf_counter() - t)
    return float(np.median(times[1:])) / rows


# ------------------------------------------------------------------------------------------------ plot and main
def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    a = result["exchange"]
    worlds = [r["world"] for r in a]
    ax[0].plot(worlds, [r["essa_exchange_s"] for r in a], "o-", label="ESSA exchange (measured)")
    for key, label in (("lora_grad_allreduce", "LoRA r=16 grad all-reduce"), ("full_grad_allreduce",
                                                                             "full bf16 grad all-reduce")):
        how = sorted({r[key]["how"] for r in a})
        ax[0].plot(worlds, [r[key]["seconds"] for r in a], "s--", label=f"{label} ({' / '.join(how)})")
    ax[0].set(xscale="log", yscale="log", xlabel="processes (oversubscribed on 2 cores)", ylabel="seconds per call",
              title="a. one generation's exchange vs a gradient all-reduce")
    ax[0].set_xticks(worlds, [str(w) for w in worlds])
    ax[0].xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax[0].legend(fontsize=7)
    b = result["end_to_end"]
    names = ["strong_1", "strong_2", "weak_1", "weak_2"]
    ev = [b[n]["eval_s"] for n in names]
    wt = [b[n]["wait_s"] for n in names]
    ex = [b[n]["exchange_s"] for n in names]
    other = [max(0.0, b[n]["s_per_generation"] - e - w - x) for n, e, w, x in zip(names, ev, wt, ex)]
    labels = [f"{n.split('_')[0]}\n{b[n]['ranks']}r λ={b[n]['popsize']}" for n in names]
    ax[1].bar(labels, ev, label="evaluate (rank 0)")
    ax[1].bar(labels, wt, bottom=ev, label="wait for slowest rank")
    ax[1].bar(labels, ex, bottom=np.add(ev, wt), label="exchange")
    ax[1].bar(labels, other, bottom=np.add(np.add(ev, wt), ex), label="update, checkpoint, log")
    ax[1].set(ylabel="seconds per generation", title=f"b. embedded model: strong eff. {b['strong_efficiency']:.2f}, "
                                                      f"weak eff. {b['weak_efficiency']:.2f}")
    ax[1].legend(fontsize=7)
    for key, curve in result["accuracy_vs_time"].items():
        ax[2].plot([p["wall_s"] / 60 for p in curve], [p["val_reward"] for p in curve], "o-",
                   label=key.replace("_", " "))
    ax[2].set(xlabel="wall clock (minutes, validation included)", ylabel="validation accuracy",
              title="c. embedded default: accuracy vs time")
    ax[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the same parts, small: under 5 minutes")
    ap.add_argument("--parts", default="a,b,c")
    ap.add_argument("--worker", choices=["exchange", "fb"], help=argparse.SUPPRESS)
    ap.add_argument("--launcher", default=None, help='command that starts N ranks with "-n N" appended, e.g. '
                    '"srun --mpi=pmi2" (default: the mpiexec beside this Python)')
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from an existing --out JSON")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "bench_scaling.json"))
    ap.add_argument("--worlds", default="2,4,8,16,32,64")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--sizes", default="", help="all-reduce sizes in bytes (default: 8 B .. LoRA grad .. 64 MiB)")
    ap.add_argument("--memory-budget", type=float, default=6e9, help="bytes the all-reduce buffers may take in all")
    ap.add_argument("--generations", type=int, default=5, help="part b: generations per run")
    ap.add_argument("--batch", type=int, default=24, help="part b: prompts per generation")
    ap.add_argument("--curve-generations", type=int, default=9, help="part c: generations per run")
    ap.add_argument("--val-every", type=int, default=3)
    ap.add_argument("--val-size", type=int, default=200)
    args = ap.parse_args()
    sizes = [8, 1024, 65536, 1 << 20, 1 << 22, lora_grad_bytes(), 1 << 26]
    args.sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else sizes
    args.worlds = [int(w) for w in args.worlds.split(",")]
    if args.launcher:
        LAUNCHER[:] = args.launcher.split()
    if args.replot:
        with open(args.out) as fh:
            return plot(json.load(fh), os.path.splitext(args.out)[0] + ".png")
    if args.worker == "fb":
        return print(eta_fb())
    if args.worker:
        return exchange_worker(args)
    if args.quick:  # the same parts, small; part c's curves come from part b's strong runs
        args.worlds, args.reps = [w for w in args.worlds if w <= 16], 50
        args.sizes = [8, 65536, 1 << 20, lora_grad_bytes()]
        args.generations, args.batch, args.val_size = 2, 4, 16
    parts = args.parts.split(",")
    t0 = time.time()
    result = {"settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out")},
              "lora_grad_bytes": lora_grad_bytes(), "full_grad_bytes": FULL_GRAD_BYTES,
              "machine": f"{os.cpu_count()} cores", "notes": "worlds above the core count are oversubscribed"}
    work = tempfile.mkdtemp(prefix="essa_bench_scaling_")
    if "a" in parts:
        result["exchange"] = part_a(args)
    if "b" in parts:
        result["end_to_end"] = part_b(args, work)
    if "c" in parts:
        curves = result.get("end_to_end", {}).pop("curves", None)
        result["accuracy_vs_time"] = curves if args.quick and curves else part_c(args, work)
    targets = {}
    if "exchange" in result and "end_to_end" in result:
        gen = min(result["end_to_end"][n]["s_per_generation"] for n in ("strong_1", "strong_2", "weak_1", "weak_2"))
        worst = max(r["essa_exchange_s"] for r in result["exchange"])
        targets["exchange_share_of_generation_max"] = worst / gen
    if "end_to_end" in result:
        targets["strong_efficiency_1_to_2"] = result["end_to_end"]["strong_efficiency"]
    result["targets"] = targets
    result["wall_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    if {"exchange", "end_to_end", "accuracy_vs_time"} <= set(result):
        plot(result, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps(targets), f"\nwrote {args.out} in {result['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
