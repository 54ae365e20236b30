"""EMMET — Equality-constrained Mass Model Editing in a Transformer.

Gupta, Sajjad, Anumanchipalli. "A Unified Framework for Model Editing", 2024 (arXiv:2403.14236).

ROME preserves the keys' statistics and *equates* one new key to its value; MEMIT preserves them
and fits a batch of new keys in the least-squares sense. EMMET is the batched form of ROME: it
preserves the statistics and imposes every new memory as an equality constraint,

    min ‖Ŵ K0 − W K0‖²  subject to  Ŵ k_i = v_i for every edit i,

whose solution (§4, the EMMET update) is

    Δ = R (K_Eᵀ C⁻¹ K_E)⁻¹ K_Eᵀ C⁻¹,     R = V_E − W K_E,  C = K0 K0ᵀ ∝ E[k kᵀ].

With one edit this is ROME's update exactly. The paper notes that K_Eᵀ C⁻¹ K_E becomes
ill-conditioned for large batches and regularises it; here ``ridge`` adds ``ridge · mean(diag)``
to its diagonal (0 gives the exact equality-constrained solution). Values, keys and the residual
spread over ``layers`` come from the shared driver (:mod:`editpeft.mass_edit`); with one layer (the
paper's setting, the default) the residual is the whole optimised δ. The adapter stores the
factors ``up = R``, ``down = C⁻¹K_E (K_Eᵀ C⁻¹ K_E + ηI)⁻¹`` (rank = number of edits).

Example:
    >>> model.add_edit("emmet", requests, name="batch")           # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from editpeft.errors import EditOptimizationError
from editpeft.mass_edit import LayerRangeConfig, StatisticsSpreadMethod
from editpeft.method import check


@dataclass
class EmmetConfig(LayerRangeConfig):
    layers: list = field(default_factory=lambda: [3],
                         metadata={"help": "decoder blocks whose MLP output projections are edited (ascending)"})
    ridge: float = field(default=1e-3, metadata={
        "help": "regulariser of K_Eᵀ C⁻¹ K_E, relative to its mean diagonal (0 = exact equality constraints)"})

    def validate(self) -> None:
        super().validate()
        check(self.ridge >= 0, "ridge must be >= 0")


class Emmet(StatisticsSpreadMethod):
    name = "emmet"
    Config = EmmetConfig

    def direction(self, mom2: torch.Tensor, keys: torch.Tensor, config: EmmetConfig) -> torch.Tensor:
        return equality_direction(mom2, keys, config.ridge)


def equality_direction(mom2: torch.Tensor, keys: torch.Tensor, ridge: float) -> torch.Tensor:
    """C⁻¹K (KᵀC⁻¹K + η·mean(diag)·I)⁻¹ for keys K (n × in rows): the 'down' factor of EMMET's update."""
    k = keys.double().T                                                     # (in, n)
    c_inv_k = torch.linalg.solve(mom2.double(), k)
    gram = k.T @ c_inv_k                                                    # (n, n)
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    down = torch.linalg.solve(gram, c_inv_k.T).T                            # gram symmetric
    if not torch.isfinite(down).all():
        raise EditOptimizationError("the equality-constrained update is singular (two edits share a key?); raise "
                                    "ridge or edit them in separate batches. The model was left unchanged.")
    return down.float()
