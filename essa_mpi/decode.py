"""Greedy decoding of C candidates x P prompts with less work than ``generate`` (search and validation).

    new = greedy(model, adapter, prompts, C, max_new_tokens=12, eos=tok.eos_token_id, pad=tok.pad_token_id)
    # prompts: P token-id lists, unpadded → C*P token-id lists, candidate-major (row c*P + p), EOS included
    new = greedy(..., rows=(cand, prompt))   # or any rows: row i is prompt prompt[i] under candidate cand[i]

Why ``model.generate`` is not used here: it prefills every row's whole prompt, though one candidate's rows
share the chat-template head, the system prompt and any common lead-in (their K/V differ between candidates,
whose LoRA sits on q/k/v/o, but not between one candidate's rows); and it keeps computing a row that emitted
EOS, fed padding, until the last row of the batch ends. Both wastes grow with the shared part of the prompts
and with the spread of answer lengths. Eval's sampling keeps ``generate``.

The steps (positions and masks as ``generate`` builds them for a left-padded batch, so the tokens are the same
up to the float rounding of a split prefill):

1. prefix: the longest head all P prompts share (leaving each prompt one token of its own), as C rows, one
   per candidate; its K/V are then repeated to each candidate's rows.
2. suffix: the rest of each prompt, left-padded after the prefix; the 2-D mask hides the pad slots and the
   position ids continue from the prefix, counting real tokens only.
3. decode: one token per live row per step; a row that emitted EOS leaves the batch, the cache, the mask and
   the adapter's row map (``SVDLoRA.set_rows``), so each step computes live rows only.
"""

from __future__ import annotations

import os

import torch

MIN_PREFIX = 8  # tokens: a shorter shared head is not worth the extra forward call of its own


def shared_prefix(prompts: list) -> int:
    """Tokens every prompt starts with, leaving each at least one token of its own (whose logits give the
    first new token).

    >>> shared_prefix([[1, 2, 3, 4], [1, 2, 5]]), shared_prefix([[1, 2, 3], [1, 2, 3]]), shared_prefix([[7], [7, 8]])
    (2, 2, 0)
    """
    return min(len(os.path.commonprefix(prompts)), min(len(p) for p in prompts) - 1)


def unpadded(enc: dict) -> list:
    """A left-padded tokenizer batch (input_ids, attention_mask [P, T]) → its P prompts' token-id lists.

    >>> unpadded({"input_ids": torch.tensor([[0, 5, 6], [7, 8, 9]]),
    ...           "attention_mask": torch.tensor([[0, 1, 1], [1, 1, 1]])})
    [[5, 6], [7, 8, 9]]
    """
    return [ids[m.bool()].tolist() for ids, m in zip(enc["input_ids"], enc["attention_mask"])]


def suffix_batch(prompts: list, start: int, pad: int) -> tuple:
    """The prompts from token ``start`` on, left-padded → input ids [P, S], the 2-D mask over prefix and
    suffix [P, start + S] and the suffix's position ids [P, S] (real tokens counted, as ``generate`` does).

    >>> ids, mask, pos = suffix_batch([[5, 6, 7, 8], [5, 6, 9]], 2, pad=0)
    >>> ids.tolist(), mask.tolist(), pos.tolist()
    ([[7, 8], [0, 9]], [[1, 1, 1, 1], [1, 1, 0, 1]], [[2, 3], [1, 2]])
    """
    S = max(len(p) - start for p in prompts)
    ids = torch.full((len(prompts), S), pad, dtype=torch.long)  # [P, S]
    mask = torch.zeros(len(prompts), start + S, dtype=torch.long)  # [P, start + S]
    mask[:, :start] = 1
    for i, p in enumerate(prompts):
        tail = p[start:]
        ids[i, S - len(tail):] = torch.tensor(tail, dtype=torch.long)
        mask[i, start + S - len(tail):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]  # [P, S]; pad slots get a position they never use
    return ids, mask, pos


@torch.no_grad()
def greedy(model, adapter, prompts: list, C: int, max_new_tokens: int, eos: int, pad: int,
           share_prefix: bool = True, drop_finished: bool = True, rows: tuple | None = None) -> list:
    """Greedy continuations (token ids up to and including EOS, at most max_new_tokens each) of P prompts under C
    candidates (set on the adapter beforehand, ``SVDLoRA.set_candidates``, or none: C = 1): rows = (candidate [R],
    prompt [R]) index arrays, one batch row each, or None for all C*P, candidate-major."""
    from transformers import DynamicCache

    dev, P = model.device, len(prompts)
    grouped = rows is None  # candidate c's rows are the contiguous c*P..c*P+P-1: the adapter's grouped path
    cand, prompt = (torch.arange(C).repeat_interleave(P), torch.arange(P).repeat(C)) if grouped else \
        (torch.as_tensor(rows[0], dtype=torch.long), torch.as_tensor(rows[1], dtype=torch.long))  # [R], [R]
    cand = cand.to(dev)
    R = len(cand)
    used = sorted(set(prompt.tolist()))
    cache = DynamicCache(config=model.config)
    L = shared_prefix([prompts[p] for p in used]) if share_prefix else 0
    L = L if L >= MIN_PREFIX else 0
    if L:  # 1. the shared head once per candidate
        head = torch.tensor(prompts[used[0]][:L], dtype=torch.long, device=dev).expand(C, L)  # [C, L]
        model(input_ids=head, past_key_values=cache, use_cache=True, logits_to_keep=1)
        if grouped:
            cache.batch_repeat_interleave(P)  # K/V [C, kv, L, d] → [C*P, kv, L, d], candidate-major
        else:
            cache.batch_select_indices(cand)  # K/V [C, kv, L, d] → [R, kv, L, d], row i from candidate cand[i]
    if not grouped:
        adapter.set_rows(cand)  # [R] candidate of each row
    where = {p: i for i, p in enumerate(used)}
    local = torch.tensor([where[p] for p in prompt.tolist()], dtype=torch.long)  # [R] row → its prompt among used
    batch = suffix_batch([prompts[p] for p in used], L, pad)  # over the prompts the rows use
    ids, mask, pos = (t[local].to(dev) for t in batch)  # [R, S], [R, L+S], [R, S]
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                   logits_to_keep=1).logits  # 2. [R, 1, vocab]
    live = torch.arange(R, device=dev)  # [R] original row of each batch row
    last = pos[:, -1]  # [R] position of each row's newest token
    finished = torch.zeros(R, dtype=torch.bool, device=dev)  # [R] emitted EOS (kept only without dropping)
    out = [[] for _ in range(R)]
    for step in range(max_new_tokens):  # 3.
        nxt = logits[:, -1].argmax(-1)  # [R] greedy
        for row, token in zip(live.tolist(), nxt.tolist()):
            out[row].append(token)
        finished = finished | (nxt == eos)  # [R]
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if drop_finished and bool(finished.any()):
            keep = (~finished).nonzero().squeeze(1)  # [R'] batch rows still generating
            live, nxt, mask, last, finished = live[keep], nxt[keep], mask[keep], last[keep], finished[keep]
            cache.batch_select_indices(keep)  # K/V [R', kv, t, d]
            adapter.set_rows(cand[live])  # [R'] candidate of each row
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # [R, t + 1]
        last = last + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=last[:, None],
                       past_key_values=cache, use_cache=True).logits  # [R, 1, vocab]
    adapter.set_rows(None)
    return [row[: row.index(eos) + 1] if eos in row else row for row in out]


def own_decoding(model) -> dict:
    """Drop the model's shipped generation_config.json (Qwen2.5-Instruct: repetition_penalty 1.05, top_k 20,
    top_p 0.8, temperature 0.7): transformers fills every value a passed GenerationConfig leaves unset from
    it, so greedy search and validation would not be greedy. → the decoding values it held (for the log)."""
    from transformers import GenerationConfig

    shipped = getattr(model, "generation_config", None)
    diff = shipped.to_diff_dict() if shipped is not None else {}
    knobs = set(GenerationConfig()._get_default_generation_params()) | {"min_p"}  # what decodes, not how it returns
    ignored = {k: v for k, v in diff.items() if k in knobs and k != "use_cache"
               and not k.startswith(("output_", "return_"))}
    model.generation_config = GenerationConfig()  # transformers' neutral defaults; decoding() sets the rest
    return ignored


def decoding(tok, max_new_tokens: int, temperature: float | None = None, top_p: float = 1.0, k: int = 1):
    """The GenerationConfig of every HF generate call: greedy (temperature None: search, validation) or
    sampling with temperature and top_p alone (eval), k sequences per prompt. top_k is off (transformers'
    default is 50; vLLM's SamplingParams have none), and nothing comes from the model (``own_decoding``)."""
    from transformers import GenerationConfig

    sample = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature else \
        {"do_sample": False}
    return GenerationConfig(**sample, max_new_tokens=max_new_tokens, num_return_sequences=k,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
