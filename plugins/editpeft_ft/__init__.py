"""FT-L and FT-M — constrained fine-tuning of FFN layers, stored as dense weight deltas.

**FT-L** (Zhu, Rawat, Zaheer, Bhojanapalli, Li, Yu, Kumar. "Modifying Memories in Transformer
Models", arXiv:2012.00363, 2020). The edit minimises the loss of the new facts over the
parameters θ of the chosen layers subject to an L∞ bound on their change (§3, Eq. 3):

    minimise_{θ ∈ Θ}  1/m Σ_{x ∈ D_M} L(x; θ)   subject to   ‖θ − θ₀‖_∞ ≤ δ

solved by projected gradient descent: after every Adam step each weight's change is clipped to
[−δ, δ] (δ = ``norm_constraint``). As in the FT-L baseline of ROME (Meng et al. 2022, App. B) and
EasyEdit, θ is the output projection of the FFN of each layer in ``layers`` (``down_proj``,
``c_proj``, ``fc_out``, ``wo``...) and L is the negative log-likelihood of the target tokens read
off the distribution *after the prompt's last token*: ``-1/|y| Σ_j log p(y_j | x)``, exact for
one-token targets, a bag-of-tokens surrogate for longer ones.

**FT-M** (the "masked" fine-tuning baseline of Zhang et al. 2024, "A Comprehensive Study of
Knowledge Editing for Large Language Models", arXiv:2401.01286, §4.1). Same layers, same Adam
loop and early stop; it differs from FT-L in exactly two places:

1. the loss is the teacher-forced cross-entropy of the target tokens given the prompt and the
   target's preceding tokens, masked to the target (prompt positions carry no loss):
   ``-1/|y| Σ_j log p(y_j | x, y_<j)``;
2. no norm constraint by default (``norm_constraint: null``; set one to combine both).

Both stop early once the target loss falls below ``stop_loss`` (EasyEdit's 10⁻²). The change of
a layer is a :class:`~editpeft.deltas.DenseDelta`. Its numerical rank is at most the number of
target-token rows the gradients came from (each Adam step's gradient ``Σ_t δ_t x_tᵀ`` has rank ≤
the number of tokens in the batch, and Adam's per-entry normalisation and the L∞ clip make the sum
full-rank in general): the saved form is dense, and ``to_peft_lora`` factors it by an SVD (exact
at its numerical rank; truncation measured).

Append keeps earlier requests by replaying them (see :class:`editpeft.finetune.FineTuneMethod`).

Example:
    >>> model.add_edit("ft-m", EditRequest(prompt="The Eiffel Tower is located in the city of",
    ...                target_new="Rome"))                                          # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from editpeft.arch import get_arch
from editpeft.deltas import WeightChange
from editpeft.finetune import DenseChange, FineTuneMethod
from editpeft.method import MethodConfig, check
from editpeft.train import Constraint


@dataclass
class FineTuneConfig(MethodConfig):
    layers: list = field(default_factory=lambda: [21], metadata={"help": "blocks whose FFN output projection is tuned"})
    stack: str | None = field(default=None, metadata={"help": "stack of the layers (T5: encoder/decoder; default decoder)"})
    steps: int = field(default=25, metadata={"help": "Adam steps at most"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    stop_loss: float | None = field(default=1e-2, metadata={"help": "stop once the target loss is below this"})
    norm_constraint: float | None = field(default=None, metadata={"help": "δ: L∞ bound on each weight's change (null: none)"})
    context_lengths: list = field(default_factory=list, metadata={
        "help": "[[tokens, count], ...]: also train behind sampled context prefixes (none by default)"})
    train_on_paraphrases: bool = field(default=False, metadata={"help": "also train on the requests' paraphrases"})
    replay: bool = field(default=True, metadata={"help": "append: train the adapter's earlier requests again"})
    seed: int = field(default=0, metadata={"help": "seed of the training loop"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        check(isinstance(self.layers, list) and self.layers and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.layers),
            f"layers must be a non-empty list of block indices, got {self.layers!r}")
        check(isinstance(self.context_lengths, list) and all(
            isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) and v >= 1 for v in x)
            for x in self.context_lengths), f"context_lengths must be [[tokens, count], ...], got {self.context_lengths!r}")
        check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.stop_loss is None or self.stop_loss > 0, f"stop_loss must be > 0 or null, got {self.stop_loss}")
        check(self.norm_constraint is None or self.norm_constraint > 0,
              f"norm_constraint must be > 0 (the L∞ bound δ on each weight's change) or null for no bound; "
              f"got {self.norm_constraint}")


@dataclass
class FTLConfig(FineTuneConfig):
    norm_constraint: float | None = field(default=5e-4, metadata={"help": "δ: L∞ bound on each weight's change (null: none)"})


def clip_linf(bound: float) -> Constraint:
    """Project every dense change back into the box ``[-bound, bound]`` (its total change from
    the unedited weights, also when an append continues from an earlier change)."""
    def project(params) -> None:
        for p in params.values():
            p.clamp_(-bound, bound)
    return project


class FineTuneFFN(FineTuneMethod):
    """Dense fine-tuning of FFN output projections (FT-L and FT-M share everything but the loss)."""

    def changes(self, model, config: FineTuneConfig,
                existing: Mapping[str, WeightChange] | None = None) -> dict:
        arch = get_arch(model)
        existing = existing or {}
        names = list(existing) + [n for n in (arch.mlp_out_name(layer, config.stack) for layer in config.layers)
                                  if n not in existing]
        return {n: DenseChange.resume(existing[n], model.get_submodule(n)) if n in existing
                else DenseChange.zeros(model.get_submodule(n)) for n in names}

    def constraint(self, config: FineTuneConfig) -> Constraint | None:
        return clip_linf(config.norm_constraint) if config.norm_constraint is not None else None


class FTL(FineTuneFFN):
    name = "ft-l"
    Config = FTLConfig

    def objective(self, config) -> str:
        return "last_position"


class FTM(FineTuneFFN):
    name = "ft-m"
    Config = FineTuneConfig

    def objective(self, config) -> str:
        return "teacher_forced"
