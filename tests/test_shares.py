import numpy as np
import pytest

from essa_mpi.shares import candidate_rewards, gathered_rewards, local_values, record_counts, record_seeds, shares

CASES = [(16, 24, 2), (7, 3, 3), (3, 3, 4), (2, 4, 5), (3, 3, 9), (1, 5, 5), (6, 48, 4), (96, 64, 64), (16, 48, 3),
         (5, 1, 5), (6, 4, 24)]


@pytest.mark.parametrize("popsize,batch,world", CASES)
def test_every_row_once_and_every_rank_within_one_row(popsize, batch, world):
    covered = np.zeros((popsize, batch), int)
    rows = []
    for share in shares(popsize, batch, world):
        assert 1 <= len(share) <= 3, "a share is at most a candidate's tail, whole candidates, a candidate's head"
        for piece in share:
            covered[piece.cands, piece.prompts] += 1
        rows.append(sum(piece.rows for piece in share))
    assert (covered == 1).all()
    assert max(rows) - min(rows) <= 1 and min(rows) > 0


@pytest.mark.parametrize("popsize,batch,world", CASES)
def test_any_split_gives_the_one_rank_rewards_bit_for_bit(popsize, batch, world):
    """Ranks average the gathered records into exactly what one rank computes from the whole [popsize, batch]."""
    rng = np.random.default_rng(popsize * 1000 + world)
    prompt = rng.random((popsize, batch), dtype=np.float32)  # [popsize, batch]
    prompt[0, batch - 1] = np.nan  # a non-finite prompt reward stays with its candidate
    values = np.concatenate([local_values(s, [prompt[p.cands, p.prompts] for p in s])
                             for s in shares(popsize, batch, world)])  # what the Allgatherv concatenates
    assert len(values) == sum(record_counts(popsize, batch, world))
    want = candidate_rewards(prompt)
    got = gathered_rewards(popsize, batch, world, values)
    assert got.tobytes() == want.tobytes()
    seeds = np.arange(100, 100 + popsize, dtype=np.uint32)
    assert len(record_seeds(popsize, batch, world, seeds)) == len(values)


def test_records_stay_one_per_candidate_when_candidates_split_evenly():
    """The default (16 x 48) on 1, 2, 4, 8, 16 ranks sends 16 records: nothing more crosses than before."""
    for world in (1, 2, 4, 8, 16):
        assert sum(record_counts(16, 48, world)) == 16
