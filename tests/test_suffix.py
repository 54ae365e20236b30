"""The last-block replay: logits after a change to the last MLP output, from one captured forward,
equal the model's own — and the replay refuses where that identity does not hold."""
from __future__ import annotations

import pytest
import torch

from editpeft import EditRequest
from editpeft.patches import PatchNeurons, PatchSite, temporary_patch
from editpeft.suffix import LastBlockReplay, REPLAY_RTOL
from editpeft.testing import make_tiny_model
from editpeft.tokens import TargetBatch

from conftest import FAMILIES

#: Gemma 2 and 3 normalise the MLP output before adding it to the residual (post-FFN norm).
POST_FFN_NORM = {"gemma2", "gemma3_text"}


def _setup(family, tok):
    model = make_tiny_model(family, tok)
    site = PatchSite.ffn(model, model.config.num_hidden_layers - 1 if hasattr(model.config, "num_hidden_layers")
                         else model.config.n_layer - 1)
    batch = TargetBatch.for_model(model, tok, ["The city that holds the Eiffel Tower", "Gold is"],
                                  [" Rome", " shiny metal"])
    where = torch.tensor([[i, p] for i in range(2) for p in batch.target_positions(i).tolist()])
    return model, site, batch, where


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_matches_the_model_or_refuses(family, tiny_tokenizer):
    model, site, batch, where = _setup(family, tiny_tokenizer)
    replay = LastBlockReplay.capture(model, site.read, site.write, batch.model_inputs(), where)
    if family in POST_FFN_NORM:
        assert replay is None
        return
    assert replay is not None and replay.inputs.shape[0] == len(where)
    g = torch.Generator().manual_seed(1)
    d_in, d_out = replay.inputs.shape[-1], replay.outputs.shape[-1]
    patch = PatchNeurons(torch.randn(3, d_in, generator=g), torch.randn(3, generator=g),
                         torch.randn(3, d_out, generator=g), activation="relu")
    with torch.no_grad(), temporary_patch(model, site, patch):
        want = model(**batch.model_inputs()).logits[where[:, 0], where[:, 1]]
    got = replay.logits(patch(replay.inputs))
    # float32: the two paths differ in the order of one addition; bound relative to the logits' scale
    assert (got - want).abs().max() <= REPLAY_RTOL * want.abs().max()


def test_replay_refuses_when_a_hook_rewrites_the_last_block(tiny_tokenizer):
    """A hook scaling the last block's output breaks ``logits = head(y0 + delta)``: capture must notice."""
    model, site, batch, where = _setup("llama", tiny_tokenizer)
    block = model.model.layers[-1]
    handle = block.register_forward_hook(lambda m, a, out: (out[0] * 2, *out[1:]) if isinstance(out, tuple) else out * 2)
    try:
        assert LastBlockReplay.capture(model, site.read, site.write, batch.model_inputs(), where) is None
    finally:
        handle.remove()


def test_replay_only_for_the_last_block(tiny_tokenizer):
    model, _, batch, where = _setup("llama", tiny_tokenizer)
    first = PatchSite.ffn(model, 0)
    assert LastBlockReplay.capture(model, first.read, first.write, batch.model_inputs(), where) is None


def test_t_patcher_trains_the_same_neuron_with_and_without_the_replay(tiny_tokenizer, monkeypatch):
    """The replay is an exact shortcut: the neuron trained through it equals the one trained by
    running the whole model, to float32 noise (relative to the tensors' scale)."""
    import editpeft
    from conftest import TINY_CONFIGS
    config = {**TINY_CONFIGS["t-patcher"], "layer": -1, "steps": 20, "max_neurons": 1}
    request = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")

    def patch_of(model):
        adapter = editpeft.enable_editing(model, tiny_tokenizer).add_edit("t-patcher", request, config=config)
        ((_, patch),) = adapter.patches.items()
        return patch
    fast = patch_of(make_tiny_model("llama", tiny_tokenizer))
    monkeypatch.setattr(LastBlockReplay, "capture", classmethod(lambda cls, *a, **k: None))
    slow = patch_of(make_tiny_model("llama", tiny_tokenizer))
    for a, b in ((fast.keys, slow.keys), (fast.values, slow.values)):
        assert (a - b).abs().max() <= 1e-3 * b.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
def test_block_suffix_replays_the_model_with_a_hook_inside(family, tiny_tokenizer):
    """Blocks from 0 replayed with a change hooked into block 1's MLP output equal the full model."""
    from editpeft.suffix import BlockSuffix
    model, _, batch, where = _setup(family, tiny_tokenizer)
    suffix = BlockSuffix.capture(model, 0, batch.model_inputs(), where)
    assert suffix is not None and len(suffix.blocks) == 2
    g = torch.Generator().manual_seed(2)
    width = suffix.hidden.shape[-1]             # an FFN reads and writes the hidden width
    patch = PatchNeurons(torch.randn(2, width, generator=g), torch.randn(2, generator=g),
                         torch.randn(2, width, generator=g))
    with torch.no_grad(), temporary_patch(model, PatchSite.ffn(model, 1), patch):
        want = model(**batch.model_inputs()).logits[where[:, 0], where[:, 1]]
        got = suffix.logits(where)
    assert (got - want).abs().max() <= REPLAY_RTOL * want.abs().max()


# -- the locate-then-edit value optimisation from the edited block up ----------------------------
VALUE_OPTIONS = dict(steps=5, lr=0.5, kl_factor=0.0625, weight_decay=0.5, clamp_norm_factor=1000.0, stop_nll=1e-9)
TEMPLATES = ["{}", "Once upon a time. {}"]
REQUESTS = [EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome"),
            EditRequest(prompt="{} is made of", subject="Gold", target_new="shiny metal")]


def _forwards(model):
    """A list that grows by one at every whole-model forward, and the hook's handle."""
    calls: list[int] = []
    return calls, model.register_forward_pre_hook(lambda m, a: calls.append(1))


def _values(model, tok, *, suffix: bool, chunk: int = 1):
    from editpeft.arch import get_arch
    from editpeft.locate import optimize_values
    name = get_arch(model).mlp_out_name(1)
    calls, handle = _forwards(model)
    try:
        out = optimize_values(model, tok, name, REQUESTS, TEMPLATES, suffix=suffix, chunk=chunk, **VALUE_OPTIONS)
    finally:
        handle.remove()
    return torch.stack([r.delta for r in out]), len(calls)


@pytest.mark.parametrize("family", FAMILIES)
def test_value_optimisation_from_the_edited_block_equals_the_whole_model(family, tiny_tokenizer):
    """In float64 the replayed steps and the whole-model steps give the same deltas up to the
    rounding of the float32 deltas themselves (each of the 5 Adam steps may round a gradient to a
    neighbouring float32: depth 2 per step); the replay runs the model whole only once."""
    from conftest import assert_close_reordered
    model = make_tiny_model(family, tiny_tokenizer).double()
    fast, fast_calls = _values(model, tiny_tokenizer, suffix=True)
    slow, slow_calls = _values(model, tiny_tokenizer, suffix=False)
    assert fast_calls == len(REQUESTS) and slow_calls == len(REQUESTS) * (VALUE_OPTIONS["steps"] + 1)
    assert slow.abs().max() > 0
    assert_close_reordered(fast, slow, depth=2 * VALUE_OPTIONS["steps"])


def test_value_optimisation_in_chunks_keeps_finished_deltas(tiny_tokenizer):
    """Two requests optimised in one chunk give what each gives alone, on both paths (finished
    requests' deltas must stay as recorded while the others go on)."""
    from conftest import assert_close_reordered
    model = make_tiny_model("llama", tiny_tokenizer).double()
    alone, _ = _values(model, tiny_tokenizer, suffix=False)
    for suffix in (True, False):
        together, _ = _values(model, tiny_tokenizer, suffix=suffix, chunk=2)
        assert_close_reordered(together, alone, depth=2 * VALUE_OPTIONS["steps"])


def test_value_optimisation_falls_back_when_the_replay_differs(tiny_tokenizer):
    """A hook between the last block and the head (here: scaling the body's normalised output) is
    not part of the replay; the first step notices and the whole model runs, as with ``suffix=False``."""
    model = make_tiny_model("llama", tiny_tokenizer).double()

    def scale(module, args, out):
        out.last_hidden_state = out.last_hidden_state * 1.5
        return out
    handle = model.model.register_forward_hook(scale)
    try:
        fast, fast_calls = _values(model, tiny_tokenizer, suffix=True)
        slow, _ = _values(model, tiny_tokenizer, suffix=False)
    finally:
        handle.remove()
    assert fast_calls == len(REQUESTS) * (VALUE_OPTIONS["steps"] + 1)
    assert torch.equal(fast, slow)   # the same code path on the same inputs after the fallback
