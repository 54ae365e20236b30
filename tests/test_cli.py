"""The CLI mirrors the API: edit a tiny saved model from flags, then generate with the adapter."""
from __future__ import annotations

import json

from editpeft.cli import main

from conftest import make_tiny_model


def test_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "rome" in out and "weight_delta" in out and "grace" in out and "module_hook" in out


def test_edit_and_generate(tmp_path, tiny_tokenizer, capsys):
    model = make_tiny_model("gpt2", tiny_tokenizer)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    reqs = tmp_path / "reqs.json"
    reqs.write_text(json.dumps([{"prompt": "The city that holds the {}", "subject": "Eiffel Tower", "target_new": "Rome"},
                                {"prompt": "The chemical symbol for gold is", "target_new": "Ag"}]))
    assert main(["edit", "--method", "grace", "--requests", str(reqs), "--config", '{"layer": 0}',
                 "--model", str(tmp_path / "m"), "--out", str(tmp_path / "e")]) == 0
    assert "saved" in capsys.readouterr().out
    assert main(["generate", "The city that holds the Eiffel Tower", "--model", str(tmp_path / "m"),
                 "--edit", str(tmp_path / "e"), "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.strip().endswith("Rome")


def test_clear_error_exit_code(capsys):
    assert main(["edit", "--method", "rome", "--out", "x"]) == 2
    assert "give --prompt and --target-new" in capsys.readouterr().err
