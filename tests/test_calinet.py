"""CaliNet: calibration slots FFN_c(x) = act(x K_cᵀ) [⊙ x G_cᵀ] V_c added to a host FFN's output,
the slot form copied from the host, trained on the edits with the model frozen; appends train the
same slots further; failures leave the model and the attached adapter exactly as they were."""
from __future__ import annotations

import math

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.errors import ConfigError, EditError, EditOptimizationError
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import (TINY_CONFIGS, assert_close_reordered, assert_untouched, logits_of, make_tiny_model,
                      params_snapshot, rounding_atol)

CN = TINY_CONFIGS["calinet"]
R1 = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
R2 = EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")
PROBES = [R1.prompt, R2.prompt, "Berlin, London, Madrid"]


def _hand_act(name: str, z: torch.Tensor) -> torch.Tensor:
    """The activations written out in float64 (not through transformers' table)."""
    if name == "silu":
        return z / (1 + torch.exp(-z))
    if name == "gelu_new":
        return 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z ** 3)))
    raise AssertionError(name)


@pytest.mark.parametrize("tiny, act, gated", [("llama", "silu", True), ("gpt2", "gelu_new", False)],
                         indirect=["tiny"])
def test_slots_add_the_hand_computed_calibration_ffn(tiny, act, gated):
    """With the adapter on, the host FFN's output grows by exactly (act(x K_cᵀ) [⊙ x G_cᵀ]) V_c for
    its own input x, computed here by hand in float64."""
    model, tok = tiny
    adapter = model.add_edit("calinet", R1, name="c", config={**CN, "slots": 8})
    ((site, slots),) = adapter.patches.items()
    assert len(slots) == 8 and slots.activation == act and (slots.gate is not None) == gated
    mlp = model.get_submodule(site.write)
    x, edited = _mlp_io(model, tok, mlp)
    with model.disabled_edits():
        x_base, base = _mlp_io(model, tok, mlp)
    assert torch.equal(x, x_base)                    # nothing before the calibrated FFN changed
    x = x.double()
    a = _hand_act(act, x @ slots.keys.double().T)
    if gated:
        a = a * (x @ slots.gate.double().T)
    want = a @ slots.values.double()
    assert float(want.abs().max()) > 1e-3          # the slots do contribute
    # float32 hook (a 32-wide dot product, then the 8-slot product, then the addition to the
    # host's output): 3 reordered stages at the scale of the largest term (conftest's rule)
    scale = max(float(want.abs().max()), float(base.abs().max()))
    torch.testing.assert_close((edited - base).double(), want, atol=rounding_atol(scale, 3), rtol=0)


def _mlp_io(model, tok, mlp) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN's input and its (hooked) output on R1's prompt."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = mlp.register_forward_hook(lambda m, args, y: seen.append((args[0].detach().clone(), y.detach().clone())))
    try:
        logits_of(model, tok, [R1.prompt])
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("family, act, gated", [("llama", "silu", True), ("gemma", "gelu_pytorch_tanh", True),
                                                ("gpt_neox", "gelu", False), ("opt", "relu", False),
                                                ("t5", "relu", False), ("mt5", "gelu_new", True)])
def test_slot_form_follows_the_host_ffn(family, act, gated, tiny_tokenizer):
    from editpeft_calinet import CaliNetConfig, _sites, host_form
    model = make_tiny_model(family, tiny_tokenizer)
    (site,) = _sites(model, CaliNetConfig())
    assert host_form(model, site) == (act, gated)
    if model.config.is_encoder_decoder:
        assert site.write.startswith("decoder.")        # the paper calibrates the decoder's FFN


def test_fresh_slots_start_as_the_base_model_and_are_seeded():
    from editpeft_calinet import fresh_slots
    make = lambda seed: fresh_slots(16, 12, 64, gated=True, activation="silu",  # noqa: E731
                                    generator=torch.Generator().manual_seed(seed))
    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.gate, b.gate) and not torch.equal(a.keys, c.keys)
    assert not torch.equal(a.keys, a.gate)
    assert float(a.keys.abs().max()) <= 1 / math.sqrt(16) and torch.count_nonzero(a.values) == 0
    assert torch.count_nonzero(a(torch.randn(5, 16))) == 0          # zero values: adds exactly nothing


def test_save_load_append_round_trip_is_bitwise(tiny, tmp_path):
    """Save → load gives the same tensors and logits; append trains the same slots further (no new
    slots), keeps both edits, and saves/loads bitwise again."""
    model, tok = tiny
    snap = params_snapshot(model)
    first = model.add_edit("calinet", R1, name="c", config={**CN, "slots": 16})
    first.save_pretrained(tmp_path / "one")
    expected = logits_of(model, tok, PROBES)
    model.remove_edit("c")
    assert_untouched(model, snap)
    loaded = model.load_edit(tmp_path / "one")
    for k, v in first.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k       # bitwise: safetensors round trip
    assert torch.equal(logits_of(model, tok, PROBES), expected)

    grown = model.add_edit("calinet", R2, name="c", append=True)
    ((_, slots),) = grown.patches.items()
    assert len(slots) == 16 and len(grown.requests) == 2
    assert not torch.equal(slots.values, loaded.patches[next(iter(loaded.patches))].values)
    want = [target_token_ids(tok, r.prompt, r.target_new)[0] for r in (R1, R2)]
    assert greedy_next_tokens(model, tok, [R1.prompt, R2.prompt]) == want      # replay kept the first edit
    grown.save_pretrained(tmp_path / "two")
    expected = logits_of(model, tok, PROBES)
    model.remove_edit("c")
    assert_untouched(model, snap)
    again = model.load_edit(tmp_path / "two")
    assert [r.prompt for r in again.requests] == [R1.prompt, R2.prompt]
    assert torch.equal(logits_of(model, tok, PROBES), expected)


def test_replay_sample_is_bounded_and_reproducible(tiny, monkeypatch):
    import editpeft_calinet as cn
    model, tok = tiny
    facts = [EditRequest(prompt=f"A fact about the {w}", target_new=t)
             for w, t in [("tower", "Rome"), ("river", "Paris"), ("city", "Berlin"), ("gold", "Ag")]]
    model.add_edit("calinet", facts[:3], name="c", config={**CN, "slots": 8, "replay": 1, "steps": 5})
    trained_on = []
    real = cn._Objective.__init__

    def spy(self, model, tokenizer, sites, prompts, targets):
        trained_on.append(list(prompts))
        real(self, model, tokenizer, sites, prompts, targets)
    monkeypatch.setattr(cn._Objective, "__init__", spy)
    model.add_edit("calinet", facts[3], name="c", append=True)
    assert len(trained_on[-1]) == 2 and trained_on[-1][-1] == facts[3].prompt
    first_draw = trained_on[-1][0]
    model.remove_edit("c")
    model.add_edit("calinet", facts[:3], name="c", config={**CN, "slots": 8, "replay": 1, "steps": 5})
    model.add_edit("calinet", facts[3], name="c", append=True)
    assert trained_on[-1][0] == first_draw                     # seeded: the same draw again


@torch.no_grad()
def test_the_fast_paths_equal_the_full_model(tiny):
    """The last-block replay and the block suffix give the full model's logits at the target
    positions (the same mathematics, float32 additions in another order)."""
    from editpeft_calinet import _Objective, _sites, CaliNetConfig, fresh_slots
    model, tok = tiny
    prompts, targets = [R1.prompt, R2.prompt], [R1.target_new, "silver metal"]
    g = torch.Generator().manual_seed(3)
    for layers in ([1], [0, 1]):
        sites = _sites(model, CaliNetConfig(layers=layers))
        patches = {s: fresh_slots(32, 32, 8, gated=True, activation="silu", generator=g) for s in sites}
        patches = {s: p.with_tensors(values=torch.randn(8, 32, generator=g)) for s, p in patches.items()}
        fast = _Objective(model, tok, sites, prompts, targets)
        assert (fast.replay is not None) == (layers == [1]) and (fast.suffix is not None) == (layers == [0, 1])
        full = _Objective(model, tok, sites, prompts, targets)
        full.replay = full.suffix = None
        want = full.logits(patches)
        assert want.shape[0] == len(fast.where) == 1 + len(tok(" silver metal", add_special_tokens=False)["input_ids"])
        # two blocks and the head, reordered: depth 3 (conftest's rule)
        assert_close_reordered(fast.logits(patches), want, depth=3)


def test_several_layers_one_adapter(tiny):
    model, tok = tiny
    adapter = model.add_edit("calinet", R1, name="c", config={**CN, "layers": [0, 1], "slots": 8})
    assert len(adapter.patches) == 2 and len(adapter) == 16
    assert greedy_next_tokens(model, tok, [R1.prompt])[0] == target_token_ids(tok, R1.prompt, "Rome")[0]


@pytest.mark.parametrize("bad, match", [
    ({"slots": 0}, "slots"), ({"layers": []}, "layers"), ({"layers": [-2]}, "layers"),
    ({"activation": "nope"}, "activation"), ({"replay": -1}, "replay"), ({"steps": 0}, "steps"),
    ({"lr": "fast"}, "lr"), ({"slots": 8.5}, "slots"), ({"gated": "yes"}, "gated"), ({"layers": 0}, "layers")])
def test_bad_config(bad, match):
    from editpeft_calinet import CaliNetConfig
    with pytest.raises(ConfigError, match=match):
        CaliNetConfig(**bad)


@pytest.fixture
def nan_loss(monkeypatch):
    """The training objective turns NaN (as a diverging optimisation would)."""
    import editpeft_calinet as cn
    real = cn._Objective.nll
    monkeypatch.setattr(cn._Objective, "nll", lambda self, patches: real(self, patches) * math.nan)


@pytest.mark.parametrize("config, match", [({"layers": [5]}, "outside"), ({"layers": [0, 0]}, "twice"),
                                           ({"steps": 3}, "NaN|nan")])
def test_failed_edit_leaves_the_model_as_it_was(tiny, config, match, request):
    """A layer the model lacks, a block named twice, and a NaN during the optimisation are refused
    with the model bitwise untouched."""
    model, tok = tiny
    if "steps" in config:
        request.getfixturevalue("nan_loss")
    snap, base = params_snapshot(model), logits_of(model, tok, PROBES)
    with pytest.raises(EditError, match=match):
        model.add_edit("calinet", R1, name="c", config={**CN, **config})
    assert not model.edits
    assert_untouched(model, snap)
    assert torch.equal(logits_of(model, tok, PROBES), base)


def test_failed_append_keeps_the_attached_adapter(tiny, monkeypatch):
    import editpeft_calinet as cn
    model, tok = tiny
    adapter = model.add_edit("calinet", R1, name="c", config={**CN, "slots": 8})
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    edited = logits_of(model, tok, PROBES)
    with pytest.raises(ConfigError, match="append trains the adapter's own slots"):
        model.add_edit("calinet", R2, name="c", append=True, config={"layers": [1]})
    real = cn._Objective.nll
    monkeypatch.setattr(cn._Objective, "nll", lambda self, patches: real(self, patches) * math.nan)
    with pytest.raises(EditOptimizationError, match="left unchanged"):
        model.add_edit("calinet", R2, name="c", append=True)
    assert model.edits["c"] is adapter and adapter.active and len(adapter.requests) == 1
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(logits_of(model, tok, PROBES), edited)


def test_a_corrupt_adapter_file_is_refused(tiny, tmp_path):
    model, tok = tiny
    snap = params_snapshot(model)
    model.add_edit("calinet", R1, name="c", config={**CN, "slots": 8}).save_pretrained(tmp_path / "c")
    model.remove_edit("c")
    weights = tmp_path / "c" / "edit_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(EditError):
        model.load_edit(tmp_path / "c")
    assert not model.edits
    assert_untouched(model, snap)


def test_an_adapter_for_another_width_is_refused(tiny, tmp_path, tiny_tokenizer):
    """Slots made for another model (here: saved from llama, loaded into a mistral of the same
    shape but another fingerprint) are refused before attaching."""
    model, tok = tiny
    model.add_edit("calinet", R1, name="c", config={**CN, "slots": 8}).save_pretrained(tmp_path / "c")
    other = editpeft.enable_editing(make_tiny_model("mistral", tiny_tokenizer), tiny_tokenizer)
    snap = params_snapshot(other)
    with pytest.raises(EditError):
        other.load_edit(tmp_path / "c")
    assert not other.edits
    assert_untouched(other, snap)
