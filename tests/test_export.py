import numpy as np
import torch

from essa_mpi.export import export_adapter
from essa_mpi.svd_lora import SVDLoRA, fresh_lora_factors


def test_exported_adapter_roundtrips_through_peft(tiny_dir, tmp_path):
    from peft import PeftModel

    from essa_mpi.config import ModelConfig
    from essa_mpi.model import load_model

    model, tok = load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))
    adapter = SVDLoRA.attach(model, fresh_lora_factors(model, ["q_proj", "k_proj", "v_proj", "o_proj"], 4, 8.0, 0),
                             fraction=0.5)
    solution = np.random.default_rng(0).standard_normal(adapter.solution_length)  # [n]
    adapter.set_candidates(solution[None])
    ids = tok(["hello there", "abc"], return_tensors="pt", padding=True)
    ours = model(**ids).logits
    ours_gen = model.generate(**ids, max_new_tokens=6, do_sample=False)
    export_adapter(adapter, solution, str(tmp_path / "adapter"), lora_alpha=8.0)

    base, _ = load_model(ModelConfig(name_or_path=tiny_dir, device="cpu"))
    plain = base(**ids).logits
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    theirs = peft_model(**ids).logits
    assert not torch.allclose(plain, ours, atol=1e-3), "the solution must change the model"
    torch.testing.assert_close(theirs, ours, atol=2e-4, rtol=1e-4)
    assert torch.equal(peft_model.generate(**ids, max_new_tokens=6, do_sample=False), ours_gen)
