"""Appendix B as code: per-iteration time of ESSA against an ideal gradient pipeline (GRPO/PPO-style).

    t_essa(n_pop=128, b_essa=256, m_gen=1, gpus=128, eta_gen=0.02, peak_bw=25e9)
    population_bound(b_grad=512, b_essa=256, gpus=128, eta_fb=0.05, eta_gen=0.02, m_params=2 * 7.6e9, peak_bw=25e9)
    python -m essa_mpi latency --from-bench tools/results/bench_scaling.json --gpus 1,2,4,...,1024

Notation (paper, appendix B): B_grad global batch of the gradient method, B_essa the batch one candidate sees,
m_fb / m_gen GPUs per model instance for training / generation, G GPUs, eta_fb / eta_gen seconds per sample of
forward-backward / generation, M_params bytes of the gradient all-reduced, peak_bw sustained bytes/s per GPU.
Pure functions of numbers (seconds and bytes); ``latency_s`` adds a per-collective start-up cost the paper
leaves out (a latency + bytes/bandwidth fit of measured collectives supplies both).
"""

from __future__ import annotations

import math

RECORD_BYTES = 8  # one (uint32 seed, float32 reward) record (Alg. 1, line 13)


def t_fb_grad(b_grad: float, m_fb: float, g_fb: float, eta_fb: float) -> float:
    """T_fb^grad = B_grad m_fb / G_fb * eta_fb (appendix B, "Computation").

    >>> t_fb_grad(512, 1, 8, 0.05)  # 512 samples over 8 single-GPU trainers at 50 ms each
    3.2
    """
    return b_grad * m_fb / g_fb * eta_fb


def t_gen_grad(b_grad: float, m_gen: float, g_gen: float, eta_gen: float) -> float:
    """T_gen^grad = B_grad m_gen / G_gen * eta_gen: the rollouts of one gradient step.

    >>> t_gen_grad(512, 1, 8, 0.02)
    1.28
    """
    return b_grad * m_gen / g_gen * eta_gen


def t_gen_essa(n_pop: int, b_essa: float, m_gen: float, gpus: float, eta_gen: float) -> float:
    """T_gen^essa = N_pop B_essa m_gen / G * eta_gen: every candidate generates on its batch.

    >>> t_gen_essa(128, 256, 1, 128, 0.02)  # one candidate per GPU: 256 samples at 20 ms
    5.12
    """
    return n_pop * b_essa * m_gen / gpus * eta_gen


def _ring(gpus: float) -> float:
    return (gpus - 1) / gpus


def t_comm_grad(m_params: float, gpus: float, peak_bw: float, latency_s: float = 0.0) -> float:
    """T_comm^grad = 2 M_params (G-1) / (G peak_bw): all-reduce = reduce-scatter + all-gather
    (+ 2 (G-1) latency_s start-ups of a ring when a latency is given).

    >>> round(t_comm_grad(15.2e9, 8, 25e9), 4)  # bf16 gradient of a 7.6B model, 25 GB/s
    1.064
    >>> t_comm_grad(1e9, 1, 25e9)  # one GPU: nothing to exchange
    0.0
    """
    return 2 * m_params * _ring(gpus) / peak_bw + 2 * (gpus - 1) * latency_s


def t_comm_essa(gpus: float, peak_bw: float, m_essa: float = RECORD_BYTES, latency_s: float = 0.0) -> float:
    """T_comm^essa = M_essa (G-1) / (G peak_bw): one all-gather of the records. The paper writes M_essa =
    8 bytes; our exchange moves 8 bytes per candidate, so pass m_essa = 8 N_pop (+ ceil(log2 G) latency_s
    start-ups of a recursive-doubling all-gather when a latency is given).

    >>> t_comm_essa(128, 25e9, m_essa=8 * 128)  # 1 KiB over 25 GB/s: ~40 ns
    4.064e-08
    >>> t_comm_essa(128, 25e9, m_essa=1024, latency_s=5e-6)  # 7 steps of 5 us dominate
    3.504064e-05
    """
    steps = math.ceil(math.log2(gpus)) if gpus > 1 else 0
    return m_essa * _ring(gpus) / peak_bw + steps * latency_s


def theta_star(m_fb: float, eta_fb: float, m_gen: float, eta_gen: float) -> float:
    """Lemma B.1: the share of GPUs for training that balances training and generation,
    theta* = m_fb eta_fb / (m_fb eta_fb + m_gen eta_gen).

    >>> theta_star(1, 0.05, 1, 0.02)  # training is 2.5x slower per sample: give it 5/7 of the GPUs
    0.7142857142857143
    """
    a, b = m_fb * eta_fb, m_gen * eta_gen
    return a / (a + b)


def t_fb_gen_grad(theta: float, b_grad: float, gpus: float, m_fb: float, eta_fb: float, m_gen: float,
                  eta_gen: float) -> float:
    """T_fb-gen^grad(theta) = B_grad / G * max(m_fb eta_fb / theta, m_gen eta_gen / (1 - theta)): training and
    generation run asynchronously on theta G and (1 - theta) G GPUs.

    >>> t_fb_gen_grad(0.5, 512, 8, 1, 0.05, 1, 0.02)  # an even split leaves generation idle
    6.4
    >>> round(t_fb_gen_grad(theta_star(1, 0.05, 1, 0.02), 512, 8, 1, 0.05, 1, 0.02), 6)  # Lemma B.1: B/G (a + b)
    4.48
    """
    return b_grad / gpus * max(m_fb * eta_fb / theta, m_gen * eta_gen / (1 - theta))


def t_grad_ideal(b_grad: float, gpus: float, m_fb: float, eta_fb: float, m_gen: float, eta_gen: float,
                 m_params: float, peak_bw: float, latency_s: float = 0.0) -> float:
    """T_*^grad = B_grad / G (m_fb eta_fb + m_gen eta_gen) + T_comm^grad: the gradient pipeline at its best split.

    >>> round(t_grad_ideal(512, 8, 1, 0.05, 1, 0.02, 15.2e9, 25e9), 4)  # 4.48 s compute + 1.064 s all-reduce
    5.544
    """
    return b_grad / gpus * (m_fb * eta_fb + m_gen * eta_gen) + t_comm_grad(m_params, gpus, peak_bw, latency_s)


def t_essa(n_pop: int, b_essa: float, m_gen: float, gpus: float, eta_gen: float, peak_bw: float,
           latency_s: float = 0.0) -> float:
    """T^essa = T_gen^essa + T_comm^essa, with 8 bytes per candidate exchanged.

    >>> round(t_essa(16, 24, 1, 2, 0.5, 1e9), 6)  # the embedded default's shape on 2 ranks at 0.5 s per sample
    96.0
    """
    return t_gen_essa(n_pop, b_essa, m_gen, gpus, eta_gen) + t_comm_essa(gpus, peak_bw, RECORD_BYTES * n_pop,
                                                                         latency_s)


def population_bound(b_grad: float, b_essa: float, gpus: float, eta_fb: float, eta_gen: float, m_params: float,
                     peak_bw: float) -> float:
    """Theorem B.2: ESSA's iteration is faster than the ideal gradient pipeline whenever N_pop is below
    [B_grad (eta_fb / (G eta_gen) + 1) + (G-1) M_params / (peak_bw G eta_gen)] / B_essa (equation 1).

    >>> round(population_bound(512, 256, 8, 0.05, 0.02, 15.2e9, 25e9), 4)  # (512 x 1.3125 + 26.6) / 256
    2.7289
    >>> population_bound(512, 256, 1, 0.05, 0.02, 15.2e9, 25e9)  # one GPU: no all-reduce to save
    7.0
    """
    rhs = b_grad * (eta_fb / (gpus * eta_gen) + 1) + (gpus - 1) * m_params / (peak_bw * gpus * eta_gen)
    return rhs / b_essa
