"""MEMIT — Mass-Editing Memory in a Transformer.

Meng, Sharma, Andonian, Belinkov, Bau. "Mass-Editing Memory in a Transformer", ICLR 2023
(arXiv:2210.07229).

Many facts at once, spread over a range of MLP output projections W^l, l ∈ R = {l_1 < … < l_L}:

The shared driver :func:`editpeft.mass_edit.spread_over_layers` does Algorithm 1: target hidden
states z_i = h_i^L + δ_i (§4.2, Eq. 16, δ_i optimised like ROME's value at the last edited layer),
then layer by layer the keys K^l and the residuals R^l = (z_i − h_i^L) / (L − l + 1) spread evenly
over the layers still to edit. This module holds only MEMIT's update rule (Eq. 14):

    ΔW^l = R^l (K^l)ᵀ (λ C^l + K^l (K^l)ᵀ)⁻¹,   C^l = E[k kᵀ] (``editpeft.stats``), λ = mom2 weight,

stored per layer as the factor pair ``up = R^l`` (out × n), ``down = (λ C^l + K Kᵀ)⁻¹ K`` (in × n):
rank n = number of edits, never a dense matrix. Sequential editing (``append=True``) computes each
new batch on the model carrying the earlier ones and joins the factors.

Example:
    >>> model.add_edit("memit", requests, name="batch-1")        # a list of EditRequests  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editpeft.errors import EditOptimizationError
from editpeft.mass_edit import LayerRangeConfig, StatisticsSpreadMethod
from editpeft.method import check

@dataclass
class MemitConfig(LayerRangeConfig):
    mom2_update_weight: float = field(default=3000.0, metadata={"help": "λ: weight of the key statistics C"})

    def validate(self) -> None:
        super().validate()
        check(self.mom2_update_weight > 0, "mom2_update_weight must be > 0")


class Memit(StatisticsSpreadMethod):
    name = "memit"
    Config = MemitConfig

    def direction(self, mom2: torch.Tensor, keys: torch.Tensor, config: MemitConfig) -> torch.Tensor:
        return spread_direction(mom2, keys, config.mom2_update_weight)


def spread_direction(mom2: torch.Tensor, keys: torch.Tensor, weight: float) -> torch.Tensor:
    """(λ C + K Kᵀ)⁻¹ K for keys K (n × in rows): the 'down' factor of MEMIT's update (Eq. 14)."""
    k = keys.double().T                                                   # (in, n)
    down = torch.linalg.solve(weight * mom2.double() + k @ k.T, k)
    if not torch.isfinite(down).all():
        raise EditOptimizationError("the key statistics are singular; use more stats_tokens or other layers. "
                                    "The model was left unchanged.")
    return down.float()
