import numpy as np
import pytest
import torch

from essa_mpi.svd_lora import LoraFactors, SVDLoRA, _svd_factor, fresh_lora_factors, target_names

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def sft_like_factors(model, rank, seed=0):
    """Non-zero A and B, as after an SFT warm start."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in target_names(model, TARGETS):
        mod = model.get_submodule(name)
        out.append(LoraFactors(name, torch.randn(rank, mod.in_features, generator=gen, dtype=torch.float64),
                               torch.randn(mod.out_features, rank, generator=gen, dtype=torch.float64)))
    return out


@pytest.fixture()
def fresh_model(tiny_dir):
    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model

    return load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))[0]


@pytest.mark.parametrize("init", ["sft", "fresh"])
def test_zero_offsets_reconstruct_BA(fresh_model, init):
    factors = (sft_like_factors(fresh_model, 4) if init == "sft"
               else fresh_lora_factors(fresh_model, TARGETS, 4, 8.0, seed=1))
    adapter = SVDLoRA.attach(fresh_model, factors, fraction=1.0)
    zero = torch.zeros(1, adapter.solution_length)
    for i, (mod, f) in enumerate(zip(adapter.modules, factors)):
        A, B = mod.rebuild(*(v[0] for v in adapter.values(zero, i)))  # [r, n_in], [n_out, r]
        torch.testing.assert_close((B @ A).double(), f.B @ f.A, atol=1e-5, rtol=1e-4)


def test_zero_factor_gets_orthonormal_random_vectors():
    U, S, Vh = _svd_factor(torch.zeros(32, 4, dtype=torch.float64), seed=3)  # [32, 4], [4], [4, 4]
    assert torch.all(S == 0)
    torch.testing.assert_close(U.T @ U, torch.eye(4, dtype=torch.float64))
    assert (U.abs() > 1e-3).sum() > 4 * 4, "U must not be the axis-aligned identity block"


@pytest.mark.parametrize("rank,fraction,k", [(4, 1.0, 4), (4, 0.5, 2), (8, 0.3, 2), (2, 0.5, 1)])
def test_layout_and_solution_length(fresh_model, rank, fraction, k):
    adapter = SVDLoRA.attach(fresh_model, sft_like_factors(fresh_model, rank), fraction=fraction)
    num_matrices = 2 * 4  # 2 layers x q,k,v,o
    assert adapter.k == k
    assert adapter.solution_length == num_matrices * 2 * k
    # Offset j moves exactly one singular value of one factor: matrix j // 2k, A if j % 2k < k else B.
    for j in [0, k - 1, k, 2 * k - 1, 2 * k, adapter.solution_length - 1]:
        off = torch.zeros(1, adapter.solution_length)
        off[0, j] = 1.0
        i, pos = divmod(j, 2 * k)
        for m in range(len(adapter.modules)):
            s_A, s_B = adapter.values(off, m)
            dA, dB = s_A[0] - adapter.modules[m].s_A, s_B[0] - adapter.modules[m].s_B
            expect_A = torch.zeros(rank)
            expect_B = torch.zeros(rank)
            if m == i:
                (expect_A if pos < k else expect_B)[pos % k] = 1.0
            torch.testing.assert_close(dA, expect_A)
            torch.testing.assert_close(dB, expect_B)


def test_zero_searched_values_is_an_error(fresh_model):
    with pytest.raises(ValueError, match="no singular value to search"):
        SVDLoRA.attach(fresh_model, sft_like_factors(fresh_model, 4), fraction=0.1)


def test_adapter_changes_outputs_and_clear_restores_base(fresh_model):
    ids = torch.arange(12).reshape(2, 6)  # [rows, T]
    base = fresh_model(ids).logits
    adapter = SVDLoRA.attach(fresh_model, sft_like_factors(fresh_model, 4), fraction=1.0)
    weights = {n: p.clone() for n, p in fresh_model.named_parameters()}
    adapter.set_candidates(np.zeros((1, adapter.solution_length)))
    with_sft = fresh_model(ids).logits
    assert not torch.allclose(with_sft, base)
    adapter.clear()
    torch.testing.assert_close(fresh_model(ids).logits, base)
    for n, p in fresh_model.named_parameters():
        assert torch.equal(p, weights[n]), f"base weight {n} was modified"


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_searched_values_follow_the_solution_layout(fresh_model, fraction):
    """Offsets equal to minus searched_values() zero exactly the searched singular values and nothing else."""
    adapter = SVDLoRA.attach(fresh_model, sft_like_factors(fresh_model, 4), fraction=fraction)
    values = adapter.searched_values()  # [solution_length]
    assert values.shape == (adapter.solution_length,) and np.all(values > 0)
    off = -torch.as_tensor(values, dtype=torch.float32)[None]  # [1, solution_length]
    k = adapter.k
    for i, m in enumerate(adapter.modules):
        s_A, s_B = adapter.values(off, i)  # [1, r] each
        torch.testing.assert_close(s_A[0, :k], torch.zeros(k), atol=1e-6, rtol=0)
        torch.testing.assert_close(s_B[0, :k], torch.zeros(k), atol=1e-6, rtol=0)
        torch.testing.assert_close(s_A[0, k:], m.s_A[k:])
        torch.testing.assert_close(s_B[0, k:], m.s_B[k:])
