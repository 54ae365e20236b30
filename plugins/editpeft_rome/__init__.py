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
from editpeft import EditRequest, WeightDeltaAdapter
from editpeft.arch import get_arch
from editpeft.attach import LowRankDelta, temporary_deltas
from editpeft.errors import EditOptimizationError
from editpeft.locate import LocateEditConfig, context_templates, optimize_value, subject_keys
from editpeft.method import check
from editpeft.request import require_subjects
from editpeft.stats import second_moment

logger = logging.getLogger(__name__)


@dataclass
class RomeConfig(LocateEditConfig):
    layer: int = field(default=3, metadata={"help": "decoder block whose MLP output projection is edited"})

    layer_fields = ("layer",)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.layer, int) and self.layer >= 0, f"layer must be a non-negative int, got {self.layer!r}")


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
                value = optimize_value(model, tokenizer, target, request, templates, **config.value_options())
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
