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
one-token targets, a bag-of-tokens surrogate for longer ones (so the second token of a
multi-token target is never trained: teacher-forced reliability is capped below 1 on such
targets). ``objective: teacher_forced`` trains the target tokens given the prompt and the
preceding target tokens instead — the paper's loss on the fact read as a causal LM's.

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

from editpeft.arch import get_arch
from editpeft.deltas import WeightChange
from editpeft.finetune import OBJECTIVES, DenseChange, FineTuneConfig, FineTuneMethod
from editpeft.method import check
from editpeft.train import Constraint


@dataclass
class FFNTuneConfig(FineTuneConfig):
    layers: list = field(default_factory=lambda: [21], metadata={"help": "blocks whose FFN output projection is tuned"})
    stack: str | None = field(default=None, metadata={"help": "stack of the layers (T5: encoder/decoder; default decoder)"})
    norm_constraint: float | None = field(default=None, metadata={"help": "δ: L∞ bound on each weight's change (null: none)"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.layers, list) and self.layers and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.layers),
            f"layers must be a non-empty list of block indices, got {self.layers!r}")
        check(self.norm_constraint is None or self.norm_constraint > 0,
              f"norm_constraint must be > 0 (the L∞ bound δ on each weight's change) or null for no bound; "
              f"got {self.norm_constraint}")


@dataclass
class FTLConfig(FFNTuneConfig):
    norm_constraint: float | None = field(default=5e-4, metadata={"help": "δ: L∞ bound on each weight's change (null: none)"})
    objective: str = field(default="last_position", metadata={
        "help": "last_position (every target token from the distribution after the prompt, ROME's and "
                "EasyEdit's FT-L) or teacher_forced (each target token after the preceding ones)"})

    def validate(self) -> None:
        super().validate()
        check(self.objective in OBJECTIVES, f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def clip_linf(bound: float) -> Constraint:
    """Project every dense change back into the box ``[-bound, bound]`` (its total change from
    the unedited weights, also when an append continues from an earlier change)."""
    def project(params) -> None:
        for p in params.values():
            p.clamp_(-bound, bound)
    return project


class FineTuneFFN(FineTuneMethod):
    """Dense fine-tuning of FFN output projections (FT-L and FT-M share everything but the loss)."""

    def targets(self, model, config: FFNTuneConfig) -> list[str]:
        arch = get_arch(model)
        return [arch.mlp_out_name(layer, config.stack) for layer in config.layers]

    def new_change(self, module, config) -> DenseChange:
        return DenseChange.zeros(module)

    def resumed_change(self, delta: WeightChange, module, config) -> DenseChange:
        return DenseChange.resume(delta, module)

    def constraint(self, config: FFNTuneConfig) -> Constraint | None:
        return clip_linf(config.norm_constraint) if config.norm_constraint is not None else None


class FTL(FineTuneFFN):
    name = "ft-l"
    Config = FTLConfig

    def objective(self, config: FTLConfig) -> str:
        return config.objective


class FTM(FineTuneFFN):
    """The shared method's teacher-forced objective, no constraint unless configured."""

    name = "ft-m"
    Config = FFNTuneConfig
