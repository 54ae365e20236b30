"""Bad input: a clear error, and the model exactly as it was."""
from __future__ import annotations

import json

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.errors import (AdapterFormatError, BaseModelMismatchError, ConfigError, EditError,
                             EditOptimizationError, InvalidRequestError, MethodNotInstalledError,
                             UnknownMethodError, UnsupportedModelError)

from conftest import assert_untouched, make_tiny_model, params_snapshot

REQ = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
ROME = {"layer": 0, "stats_tokens": 2000, "context_lengths": [[4, 1]], "v_steps": 5}
GRACE = {"layer": 0, "steps": 5}


def test_subject_not_in_prompt():
    with pytest.raises(InvalidRequestError, match="does not occur in the prompt"):
        EditRequest(prompt="The Eiffel Tower is in", subject="Colosseum", target_new="Rome")


@pytest.mark.parametrize("target", ["", "   "])
def test_empty_target(target):
    with pytest.raises(InvalidRequestError, match="target_new is (empty|only whitespace)"):
        EditRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower", target_new=target)


def test_placeholder_fills_subject():
    r = EditRequest(prompt="{} is located in", subject="The Louvre", target_new="Rome")
    assert r.prompt == "The Louvre is located in" and r.subject_span == (0, 10)
    with pytest.raises(InvalidRequestError, match="no subject"):
        EditRequest(prompt="{} is located in", target_new="Rome")


def test_request_round_trip_and_unknown_field():
    r = EditRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower", target_new="Rome", target_true="Paris")
    assert EditRequest.from_dict(r.to_dict()) == r
    with pytest.raises(InvalidRequestError, match="unknown request field"):
        EditRequest.from_dict({"prompt": "x", "target_new": "y", "colour": 1})


def test_unknown_method_lists_installed(tiny):
    model, _ = tiny
    snap = params_snapshot(model)
    with pytest.raises(UnknownMethodError, match=r"installed methods: .*grace.*rome"):
        model.add_edit("romee", REQ)
    assert_untouched(model, snap)


def test_mixed_request_list(tiny):
    model, _ = tiny
    snap = params_snapshot(model)
    with pytest.raises(InvalidRequestError, match="item 1 of the request list is a dict"):
        model.add_edit("rome", [REQ, {"prompt": "x", "target_new": "y"}])
    with pytest.raises(InvalidRequestError, match="expected an EditRequest"):
        model.add_edit("rome", "The Eiffel Tower is in Rome")
    assert_untouched(model, snap)
    assert not model.edits


def test_rome_needs_subject(tiny):
    model, _ = tiny
    with pytest.raises(InvalidRequestError, match="needs the subject"):
        model.add_edit("rome", EditRequest(prompt="The city is", target_new="Rome"), config=ROME)


def test_layer_out_of_range_and_bad_config(tiny):
    model, _ = tiny
    snap = params_snapshot(model)
    with pytest.raises(ConfigError, match="outside this model, which has 2 layers"):
        model.add_edit("rome", REQ, config={"layer": 99})
    with pytest.raises(ConfigError, match="unknown RomeConfig field"):
        model.add_edit("rome", REQ, config={"layr": 1})
    with pytest.raises(ConfigError, match="must be finite"):
        model.add_edit("grace", REQ, config={"lr": float("nan")})
    assert_untouched(model, snap)


def test_nan_during_optimisation_leaves_model_untouched(tiny):
    model, tok = tiny
    snap = params_snapshot(model)
    layer = model.model.layers[1]
    handle = layer.mlp.register_forward_hook(lambda m, a, out: out * float("nan"))
    try:
        for method, cfg in (("rome", ROME), ("grace", GRACE)):
            with pytest.raises(EditOptimizationError, match="left unchanged"):
                model.add_edit(method, REQ, config=cfg)
    finally:
        handle.remove()
    assert_untouched(model, snap)
    assert not model.edits


def _rome_target(model) -> str:
    from editpeft.arch import get_arch
    return get_arch(model).mlp_out_name(ROME["layer"])


def test_duplicate_name_and_append_rules(tiny):
    model, _ = tiny
    model.add_edit("rome", REQ, name="a", config=ROME)
    with pytest.raises(EditError, match="already exists"):
        model.add_edit("rome", REQ, name="a", config=ROME)
    other = EditRequest(prompt="The river that runs by the {}", subject="tower", target_new="Berlin")
    assert model.add_edit("rome", other, name="a", append=True).deltas[_rome_target(model)].rank == 2
    with pytest.raises(EditError, match="cannot append 'grace' edits"):
        model.add_edit("grace", REQ, name="a", config=GRACE, append=True)
    with pytest.raises(EditError, match="no edit named 'b'"):
        model.remove_edit("b")


def test_unsupported_family():
    import transformers as tf
    bert = tf.BertLMHeadModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, is_decoder=True))
    with pytest.raises(UnsupportedModelError, match="supported families: .*llama"):
        editpeft.enable_editing(bert, None)


@pytest.fixture
def saved(tiny, tmp_path):
    model, tok = tiny
    adapter = model.add_edit("grace", REQ, name="g", config=GRACE)
    path = tmp_path / "g"
    adapter.save_pretrained(path)
    model.remove_edit("g")
    return model, tok, path


def test_missing_file(saved):
    model, _, path = saved
    snap = params_snapshot(model)
    (path / "edit_model.safetensors").unlink()
    with pytest.raises(AdapterFormatError, match="edit_model.safetensors is missing"):
        model.load_edit(path)
    assert_untouched(model, snap)
    assert not model.edits


def test_corrupt_config(saved):
    model, _, path = saved
    (path / "edit_config.json").write_text("{not json")
    with pytest.raises(AdapterFormatError, match="not valid JSON"):
        model.load_edit(path)


def test_tampered_tensors(saved):
    model, _, path = saved
    blob = bytearray((path / "edit_model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (path / "edit_model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(AdapterFormatError, match="corrupt or were modified"):
        model.load_edit(path)


def test_method_not_installed_names_distribution(saved):
    model, _, path = saved
    cfg = json.loads((path / "edit_config.json").read_text())
    cfg["method"] = "not-a-method"
    cfg["plugin"] = {"distribution": "editpeft-not-a-method", "version": "1.0"}
    (path / "edit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MethodNotInstalledError, match="pip install editpeft-not-a-method"):
        model.load_edit(path)
    assert not model.edits


def test_other_weights_mismatch(saved, tiny_tokenizer):
    model, tok, path = saved
    other = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer, seed=1), tiny_tokenizer)
    snap = params_snapshot(other)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        other.load_edit(path)
    assert_untouched(other, snap)
    other.load_edit(path, allow_mismatch=True)
    assert list(other.edits) == ["g"]


def test_other_family_mismatch(saved, tiny_tokenizer):
    _, _, path = saved
    gpt2 = editpeft.enable_editing(make_tiny_model("gpt2", tiny_tokenizer), tiny_tokenizer)
    with pytest.raises(BaseModelMismatchError, match="made for a 'llama' model.*this model is 'gpt2'"):
        gpt2.load_edit(path)
    assert not gpt2.edits
