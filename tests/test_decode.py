"""decode.greedy against transformers' generate on the tiny model in fp32: the same tokens row by row, with a
shared system prompt, suffixes of different lengths, several candidates, and rows that end early."""

import numpy as np
import pytest
import torch

from essa_mpi import decode
from essa_mpi.config import ModelConfig, TaskConfig
from essa_mpi.model import load_model
from essa_mpi.population import PopulationEvaluator
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors
from essa_mpi.tasks import build_task

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
SYSTEM = "You are a careful assistant. Answer with the number only, no words. " * 2  # a shared head


@pytest.fixture(scope="module")
def parts(tiny_dir):
    model, tok = load_model(ModelConfig(name_or_path=tiny_dir, device="cpu", precision="fp32"))
    factors = fresh_lora_factors(model, TARGETS, 4, 8.0, seed=0)
    for f in factors:  # a non-zero B: candidates change the attention, so their prefix K/V differ
        f.B = torch.randn(f.B.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    adapter = SVDLoRA.attach(model, factors, fraction=1.0)
    task = build_task(TaskConfig(name="toy", val_size=4, system_prompt=SYSTEM), seed=0)
    return model, tok, adapter, task


def evaluator(parts, share_prefix, drop_finished, new_tokens=10):
    model, tok, adapter, task = parts
    return PopulationEvaluator(model, tok, adapter, task, new_tokens, 1000, share_prefix, drop_finished)


def token_rows(ev, offsets, examples):
    """C*P lists of new token ids from whichever path ev uses (EOS included, padding cut)."""
    enc = ev.encode(examples)
    prompts = decode.unpadded(enc)
    ev.adapter.set_candidates(offsets)
    try:
        if ev.share_prefix or ev.drop_finished:
            return decode.greedy(ev.model, ev.adapter, prompts, len(offsets), ev.gen_cfg.max_new_tokens,
                                 ev.gen_cfg.eos_token_id, ev.gen_cfg.pad_token_id, ev.share_prefix, ev.drop_finished)
        out = ev.model.generate(input_ids=enc["input_ids"].repeat(len(offsets), 1),
                                attention_mask=enc["attention_mask"].repeat(len(offsets), 1),
                                generation_config=ev.gen_cfg)[:, enc["input_ids"].shape[1]:]
        eos = ev.gen_cfg.eos_token_id
        return [r[: r.index(eos) + 1] if eos in r else r for r in out.tolist()]
    finally:
        ev.adapter.clear()


@pytest.mark.parametrize("share_prefix, drop_finished", [(True, False), (False, True), (True, True)])
def test_same_tokens_as_generate_row_by_row(parts, share_prefix, drop_finished):
    """Rows end early: the EOS of both paths is a token the reference emits mid-answer in some rows only."""
    examples = parts[3].train[:6]  # prompts of different lengths after the shared head
    X = np.random.default_rng(0).standard_normal((3, parts[2].solution_length)) * 0.5  # [C, n]
    ref_ev, ev = evaluator(parts, False, False), evaluator(parts, share_prefix, drop_finished)
    first = token_rows(ref_ev, X, examples)
    counts = np.bincount([t for row in first for t in row[1:-1]])
    ref_ev.gen_cfg.eos_token_id = ev.gen_cfg.eos_token_id = int(counts.argmax())  # ends some rows early
    ref = token_rows(ref_ev, X, examples)
    lengths = [len(r) for r in ref]
    assert min(lengths) < 10 and max(lengths) == 10, lengths  # some rows end early, some run to the limit
    assert len({tuple(r) for r in ref}) > len(examples)  # the candidates differ
    assert token_rows(ev, X, examples) == ref


def test_shared_head_is_computed_once_per_candidate(parts, monkeypatch):
    """The model sees C rows of the shared head, then C*P rows holding only each prompt's own tokens."""
    model, tok, adapter, task = parts
    ev = evaluator(parts, True, True)
    examples = task.train[:4]
    enc = ev.encode(examples)
    prompts = decode.unpadded(enc)
    head = decode.shared_prefix(prompts)
    assert head >= decode.MIN_PREFIX and head >= len(tok(SYSTEM)["input_ids"])
    calls = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **kw: calls.append(kw["input_ids"].shape) or
                        forward(self, *a, **kw))
    adapter.set_candidates(np.zeros((3, adapter.solution_length)))
    decode.greedy(model, adapter, prompts, 3, 4, eos=-1, pad=tok.pad_token_id)
    adapter.clear()
    longest = max(len(p) for p in prompts)
    assert calls[:2] == [(3, head), (12, longest - head)] and calls[2:] == [(12, 1)] * 3


def test_finished_rows_leave_the_batch(parts, monkeypatch):
    """Each decode step computes only the rows still generating."""
    model, tok, adapter, task = parts
    prompts = [[5, 6, 7], [5, 6, 8, 9]]
    rows = []
    forward = type(model).forward
    monkeypatch.setattr(type(model), "forward", lambda self, *a, **kw: rows.append(kw["input_ids"].shape[0]) or
                        forward(self, *a, **kw))
    adapter.set_candidates(np.zeros((2, adapter.solution_length)))
    ref = decode.greedy(model, adapter, prompts, 2, 8, eos=-1, pad=tok.pad_token_id, drop_finished=False)
    eos = ref[1][2]  # the token row 1 emits third: it ends there (and any row emitting it earlier)
    rows.clear()
    out = decode.greedy(model, adapter, prompts, 2, 8, eos=eos, pad=tok.pad_token_id)
    adapter.clear()
    ends = [row.index(eos) + 1 if eos in row else 8 for row in ref]
    assert out == [r[:n] for r, n in zip(ref, ends)]
    assert rows[1:] == [sum(n > step for n in ends) for step in range(1, max(ends))]


@pytest.mark.parametrize("share_prefix, drop_finished", [(False, False), (True, True)])
def test_pieces_of_candidates_in_one_call_equal_the_whole_population(parts, share_prefix, drop_finished):
    """A rank's share as pieces (a candidate's tail, whole candidates, a head: shares.pieces) generated in calls of
    5 rows, rows carrying their own candidate: the completions equal the same rows of the whole C x P call."""
    from essa_mpi.shares import pieces

    examples = parts[3].train[:4]
    X = np.random.default_rng(2).standard_normal((4, parts[2].solution_length)) * 0.5  # [C, n]
    whole = evaluator(parts, share_prefix, drop_finished).completions(X, examples)  # [C*P], one call
    ev = evaluator(parts, share_prefix, drop_finished)
    ev.max_rows = 5
    share = pieces(3, 14, 4)  # rows 3..13: candidate 0's prompt 3, candidates 1-2, candidate 3's prompts 0-1
    texts, prompt = ev.share_completions(X, examples, share)
    assert texts == whole[3:14] and prompt.tolist() == [3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert len(set(whole)) > 3, "completions must differ, or equal ones prove nothing"
