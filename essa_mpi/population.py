"""Evaluate many candidates on one mini-batch in one batched greedy generation.

    ev = PopulationEvaluator(model, tok, adapter, task, max_new_tokens=8, max_rows=256)
    rewards = ev.evaluate(offsets, examples)        # offsets [C, n] → rewards [C] (mean over prompts)

Rows are candidate-major: row c*P + p is prompt p under candidate c, so every candidate sees the same
prompts with the same padding, and greedy outputs equal one-candidate-at-a-time outputs.
"""

from __future__ import annotations

import numpy as np
import torch

from essa_mpi.decode import greedy, unpadded
from essa_mpi.shares import candidate_rewards
from essa_mpi.svd_lora import SVDLoRA
from essa_mpi.tasks import Task, score_rows


def fit_prompts(task: Task, tok, context: int | None, max_new_tokens: int, policy: str) -> str | None:
    """Every training and validation prompt, in its chat template, leaves max_new_tokens of the model's context:
    ValueError naming the first row that does not (policy "refuse"), or that row's prompt cut at the end to fit
    (policy "truncate") → a note with the count, None when all fit (task.long_prompts). Sets task.prompt_tokens
    to the longest prompt's tokens (the memory plan's prompt length)."""
    limit, cut = (context or 2**62) - max_new_tokens, 0
    for split, rows in (("training", task.train), ("validation", task.val)):
        for i, row in enumerate(rows):
            text = tok.apply_chat_template(task.messages(row["prompt"]), tokenize=False, add_generation_prompt=True)
            n = len(tok(text, add_special_tokens=False)["input_ids"])
            task.prompt_tokens = max(task.prompt_tokens, min(n, limit))
            if n <= limit:
                continue
            if policy == "refuse":
                raise ValueError(f"{split} row {i} is {n} tokens with its chat template; with task.max_new_tokens="
                                 f"{max_new_tokens} it exceeds the model's context of {context}; shorten or drop the "
                                 f"row, lower task.max_new_tokens, or set task.long_prompts=truncate.")
            ids = tok(row["prompt"], add_special_tokens=False)["input_ids"]
            keep = len(ids) - (n - limit)
            if keep < 1:  # the template alone, or nearly, fills what max_new_tokens leaves: nothing to keep
                raise ValueError(f"task.long_prompts=truncate cannot fit {split} row {i}: with task.max_new_tokens="
                                 f"{max_new_tokens} the model's context of {context} leaves {max(limit, 0)} tokens, "
                                 f"and its chat template and system prompt take {n - len(ids)} of them; lower "
                                 f"task.max_new_tokens.")
            row["prompt"] = tok.decode(ids[:keep])
            cut += 1
    return f"task.long_prompts=truncate: cut {cut} prompt(s) to fit the context of {context} tokens" if cut else None


class PopulationEvaluator:
    """Turns candidate offset vectors into generations and rewards (the "problem" beside the search)."""

    def __init__(self, model, tokenizer, adapter: SVDLoRA, task: Task, max_new_tokens: int, max_rows: int,
                 share_prefix: bool = False, drop_finished: bool = False) -> None:
        """share_prefix, drop_finished: decode with essa_mpi.decode.greedy (model.share_prefix/drop_finished);
        both False: transformers' generate."""
        from essa_mpi.decode import decoding

        self.model, self.tok, self.adapter, self.task = model, tokenizer, adapter, task
        self.max_rows = max_rows
        self.gen_cfg = decoding(tokenizer, max_new_tokens)  # greedy
        self.share_prefix, self.drop_finished = share_prefix, drop_finished

    def texts(self, examples: list) -> list:
        """Each example's prompt in the task's messages and the model's chat template, ready to generate after."""
        return [self.tok.apply_chat_template(self.task.messages(e["prompt"]), tokenize=False,
                                             add_generation_prompt=True) for e in examples]

    def encode(self, examples: list) -> dict:
        enc = self.tok(self.texts(examples), return_tensors="pt", padding=True, add_special_tokens=False)
        return {k: v.to(self.model.device) for k, v in enc.items()}  # input_ids [P, T]

    @torch.no_grad()
    def generate(self, offsets: np.ndarray | None, enc: dict) -> list:
        """Completions for C candidates x P prompts, candidate-major ([C*P] strings).

        offsets None = the plain base model (no adapter branch), one "candidate".
        """
        C = 1 if offsets is None else len(offsets)
        if offsets is None:
            self.adapter.clear()
        else:
            self.adapter.set_candidates(offsets)
        if self.share_prefix or self.drop_finished:
            prompts = unpadded(enc)  # P token-id lists
            g = self.gen_cfg
            new = greedy(self.model, self.adapter, prompts, C, g.max_new_tokens, g.eos_token_id, g.pad_token_id,
                         self.share_prefix, self.drop_finished)  # C*P lists of token ids
        else:
            ids = enc["input_ids"].repeat(C, 1)  # [C*P, T]
            mask = enc["attention_mask"].repeat(C, 1)  # [C*P, T]
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.gen_cfg)
            new = out[:, ids.shape[1]:]  # [C*P, new]
        self.adapter.clear()
        return self.tok.batch_decode(new, skip_special_tokens=True)

    def completions(self, offsets: np.ndarray, examples: list) -> list:
        """[C*P] completions, generated in groups of whole candidates of at most max_rows rows."""
        enc = self.encode(examples)
        per_call = max(1, self.max_rows // len(examples))
        out = []
        for start in range(0, len(offsets), per_call):
            out += self.generate(offsets[start: start + per_call], enc)
        return out

    def prompt_rewards(self, completions: list, examples: list, num_candidates: int) -> np.ndarray:
        """Task reward of [C*P] candidate-major completions → [C, P] float32 (what a record carries)."""
        r = score_rows(self.task, completions, examples * num_candidates)  # [C*P]
        return r.astype(np.float32).reshape(num_candidates, len(examples))  # [C, P]

    def row_rewards(self, offsets: np.ndarray, examples: list) -> np.ndarray:
        """Generate and score: each candidate's reward on each prompt → [C, P] float32."""
        return self.prompt_rewards(self.completions(offsets, examples), examples, len(offsets))

    def evaluate(self, offsets: np.ndarray, examples: list) -> np.ndarray:
        """Alg. 1, line 11: reward of each candidate on the shared mini-batch → [C] float32."""
        return candidate_rewards(self.row_rewards(offsets, examples))

    def score(self, solution: np.ndarray | None, examples: list) -> dict:
        """Validation sums for one solution (None = the base model without adapter) over examples, in chunks
        of max_rows: {"reward": (sum, n), "nonfinite": (count, n), **task.details} — summable over ranks.
        Non-finite rewards add 0 to the sum and are counted."""
        sums: dict = {}
        offsets = None if solution is None else np.asarray(solution)[None]  # [1, n]
        for start in range(0, len(examples), self.max_rows):
            chunk = examples[start: start + self.max_rows]
            texts = self.generate(offsets, self.encode(chunk))  # [len(chunk)]
            r = score_rows(self.task, texts, chunk)  # [len(chunk)]
            bad = ~np.isfinite(r)
            parts = {"reward": (float(r[~bad].sum()), len(chunk)), "nonfinite": (int(bad.sum()), len(chunk))}
            if self.task.details is not None:
                parts.update(self.task.details(texts, chunk))
            for key, (num, den) in parts.items():
                old = sums.get(key, (0.0, 0))
                sums[key] = (old[0] + num, old[1] + den)
        return sums
