"""Quantized ranks: every precision loads, the SVD-LoRA branch acts on top of it, and a run completes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_cli_mpi import ENV, history, metrics, mpirun
from tiny import save_tiny

from essa_mpi.config import PRECISIONS, ModelConfig
from essa_mpi.memory import loaded_bytes, trim_host_memory
from essa_mpi.model import load_model
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
ROOT = os.path.dirname(os.path.dirname(__file__))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny Llama wide enough for NF4's 64-value blocks, and its GPTQ checkpoint (python -m essa_mpi quantize)."""
    base = save_tiny(str(tmp_path_factory.mktemp("tiny64")), hidden=64)
    gptq = str(tmp_path_factory.mktemp("tiny64_gptq"))
    res = subprocess.run([sys.executable, "-m", "essa_mpi", "quantize", "--model", base, "--out",
                          gptq, "--task", "toy", "--samples", "32", "--group-size", "32"],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return {p: gptq if p == "gptq" else base for p in PRECISIONS}


def load(model_dirs, precision):
    return load_model(ModelConfig(name_or_path=model_dirs[precision], precision=precision, device="cpu"))


@pytest.mark.parametrize("precision", PRECISIONS)
def test_precision_loads_with_its_layer_type_and_size(model_dirs, precision):
    model, _ = load(model_dirs, precision)
    layer = type(model.model.layers[0].self_attn.q_proj).__name__
    assert layer == {"fp32": "Linear", "bf16": "Linear", "int8": "Linear8bitLt", "int4": "Linear4bit",
                     "gptq": "GPTQLinear"}[precision]
    full = loaded_bytes(load(model_dirs, "fp32")[0])
    assert loaded_bytes(model) < (1.0 if precision == "fp32" else 0.6) * full + 1


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_weight_bytes_count_the_bitsandbytes_constants(model_dirs, precision):
    layer = load(model_dirs, precision)[0].model.layers[0].self_attn.q_proj
    packed = layer.weight.numel() * layer.weight.element_size()
    scales = 64 * 4  # fp32: int8 one per row; NF4 absmax one per 64-value block (64x64 weight)
    assert loaded_bytes(layer) >= packed + scales


@pytest.mark.parametrize("precision", PRECISIONS)
def test_lm_head_gets_contiguous_input_in_generate(model_dirs, precision):
    """generate() hands the head a strided slice; on CPU a bf16 linear on it is ~500x slower (model.py)."""
    model, tok = load(model_dirs, precision)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous()))
    ids = tok(["Write words: apple", "Write many words: river and sea"], return_tensors="pt", padding=True)
    model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
    assert seen and all(seen)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_adapter_branch_on_quantized_base(model_dirs, precision):
    model, tok = load(model_dirs, precision)
    ids = tok(["Write words: apple", "Write words: river"], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**ids).logits.float()
        adapter = SVDLoRA.attach(model, fresh_lora_factors(model, TARGETS, 2, 4.0, seed=0), fraction=1.0)
        adapter.set_candidates(np.zeros((1, adapter.solution_length)))
        same = model(**ids).logits.float()  # fresh B = 0: zero offsets leave the model as it was
        adapter.set_candidates(np.full((1, adapter.solution_length), 0.5))
        moved = model(**ids).logits.float()
        adapter.clear()
        cleared = model(**ids).logits.float()
    assert torch.equal(same, base) and torch.equal(cleared, base)
    assert (moved - base).abs().mean() > 1e-3
    assert adapter.modules[0].V_A.dtype == torch.float32  # the branch stays in fp32 over any base


@pytest.mark.parametrize("precision", PRECISIONS)
def test_short_mpi_run_completes_and_checkpoints(model_dirs, precision, tmp_path):
    out = tmp_path / precision
    res = mpirun(2, [f"model.name_or_path={model_dirs[precision]}", f"model.precision={precision}", "model.device=cpu",
                     "model.threads=1", "adapter.rank=2", "adapter.warm_start=none", "task.name=toy",
                     "task.batch_size=2", "task.val_size=2", "task.max_new_tokens=4", "search.popsize=4",
                     "run.generations=2", "run.progress=false", "task.val_base=false", f"run.output_dir={out}"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert history(str(out)).generation == 2 and f"memory per rank ({precision})" in res.stdout
    loaded = [m for m in metrics(str(out)) if "memory_after_load" in m][0]["memory_after_load"]
    assert loaded["weights_bytes"] > 0 and loaded["peak_rss_bytes"] > loaded["weights_bytes"]
    summary = json.load(open(out / "summary.json"))
    assert summary["generations"] == 2 and list(summary["val_chain"]) == ["start", "ESSA"]  # val_base=false
    assert not any("val_base_reward" in m for m in metrics(str(out)))


def test_gptq_precision_needs_a_gptq_checkpoint(model_dirs):
    with pytest.raises(ValueError, match="not a 4-bit GPTQ checkpoint"):
        load_model(ModelConfig(name_or_path=model_dirs["fp32"], precision="gptq", device="cpu"))


def test_densified_gptq_model_computes_the_same_outputs(model_dirs):
    from essa_mpi.gptq import GPTQLinear, densify

    model, tok = load(model_dirs, "gptq")
    ids = tok(["Write words: apple", "Write words: river"], return_tensors="pt", padding=True)
    with torch.no_grad():
        quantized = model(**ids).logits
        densify(model)
        dense = model(**ids).logits
    assert not any(isinstance(m, GPTQLinear) for m in model.modules())
    torch.testing.assert_close(dense, quantized, rtol=0, atol=0)


def test_gptq_decoding_steps_run_the_fused_int4_kernel_with_the_dequantized_results(model_dirs):
    from essa_mpi.gptq import GPTQLinear

    model, _ = load(model_dirs, "gptq")
    layers = [m for m in model.modules() if isinstance(m, GPTQLinear)]
    calls = []
    real = torch._weight_int4pack_mm_for_cpu
    torch._weight_int4pack_mm_for_cpu = lambda *a: (calls.append(a[0].shape), real(*a))[1]
    try:
        for layer in layers:
            x = torch.randn(6, 1, layer.in_features, dtype=torch.bfloat16)  # [rows, 1, in]: a decoding step
            fused = layer(x)
            slow = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)  # [rows, 1, out]
            torch.testing.assert_close(fused, slow, rtol=0.02, atol=0.02 * slow.abs().max().item())
            layer(torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16))  # prefill: dequantized, not counted
    finally:
        torch._weight_int4pack_mm_for_cpu = real
    assert all(layer.kernel[torch.device("cpu")] is not None for layer in layers)
    assert calls.count(torch.Size([6, layers[0].in_features])) >= 1 and all(s[0] in (4, 6) for s in calls)


def test_gptq_layers_without_bias_keep_every_svd_lora_tensor_on_their_device(model_dirs):
    """A GPTQ layer without bias has buffers only; the branch must follow them (meta stands in for a GPU)."""
    from essa_mpi.gptq import GPTQLinear

    model, _ = load(model_dirs, "gptq")
    for m in model.modules():
        if isinstance(m, GPTQLinear):
            assert m.bias is None
            m.to("meta")  # the layer on a device other than the rest of the model
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, TARGETS, 2, 4.0, seed=0), fraction=1.0)
    for m in adapter.modules:
        assert {t.device.type for t in m.buffers(recurse=False)} == {"meta"}, m


@pytest.mark.parametrize("precision", PRECISIONS)
def test_sft_warm_start_trains_on_the_quantized_base(model_dirs, precision, tmp_path):
    """`model.precision=P` trains its SFT adapter on the P base (QLoRA-style); the adapter loads into SVD-LoRA."""
    from essa_mpi import sft
    from essa_mpi.config import load_config
    from essa_mpi.svd_lora import load_lora_factors
    from essa_mpi.tasks import build_task

    cfg = load_config(None, [f"model.name_or_path={model_dirs[precision]}", f"model.precision={precision}",
                             "model.device=cpu", "adapter.rank=2", "task.name=toy", "task.val_size=2",
                             f"sft.output_dir={tmp_path / 'sft'}", "sft.learning_rate=1e-2"])
    info = sft.train(cfg, build_task(cfg.task, seed=0), cfg.sft.output_dir, log=lambda m: None)
    assert sft.is_done(cfg.sft.output_dir) and info["steps"] > 0
    model, _ = load(model_dirs, precision)
    factors = load_lora_factors(model, cfg.sft.output_dir, cfg.adapter.target_modules, rank=2)
    assert len(factors) == 8 and all(f.B.abs().sum() > 0 for f in factors)  # B moved away from its zero init


def test_trim_host_memory_returns_freed_heap_pages():
    """Freed blocks below the top of the heap stay resident until malloc_trim (the int8 CPU fragmentation)."""
    def resident_mib():
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    blocks = [bytearray(b"\x01" * 100_000) for _ in range(2000)]  # ~190 MiB of heap blocks (below mmap size)
    keep = blocks[-1]  # the top block stays: glibc cannot shrink the heap from the top on its own
    del blocks[:-1]
    fragmented = resident_mib()
    trim_host_memory()
    assert fragmented - resident_mib() > 100, "freed heap pages were not handed back"
    assert keep[0] == 1
