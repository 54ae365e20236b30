"""Hub calls a hostile or broken Hub cannot abuse: timeouts, force_download after a corrupt
download, subfolders that stay inside the snapshot, repo ids checked, pushes of the artefact's own
files only."""
from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager

import pytest

import editpeft
from editpeft.hub import push_folder

from conftest import assert_untouched, params_snapshot
from hub_server import pointed_at_loopback

GRACE = {"layer": 0, "eps_init": 1.0, "steps": 100}
REQ = editpeft.EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with pointed_at_loopback(monkeypatch, tmp_path / "hf-cache") as server:
        yield server


@pytest.mark.parametrize("repo_id", ["user/re po", "user/..", "-user/repo", "user/repo\n", "a/b/c", "user/re--po"])
def test_invalid_repo_ids_are_edit_errors(tiny, repo_id, tmp_path):
    model, _ = tiny
    adapter = model.add_edit("grace", REQ, name="g", config=GRACE)
    with pytest.raises(editpeft.EditError, match="repo id|neither an adapter folder"):
        model.load_edit(repo_id, name="x")
    with pytest.raises(editpeft.EditError, match="not a valid Hub repo id"):
        adapter.push_to_hub(repo_id)


def test_subfolder_stays_inside_the_snapshot(tiny, hub, tmp_path):
    model, _ = tiny
    snap = params_snapshot(model)
    adapter = model.add_edit("grace", REQ, name="g", config=GRACE)
    adapter.push_to_hub("user/edits", subfolder="gold")
    model.remove_edit("g")
    adapter.save_pretrained(tmp_path / "outside")
    model.load_edit("user/edits", subfolder="gold", name="ok")     # puts the repo into the cache
    model.remove_edit("ok")
    for sub in (str(tmp_path / "outside"), "../../../../outside", "gold/../../x", "/etc", "..\\x"):
        with pytest.raises(editpeft.EditError, match="subfolder"):
            model.load_edit("user/edits", subfolder=sub)
    assert not model.edits
    assert_untouched(model, snap)


def test_local_subfolder_cannot_escape(tiny, tmp_path):
    model, _ = tiny
    adapter = model.add_edit("grace", REQ, name="g", config=GRACE)
    adapter.save_pretrained(tmp_path / "elsewhere")
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "link").symlink_to(tmp_path / "elsewhere")
    for sub in ("../elsewhere", "link", str(tmp_path / "elsewhere")):
        with pytest.raises(editpeft.EditError, match="subfolder"):
            model.load_edit(tmp_path / "repo", subfolder=sub, name="x")


def test_force_download_replaces_a_corrupt_cached_file(tiny, hub):
    model, _ = tiny
    adapter = model.add_edit("grace", REQ, name="g", config=GRACE)
    adapter.push_to_hub("user/eiffel")
    model.remove_edit("g")
    oid, files = hub.repos["user/eiffel"].commits[-1]
    good = files["edit_model.safetensors"]
    files["edit_model.safetensors"] = good[:-1] + bytes([good[-1] ^ 0xFF])      # served corrupt once
    with pytest.raises(editpeft.AdapterFormatError, match="force_download=True"):
        model.load_edit("user/eiffel")
    files["edit_model.safetensors"] = good                                          # the Hub is fixed
    with pytest.raises(editpeft.AdapterFormatError, match="hash"):
        model.load_edit("user/eiffel")                                              # the cache still has it
    model.load_edit("user/eiffel", force_download=True)
    assert list(model.edits) == ["g"]


def test_push_uploads_only_the_adapter_files(tiny, hub, tmp_path):
    model, _ = tiny
    folder = tmp_path / "a"
    model.add_edit("grace", REQ, name="g", config=GRACE).save_pretrained(folder)
    (folder / ".env").write_text("HF_TOKEN=secret")
    (folder / "model.pkl").write_bytes(b"\x80\x04N.")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.txt").write_text("x")
    push_folder(folder, "user/a")
    _, files = hub.repos["user/a"].commits[-1]
    assert sorted(files) == ["README.md", "edit_config.json", "edit_model.safetensors"]


@contextmanager
def silent_server():
    """A server that accepts connections and never answers."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        for c in conns:
            c.close()
        srv.close()


def test_a_hub_that_never_answers_times_out(tiny, monkeypatch, tmp_path):
    from huggingface_hub import constants
    model, _ = tiny
    with silent_server() as endpoint:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setenv("EDITPEFT_HUB_TIMEOUT", "1")
        start = time.perf_counter()
        with pytest.raises(editpeft.EditError, match="did not answer within 1 s"):
            model.load_edit("user/eiffel")
        # bounded: a hang would run into pytest's own limits; the client retries a few times
        assert time.perf_counter() - start < 120
    assert not model.edits
