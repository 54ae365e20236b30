"""ROME and GRACE on a tiny random model of every supported family (the matrix)."""
from __future__ import annotations

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import FAMILIES, assert_close_reordered, assert_untouched, logits_of, params_snapshot

# Tiny random models need a stronger push than a trained one: more steps, a wider clamp.
VALUE = {"v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000, "context_lengths": [[4, 2]],
         "kl_factor": 0.0, "v_weight_decay": 0.0}
CONFIGS = {
    "rome": {"layer": 0, "v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000,
             "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0},
    "grace": {"layer": 0, "eps_init": 1.0, "steps": 100},
    "memit": {"layers": [0, 1], "mom2_update_weight": 1.0, **VALUE},
    "alphaedit": {"layers": [0, 1], "nullspace_threshold": 1.0, "l2": 0.1, **VALUE},
    "emmet": {"layers": [0, 1], **VALUE},
    "kn": {"ig_steps": 5, "context_lengths": [[4, 2]]},
}
# In a random 2-layer model attention cannot carry an edit from a mid-prompt subject to the last
# position, so the tiny-model request ends with its subject (SmolLM2 tests cover mid-prompt subjects).
REQUEST = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
OTHER = ["The chemical symbol for gold is", "Berlin, London, Madrid"]


@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
@pytest.mark.parametrize("method", list(CONFIGS))
def test_edit_toggle_save_load(tiny, method, tmp_path):
    model, tok = tiny
    prompts = [REQUEST.prompt] + OTHER
    snap = params_snapshot(model)
    base = logits_of(model, tok, prompts)
    target_first = target_token_ids(tok, REQUEST.prompt, REQUEST.target_new)[0]
    assert greedy_next_tokens(model, tok, [REQUEST.prompt])[0] != target_first

    adapter = model.add_edit(method, REQUEST, name="e", config=CONFIGS[method])
    assert greedy_next_tokens(model, tok, [REQUEST.prompt])[0] == target_first
    edited = logits_of(model, tok, prompts)

    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, prompts), base)  # bitwise: edits off, every module runs its original code path
    model.set_active_edits([])
    assert torch.equal(logits_of(model, tok, prompts), base)  # bitwise: edits off, every module runs its original code path
    model.set_active_edits(["e"])
    assert torch.equal(logits_of(model, tok, prompts), edited)  # bitwise: the same hooks on the same saved tensors

    adapter.save_pretrained(tmp_path / "e")
    model.remove_edit("e")
    assert torch.equal(logits_of(model, tok, prompts), base)  # bitwise: edits off, every module runs its original code path
    assert_untouched(model, snap)

    loaded = model.load_edit(tmp_path / "e")
    assert loaded.name == "e" and list(model.edits) == ["e"]
    assert torch.equal(logits_of(model, tok, prompts), edited)  # bitwise: the same hooks on the same saved tensors
    model.remove_edit("e")
    assert_untouched(model, snap)


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
