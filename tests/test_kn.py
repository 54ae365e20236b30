"""Knowledge Neurons: the cached integrated gradients equal a plain computation; the edit is sparse."""
from __future__ import annotations

import pytest
import torch

import editpeft_kn
from editpeft import EditRequest
from editpeft.arch import get_arch
from editpeft.attach import as_btd

from conftest import assert_close_reordered

REQUEST = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")


def brute_force_attribution(model, tok, prompt, answer, target, steps):
    """Eq. 4 with one full forward per α, no key/value cache, no batching."""
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    module = model.get_submodule(target)
    seen = []
    h = module.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    w_bar = as_btd(seen[0], ids)[0, -1].float()
    total = torch.zeros_like(w_bar)
    for k in range(1, steps + 1):
        w = (k / steps * w_bar).requires_grad_(True)

        def pre(m, args):
            x = as_btd(args[0], ids).clone()
            x[0, -1] = w
            return (x.reshape(args[0].shape),)
        h = module.register_forward_pre_hook(pre)
        prob = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)[answer]
        h.remove()
        total += torch.autograd.grad(prob, w)[0]
    return w_bar * total / steps


@pytest.mark.parametrize("tiny", ["gpt2", "llama", "opt"], indirect=True)
def test_cached_batched_attribution_equals_plain_computation(tiny):
    model, tok = tiny
    arch = get_arch(model)
    targets = [arch.mlp_out_name(0), arch.mlp_out_name(1)]
    scores, w_bar = editpeft_kn.attribution_scores(model, tok, REQUEST.prompt, 5, targets, steps=4)
    for i, target in enumerate(targets):
        expected = brute_force_attribution(model, tok, REQUEST.prompt, 5, target, 4)
        # cached batched vs per-step autograd: reordered float32 sums, forward + backward through
        # 2 blocks + head (depth 6); the scores are ~1e-3, so a fixed atol=1e-6 would hide 0.1% errors
        assert_close_reordered(scores[i], expected, depth=6)


def test_refine_keeps_shared_neurons_and_adjusts_p():
    scores = torch.zeros(4, 2, 6)
    scores[:, 1, 3] = 1.0            # in every prompt
    scores[:3, 0, 2] = 0.9           # in 3 of 4 prompts
    scores[0, 0, 5] = 0.8            # in one prompt only
    cfg = editpeft_kn.KnowledgeNeuronsConfig(min_neurons=1, max_neurons=5, share_threshold=0.7)
    assert editpeft_kn.refine(scores, cfg) == [(1, 3), (0, 2)]
    cfg = editpeft_kn.KnowledgeNeuronsConfig(min_neurons=3, max_neurons=5, share_threshold=0.7)
    assert editpeft_kn.refine(scores, cfg) == [(1, 3), (0, 2), (0, 5)]          # p lowered to 0.25
    cfg = editpeft_kn.KnowledgeNeuronsConfig(min_neurons=1, max_neurons=1, share_threshold=0.7)
    assert editpeft_kn.refine(scores, cfg) == [(1, 3)]                         # p raised to 1.0


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_edit_is_sparse_and_writes_the_new_answer(tiny):
    model, tok = tiny
    adapter = model.add_edit("kn", REQUEST, name="k", config={"ig_steps": 5, "context_lengths": [[4, 2]],
                                                               "max_neurons": 3})
    nonzero = sum(int((d.down != 0).sum()) for d in adapter.deltas.values())
    assert 1 <= nonzero <= 3
    new = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    for d in adapter.deltas.values():
        assert d.rank == 1
        cos = torch.nn.functional.cosine_similarity(d.up[:, 0], model.get_output_embeddings().weight[new].float(), 0)
        assert cos > 0.5
