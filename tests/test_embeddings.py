"""The offline sentence encoder (SERAC's scope classifier and IKE's retrieval): loaded from the
packaged model folder with no network, unit-length embeddings that rank a paraphrase above an
unrelated sentence, and a differentiable path that gives the same embeddings."""
from __future__ import annotations

import torch

from editpeft.embeddings import EMBEDDING_DIM, embed, embed_with_grad, load_sentence_encoder

TEXTS = ["The Eiffel Tower is in Paris.", "Where is the Eiffel Tower located?", "Gold is a soft yellow metal."]


def test_embeddings_are_unit_length_and_rank_a_paraphrase_first():
    e = embed(load_sentence_encoder(), TEXTS)
    assert e.shape == (3, EMBEDDING_DIM)
    assert torch.allclose(e.double().norm(dim=-1), torch.ones(3, dtype=torch.float64), atol=1e-5)  # float32 unit norm
    sims = e @ e[0]
    assert float(sims[1]) > float(sims[2]) + 0.3      # measured 0.87 against ~0.0


def test_the_differentiable_path_gives_the_same_embeddings():
    encoder = load_sentence_encoder()
    plain = embed(encoder, TEXTS)
    with_grad = embed_with_grad(encoder, TEXTS)
    assert with_grad.requires_grad
    # the same forward on the same padded batch: equal up to float32 rounding of unit vectors
    assert float((with_grad.detach() - plain).abs().max()) < 1e-5


def test_a_fresh_encoder_is_a_private_copy():
    shared, fresh = load_sentence_encoder(), load_sentence_encoder(fresh=True)
    assert shared is load_sentence_encoder() and fresh is not shared
    p = next(fresh.parameters())
    with torch.no_grad():
        p.add_(1.0)
    assert not torch.equal(p, next(shared.parameters()))
