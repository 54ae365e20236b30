"""Merging a stack of weight deltas into a plain model folder; conflicts between shared edits."""
from __future__ import annotations

import logging

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.cli import main
from editpeft.merge import save_merged

from conftest import assert_close_reordered, assert_untouched, logits_of, make_tiny_model, params_snapshot

ROME = {"layer": 0, "v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000,
        "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
GRACE = {"layer": 0, "eps_init": 1.0, "steps": 100}
A = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
B = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Paris")
A2 = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Tokyo")
PROMPTS = [A.prompt, B.prompt, "Berlin, London, Madrid"]


def test_merged_folder_loads_without_editpeft(tiny, tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    model, tok = tiny
    snap = params_snapshot(model)
    model.add_edit("rome", A, name="a", config=ROME)
    model.add_edit("rome", B, name="b", config=ROME)
    edited = logits_of(model, tok, PROMPTS)
    save_merged(model, tok, tmp_path / "merged")
    assert torch.equal(logits_of(model, tok, PROMPTS), edited)      # in-memory model unchanged; bitwise: unmerged again, the same hooks run
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not isinstance(plain, editpeft.editable.EditableMixin)
    # merged W + ΔW (rounded to float32 once) vs W x + ΔW x: reordered float32 sums, 2 blocks + head
    assert_close_reordered(logits_of(plain, tok, PROMPTS), edited, depth=3)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "| a | rome | Eiffel Tower |" in card and "| b | rome | Colosseum |" in card
    model.add_edit("grace", B, name="g", config=GRACE)
    with pytest.raises(editpeft.EditError, match="only weight deltas"):
        save_merged(model, tok, tmp_path / "x")
    for n in list(model.edits):
        model.remove_edit(n)
    assert_untouched(model, snap)


def test_cli_merge(tiny_tokenizer, tmp_path, capsys):
    base = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer), tiny_tokenizer)
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    base.add_edit("rome", A, name="a", config=ROME).save_pretrained(tmp_path / "a")
    assert main(["merge", "--edit", str(tmp_path / "a"), "--model", str(tmp_path / "base"),
                 "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "model.safetensors").is_file()


def test_conflicting_edits_warn_or_refuse(tiny, tmp_path, caplog):
    model, tok = tiny
    model.add_edit("grace", A, name="first", config=GRACE).save_pretrained(tmp_path / "first")
    with caplog.at_level(logging.WARNING, logger="editpeft.editable"):
        model.add_edit("grace", A2, name="second", config=GRACE)
    assert "contradicts active edits" in caplog.text and "'Rome'" in caplog.text and "'Tokyo'" in caplog.text
    (c,) = model.edit_conflicts()
    assert c.first == ("first", "Rome") and c.second == ("second", "Tokyo")
    model.remove_edit("first")
    editpeft.enable_editing(model, tok, strict_conflicts=True)
    with pytest.raises(editpeft.EditError, match="contradicts active edits"):
        model.load_edit(tmp_path / "first")
    assert list(model.edits) == ["second"]
    model.add_edit("grace", B, name="third", config=GRACE)     # no conflict: accepted


def test_contradictory_batch_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(editpeft.InvalidRequestError, match="contradictory.*'Rome'.*'Tokyo'"):
        model.add_edit("grace", [A, B, A2], config=GRACE)
    assert not model.edits
