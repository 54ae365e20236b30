"""An editpeft weight-delta edit and a peft LoRA adapter active on one model at once."""
from __future__ import annotations

import pytest
import torch

from editpeft import EditRequest

from conftest import logits_of

ROME = {"layer": 0, "v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000,
        "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
REQ = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
PROMPTS = [REQ.prompt, "Berlin, London, Madrid", "The chemical symbol for gold is"]


@pytest.mark.parametrize("edit_first", [True, False])
def test_edit_and_lora_together(tiny, edit_first):
    from peft import LoraConfig, get_peft_model
    model, tok = tiny
    base = logits_of(model, tok, PROMPTS)
    torch.manual_seed(0)
    lora_cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    if edit_first:
        model.add_edit("rome", REQ, name="fact", config=ROME)
        edit_only = logits_of(model, tok, PROMPTS)
        peft_model = get_peft_model(model, lora_cfg)
    else:   # a task LoRA first, then fact edits on the wrapped model (the edit hooks the LoRA's base layer)
        peft_model = get_peft_model(model, lora_cfg)
        with peft_model.disable_adapter():
            assert torch.equal(logits_of(peft_model, tok, PROMPTS), base)  # bitwise: LoRA and edit off, original code path
        model.add_edit("rome", REQ, name="fact", config=ROME)
        with peft_model.disable_adapter():
            edit_only = logits_of(peft_model, tok, PROMPTS)
    assert not torch.equal(edit_only, base)  # the edit changes the logits by O(1)
    both = logits_of(peft_model, tok, PROMPTS)
    with peft_model.disable_adapter():
        assert torch.equal(logits_of(peft_model, tok, PROMPTS), edit_only)   # LoRA off: the edit alone; bitwise: the same hook path as edit_only
    with model.disabled_edits():
        lora_only = logits_of(peft_model, tok, PROMPTS)
        with peft_model.disable_adapter():
            assert torch.equal(logits_of(peft_model, tok, PROMPTS), base)    # both off: the base model; bitwise: LoRA and edit off, original code path
    assert not torch.equal(both, lora_only) and not torch.equal(both, edit_only)  # each adds an O(1) change
    model.remove_edit("fact")
    assert torch.equal(logits_of(peft_model, tok, PROMPTS), lora_only)  # bitwise: edit removed, the LoRA path as lora_only
