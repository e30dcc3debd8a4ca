"""Evolved singular values → a normal PEFT LoRA adapter directory (Alg. 1, line 16).

    export_adapter(adapter, solution, "runs/essa/adapter", lora_alpha=8.0)
    # then: PeftModel.from_pretrained(base_model, "runs/essa/adapter")

Writes ``adapter_config.json`` (peft.LoraConfig) and ``adapter_model.safetensors`` with
A' = U_A diag(s_A) V_A^T and B' = U_B diag(s_B) V_B^T / scale, where scale = lora_alpha / r was folded
into B when the adapter was decomposed.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from essa_mpi.svd_lora import SVDLoRA


def export_adapter(adapter: SVDLoRA, solution: np.ndarray, out_dir: str, lora_alpha: float,
                   base_model_name: str | None = None) -> None:
    from safetensors.torch import save_file

    from essa_mpi.model import hidden

    with hidden("bitsandbytes"):  # peft imports it when installed (0.7 s here); a config needs none of it
        from peft import LoraConfig

    r = adapter.rank
    scale = lora_alpha / r
    offsets = torch.as_tensor(np.asarray(solution)[None], dtype=torch.float32)  # [1, n]
    tensors = {}
    for i, (mod, f) in enumerate(zip(adapter.modules, adapter.bases)):
        s_A, s_B = adapter.values(offsets.to(mod.V_A.device), i)  # [1, r] each
        A, B = mod.rebuild(s_A[0], s_B[0])  # [r, n_in], [n_out, r]
        tensors[f"base_model.model.{f.name}.lora_A.weight"] = A.float().cpu().contiguous()
        tensors[f"base_model.model.{f.name}.lora_B.weight"] = (B / scale).float().cpu().contiguous()
    targets = sorted({f.name.split(".")[-1] for f in adapter.bases})
    os.makedirs(out_dir, exist_ok=True)
    LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets, lora_dropout=0.0, bias="none",
               task_type="CAUSAL_LM", base_model_name_or_path=base_model_name).save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
