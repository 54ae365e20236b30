"""The core building blocks on their own: dense deltas, patch neurons, the training loop,
adapters following the model's dtype, and the capability checks of add_edit."""
from __future__ import annotations

import json

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.adapters import WeightDeltaAdapter
from editpeft.deltas import DenseDelta
from editpeft.errors import ConfigError, EditOptimizationError
from editpeft.patches import PatchNeuronAdapter, PatchNeurons, PatchSite
from editpeft.train import TrainConfig, train_tensors

from conftest import assert_close_reordered, assert_untouched, logits_of, params_snapshot

PROMPTS = ["The city that holds the Eiffel Tower", "The chemical symbol for gold is"]
COMMON = dict(method="toy-dense", hparams={}, requests=[EditRequest(prompt=PROMPTS[0], target_new="Rome")])


@pytest.fixture(autouse=True)
def toy_methods():
    """The toy methods and the contract's reference methods are registered so that their adapters load."""
    from contextlib import ExitStack
    from editpeft.registry import registered
    from editpeft.testing import reference_methods
    from toy_methods import TOY_METHODS
    with ExitStack() as stack:
        for cls in TOY_METHODS:
            stack.enter_context(registered(cls))
        stack.enter_context(reference_methods())
        yield


def _attach(model, name, adapter):
    """Attach a hand-built adapter with the provenance add_edit would stamp (so that it saves and
    loads like any other)."""
    from editpeft.editable import _attach
    from editpeft.fingerprint import base_model_record
    adapter.base_model = base_model_record(model, model.edit_state.fingerprint(adapter.targets))
    adapter.plugin = {"distribution": "in-process", "version": None}
    _attach(model.edit_state, name, adapter)
    return adapter


def _dense(model, seed=1, rank=None):
    g = torch.Generator().manual_seed(seed)
    target = editpeft.arch.get_arch(model).mlp_out_name(0)
    d_in, d_out = editpeft.arch.linear_dims(model.get_submodule(target))
    w = torch.randn(d_out, d_in, generator=g) * 0.05
    if rank is not None:
        w = torch.randn(d_out, rank, generator=g) @ torch.randn(rank, d_in, generator=g) * 0.05
    return target, WeightDeltaAdapter({target: DenseDelta(w)}, **COMMON)


@pytest.mark.parametrize("tiny", ["llama", "gpt2", "opt"], indirect=True)
def test_dense_delta_hook_merge_save_load(tiny, tmp_path):
    model, tok = tiny
    snap, base = params_snapshot(model), logits_of(model, tok, PROMPTS)
    target, adapter = _dense(model)
    _attach(model, "d", adapter)
    hooked = logits_of(model, tok, PROMPTS)
    assert not torch.equal(hooked, base)  # the delta changes the logits by O(0.1)
    adapter.merge()
    # hook (x @ Wᵀ added) and merged weight ((W0 + W) x) sum in different orders: float32 round-off
    # through 2 blocks + head, far below the O(0.1) change the delta makes
    assert_close_reordered(logits_of(model, tok, PROMPTS), hooked, depth=3)
    adapter.unmerge()
    assert torch.equal(logits_of(model, tok, PROMPTS), hooked)  # bitwise: pristine weights back, the same hook
    adapter.save_pretrained(tmp_path / "d")
    model.remove_edit("d")
    assert_untouched(model, snap)
    loaded = model.load_edit(tmp_path / "d")
    assert isinstance(loaded.deltas[target], DenseDelta)
    assert torch.equal(logits_of(model, tok, PROMPTS), hooked)  # bitwise: reloaded tensors, the same hook


def test_added_changes_stay_factors_until_dense_is_smaller():
    """add_changes: exact sums either way (float64 products of float32 factors, stored as float32: the
    only error is that final rounding, ~6e-8 of the values' scale); factors while r·(out+in) <= out·in."""
    from editpeft.deltas import LowRankDelta, add_changes, matrix
    g = torch.Generator().manual_seed(0)

    def low(rank):
        return LowRankDelta(torch.randn(30, rank, generator=g), torch.randn(40, rank, generator=g))
    a, b = low(8), low(9)                                  # 17 x 70 = 1190 <= 1200 numbers
    joined = add_changes(a, b)
    assert isinstance(joined, LowRankDelta) and joined.rank == 17
    want = matrix(a) + matrix(b)
    torch.testing.assert_close(matrix(joined), want, rtol=0, atol=1e-12)      # the same factors, concatenated
    dense = add_changes(joined, low(1))                    # 18 x 70 > 1200: one dense matrix
    assert isinstance(dense, DenseDelta) and dense.weight.dtype == torch.float32
    for first, second in ((dense, a), (a, dense)):
        total = add_changes(first, second)
        want = matrix(first) + matrix(second)
        assert isinstance(total, DenseDelta)
        torch.testing.assert_close(matrix(total), want, rtol=0, atol=float(want.abs().max()) * 2 ** -23)
    with pytest.raises(ValueError, match="shapes"):
        add_changes(a, LowRankDelta(torch.ones(40, 1), torch.ones(30, 1)))


def test_dense_delta_saves_in_its_own_dtype(tiny, tmp_path):
    model, tok = tiny
    target, adapter = _dense(model)
    adapter.deltas[target] = DenseDelta(adapter.deltas[target].weight.to(torch.bfloat16))
    _attach(model, "d", adapter)
    logits_of(model, tok, PROMPTS)        # applies in the model's float32
    adapter.save_pretrained(tmp_path / "d")
    from safetensors.torch import load_file
    assert load_file(str(tmp_path / "d" / "edit_model.safetensors"))[f"{target}.weight"].dtype == torch.bfloat16


def test_dense_export_exact_at_its_rank_and_truncated_with_measured_error(tiny, tmp_path):
    from peft import PeftModel
    from conftest import make_tiny_model
    model, tok = tiny
    target, adapter = _dense(model, rank=3)
    _attach(model, "d", adapter)
    assert adapter.deltas[target].rank == 3
    edited = logits_of(model, tok, PROMPTS)
    adapter.to_peft_lora(tmp_path / "exact")
    cfg = json.loads((tmp_path / "exact" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and "editpeft_truncation" not in cfg
    peft_model = PeftModel.from_pretrained(make_tiny_model("llama", tok), tmp_path / "exact")
    # the SVD factors reproduce W to float32 round-off (1 stage), then LoRA vs hook through 2 blocks + head
    assert_close_reordered(logits_of(peft_model, tok, PROMPTS), edited, depth=4)

    adapter.to_peft_lora(tmp_path / "cut", max_rank=1)
    cfg = json.loads((tmp_path / "cut" / "adapter_config.json").read_text())
    err = cfg["editpeft_truncation"]["d"]["max_logit_error"]
    assert cfg["r"] == 1 and err > 0
    assert "truncated to rank 1" in (tmp_path / "cut" / "README.md").read_text()
    detached = WeightDeltaAdapter(dict(adapter.deltas), **COMMON)
    with pytest.raises(editpeft.EditError, match="attach it"):
        detached.to_peft_lora(tmp_path / "refused", max_rank=1)


@pytest.mark.parametrize("tiny", ["llama", "opt", "gpt2"], indirect=True)
def test_patch_neurons_at_the_ffn(tiny, tmp_path):
    """Patch neurons read the FFN input and add to its output; OPT's loose fc1/fc2 included."""
    model, tok = tiny
    snap, base = params_snapshot(model), logits_of(model, tok, PROMPTS)
    site = PatchSite.ffn(model, 1)
    hidden = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    patch = PatchNeurons(torch.randn(3, hidden, generator=g), torch.zeros(3), torch.randn(3, hidden, generator=g),
                         activation="relu")
    adapter = _attach(model, "p", PatchNeuronAdapter({site: patch}, **{**COMMON, "method": "toy-patch"}))
    patched = logits_of(model, tok, PROMPTS)
    assert not torch.equal(patched, base)  # the patch changes the logits
    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, PROMPTS), base)  # bitwise: edits off, original code path
    adapter.save_pretrained(tmp_path / "p")
    model.remove_edit("p")
    assert_untouched(model, snap)
    model.load_edit(tmp_path / "p")
    assert torch.equal(logits_of(model, tok, PROMPTS), patched)  # bitwise: reloaded tensors, the same hook


def test_a_silent_patch_changes_nothing(tiny):
    """A neuron whose activation is zero everywhere (ReLU of a large negative bias) is exact."""
    model, tok = tiny
    base = logits_of(model, tok, PROMPTS)
    hidden = model.config.hidden_size
    patch = PatchNeurons(torch.zeros(1, hidden), torch.full((1,), -1.0), torch.ones(1, hidden), activation="relu")
    _attach(model, "p", PatchNeuronAdapter({PatchSite.ffn(model, 0): patch}, **COMMON))
    assert torch.equal(logits_of(model, tok, PROMPTS), base)  # bitwise: the hook adds exact zeros


def test_gated_patch_formula_and_append():
    g = torch.Generator().manual_seed(0)
    keys, values, gate = (torch.randn(*shape, generator=g, dtype=torch.float64) for shape in ((2, 4), (2, 3), (2, 4)))
    bias = torch.randn(2, generator=g, dtype=torch.float64)
    a = PatchNeurons(keys, bias, values, gate=gate, activation="silu")
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    expected = (torch.nn.functional.silu(x @ keys.T + bias) * (x @ gate.T)) @ values
    torch.testing.assert_close(a(x), expected)               # float64 defaults (1e-7) ≫ eps64 reordering
    torch.testing.assert_close(a.append(a)(x), 2 * expected)   # same
    with pytest.raises(ValueError, match="key_bias"):
        PatchNeurons(torch.zeros(2, 4), torch.zeros(3), torch.zeros(2, 3))


def test_training_loop_stops_constrains_masks():
    start = torch.zeros(4)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    result = train_tensors({"w": start}, lambda p: {"target": ((p["w"] - 1) ** 2).sum()},
                           TrainConfig(steps=500, lr=0.1, linf_bound=0.5), grad_masks={"w": mask})
    assert torch.equal(start, torch.zeros(4))                   # inputs are not changed
    assert result.params["w"].tolist() == [0.5, 0.5, 0.0, 0.5]  # box of 0.5; masked entry never moves
    early = train_tensors({"w": start}, lambda p: ((p["w"] - 1) ** 2).sum(), TrainConfig(steps=500, lr=0.1, stop_loss=0.01))
    assert early.stopped_early and early.loss < 0.01 and early.steps < 500


def test_training_loop_refuses_divergence_and_bad_settings():
    with pytest.raises(EditOptimizationError, match="lower the learning rate|Lower"):
        train_tensors({"w": torch.ones(2)}, lambda p: (p["w"] * float("nan")).sum(), TrainConfig(steps=3))
    for bad in ({"lr": 0.0}, {"steps": 0}, {"linf_bound": -1.0}, {"optimizer": "lbfgs"}):
        with pytest.raises(ConfigError):
            TrainConfig(**bad)


def test_divergence_inside_a_method_leaves_the_model_untouched(tiny, monkeypatch):
    """A loss that turns NaN midway through a method's training (hooks in place) raises an
    EditOptimizationError; nothing stays attached or hooked and the weights are bitwise unchanged."""
    import editpeft.train
    model, tok = tiny
    snap = params_snapshot(model)
    real = editpeft.train.train_tensors

    def poisoned(params, loss_fn, config, **kw):
        calls = {"n": 0}

        def loss(p):
            calls["n"] += 1
            value = loss_fn(p)
            return value * float("nan") if calls["n"] > 3 else value
        return real(params, loss, config, **kw)
    monkeypatch.setattr("toy_methods.train_tensors", poisoned)
    req = EditRequest(prompt="The city that holds the Eiffel Tower", target_new="Rome")
    for method in ("toy-dense", "toy-patch", "toy-side"):
        with pytest.raises(EditOptimizationError, match="left unchanged"):
            model.add_edit(method, req, config={"steps": 10})
        assert not model.edits
        assert_untouched(model, snap)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tiny", ["llama", "gpt2"], indirect=True)
def test_adapters_follow_the_model_dtype(tiny, dtype, tmp_path):
    """After model.half()/.to(bfloat16) with a low-rank, a dense, a codebook, a patch and a router
    adapter attached, forward and generate run and match a model cast first and edited with the
    same adapters (loaded from disk) — bitwise, since both apply the same casts to the same tensors.
    (Routers with side models: tests/test_routers.py.)"""
    from conftest import make_tiny_model
    model, tok = tiny
    req = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
    model.add_edit("rome", req, name="rome", config={"layer": 0, "v_steps": 20, "context_lengths": [[4, 1]],
                                                       "stats_tokens": 2000, "clamp_norm_factor": 100.0})
    model.add_edit("grace", EditRequest(prompt="The chemical symbol for gold is", target_new="Ag"), name="grace",
                   config={"layer": 1, "steps": 20})
    _attach(model, "dense", _dense(model)[1])
    hidden = model.config.hidden_size
    _attach(model, "patch", PatchNeuronAdapter({PatchSite.ffn(model, 1): PatchNeurons(
        torch.full((1, hidden), 0.1), torch.zeros(1), torch.full((1, hidden), 0.1))}, **{**COMMON, "method": "toy-patch"}))
    model.add_edit("contract-router", req, name="router")
    for name, a in model.edits.items():
        a.save_pretrained(tmp_path / name)
    model.to(dtype)
    got = logits_of(model, tok, PROMPTS)
    assert got.dtype == dtype and torch.isfinite(got).all()
    enc = tok(PROMPTS[:1], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == enc["input_ids"].shape[1] + 3

    other = editpeft.enable_editing(make_tiny_model(model.config.model_type, tok).to(dtype), tok)
    for name in model.edits:
        other.load_edit(tmp_path / name, allow_mismatch=True)   # the fingerprint hashes the cast weights
    assert torch.equal(logits_of(other, tok, PROMPTS), got)  # bitwise: same dtype, weights and hooks
    # the saved adapters keep the dtype they were computed in
    for name, a in model.edits.items():
        assert all(t.dtype in (torch.float32, torch.int64) for t in a.state_dict().values()), name


def test_capabilities_are_checked_before_any_work(tiny):
    model, tok = tiny
    snap = params_snapshot(model)
    no_subject = EditRequest(prompt="The city that holds the Eiffel Tower", target_new="Rome")
    with pytest.raises(editpeft.InvalidRequestError, match="needs the subject"):
        model.add_edit("rome", no_subject)
    model.add_edit("grace", no_subject, name="g", config={"layer": 0, "steps": 5})
    with pytest.raises(editpeft.EditError, match="already exists"):
        model.add_edit("grace", no_subject, name="g")
    assert list(model.edits) == ["g"]
    model.remove_edit("g")
    assert_untouched(model, snap)


def test_a_module_hook_adapter_must_say_what_it_does():
    from editpeft.adapters import ModuleHookAdapter
    with pytest.raises(TypeError, match="transform"):
        class Nothing(ModuleHookAdapter):   # noqa: F841  neither transform() nor hooks()
            def state_dict(self):
                return {}


@pytest.mark.parametrize("tiny", ["llama", "opt", "gpt2", "t5"], indirect=True)
def test_a_patch_of_another_width_is_refused_on_attach(tiny):
    model, tok = tiny
    snap = params_snapshot(model)
    hidden = editpeft.arch.get_arch(model).site_width("mlp_in")
    wrong = PatchNeurons(torch.zeros(1, hidden + 1), torch.zeros(1), torch.zeros(1, hidden), activation="relu")
    with pytest.raises(editpeft.AdapterFormatError, match="made for another model"):
        _attach(model, "p", PatchNeuronAdapter({PatchSite.ffn(model, 0): wrong}, **{**COMMON, "method": "toy-patch"}))
    assert not model.edits
    assert_untouched(model, snap)


def test_flat_target_nll_equals_target_nll_at_the_target_positions(tiny):
    """Logits taken only at ``target_where`` score the same as the full logits through target_nll
    (rows of different prompt and target lengths; float64 so the two sums agree to rounding)."""
    from editpeft.tokens import TargetBatch
    model, tok = tiny
    batch = TargetBatch.for_model(model, tok, ["The capital of France is", "Gold is"], [" Paris", " a shiny metal"])
    logits = torch.randn(*batch.input_ids.shape, model.config.vocab_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    where = batch.target_where()
    assert where.shape[0] == sum(len(t) for t in batch.target_ids)
    flat = batch.flat_target_nll(logits[where[:, 0], where[:, 1]])
    assert torch.allclose(flat, batch.target_nll(logits).to(flat.dtype), rtol=1e-6)   # float32 vs float64 sums
