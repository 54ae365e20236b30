"""FT-L, FT-M and LoRA edits: objectives, constraints, batch and append, bad input, stacking with
other methods, and the LoRA's lossless peft export."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import editpeft
import editpeft.finetune
from editpeft import EditRequest
from editpeft.finetune import edit_loss
from editpeft.tokens import TargetBatch, greedy_next_tokens, target_token_ids

from conftest import (FAMILIES, TINY_CONFIGS, assert_close_reordered, assert_untouched, editable_float64, logits_of,
                      make_tiny_model, params_snapshot)

A = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
B = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Paris")
C = EditRequest(prompt="The river that crosses {}", subject="Berlin", target_new="Madrid")
PROMPTS = [A.prompt, B.prompt, "Berlin, London, Madrid"]
METHODS = ("ft-l", "ft-m", "lora")


def _assert_weights(model, snapshot) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"weight {k} changed"


def _top1(model, tok, request: EditRequest) -> bool:
    want = target_token_ids(tok, request.prompt, request.target_new)[0]
    return greedy_next_tokens(model, tok, [request.prompt])[0] == want


# -- objectives ------------------------------------------------------------------------------

def test_objectives_differ_exactly_where_the_papers_do(tiny_tokenizer):
    """FT-M scores target token j after y_<j (teacher forcing); FT-L scores every target token
    from the distribution after the prompt. With a 2-token target they differ; with one, agree."""
    model = make_tiny_model("llama", tiny_tokenizer)
    batch = TargetBatch.for_model(model, tiny_tokenizer, ["The city that holds the"], ["Eiffel Tower"])
    ids = batch.target_ids[0]
    assert len(ids) >= 2
    logits = torch.randn(1, batch.input_ids.shape[1], model.config.vocab_size, dtype=torch.float64)
    logp = logits.log_softmax(-1)
    start = batch.last_prompt[0]
    teacher = -torch.stack([logp[0, start + j, t] for j, t in enumerate(ids)]).mean()
    last = -torch.stack([logp[0, start, t] for t in ids]).mean()
    torch.testing.assert_close(edit_loss(logits, batch, "teacher_forced").double(), teacher)
    torch.testing.assert_close(edit_loss(logits, batch, "last_position").double(), last)
    one = dataclasses.replace(batch, target_ids=[ids[:1]])
    torch.testing.assert_close(edit_loss(logits, one, "teacher_forced"), edit_loss(logits, one, "last_position"))
    # logits kept from the last prompt position on (the LM head skipped before it) give the same loss
    torch.testing.assert_close(edit_loss(logits[:, start:], batch, "teacher_forced", first=start).double(), teacher)
    torch.testing.assert_close(edit_loss(logits[:, start:], batch, "last_position", first=start).double(), last)
    assert abs(float(teacher - last)) > 1e-3    # random logits: the two objectives are different numbers


# -- the methods on tiny models ----------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_batch_edits_every_request_and_append_keeps_the_earlier_ones(method, tiny):
    model, tok = tiny
    cfg = TINY_CONFIGS[method]
    first = model.add_edit(method, [A, B], name="e", config=cfg)      # one batch, trained together
    assert _top1(model, tok, A) and _top1(model, tok, B)
    second = model.add_edit(method, C, name="e", append=True)           # the adapter's own settings
    assert second is model.edits["e"] and second is not first
    assert [r.target_new for r in second.requests] == ["Rome", "Paris", "Madrid"]
    assert all(_top1(model, tok, r) for r in (A, B, C)), "replay keeps the earlier requests"
    assert set(second.deltas) == set(first.deltas)        # the same tensors, trained further


def test_append_without_replay_trains_only_the_new_requests(tiny, monkeypatch):
    model, tok = tiny
    seen = []
    real = editpeft.finetune.train_changes

    def spy(model_, tok_, requests, *args, **kwargs):
        seen.append([r.target_new for r in requests])
        return real(model_, tok_, requests, *args, **kwargs)
    monkeypatch.setattr(editpeft.finetune, "train_changes", spy)
    model.add_edit("ft-m", A, name="e", config={**TINY_CONFIGS["ft-m"], "replay": False})
    model.add_edit("ft-m", C, name="e", append=True)
    model.add_edit("ft-m", B, name="r", config=TINY_CONFIGS["ft-m"])
    model.add_edit("ft-m", C, name="r", append=True)
    assert seen == [["Rome"], ["Madrid"], ["Paris"], ["Paris", "Madrid"]]


def test_ftl_change_stays_in_its_linf_box_also_after_append(tiny):
    model, tok = tiny
    delta = 0.02
    cfg = {**TINY_CONFIGS["ft-l"], "norm_constraint": delta}
    model.add_edit("ft-l", A, name="e", config=cfg)
    adapter = model.add_edit("ft-l", B, name="e", append=True)
    (change,) = adapter.deltas.values()
    assert float(change.weight.abs().max()) <= delta          # clamp is exact: no tolerance needed
    assert float(change.weight.abs().max()) == pytest.approx(delta)   # the bound is active


def test_lora_is_deterministic_and_uses_the_requested_modules(tiny):
    model, tok = tiny
    cfg = {**TINY_CONFIGS["lora"], "dropout": 0.2, "target_modules": ["q_proj", "v_proj"], "layers": [1]}
    a = model.add_edit("lora", A, name="a", config=cfg)
    model.remove_edit("a")
    b = model.add_edit("lora", A, name="b", config=cfg)
    assert sorted(a.deltas) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    for name in a.deltas:
        assert a.deltas[name].rank == 4
        assert torch.equal(a.deltas[name].up, b.deltas[name].up) and torch.equal(a.deltas[name].down, b.deltas[name].down)


def test_lora_trains_on_paraphrases_the_request_carries(tiny, monkeypatch):
    model, tok = tiny
    batches = []
    real = TargetBatch.for_model.__func__

    def spy(cls, model_, tok_, prompts, *args, **kwargs):
        batches.append(list(prompts))
        return real(cls, model_, tok_, prompts, *args, **kwargs)
    monkeypatch.setattr(TargetBatch, "for_model", classmethod(spy))
    r = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome",
                    paraphrases=("Where is the Eiffel Tower? In",))
    model.add_edit("lora", r, config=TINY_CONFIGS["lora"])
    model.add_edit("ft-m", r, config=TINY_CONFIGS["ft-m"])
    assert [r.prompt, "Where is the Eiffel Tower? In"] in batches      # LoRA: prompt and paraphrase
    assert [r.prompt] in batches                                         # FT-M: the prompt only (default)
    batches.clear()
    model.add_edit("ft-m", r, config={**TINY_CONFIGS["ft-m"], "context_lengths": [[3, 2]]})
    prompts = next(b for b in batches if len(b) == 3)                   # the prompt + 2 sampled prefixes
    assert prompts[0] == r.prompt and all(p.endswith(". " + r.prompt) for p in prompts[1:])


# -- bad input: clear errors, model untouched ---------------------------------------------------

@pytest.mark.parametrize("bound", [0.0, -1e-3])
def test_non_positive_norm_constraint_is_refused(tiny, bound):
    model, tok = tiny
    snap = params_snapshot(model)
    for method in ("ft-l", "ft-m"):
        with pytest.raises(editpeft.ConfigError, match="norm_constraint must be > 0"):
            model.add_edit(method, A, config={**TINY_CONFIGS[method], "norm_constraint": bound})
    assert not model.edits
    assert_untouched(model, snap)


@pytest.mark.parametrize("tiny", ["gpt2", "opt"], indirect=True)
@pytest.mark.parametrize("method", ["ft-m", "lora"])
def test_diverging_learning_rate_leaves_the_model_untouched(method, tiny):
    """A learning rate of 1e34 overflows these unnormalised tiny models to NaN at step 2; an
    update beyond float32 overflows in the optimiser. Either way: a clear error, nothing changed."""
    model, tok = tiny
    model.add_edit(method, A, name="kept", config=TINY_CONFIGS[method])
    snap, before = params_snapshot(model), logits_of(model, tok, PROMPTS)
    with pytest.raises(editpeft.EditOptimizationError, match="Lower"):
        model.add_edit(method, B, config={**TINY_CONFIGS[method], "lr": 1e34, "steps": 5, "stop_loss": None})
    with pytest.raises(editpeft.EditOptimizationError, match="overflowed"):
        model.add_edit(method, B, name="kept", append=True, config={"lr": 1e38, "steps": 5, "stop_loss": None})
    assert list(model.edits) == ["kept"] and model.edits["kept"].active
    _assert_weights(model, snap)
    assert torch.equal(logits_of(model, tok, PROMPTS), before)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_saturating_divergence_is_an_error_on_the_embedded_model(method, smol):
    """Normalised models (RMSNorm) do not overflow to NaN: a huge step saturates the logits to a
    near-uniform distribution, so the target loss *rises* from the trained model's — refused."""
    model, tok = smol
    snap, edits = params_snapshot(model), list(model.edits)
    request = EditRequest(prompt="The Eiffel Tower is located in the city of", target_new="Rome")
    with pytest.raises(editpeft.EditOptimizationError, match="rose from"):
        # (FT-L's default L∞ box cannot diverge: the bound is lifted to show the check)
        model.add_edit(method, request, config={"lr": 1e30, "steps": 3, "stop_loss": None, **(
            {"norm_constraint": None} if method == "ft-l" else {})})
    assert list(model.edits) == edits
    _assert_weights(model, snap)


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
def test_unknown_lora_target_module_is_refused_before_training(family, tiny_tokenizer, monkeypatch):
    model = editpeft.enable_editing(make_tiny_model(family, tiny_tokenizer), tiny_tokenizer)
    monkeypatch.setattr(editpeft.finetune, "train_tensors",
                        lambda *a, **k: pytest.fail("training started for a config that names no module"))
    with pytest.raises(editpeft.ConfigError, match="match no Linear module") as err:
        model.add_edit("lora", A, config={**TINY_CONFIGS["lora"], "target_modules": ["q_proj", "not_a_module"]}
                       if family == "llama" else {**TINY_CONFIGS["lora"], "target_modules": ["not_a_module"]})
    present = {"llama": "down_proj", "gpt2": "c_attn", "t5": "wo"}[family]
    assert "not_a_module" in str(err.value) and present in str(err.value)
    assert not model.edits


# -- stacking and export -----------------------------------------------------------------------

ROME = {**TINY_CONFIGS["rome"]}


@pytest.mark.parametrize("other,other_cfg", [("rome", ROME), ("grace", TINY_CONFIGS["grace"])])
@pytest.mark.parametrize("lora_first", [False, True], ids=["lora-second", "lora-first"])
def test_lora_stacks_with_rome_and_grace_on_the_same_module(tiny, other, other_cfg, lora_first):
    model, tok = tiny
    lora_cfg = {**TINY_CONFIGS["lora"], "target_modules": ["down_proj"], "layers": [0]}   # ROME/GRACE edit it too
    steps = [("lora", A, lora_cfg), (other, C, other_cfg)]
    for method, request, cfg in (steps if lora_first else steps[::-1]):
        model.add_edit(method, request, name=method, config=cfg)
    assert "model.layers.0.mlp.down_proj" in model.edits["lora"].targets
    assert _top1(model, tok, A) and _top1(model, tok, C)
    model.edits["lora"].active = False
    assert not _top1(model, tok, A) and _top1(model, tok, C)


@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
def test_lora_edit_exports_to_peft_without_loss(tiny, tmp_path):
    from peft import PeftModel
    model, tok = tiny
    family = model.config.model_type
    adapter = model.add_edit("lora", [A, C], name="lora", config=TINY_CONFIGS["lora"])
    adapter.to_peft_lora(tmp_path / "peft")
    cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and "editpeft_truncation" not in cfg
    edited = logits_of(editable_float64(family, tok, [adapter], tmp_path), tok, PROMPTS)
    peft_model = PeftModel.from_pretrained(make_tiny_model(family, tok).double(), tmp_path / "peft")
    # the same float32 factors applied in another order, in float64 (see test_lora_export)
    assert_close_reordered(logits_of(peft_model, tok, PROMPTS), edited, depth=3)
