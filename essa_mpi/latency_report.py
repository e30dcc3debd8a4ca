"""``python -m essa_mpi latency``: appendix B's iteration-time model as a table and a plot.

    python -m essa_mpi latency                                              # defaults below, 1..1024 GPUs
    python -m essa_mpi latency --from-bench tools/results/bench_scaling.json   # eta_gen, eta_fb, network measured here
    python -m essa_mpi latency --model-bytes 15.2e9 --peak-bw 50e9 --gpus 8,16,32,64,128 -o latency.png

Prints, per GPU count G, ESSA's iteration time (generation + one 8-byte-per-candidate all-gather) and the ideal
gradient pipeline's (Lemma B.1's best split of training and generation + the gradient all-reduce), their ratio,
and Theorem B.2's population bound; writes a PNG of both times against G.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from essa_mpi import latency as L

DEFAULT_GPUS = [2**i for i in range(11)]  # 1 .. 1024
DEFAULTS = {"peak_bw": 25e9, "latency": 0.0, "eta_gen": 0.02, "eta_fb": 0.05}  # when neither flag nor bench says


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m essa_mpi latency", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--from-bench", metavar="JSON", help="tools/bench/bench_scaling.py output: eta_gen and eta_fb "
                    "measured on that machine, and the largest world's fitted all-reduce latency and bandwidth")
    ap.add_argument("--model-bytes", type=float, default=15.24e9, help="gradient bytes all-reduced (default: bf16 "
                    "Qwen2.5-7B, 7.62e9 x 2)")
    ap.add_argument("--peak-bw", type=float, help="sustained per-GPU collective bandwidth, bytes/s (default 25e9)")
    ap.add_argument("--latency", type=float, help="per-step collective latency, seconds (default 0)")
    ap.add_argument("--eta-gen", type=float, help="generation seconds per sample, one instance (default 0.02)")
    ap.add_argument("--eta-fb", type=float, help="forward-backward seconds per sample (default 0.05)")
    ap.add_argument("--popsize", type=int, default=128, help="ESSA population N_pop")
    ap.add_argument("--b-essa", type=float, default=256, help="prompts one candidate sees per generation")
    ap.add_argument("--b-grad", type=float, default=512, help="global batch of the gradient method")
    ap.add_argument("--m-gen", type=float, default=1, help="GPUs per generation instance")
    ap.add_argument("--m-fb", type=float, default=1, help="GPUs per training instance")
    ap.add_argument("--gpus", default=",".join(map(str, DEFAULT_GPUS)), help="comma-separated GPU counts")
    ap.add_argument("-o", "--output", default="latency.png", help="PNG path ('' = no plot)")
    return ap


def from_bench(path: str) -> dict:
    """eta_gen, eta_fb and the largest measured world's latency/bandwidth fit from bench_scaling.json."""
    try:
        with open(path) as fh:
            bench = json.load(fh)
        assert isinstance(bench, dict)
    except (OSError, ValueError, AssertionError) as exc:
        raise ValueError(f"--from-bench {path}: not a readable bench_scaling.py JSON object "
                         f"({exc or 'not an object'}); give the file tools/bench/bench_scaling.py wrote.") from None
    out, where = {}, "end_to_end"
    try:  # a file of the right kind but the wrong shape: say which field, no traceback
        e2e = bench.get("end_to_end") or {}
        for key in ("eta_gen", "eta_fb"):
            where = f"end_to_end.{key}_s"
            if e2e.get(f"{key}_s"):
                out[key] = positive(e2e[f"{key}_s"])
        if bench.get("exchange"):
            where = "exchange[-1].fit.latency_s / bandwidth_Bps"
            fit = bench["exchange"][-1]["fit"]
            out.update(latency=positive(fit["latency_s"]), peak_bw=positive(fit["bandwidth_Bps"]))
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
        raise ValueError(f"--from-bench {path}: {where} is missing or not a positive number ({type(exc).__name__}: "
                         f"{exc}); give the file tools/bench/bench_scaling.py wrote.") from None
    return out


def positive(value) -> float:
    """A measured number from the JSON: a positive int or float (not a string, bool or NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{value!r}")
    return float(value)


def table(a: argparse.Namespace, gpus: list) -> list:
    rows = []
    for g in gpus:
        essa = L.t_essa(a.popsize, a.b_essa, a.m_gen, g, a.eta_gen, a.peak_bw, a.latency)
        grad = L.t_grad_ideal(a.b_grad, g, a.m_fb, a.eta_fb, a.m_gen, a.eta_gen, a.model_bytes, a.peak_bw, a.latency)
        bound = L.population_bound(a.b_grad, a.b_essa, g, a.eta_fb, a.eta_gen, a.model_bytes, a.peak_bw)
        rows.append({"gpus": g, "essa_s": essa, "grad_s": grad, "grad_over_essa": grad / essa,
                     "theta_star": L.theta_star(a.m_fb, a.eta_fb, a.m_gen, a.eta_gen), "n_pop_bound": bound})
    return rows


def plot(rows: list, a: argparse.Namespace, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    g = [r["gpus"] for r in rows]
    ax.plot(g, [r["essa_s"] for r in rows], "o-", label=f"ESSA (N_pop={a.popsize}, B_essa={a.b_essa:g})")
    ax.plot(g, [r["grad_s"] for r in rows], "s-", label=f"ideal gradient pipeline (B_grad={a.b_grad:g})")
    ax.set(xscale="log", yscale="log", xlabel="GPUs", ylabel="seconds per iteration",
           title=f"Appendix B: eta_gen={a.eta_gen:.3g} s, eta_fb={a.eta_fb:.3g} s, M={a.model_bytes:.3g} B, "
                 f"bw={a.peak_bw:.3g} B/s")
    ax.title.set_fontsize(8)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def check(a: argparse.Namespace) -> list:
    """The GPU counts; ValueError naming the first argument that means nothing (negative, zero, not finite)."""
    try:
        gpus = [int(x) for x in a.gpus.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--gpus {a.gpus!r}: give comma-separated integers, e.g. 1,2,4,8") from None
    if not gpus or min(gpus) < 1:
        raise ValueError(f"--gpus {a.gpus!r}: give GPU counts of at least 1, e.g. 1,2,4,8")
    positive = ("eta_gen", "eta_fb", "peak_bw", "b_essa", "b_grad", "model_bytes", "m_gen", "m_fb", "popsize")
    for key in positive + ("latency",):
        value = getattr(a, key)
        if not math.isfinite(value) or value < 0 or (value == 0 and key in positive):
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag}={value:g} means nothing here; give a finite number "
                             f"{'> 0' if key in positive else '>= 0'}.")
    if a.output and not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
        raise ValueError(f"-o {a.output}: its directory does not exist; create it or choose another path.")
    return gpus


def main(argv: list) -> int:
    a = parser().parse_args(argv)
    try:
        measured = from_bench(a.from_bench) if a.from_bench else {}
        for key, default in DEFAULTS.items():  # the command line wins over the bench, the bench over the default
            if getattr(a, key) is None:
                setattr(a, key, measured.get(key, default))
        gpus = check(a)
    except ValueError as exc:
        print(f"essa_mpi: error: {exc}", file=sys.stderr)
        return 2
    rows = table(a, gpus)
    print(f"eta_gen {a.eta_gen:.4g} s, eta_fb {a.eta_fb:.4g} s per sample; gradient {a.model_bytes:.4g} B at "
          f"{a.peak_bw:.4g} B/s, latency {a.latency:.3g} s; theta* = {rows[0]['theta_star']:.3f}")
    print(f"{'GPUs':>6} {'ESSA s/iter':>12} {'grad s/iter':>12} {'grad/ESSA':>10} {'N_pop bound':>12}")
    for r in rows:
        print(f"{r['gpus']:>6} {r['essa_s']:>12.4g} {r['grad_s']:>12.4g} {r['grad_over_essa']:>10.3g} "
              f"{r['n_pop_bound']:>12.4g}")
    if a.output:
        try:
            plot(rows, a, a.output)
            print(f"wrote {a.output}")
        except ImportError:
            print("no plot: pip install matplotlib (or -e '.[plot]')")
    return 0 if all(math.isfinite(r["essa_s"]) for r in rows) else 1
