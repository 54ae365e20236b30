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


def params_snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snapshot):
    """Weights bitwise equal to ``snapshot`` and no hook left on any module."""
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k
    for name, m in model.named_modules():
        assert not m._forward_hooks, f"hook left on {name}"
