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
    "ft-m": {"layers": [0], "lr": 0.01, "steps": 60},
    "ft-l": {"layers": [0], "lr": 0.01, "steps": 60, "norm_constraint": 0.5},
    "lora": {"rank": 4, "alpha": 8.0, "lr": 0.02, "steps": 60, "dropout": 0.0},
    # layer 0: on gemma2/3 the last FFN output passes a post-FFN norm, which bounds what a patch there adds
    # tiny random models: small activations (wide entry bound, Adam) and scores of a few units (small margins)
    "wise": {"layer": 0, "steps": 80, "optimizer": "adam", "lr": 0.2, "mask_ratio": 0.5, "norm_constraint": 100.0,
             "alpha": 0.5, "beta": 2.0, "gamma": 1.0, "irrelevant_tokens": 1024},
    "t-patcher": {"layer": 0, "steps": 80, "lr": 0.05, "memory_tokens": 200},
    # tiny models read 128 positions: little generation room, so that demonstrations fit beside the fact
    "ike": {"generation_room": 4},
    # the contract's toy editor trains at lr 1e-2: the pre-trained sentence encoder only at 1e-5 of it
    "serac": {"classifier_lr_scale": 1e-3},
    # key at block 0, blocks on both FFN output projections (gemma3's post-FFN norm bounds what block 1 alone
    # adds); unrelated prompts' keys lie 5.8-8.5 apart on tiny llama: radius 1.0 keeps the edit's own key
    # (and its bfloat16 copy) in and the others out
    "melo": {"key_layer": 0, "lora_layers": [0, 1], "init_radius": 1.0, "lr": 0.05, "steps": 80, "num_blocks": 4},
    # layer 0 as above (gemma3's post-FFN norm bounds slots in the last block: measured, the edit does not
    # reach top-1 there); lr 0.05 and 80 steps as T-Patcher's entry (a random model needs a stronger push; not swept)
    "calinet": {"layers": [0], "steps": 80, "lr": 0.05},
    # both blocks of the 2-block tiny models; c_edit 1 and a larger initial step: the toy editor trains 20 steps
    "mend": {"layers": [0, 1], "edit_lr": 1e-3, "c_edit": 1.0},
    "ke": {"layers": [0, 1]},
    # every position's features (the one-token target alone has no spread to normalise by); tiny models' keys
    # have |k̂|² ~ 64, so η far above the paper's 1e-6 (measured: top-1 on 8 of 9 families at 0.03, not gpt_neox)
    "ultraedit": {"layers": [0, 1], "lr": 0.03, "token": "all"},
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


def capital_facts():
    """16 counterfactual capitals (with a paraphrase and two unrelated prompts each): the training set of
    the small editors the slow tier trains on SmolLM2 (MEND, KE)."""
    from editpeft import EditRequest
    countries = ["Germany", "Italy", "Spain", "Japan", "Egypt", "Canada", "Greece", "Norway", "Poland",
                 "Portugal", "Sweden", "Austria", "Kenya", "Peru", "Chile", "Cuba"]
    cities = ["Lima", "Oslo", "Cairo", "Rome", "Tokyo", "Madrid", "Athens", "Berlin"]
    return [EditRequest(prompt=f"The capital of {c} is", target_new=cities[(i * 3 + 1) % len(cities)],
                        paraphrases=(f"{c}'s capital city is",),
                        locality=("The chemical symbol for gold is", "The largest ocean on Earth is the"))
            for i, c in enumerate(countries)]


@pytest.fixture
def one_thread():
    """One torch thread for the test: on tiny matrices extra threads only wait for each other on a busy
    machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# -- comparing floating-point results -----------------------------------------------------------
# Two results are compared in one of two ways, and each comparison in tests/ says which and why:
#  * bitwise (``torch.equal``) when both sides run the same code path on the same inputs: any
#    difference is a bug, whatever the CPU;
#  * up to rounding (``assert_close_reordered``) when the two sides are the same mathematics
#    evaluated in different orders (a merged weight vs a hook, a LoRA vs a delta, packed vs plain
#    batches, a solve vs an inverse). Their difference then depends on the CPU's kernels, and the
#    bound must come from the numerics, never from what one machine happened to produce:
#
#        atol = ULPS_PER_LEVEL * depth * eps(dtype) * scale,   scale = max |expected|
#
#    ``depth`` counts the reordered stages the difference flows through (a tiny model's forward
#    pass: 2 blocks + the head = 3; a linear solve = 1; a backward pass doubles it). Per stage, the
#    rounding of a dot product of n <= 128 terms random-walks to about sqrt(128) ~ 11 units of eps
#    of the result's scale; x3 for cancellation gives 32. Example: the tiny models' float32 logits
#    (|logit| ~ 7) get 32 * 3 * 1.19e-7 * 7 ~ 8e-5, while an edit that is lost, doubled or of the
#    wrong sign moves them by O(1): the bound stays 4 orders of magnitude below any real bug.
#  Where the computation can run in float64 (replaying saved float32 factors, which float64 holds
#  exactly), the comparison is done there instead, with the same rule and eps = 2.2e-16.
ULPS_PER_LEVEL = 32


def rounding_atol(scale: float, depth: int, dtype: torch.dtype = torch.float32) -> float:
    """The absolute bound above for values of magnitude ``scale`` after ``depth`` reordered stages."""
    return ULPS_PER_LEVEL * depth * torch.finfo(dtype).eps * float(scale)


def assert_close_reordered(actual: torch.Tensor, expected: torch.Tensor, *, depth: int) -> None:
    """``actual`` equals ``expected`` up to the rounding of ``depth`` reordered stages (rule above)."""
    assert actual.dtype == expected.dtype and actual.is_floating_point(), (actual.dtype, expected.dtype)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, atol=rounding_atol(scale, depth, expected.dtype), rtol=0)


def editable_float64(family: str, tokenizer, adapters, folder):
    """A fresh float64 copy of the tiny ``family`` model (same seed, same base weights) with
    ``adapters`` saved under ``folder`` and loaded in order: the stack replayed in float64
    (float32 factors are exact in float64)."""
    import editpeft
    model = editpeft.enable_editing(make_tiny_model(family, tokenizer).double(), tokenizer)
    for a in adapters:
        a.save_pretrained(folder / f"f64-{a.name}")
        model.load_edit(folder / f"f64-{a.name}")
    return model


def toy_eval_cases(facts, *, one_hop: bool = True, extra_generation: tuple[str, ...] = ("A fact about",)):
    """Harness cases on the tiny models' vocabulary: one per (subject, new target) in ``facts``,
    with a paraphrase, two neighbourhood probes, an optional one-hop probe and generation prompts."""
    from editpeft import EditRequest
    from editpeft.evaluation import EvalCase, Probe
    out = []
    for i, (s, t) in enumerate(facts):
        out.append(EvalCase(
            f"c{i}", (EditRequest(prompt=f"The city that holds the {s}", subject=s, target_new=t, target_true="London"),),
            generalization=(Probe(f"A fact about the {s}", (t,), "London"),),
            locality={"neighborhood": (Probe("The chemical symbol for gold is", ("Au",), t),
                                       Probe("Berlin, London, Madrid", ()))},
            portability={"one_hop": (Probe(f"The {s} is in the city of", (t,)),)} if one_hop else {},
            generation_prompts=(f"The {s} is", *extra_generation)))
    return out
