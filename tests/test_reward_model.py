"""reward_model task: a sequence-classification model scores (prompt, response) pairs."""

import json
import types

import pytest
import torch
from tiny import make_tokenizer

from essa_mpi.config import TaskConfig
from essa_mpi.tasks import build_task, score_rows
from essa_mpi.tasks.reward_model import RewardModelScorer


def tiny_rm_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)


@pytest.fixture(scope="module")
def rm_dir(tmp_path_factory):
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("rm")
    tok = make_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(tiny_rm_config(tok)).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def test_scores_are_per_pair_and_independent_of_batching(rm_dir):
    completions, prompts = ["Sure, here it is.", "No.", "A much longer answer with many words in it."], ["Hi"] * 3
    batched = RewardModelScorer(rm_dir, trust_remote_code=False, batch_size=8)(completions, prompt=prompts)
    single = RewardModelScorer(rm_dir, trust_remote_code=False, batch_size=1)(completions, prompt=prompts)
    assert len(batched) == 3 and len(set(batched)) == 3
    assert batched == pytest.approx(single, abs=1e-5)  # right padding: the pad tokens never reach the score


def test_armorm_style_score_output_is_used(rm_dir):
    seen = {}

    class ArmoLike(torch.nn.Module):  # custom-code models return .score (and per-objective .rewards)
        device = torch.device("cpu")

        def forward(self, input_ids, attention_mask):
            seen["mask"] = attention_mask
            return types.SimpleNamespace(score=attention_mask.sum(1, keepdim=True).float(), logits=None)

    scorer = RewardModelScorer(rm_dir, trust_remote_code=True)
    scorer.__dict__["model_and_tokenizer"] = (ArmoLike(), RewardModelScorer(rm_dir, False).model_and_tokenizer[1])
    scores = scorer(["a", "a much longer response"], prompt=["p", "p"])
    assert scores[0] < scores[1]
    assert seen["mask"][0, -1] == 0 and seen["mask"][0, 0] == 1  # right padding


def test_missing_head_weights_need_trust_remote_code(tmp_path):
    from transformers import LlamaModel

    tok = make_tokenizer()
    LlamaModel(tiny_rm_config(tok)).save_pretrained(tmp_path)  # no classification head saved
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="task.trust_remote_code=true"):
        RewardModelScorer(str(tmp_path), trust_remote_code=False)(["x"], prompt=["p"])


def test_task_from_local_prompts(rm_dir, tmp_path):
    rows = [{"prompt": f"question {i % 6}", "response": f"answer {i}"} for i in range(12)]
    path = tmp_path / "hs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = TaskConfig(name="reward_model", dataset=str(path), reward_model=rm_dir, val_size=2, sft_size=4, batch_size=2)
    task = build_task(cfg, seed=0)
    assert len(task.sft) == 4 and task.sft[0] == {"prompt": "question 0", "completion": "answer 0"}
    assert [r["prompt"] for r in task.train] == [f"question {i % 6}" for i in range(4, 10)]  # deduplicated
    scores = score_rows(task, ["ok", "fine"], task.val)
    assert scores.shape == (2,) and all(map(float.__instancecheck__, scores.tolist()))
