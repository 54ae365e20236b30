"""The plugin contract (editpeft.testing.check_method) for every installed method on every family,
and for the toy dense-delta, patch-neuron and side-module methods — the matrix is built from the
installed methods, not listed by hand."""
from __future__ import annotations

from contextlib import ExitStack

import pytest

import editpeft
from editpeft.registry import registered
from editpeft.testing import CAUSAL_FAMILIES, SEQ2SEQ_FAMILIES, check_method, make_tiny_model

from conftest import TINY_CONFIGS
from toy_methods import TOY_METHODS

INSTALLED = sorted(editpeft.list_methods())
#: In-context methods need a model that reads its context, which a random tiny model does not: the
#: contract checks that the edit changes the prompt's logits, not in which direction.
READS_CONTEXT = {"ike"}
#: Methods whose edit of a random tiny model raises the target's probability without a top-1 guarantee.
ONE_STEP = {"kn", "ultraedit"}
FAMILIES = CAUSAL_FAMILIES + ("t5",)


def _cases():
    for method in INSTALLED:
        for family in FAMILIES:
            yield pytest.param(method, family, id=f"{method}-{family}")


@pytest.mark.parametrize("method,family", list(_cases()))
def test_installed_method_contract(method, family, tiny_tokenizer):
    impl = editpeft.registry.get_method(method)
    topology = "seq2seq" if family in SEQ2SEQ_FAMILIES else "causal"
    if topology not in impl.topologies:
        model = editpeft.enable_editing(make_tiny_model(family, tiny_tokenizer), tiny_tokenizer)
        with pytest.raises(editpeft.UnsupportedModelError, match="supports"):
            model.add_edit(method, editpeft.testing.DEFAULT_REQUEST, config=TINY_CONFIGS.get(method))
        assert not model.edits
        return
    known = method in TINY_CONFIGS
    # KN edits a handful of neurons of a random model, UltraEdit takes one normalised gradient step: both move
    # the target's probability, not always to top-1
    passed = check_method(method, family, config=TINY_CONFIGS.get(method), tokenizer=tiny_tokenizer,
                          expect_top1=None if method in READS_CONTEXT else known and method not in ONE_STEP)
    assert passed == list(editpeft.testing.CHECKS)


@pytest.mark.parametrize("family", FAMILIES + ("mt5",))
@pytest.mark.parametrize("toy", TOY_METHODS, ids=lambda c: c.name)
def test_toy_building_blocks_pass_the_contract(toy, family, tiny_tokenizer):
    with ExitStack() as stack:
        for cls in TOY_METHODS:
            stack.enter_context(registered(cls))
        assert check_method(toy.name, family, tokenizer=tiny_tokenizer) == list(editpeft.testing.CHECKS)
