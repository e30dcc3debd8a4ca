"""GPTQ INT4 checkpoints on any device: load the common Hugging Face format, and quantize a model.

    model = load_gptq_model("runs/smollm2-gptq", torch.float32, torch.device("cpu"))
    python -m essa_mpi quantize --out runs/smollm2-gptq          # GPTQ-quantize the embedded model (CPU)

Why not a library: auto-gptq (the user's choice) is archived, and its only wheel is built for CUDA and an
old torch; its successor GPTQModel (which transformers now calls for GPTQ) needs torch >= 2.14.1 and
compiled extensions, so neither runs with the torch this project pins on a CPU (README, "Quantized
ranks"). This module is the small part we need, in plain torch:

- Format (AutoGPTQ/GPTQModel ``checkpoint_format: gptq``, what hub GPTQ checkpoints use): per linear layer
  ``qweight`` int32 [in/8, out] (eight 4-bit values per int32, input index 8*i + j in bits 4j..4j+3),
  ``qzeros`` int32 [groups, out/8] (zero point minus one, same packing along out), ``scales`` fp16
  [groups, out], ``g_idx`` int32 [in] (group of each input channel); W = scales[g] * (q - (qzeros[g] + 1)).
- Quantization: GPTQ (Frantar et al., 2023, Alg. 1): per layer, columns quantized in order with the
  inverse-Hessian error feedback, H = 2 X X^T from calibration inputs, 4 bits, asymmetric min-max
  groups of ``group_size`` input channels, layers processed in model order so each sees its quantized
  predecessors' outputs.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # [8] bit offsets of the eight 4-bit values in an int32


def unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 tensor with eight 4-bit values per element along ``dim`` → uint values 0..15, 8x longer there.

    >>> unpack(pack(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]]), dim=1), dim=1).tolist()
    [[1, 2, 3, 4, 5, 6, 7, 15]]
    """
    p = packed.movedim(dim, -1)  # [..., n/8]
    vals = (p[..., None] >> SHIFTS.to(p.device)) & 15  # [..., n/8, 8]
    return vals.reshape(*p.shape[:-1], -1).movedim(-1, dim)  # 8x longer along dim


def pack(values: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of ``unpack``: values 0..15 (length along dim divisible by 8) → int32, 8x shorter there."""
    v = values.to(torch.int64).movedim(dim, -1)  # [..., n]
    v = v.reshape(*v.shape[:-1], -1, 8) << SHIFTS.to(torch.int64)  # [..., n/8, 8]
    out = v.sum(-1)  # [..., n/8], fits in 32 bits
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)  # two's complement like the format
    return out.movedim(-1, dim)


class GPTQLinear(nn.Module):
    """A 4-bit GPTQ linear layer. Decoding steps (one new token per row) run PyTorch's fused int4 matmul
    (``int4_kernel``: no dequantized copy of the weight); prefill and layers the kernel cannot take dequantize
    the weight on the fly in the compute dtype. Measured on this CPU, SmolLM2's layers (tools/results/README.md,
    "GPTQ kernels"): the fused op takes 0.01x the time at 1 row, 0.8-1.2x at 768 rows and 2-3x at 8k-30k rows,
    so it is used where rows are few (decoding), never for prefill; on CUDA torchao's table for the same
    tinygemm kernel shows the same shape (fast at M <= 64, slower past ~128). Choosing by phase, not by row
    count, keeps a row's arithmetic independent of how many rows a rank holds (rank-count invariance)."""

    def __init__(self, in_features: int, out_features: int, groups: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, dtype
        self.register_buffer("qweight", torch.zeros(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.kernel: dict = {}  # device -> (packed weight, scales_and_zeros, group size), or None where unusable

    def dequantize(self) -> torch.Tensor:
        q = unpack(self.qweight, dim=0)  # [in, out]
        zeros = unpack(self.qzeros, dim=1) + 1  # [groups, out]; the format stores zero - 1
        g = self.g_idx.long()  # [in]
        W = (q - zeros[g]).to(self.compute_dtype) * self.scales[g].to(self.compute_dtype)  # [in, out]
        return W.T  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[1] == 1:  # a decoding step: [rows, 1, in]
            packed = self.fused(x.device)
            if packed is not None:
                y = int4_matmul(x.reshape(-1, self.in_features), *packed)  # [rows, out] bf16
                y = y.reshape(*x.shape[:-1], self.out_features).to(self.compute_dtype)  # [rows, 1, out]
                return y if self.bias is None else y + self.bias
        return nn.functional.linear(x.to(self.compute_dtype), self.dequantize(), self.bias)

    def fused(self, device: torch.device):
        """This layer packed for ``int4_kernel`` on device (made once per device), checked once against the
        dequantized weight; None where the kernel cannot be used (act-order g_idx, odd group size, shapes)."""
        if device not in self.kernel:
            self.kernel[device] = None
            packed = int4_pack(self)
            if packed is not None and device.type in INT4_OPS:
                gen = torch.Generator(device).manual_seed(0)  # not the global RNG: eval's sampling is seeded
                probe = torch.randn(4, self.in_features, device=device, dtype=torch.bfloat16, generator=gen)  # [4, in]
                ref = nn.functional.linear(probe, self.dequantize().to(torch.bfloat16))  # [4, out]
                try:
                    got = int4_matmul(probe, *packed)
                    ok = (got.float() - ref.float()).abs().max() <= 0.02 * ref.float().abs().max() + 1e-3
                except RuntimeError:
                    ok = False
                if ok:
                    self.kernel[device] = packed
                else:
                    import warnings

                    warnings.warn(f"GPTQ: PyTorch's fused int4 matmul disagrees with the dequantized weight on "
                                  f"{device.type}; this layer dequantizes on every call instead (slower, same "
                                  f"results)", stacklevel=2)
        return self.kernel[device]


INT4_OPS = {  # device type -> (pack: (q [out, in] 0..15, inner_k_tiles) -> packed, matmul)
    "cpu": (lambda q, tiles: torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1),
            lambda x, w, g, sz: torch._weight_int4pack_mm_for_cpu(x, w, g, sz)),
    # CUDA (tinygemm): two values per byte, the first in the high nibble, [out, in/2] uint8
    "cuda": (lambda q, tiles: torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), tiles),
             lambda x, w, g, sz: torch._weight_int4pack_mm(x, w, g, sz)),
}


def int4_pack(layer: GPTQLinear):
    """(packed weight, scales_and_zeros [groups, out, 2] bf16, group size, device type) for PyTorch's int4
    matmul, which computes W = (q - 8) * scale + zero: GPTQ's scale * (q - z) with zero = scale * (8 - z).
    None where it does not apply: act-order (g_idx not in order), group size not 32/64/128/256, out % 8."""
    n_in, n_out = layer.in_features, layer.out_features
    groups = layer.scales.shape[0]
    size = n_in // groups
    order = torch.arange(n_in, device=layer.g_idx.device) // max(size, 1)
    if size not in (32, 64, 128, 256) or size * groups != n_in or n_out % 8 or not bool((layer.g_idx == order).all()):
        return None
    device = layer.qweight.device
    if device.type not in INT4_OPS:
        return None
    q = unpack(layer.qweight, dim=0).T.contiguous()  # [out, in] 0..15
    z = (unpack(layer.qzeros, dim=1) + 1).float()  # [groups, out]
    scale = layer.scales.to(torch.bfloat16)  # [groups, out]
    zero = (scale.float() * (8 - z)).to(torch.bfloat16)  # [groups, out]
    tiles = next(t for t in (8, 4, 2, 1) if n_in % (16 * t) == 0)
    pack_fn = INT4_OPS[device.type][0]
    return pack_fn(q, tiles), torch.stack([scale, zero], -1).contiguous(), size, device.type  # sz: [groups, out, 2]


def int4_matmul(x: torch.Tensor, packed, scales_zeros, size: int, kind: str) -> torch.Tensor:
    """x [rows, in] → [rows, out] bf16 through the fused int4 kernel of ``kind`` ('cpu' or 'cuda')."""
    return INT4_OPS[kind][1](x.to(torch.bfloat16).contiguous(), packed, size, scales_zeros)


def densify(model: nn.Module) -> nn.Module:
    """Swap every GPTQLinear for an nn.Linear holding its dequantized weight (same outputs, dense memory).
    For LoRA SFT on a GPTQ base: PEFT only wraps the GPTQ layers of gptqmodel/auto-gptq, not ours."""
    for name, module in list(model.named_modules()):
        if isinstance(module, GPTQLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                              dtype=module.compute_dtype, device=module.qweight.device)
            dense.weight.data = module.dequantize().contiguous()  # [out, in]
            if module.bias is not None:
                dense.bias.data = module.bias.data
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, dense.requires_grad_(False))
    return model


KERNEL_PACKAGE = "gptqmodel"  # what transformers' GPTQ integration calls for its CUDA kernels


def gptq_backend(device: torch.device) -> str:
    """'gptqmodel' (transformers' GPTQ integration, fused CUDA kernels) on a CUDA rank where the package is
    importable; else 'torch' (GPTQLinear: PyTorch's fused int4 matmul for decoding, dequantize for prefill).

    >>> gptq_backend(torch.device("cpu"))
    'torch'
    """
    import importlib.util

    if device.type == "cuda" and importlib.util.find_spec(KERNEL_PACKAGE) is not None:
        return KERNEL_PACKAGE
    return "torch"


def load_gptq_model(path: str, dtype: torch.dtype, device: torch.device, spread: dict | None = None) -> nn.Module:
    """A causal LM from a GPTQ checkpoint directory (config.json with quantization_config + safetensors),
    on ``device``, or over the GPUs of ``spread`` (accelerate max_memory). ``model.gptq_backend`` names the
    kernels used (``gptq_backend``)."""
    from transformers import AutoModelForCausalLM

    backend = gptq_backend(device)
    if backend == KERNEL_PACKAGE:
        device_map = "auto" if spread else {"": device}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, max_memory=spread)
    else:
        model = _load_plain(path, dtype)
        if spread:
            from accelerate import dispatch_model, infer_auto_device_map

            device_map = infer_auto_device_map(model, max_memory=spread,
                                               no_split_module_classes=model._no_split_modules)
            model = dispatch_model(model, device_map=device_map)
        else:
            model = model.to(device)
    model.gptq_backend = backend
    return model


def _load_plain(path: str, dtype: torch.dtype) -> nn.Module:
    """The checkpoint with every quantized linear layer as a GPTQLinear, on the CPU."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    qc = getattr(config, "quantization_config", None) or {}
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("quant_method") != "gptq" or qc.get("bits") != 4:
        raise ValueError(f"model.precision=gptq but {path} is not a 4-bit GPTQ checkpoint (quantization_config="
                         f"{qc or None}); point model.name_or_path at one (python -m essa_mpi quantize makes one).")
    if qc.get("checkpoint_format", "gptq") != "gptq":
        raise ValueError(f"{path}: GPTQ checkpoint_format {qc['checkpoint_format']!r} is not supported; use 'gptq'.")
    del config.quantization_config  # we build plain modules and swap in GPTQLinear ourselves
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    state = {k: v for f in files for k, v in load_file(os.path.join(path, f)).items()}
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".qweight")}):
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        new = GPTQLinear(old.in_features, old.out_features, state[f"{name}.scales"].shape[0], old.bias is not None,
                         dtype)
        setattr(model.get_submodule(parent), child, new)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"{path} does not match its config: missing {missing[:4]}, unexpected {unexpected[:4]}.")
    model.tie_weights()
    return model


def save_gptq_metadata(out_dir: str, group_size: int) -> None:
    """Add the GPTQ quantization_config to a saved config.json."""
    path = os.path.join(out_dir, "config.json")
    with open(path) as fh:
        config = json.load(fh)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False,
                                     "sym": False, "checkpoint_format": "gptq"}
    with open(path, "w") as fh:
        json.dump(config, fh, indent=1)


def gptq_quantize(W: torch.Tensor, H: torch.Tensor, group_size: int, damp: float = 0.01) -> tuple:
    """GPTQ (Frantar et al., 2023, Alg. 1) for one weight W [out, in] with Hessian H = 2 X X^T [in, in].

    → (q [out, in] ints 0..15, scales [groups, out], zeros [groups, out] ints), W ≈ scales[g] * (q - zeros[g]).
    """
    W = W.to(torch.float64).clone()  # [out, in]
    H = H.to(torch.float64).clone()  # [in, in]
    n_in = W.shape[1]
    dead = torch.diag(H) == 0
    H[dead, dead], W[:, dead] = 1.0, 0.0
    H += damp * torch.diag(H).mean() * torch.eye(n_in, dtype=H.dtype)  # dampening (sec. 4, "Cholesky")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)  # [in, in]
    q = torch.zeros_like(W, dtype=torch.int64)  # [out, in]
    scales, zeros = [], []
    for start in range(0, n_in, group_size):
        end = min(start + group_size, n_in)
        Wg = W[:, start:end]  # [out, g], already carries the error feedback of earlier columns
        lo, hi = Wg.min(1).values.clamp(max=0), Wg.max(1).values.clamp(min=0)  # [out]
        scale = ((hi - lo) / 15).clamp(min=1e-10)  # [out]
        zero = torch.round(-lo / scale).clamp(0, 15)  # [out]
        scales.append(scale)
        zeros.append(zero)
        err_block = torch.zeros_like(Wg)  # [out, g]
        for i in range(end - start):
            col, d = start + i, Hinv[start + i, start + i]
            qi = torch.clamp(torch.round(W[:, col] / scale) + zero, 0, 15)  # [out]
            q[:, col] = qi.to(torch.int64)
            err = (W[:, col] - scale * (qi - zero)) / d  # [out]
            W[:, col:end] -= err[:, None] * Hinv[col, col:end][None, :]  # Alg. 1: update the rest of the group
            err_block[:, i] = err
        W[:, end:] -= err_block @ Hinv[start:end, end:]  # lazy batch update of later columns
    return q, torch.stack(scales), torch.stack(zeros).to(torch.int64)  # [out, in], [groups, out], [groups, out]


def to_gptq_tensors(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> dict:
    """GPTQ ints → the checkpoint tensors qweight, qzeros, scales, g_idx (see the module docstring)."""
    n_in = q.shape[1]
    return {"qweight": pack(q.T, dim=0),  # [in/8, out]
            "qzeros": pack(zeros - 1 & 15, dim=1),  # [groups, out/8]; the format stores zero - 1 (mod 16)
            "scales": scales.to(torch.float16),  # [groups, out]
            "g_idx": (torch.arange(n_in) // group_size).to(torch.int32)}  # [in]


@torch.no_grad()
def quantize_model(model: nn.Module, calib: list, group_size: int = 128, log=print) -> dict:
    """GPTQ every linear layer of the decoder blocks, block by block, on calibration batches
    (dicts of input_ids/attention_mask). Earlier blocks are replaced by their quantized weights before
    later blocks collect inputs. → {module name: GPTQ tensors}; the model's weights become dequantized."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    blocks = sorted({n.split(".layers.")[0] + ".layers." + n.split(".layers.")[1].split(".")[0] for n in names},
                    key=lambda b: int(b.rsplit(".", 1)[1]))
    out = {}
    for block in blocks:
        mine = [n for n in names if n.startswith(block + ".")]
        H = {n: 0.0 for n in mine}
        count = {n: 0 for n in mine}

        def hook(name, H=H, count=count):  # this block's sums, bound now (the loop rebinds the names)
            def add(_mod, inputs, _out):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).to(torch.float64)  # [tokens, in]
                H[name] = H[name] + 2 * x.T @ x
                count[name] += x.shape[0]
            return add

        handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in mine]
        for batch in calib:
            model(**batch)
        for h in handles:
            h.remove()
        for n in mine:
            lin = model.get_submodule(n)
            q, scales, zeros = gptq_quantize(lin.weight.data, H[n] / max(count[n], 1), group_size)
            out[n] = to_gptq_tensors(q, scales, zeros, group_size)
            g = torch.arange(lin.in_features) // group_size
            lin.weight.data = (scales[g].T * (q - zeros[g].T)).to(lin.weight.dtype)  # [out, in] dequantized
        log(f"GPTQ: {block} ({len(mine)} layers) done")
    return out
