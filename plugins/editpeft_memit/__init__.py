"""MEMIT — Mass-Editing Memory in a Transformer.

Meng, Sharma, Andonian, Belinkov, Bau. "Mass-Editing Memory in a Transformer", ICLR 2023
(arXiv:2210.07229).

Many facts at once, spread over a range of MLP output projections W^l, l ∈ R = {l_1 < … < l_L}:

1. **Target hidden states** (§4.2, Eq. 16): for each fact i, z_i = h_i^{L} + δ_i, where h^L is the
   output of the last critical block at the subject's last token and δ_i is optimised exactly like
   ROME's value (target NLL + KL essence + weight decay, norm clamp) — the shared
   :func:`editpeft.locate.optimize_value`, applied at the last layer's MLP output (which adds to h^L).
2. **Layer by layer** (Alg. 1), for l = l_1 … l_L on the model already carrying the updates of the
   lower layers: keys K^l = [k_i^l] (the input of W^l at the subject, averaged over context
   prefixes), residuals R^l = (z_i − h_i^L) / (L − l + 1) (the remaining error spread evenly over
   the layers still to edit), and the update (Eq. 14)
   ``ΔW^l = R^l (K^l)ᵀ (λ C^l + K^l (K^l)ᵀ)⁻¹`` with C^l = E[k kᵀ] (``editpeft.stats``) and the
   mom2 weight λ.
3. The adapter stores per layer the factor pair ``up = R^l`` (out × n), ``down = (λ C^l + K Kᵀ)⁻¹ K``
   (in × n): rank n = number of edits, never a dense matrix.

Example:
    >>> model.add_edit("memit", requests, name="batch-1")        # a list of EditRequests  # doctest: +SKIP
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
from editpeft.locate import LocateEditConfig, context_templates, optimize_value, subject_activations, subject_keys
from editpeft.method import check
from editpeft.request import require_subjects
from editpeft.stats import second_moment

logger = logging.getLogger(__name__)


@dataclass
class MemitConfig(LocateEditConfig):
    layers: list = field(default_factory=lambda: [2, 3, 4],
                         metadata={"help": "decoder blocks whose MLP output projections are edited (ascending)"})
    mom2_update_weight: float = field(default=3000.0, metadata={"help": "λ: weight of the key statistics C"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.layers, list) and self.layers and all(isinstance(x, int) and x >= 0 for x in self.layers),
              f"layers must be a non-empty list of non-negative ints, got {self.layers!r}")
        check(self.layers == sorted(set(self.layers)), "layers must be ascending and distinct")
        check(self.mom2_update_weight > 0, "mom2_update_weight must be > 0")


class Memit(editpeft.EditMethod):
    name = "memit"
    kind = "weight_delta"
    Config = MemitConfig

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: MemitConfig) -> WeightDeltaAdapter:
        require_subjects(requests, self.name)
        arch = get_arch(model)
        layers = [arch.check_layer(l) for l in config.layers]
        targets = [arch.mlp_out_name(l) for l in layers]
        last_block = arch.layer_name(layers[-1])
        templates = context_templates(model, tokenizer, config.context_lengths, config.seed)
        # 1. target hidden states z_i = h_i^L + delta_i, each optimised on the unedited model
        deltas = []
        for r in requests:
            v = optimize_value(model, tokenizer, targets[-1], r, templates, **config.value_options())
            deltas.append(v.delta.float())
            logger.info("memit %r -> %r: nll %.3f after %d steps", r.prompt, r.target_new, v.nll, v.steps)
        h = subject_activations(model, tokenizer, last_block, requests, templates, "output")
        z = h + torch.stack(deltas)
        # 2. layer by layer, on the model carrying the lower layers' updates
        done: dict[str, LowRankDelta] = {}
        for i, (layer, target) in enumerate(zip(layers, targets)):
            with temporary_deltas(model, done):
                keys = subject_keys(model, tokenizer, target, requests, templates)              # (n, in)
                if done:   # before the first update the block output is still h
                    h = subject_activations(model, tokenizer, last_block, requests, templates, "output")
            resid = (z - h) / (len(layers) - i)                                                 # (n, out)
            mom2 = second_moment(model, tokenizer, target, corpus=config.stats_corpus, n_tokens=config.stats_tokens)
            down = spread_direction(mom2.to(keys.device), keys, config.mom2_update_weight)     # (in, n)
            done[target] = LowRankDelta(resid.T.contiguous().cpu(), down.cpu())
            logger.info("memit layer %d: mean |residual| %.3f", layer, float(resid.norm(dim=1).mean()))
        return WeightDeltaAdapter(done, method=self.name, hparams=config.to_dict(), requests=list(requests),
                                  targets=targets)


def spread_direction(mom2: torch.Tensor, keys: torch.Tensor, weight: float) -> torch.Tensor:
    """(λ C + K Kᵀ)⁻¹ K for keys K (n × in rows): the 'down' factor of MEMIT's update (Eq. 14)."""
    k = keys.double().T                                                   # (in, n)
    down = torch.linalg.solve(weight * mom2.double() + k @ k.T, k)
    if not torch.isfinite(down).all():
        raise EditOptimizationError("the key statistics are singular; use more stats_tokens or other layers. "
                                    "The model was left unchanged.")
    return down.float()
