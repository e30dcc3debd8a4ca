"""SVD-LoRA: frozen singular vectors, searched singular values, one value set per batch row.

    adapter = SVDLoRA.attach(model, factors, fraction=1.0)   # factors from load_lora_factors/fresh_lora_factors
    adapter.set_candidates(offsets)                           # offsets [C, solution_length]; rows = C x P
    adapter.set_rows(rows)                                    # or: row i uses candidate rows[i] (rows dropped)
    ...model.generate(...)                                     # row c*P + p uses candidate c
    adapter.clear()                                            # plain base model again

Per adapted matrix (paper sec. 3.2, Alg. 1 lines 2-6), with the LoRA scale folded into B::

    A = U_A diag(s_A) V_A^T     A [r, n_in]:  U_A [r, r], s_A [r], V_A [n_in, r]
    B = U_B diag(s_B) V_B^T     B [n_out, r]: U_B [n_out, r], s_B [r], V_B [r, r]
    y = base(x) + U_B (s_B * (M (s_A * (V_A^T x))))   with M = V_B^T U_A  [r, r]

Solution layout: matrices in model order (layer 0 q,k,v,o, layer 1 ...); matrix i owns the contiguous
slice [2*k*i, 2*k*(i+1)): first the k offsets of s_A's top-k values, then those of s_B, where
k = floor(fraction * r). Hence ``solution_length = num_matrices * 2 * k``. Values below the top k stay
at their SFT values. A candidate is the offset vector; offsets 0 reproduce the SFT adapter exactly.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from torch import nn

from essa_mpi.config import searched_per_factor


@dataclass
class LoraFactors:
    """One module's LoRA factors with the scale folded in: delta_W = B @ A."""

    name: str
    A: torch.Tensor  # [r, n_in]
    B: torch.Tensor  # [n_out, r], already multiplied by the LoRA scale


def target_names(model: nn.Module, targets: list) -> list:
    """Module paths whose last component is in targets, in model order."""
    names = [n for n, m in model.named_modules() if n.split(".")[-1] in targets and hasattr(m, "in_features")]
    if not names:
        raise ValueError(f"no module of the model matches adapter.target_modules={targets}; check the names "
                         f"(e.g. q_proj,k_proj,v_proj,o_proj for Llama/Qwen).")
    return names


def fresh_lora_factors(model: nn.Module, targets: list, rank: int, alpha: float, seed: int) -> list:
    """PEFT's default init, seeded: A Kaiming-uniform(a=sqrt(5)), B zero."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name in target_names(model, targets):
        mod = model.get_submodule(name)
        bound = 1.0 / math.sqrt(mod.in_features)  # kaiming_uniform_(a=sqrt(5)) on [r, n_in]
        A = (torch.rand(rank, mod.in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
        B = torch.zeros(mod.out_features, rank, dtype=torch.float64)
        out.append(LoraFactors(name, A, B * (alpha / rank)))
    return out


def load_lora_factors(model: nn.Module, path: str, targets: list, rank: int) -> list:
    """Read a PEFT adapter directory (adapter_config.json + adapter_model.safetensors|.bin)."""
    with open(os.path.join(path, "adapter_config.json")) as fh:
        conf = json.load(fh)
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        weights = load_file(st)
    else:
        weights = torch.load(os.path.join(path, "adapter_model.bin"), map_location="cpu", weights_only=True)
    r, alpha = conf["r"], conf.get("lora_alpha", conf["r"])
    scale = alpha / math.sqrt(r) if conf.get("use_rslora") else alpha / r
    by_module = {}
    for key, value in weights.items():
        for part in ("lora_A", "lora_B"):
            tag = f".{part}."
            if tag in key:
                module = key.split(tag)[0].removeprefix("base_model.model.")
                by_module.setdefault(module, {})[part] = value.to(torch.float64)
    out = []
    for name in target_names(model, targets):
        if name not in by_module or len(by_module[name]) != 2:
            raise ValueError(f"adapter at {path!r} has no lora_A/lora_B for module {name}; it was trained for "
                             f"another model or other target_modules.")
        A, B = by_module[name]["lora_A"], by_module[name]["lora_B"]  # [r, n_in], [n_out, r]
        if A.shape[0] != rank:
            raise ValueError(f"adapter at {path!r}: {name} has rank {A.shape[0]}, adapter.rank={rank}.")
        out.append(LoraFactors(name, A, B * scale))
    return out


def _svd_factor(X: torch.Tensor, seed: int) -> tuple:
    """Thin SVD in float64 on CPU (identical on every rank). A zero factor (fresh B) has no preferred
    singular vectors: any orthonormal pair is a valid SVD, so we take a seeded random one instead of the
    solver's axis-aligned choice, which would confine the search to the first r output coordinates."""
    X = X.to(torch.float64).cpu()
    if torch.count_nonzero(X) == 0:
        gen = torch.Generator().manual_seed(seed)
        U, _ = torch.linalg.qr(torch.randn(X.shape[0], min(X.shape), generator=gen, dtype=torch.float64))
        Vh, _ = torch.linalg.qr(torch.randn(X.shape[1], min(X.shape), generator=gen, dtype=torch.float64))
        return U, torch.zeros(min(X.shape), dtype=torch.float64), Vh.T
    return torch.linalg.svd(X, full_matrices=False)  # U [m, k], S [k], Vh [k, n]


def layer_device(module: nn.Module) -> torch.device:
    """Where a layer's weights live: its first parameter or, for layers that hold buffers only (a GPTQ layer
    without bias: qweight, scales, ... are buffers), its first buffer; the CPU for a layer with neither.

    >>> from essa_mpi.gptq import GPTQLinear
    >>> layer_device(GPTQLinear(64, 64, 1, bias=False, dtype=torch.float32).to("meta"))
    device(type='meta')
    """
    first = next(iter(module.parameters()), None)
    first = next(iter(module.buffers()), None) if first is None else first
    return first.device if first is not None else torch.device("cpu")


class SVDLoRALinear(nn.Module):
    """Wraps a base projection; adds the SVD-LoRA branch with per-candidate singular values.

    Base weights are referenced, never copied, merged or modified (they may be quantized modules).
    """

    def __init__(self, base: nn.Module, f: LoraFactors, seed: int, dev: torch.device) -> None:
        """dev: where the branch runs (``layer_device(base)``; the CPU for a weightless skeleton)."""
        super().__init__()
        self.base = base
        U_A, s_A, Vh_A = _svd_factor(f.A, seed)  # [r, r], [r], [r, n_in]
        U_B, s_B, Vh_B = _svd_factor(f.B, seed + 1)  # [n_out, r], [r], [r, r]
        # The branch runs in fp32 on the base layer's device, whatever the base precision (bf16, int8, int4).
        for name, t in (("V_A", Vh_A.T), ("U_A", U_A), ("Vh_B", Vh_B), ("M_t", (Vh_B @ U_A).T), ("U_B_t", U_B.T),
                        ("s_A", s_A), ("s_B", s_B)):
            self.register_buffer(name, t.float().contiguous().to(dev), persistent=False)
        # V_A [n_in, r], U_A [r, r], Vh_B = V_B^T [r, r], M_t = M^T [r, r], U_B_t [r, n_out], s_A, s_B [r]
        self.folded = None  # [C, r, n_out] per-candidate diag(s_A) M^T diag(s_B) U_B^T, or None
        self.rows = None  # [rows] candidate of each batch row once rows left the batch (set_rows), or None

    def set_values(self, s_A: torch.Tensor, s_B: torch.Tensor) -> None:
        """s_A, s_B [C, r]: candidate c's singular values. Folding the r x n_out product once per call
        (instead of four ops per token) is the same formula, regrouped: (h*s_A) M^T * s_B U_B^T = h W_c."""
        W = s_A[:, :, None] * self.M_t[None] * s_B[:, None, :]  # [C, r, r]
        self.folded = W @ self.U_B_t  # [C, r, n_out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # [rows, T, n_out]
        if self.folded is None:
            return y
        C, r, n_out = self.folded.shape
        rows = x.shape[0]
        h = x.to(self.V_A.dtype) @ self.V_A  # V_A^T x: [rows, T, r]
        if self.rows is None:  # candidate-major in equal groups: candidate c's rows are contiguous
            assert rows % C == 0, f"{rows} rows do not split into {C} candidates"
            W, groups = self.folded, C  # [C, r, n_out]
        else:  # rows left the batch (decode.greedy): row i uses candidate rows[i]
            W, groups = self.folded.index_select(0, self.rows), rows  # [rows, r, n_out]
        h = h.reshape(groups, -1, r)  # [groups, rows/groups*T, r]
        if y.dtype == h.dtype and y.is_contiguous():  # accumulate into the base output we own: no new tensor
            y.view(groups, -1, n_out).baddbmm_(h, W)  # [groups, rows/groups*T, n_out]
            return y  # [rows, T, n_out]
        out = torch.baddbmm(y.reshape(groups, -1, n_out).to(h.dtype), h, W)  # [groups, rows/groups*T, n_out]
        return out.reshape(y.shape).to(y.dtype)  # [rows, T, n_out]

    def rebuild(self, s_A: torch.Tensor, s_B: torch.Tensor) -> tuple:
        """Alg. 1, line 11.1 / 16: A' = U_A diag(s_A) V_A^T [r, n_in], B' = U_B diag(s_B) V_B^T [n_out, r].

        The SFT singular values rebuild the SFT factors (offsets 0 reproduce the adapter):

        >>> g = torch.Generator().manual_seed(0)
        >>> f = LoraFactors("q", torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g))  # A [2, 6], B [5, 2]
        >>> layer = SVDLoRALinear(nn.Linear(6, 5), f, seed=0, dev=torch.device("cpu"))
        >>> A, B = layer.rebuild(layer.s_A, layer.s_B)
        >>> torch.allclose(A, f.A, atol=1e-5), torch.allclose(B, f.B, atol=1e-5)
        (True, True)
        """
        A = (self.U_A * s_A[None, :]) @ self.V_A.T  # [r, n_in]
        B = (self.U_B_t.T * s_B[None, :]) @ self.Vh_B  # [n_out, r] (LoRA scale still folded in)
        return A, B


class SVDLoRA:
    """All adapted modules of one model plus the solution layout."""

    def __init__(self, model: nn.Module, modules: list, bases: list, k: int) -> None:
        self.model, self.modules, self.bases, self.k = model, modules, bases, k

    @classmethod
    def attach(cls, model: nn.Module, factors: list, fraction: float, seed: int = 0) -> SVDLoRA:
        r = factors[0].A.shape[0]
        k = searched_per_factor(fraction, r)
        if k == 0:
            raise ValueError(f"fraction={fraction} of rank {r} leaves no singular value to search.")
        modules, bases = [], []
        skeleton = all(p.is_meta for p in model.parameters())  # model.engine=vllm: no weights here, branch on CPU
        for i, f in enumerate(factors):
            parent_name, _, child = f.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            base = getattr(parent, child)
            wrapped = SVDLoRALinear(base, f, seed + 2 * i, torch.device("cpu") if skeleton else layer_device(base))
            setattr(parent, child, wrapped)
            modules.append(wrapped)
            bases.append(f)
        return cls(model, modules, bases, k)

    @property
    def rank(self) -> int:
        return self.modules[0].s_A.shape[0]

    @property
    def solution_length(self) -> int:
        """num_matrices * 2 * floor(fraction * r) (paper, Fig. 1)."""
        return len(self.modules) * 2 * self.k

    def values(self, offsets: torch.Tensor, i: int) -> tuple:
        """Singular values of matrix i for offsets [C, solution_length] → s_A, s_B [C, r]."""
        m, k, r = self.modules[i], self.k, self.rank
        base = 2 * k * i
        pad = (0, r - k)
        offsets = offsets.to(m.s_A.device)  # a rank spread over several GPUs: each layer on its own device
        s_A = m.s_A + nn.functional.pad(offsets[:, base: base + k], pad)  # [C, r]
        s_B = m.s_B + nn.functional.pad(offsets[:, base + k: base + 2 * k], pad)  # [C, r]
        return s_A, s_B

    def searched_values(self):
        """The SFT singular values the offsets move, in solution layout: [solution_length] float64 numpy."""
        k = self.k
        parts = [torch.cat([m.s_A[:k], m.s_B[:k]]) for m in self.modules]  # num_matrices x [2k]
        return torch.cat(parts).double().cpu().numpy()  # [num_matrices * 2k]

    @torch.no_grad()
    def set_candidates(self, offsets) -> None:
        """offsets [C, solution_length] (numpy or torch); batch rows c*P..c*P+P-1 use candidate c."""
        dev = self.modules[0].V_A.device
        offsets = torch.as_tensor(offsets, dtype=torch.float32, device=dev)
        assert offsets.ndim == 2 and offsets.shape[1] == self.solution_length
        for i, m in enumerate(self.modules):
            m.set_values(*self.values(offsets, i))

    def set_rows(self, rows: torch.Tensor | None) -> None:
        """rows [R] long: batch row i uses candidate rows[i] (after finished rows left the batch, decode.greedy);
        None: rows c*P..c*P+P-1 use candidate c (set_candidates' layout)."""
        for m in self.modules:
            m.rows = None if rows is None else rows.to(m.V_A.device)

    def clear(self) -> None:
        for m in self.modules:
            m.folded, m.rows = None, None

    def digest(self) -> str:
        """16 hex digits of sha256 over every module's frozen bases and singular values (what a resumed run
        must share with the run that wrote the checkpoint)."""
        import hashlib

        h = hashlib.sha256()
        for m in self.modules:
            for name in ("V_A", "U_A", "Vh_B", "U_B_t", "s_A", "s_B"):
                h.update(getattr(m, name).detach().cpu().numpy().tobytes())
        return h.hexdigest()[:16]
