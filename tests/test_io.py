"""Adapter folder: contents, model card, atomic writes, small size."""
from __future__ import annotations

import json

import pytest
import yaml

import editpeft
import editpeft.io as eio
from editpeft import EditRequest

REQ = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome", target_true="Paris")
ROME = {"layer": 0, "stats_tokens": 2000, "context_lengths": [[4, 1]], "v_steps": 5}


def test_folder_contents(tiny, tmp_path):
    model, _ = tiny
    adapter = model.add_edit("rome", REQ, name="eiffel", config=ROME)
    adapter.save_pretrained(tmp_path / "eiffel")
    files = sorted(p.name for p in (tmp_path / "eiffel").iterdir())
    # the three files, and the (empty, hidden) lock file that readers and writers share
    assert files == [".editpeft.lock", "README.md", "edit_config.json", "edit_model.safetensors"]
    assert (tmp_path / "eiffel" / ".editpeft.lock").stat().st_size == 0
    cfg = json.loads((tmp_path / "eiffel" / "edit_config.json").read_text())
    assert cfg["format"] == "editpeft/1" and cfg["method"] == "rome" and cfg["kind"] == "weight_delta"
    assert cfg["plugin"]["distribution"] == "editpeft"
    assert cfg["base_model"]["model_type"] == "llama" and cfg["base_model"]["fingerprint"].startswith("sha256:")
    assert cfg["targets"] == ["model.layers.0.mlp.down_proj"]
    assert cfg["requests"][0]["target_true"] == "Paris" and cfg["hparams"]["layer"] == 0
    card = (tmp_path / "eiffel" / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "editpeft" and "rome" in front["tags"]
    assert "| Eiffel Tower |" in card


def test_crash_while_writing_leaves_no_folder(tiny, tmp_path, monkeypatch):
    import editpeft.atomic as atomic
    model, _ = tiny
    adapter = model.add_edit("rome", REQ, name="e", config=ROME)
    adapter.save_pretrained(tmp_path / "e")
    before = {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()}
    calls = []

    def failing_write(path, data):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return original(path, data)
    original = atomic.write_synced
    monkeypatch.setattr(atomic, "write_synced", failing_write)
    with pytest.raises(editpeft.AdapterFormatError, match="No space left"):
        adapter.save_pretrained(tmp_path / "e")
    with pytest.raises(editpeft.AdapterFormatError, match="No space left"):
        calls.clear()
        adapter.save_pretrained(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "e").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
