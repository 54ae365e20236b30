"""MEMIT: batches, agreement with ROME for one fact, per-layer low-rank factors, bad input."""
from __future__ import annotations

import pytest
import torch

import editpeft
import editpeft.arch
from editpeft import EditRequest
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import assert_untouched, logits_of, params_snapshot

COMMON = {"v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000,
          "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
A = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
B = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Paris")


def test_one_fact_on_one_layer_matches_rome(tiny):
    """With λ → 0, MEMIT's update for one fact at one layer is ROME's: both write the same
    optimised value (same templates, same seed) with a key-aligned rank-one update."""
    model, tok = tiny
    model.add_edit("rome", A, name="r", config={"layer": 1, **COMMON})
    rome = logits_of(model, tok, [A.prompt, B.prompt])
    model.remove_edit("r")
    model.add_edit("memit", A, name="m", config={"layers": [1], "mom2_update_weight": 1e-4, **COMMON})
    memit = logits_of(model, tok, [A.prompt, B.prompt])
    # not rounding: MEMIT equals ROME only as λ → 0, so the bound is set by λ = 1e-4 (relative
    # O(λ) change of the update); a lost or doubled edit still moves the logits by O(1)
    torch.testing.assert_close(memit, rome, atol=2e-3, rtol=1e-3)


def test_batch_stores_rank_n_factors_per_layer(tiny):
    model, tok = tiny
    snap = params_snapshot(model)
    adapter = model.add_edit("memit", [A, B], name="m", config={"layers": [0, 1], "mom2_update_weight": 1.0, **COMMON})
    assert adapter.targets == [editpeft.arch.get_arch(model).mlp_out_name(0), editpeft.arch.get_arch(model).mlp_out_name(1)]
    for delta in adapter.deltas.values():
        assert delta.rank == 2
    got = greedy_next_tokens(model, tok, [A.prompt, B.prompt])
    assert got == [target_token_ids(tok, r.prompt, r.target_new)[0] for r in (A, B)]
    model.remove_edit("m")
    assert_untouched(model, snap)


def test_bad_layers_are_refused(tiny):
    model, tok = tiny
    with pytest.raises(editpeft.EditError, match="layer"):
        model.add_edit("memit", A, config={"layers": [0, 7], **COMMON})
    with pytest.raises(editpeft.ConfigError, match="ascending"):
        model.add_edit("memit", A, config={"layers": [1, 0], **COMMON})
    with pytest.raises(editpeft.InvalidRequestError, match="contradictory"):
        model.add_edit("memit", [A, EditRequest(prompt=A.prompt, subject="Eiffel Tower", target_new="Oslo")],
                       config={"layers": [0], **COMMON})
    assert not model.edits


@pytest.mark.slow
def test_embedded_batch(smol):
    model, tok = smol
    reqs = [EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="The chemical symbol for gold is", subject="gold", target_new="Ag"),
            EditRequest(prompt="The capital of Japan is", subject="Japan", target_new="Berlin")]
    other = ["The capital of France is", "The Colosseum is located in the city of", "The chemical symbol for iron is"]
    before = greedy_next_tokens(model, tok, other)
    model.add_edit("memit", reqs, name="m")
    try:
        got = greedy_next_tokens(model, tok, [r.prompt for r in reqs])
        assert got == [target_token_ids(tok, r.prompt, r.target_new)[0] for r in reqs]
        assert greedy_next_tokens(model, tok, other) == before
    finally:
        model.remove_edit("m")
