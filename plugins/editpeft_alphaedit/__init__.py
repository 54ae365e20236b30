"""AlphaEdit — null-space constrained knowledge editing.

Fang, Jiang, Wang, Ma, Shi, Wang, He, Chua. "AlphaEdit: Null-Space Constrained Knowledge Editing
for Language Models", ICLR 2025 (arXiv:2410.02355).

MEMIT's update trades the new facts against the preserved knowledge K0 (its statistics C). AlphaEdit
removes the trade-off by projecting the update onto the null space of the preserved keys, so that
(W + ΔP) K0 = W K0 exactly (up to the threshold), and lets the update fit only the new facts and the
facts edited before:

1. **Projection** (§3.1, Eq. 8–9): eigendecompose K0K0ᵀ (here the cached second moment C = E[kkᵀ]
   of the layer's keys, ``editpeft.stats``) as U Λ Uᵀ; with Û the eigenvectors whose eigenvalues are
   below ``nullspace_threshold``, P = Û Ûᵀ.
2. **Update** (Eq. 14), per layer of MEMIT's spread (:mod:`editpeft.mass_edit`), with K1 the keys of
   this batch, R their residuals and Kp the keys of every earlier batch of the same adapter:

       Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + α I)⁻¹

   stored as factors ``up = R`` (out × n), ``down = (P (K1K1ᵀ + KpKpᵀ) + αI)⁻¹ P K1`` (in × n), so
   Δ = up downᵀ. ``down`` lies in the range of P, so the update leaves K0 untouched.
3. **Sequential state**: the adapter keeps Kp (per layer, in × edits so far) as tensors
   ``<module>.keys``; ``model.add_edit("alphaedit", batch, name=..., append=True)`` on a saved,
   loaded or Hub-downloaded adapter continues exactly where it stopped. Eq. 14 reads Kp only through
   Kp Kpᵀ, so once there are more earlier keys than the key width, ``keys`` holds a square factor F
   of that Gram matrix instead (F Fᵀ = Kp Kpᵀ, :func:`gram_factor`): the state stops growing at
   in × in per layer, and the deltas at one dense matrix (:func:`editpeft.deltas.add_changes`).

With ``preserve=False`` the preserved set is empty: P = I and the update is MEMIT's Eq. 14 with the
preserved-key covariance replaced by the ridge α I (plus the earlier batches' keys).

Example:
    >>> model.add_edit("alphaedit", batch_1, name="lifelong")                  # doctest: +SKIP
    >>> model.add_edit("alphaedit", batch_2, name="lifelong", append=True)     # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

import editpeft
from editpeft import EditRequest
from editpeft.adapters import CarriedStateDeltaAdapter
from editpeft.attach import WeightChange
from editpeft.errors import AdapterFormatError, EditOptimizationError
from editpeft.mass_edit import LayerRangeConfig, join_deltas, layer_targets, spread_over_layers
from editpeft.method import check
from editpeft.locate import key_statistics

logger = logging.getLogger(__name__)


@dataclass
class AlphaEditConfig(LayerRangeConfig):
    nullspace_threshold: float = field(default=2e-2, metadata={
        "help": "eigenvalues of the key statistics below this span the null space (the paper's 2e-2)"})
    l2: float = field(default=10.0, metadata={"help": "α: ridge weight of the update"})
    preserve: bool = field(default=True, metadata={
        "help": "project onto the null space of the preserved keys (False: empty preserved set, P = I)"})

    def validate(self) -> None:
        super().validate()
        check(self.nullspace_threshold > 0, "nullspace_threshold must be > 0")
        check(self.l2 > 0, "l2 must be > 0")
        check(isinstance(self.preserve, bool), "preserve must be true or false")


class NullSpaceAdapter(CarriedStateDeltaAdapter):
    """A weight-delta adapter that also carries the keys of its edits (``<module>.keys``, in × n),
    AlphaEdit's state for continuing sequential editing after save/load."""

    carried_what = "stored keys"

    @property
    def keys(self) -> dict[str, torch.Tensor]:
        return self.carried

    @classmethod
    def carried_tensors(cls, target: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {f"{target}.keys": value.detach().contiguous()}

    @classmethod
    def read_carried(cls, target: str, delta: WeightChange, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        k = tensors.get(f"{target}.keys")
        if k is None or k.ndim != 2 or k.shape[0] != delta.shape()[1] or not k.is_floating_point() \
                or not torch.isfinite(k).all():
            raise AdapterFormatError(f"tensor {target + '.keys'!r} is missing or malformed (expected a finite "
                                     f"{delta.shape()[1]} x n float matrix)")
        return k


class AlphaEdit(editpeft.EditMethod):
    name = "alphaedit"
    kind = "weight_delta"
    needs_subject = True
    Config = AlphaEditConfig
    adapter_class = NullSpaceAdapter

    def targets(self, model, config: AlphaEditConfig) -> list[str]:
        return layer_targets(model, config.layers)

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: AlphaEditConfig) -> NullSpaceAdapter:
        return self._edit(model, tokenizer, requests, config, prior=None)

    def extend(self, adapter: NullSpaceAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: AlphaEditConfig) -> NullSpaceAdapter:
        """Edit ``requests`` on the model carrying ``adapter``, with its keys as Kp (Eq. 14)."""
        return self._edit(model, tokenizer, requests, config, prior=adapter)

    def _edit(self, model, tokenizer, requests, config, prior: NullSpaceAdapter | None) -> NullSpaceAdapter:

        def solve(target: str, keys: torch.Tensor) -> torch.Tensor:
            dim = keys.shape[1]
            if config.preserve:
                proj = _projector(model, tokenizer, target, config)
            else:
                proj = torch.eye(dim, dtype=torch.float64)
            earlier = prior.keys.get(target) if prior is not None else None
            return null_space_direction(proj.to(keys.device), keys, earlier, config.l2)

        deltas, keys = spread_over_layers(model, tokenizer, requests, config.layers, config, solve)
        keys = {t: k.T.contiguous() for t, k in keys.items()}                        # (in, n) per module
        if prior is None:
            return NullSpaceAdapter(deltas, keys, method=self.name, hparams=config.to_dict(), requests=list(requests))
        joined_keys = dict(prior.keys)
        for t, k in keys.items():
            joined_keys[t] = gram_factor(torch.cat([joined_keys[t], k], 1)) if t in joined_keys else k
        return NullSpaceAdapter(join_deltas(prior.deltas, deltas), joined_keys, method=self.name,
                                hparams=config.to_dict(), requests=prior.requests + list(requests))


def _projector(model, tokenizer, target: str, config: AlphaEditConfig) -> torch.Tensor:
    """P for ``target``, memoised on the model's edit state next to the statistics it comes from."""
    key = (target, config.stats_corpus, config.stats_tokens, config.nullspace_threshold)
    return model.edit_state.caches.derived_tensor(
        "alphaedit.projector", key,
        lambda: null_space_projector(key_statistics(model, tokenizer, target, config), config.nullspace_threshold))


def null_space_projector(mom2: torch.Tensor, threshold: float) -> torch.Tensor:
    """P = Û Ûᵀ over the eigenvectors of ``mom2`` with eigenvalue < ``threshold`` (Eq. 8–9), float64."""
    eigvals, eigvecs = torch.linalg.eigh(mom2.double())
    basis = eigvecs[:, eigvals < threshold]
    if basis.shape[1] == 0:
        raise EditOptimizationError(
            f"no eigenvalue of the key statistics is below nullspace_threshold={threshold} (smallest "
            f"{float(eigvals[0]):.3g}): the null space is empty and no edit can be made. Raise the threshold. "
            "The model was left unchanged.")
    logger.info("null space: %d of %d dimensions", basis.shape[1], mom2.shape[0])
    return basis @ basis.T


def gram_factor(keys: torch.Tensor) -> torch.Tensor:
    """``keys`` (in × m) while m <= in; past that, the square F (in × in) with F Fᵀ = keys keysᵀ
    (eigendecomposition in float64: F = U Λ^½), all Eq. 14 needs of earlier keys, in ``keys``' dtype.

    >>> k = torch.randn(4, 9)
    >>> f = gram_factor(k)
    >>> f.shape, torch.allclose(f.double() @ f.double().T, k.double() @ k.double().T, atol=1e-5)
    (torch.Size([4, 4]), True)
    """
    dim, count = keys.shape
    if count <= dim:
        return keys
    k = keys.double()
    eigvals, eigvecs = torch.linalg.eigh(k @ k.T)
    return (eigvecs * eigvals.clamp_min(0).sqrt()).to(keys.dtype).contiguous()


def null_space_direction(proj: torch.Tensor, keys: torch.Tensor, earlier: torch.Tensor | None, l2: float) -> torch.Tensor:
    """(P (K1K1ᵀ + KpKpᵀ) + αI)⁻¹ P K1 for keys K1 (n × in rows) and earlier keys Kp (in × m): the
    'down' factor of AlphaEdit's update (Eq. 14)."""
    k1 = keys.double().T                                                    # (in, n)
    gram = k1 @ k1.T
    if earlier is not None:
        kp = earlier.to(k1)
        gram = gram + kp @ kp.T
    proj = proj.double()
    lhs = proj @ gram + l2 * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    down = torch.linalg.solve(lhs, proj @ k1)
    if not torch.isfinite(down).all():
        raise EditOptimizationError("the null-space update is not finite; raise l2. The model was left unchanged.")
    return down.float()
