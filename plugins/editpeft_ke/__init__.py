"""KE — KnowledgeEditor, a hyper-network that turns the edit's gradient into a weight update.

De Cao, Aziz, Titov. "Editing Factual Knowledge in Language Models", EMNLP 2021 (arXiv:2104.08164).

A hyper-network g_φ reads the edit — the input x, the model's original prediction y and the
alternative a — with a bidirectional LSTM over the base model's (frozen) token embeddings; its
mean-pooled states give a condition vector c = tanh(W_c · mean_t BiLSTM(x; y; a)_t + b_c) (§3.2).
For every edited weight W ∈ R^{m×n} an FFN of c predicts α̂, β̂ ∈ R^m, α̌, β̌ ∈ R^n and η ∈ R, and the
update gates the gradient of the edit's loss ∇_W L(θ; x, a) (§3.2, eqs. 4-5):

    ΔW = s_max · σ(η) · ( ∇̂_W ⊙ (softmax(α̂) α̌ᵀ) + softmax(β̂) β̌ᵀ ),        W' = W − ΔW

Because ∇_W = Σ_i δ_i u_iᵀ (rank one per token, :mod:`editpeft.gradedit`), the gated gradient is
Σ_i (softmax(α̂) ⊙ δ_i)(α̌ ⊙ u_i)ᵀ — the gating acts on the gradient's factors — and ΔW is a
low-rank :class:`~editpeft.LowRankDelta` (one column per token plus one for the β term).

Training solves the paper's constrained problem (§3.3, eq. 3)

    min_φ  Σ_{x'∈P_x} L(θ'; x', a)   s.t.   C = KL(p_θ(·|O_x) ‖ p_θ'(·|O_x)) ≤ m

by its Lagrangian L_e + λ (C − m), descending in φ and ascending in λ ≥ 0 (λ = softplus(ρ)); with
one optimiser the ascent is a reversed gradient: the loss adds (λ̄ − λ)(C − m)̄ (bars: detached),
whose value is 0 and whose gradient in ρ is −λ'(ρ)(C − m). P_x is the edit prompt and its
paraphrases; O_x the edit's locality prompts, else other facts of the batch.

Differences from the reference code, stated: ∇̂_W is the gradient divided by its Frobenius norm
and softmax(α̂) is scaled by m (mean gate 1), so that at initialisation (α̌ = 1, β̌ = 0, η = 0) the
edit is half a normalised gradient step of size s_max whatever the model's gradient scale; the
FFNs have no weight normalisation; the margin m is fixed (the paper anneals it).

Example:
    >>> editor = editpeft.train_editor("ke", model, tok, "zsre_mend_train_1k.json", out="runs/ke")  # doctest: +SKIP
    >>> model.add_edit("ke", request, editor=editor)                                             # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import editpeft
from editpeft import EditRequest, MethodConfig, WeightDeltaAdapter
from editpeft.arch import linear_dims
from editpeft.deltas import LowRankDelta
from editpeft.editors import Editor
from editpeft.gradedit import EditProbe, GradFactors, edited_modules, gradient_factors, routed_deltas
from editpeft.method import check
from editpeft.tokens import TargetBatch, model_device, pad_id, pad_rows

logger = logging.getLogger(__name__)


@dataclass
class KEConfig(MethodConfig):
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1], metadata={
        "help": "decoder blocks whose modules are edited (negative: from the end)"})
    modules: list[str] = field(default_factory=list, metadata={
        "help": "module names inside a block to edit, e.g. ['mlp.down_proj']; empty: the MLP output projection"})
    lstm_dim: int = field(default=128, metadata={"help": "hidden size of each direction of the edit encoder's BiLSTM"})
    condition_dim: int = field(default=256, metadata={"help": "size of the condition vector c"})
    hidden_dim: int = field(default=128, metadata={"help": "hidden size of each weight's conditioning FFN (KE: 128)"})
    max_scale: float = field(default=1.0, metadata={"help": "s_max, the bound of the update's scale (KE: 1)"})
    margin: float = field(default=1e-3, metadata={"help": "m, the bound on the KL of unrelated inputs (KE's margin)"})
    init_multiplier: float = field(default=1.0, metadata={"help": "initial Lagrange multiplier λ"})
    locality_prompts: int = field(default=2, metadata={"help": "unrelated prompts per edit in each training step"})

    def validate(self) -> None:
        check(len(self.layers) > 0 and len(set(self.layers)) == len(self.layers),
              f"layers must list distinct block indices, got {self.layers!r}")
        check(min(self.lstm_dim, self.condition_dim, self.hidden_dim) >= 1, "lstm_dim, condition_dim and "
              "hidden_dim must be >= 1")
        check(self.max_scale > 0, "max_scale must be > 0")
        check(self.margin >= 0, "margin must be >= 0")
        check(self.init_multiplier > 0, "init_multiplier must be > 0")
        check(self.locality_prompts >= 0, "locality_prompts must be >= 0")


def condition_text(r: EditRequest) -> str:
    """The edit as the hyper-network reads it: original prediction y, alternative a, input x."""
    return f"{r.target_true or ''} >> {r.target_new} || {r.prompt}"


def _lstm(embed_dim: int, config: KEConfig) -> nn.LSTM:
    return nn.LSTM(embed_dim, config.lstm_dim, batch_first=True, bidirectional=True)


def init_tensors(model, names: Sequence[str], config: KEConfig) -> dict[str, torch.Tensor]:
    """Fresh hyper-network tensors: the encoder, and one conditioning FFN per edited module whose output
    bias starts the gate at α̌ = 1, β̌ = 0, uniform softmaxes, η = 0."""
    embed_dim = model.get_input_embeddings().weight.shape[1]
    t = {f"enc.lstm.{k}": v.detach().clone() for k, v in _lstm(embed_dim, config).named_parameters()}
    enc = nn.Linear(2 * config.lstm_dim, config.condition_dim)
    t["enc.W"], t["enc.b"] = enc.weight.detach().clone(), enc.bias.detach().clone()
    for i, name in enumerate(names):
        n, m = linear_dims(model.get_submodule(name))
        first = nn.Linear(config.condition_dim, config.hidden_dim)
        second = nn.Linear(config.hidden_dim, 2 * (m + n) + 1)
        t[f"ffn.{i}.W1"], t[f"ffn.{i}.b1"] = first.weight.detach().clone(), first.bias.detach().clone()
        t[f"ffn.{i}.W2"] = second.weight.detach().clone() * 0.01
        bias = torch.zeros(2 * (m + n) + 1)
        bias[:n] = 1.0                                  # α̌ = 1: the gate starts as the (normalised) gradient
        t[f"ffn.{i}.b2"] = bias
    t["lagrange.rho"] = torch.full((1,), math.log(math.expm1(config.init_multiplier)))
    return t


def conditions(editor: Editor, model, tokenizer, requests: Sequence[EditRequest], config: KEConfig) -> torch.Tensor:
    """(B, condition_dim): c for each request (BiLSTM over the frozen input embeddings, mean-pooled)."""
    device = model_device(model)
    rows = [tokenizer(condition_text(r))["input_ids"] for r in requests]
    ids, mask = pad_rows(rows, pad_id(tokenizer))
    ids, mask = ids.to(device), mask.to(device)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids).to(editor.tensors["enc.W"].dtype)
    lstm = _lstm(emb.shape[-1], config).to(device)
    params = {k[len("enc.lstm."):]: v for k, v in editor.tensors.items() if k.startswith("enc.lstm.")}
    states, _ = torch.func.functional_call(lstm, params, (emb,))
    pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    return torch.tanh(pooled @ editor.tensors["enc.W"].T + editor.tensors["enc.b"])


def edit_factors(editor: Editor, model, names: Sequence[str], grads: GradFactors, cond: torch.Tensor,
                 config: KEConfig) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Per module, the factors of −ΔW for every edit (token columns, then one β column per edit), and
    the edit id of each column."""
    t = editor.tensors
    B = cond.shape[0]
    cols = torch.cat([grads.edit, torch.arange(B, device=grads.edit.device)])
    out = {}
    for i, name in enumerate(names):
        u, delta = grads.u[name], grads.delta[name]
        n, m = u.shape[1], delta.shape[1]
        h = torch.tanh(cond @ t[f"ffn.{i}.W1"].T + t[f"ffn.{i}.b1"]) @ t[f"ffn.{i}.W2"].T + t[f"ffn.{i}.b2"]
        col_a, row_a, col_b, row_b, eta = h.split([n, m, n, m, 1], dim=-1)
        # ‖∇W‖_F of each edit from its factors: ‖Σ δ_i u_iᵀ‖² = Σ_ij (δ_i·δ_j)(u_i·u_j) over its tokens
        same = (grads.edit[:, None] == grads.edit[None, :]).to(u.dtype)
        per_tok = ((delta @ delta.T) * (u @ u.T) * same).sum(1)
        norm = torch.zeros(B, device=u.device, dtype=u.dtype).index_add(0, grads.edit, per_tok).clamp_min(1e-30).sqrt()
        scale = config.max_scale * torch.sigmoid(eta[:, 0])                      # (B,)
        e = grads.edit
        up_a = (m * row_a.softmax(-1))[e] * delta * (scale / norm)[e, None]      # (tokens, m)
        down_a = col_a[e] * u                                                    # (tokens, n)
        up_b = row_b.softmax(-1) * scale[:, None]
        up = -torch.cat([up_a, up_b]).T
        down = torch.cat([down_a, col_b]).T
        out[name] = (up, down)
    return out, cols


def lagrangian(edit_nll: torch.Tensor, kl: torch.Tensor, rho: torch.Tensor, margin: float) -> torch.Tensor:
    """L_e + λ(C − m) for the editor, with a reversed gradient for ρ (ascent in λ = softplus(ρ))."""
    lam = F.softplus(rho).sum()
    slack = kl - margin
    return edit_nll + lam.detach() * slack + (lam.detach() - lam) * slack.detach()


class KnowledgeEditor(editpeft.EditMethod):
    name = "ke"
    kind = "weight_delta"
    Config = KEConfig
    requires_editor = True

    def targets(self, model, config: KEConfig) -> list[str]:
        return edited_modules(model, config.layers, config.modules)

    def init_editor(self, model, tokenizer, config: KEConfig) -> Editor:
        names = self.targets(model, config)
        return Editor(self.name, init_tensors(model, names, config), hparams=config.to_dict(), targets=names)

    def _factors(self, editor, model, tokenizer, requests, config):
        batch = TargetBatch.build(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                                  device=model_device(model))
        grads = gradient_factors(model, batch, editor.targets)
        cond = conditions(editor, model, tokenizer, requests, config)
        factors, cols = edit_factors(editor, model, editor.targets, grads, cond, config)
        return factors, cols, grads

    def editor_step(self, editor, model, tokenizer, batch, config):
        factors, cols, grads = self._factors(editor, model, tokenizer, batch, config)
        probe = EditProbe(model, tokenizer, batch, max_locality=config.locality_prompts)
        scores = probe.score(model, lambda rows: routed_deltas(model, factors, cols, rows))
        loss = lagrangian(scores["edit_nll"], scores["loc_kl"], editor.tensors["lagrange.rho"], config.margin)
        return {"loss": loss, **scores, "multiplier": F.softplus(editor.tensors["lagrange.rho"]).sum().detach(),
                "pre_edit_nll": grads.loss.mean()}

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: KEConfig, *,
                editor: Editor) -> WeightDeltaAdapter:
        """Several requests are edited together: each one's update (its own condition and gate),
        summed into one low-rank delta per module."""
        with torch.no_grad():
            factors, _, grads = self._factors(editor, model, tokenizer, requests, config)
        deltas = {n: LowRankDelta(up.detach().contiguous(), down.detach().contiguous())
                  for n, (up, down) in factors.items()}
        logger.info("ke: %d request(s), pre-edit NLL %.3f", len(requests), float(grads.loss.mean()))
        return WeightDeltaAdapter(deltas, method=self.name, hparams=config.to_dict(), requests=list(requests))
