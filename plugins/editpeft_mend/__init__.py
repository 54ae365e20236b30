"""MEND — Model Editor Networks with Gradient Decomposition.

Mitchell, Lin, Bosselut, Finn, Manning. "Fast Model Editing at Scale", ICLR 2022 (arXiv:2110.11309).

The fine-tuning gradient of a Linear layer on one edit is a sum of rank-one terms (§3.1, eq. 1):

    ∇_{W_ℓ} L = Σ_i δ_{ℓ+1,i} u_{ℓ,i}ᵀ          (u: the layer's input, δ: the gradient at its output)

MEND learns, per layer shape, an editor network g that maps each token's z = concat(u, δ)
(normalised by running statistics gathered in training) to pseudo-activations and
pseudo-deltas (§3.2, eqs. 3a-3b), with a layer-specific scale s and offset o:

    h   = z + σ(s¹_ℓ ⊙ (U₁ V₁ z + b) + o¹_ℓ)
    g(z) = h + σ(s²_ℓ ⊙ U₂ V₂ h + o²_ℓ),          (ũ, δ̃) = split(g(z)),   σ = ReLU

and the edit is  W̃_ℓ = W_ℓ − α_ℓ Σ_i δ̃_i ũ_iᵀ  with a learned per-layer step size α_ℓ. That
update is low rank (one column per token of the edit), so it is kept as factors: a
:class:`~editpeft.LowRankDelta` per edited module, exportable to a peft LoRA like any other.
The editor is trained (:func:`editpeft.train_editor`, ``editpeft train mend``) with (eq. 4)

    L = c_edit · L_e + c_loc · L_loc,   L_e = −log p_θ̃(y_e | x_e'),   L_loc = KL(p_θ(·|x_loc) ‖ p_θ̃(·|x_loc))

over the edit prompt and its paraphrases (x_e') and unrelated locality prompts (x_loc); the base
model is never trained. Each training step edits a batch of independent facts at once (each probe
row sees only its own edit, :mod:`editpeft.gradedit`). Several requests in one ``add_edit`` are a
batched edit: their gradients are summed before the editor network (§3.2's batched edits).

Differences from the reference code, stated: U₁ and U₂ start at small random values rather than
zero so that the ReLU passes a gradient from the first step (g starts as the identity up to ~1e-3);
α_ℓ is learned as log α_ℓ, so that one Adam learning rate fits it and the network.

Example:
    >>> editor = editpeft.train_editor("mend", model, tok, "zsre_mend_train_1k.json", out="runs/mend")  # doctest: +SKIP
    >>> model.add_edit("mend", request, editor=editor)                                               # doctest: +SKIP
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

import editpeft
from editpeft import EditRequest, MethodConfig, WeightDeltaAdapter
from editpeft.arch import linear_dims
from editpeft.deltas import LowRankDelta
from editpeft.editors import Editor
from editpeft.gradedit import EditProbe, GradFactors, edited_modules, gradient_factors, routed_deltas
from editpeft.method import check
from editpeft.tokens import TargetBatch, model_device

logger = logging.getLogger(__name__)


@dataclass
class MendConfig(MethodConfig):
    layers: list[int] = field(default_factory=lambda: [-3, -2, -1], metadata={
        "help": "decoder blocks whose modules are edited (negative: from the end); the paper edits the last three"})
    modules: list[str] = field(default_factory=list, metadata={
        "help": "module names inside a block to edit, e.g. ['mlp.up_proj', 'mlp.down_proj']; empty: the MLP output "
                "projection of the family (the paper edits the MLP's input and output projections)"})
    rank: int = field(default=1920, metadata={
        "help": "rank of the editor network's low-rank matrices U V (paper: 1920), capped at the input width"})
    edit_lr: float = field(default=1e-4, metadata={"help": "initial per-layer edit step size α_ℓ (paper's edit_lr)"})
    c_edit: float = field(default=0.1, metadata={"help": "weight of the edit loss L_e (paper's c_edit)"})
    c_loc: float = field(default=1.0, metadata={"help": "weight of the locality KL L_loc (paper's c_loc)"})
    locality_prompts: int = field(default=2, metadata={
        "help": "unrelated prompts per edit in each training step (its locality prompts, else the batch's others)"})
    init_scale: float = field(default=1e-3, metadata={"help": "std of the random init of U₁, U₂ (g ≈ identity)"})

    def validate(self) -> None:
        check(len(self.layers) > 0 and len(set(self.layers)) == len(self.layers),
              f"layers must list distinct block indices, got {self.layers!r}")
        check(self.rank >= 1, "rank must be >= 1")
        check(self.edit_lr > 0, "edit_lr must be > 0")
        check(self.c_edit >= 0 and self.c_loc >= 0, "c_edit and c_loc must be >= 0")
        check(self.locality_prompts >= 0, "locality_prompts must be >= 0")
        check(self.init_scale >= 0, "init_scale must be >= 0")


def shape_key(model, name: str) -> str:
    d_in, d_out = linear_dims(model.get_submodule(name))
    return f"{d_in}x{d_out}"


# -- the editor network (eqs. 3a-3b) -------------------------------------------------------------
def init_tensors(model, names: Sequence[str], config: MendConfig) -> dict[str, torch.Tensor]:
    """Fresh editor tensors: one network (and running normaliser) per module shape, scale/offset and
    log step size per edited module."""
    tensors: dict[str, torch.Tensor] = {}
    for i, name in enumerate(names):
        d_in, d_out = linear_dims(model.get_submodule(name))
        D, key = d_in + d_out, shape_key(model, name)
        r = min(config.rank, D)
        if f"net.{key}.V1" not in tensors:
            for k in ("1", "2"):
                tensors[f"net.{key}.V{k}"] = torch.randn(r, D) / math.sqrt(D)
                tensors[f"net.{key}.U{k}"] = config.init_scale * torch.randn(D, r)
            tensors[f"net.{key}.b1"] = torch.zeros(D)
            tensors[f"norm.{key}.count"] = torch.zeros(1)
            tensors[f"norm.{key}.mean"] = torch.zeros(D)
            tensors[f"norm.{key}.m2"] = torch.zeros(D)
        for k in ("s1", "s2"):
            tensors[f"layer.{i}.{k}"] = torch.ones(D)
        for k in ("o1", "o2"):
            tensors[f"layer.{i}.{k}"] = torch.zeros(D)
        tensors[f"layer.{i}.log_lr"] = torch.full((1,), math.log(config.edit_lr))
    return tensors


def update_normaliser(t: dict[str, torch.Tensor], key: str, z: torch.Tensor) -> None:
    """Fold a batch of rows z into the running mean/variance of shape ``key`` (Chan et al.'s parallel
    Welford update), in place; training only."""
    with torch.no_grad():
        count, mean, m2 = t[f"norm.{key}.count"], t[f"norm.{key}.mean"], t[f"norm.{key}.m2"]
        n = z.shape[0]
        if n == 0:
            return
        b_mean = z.mean(0)
        b_m2 = ((z - b_mean) ** 2).sum(0)
        total = count + n
        diff = b_mean - mean
        mean += diff * (n / total)
        m2 += b_m2 + diff ** 2 * (count * n / total)
        count.copy_(total)


def normalise(t: dict[str, torch.Tensor], key: str, z: torch.Tensor) -> torch.Tensor:
    """z standardised by the running statistics (identity before any are gathered)."""
    count = float(t[f"norm.{key}.count"].detach())
    if count < 2:
        return z
    mean = t[f"norm.{key}.mean"].detach()
    std = (t[f"norm.{key}.m2"].detach() / (count - 1)).clamp_min(1e-20).sqrt()
    return (z - mean) / std


def transform(t: dict[str, torch.Tensor], key: str, i: int, z: torch.Tensor) -> torch.Tensor:
    """g(z) of eqs. 3a-3b for edited module number ``i`` (network of shape ``key``)."""
    net = lambda k: t[f"net.{key}.{k}"]                 # noqa: E731
    lay = lambda k: t[f"layer.{i}.{k}"]                 # noqa: E731
    h = z + F.relu(lay("s1") * ((z @ net("V1").T) @ net("U1").T + net("b1")) + lay("o1"))
    return h + F.relu(lay("s2") * ((h @ net("V2").T) @ net("U2").T) + lay("o2"))


def edit_factors(editor: Editor, model, names: Sequence[str], grads: GradFactors, *,
                 learn_stats: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the factors (up (d_out, n), down (d_in, n)) of ΔW = −α_ℓ Σ_i δ̃_i ũ_iᵀ."""
    t = editor.tensors
    out = {}
    for i, name in enumerate(names):
        u, delta = grads.u[name], grads.delta[name]
        key = shape_key(model, name)
        z = torch.cat([u, delta], -1).to(t[f"net.{key}.V1"].dtype)
        if learn_stats:
            update_normaliser(t, key, z)
        g = transform(t, key, i, normalise(t, key, z))
        u_t, delta_t = g[:, :u.shape[1]], g[:, u.shape[1]:]
        alpha = t[f"layer.{i}.log_lr"].exp()
        out[name] = (-alpha * delta_t.T, u_t.T)
    return out


class Mend(editpeft.EditMethod):
    name = "mend"
    kind = "weight_delta"
    Config = MendConfig
    requires_editor = True

    def targets(self, model, config: MendConfig) -> list[str]:
        return edited_modules(model, config.layers, config.modules)

    def init_editor(self, model, tokenizer, config: MendConfig) -> Editor:
        names = self.targets(model, config)
        return Editor(self.name, init_tensors(model, names, config), hparams=config.to_dict(), targets=names)

    def _losses(self, editor, model, tokenizer, batch: Sequence[EditRequest], config: MendConfig,
                learn_stats: bool) -> dict[str, torch.Tensor]:
        names = editor.targets
        edit_batch = TargetBatch.build(tokenizer, [r.prompt for r in batch], [r.target_new for r in batch],
                                       device=model_device(model))
        grads = gradient_factors(model, edit_batch, names)
        factors = edit_factors(editor, model, names, grads, learn_stats=learn_stats)
        probe = EditProbe(model, tokenizer, batch, max_locality=config.locality_prompts)
        scores = probe.score(model, lambda rows: routed_deltas(model, factors, grads.edit, rows))
        loss = config.c_edit * scores["edit_nll"] + config.c_loc * scores["loc_kl"]
        return {"loss": loss, **scores, "pre_edit_nll": grads.loss.mean()}

    def editor_step(self, editor, model, tokenizer, batch, config):
        return self._losses(editor, model, tokenizer, batch, config, learn_stats=True)

    def editor_eval(self, editor, model, tokenizer, batch, config) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in
                self._losses(editor, model, tokenizer, batch, config, learn_stats=False).items()}

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: MendConfig, *,
                editor: Editor) -> WeightDeltaAdapter:
        names = editor.targets
        batch = TargetBatch.build(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                                  device=model_device(model))
        grads = gradient_factors(model, batch, names)
        with torch.no_grad():
            factors = edit_factors(editor, model, names, grads)
        deltas = {n: LowRankDelta(up.detach().contiguous(), down.detach().contiguous())
                  for n, (up, down) in factors.items()}
        logger.info("mend: %d request(s), %d token factor(s) per module, pre-edit NLL %.3f",
                    len(requests), grads.edit.numel(), float(grads.loss.mean()))
        return WeightDeltaAdapter(deltas, method=self.name, hparams=config.to_dict(), requests=list(requests))
