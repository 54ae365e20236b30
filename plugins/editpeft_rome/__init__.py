"""ROME — Rank-One Model Editing.

Meng, Bau, Andonian, Belinkov. "Locating and Editing Factual Associations in GPT",
NeurIPS 2022 (arXiv:2202.05262).

The MLP output projection W of one layer is treated as a linear associative memory W K ≈ V.
To store a new fact (s, r, o*):

1. **Key** (§3.1, Eq. 3): k* = 1/N Σ_j k(x_j + s), the input of W at the subject's last token,
   averaged over N random context prefixes x_j sampled from the model.
2. **Value** (Eq. 4): v* = W k* + δ, where δ minimises
   ``-log P(o* | x_j + p) + λ_KL · KL(P(· | s is a) ‖ P'(· | s is a)) + wd · |δ| / |v|²``
   with δ added to W's output at the subject's last token, and |δ| clamped to c·|v|.
3. **Update** (Eq. 2): Ŵ = W + Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*), where
   C = E[k kᵀ] is the uncentred second moment of W's inputs (``editpeft.stats``). Since
   v* − W k* = δ, the update is the rank-one factor pair ``up = δ``, ``down = C⁻¹k*/(k*ᵀC⁻¹k*)``,
   stored as such (a few KB) and applied as ``y += (x·down)·up``.

The update uses the averaged key k* on both sides of Eq. 2, as the paper writes it (the
reference code mixes in the un-averaged key; Gupta et al. 2024, "Rebuilding ROME", show that
this inconsistency causes model collapse). A list of requests is applied one after another,
each computed on the model with the previous ones in place (rank = number of requests).

Example:
    >>> adapter = model.add_edit("rome", EditRequest(
    ...     prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
    ...     target_new="Rome"), name="eiffel")                                # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig, WeightDeltaAdapter
from editpeft.arch import get_arch
from editpeft.attach import LowRankDelta, temporary_deltas
from editpeft.corpus import CORPORA
from editpeft.errors import EditOptimizationError
from editpeft.locate import context_templates, optimize_value, subject_keys
from editpeft.method import check
from editpeft.request import require_subjects
from editpeft.stats import second_moment

logger = logging.getLogger(__name__)


@dataclass
class RomeConfig(MethodConfig):
    layer: int = field(default=3, metadata={"help": "decoder block whose MLP output projection is edited"})
    v_steps: int = field(default=25, metadata={"help": "maximum gradient steps of the value optimisation"})
    v_lr: float = field(default=2.0, metadata={"help": "Adam learning rate of the value optimisation"})
    v_weight_decay: float = field(default=0.5, metadata={"help": "weight of |delta|/|v|^2 in the loss"})
    kl_factor: float = field(default=0.0625, metadata={"help": "weight of the KL essence term"})
    clamp_norm_factor: float = field(default=4.0, metadata={"help": "|delta| <= factor * |v|"})
    stop_nll: float = field(default=0.05, metadata={"help": "stop once the target's NLL is below this"})
    context_lengths: list = field(default_factory=lambda: [[5, 5]],
                                  metadata={"help": "[[tokens, count], ...] of sampled context prefixes"})
    stats_corpus: str = field(default="pydoc", metadata={"help": f"corpus of the key statistics: {CORPORA}"})
    stats_tokens: int = field(default=40_000, metadata={"help": "tokens used for the key statistics"})
    seed: int = field(default=0, metadata={"help": "seed of the context-prefix sampling"})

    layer_fields = ("layer",)

    def validate(self) -> None:
        check(isinstance(self.layer, int) and self.layer >= 0, f"layer must be a non-negative int, got {self.layer!r}")
        check(self.v_steps >= 1, "v_steps must be >= 1")
        check(self.v_lr > 0, "v_lr must be > 0")
        check(self.clamp_norm_factor > 0, "clamp_norm_factor must be > 0")
        check(self.stats_corpus in CORPORA, f"stats_corpus must be one of {CORPORA}")
        check(self.stats_tokens >= 1000, "stats_tokens must be >= 1000")
        check(all(len(p) == 2 and p[0] >= 1 and p[1] >= 0 for p in self.context_lengths),
              "context_lengths must be [[tokens, count], ...]")


class Rome(editpeft.EditMethod):
    name = "rome"
    kind = "weight_delta"
    Config = RomeConfig

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: RomeConfig) -> WeightDeltaAdapter:
        require_subjects(requests, self.name)
        target = get_arch(model).mlp_out_name(config.layer)
        mom2 = second_moment(model, tokenizer, target, corpus=config.stats_corpus, n_tokens=config.stats_tokens)
        templates = context_templates(model, tokenizer, config.context_lengths, config.seed)
        ups, downs = [], []
        for request in requests:
            earlier = {target: LowRankDelta(torch.stack(ups, 1), torch.stack(downs, 1))} if ups else {}
            with temporary_deltas(model, earlier):
                key = subject_keys(model, tokenizer, target, [request], templates)[0]
                value = optimize_value(model, tokenizer, target, request, templates, steps=config.v_steps,
                                       lr=config.v_lr, kl_factor=config.kl_factor,
                                       weight_decay=config.v_weight_decay,
                                       clamp_norm_factor=config.clamp_norm_factor, stop_nll=config.stop_nll)
            down = rank_one_direction(mom2.to(key.device), key)
            ups.append(value.delta.float())
            downs.append(down)
            logger.info("rome %r -> %r: loss %.3f after %d steps, |delta| %.2f",
                        request.prompt, request.target_new, value.loss, value.steps, float(value.delta.norm()))
        delta = LowRankDelta(torch.stack(ups, 1).cpu(), torch.stack(downs, 1).cpu())
        return WeightDeltaAdapter({target: delta}, method=self.name, hparams=config.to_dict(),
                                  requests=list(requests), targets=[target])


def rank_one_direction(mom2: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """C⁻¹k* / (k*ᵀ C⁻¹ k*): the 'down' factor of ROME's rank-one update (Eq. 2)."""
    c_inv_k = torch.linalg.solve(mom2.double(), key.double())
    denom = key.double() @ c_inv_k
    if not torch.isfinite(c_inv_k).all() or denom.abs() < 1e-12:
        raise EditOptimizationError("the key statistics are singular for this key; use more "
                                    "stats_tokens or another layer. The model was left unchanged.")
    return (c_inv_k / denom).float()
