"""LoRA edits — a peft LoRA trained on the edit request, stored and exported as one.

Hu, Shen, Wallis, Allen-Zhu, Li, Wang, Wang, Chen. "LoRA: Low-Rank Adaptation of Large Language
Models", ICLR 2022 (arXiv:2106.09685). Every target module's weight W₀ gets a trainable change
(§4.1, Eq. 3):

    h = W₀ x + ΔW x = W₀ x + (α / r) · B A x,    A ∈ R^{r×d_in} (Kaiming-uniform),  B ∈ R^{d_out×r} (zero)

so training starts from the unedited model. ``rank`` (r), ``alpha`` (α), ``target_modules``,
``layers`` (peft's ``layers_to_transform``), ``dropout`` (peft's ``lora_dropout``, on x before A)
and ``use_rslora`` (α/√r) mean what they mean in ``peft.LoraConfig``; target modules are matched
as peft matches them (a module's name equals the key or ends with ``.<key>``), inside the blocks
of the model's stacks. The loss is the teacher-forced NLL of the target tokens given the prompt
(prompt positions masked), over the request's prompt and, when the request carries them, its
paraphrases; Adam with early stop below ``stop_loss``.

The adapter stores each module's change as ``LowRankDelta(up = (α/r) B, down = Aᵀ)``: it attaches
by a hook like every weight delta, stacks with ROME/GRACE edits on the same modules in either
order, and ``to_peft_lora`` writes it as a plain peft LoRA folder (``lora_B = (α/r) B``,
``lora_A = A``, scaling 1) — the same weights, no truncation. Append continues training the same
A and B (replaying the adapter's earlier requests by default, see
:class:`editpeft.finetune.FineTuneMethod`).

AdaLoRA (Zhang et al. 2023) is not offered: its point is *allocating* a rank budget between many
modules from importance scores smoothed over thousands of steps (a warm-up ``tinit``, a pruning
schedule to ``tfinal``, ``update_and_allocate`` after every step) plus an orthogonality penalty on
its P Λ Q factors. An edit trains a few tensors for tens of steps: the schedule would have nothing
to allocate, and supporting it means a second parametrisation, a second loss and a per-step
callback in the shared loop — the special cases the issue asked to avoid.

Example:
    >>> model.add_edit("lora", EditRequest(prompt="The Eiffel Tower is located in the city of",
    ...                target_new="Rome"), config={"rank": 4})                       # doctest: +SKIP
    >>> model.edits["lora-1"].to_peft_lora("eiffel-lora")                            # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field

from editpeft.deltas import LowRankDelta, WeightChange
from editpeft.errors import ConfigError
from editpeft.finetune import FineTuneConfig, FineTuneMethod, LoraChange, match_modules
from editpeft.method import check


@dataclass
class LoraEditConfig(FineTuneConfig):
    rank: int = field(default=8, metadata={"help": "r: rank of each LoRA change"})
    alpha: float = field(default=32.0, metadata={"help": "α: the change is scaled by α/r"})
    dropout: float = field(default=0.1, metadata={"help": "peft's lora_dropout, on the input of A"})
    target_modules: list | None = field(default=None, metadata={
        "help": "module names (as in peft: a name or its last part), e.g. [q_proj, v_proj]; "
                "null: the FFN output projection"})
    layers: list | None = field(default=None, metadata={"help": "blocks to adapt (null: all)"})
    stack: str | None = field(default=None, metadata={"help": "T5: encoder/decoder (null: the decoder for the "
                                                              "FFN default, every stack for named modules)"})
    use_rslora: bool = field(default=False, metadata={"help": "scale by α/√r instead of α/r"})
    steps: int = field(default=70, metadata={"help": "Adam steps at most"})
    lr: float = field(default=5e-3, metadata={"help": "Adam learning rate"})
    train_on_paraphrases: bool = field(default=True, metadata={"help": "also train on the requests' paraphrases"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        super().validate()
        check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1,
              f"rank must be an int >= 1, got {self.rank!r}")
        check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        check(0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}")
        check(self.target_modules is None or (isinstance(self.target_modules, list) and self.target_modules
                                              and all(isinstance(m, str) and m for m in self.target_modules)),
              f"target_modules must be null or a non-empty list of module names, got {self.target_modules!r}")
        check(self.layers is None or (isinstance(self.layers, list) and self.layers and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in self.layers)),
            f"layers must be null or a non-empty list of block indices, got {self.layers!r}")

    @property
    def scale(self) -> float:
        return LoraChange.scaling(self.rank, self.alpha, self.use_rslora)


def lora_targets(model, config: LoraEditConfig) -> list[str]:
    """The modules a LoRA edit adapts, by full name (see :func:`editpeft.finetune.match_modules`)."""
    return match_modules(model, config.target_modules, config.layers, config.stack)


class LoraEdit(FineTuneMethod):
    name = "lora"
    Config = LoraEditConfig

    def targets(self, model, config: LoraEditConfig) -> list[str]:
        return lora_targets(model, config)

    def new_change(self, module, config: LoraEditConfig) -> LoraChange:
        return LoraChange.fresh(module, config.rank, config.scale, config.dropout)

    def resumed_change(self, delta: WeightChange, module, config: LoraEditConfig) -> LoraChange:
        if not isinstance(delta, LowRankDelta):
            raise ConfigError(f"the adapter's change of {type(delta).__name__} form is not a LoRA (low-rank) delta")
        return LoraChange.resume(delta, module, config.scale, config.dropout)
