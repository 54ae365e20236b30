"""The offline corpora: chunks of the asked length, model-sampled ones without the left padding
that batching openings of different lengths adds, reproducible from the seed."""
from __future__ import annotations

import pytest
import torch

from editpeft.corpus import CORPORA, QUESTION_STARTERS, corpus_activations, token_chunks
from editpeft.tokens import pad_id


@pytest.mark.parametrize("name", CORPORA)
def test_chunks_have_the_asked_length_and_total(tiny, name):
    model, tok = tiny
    chunks = list(token_chunks(name, model, tok, n_tokens=40, seq_len=8, seed=0))
    assert sum(len(c) for c in chunks) == 40
    assert all(len(c) == 8 for c in chunks)


def test_sampled_question_chunks_start_with_their_opening_not_padding(tiny):
    model, tok = tiny
    chunks = list(token_chunks("questions", model, tok, n_tokens=16 * 8, seq_len=8, seed=0))
    assert all(int(c[0]) != pad_id(tok) for c in chunks)
    texts = [tok.decode(c).lstrip() for c in chunks]
    assert all(any(t.startswith(s[:2]) for s in QUESTION_STARTERS) for t in texts), texts


def test_sampled_corpora_are_reproducible_from_the_seed(tiny):
    model, tok = tiny
    module = model.model.layers[0].mlp.down_proj
    a = corpus_activations(model, tok, module, "questions", 32, seq_len=8, seed=3)
    b = corpus_activations(model, tok, module, "questions", 32, seq_len=8, seed=3)
    assert a.shape == (32, module.in_features)
    assert torch.equal(a, b)          # bitwise: the same seeded samples through the same kernels


def test_unknown_corpus_is_refused(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="unknown corpus"):
        next(token_chunks("wiki", model, tok, 8, 8))


def test_sampled_statistics_corpus_is_the_base_models_text_sampled_once(tiny, tmp_path, monkeypatch):
    """Statistics are cached under the base weights' fingerprint, so a corpus the model samples itself must
    be the base model's text even while an edit is live; and it is sampled once for several modules."""
    import editpeft.corpus
    from editpeft import EditRequest
    from editpeft.stats import second_moment
    from editpeft.testing import reference_methods

    model, tok = tiny
    calls = []
    sample = editpeft.corpus._generated_tokens

    def counted_sample(*args, **kwargs):
        calls.append(1)
        return sample(*args, **kwargs)

    monkeypatch.setattr(editpeft.corpus, "_generated_tokens", counted_sample)
    names = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]

    def statistics(cache):
        monkeypatch.setenv("EDITPEFT_CACHE", str(tmp_path / cache))
        model.edit_state.caches.clear()
        return [second_moment(model, tok, n, corpus="generated", n_tokens=32, seq_len=8, progress=False) for n in names]

    base = statistics("base")
    assert len(calls) == 1                         # one sample for both modules
    sampled_base = list(token_chunks("generated", model, tok, 32, 8))
    with reference_methods():
        model.add_edit("contract-lowrank", EditRequest(prompt="The capital of France is", target_new="Rome"), name="e")
    sampled_edited = list(token_chunks("generated", model, tok, 32, 8))
    assert not all(torch.equal(a, b) for a, b in zip(sampled_base, sampled_edited))   # the live edit changes the text
    edited = statistics("edited")                  # a fresh cache: computed again, with the edit live
    assert len(calls) == 4
    for a, b in zip(base, edited):
        assert torch.equal(a, b)                   # bitwise: the same base-model samples through the same kernels
