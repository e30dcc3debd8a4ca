"""reward_model: a general-purpose assistant scored by a sequence-classification reward model.

Prompts from ``nvidia/HelpSteer2`` (``prompt``, ``response``; train split for SFT + search, validation
split for validation) or a local JSONL with a ``prompt`` column (and ``response`` for the SFT warm start).
The reward model (``task.reward_model``: any Hugging Face ``AutoModelForSequenceClassification``, e.g.
``RLHFlow/ArmoRM-Llama3-8B-v0.1``) scores the (prompt, response) conversation through its own chat
template, right-padded; the reward is its ``score`` output when it has one (ArmoRM), else ``logits[:, 0]``.
Validation metric: the mean score.

Models whose head lives in their own code (ArmoRM's gating head) need ``task.trust_remote_code=true``;
without it the head's weights would be missing and the scores random, so loading stops with that fix.
"""

from __future__ import annotations

import functools

import torch

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import Task
from essa_mpi.tasks.data import load_rows, require_columns, split_tail

DEFAULT_DATASET = "nvidia/HelpSteer2"
SYSTEM_PROMPT = "You are a helpful, honest, and concise assistant."  # paper, appendix H


class RewardModelScorer:
    """Scores (prompt, response) pairs: ``scorer(completions, prompt=[...]) -> list[float]``.

    The model is loaded on first use, on every rank, on the rank's current CUDA device (device 0 of the
    rank's own GPUs, ``launch.bind_rank``; ``load_model`` sets it) or the CPU.
    """

    def __init__(self, name: str, trust_remote_code: bool, batch_size: int = 8) -> None:
        self.name, self.trust, self.batch_size = name, trust_remote_code, batch_size

    @functools.cached_property
    def model_and_tokenizer(self) -> tuple:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from essa_mpi.modelfiles import local_path

        path = local_path(self.name)  # the hub snapshot or node-local copy (stage.py)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=self.trust)
        tok.padding_side = "right"  # ArmoRM-style heads read the last non-pad token counted from the left
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=self.trust, output_loading_info=True)
        missing = [k for k in info.get("missing_keys", []) if "score" in k or "head" in k or "regression" in k]
        if missing:
            raise ValueError(f"reward model {self.name}: head weights {missing[:3]} not found, so its scores would "
                             f"be random; this model ships its own head code (e.g. ArmoRM): set "
                             f"task.trust_remote_code=true, or use a standard sequence-classification model.")
        model.config.pad_token_id = tok.pad_token_id
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        return model.to(device).eval().requires_grad_(False), tok

    def texts(self, completions: list, prompts: list) -> list:
        _, tok = self.model_and_tokenizer
        convs = [[{"role": "user", "content": p}, {"role": "assistant", "content": c}]
                 for p, c in zip(prompts, completions)]
        if tok.chat_template:
            return [tok.apply_chat_template(m, tokenize=False) for m in convs]
        return [f"{p}\n\n{c}" for p, c in zip(prompts, completions)]

    @torch.no_grad()
    def __call__(self, completions: list, prompt: list, **_) -> list:
        model, tok = self.model_and_tokenizer
        texts, out = self.texts(completions, prompt), []
        for i in range(0, len(texts), self.batch_size):
            enc = tok(texts[i: i + self.batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            res = model(**{k: v.to(model.device) for k, v in enc.items()})
            score = getattr(res, "score", None)
            score = res.logits[:, 0] if score is None else score.reshape(len(enc["input_ids"]), -1)[:, 0]  # [b]
            out += score.float().cpu().tolist()
        return out


def build(cfg: TaskConfig, seed: int) -> Task:
    src = cfg.dataset or DEFAULT_DATASET
    rows = load_rows(src, "train")
    require_columns(rows, ["prompt"], f"task.dataset={src}")
    if cfg.val_dataset:
        val_rows = load_rows(cfg.val_dataset, "validation")
    elif src == DEFAULT_DATASET:
        val_rows = load_rows(src, "validation")
    else:
        rows, val_rows = split_tail(rows, cfg.val_size, f"task.dataset={src}")
    require_columns(val_rows or rows, ["prompt"], "reward_model validation data")
    sft = [{"prompt": r["prompt"], "completion": r["response"]} for r in rows[: cfg.sft_size] if r.get("response")]
    unique = lambda rs: [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in rs)]  # noqa: E731
    return Task(train=unique(rows[len(sft):]), val=unique(val_rows)[: cfg.val_size], system_prompt=SYSTEM_PROMPT,
                reward=RewardModelScorer(cfg.reward_model, cfg.trust_remote_code), sft=sft)
