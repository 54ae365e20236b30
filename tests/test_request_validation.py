"""EditRequest checks each field's type and content with its own message; subjects match whole
words and an ambiguous one must be marked; a no-op edit is reported; prompts longer than a fixed
position table are refused before any method runs."""
from __future__ import annotations

import logging

import pytest

import editpeft
from editpeft import EditRequest, InvalidRequestError
from editpeft.testing import assert_untouched, make_tiny_model, params_snapshot

from conftest import TINY_CONFIGS


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt=3), "prompt must be a string, got int"),
    (dict(prompt=b"a b"), "prompt must be a string, got bytes; decode"),
    (dict(prompt="  "), "prompt is only whitespace"),
    (dict(subject=5), "subject must be a string, got int"),
    (dict(subject=b"Paris"), "subject must be a string, got bytes"),
    (dict(target_new=None), "target_new must be a string, got None"),
    (dict(target_new=""), "target_new is empty"),
    (dict(target_new="\u200b"), "target_new is only whitespace or invisible"),
    (dict(target_new="\ufeff \u2060"), "invisible"),
    (dict(target_true=1), "target_true must be a string"),
    (dict(paraphrases="abc"), r"paraphrases must be a list of strings, not a single str; wrap it"),
    (dict(paraphrases=b"abc"), "not a single bytes"),
    (dict(locality=[1, None]), r"locality\[0\] must be a string, got int"),
    (dict(locality=["ok", None]), r"locality\[1\] must be a string, got None"),
    (dict(locality=["ok", " "]), r"locality\[1\] is empty"),
    (dict(paraphrases=5), "paraphrases must be a list of strings, got int"),
    (dict(prompt="{} is in {}", subject="Paris"), "more than one '{}'"),
    (dict(prompt="{} is in", subject="Pa{}ris"), "the subject itself contains '{}'"),
    (dict(prompt="{} is in", subject=None), "placeholder but no subject"),
])
def test_each_bad_field_has_its_own_message(kwargs, match):
    base = dict(prompt="Paris is the capital of", subject="Paris", target_new="Rome")
    with pytest.raises(InvalidRequestError, match=match):
        EditRequest(**{**base, **kwargs})


def test_subject_matches_whole_words():
    r = EditRequest(prompt="The Parisian café in Paris is", subject="Paris", target_new="x")
    assert r.subject_span == (21, 26) and r.prompt[21:26] == "Paris"
    with pytest.raises(InvalidRequestError, match="only inside a longer word"):
        EditRequest(prompt="The Parisian café is", subject="Paris", target_new="x")
    with pytest.raises(InvalidRequestError, match="does not occur in the prompt"):
        EditRequest(prompt="The café is", subject="Paris", target_new="x")
    # a subject ending in punctuation matches next to a word character after it
    assert EditRequest(prompt="Apple Inc.'s logo is", subject="Apple Inc.", target_new="x").subject_span == (0, 10)


def test_an_ambiguous_subject_must_be_marked():
    with pytest.raises(InvalidRequestError, match="occurs 2 times.*mark the one the fact is about with '{}'"):
        EditRequest(prompt="Paris is larger than Paris, Texas", subject="Paris", target_new="x")
    r = EditRequest(prompt="Paris is larger than {}, Texas", subject="Paris", target_new="x")
    assert r.subject_span == (21, 26)
    again = EditRequest.from_dict(r.to_dict())          # the chosen occurrence survives the round trip
    assert again == r and again.subject_span == (21, 26)


def test_from_dict_checks_the_stored_span():
    d = EditRequest(prompt="Paris and {}", subject="Paris", target_new="x").to_dict()
    with pytest.raises(InvalidRequestError, match="subject_span"):
        EditRequest.from_dict({**d, "subject_span": [0, 3]})
    with pytest.raises(InvalidRequestError, match="subject_span"):
        EditRequest.from_dict({**d, "subject_span": "0,5"})


def test_dataset_records_pick_the_first_whole_word():
    r = EditRequest.at_first_occurrence("The Parisian lives in Paris near Paris", "Paris", target_new="x")
    assert r.subject_span == (22, 27)


def test_a_no_op_edit_is_reported(caplog):
    with caplog.at_level(logging.WARNING):
        EditRequest(prompt="The capital of France is", target_new=" Paris", target_true="Paris")
    assert "changes nothing" in caplog.text


@pytest.mark.parametrize("family", ["gpt2", "opt", "gptj"])
@pytest.mark.parametrize("method", ["rome", "grace"])
def test_a_prompt_longer_than_the_positions_is_refused_before_editing(family, method, tiny_tokenizer):
    model = editpeft.enable_editing(make_tiny_model(family, tiny_tokenizer), tiny_tokenizer)
    snap = params_snapshot(model)
    long = "The city " * 200 + "that holds the Eiffel Tower"
    with pytest.raises(InvalidRequestError, match="shorten the prompt"):
        model.add_edit(method, EditRequest(prompt=long, subject="Eiffel Tower", target_new="Rome"),
                       config=TINY_CONFIGS[method])
    assert not model.edits
    assert_untouched(model, snap)


def test_a_method_crash_is_an_edit_error(tiny, monkeypatch):
    from editpeft.errors import MethodFailedError
    model, _ = tiny
    snap = params_snapshot(model)
    import editpeft.codebook as codebook

    def broken(*args, **kwargs):
        raise IndexError("index out of range in self")
    monkeypatch.setattr(codebook.Codebook, "insert", broken)
    with pytest.raises(MethodFailedError, match="IndexError: index out of range") as err:
        model.add_edit("grace", EditRequest(prompt="The chemical symbol for gold is", target_new="Ag"),
                       config=TINY_CONFIGS["grace"])
    assert isinstance(err.value.__cause__, IndexError)
    assert not model.edits
    assert_untouched(model, snap)
