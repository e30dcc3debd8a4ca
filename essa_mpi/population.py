"""Evaluate many candidates on one mini-batch in one batched greedy generation.

    ev = PopulationEvaluator(model, tok, adapter, task, max_new_tokens=8, max_rows=256)
    rewards = ev.evaluate(offsets, examples)        # offsets [C, n] → rewards [C] (mean over prompts)
    per_piece = ev.share_rewards(X, batch, share)  # a rank's pieces (shares.py) → [its C, its P] each

Rows are candidate-major: row c*P + p is prompt p under candidate c. A rank's pieces are generated together,
in calls of at most max_rows rows whatever the pieces' bounds (each row carries its candidate: SVDLoRA.set_rows),
so a rank holding parts of three candidates makes as few calls as one holding whole ones.
"""

from __future__ import annotations

import numpy as np
import torch

from essa_mpi.decode import greedy, unpadded
from essa_mpi.shares import Piece, candidate_rewards, split_counts
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


def everything(offsets, examples: list) -> list:
    """One share of every candidate on every prompt: a single whole piece."""
    return [Piece(slice(0, len(offsets)), slice(0, len(examples)), True)]


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
    def generate(self, offsets: np.ndarray | None, enc: dict, rows: tuple | None = None) -> list:
        """Completions for C candidates x P prompts, candidate-major ([C*P] strings), or for ``rows`` = (candidate
        [R], prompt [R]) index arrays ([R] strings). offsets None = the plain base model (no adapter branch)."""
        C = 1 if offsets is None else len(offsets)
        if offsets is None:
            self.adapter.clear()
        else:
            self.adapter.set_candidates(offsets)
        if self.share_prefix or self.drop_finished:
            prompts = unpadded(enc)  # P token-id lists
            g = self.gen_cfg
            new = greedy(self.model, self.adapter, prompts, C, g.max_new_tokens, g.eos_token_id, g.pad_token_id,
                         self.share_prefix, self.drop_finished, rows)  # C*P (or R) lists of token ids
        else:
            if rows is None:
                ids = enc["input_ids"].repeat(C, 1)  # [C*P, T]
                mask = enc["attention_mask"].repeat(C, 1)  # [C*P, T]
            else:
                ids, mask = enc["input_ids"][rows[1]], enc["attention_mask"][rows[1]]  # [R, T]
                self.adapter.set_rows(torch.as_tensor(rows[0], dtype=torch.long))  # [R] candidate of each row
            out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=self.gen_cfg)
            new = out[:, ids.shape[1]:]  # [rows, new]
        self.adapter.clear()
        return self.tok.batch_decode(new, skip_special_tokens=True)

    def share_completions(self, X: np.ndarray, examples: list, share: list) -> tuple:
        """This rank's pieces (shares.Piece) of the population X [popsize, n] on the batch's examples → (completions
        [R], prompt index of each [R]): rows in piece order, candidate-major within a piece, generated in the
        fewest calls of at most max_rows rows, near-equal (whole candidates keep the adapter's grouped path)."""
        cand = np.concatenate([np.repeat(np.arange(p.cands.start, p.cands.stop), p.prompts.stop - p.prompts.start)
                               for p in share])  # [R] candidate of each row
        prompt = np.concatenate([np.tile(np.arange(p.prompts.start, p.prompts.stop), p.cands.stop - p.cands.start)
                                 for p in share])  # [R] prompt of each row
        texts, calls = [], -(-len(cand) // self.max_rows)
        bounds = np.cumsum([0] + split_counts(len(cand), calls))  # near-equal calls: 384 rows at 256 → 192 + 192
        for start, stop in zip(bounds[:-1], bounds[1:]):
            c, q = cand[start: stop], prompt[start: stop]  # this call's rows
            cs, ps = np.unique(c), np.unique(q)  # its candidates and prompts, ascending
            rows = (np.searchsorted(cs, c), np.searchsorted(ps, q))  # [r], [r]: indices among them
            if len(c) == len(cs) * len(ps) and (rows[0] == np.arange(len(cs)).repeat(len(ps))).all() \
                    and (rows[1] == np.tile(np.arange(len(ps)), len(cs))).all():
                rows = None  # whole candidates on the same prompts: the grouped layout
            texts += self.generate(X[cs], self.encode([examples[i] for i in ps]), rows)
        return texts, prompt

    def share_rewards(self, X: np.ndarray, examples: list, share: list) -> list:
        """Alg. 1, line 11 for this rank's pieces → per piece its [candidates, prompts] float32 task rewards."""
        texts, prompt = self.share_completions(X, examples, share)
        r = score_rows(self.task, texts, [examples[i] for i in prompt]).astype(np.float32)  # [R]
        bounds = np.cumsum([0] + [p.rows for p in share])
        return [r[a:b].reshape(p.cands.stop - p.cands.start, p.prompts.stop - p.prompts.start)  # [C_i, P_i]
                for p, a, b in zip(share, bounds[:-1], bounds[1:])]

    def completions(self, offsets: np.ndarray, examples: list) -> list:
        """[C*P] completions of C candidates x P prompts, candidate-major, in calls of at most max_rows rows."""
        return self.share_completions(np.asarray(offsets), examples, everything(offsets, examples))[0]

    def prompt_rewards(self, completions: list, examples: list, num_candidates: int) -> np.ndarray:
        """Task reward of [C*P] candidate-major completions → [C, P] float32 (what a record carries)."""
        r = score_rows(self.task, completions, examples * num_candidates)  # [C*P]
        return r.astype(np.float32).reshape(num_candidates, len(examples))  # [C, P]

    def row_rewards(self, offsets: np.ndarray, examples: list) -> np.ndarray:
        """Generate and score: each candidate's reward on each prompt → [C, P] float32."""
        return self.share_rewards(np.asarray(offsets), examples, everything(offsets, examples))[0]

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
