"""The batch driver shared by MEMIT, AlphaEdit and EMMET: target values, then the update spread
over a range of layers, each layer's update rule supplied by the method.

:func:`spread_over_layers` is MEMIT's Algorithm 1 (Meng et al., ICLR 2023) with the per-layer
solve left open:

1. z_i = h_i^L + delta_i: delta_i is optimised at the last edited layer's MLP output (which adds
   to the block output h^L), all requests batched (:func:`editpeft.locate.optimize_values`).
2. For l = l_1 … l_L, on the model carrying the updates of the lower layers: keys K^l (n × in,
   averaged over context prefixes), residuals R^l = (z − h^L) / (L − l + 1), and
   ``down = solve(target, K^l)`` (in × n); the update of W^l is ``R^l downᵀ`` (stored as the
   factor pair up = R^l, down), so ΔW^l K^l ≈ R^l is what every rule aims at.

:class:`AppendByStacking` gives a method of this family ``extend`` (sequential editing): the new
requests are computed on the model carrying the existing adapter, and the factors are joined (one
dense change per module once the factors would outnumber the weight matrix: :func:`~editpeft.deltas.add_changes`).

Example:
    >>> deltas, keys = spread_over_layers(model, tok, requests, [2, 3, 4], config,
    ...                                   solve=lambda target, K: ...)        # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from abc import abstractmethod
from typing import Callable, Mapping, Sequence

import torch

from .adapters import WeightDeltaAdapter
from .arch import get_arch
from .attach import LowRankDelta, temporary_deltas
from .deltas import WeightChange, add_changes
from .locate import (LocateEditConfig, context_templates, key_statistics, optimize_values, subject_activations,
                     subject_keys)
from .method import EditMethod, check
from .request import EditRequest

logger = logging.getLogger(__name__)

#: (module name, keys K (n × in)) -> down factor (in × n)
Solver = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class LayerRangeConfig(LocateEditConfig):
    """A locate-then-edit config whose update is spread over several MLP output projections."""

    layers: list = field(default_factory=lambda: [2, 3, 4],
                         metadata={"help": "decoder blocks whose MLP output projections are edited (ascending)"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.layers, list) and self.layers and all(isinstance(x, int) and x >= 0 for x in self.layers),
              f"layers must be a non-empty list of non-negative ints, got {self.layers!r}")
        check(self.layers == sorted(set(self.layers)), "layers must be ascending and distinct")


def layer_targets(model, layers: Sequence[int]) -> list[str]:
    """The FFN output projections of blocks ``layers`` (what the mass-editing methods write)."""
    arch = get_arch(model)
    return [arch.mlp_out_name(arch.check_layer(layer)) for layer in layers]


def spread_over_layers(model, tokenizer, requests: Sequence[EditRequest], layers: Sequence[int],
                       config: LocateEditConfig, solve: Solver) -> tuple[dict[str, LowRankDelta], dict[str, torch.Tensor]]:
    """Compute the per-layer low-rank updates of ``requests`` (see the module docstring).

    Returns ``(deltas, keys)``: module name -> :class:`LowRankDelta` (rank n) and module name ->
    the keys K^l (n × in, float32, CPU) the update was solved for.
    """
    arch = get_arch(model)
    layers = [arch.check_layer(layer) for layer in layers]
    targets = layer_targets(model, layers)
    last_block = arch.layer_name(layers[-1])
    templates = context_templates(model, tokenizer, config.context_lengths, config.seed)
    values = optimize_values(model, tokenizer, targets[-1], requests, templates, **config.value_options())
    for r, v in zip(requests, values):
        logger.info("%r -> %r: nll %.3f after %d steps", r.prompt, r.target_new, v.nll, v.steps)
    h = subject_activations(model, tokenizer, last_block, requests, templates, "output")
    z = h + torch.stack([v.delta.float() for v in values])
    deltas: dict[str, LowRankDelta] = {}
    keys_of: dict[str, torch.Tensor] = {}
    for i, target in enumerate(targets):
        with temporary_deltas(model, deltas):
            keys = subject_keys(model, tokenizer, target, requests, templates)                 # (n, in)
            if deltas:   # before the first update the block output is still h
                h = subject_activations(model, tokenizer, last_block, requests, templates, "output")
        resid = (z - h) / (len(targets) - i)                                                    # (n, out)
        down = solve(target, keys)                                                              # (in, n)
        deltas[target] = LowRankDelta(resid.T.contiguous().cpu(), down.float().cpu())
        keys_of[target] = keys.cpu()
        logger.info("layer %d: mean |residual| %.3f", layers[i], float(resid.norm(dim=1).mean()))
    return deltas, keys_of


def join_deltas(first: Mapping[str, WeightChange], second: Mapping[str, WeightChange]) -> dict[str, WeightChange]:
    """The sum of two sets of deltas, per module :func:`~editpeft.deltas.add_changes`: factors of rank
    r1 + r2, or one dense change once that is smaller."""
    out = dict(first)
    for name, d in second.items():
        out[name] = add_changes(out[name], d) if name in out else d
    return out


class AppendByStacking:
    """Mixin for weight-delta methods: ``extend`` computes the new requests on the model that
    carries the existing adapter and returns an adapter with both sets of factors."""

    def extend(self, adapter: WeightDeltaAdapter, model, tokenizer, requests, config) -> WeightDeltaAdapter:
        new = self.compute(model, tokenizer, requests, config)
        joined = type(new)(join_deltas(adapter.deltas, new.deltas), method=new.method, hparams=new.hparams,
                           requests=adapter.requests + new.requests)
        return joined


class StatisticsSpreadMethod(AppendByStacking, EditMethod):
    """A batch method whose per-layer rule needs only the keys and the layer's statistics C
    (MEMIT, EMMET): subclasses implement :meth:`direction`; values, keys, the spread over
    ``config.layers`` and sequential append come from here."""

    kind = "weight_delta"
    needs_subject = True

    def targets(self, model, config: LayerRangeConfig) -> list[str]:
        return layer_targets(model, config.layers)

    @abstractmethod
    def direction(self, mom2: torch.Tensor, keys: torch.Tensor, config: LayerRangeConfig) -> torch.Tensor:
        """The 'down' factor (in × n) for keys (n × in) given C (in × in)."""

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: LayerRangeConfig) -> WeightDeltaAdapter:

        def solve(target: str, keys: torch.Tensor) -> torch.Tensor:
            return self.direction(key_statistics(model, tokenizer, target, config).to(keys.device), keys, config)

        deltas, _ = spread_over_layers(model, tokenizer, requests, config.layers, config, solve)
        return WeightDeltaAdapter(deltas, method=self.name, hparams=config.to_dict(), requests=list(requests))
