"""Who evaluates what: the generation's popsize x batch (candidate, prompt) rows split evenly over the ranks,
and the records each rank sends for its share (pure functions: no MPI, testable alone).

Rows are candidate-major, row ``c * batch + p`` = prompt p under candidate c. Rank r takes the contiguous rows
``split_counts(popsize * batch, world)`` gives it, so every rank's count differs by at most one, whatever popsize
and world are (issue 45: split by whole candidates, popsize 6 on 4 ranks left two ranks idle a third of each
generation). A share is at most three pieces, each a rectangle (candidate slice, prompt slice): the tail of a
candidate begun on the rank before, whole candidates, the head of a candidate the next rank finishes.

Records (``comm.RECORD``, 8 bytes: seed, reward): a piece of whole candidates sends one per candidate, its mean
prompt reward; a part of a candidate sends one per prompt it scored, and every rank averages those in prompt
order. Both are the float64 mean of the same float32 prompt rewards a one-rank run takes (``candidate_rewards``),
so a run's rewards do not depend on how many ranks computed them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def split_counts(total: int, world: int) -> list:
    """Contiguous split of ``total`` items: the first total % world ranks get one more.

    >>> split_counts(10, 3)
    [4, 3, 3]
    """
    base, extra = divmod(total, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


@dataclass(frozen=True)
class Piece:
    """Candidates ``cands`` x prompts ``prompts`` of one rank's share; ``whole`` when it spans every prompt."""

    cands: slice
    prompts: slice
    whole: bool

    @property
    def records(self) -> int:
        """Records this piece sends: one per candidate (whole) or one per prompt (a part of one candidate)."""
        return (self.cands.stop - self.cands.start) if self.whole else (self.prompts.stop - self.prompts.start)

    @property
    def rows(self) -> int:
        return (self.cands.stop - self.cands.start) * (self.prompts.stop - self.prompts.start)


def pieces(lo: int, hi: int, batch: int) -> list:
    """Rows [lo, hi) of a candidate-major population → its pieces, in row order.

    >>> [(p.cands.start, p.cands.stop, p.prompts.start, p.prompts.stop, p.whole) for p in pieces(3, 14, 4)]
    [(0, 1, 3, 4, False), (1, 3, 0, 4, True), (3, 4, 0, 2, False)]
    >>> [(p.cands.start, p.prompts.start, p.prompts.stop) for p in pieces(5, 7, 4)]
    [(1, 1, 3)]
    """
    out, first, last = [], lo // batch, (hi - 1) // batch
    if first == last:  # inside one candidate
        return [Piece(slice(first, first + 1), slice(lo % batch, hi - first * batch), hi - lo == batch)]
    if lo % batch:
        out.append(Piece(slice(first, first + 1), slice(lo % batch, batch), False))
        first += 1
    whole_end = hi // batch  # candidates [first, whole_end) are whole
    if whole_end > first:
        out.append(Piece(slice(first, whole_end), slice(0, batch), True))
    if hi % batch:
        out.append(Piece(slice(whole_end, whole_end + 1), slice(0, hi % batch), False))
    return out


def shares(popsize: int, batch: int, world: int) -> list:
    """Every rank's pieces: [[Piece]] for ranks 0..world-1, rows split by split_counts(popsize * batch, world).

    >>> [sum(p.rows for p in s) for s in shares(6, 48, 4)]
    [72, 72, 72, 72]
    >>> [[(p.cands.start, p.cands.stop, p.prompts.start, p.prompts.stop) for p in s] for s in shares(3, 4, 2)]
    [[(0, 1, 0, 4), (1, 2, 0, 2)], [(1, 2, 2, 4), (2, 3, 0, 4)]]
    """
    assert world <= popsize * batch, f"{world} ranks cannot share {popsize} candidates x {batch} prompts"
    bounds = np.concatenate([[0], np.cumsum(split_counts(popsize * batch, world))]).tolist()
    return [pieces(bounds[r], bounds[r + 1], batch) for r in range(world)]


def record_counts(popsize: int, batch: int, world: int) -> list:
    """Records each rank sends for its share.

    >>> record_counts(7, 3, 2), record_counts(2, 4, 5), record_counts(16, 48, 2)
    ([5, 4], [2, 2, 2, 1, 1], [8, 8])
    """
    return [sum(p.records for p in s) for s in shares(popsize, batch, world)]


def candidate_rewards(rows: np.ndarray) -> np.ndarray:
    """[C, P] float32 prompt rewards → [C] float32 candidate rewards: the float64 mean in prompt order. One
    function for every split of the work, so a run's rewards do not depend on how many ranks computed them.
    A candidate with a non-finite prompt reward gets NaN: the run logs it and ranks it worst (never a 0).

    >>> candidate_rewards(np.array([[1, 0, 0.5], [1, np.nan, 1]], np.float32))
    array([0.5, nan], dtype=float32)
    """
    return rows.astype(np.float64).mean(axis=1).astype(np.float32)  # [C]


def local_values(share: list, rewards: list) -> np.ndarray:
    """This rank's record rewards, in record order: rewards[i] [C_i, P_i] float32 of piece i → [records] float32.

    >>> local_values(pieces(3, 14, 4), [np.ones((1, 1)), np.array([[0, 1, 1, 0], [1, 1, 1, 1]]), np.zeros((1, 2))])
    array([1. , 0.5, 1. , 0. , 0. ], dtype=float32)
    """
    return np.concatenate([candidate_rewards(np.asarray(r, np.float32)) if p.whole else
                           np.asarray(r, np.float32).reshape(-1) for p, r in zip(share, rewards)]).astype(np.float32)


def record_seeds(popsize: int, batch: int, world: int, seeds: np.ndarray) -> np.ndarray:
    """The seed every gathered record carries, in rank and record order → [sum(record_counts)] uint32."""
    out = []
    for s in shares(popsize, batch, world):
        for p in s:
            out.append(seeds[p.cands] if p.whole else np.repeat(seeds[p.cands], p.records))
    return np.concatenate(out).astype(np.uint32)


def gathered_rewards(popsize: int, batch: int, world: int, values: np.ndarray) -> np.ndarray:
    """Every rank's record rewards, concatenated in rank order → [popsize] float32 candidate rewards: a whole
    candidate's record as sent, a split one's prompt records averaged in prompt order (candidate_rewards).

    >>> v = np.concatenate([local_values(s, [np.full((p.cands.stop - p.cands.start, p.prompts.stop - p.prompts.start),
    ...                                               float(p.cands.start)) for p in s]) for s in shares(3, 4, 2)])
    >>> gathered_rewards(3, 4, 2, v)
    array([0., 1., 2.], dtype=float32)
    """
    out = np.empty(popsize, np.float32)  # [popsize]
    prompt = np.full((popsize, batch), np.nan, np.float32)  # [popsize, batch]: prompt rewards of split candidates
    split, i = set(), 0
    for s in shares(popsize, batch, world):
        for p in s:
            if p.whole:
                out[p.cands] = values[i: i + p.records]
            else:
                prompt[p.cands.start, p.prompts] = values[i: i + p.records]
                split.add(p.cands.start)
            i += p.records
    assert i == len(values), f"{len(values)} records for {i} expected"
    for c in sorted(split):
        out[c] = candidate_rewards(prompt[c: c + 1])[0]
    return out
