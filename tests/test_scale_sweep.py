import os
import sys

import torch
from tiny import make_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "experiments"))
from scale_sweep import set_scale  # noqa: E402


def test_set_scale_zero_is_the_base_model_and_one_restores_the_adapter():
    from peft import LoraConfig, get_peft_model

    ids = torch.randint(0, 256, (2, 7))  # [B, T]
    base = make_model(260)
    with torch.no_grad():
        plain = base(ids).logits  # [B, T, V]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False)).eval()
    with torch.no_grad():
        adapted = model(ids).logits
        assert not torch.allclose(adapted, plain, atol=1e-4)
        set_scale(model, 0.0)
        assert torch.allclose(model(ids).logits, plain, atol=1e-6)
        set_scale(model, 1.0)
        assert torch.allclose(model(ids).logits, adapted, atol=1e-6)
        set_scale(model, 2.0)
        assert not torch.allclose(model(ids).logits, adapted, atol=1e-4)
