"""Fixtures: a tiny BPE tokenizer trained here, tiny random models of every family, and the
embedded SmolLM2 model for the slow tier. No network, fixed seeds."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from editpeft.testing import CAUSAL_FAMILIES, SEQ2SEQ_FAMILIES as _SEQ2SEQ  # noqa: E402
from editpeft.testing import assert_untouched, logits_of, make_tiny_model, params_snapshot, tiny_config  # noqa: E402,F401
from editpeft.testing import tiny_tokenizer as _tiny_tokenizer  # noqa: E402

FAMILIES = list(CAUSAL_FAMILIES)
#: Encoder-decoder families (kept apart from FAMILIES, the causal family x method matrix).
SEQ2SEQ_FAMILIES = list(_SEQ2SEQ)

# Tiny random models need a stronger push than a trained one: more steps, a wider clamp.
VALUE = {"v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000, "context_lengths": [[4, 2]],
         "kl_factor": 0.0, "v_weight_decay": 0.0}
#: Configs under which each built-in method edits a tiny random model.
TINY_CONFIGS = {
    "rome": {"layer": 0, **VALUE},
    "grace": {"layer": 0, "eps_init": 1.0, "steps": 100},
    "memit": {"layers": [0, 1], "mom2_update_weight": 1.0, **VALUE},
    "alphaedit": {"layers": [0, 1], "nullspace_threshold": 1.0, "l2": 0.1, **VALUE},
    "emmet": {"layers": [0, 1], **VALUE},
    "kn": {"ig_steps": 5, "context_lengths": [[4, 2]]},
}


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


@pytest.fixture
def tiny(tiny_tokenizer, request):
    """(editable tiny model, tokenizer) for the family given by indirect parametrisation (llama by default)."""
    import editpeft
    family = getattr(request, "param", "llama")
    model = make_tiny_model(family, tiny_tokenizer)
    return editpeft.enable_editing(model, tiny_tokenizer), tiny_tokenizer


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2 model (slow tier); skipped when the package is not installed."""
    import editpeft
    try:
        model, tok = editpeft.load_default_model()
    except editpeft.DefaultModelMissingError as e:
        pytest.skip(str(e))
    torch.set_num_threads(2)
    return editpeft.enable_editing(model, tok), tok
