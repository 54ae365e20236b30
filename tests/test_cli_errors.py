"""The CLI prints what comes from files as data (escaped) and every error as one line, exit 2."""
from __future__ import annotations

import json

import pytest

import editpeft
from editpeft.cli import main
from editpeft.text import printable

GRACE = {"layer": 0, "eps_init": 1.0, "steps": 100}
REQ = editpeft.EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
HOSTILE = "\x1b[2K\x1b[1Ainstalled\x1b]0;pwned\x07\u202egnp.exe"


def test_inspect_escapes_everything_from_the_file(tiny, tmp_path, capsys):
    model, _ = tiny
    folder = tmp_path / "a"
    model.add_edit("grace", REQ, name="g", config=GRACE).save_pretrained(folder)
    config = json.loads((folder / "edit_config.json").read_text())
    config["name"] = HOSTILE
    config["requests"][0]["target_new"] = HOSTILE
    config["base_model"]["license"] = HOSTILE
    (folder / "edit_config.json").write_text(json.dumps(config))
    (folder / "README.md").unlink()
    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]0;pwned\\x07" in out and "\\u202e" in out


def test_errors_are_one_escaped_line_with_exit_code_2(tmp_path, capsys):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "edit_config.json").write_text(json.dumps({"format": f"editpeft/1{HOSTILE}\nsecond line"}))
    (folder / "edit_model.safetensors").write_bytes(b"")
    assert main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "\x1b" not in err
    assert "Traceback" not in err


def test_unexpected_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys):
    import editpeft.cli as cli

    def broken(args):
        raise ValueError("something deep")
    monkeypatch.setattr(cli, "cmd_methods", broken)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: ValueError: something deep (an unexpected error; run with --debug for the " \
                          "traceback and report it)"
    assert main(["--debug", "methods"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_interrupt_exits_130(monkeypatch, capsys):
    import editpeft.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "cmd_methods", interrupted)
    assert main(["methods"]) == 130


@pytest.mark.parametrize("text, shown", [("plain", "plain"), ("tab\there", "tab\\there"), ("é日本", "é日本"),
                                         ("\u200b", "\\u200b"), ("\x7f", "\\x7f"), ("\x85", "\\x85")])
def test_printable(text, shown):
    assert printable(text) == shown
