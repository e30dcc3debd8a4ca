"""LoRA SFT warm start: completion-only loss, a loss that falls, a PEFT adapter ESSA can load, caching key."""

import dataclasses
import json

import torch

from essa_mpi import sft
from essa_mpi.config import Config, ModelConfig, load_config
from essa_mpi.svd_lora import load_lora_factors
from essa_mpi.tasks import build_task


def tiny_cfg(tiny_dir, out_dir, **sft_kw):
    cfg = load_config(None, [f"model.name_or_path={tiny_dir}", "model.device=cpu", "adapter.rank=2",
                             "task.name=toy", "task.val_size=2", f"sft.output_dir={out_dir}"])
    cfg.sft = dataclasses.replace(cfg.sft, **sft_kw)
    return cfg


def test_loss_only_on_completion_tokens(tiny):
    _, tok = tiny
    task = build_task(load_config(None, ["task.name=toy", "task.val_size=2"]).task, seed=0)
    ids, labels = sft.encode_row(tok, task, {"prompt": "Write words: a", "completion": "apple"}, max_length=512)
    n_completion = len(tok("apple" + tok.eos_token, add_special_tokens=False)["input_ids"])
    assert labels[-n_completion:] == ids[-n_completion:] and ids[-1] == tok.eos_token_id
    assert set(labels[:-n_completion]) == {-100}
    ids, labels = sft.encode_row(tok, task, {"prompt": "Write words: a", "completion": "apple"}, max_length=5)
    assert len(ids) == len(labels) == 5


def test_collate_right_pads_and_masks():
    batch = sft.collate([([1, 2, 3], [-100, 2, 3]), ([4], [4])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def completion_loss(model, tok, task):
    batch = sft.collate([sft.encode_row(tok, task, r, 512) for r in task.sft], tok.pad_token_id)
    with torch.no_grad():
        return float(model(**batch).loss)


def test_training_lowers_the_loss_and_saves_a_loadable_adapter(tiny_dir, tmp_path):
    from peft import PeftModel

    from essa_mpi.model import load_model

    cfg = tiny_cfg(tiny_dir, str(tmp_path / "sft"), learning_rate=1e-2, epochs=3, batch_size=16)
    task = build_task(cfg.task, seed=0)
    model, tok = load_model(cfg.model)
    before = completion_loss(model, tok, task)
    info = sft.train(cfg, task, cfg.sft.output_dir, log=lambda m: None)
    assert sft.is_done(cfg.sft.output_dir) and info["steps"] == 3 * 4
    after = completion_loss(PeftModel.from_pretrained(model, cfg.sft.output_dir), tok, task)
    assert after < 0.8 * before, (before, after)
    factors = load_lora_factors(model, cfg.sft.output_dir, cfg.adapter.target_modules, rank=2)
    assert len(factors) == 8 and all(f.B.abs().sum() > 0 for f in factors)  # B moved away from its zero init


def test_cache_directory_depends_on_what_shapes_the_adapter():
    base = Config()
    same = load_config(None, ["model.threads=3", "run.generations=99", "search.popsize=4",
                              "model.share_prefix=false", "model.drop_finished=false"])  # how search decodes
    other = [load_config(None, [o]) for o in ("sft.learning_rate=1e-4", "adapter.rank=8", "task.sft_size=10",
                                              "search.seed=1", "model.precision=fp32")]
    assert sft.sft_dir(base) == sft.sft_dir(same) and sft.sft_dir(base).startswith("runs/sft/arithmetic-")
    assert len({sft.sft_dir(c) for c in other} | {sft.sft_dir(base)}) == 6
    assert sft.sft_dir(load_config(None, ["sft.output_dir=/x"])) == "/x"
    assert isinstance(ModelConfig().threads, int)


def test_cache_key_and_reuse_follow_the_sft_rows_content(tmp_path):
    cfg = load_config(None, [])
    rows = [{"prompt": "1+1", "completion": "2"}]
    edited = [{"prompt": "1+1", "completion": "3"}]
    assert sft.sft_dir(cfg, rows) != sft.sft_dir(cfg, edited) and sft.sft_dir(cfg, rows) == sft.sft_dir(cfg, list(rows))
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "sft_info.json").write_text(json.dumps({"data_digest": sft.digest(rows)}))
    assert sft.is_done(str(tmp_path), rows) and not sft.is_done(str(tmp_path), edited)


def test_accumulated_micro_batches_equal_one_batch(tiny_dir):
    """The same step's gradients from one pass of 6 rows and from passes of 4 + 2 rows (float tolerance)."""
    from peft import LoraConfig, get_peft_model

    from essa_mpi.model import load_model

    cfg = tiny_cfg(tiny_dir, "/unused")
    cfg.model.precision = "fp32"
    task = build_task(cfg.task, seed=0)
    rows = [sft.encode_row(load_model(cfg.model)[1], task, r, 512) for r in task.sft[:6]]
    grads = []
    for micro in (6, 4, 1):
        model, tok = load_model(cfg.model)
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights="gaussian"))
        loss = sft.accumulate(model, rows, micro, tok.pad_token_id)
        grads.append((loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    for loss, g in grads[1:]:
        assert abs(loss - grads[0][0]) < 1e-5
        for a, b in zip(g, grads[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_auto_micro_batches_keep_rows_times_tokens_within_the_memory_budget(tiny_dir, tmp_path, monkeypatch):
    """A device with room for 3 rows beside the weights: every forward pass gets at most 3 rows of at most
    sft.max_length tokens, and every optimizer step still sees its 16 rows."""
    from essa_mpi import memory
    from essa_mpi import model as model_mod
    from essa_mpi.modelfiles import model_facts

    cfg = tiny_cfg(tiny_dir, str(tmp_path / "sft"), batch_size=16, max_length=64)
    arch = memory.Arch.from_facts(model_facts(cfg.model))
    row = memory.sft_row_bytes(arch, cfg.model.precision, 64, False)
    room = memory.RUNTIME["cpu"] + memory.weight_bytes(arch, cfg.model.precision) + 3.5 * row
    monkeypatch.setattr(memory, "available_ram", lambda: int(room / cfg.run.memory_headroom))
    seen, real_forward = [], None

    def spy_load(*a, **kw):
        nonlocal real_forward
        model, tok = load_model_real(*a, **kw)
        real_forward = model.forward
        model.forward = lambda *args, **kwargs: (seen.append(tuple(kwargs["input_ids"].shape)),
                                                 real_forward(*args, **kwargs))[1]
        return model, tok

    load_model_real = model_mod.load_model
    monkeypatch.setattr(model_mod, "load_model", spy_load)
    task = build_task(cfg.task, seed=0)
    info = sft.train(cfg, task, cfg.sft.output_dir, log=lambda m: None)
    assert info["micro_batch"] == 3
    assert seen and all(r <= 3 and r * t <= 3 * 64 for r, t in seen), seen
    assert sum(r for r, _ in seen) == len(task.sft)  # one epoch: every row once


def test_the_sft_model_is_gone_and_cuda_cache_emptied_before_the_search(tiny_dir, tmp_path, monkeypatch):
    import gc
    import weakref
    from types import SimpleNamespace

    from essa_mpi import cli
    from essa_mpi import model as model_mod

    cfg = tiny_cfg(tiny_dir, str(tmp_path / "sft"), batch_size=16)
    task = build_task(cfg.task, seed=0)
    refs, at_empty = [], []
    real = model_mod.load_model

    def spy_load(*a, **kw):
        model, tok = real(*a, **kw)
        refs.append(weakref.ref(model))
        return model, tok

    monkeypatch.setattr(model_mod, "load_model", spy_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: at_empty.append([r() is None for r in refs]))
    comm = SimpleNamespace(rank=0, size=1, local_rank=0, local_size=1, idle_bcast=lambda *a: 0, beat=lambda: None,
                           threads=1, allreduce_sum=lambda a, label: a, bcast=lambda o, label: o)
    out, info = cli.warm_start(cfg, comm, task)
    gc.collect()
    assert info is not None and refs and at_empty == [[True]]


def test_two_jobs_with_the_same_warm_start_train_it_once(tiny_dir, tmp_path):
    """Two `sft` commands with one cache entry at once: the first trains under the entry's lock, the second
    waits for it and reuses the adapter; no temporary directory or lock is left behind."""
    import os
    import subprocess
    import sys

    out = tmp_path / "cache" / "toy-same"
    cmd = [sys.executable, "-m", "essa_mpi", "sft", f"model.name_or_path={tiny_dir}", "model.device=cpu",
           "model.threads=1", "adapter.rank=2", "task.name=toy", "sft.epochs=40", f"sft.output_dir={out}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in first.stdout:
        if "SFT warm start: training" in line:
            break
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    rest = first.communicate(timeout=300)[0]
    assert first.returncode == 0 and second.returncode == 0, second.stderr[-2000:] + rest[-2000:]
    assert "another job trains this adapter" in second.stdout and "SFT warm start: training" not in second.stdout
    assert f"using cached {out}" in second.stdout and json.loads(second.stdout.splitlines()[-1])["cached"]
    assert sft.is_done(str(out)) and sorted(os.listdir(out.parent)) == ["toy-same"]


def test_a_file_of_yours_where_the_sft_checkpoints_is_refused_and_kept(tmp_path):
    """<output_dir>.resume.pt is written during the SFT and removed after it: a file there that no SFT wrote
    stops the run before any model loads and stays as it was; the SFT's own checkpoint passes."""
    import pytest

    out = tmp_path / "adapter"
    mine = tmp_path / "adapter.resume.pt"
    mine.write_text("my notes")
    with pytest.raises(ValueError, match=r"adapter\.resume\.pt is not an SFT checkpoint of essa_mpi.*move it away"):
        sft.check_output_dir(str(out))
    assert mine.read_text() == "my notes"
    torch.save({"key": "k", "step": 2}, mine)
    sft.check_output_dir(str(out))
