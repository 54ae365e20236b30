"""Saving never deletes what it did not write, is whole for readers and concurrent writers, and
handles '.', links and interruptions without surprises."""
from __future__ import annotations

import json
import os
import threading

import pytest

import editpeft
from editpeft.atomic import LOCK_NAME, TMP_PREFIX
from editpeft.io import read_adapter_files
from editpeft.testing import DEFAULT_REQUEST

from conftest import TINY_CONFIGS

GOLD = editpeft.EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")


@pytest.fixture
def two(tiny):
    model, _ = tiny
    rome = model.add_edit("rome", DEFAULT_REQUEST, name="eiffel", config=TINY_CONFIGS["rome"])
    grace = model.add_edit("grace", GOLD, name="gold", config=TINY_CONFIGS["grace"])
    return rome, grace


def _names(folder):
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def test_saving_into_a_parent_of_adapters_deletes_nothing(two, tmp_path):
    rome, grace = two
    rome.save_pretrained(tmp_path / "edits" / "eiffel")
    grace.save_pretrained(tmp_path / "edits" / "gold")
    with pytest.raises(editpeft.AdapterFormatError, match="holds other files.*overwrite=True"):
        grace.save_pretrained(tmp_path / "edits")
    assert read_adapter_files(tmp_path / "edits" / "eiffel")[0]["method"] == "rome"
    assert read_adapter_files(tmp_path / "edits" / "gold")[0]["method"] == "grace"
    assert _names(tmp_path / "edits") == ["eiffel", "gold"]


def test_overwrite_writes_next_to_other_files_and_keeps_them(two, tmp_path):
    rome, _ = two
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(editpeft.AdapterFormatError, match="notes.txt"):
        rome.save_pretrained(folder)
    assert _names(folder) == ["notes.txt"]
    rome.save_pretrained(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert _names(folder) == ["README.md", "edit_config.json", "edit_model.safetensors", "notes.txt"]


def test_saving_over_an_adapter_replaces_its_files(two, tmp_path):
    rome, grace = two
    rome.save_pretrained(tmp_path / "a")
    grace.save_pretrained(tmp_path / "a", readme=False)      # another adapter's files, no card: the old card goes
    assert read_adapter_files(tmp_path / "a")[0]["method"] == "grace"
    assert _names(tmp_path / "a") == ["edit_config.json", "edit_model.safetensors"]


def test_save_into_the_current_directory(two, tmp_path, monkeypatch):
    rome, _ = two
    monkeypatch.chdir(tmp_path)
    assert rome.save_pretrained(".") == "."
    assert read_adapter_files(tmp_path)[0]["method"] == "rome"
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(editpeft.AdapterFormatError, match="other.txt"):
        rome.save_pretrained(".")


def test_a_link_to_a_folder_is_written_through(two, tmp_path):
    rome, _ = two
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    rome.save_pretrained(tmp_path / "link")
    assert (tmp_path / "link").is_symlink()
    assert read_adapter_files(real)[0]["method"] == "rome"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]     # no hidden .old sibling
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    with pytest.raises(editpeft.AdapterFormatError, match="does not exist"):
        rome.save_pretrained(tmp_path / "dangling")
    (tmp_path / "file").write_text("x")
    with pytest.raises(editpeft.AdapterFormatError, match="not a folder"):
        rome.save_pretrained(tmp_path / "file")


def test_an_interrupted_save_leaves_the_old_adapter_and_no_temporary_files(two, tmp_path, monkeypatch):
    import editpeft.atomic as atomic
    rome, grace = two
    rome.save_pretrained(tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def interrupted(tmp, dest):
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grace.save_pretrained(tmp_path / "a")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(TMP_PREFIX)]


def test_an_unsaveable_adapter_is_refused_before_writing(tiny, tmp_path):
    from editpeft.deltas import DenseDelta
    import torch
    model, _ = tiny
    bare = editpeft.WeightDeltaAdapter({"model.layers.0.mlp.down_proj": DenseDelta(torch.zeros(32, 64))},
                                       method="rome", hparams={}, requests=[])
    with pytest.raises(editpeft.AdapterFormatError, match="cannot be saved: config.plugin lacks"):
        bare.save_pretrained(tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_readers_never_see_a_mix_while_another_thread_saves(two, tmp_path):
    """A writer alternates two adapters in one folder while a reader reads it: every read is one
    whole adapter (the lock is per open file, so threads contend as processes do)."""
    rome, grace = two
    folder = tmp_path / "a"
    rome.save_pretrained(folder)
    stop, errors, reads = threading.Event(), [], [0]

    def reader():
        while not stop.is_set():
            try:
                config, tensors = read_adapter_files(folder)
                assert ("keys" in tensors) == (config["method"] == "grace")
                reads[0] += 1
            except Exception as e:   # noqa: BLE001 (any failure is the finding)
                errors.append(repr(e))
    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(60):
            (grace if i % 2 else rome).save_pretrained(folder)
    finally:
        stop.set()
        thread.join()
    assert not errors, errors[:3]
    assert reads[0] > 0


_WRITER = """
import sys
from editpeft.loading import load_adapter
adapter = load_adapter(sys.argv[1])
for _ in range(int(sys.argv[3])):
    adapter.save_pretrained(sys.argv[2])
print("ok")
"""


def test_two_processes_saving_to_one_folder_leave_one_whole_adapter(two, tmp_path):
    import subprocess
    import sys
    rome, grace = two
    rome.save_pretrained(tmp_path / "rome")
    grace.save_pretrained(tmp_path / "grace")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EDITPEFT_PROGRESS": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(tmp_path / src), str(tmp_path / "shared"), "25"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for src in ("rome", "grace")]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 and out.strip() == "ok" for p, (out, _) in zip(procs, outputs)), outputs
    config, tensors = read_adapter_files(tmp_path / "shared")
    assert config["method"] in ("rome", "grace")
    assert json.loads((tmp_path / "shared" / "edit_config.json").read_text())["method"] in \
        (tmp_path / "shared" / "README.md").read_text()
    assert _names(tmp_path / "shared") == ["README.md", "edit_config.json", "edit_model.safetensors"]
