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

**r-ROME** (Gupta, Baskaran, Anumanchipalli 2024, "Rebuilding ROME: Resolving Model Collapse
during Sequential Model Editing", arXiv:2403.07175) is the default, ``key_mode="averaged"``: the
update uses the averaged key k* on both sides of Eq. 2, so Ŵk* = Wk* + δ exactly. The original
reference code divides by the key of the bare prompt instead (down = C⁻¹k*/(k_pᵀC⁻¹k*), so that
Ŵk_p = Wk_p + δ); r-ROME shows that this inconsistency makes sequential edits blow up the model.
``key_mode="prompt"`` reproduces it for comparison.

A list of requests is applied one after another, each computed on the model with the previous
ones in place (rank = number of requests); ``append=True`` continues an existing adapter the same way.

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
from editpeft.locate import LocateEditConfig, context_templates, key_statistics, optimize_value, subject_keys
from editpeft.mass_edit import AppendByStacking
from editpeft.method import check

logger = logging.getLogger(__name__)


KEY_MODES = ("averaged", "prompt")


@dataclass
class RomeConfig(LocateEditConfig):
    layer: int = field(default=3, metadata={"help": "decoder block whose MLP output projection is edited"})

    key_mode: str = field(default="averaged", metadata={
        "help": "key in the update's denominator: 'averaged' (r-ROME) or 'prompt' (the original ROME code)"})

    layer_fields = ("layer",)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.layer, int) and self.layer >= 0, f"layer must be a non-negative int, got {self.layer!r}")
        check(self.key_mode in KEY_MODES, f"key_mode must be one of {KEY_MODES}, got {self.key_mode!r}")


class Rome(AppendByStacking, editpeft.EditMethod):
    name = "rome"
    kind = "weight_delta"
    needs_subject = True
    Config = RomeConfig

    def targets(self, model, config: RomeConfig) -> list[str]:
        return [get_arch(model).mlp_out_name(config.layer)]

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: RomeConfig) -> WeightDeltaAdapter:
        (target,) = self.targets(model, config)
        mom2 = key_statistics(model, tokenizer, target, config)
        templates = context_templates(model, tokenizer, config.context_lengths, config.seed)
        ups, downs = [], []
        for request in requests:
            earlier = {target: LowRankDelta(torch.stack(ups, 1), torch.stack(downs, 1))} if ups else {}
            with temporary_deltas(model, earlier):
                key = subject_keys(model, tokenizer, target, [request], templates)[0]
                value = optimize_value(model, tokenizer, target, request, templates, **config.value_options())
                exact_at = key if config.key_mode == "averaged" else \
                    subject_keys(model, tokenizer, target, [request], templates[:1])[0]
            down = rank_one_direction(mom2.to(key.device), key, exact_at)
            ups.append(value.delta.float())
            downs.append(down)
            logger.info("rome %r -> %r: loss %.3f after %d steps, |delta| %.2f",
                        request.prompt, request.target_new, value.loss, value.steps, float(value.delta.norm()))
        delta = LowRankDelta(torch.stack(ups, 1).cpu(), torch.stack(downs, 1).cpu())
        return WeightDeltaAdapter({target: delta}, method=self.name, hparams=config.to_dict(),
                                  requests=list(requests), targets=[target])


def rank_one_direction(mom2: torch.Tensor, key: torch.Tensor, exact_at: torch.Tensor | None = None) -> torch.Tensor:
    """C⁻¹k* / (kᵀ C⁻¹ k*) with k = ``exact_at`` (default k*): the 'down' factor of ROME's rank-one
    update (Eq. 2); the update then maps k exactly to Wk + δ."""
    c_inv_k = torch.linalg.solve(mom2.double(), key.double())
    denom = (key if exact_at is None else exact_at).double() @ c_inv_k
    if not torch.isfinite(c_inv_k).all() or denom.abs() < 1e-12:
        raise EditOptimizationError("the key statistics are singular for this key; use more "
                                    "stats_tokens or another layer. The model was left unchanged.")
    return (c_inv_k / denom).float()
