"""KE: the untrained gate is half a normalised gradient step (checked against autograd's weight
gradient), the Lagrangian descends in the editor and ascends in λ, the editor lifecycle (train,
save, load, refuse another base model), adapters that save and load, and (slow) a known fact of
the embedded model edited by an editor trained in the test."""
from __future__ import annotations

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.testing import TOY_EDITOR_REQUESTS, greedy_next_tokens, train_toy_editor
from editpeft.tokens import TargetBatch, target_token_ids

from conftest import TINY_CONFIGS, capital_facts, make_tiny_model

CFG = TINY_CONFIGS["ke"]
REQ = TOY_EDITOR_REQUESTS[0]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_initial_update_is_half_a_normalised_gradient_step(family, tiny_tokenizer):
    """At init (α̌ = 1, uniform softmax·m, β̌ ≈ 0 up to the 0.01-scaled FFN, η ≈ 0) ΔW ≈ s_max·σ(0)·∇W/‖∇W‖.
    float64 with W2 zeroed makes it exact: 1e-9 of the scale covers summation order only."""
    from editpeft_ke import edit_factors, conditions
    from editpeft.gradedit import gradient_factors
    tok = tiny_tokenizer
    model = make_tiny_model(family, tok).double()
    for p in model.parameters():
        p.requires_grad_(False)
    method = editpeft.registry.get_method("ke")
    cfg = method.Config(**{**CFG, "max_scale": 2.0})
    editor = method.init_editor(model, tok, cfg)
    editor.tensors = {k: (torch.zeros_like(v) if ".W2" in k else v).double() for k, v in editor.tensors.items()}
    batch = TargetBatch.build(tok, [REQ.prompt], [REQ.target_new])
    grads = gradient_factors(model, batch, editor.targets)
    factors, cols = edit_factors(editor, model, editor.targets, grads, conditions(editor, model, tok, [REQ], cfg), cfg)
    weights = [model.get_submodule(n).weight for n in editor.targets]
    for w in weights:
        w.requires_grad_(True)
    lps = batch.target_logprobs(model(**batch.model_inputs()).logits)
    auto = torch.autograd.grad(-lps[0].mean(), weights)
    for name, g in zip(editor.targets, auto):
        g = g.T if family == "gpt2" else g                         # Conv1D stores (in, out)
        up, down = factors[name]
        expected = -2.0 * 0.5 * g / g.norm()
        assert torch.allclose(up @ down.T, expected, rtol=0, atol=1e-9 * float(expected.abs().max())), name
    assert cols.tolist()[-1] == 0                                   # the β column belongs to edit 0


def test_lagrangian_descends_in_the_editor_and_ascends_in_the_multiplier():
    from editpeft_ke import lagrangian
    rho = torch.zeros(1, requires_grad=True)
    edit = torch.tensor(2.0, requires_grad=True)
    kl = torch.tensor(0.5, requires_grad=True)
    loss = lagrangian(edit, kl, rho, margin=0.1)
    lam = torch.nn.functional.softplus(torch.zeros(1))
    assert torch.isclose(loss, 2.0 + lam * 0.4)                     # the value is the Lagrangian
    loss.backward()
    assert torch.isclose(kl.grad, lam) and edit.grad == 1.0
    assert rho.grad < 0                     # the constraint is violated: descent on ρ raises λ
    rho.grad = None
    lagrangian(edit, torch.tensor(0.01), rho, margin=0.1).backward()
    assert rho.grad > 0                     # satisfied: λ falls


def test_editor_lifecycle_adapters_and_refusals(tiny, tmp_path, tiny_tokenizer):
    model, tok = tiny
    editor = train_toy_editor("ke", model, tok, CFG, out=tmp_path / "ed", val_data=list(TOY_EDITOR_REQUESTS[3:]))
    m = editor.training["metrics"]
    assert m["val_edit_nll"] < m["initial_val_edit_nll"] and "val_multiplier" in m
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    top = target_token_ids(tok, REQ.prompt, REQ.target_new)[0]
    adapter = model.add_edit("ke", REQ, name="e", editor=tmp_path / "ed")
    assert greedy_next_tokens(model, tok, [REQ.prompt])[0] == top
    adapter.save_pretrained(tmp_path / "edit")
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    model.remove_edit("e")
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    loaded = model.load_edit(tmp_path / "edit")
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())
    model.remove_edit("e")
    two = model.add_edit("ke", list(TOY_EDITOR_REQUESTS[:2]), name="two", editor=editor)
    assert all(d.rank == adapter.deltas[n].rank + two.deltas[n].rank - adapter.deltas[n].rank
               for n, d in two.deltas.items())
    model.remove_edit("two")
    other = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer, seed=1), tiny_tokenizer)
    with pytest.raises(editpeft.BaseModelMismatchError):
        other.add_edit("ke", REQ, editor=tmp_path / "ed")
    with pytest.raises(editpeft.EditorFormatError, match="expects"):
        model.add_edit("ke", REQ, editor=editor, config={"hidden_dim": 7})
    assert not other.edits and not model.edits


@pytest.mark.slow
def test_embedded_model_known_fact_changes_and_unrelated_answers_stay(smol):
    """A small KE editor trained here on capital facts edits a held-out known fact; unrelated prompts keep
    their greedy answers except a neighbouring location fact (measured: "The Eiffel Tower is located in"
    changes its second token: KE's weak locality, the survey's finding; the other two are kept)."""
    model, tok = smol
    train = capital_facts()
    editor = editpeft.train_editor("ke", model, tok, train, steps=24, batch_size=4, lr=1e-3, progress=False)
    fact = EditRequest(prompt="The capital of France is", target_new="London")
    unrelated = ["The chemical symbol for gold is", "The Eiffel Tower is located in", "Water is made of"]
    before = greedy_next_tokens(model, tok, unrelated)
    model.add_edit("ke", fact, name="paris", editor=editor)
    assert greedy_next_tokens(model, tok, [fact.prompt])[0] == target_token_ids(tok, fact.prompt, " London")[0]
    after = greedy_next_tokens(model, tok, unrelated)
    assert after[0] == before[0] and after[2] == before[2]
    model.remove_edit("paris")
