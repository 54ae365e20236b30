"""Hub round trips with the real huggingface_hub client against a loopback server (no network)."""
from __future__ import annotations

import json

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.cli import main

from conftest import assert_untouched, logits_of, params_snapshot
from hub_server import pointed_at_loopback

GRACE = {"layer": 0, "eps_init": 1.0, "steps": 100}
REQ = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
REQ2 = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Paris")
PROMPTS = [REQ.prompt, REQ2.prompt, "Berlin, London, Madrid"]


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with pointed_at_loopback(monkeypatch, tmp_path / "hf-cache") as server:
        yield server


def test_push_pull_identical_logits_update_and_revision(tiny, hub, monkeypatch, tmp_path):
    from huggingface_hub import constants
    model, tok = tiny
    snap = params_snapshot(model)
    base = logits_of(model, tok, PROMPTS)
    adapter = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    edited = logits_of(model, tok, PROMPTS)
    url = adapter.push_to_hub("user/eiffel", commit_message="first")
    first_commit = url.rsplit("/", 1)[-1]
    model.remove_edit("eiffel")
    assert torch.equal(logits_of(model, tok, PROMPTS), base)  # bitwise: edits off, every module runs its original code path

    loaded = model.load_edit("user/eiffel")
    assert torch.equal(logits_of(model, tok, PROMPTS), edited)  # bitwise: the same hooks on the same saved tensors
    assert loaded.requests == [REQ]

    # a second push (an appended fact) updates the repo; the first revision stays pinned
    grown = model.add_edit("grace", REQ2, name="eiffel", config=GRACE, append=True)
    both = logits_of(model, tok, PROMPTS)
    grown.push_to_hub("user/eiffel")
    model.remove_edit("eiffel")
    model.load_edit("user/eiffel")
    assert torch.equal(logits_of(model, tok, PROMPTS), both)  # bitwise: the same stack in the same order
    model.remove_edit("eiffel")
    model.load_edit("user/eiffel", revision=first_commit)
    assert torch.equal(logits_of(model, tok, PROMPTS), edited)  # bitwise: the same hooks on the same saved tensors
    model.remove_edit("eiffel")

    # offline: what was downloaded loads from the local cache
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model.load_edit("user/eiffel")
    assert torch.equal(logits_of(model, tok, PROMPTS), both)  # bitwise: the same stack in the same order
    model.remove_edit("eiffel")
    with pytest.raises(editpeft.EditError, match="local Hugging Face cache"):
        model.load_edit("user/never-downloaded")
    assert_untouched(model, snap)


def test_several_adapters_in_one_repo(tiny, hub, tmp_path, capsys):
    model, tok = tiny
    a = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    b = model.add_edit("grace", REQ2, name="colosseum", config=GRACE)
    a.push_to_hub("user/edits", subfolder="eiffel")
    b.save_pretrained(tmp_path / "colosseum")
    assert main(["push", str(tmp_path / "colosseum"), "user/edits", "--subfolder", "colosseum"]) == 0
    with_both = logits_of(model, tok, PROMPTS)
    model.remove_edit("eiffel")
    model.remove_edit("colosseum")
    with pytest.raises(editpeft.AdapterFormatError, match="several adapters .*colosseum, eiffel"):
        model.load_edit("user/edits")
    model.load_edit("user/edits", subfolder="eiffel")
    model.load_edit("user/edits", subfolder="colosseum")
    assert list(model.edits) == ["eiffel", "colosseum"]
    assert torch.equal(logits_of(model, tok, PROMPTS), with_both)  # bitwise: the same stack in the same order


def test_hub_errors_leave_the_model_unchanged(tiny, hub, tmp_path):
    model, tok = tiny
    snap = params_snapshot(model)
    adapter = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    adapter.push_to_hub("user/eiffel")
    model.remove_edit("eiffel")
    with pytest.raises(editpeft.EditError, match="does not exist"):
        model.load_edit("user/missing")
    with pytest.raises(editpeft.EditError, match="no revision"):
        model.load_edit("user/eiffel", revision="v9")
    hub.fail_downloads = True
    with pytest.raises(editpeft.EditError, match="network|failed"):
        model.load_edit("user/eiffel")
    hub.fail_downloads = False
    assert not model.edits
    assert_untouched(model, snap)

    # tampered tensors on the Hub: the hash check refuses them
    repo = hub.repos["user/eiffel"]
    oid, files = repo.commits[-1]
    blob = bytearray(files["edit_model.safetensors"])
    blob[-1] ^= 0xFF
    files = {**files, "edit_model.safetensors": bytes(blob)}
    repo.commits.append(("f" * 40, files))
    repo.branches["main"] = "f" * 40
    with pytest.raises(editpeft.AdapterFormatError, match="corrupt or were modified"):
        model.load_edit("user/eiffel")
    assert not model.edits
    assert_untouched(model, snap)


def test_bytes_moved_are_small(tiny, hub):
    model, tok = tiny
    adapter = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    adapter.push_to_hub("user/eiffel")
    model.remove_edit("eiffel")
    model.load_edit("user/eiffel")
    total = hub.bytes_in + hub.bytes_out
    assert 0 < total < 50_000, total


def test_card_round_trips_through_model_card(tiny, tmp_path):
    from huggingface_hub import ModelCard
    model, tok = tiny
    model.editpeft_license = "apache-2.0"
    adapter = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    adapter.metrics = {"reliability (token_em)": 1.0}
    adapter.save_pretrained(tmp_path / "e")
    card = ModelCard.load(tmp_path / "e" / "README.md")
    assert card.data.library_name == "editpeft" and card.data.license == "apache-2.0"
    assert {"editpeft", "knowledge-editing", "grace"} <= set(card.data.tags)
    assert "| Eiffel Tower | The city that holds the Eiffel Tower |  | Rome |" in card.text
    assert "| reliability (token_em) | 1.0 |" in card.text
    card.save(tmp_path / "e" / "README.md")
    model.remove_edit("eiffel")
    model.load_edit(tmp_path / "e")      # a card re-saved by huggingface_hub still loads


def test_card_contradicting_config_is_refused(tiny, tmp_path):
    model, tok = tiny
    adapter = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    adapter.save_pretrained(tmp_path / "e")
    model.remove_edit("eiffel")
    readme = tmp_path / "e" / "README.md"
    readme.write_text(readme.read_text().replace("library_name: editpeft", "library_name: diffusers"))
    with pytest.raises(editpeft.AdapterFormatError, match="library_name"):
        model.load_edit(tmp_path / "e")
    assert not model.edits


def test_inspect_prints_provenance_without_a_model(tiny, tmp_path, capsys):
    model, tok = tiny
    adapter = model.add_edit("grace", REQ, name="eiffel", config=GRACE)
    adapter.save_pretrained(tmp_path / "e")
    assert main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    cfg = json.loads((tmp_path / "e" / "edit_config.json").read_text())
    for text in ("grace", "module_hook", cfg["base_model"]["fingerprint"], cfg["tensors_sha256"], "verified",
                 "Eiffel Tower", "editpeft " + editpeft.__version__):
        assert text in out


def test_wrong_dtype_or_shape_in_a_shared_file_is_refused(tiny, tmp_path):
    """A file whose hash was recomputed by a tamperer still has to match the model's modules."""
    import hashlib

    from safetensors.torch import load_file, save_file
    rome = {"layer": 0, "v_steps": 20, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 2000,
            "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
    model, tok = tiny
    snap = params_snapshot(model)
    model.add_edit("rome", REQ, name="r", config=rome).save_pretrained(tmp_path / "r")
    model.remove_edit("r")
    for change, message in [(lambda t: t.to(torch.int32), "floating point"),
                            (lambda t: torch.cat([t, t]), "made for another model")]:
        folder = tmp_path / f"bad-{message[:5]}"
        import shutil
        shutil.copytree(tmp_path / "r", folder)
        tensors = load_file(folder / "edit_model.safetensors")
        key = next(k for k in tensors if k.endswith(".up"))
        tensors[key] = change(tensors[key])
        save_file(tensors, folder / "edit_model.safetensors")
        cfg = json.loads((folder / "edit_config.json").read_text())
        cfg["tensors_sha256"] = hashlib.sha256((folder / "edit_model.safetensors").read_bytes()).hexdigest()
        (folder / "edit_config.json").write_text(json.dumps(cfg))
        with pytest.raises(editpeft.AdapterFormatError, match=message):
            model.load_edit(folder)
        assert not model.edits
    assert_untouched(model, snap)
