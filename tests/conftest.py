"""Fixtures: a tiny BPE tokenizer trained here, tiny random models of every family, and the
embedded SmolLM2 model for the slow tier. No network, fixed seeds."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

FAMILIES = ["gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma3_text", "opt"]
#: Encoder-decoder families (kept apart from FAMILIES, the causal family x method matrix).
SEQ2SEQ_FAMILIES = ["t5", "mt5", "umt5"]

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The chemical symbol for gold is Au and for silver is Ag.",
    "Berlin, London, Madrid, Tokyo and Vienna are cities.",
    "A fact about the tower and the city and the river.",
] * 20


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny_tokenizer()


def tiny_config(family: str, vocab: int):
    import transformers as tf
    common = dict(vocab_size=vocab, eos_token_id=0, pad_token_id=0, bos_token_id=0, initializer_range=0.2)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=128, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                            word_embed_proj_dim=32, max_position_embeddings=128, init_std=0.2, **common)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, **common)
    if family == "llama":
        return tf.LlamaConfig(**llama_like)
    if family == "mistral":
        return tf.MistralConfig(**llama_like)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=16, **llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=16, sliding_window=64, **llama_like)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=64, **llama_like)
    # T5 starts decoding from the pad token (id 0 here); mT5/UMT5 use the gated-GELU FFN (wi_0, wi_1).
    t5_like = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, vocab_size=vocab,
                   eos_token_id=0, pad_token_id=0)
    if family == "t5":
        return tf.T5Config(**t5_like)
    if family == "mt5":
        return tf.MT5Config(**t5_like)
    if family == "umt5":
        return tf.UMT5Config(**t5_like)
    raise ValueError(family)


def make_tiny_model(family: str, tokenizer, seed: int = 0):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    torch.manual_seed(seed)
    config = tiny_config(family, len(tokenizer))
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config)
    model.eval()
    assert model.config.model_type == family
    return model


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


def logits_of(model, tokenizer, prompts):
    from editpeft.tokens import TargetBatch
    batch = TargetBatch.for_model(model, tokenizer, prompts)
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


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


def params_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snapshot):
    """Weights bitwise equal to ``snapshot`` and no hook left on any module."""
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k         # bitwise: unmerge copies the pristine weights back
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"hook left on {name}"
