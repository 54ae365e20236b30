"""Scoring from the first edited block: replaying kept unedited states through the blocks at and
above an edit gives the whole model's scores, on every causal family; edits below the kept block,
routers and failed checks fall back to the whole model."""
from __future__ import annotations

import pytest
import torch

from editpeft.arch import get_arch
from editpeft.evaluation import evaluate
from editpeft.evaluation.prefix import PrefixStates, attached_floor, prefix_layer
from editpeft.evaluation.scoring import record_states, score_branches
from editpeft.tokens import target_token_ids

from conftest import FAMILIES, make_tiny_model, toy_eval_cases

PROMPTS = ["The capital of France is", "Berlin, London", "A fact about the tower and the city and"]


def _items(tok):
    return [(p, [target_token_ids(tok, p, "Paris"), target_token_ids(tok, p, "the river city")]) for p in PROMPTS]


def _edit_block(model, layer: int, scale: float = 0.5) -> None:
    """Change every weight matrix of block ``layer`` in place (what a weight delta does)."""
    g = torch.Generator().manual_seed(layer)
    block = list(get_arch(model).layers())[layer]
    with torch.no_grad():
        for p in block.parameters():
            if p.ndim == 2:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * p.std())


def _flat(scores):
    return [(s.logprobs, s.argmax) for item in scores for s in item]


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_scores_equal_the_whole_model(tiny_tokenizer, family):
    """float64: the replay and the whole model differ only in how matmuls are blocked (~1e-16 of the
    values' scale), so the log-probs agree to 1e-9 and the argmax exactly."""
    tok = tiny_tokenizer
    model = make_tiny_model(family, tok).double()
    items = _items(tok)
    states = PrefixStates(layer=1)
    score_branches(model, tok, items, prefix=states, record=True, max_row_tokens=40)
    assert len(states.states) == len(items)
    _edit_block(model, 1)
    want = score_branches(model, tok, items, max_row_tokens=40)
    got = score_branches(model, tok, items, prefix=states, max_row_tokens=40)
    assert states.verified is True and states.replayed == len(items)
    for (lp_got, arg_got), (lp_want, arg_want) in zip(_flat(got), _flat(want)):
        assert lp_got == pytest.approx(lp_want, rel=0, abs=1e-9)
        assert arg_got == arg_want
    # the replay really skipped block 0: its output no longer matters to the kept items
    block0 = list(get_arch(model).layers())[0]
    handle = block0.register_forward_hook(lambda m, a, out: out * float("nan") if torch.is_tensor(out) else out)
    try:
        again = score_branches(model, tok, items, prefix=states, max_row_tokens=40)
    finally:
        handle.remove()
    assert _flat(again) == _flat(got)


@pytest.mark.parametrize("recorded, bound", [(1, None), (3, 1)], ids=["one item kept", "bound after the first"])
def test_items_without_kept_states_run_the_whole_model(tiny_tokenizer, recorded, bound):
    """Items never kept, or not kept because the bound was reached (a 1-byte bound: the first segment
    already passes it), run the whole model beside the replayed ones."""
    tok = tiny_tokenizer
    model = make_tiny_model("llama", tok).double()
    items = _items(tok)
    states = PrefixStates(layer=1, **({"max_bytes": bound} if bound else {}))
    score_branches(model, tok, items[:recorded], prefix=states, record=True)
    assert len(states.states) == 1 and states.full == bool(bound)
    _edit_block(model, 1)
    want = score_branches(model, tok, items)
    got = score_branches(model, tok, items, prefix=states)
    assert states.replayed == 1
    for (lp_got, arg_got), (lp_want, arg_want) in zip(_flat(got), _flat(want)):
        assert lp_got == pytest.approx(lp_want, rel=0, abs=1e-9) and arg_got == arg_want


def test_record_states_runs_only_the_blocks_below_and_keeps_no_graph(tiny_tokenizer):
    """``record_states`` keeps states equal to a full recording pass's, built without autograd (a
    graph through the blocks below would hold their activations), and never reaches the kept block."""
    tok = tiny_tokenizer
    model = make_tiny_model("llama", tok).double()
    items = _items(tok)
    full = PrefixStates(layer=1)
    score_branches(model, tok, items, prefix=full, record=True)
    states = PrefixStates(layer=1)
    block0, block1 = list(get_arch(model).layers())[:2]
    grad_seen = []
    hooks = [block1.register_forward_hook(lambda *a: pytest.fail("block 1 ran while recording its input")),
             block0.register_forward_pre_hook(lambda *a: grad_seen.append(torch.is_grad_enabled()))]
    try:
        with torch.enable_grad():
            record_states(model, tok, items, states)
    finally:
        for h in hooks:
            h.remove()
    assert grad_seen and not any(grad_seen)
    assert states.states.keys() == full.states.keys()
    for key, kept in states.states.items():
        torch.testing.assert_close(kept, full.states[key], rtol=0, atol=1e-12)   # float64, same rows


def test_a_change_below_the_kept_block_is_caught_by_the_check(tiny_tokenizer):
    """States kept before block 0 changed are stale: the first replay's comparison with the whole
    model fails, the states are dropped and the scores are the whole model's."""
    tok = tiny_tokenizer
    model = make_tiny_model("llama", tok)
    items = _items(tok)
    states = PrefixStates(layer=1)
    score_branches(model, tok, items, prefix=states, record=True)
    _edit_block(model, 0, scale=2.0)
    want = score_branches(model, tok, items)
    got = score_branches(model, tok, items, prefix=states)
    assert states.verified is False and not states.states and states.replayed == 0
    assert _flat(got) == _flat(want)


def test_rows_of_different_lengths_pass_the_check(tiny_tokenizer):
    """One segment per row, rows of different lengths in one batch: the longer row reads columns that
    are padding in the shorter one, where the replay holds zeros and the whole model the pad token's
    own states. The check compares only what each row reads, so an exact replay is kept (it once
    compared the padding columns too and fell back to the whole model on real runs)."""
    tok = tiny_tokenizer
    model = make_tiny_model("llama", tok).double()
    with torch.no_grad():   # a trained pad embedding (the tiny config's padding_idx row is zero)
        model.get_input_embeddings().weight[tok.pad_token_id].normal_(generator=torch.Generator().manual_seed(0))
    items = _items(tok)
    states = PrefixStates(layer=1)
    score_branches(model, tok, items, prefix=states, record=True, max_row_tokens=1)
    _edit_block(model, 1)
    want = score_branches(model, tok, items, max_row_tokens=1)
    got = score_branches(model, tok, items, prefix=states, max_row_tokens=1)
    assert states.verified is True and states.replayed == len(items)
    for (lp_got, arg_got), (lp_want, arg_want) in zip(_flat(got), _flat(want)):
        assert lp_got == pytest.approx(lp_want, rel=0, abs=1e-9)   # float64: matmul blocking only
        assert arg_got == arg_want


GRACE = {"layer": 1, "eps_init": 1.0, "steps": 100}
SUBJECTS = ["Eiffel Tower", "Colosseum", "gold", "silver"]
TARGETS = ["Rome", "Paris", "Berlin", "Tokyo"]


def test_harness_scores_from_the_edited_block_with_the_same_results(tiny, tmp_path, monkeypatch):
    """A sequential GRACE run (its codebook sits in block 1) scores its locality probes from block 1,
    replayed at every checkpoint; the summary equals the whole-model run's (float32 rounding only:
    compared at 1e-6 of each value's scale, far below any score change)."""
    import editpeft.evaluation.runner as runner

    model, tok = tiny
    cases = toy_eval_cases(list(zip(SUBJECTS, TARGETS)))
    used = []
    made = runner._prefix_states

    def spy(*a):
        used.append(made(*a))
        return used[-1]
    monkeypatch.setattr(runner, "_prefix_states", spy)
    kw = dict(mode="sequential", config=GRACE, checkpoints=[2, 4], progress=False)
    with_prefix = evaluate(model, tok, "grace", cases, out=tmp_path / "a", **kw)["grace"]
    assert used[0] is not None and used[0].layer == 1 and used[0].verified and used[0].replayed > 0
    monkeypatch.setattr(runner, "_prefix_states", lambda *a: None)
    whole = evaluate(model, tok, "grace", cases, out=tmp_path / "b", **kw)["grace"]
    for metric, by_protocol in whole["metrics"].items():
        for protocol, stats in by_protocol.items():
            want, got = stats["mean"], with_prefix["metrics"][metric][protocol]["mean"]
            assert got == pytest.approx(want, rel=1e-6, abs=1e-6), (metric, protocol)


def test_no_prefix_for_routers_edits_outside_blocks_or_block_zero(tiny):
    model, _ = tiny
    arch = get_arch(model)
    top = arch.layer_name(1) + ".mlp.down_proj"
    assert prefix_layer(model, [top]) == 1
    assert prefix_layer(model, [arch.layer_name(0) + ".mlp.down_proj", top]) is None    # nothing to skip
    assert prefix_layer(model, ["lm_head"]) is None                                       # outside the blocks
    assert prefix_layer(model, None) is None                                              # unknown targets
    assert attached_floor(model) == arch.num_layers                                       # nothing attached
