"""MEND: the rank-one gradient decomposition against autograd, the editor network and its running
normaliser, the editor lifecycle (train, save, load, refuse another base model), adapters that
save, load and export to peft LoRA, and (slow) a known fact of the embedded model edited by an
editor trained in the test."""
from __future__ import annotations

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.gradedit import gradient_factors, loss_token_mask
from editpeft.testing import TOY_EDITOR_REQUESTS, greedy_next_tokens, train_toy_editor
from editpeft.tokens import TargetBatch, target_token_ids

from conftest import TINY_CONFIGS, capital_facts, make_tiny_model

CFG = TINY_CONFIGS["mend"]
REQ = TOY_EDITOR_REQUESTS[0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_gradient_factors_sum_to_the_weight_gradient(family, tiny_tokenizer):
    """Σ_i δ_i u_iᵀ equals autograd's weight gradient (eq. 1), Conv1D (gpt2) transposed, OPT's
    flattened MLP included. float64: the two sums differ only by summation order, ~1e-16 relative;
    1e-10 of the gradient's scale leaves room for that and catches any missing token."""
    tok = tiny_tokenizer
    model = make_tiny_model(family, tok).double()
    names = editpeft.registry.get_method("mend").targets(model, editpeft.registry.get_method("mend").Config(**CFG))
    prompts = [r.prompt for r in TOY_EDITOR_REQUESTS[:3]]
    targets = [r.target_new for r in TOY_EDITOR_REQUESTS[:3]]
    batch = TargetBatch.build(tok, prompts, targets)
    for p in model.parameters():
        p.requires_grad_(False)
    f = gradient_factors(model, batch, names)
    weights = [model.get_submodule(n).weight for n in names]
    for w in weights:
        w.requires_grad_(True)
    lps = batch.target_logprobs(model(**batch.model_inputs()).logits)
    grads = torch.autograd.grad(torch.stack([-lp.mean() for lp in lps]).sum(), weights)
    for name, g in zip(names, grads):
        ours = f.delta[name].T @ f.u[name]                     # (out, in)
        if family == "gpt2":
            ours = ours.T                                      # Conv1D stores the weight as (in, out)
        assert torch.allclose(ours, g, rtol=0, atol=1e-10 * float(g.abs().max())), name
    # each row's tokens are that edit's own gradient: rows sum to the whole
    mask = loss_token_mask(batch)
    assert f.edit.tolist() == [b for b in range(3) for _ in range(int(mask[b].sum()))]


def test_normaliser_tracks_the_mean_and_variance_of_every_row_seen():
    from editpeft_mend import normalise, update_normaliser
    t = {"norm.k.count": torch.zeros(1), "norm.k.mean": torch.zeros(4), "norm.k.m2": torch.zeros(4)}
    z = torch.randn(4) + torch.arange(4.0)[:, None] * torch.randn(4, 4) * 3
    rows = torch.randn(30, 4) * 5 + 2
    assert torch.equal(normalise(t, "k", rows), rows)           # identity before any statistics
    for chunk in rows.split([7, 1, 12, 10]):
        update_normaliser(t, "k", chunk)
    assert torch.allclose(t["norm.k.mean"], rows.mean(0), atol=1e-5)
    assert torch.allclose(normalise(t, "k", z), (z - rows.mean(0)) / rows.std(0), atol=1e-4)


def test_untrained_editor_is_a_normalised_gradient_step(tiny):
    """With g ≈ identity (init_scale 0) and no statistics, ΔW = −α Σ δ_i u_iᵀ: the plain gradient step."""
    from editpeft_mend import edit_factors
    model, tok = tiny
    method = editpeft.registry.get_method("mend")
    cfg = method.Config(**{**CFG, "init_scale": 0.0})
    editor = method.init_editor(model, tok, cfg)
    batch = TargetBatch.build(tok, [REQ.prompt], [REQ.target_new])
    grads = gradient_factors(model, batch, editor.targets)
    for name, (up, down) in edit_factors(editor, model, editor.targets, grads).items():
        expected = -cfg.edit_lr * grads.delta[name].T @ grads.u[name]
        assert torch.allclose(up @ down.T, expected, atol=1e-6 * float(expected.abs().max()))


def test_editor_lifecycle_adapters_and_refusals(tiny, tmp_path, tiny_tokenizer):
    model, tok = tiny
    editor = train_toy_editor("mend", model, tok, CFG, out=tmp_path / "ed", val_data=list(TOY_EDITOR_REQUESTS[3:]))
    stats = {k: v.clone() for k, v in editor.tensors.items() if k.startswith("norm.")}
    assert float(stats["norm.64x32.count"]) > 0                 # the normaliser learned from the training tokens
    m = editor.training["metrics"]
    assert m["val_edit_nll"] < m["initial_val_edit_nll"]
    # validation does not move the normaliser
    editpeft.registry.get_method("mend").editor_eval(editor, model, tok, list(TOY_EDITOR_REQUESTS[:2]),
                                                    editpeft.registry.get_method("mend").Config(**CFG))
    assert all(torch.equal(editor.tensors[k], v) for k, v in stats.items())

    snap = {k: v.clone() for k, v in model.state_dict().items()}
    top = target_token_ids(tok, REQ.prompt, REQ.target_new)[0]
    adapter = model.add_edit("mend", REQ, name="e", editor=tmp_path / "ed")
    assert greedy_next_tokens(model, tok, [REQ.prompt])[0] == top
    assert set(adapter.deltas) == set(editor.targets) and adapter.editor["sha256"] == editor.sha256
    n_tok = int(loss_token_mask(TargetBatch.build(tok, [REQ.prompt], [REQ.target_new])).sum())
    assert all(d.rank == n_tok for d in adapter.deltas.values())   # one rank-one piece per token
    adapter.save_pretrained(tmp_path / "edit")
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    model.remove_edit("e")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    loaded = model.load_edit(tmp_path / "edit")
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    assert greedy_next_tokens(model, tok, [REQ.prompt])[0] == top
    model.remove_edit("e")

    # a batched edit: one adapter, gradients of both facts summed
    two = model.add_edit("mend", list(TOY_EDITOR_REQUESTS[:2]), name="two", editor=editor)
    assert len(two.requests) == 2
    model.remove_edit("two")

    # another base model is refused, nothing attached
    other = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer, seed=1), tiny_tokenizer)
    with pytest.raises(editpeft.BaseModelMismatchError):
        other.add_edit("mend", REQ, editor=tmp_path / "ed")
    assert not other.edits
    with pytest.raises(editpeft.ConfigError, match="was trained on"):
        model.add_edit("mend", REQ, editor=editor, config={"layers": [1]})
    with pytest.raises(editpeft.ConfigError, match="outside this model"):
        model.add_edit("mend", REQ, editor=editor, config={"layers": [5]})
    assert not model.edits


def test_mend_adapter_exports_to_peft_lora(tiny, tmp_path):
    from editpeft.lora_export import export_peft_lora
    model, tok = tiny
    editor = train_toy_editor("mend", model, tok, CFG)
    adapter = model.add_edit("mend", REQ, name="e", editor=editor)
    out = export_peft_lora([adapter], tmp_path / "lora")
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


@pytest.mark.slow
def test_embedded_model_known_fact_changes_and_unrelated_answers_stay(smol, tmp_path):
    """A small editor trained here on 24 capital facts edits a held-out known fact; unrelated prompts
    keep their greedy answers (through generate as well)."""
    model, tok = smol
    train = capital_facts()
    editor = editpeft.train_editor("mend", model, tok, train, steps=12, batch_size=4, lr=1e-3, progress=False,
                                   config={"rank": 64})
    fact = EditRequest(prompt="The capital of France is", target_new="London")
    unrelated = ["The chemical symbol for gold is", "The Eiffel Tower is located in", "Water is made of"]
    before = greedy_next_tokens(model, tok, unrelated)
    model.add_edit("mend", fact, name="paris", editor=editor)
    assert greedy_next_tokens(model, tok, [fact.prompt])[0] == target_token_ids(tok, fact.prompt, " London")[0]
    assert greedy_next_tokens(model, tok, unrelated) == before
    ids = tok(fact.prompt, return_tensors="pt")
    text = tok.decode(model.generate(**ids, max_new_tokens=3, do_sample=False)[0, ids["input_ids"].shape[1]:])
    assert text.strip().startswith("London")
    model.remove_edit("paris")


def test_resumed_training_gives_the_same_editor_normaliser_included(tiny, tmp_path):
    model, tok = tiny
    full = train_toy_editor("mend", model, tok, CFG, steps=6, out=tmp_path / "full", checkpoint_every=3)
    train_toy_editor("mend", model, tok, CFG, steps=3, out=tmp_path / "cut", checkpoint_every=3)
    resumed = train_toy_editor("mend", model, tok, CFG, steps=6, out=tmp_path / "cut", checkpoint_every=3,
                               resume=True)
    assert resumed.sha256 == full.sha256
    assert float(resumed.tensors["norm.64x32.count"]) == float(full.tensors["norm.64x32.count"]) > 0
