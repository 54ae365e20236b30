"""T-Patcher: one neuron per edit at the last FFN, initialised to fire on the edit, trained to stay
silent on the memory; appends add neurons and leave the earlier ones as they were."""
from __future__ import annotations

import pytest
import torch

from editpeft import EditRequest
from editpeft.errors import ConfigError

from conftest import TINY_CONFIGS

TP = TINY_CONFIGS["t-patcher"]
R1 = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
R2 = EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")


def test_initialisation_fires_exactly_once_on_the_edit(tiny):
    """k = q_e / ‖q_e‖², b = 0: the pre-activation on the edit's query is 1 (paper §3.3)."""
    from editpeft_tpatcher import _edit_queries, _site, TPatcherConfig
    model, tok = tiny
    site = _site(model, TPatcherConfig(**TP))
    queries = _edit_queries(model, tok, model.get_submodule(site.read), R1)
    init = queries[0]                     # the prompt's last token predicts the first target token
    key = init / init.norm() ** 2
    assert torch.allclose((init.double() @ key.double()), torch.tensor(1.0, dtype=torch.float64), atol=1e-6)
    assert queries.shape[0] == len(tok(" Rome", add_special_tokens=False)["input_ids"])


def test_one_neuron_per_edit_and_append_keeps_earlier_neurons(tiny):
    model, tok = tiny
    first = model.add_edit("t-patcher", R1, name="tp", config=TP)
    ((site, patch),) = first.patches.items()
    assert len(patch) == 1 and first.targets == list(dict.fromkeys((site.read, site.write)))
    keys, values = patch.keys.clone(), patch.values.clone()
    second = model.add_edit("t-patcher", R2, name="tp", append=True)
    ((_, grown),) = second.patches.items()
    assert len(grown) == 2 and len(second.requests) == 2
    assert torch.equal(grown.keys[:1], keys) and torch.equal(grown.values[:1], values)   # frozen, bitwise


def test_the_patch_is_silent_on_its_memory(tiny):
    """Trained with L_m, the new neuron's pre-activation on unrelated text stays below zero
    (ReLU output exactly 0) for almost every memory query, and is above it on the edit."""
    from editpeft_tpatcher import _corpus_queries, _edit_queries, TPatcherConfig
    model, tok = tiny
    config = TPatcherConfig(**TP)
    adapter = model.add_edit("t-patcher", R1, name="tp", config=TP)
    ((site, patch),) = adapter.patches.items()
    read = model.get_submodule(site.read)
    memory = _corpus_queries(model, tok, read, config)
    edit = _edit_queries(model, tok, read, R1)
    pre = lambda q: q.double() @ patch.keys[0].double() + patch.key_bias[0].double()   # noqa: E731
    assert float((pre(memory) > 0).double().mean()) < 0.02
    assert float(pre(edit).min()) > 0


@pytest.mark.parametrize("bad, match", [({"memory_margin": 1.0}, "memory_margin"), ({"layer": -2}, "layer"),
                                        ({"activation": "nope"}, "activation"), ({"memory_corpus": "x"}, "corpus")])
def test_bad_config(bad, match):
    from editpeft_tpatcher import TPatcherConfig
    with pytest.raises(ConfigError, match=match):
        TPatcherConfig(**bad)


def test_a_multi_token_target_gets_one_neuron_per_token_held_active_at_its_position(tiny):
    """per_token: neuron j starts at k = q_j/‖q_j‖² for the position predicting target token j."""
    from editpeft_tpatcher import _edit_queries, _site, TPatcherConfig
    model, tok = tiny
    request = EditRequest(prompt="The chemical symbol for gold is", target_new="silver metal")
    n_tokens = len(tok(" silver metal", add_special_tokens=False)["input_ids"])
    assert n_tokens >= 2
    adapter = model.add_edit("t-patcher", request, name="tp", config={**TP, "max_neurons": n_tokens})
    ((site, patch),) = adapter.patches.items()
    assert len(patch) == n_tokens
    queries = _edit_queries(model, tok, model.get_submodule(site.read), request).double()
    own = (queries * patch.keys.double()).sum(-1) + patch.key_bias.double()   # neuron j at position j
    assert bool((own > 0).all())


def test_one_neuron_when_per_token_is_off(tiny):
    model, tok = tiny
    request = EditRequest(prompt="The chemical symbol for gold is", target_new="silver metal")
    adapter = model.add_edit("t-patcher", request, name="tp", config={**TP, "per_token": False, "max_neurons": 1})
    assert len(adapter) == 1
