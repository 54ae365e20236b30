"""The scoring protocols against hand-computed values, and packed scoring against plain forwards."""
from __future__ import annotations

import math

import pytest
import torch

from editpeft import EditRequest
from editpeft.evaluation import CaseScorer, EvalCase, Probe, ngram_entropy
from editpeft.evaluation.scoring import greedy_continuations, score_branches
from editpeft.tokens import target_token_ids

from conftest import FAMILIES, make_tiny_model, rounding_atol

PROMPTS = ["The capital of France is", "Berlin, London", "A fact about the tower and the city and"]


def _fixed_logits(model, vocab: int, boosts: dict[int, float]):
    """Make every position's logits exactly ``boosts`` (0 elsewhere): the hidden state is zeroed
    by the output embedding's input, so the scores below can be computed by hand."""
    bias = torch.zeros(vocab)
    for t, v in boosts.items():
        bias[t] = v
    head = model.get_output_embeddings()
    return head.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out) + bias)


def test_protocols_by_hand(tiny_tokenizer):
    tok = tiny_tokenizer
    model = make_tiny_model("llama", tok)
    prompt = "The capital of France is"
    paris = target_token_ids(tok, prompt, "Paris")
    rome = target_token_ids(tok, prompt, "Rome")
    two = target_token_ids(tok, prompt, "Paris Rome")
    assert len(paris) == 1 and len(rome) == 1 and two == paris + rome, "tiny tokenizer changed"
    a, b = paris[0], rome[0]
    V = len(tok)
    hook = _fixed_logits(model, V, {a: 2.0, b: 1.0})
    try:
        log_z = math.log(math.e ** 2 + math.e + (V - 2))
        case = EvalCase("c", (EditRequest(prompt=prompt, target_new="Paris Rome", target_true="Rome"),),
                        generalization=(Probe(prompt, ("Paris",), "Rome"), Probe(prompt, ("Rome", "Paris"), None)),
                        locality={"n": (Probe(prompt, ("Rome",), "Paris"),)})
        scorer = CaseScorer(model, tok)
        base = scorer.baseline([case])
        (s,) = scorer.score([case], base)
    finally:
        hook.remove()
    # "Paris Rome": argmax is Paris everywhere -> token 1 right, token 2 wrong.
    assert s["reliability"]["token_em"] == 0.5 and s["reliability"]["gen_em"] == 0.0
    margin = (2 - log_z) + (1 - log_z) - (1 - log_z)      # log P(Paris Rome) - log P(Rome)
    assert s["reliability"]["prob_margin"] == float(margin > 0)
    # float32 log-softmax over V logits (1 stage) summed over tokens (1 stage), values of scale log Z
    tol = rounding_atol(log_z, depth=2)
    assert s["reliability"]["prob_margin_mean"] == pytest.approx(margin, rel=0, abs=tol)
    # generalization: probe 1 fully right (margin 1 nat), probe 2 right through its alias "Paris".
    assert s["generalization"]["token_em"] == 1.0 and s["generalization"]["gen_em"] == 1.0
    assert s["generalization"]["prob_margin"] == 1.0            # only probe 1 has a contrast
    assert s["generalization"]["prob_margin_mean"] == pytest.approx(1.0, rel=0, abs=tol)      # as above
    # locality: unchanged model -> agreement 1.0 under every protocol; the answer "Rome" is wrong.
    assert s["locality"] == {"token_em": 1.0, "gen_em": 1.0, "prob_margin": 1.0, "prob_margin_mean": 0.0}
    assert s["locality_answer"]["token_em"] == 0.0 and s["locality_answer"]["prob_margin"] == 0.0


def _bos_tokenizer(tok):
    """A copy of the tiny tokenizer that prepends a BOS token, as Llama-2 / Gemma tokenizers do."""
    import copy

    from tokenizers.processors import TemplateProcessing
    t = copy.deepcopy(tok)
    eos = t.convert_tokens_to_ids("<eos>")
    t.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", eos)])
    assert t("Paris")["input_ids"][0] == eos
    return t


def _reference(model, tok, prompt: str, branch: list[int]):
    """log-probs, argmax and the log-prob rows of ``branch`` from one plain forward of exactly
    prompt + branch, and the bound on packed-vs-plain rounding for them (see conftest)."""
    ids = list(tok(prompt)["input_ids"]) + branch
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    p = len(ids) - len(branch)
    rows = logp[p - 1:]
    # packed rows / other padding reorder the float32 sums: 2 blocks + head + log-softmax, at the
    # scale of the log-probs (which bounds the logits' spread they came from)
    tol = rounding_atol(rows.abs().max(), depth=4)
    return ([float(logp[p - 1 + i, t]) for i, t in enumerate(branch)],
            [int(logp[p - 1 + i].argmax()) for i in range(len(branch) + 1)], rows, tol)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bos", [False, True])
def test_packed_scoring_matches_plain_forward(tiny_tokenizer, family, bos):
    tok = _bos_tokenizer(tiny_tokenizer) if bos else tiny_tokenizer
    model = make_tiny_model(family, tok)
    items = [(p, [target_token_ids(tok, p, "Paris"), target_token_ids(tok, p, "the river city"), []])
             for p in PROMPTS]
    for side in ("left", "right"):
        tok.padding_side = side
        for packed in (True, False):
            got = score_branches(model, tok, items, packed=packed, max_row_tokens=40)
            for (prompt, branches), scores in zip(items, got):
                for branch, score in zip(branches, scores):
                    ref_lp, ref_arg, rows, tol = _reference(model, tok, prompt, branch)
                    assert score.logprobs == pytest.approx(ref_lp, rel=0, abs=tol)
                    # the argmax may differ only between tokens tied up to that rounding
                    # (each side is off by at most tol): anything else is a wrong position or token
                    assert len(score.argmax) == len(ref_arg)
                    assert all(a == r or rows[i, a] >= rows[i].max() - 2 * tol
                               for i, (a, r) in enumerate(zip(score.argmax, ref_arg)))
    tok.padding_side = "right"


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuations_equal_generate(tiny_tokenizer, family):
    tok = tiny_tokenizer
    model = make_tiny_model(family, tok)
    got = greedy_continuations(model, tok, PROMPTS, 4, drafts=[target_token_ids(tok, p, "Paris") for p in PROMPTS])
    for prompt, g in zip(PROMPTS, got):
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert g == out[0, enc["input_ids"].shape[1]:].tolist()


def test_ngram_entropy_follows_rome():
    # one distinct bigram and trigram -> entropy 0; all distinct -> log2(count), weighted 2/3 and 4/3
    assert ngram_entropy("a a a a a") == 0.0
    words = "one two three four five"
    expected = (2 / 3 * math.log2(4) + 4 / 3 * math.log2(3)) / 2
    assert ngram_entropy(words) == pytest.approx(expected)


def test_unknown_protocol_is_an_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="unknown protocol"):
        CaseScorer(None, tiny_tokenizer, ["exact_match"])
