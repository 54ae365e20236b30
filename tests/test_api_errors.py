"""Every public call given a value of the wrong type answers with an EditError, never a TypeError
or AttributeError from deep inside, and leaves the model's edits as they were."""
from __future__ import annotations

import pytest

import editpeft
from editpeft.testing import DEFAULT_REQUEST

from conftest import TINY_CONFIGS

BAD = [None, 5, ["g"], {"a": 1}, b"g", 1.5, object()]
CALLS = {
    "remove_edit": lambda m, a, tmp, v: m.remove_edit(v),
    "set_active_edits": lambda m, a, tmp, v: m.set_active_edits(v),
    "load_edit": lambda m, a, tmp, v: m.load_edit(v),
    "add_edit config": lambda m, a, tmp, v: m.add_edit("grace", DEFAULT_REQUEST, name="x", config=v),
    "add_edit requests": lambda m, a, tmp, v: m.add_edit("grace", v, name="x"),
    "add_edit name": lambda m, a, tmp, v: m.add_edit("grace", DEFAULT_REQUEST, name=v),
    "add_edit method": lambda m, a, tmp, v: m.add_edit(v, DEFAULT_REQUEST, name="x"),
    "adapter.save_pretrained": lambda m, a, tmp, v: a.save_pretrained(v),
    "adapter.push_to_hub": lambda m, a, tmp, v: a.push_to_hub(v),
    "load_editor": lambda m, a, tmp, v: editpeft.load_editor(v),
    "evaluate data": lambda m, a, tmp, v: editpeft.evaluate(m, m.edit_state.tokenizer, "grace", v, out=tmp / "ev"),
    "save_merged names": lambda m, a, tmp, v: editpeft.save_merged(m, m.edit_state.tokenizer, tmp / "m", names=v),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_wrong_types_are_edit_errors(call, tiny, tmp_path):
    model, _ = tiny
    adapter = model.add_edit("grace", DEFAULT_REQUEST, name="g", config=TINY_CONFIGS["grace"])
    for value in BAD:
        if value == ["g"] and call in ("set_active_edits", "save_merged names"):
            continue              # a valid list of names
        if value is None and call in ("add_edit config", "add_edit name"):
            continue              # the defaults: the card's config, a generated name
        with pytest.raises(editpeft.EditError):
            CALLS[call](model, adapter, tmp_path, value)
        assert list(model.edits) == ["g"] and model.edits["g"].active
