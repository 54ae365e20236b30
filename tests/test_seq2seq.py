"""Encoder-decoder models (tiny random T5/mT5/UMT5): seq2seq target batches, loading, and the
harness scoring targets as decoder labels, without an edit and with a toy edit."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch

import editpeft
from editpeft.arch import get_arch
from editpeft.attach import LowRankDelta, as_btd, capture_inputs
from editpeft.evaluation import CaseScorer, EvalCase, evaluate
from editpeft.evaluation.metrics import generate_texts
from editpeft.registry import MethodInfo
from editpeft.tokens import TargetBatch, greedy_next_tokens, next_token_logits, target_token_ids

from conftest import toy_eval_cases, SEQ2SEQ_FAMILIES, assert_close_reordered, logits_of, make_tiny_model, params_snapshot, assert_untouched

PROMPTS = ["The Eiffel Tower is located in the city of", "Berlin, London"]
TARGETS = ["Paris", "Madrid and Tokyo"]


@pytest.fixture(params=SEQ2SEQ_FAMILIES)
def s2s(request, tiny_tokenizer):
    return editpeft.enable_editing(make_tiny_model(request.param, tiny_tokenizer), tiny_tokenizer), tiny_tokenizer


@pytest.fixture
def t5(tiny_tokenizer):
    return editpeft.enable_editing(make_tiny_model("t5", tiny_tokenizer), tiny_tokenizer), tiny_tokenizer


def _labels(tok, prompt: str, target: str) -> torch.Tensor:
    return torch.tensor([target_token_ids(tok, prompt, target)])


def test_seq2seq_batch_matches_the_models_own_label_loss(s2s):
    """target_nll of the seq2seq form equals the loss transformers computes from ``labels`` (which
    shifts them right itself), row by row: a batched and a single-row forward, reordered float32
    sums through 2 encoder + 2 decoder blocks, the head and the NLL (depth 6, see conftest)."""
    model, tok = s2s
    batch = TargetBatch.for_model(model, tok, PROMPTS, TARGETS)
    assert batch.is_seq2seq and batch.decoder_ids is batch.decoder_input_ids
    assert batch.last_prompt == [0, 0] and batch.target_positions(1).tolist() == list(range(len(batch.target_ids[1])))
    assert batch.decoder_input_ids[:, 0].tolist() == [model.config.decoder_start_token_id] * 2
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
        for row, (p, t) in enumerate(zip(PROMPTS, TARGETS)):
            ids = torch.tensor([tok(p)["input_ids"]])
            loss = model(input_ids=ids, labels=_labels(tok, p, t)).loss
            assert_close_reordered(batch.target_nll(logits, rows=[row]).reshape(loss.shape), loss, depth=6)
    sub = batch.select([1])
    assert sub.target_ids == [batch.target_ids[1]] and torch.equal(sub.decoder_input_ids[0], batch.decoder_input_ids[1])  # integer ids: exact


def test_causal_form_is_unchanged(tiny_tokenizer):
    model = make_tiny_model("llama", tiny_tokenizer)
    batch = TargetBatch.for_model(model, tiny_tokenizer, PROMPTS, TARGETS)
    assert not batch.is_seq2seq and batch.decoder_ids is batch.input_ids
    assert set(batch.model_inputs()) == {"input_ids", "attention_mask"}
    assert torch.equal(batch.input_ids, TargetBatch.build(tiny_tokenizer, PROMPTS, TARGETS).input_ids)  # integer ids: exact


def test_next_token_and_greedy_follow_generate(s2s):
    model, tok = s2s
    logits = next_token_logits(model, tok, PROMPTS)
    assert logits.shape == (2, model.config.vocab_size)
    for p, first in zip(PROMPTS, greedy_next_tokens(model, tok, PROMPTS)):
        out = model.generate(**tok(p, return_tensors="pt"), max_new_tokens=1, do_sample=False)
        assert out[0, 0] == model.config.decoder_start_token_id and out[0, 1] == first


def test_enable_editing_accepts_t5_and_hooks_on_both_stacks_leave_no_trace(t5):
    model, tok = t5
    arch = get_arch(model)
    assert arch.topology == "seq2seq" and arch.stacks == ("encoder", "decoder")
    assert editpeft.EditMethod.topologies == ("causal",)
    snap = params_snapshot(model)
    base = logits_of(model, tok, PROMPTS)
    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, PROMPTS), base)  # bitwise: edits off, original code path
    assert_untouched(model, snap)


def test_load_model_picks_seq2seq_class(t5, tmp_path):
    from editpeft.cli import _load_model
    from editpeft.models import load_model
    model, tok = t5
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, _ = load_model(tmp_path / "m")
    assert type(loaded).__name__ == "T5ForConditionalGeneration" and not loaded.training
    cli_model, _ = _load_model(str(tmp_path / "m"))
    assert hasattr(cli_model, "add_edit")
    with torch.no_grad():
        assert torch.equal(logits_of(loaded, tok, PROMPTS), logits_of(model, tok, PROMPTS))  # bitwise: the same weights and code path


# -- the harness -------------------------------------------------------------------------------
@dataclass
class ToyConfig(editpeft.MethodConfig):
    bias: float = 30.0


class ToyHeadEdit(editpeft.EditMethod):
    """A toy weight delta on ``lm_head``: at the decoder positions that predict the target (read
    through :class:`TargetBatch`'s seq2seq form), add ``bias`` to the target token's logit.
    With H the captured lm_head inputs (k x d, k <= d, full rank), down = pinv(H) gives H @ down = I."""

    name, kind, Config = "toy_head", "weight_delta", ToyConfig
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config):
        head = model.get_output_embeddings()
        batch = TargetBatch.for_model(model, tokenizer, [r.prompt for r in requests], [r.target_new for r in requests])
        store: list = []
        with torch.no_grad(), capture_inputs(head, store):
            model(**batch.model_inputs())
        acts = as_btd(store[0], batch.decoder_ids)
        keys = torch.cat([acts[i, batch.target_positions(i)] for i in range(len(requests))]).double()
        labels = [t for ids in batch.target_ids for t in ids]
        up = torch.zeros(head.out_features, len(labels), dtype=torch.float64)
        up[labels, torch.arange(len(labels))] = config.bias
        down = torch.linalg.pinv(keys)          # (d, k)
        name = next(n for n, m in model.named_modules() if m is head)
        return editpeft.WeightDeltaAdapter({name: LowRankDelta(up.float(), down.float())},
                                           method=self.name, hparams=config.to_dict(), requests=list(requests),
                                           targets=[name])


@pytest.fixture
def toy_method(monkeypatch):
    from editpeft import registry
    real = registry.discover

    def discover():
        found = real()
        found["toy_head"] = MethodInfo("toy_head", "weight_delta", "tests", "0", "test_seq2seq:ToyHeadEdit", cls=ToyHeadEdit)
        return found
    monkeypatch.setattr(registry, "discover", discover)


def _cases() -> list[EvalCase]:
    return toy_eval_cases([("Eiffel Tower", "Rome"), ("Colosseum", "Paris"), ("gold", "Berlin")],
                          one_hop=False, extra_generation=())


def _by_hand(model, tok, prompt: str, answer: str, contrast: str | None) -> dict[str, float]:
    """token_em / gen_em / prob_margin from the model's own ``labels`` path and ``generate``."""
    ids = torch.tensor([tok(prompt)["input_ids"]])
    labels = _labels(tok, prompt, answer)
    with torch.no_grad():
        logp = model(input_ids=ids, labels=labels).logits.double().log_softmax(-1)[0]
        gen = model.generate(input_ids=ids, max_new_tokens=labels.shape[1], do_sample=False)[0, 1:]
    out = {"token_em": (logp.argmax(-1) == labels[0]).double().mean().item(),
           "gen_em": float(gen.tolist() == labels[0].tolist())}
    if contrast is not None:
        c = _labels(tok, prompt, contrast)
        with torch.no_grad():
            logc = model(input_ids=ids, labels=c).logits.double().log_softmax(-1)[0]
        margin = logp.gather(-1, labels[0][:, None]).sum() - logc.gather(-1, c[0][:, None]).sum()
        out.update(prob_margin=float(margin > 0), prob_margin_mean=margin.item())
    return out


def _check(scores: dict, expected: dict) -> None:
    # margins: float32 log-softmax sums of <= 3 tokens of size ~6 against float64 ones -> 1e-4 absolute
    for k, v in expected.items():
        assert scores[k] == pytest.approx(v, abs=1e-4), (k, scores[k], v)


def test_harness_scores_decoder_labels_without_an_edit(t5):
    model, tok = t5
    cases = _cases()
    scorer = CaseScorer(model, tok)
    base = scorer.baseline(cases)
    for case, s in zip(cases, scorer.score(cases, base)):
        # The baseline and the score batch the probes differently, and CPU kernels round a row
        # differently in batches of other sizes (~1e-7 relative in float32, logits ~ 10): the
        # margin's change is zero up to 1e-5; agreement (argmax, sign) is exact.
        loc = dict(s["locality"])
        assert loc.pop("prob_margin_mean") == pytest.approx(0.0, abs=1e-5)
        assert loc == {"token_em": 1.0, "gen_em": 1.0, "prob_margin": 1.0}
        r = case.requests[0]
        _check(s["reliability"], _by_hand(model, tok, r.prompt, r.target_new, r.target_true))
        g = case.generalization[0]
        _check(s["generalization"], _by_hand(model, tok, g.prompt, g.answers[0], g.contrast))
        gold = case.locality["neighborhood"][0]
        _check(s["locality_answer"], _by_hand(model, tok, gold.prompt, gold.answers[0], gold.contrast))
    texts = generate_texts(model, tok, ["The Eiffel Tower is"], max_new_tokens=5)
    assert texts[0].startswith("The Eiffel Tower is ")


def test_harness_runs_a_toy_edit_on_t5(t5, toy_method, tmp_path):
    model, tok = t5
    cases = _cases()
    snap = params_snapshot(model)
    out = evaluate(model, tok, "toy_head", cases, out=tmp_path, mode="single", progress=False)
    metrics = out["toy_head"]["metrics"]
    assert out["toy_head"]["failed_edits"] == 0
    assert metrics["reliability"]["token_em"]["mean"] == 1.0 and metrics["reliability"]["gen_em"]["mean"] == 1.0
    assert not model.edits
    assert_untouched(model, snap)
    lines = {ln["case_id"]: ln for ln in map(json.loads, (tmp_path / "toy_head" / "cases.jsonl").read_text().splitlines())}
    for case in cases:   # the same numbers, recomputed by hand with the edit on
        r = case.requests[0]
        model.add_edit("toy_head", r, name="toy")
        _check(lines[case.case_id]["scores"]["reliability"], _by_hand(model, tok, r.prompt, r.target_new, r.target_true))
        g = case.generalization[0]
        _check(lines[case.case_id]["scores"]["generalization"], _by_hand(model, tok, g.prompt, g.answers[0], g.contrast))
        model.remove_edit("toy")
    assert_untouched(model, snap)


def test_grace_edits_t5_through_the_harness(t5, tmp_path):
    """GRACE's codebook sits on a decoder block of T5: every edit is reliable, the unedited
    neighbourhood keeps its answers, and the model is restored bitwise after each case."""
    model, tok = t5
    snap = params_snapshot(model)
    out = evaluate(model, tok, "grace", _cases(), out=tmp_path, mode="single", progress=False,
                   config={"grace": {"layer": 1, "steps": 100}})
    grace = out["grace"]
    assert grace["failed_edits"] == 0
    assert grace["metrics"]["reliability"]["token_em"]["mean"] == 1.0
    assert grace["metrics"]["locality"]["token_em"]["mean"] == 1.0
    assert not model.edits
    assert_untouched(model, snap)
