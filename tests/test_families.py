"""Merging on every family (the edit/toggle/save/load matrix is tests/test_contract.py)."""
from __future__ import annotations

import pytest
import torch

from editpeft import EditRequest

from conftest import FAMILIES, TINY_CONFIGS, assert_close_reordered, assert_untouched, logits_of, params_snapshot

CONFIGS = TINY_CONFIGS
# In a random 2-layer model attention cannot carry an edit from a mid-prompt subject to the last
# position, so the tiny-model request ends with its subject (SmolLM2 tests cover mid-prompt subjects).
REQUEST = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
OTHER = ["The chemical symbol for gold is", "Berlin, London, Madrid"]


@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
def test_rome_merge_unmerge(tiny):
    model, tok = tiny
    prompts = [REQUEST.prompt] + OTHER
    snap = params_snapshot(model)
    base = logits_of(model, tok, prompts)
    adapter = model.add_edit("rome", REQUEST, name="e", config=CONFIGS["rome"])
    hooked = logits_of(model, tok, prompts)
    adapter.merge()
    assert not torch.equal(model.state_dict()[adapter.targets[0] + ".weight"], snap[adapter.targets[0] + ".weight"])  # merged: the weight itself changed
    # merged W + ΔW vs hooked W x + ΔW x: reordered float32 sums through 2 blocks + head
    assert_close_reordered(logits_of(model, tok, prompts), hooked, depth=3)
    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, prompts), base)  # bitwise: edits off, every module runs its original code path
    adapter.unmerge()
    assert torch.equal(logits_of(model, tok, prompts), hooked)  # bitwise: unmerge restores the pristine weights, hooks run again
    adapter.merge()
    model.remove_edit("e")
    assert_untouched(model, snap)


def test_rome_adapter_is_rank_one_and_small(tiny):
    model, tok = tiny
    adapter = model.add_edit("rome", REQUEST, name="e", config=CONFIGS["rome"])
    (delta,) = adapter.deltas.values()
    assert delta.rank == 1
    assert adapter.targets == ["model.layers.0.mlp.down_proj"]
