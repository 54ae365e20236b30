"""Weight changes learned by gradient descent on the edit's own loss (FT-L, FT-M, LoRA edits).

A fine-tuning edit trains a change of a few modules' weights, never the weights themselves: each
change is a :class:`TrainableChange` (a dense ``ΔW`` for FT-L/FT-M, LoRA factors ``B A`` for a
LoRA edit) whose contribution is added to its module's output by a hook while
:func:`train_changes` runs the shared loop (:func:`editpeft.train.train_tensors`). The model is
not modified, so a failed edit (NaN, interrupt) leaves it exactly as it was; the result is the
:class:`~editpeft.deltas.DenseDelta` / :class:`~editpeft.deltas.LowRankDelta` that a
:class:`~editpeft.adapters.WeightDeltaAdapter` stores and attaches.

Two objectives (``-log p`` of the target, averaged over target tokens, then over requests):

- ``"teacher_forced"``: target token j is scored given the prompt and target tokens < j
  (FT-M; the standard autoregressive loss with the prompt masked out);
- ``"last_position"``: every target token is scored from the one distribution that follows the
  prompt, ``-1/|y| Σ_j log p(y_j | x)`` (FT-L as in ROME's baseline, Meng et al. 2022, App. B:
  the loss "at the last token of the input"; exact for one-token targets).

Example:
    >>> changes = {"model.layers.20.mlp.down_proj": DenseChange.zeros(module)}          # doctest: +SKIP
    >>> trained = train_changes(model, tok, requests, changes, "teacher_forced",
    ...                         TrainConfig(steps=25, lr=5e-4, stop_loss=1e-2))            # doctest: +SKIP
    >>> trained["model.layers.20.mlp.down_proj"]                                        # doctest: +SKIP
    <editpeft.deltas.DenseDelta ...>
"""
from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import WeightDeltaAdapter
from .arch import get_arch, is_conv1d, linear_dims
from .deltas import DenseDelta, LowRankDelta, WeightChange, matrix
from .errors import ConfigError, EditError
from .locate import context_templates
from .method import EditMethod, MethodConfig, check
from .probe import output_edit
from .request import EditRequest
from .tokens import TargetBatch, model_device, seeded_rng
from .train import Constraint, TrainConfig, TrainResult, train_tensors

OBJECTIVES = ("teacher_forced", "last_position")


class TrainableChange(ABC):
    """The trainable form of one module's weight change."""

    @abstractmethod
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to train, by name (their start values)."""

    @abstractmethod
    def contribution(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """What the change adds to the module's output for input ``x`` (training mode)."""

    @abstractmethod
    def result(self, params: Mapping[str, torch.Tensor]) -> WeightChange:
        """The stored delta made from trained tensors."""


class DenseChange(TrainableChange):
    """A full ``ΔW`` (out × in), applied as ``x @ ΔW.T`` (FT-L, FT-M)."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    @classmethod
    def zeros(cls, module: nn.Module) -> "DenseChange":
        d_in, d_out = linear_dims(module)
        w = next(module.parameters())
        return cls(torch.zeros(d_out, d_in, dtype=w.dtype, device=w.device))

    @classmethod
    def resume(cls, delta: WeightChange, module: nn.Module) -> "DenseChange":
        """Continue from an existing delta of ``module`` (e.g. an attached FT edit)."""
        w = next(module.parameters())
        return cls(matrix(delta).to(w.device, w.dtype).contiguous())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight}

    def contribution(self, params, x):
        return F.linear(x, params["weight"])

    def result(self, params) -> DenseDelta:
        return DenseDelta(params["weight"])


class LoraChange(TrainableChange):
    """LoRA factors (Hu et al. 2021, Eq. 3): ``h += (α/r) · B A x`` with ``A`` (r × in)
    initialised as peft does (Kaiming-uniform, a = √5) and ``B`` (out × r) zero, so training starts
    from the unedited model; dropout (peft's ``lora_dropout``) is applied to ``x`` before ``A``.
    ``use_rslora`` scales by ``α/√r`` (Kalajdzievski 2023). Stored as
    ``LowRankDelta(up = scale · B, down = Aᵀ)``: the same weight change, one multiply folded in."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float):
        self.a, self.b, self.scale, self.dropout = a, b, float(scale), float(dropout)

    @staticmethod
    def scaling(rank: int, alpha: float, use_rslora: bool = False) -> float:
        return alpha / math.sqrt(rank) if use_rslora else alpha / rank

    @classmethod
    def fresh(cls, module: nn.Module, rank: int, scale: float, dropout: float) -> "LoraChange":
        """New factors (``A`` drawn from torch's current RNG: seed it for a reproducible edit)."""
        d_in, d_out = linear_dims(module)
        w = next(module.parameters())
        a = torch.empty(rank, d_in, dtype=torch.float32)
        bound = 1.0 / math.sqrt(d_in)     # kaiming_uniform_(a=√5) on a (rank, d_in) weight
        a.uniform_(-bound, bound)
        return cls(a.to(w.device, w.dtype), torch.zeros(d_out, rank, dtype=w.dtype, device=w.device), scale, dropout)

    @classmethod
    def resume(cls, delta: LowRankDelta, module: nn.Module, scale: float, dropout: float) -> "LoraChange":
        """Continue training a stored LoRA delta (``up = scale · B``, ``down = Aᵀ``)."""
        w = next(module.parameters())
        return cls(delta.down.T.to(w.device, w.dtype).clone(), (delta.up / scale).to(w.device, w.dtype).clone(),
                   scale, dropout)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"A": self.a, "B": self.b}

    def contribution(self, params, x):
        if self.dropout:
            x = F.dropout(x, self.dropout, training=True)
        return F.linear(F.linear(x, params["A"]), params["B"]) * self.scale

    def result(self, params) -> LowRankDelta:
        return LowRankDelta(params["B"] * self.scale, params["A"].T.contiguous())


def training_pairs(requests: Sequence[EditRequest], paraphrases: bool,
                   templates: Sequence[str] = ("{}",)) -> tuple[list[str], list[str]]:
    """(prompts, targets) to train on: each request's prompt, and its paraphrases when asked,
    placed in every ``"...{}"`` template (context prefixes, :func:`editpeft.locate.context_templates`)."""
    prompts, targets = [], []
    for r in requests:
        for p in (r.prompt, *(r.paraphrases if paraphrases else ())):
            for t in templates:
                prompts.append(t.replace("{}", p, 1))
                targets.append(r.target_new)
    return prompts, targets


def edit_loss(logits: torch.Tensor, batch: TargetBatch, objective: str, first: int = 0) -> torch.Tensor:
    """The mean target NLL of ``batch`` under ``objective`` (see the module docstring).
    ``logits`` covers the positions from ``first`` on (see :func:`kept_logits`)."""
    if objective == "teacher_forced":
        kept = range(first, first + logits.shape[1]) if first else None
        return batch.target_nll(logits, kept=kept)
    rows = []
    for i, ids in enumerate(batch.target_ids):
        logp = F.log_softmax(logits[i, batch.last_prompt[i] - first].float(), dim=-1)
        rows.append(-logp[torch.tensor(ids, device=logits.device)].mean())
    return torch.stack(rows).mean()


def kept_logits(model: nn.Module, batch: TargetBatch) -> tuple[dict, int]:
    """Forward keyword arguments that skip the LM head where no target is predicted (causal
    models accepting ``logits_to_keep``), and the first position whose logits are kept."""
    if batch.is_seq2seq or "logits_to_keep" not in inspect.signature(model.forward).parameters:
        return {}, 0
    first = min(batch.last_prompt)
    return {"logits_to_keep": batch.input_ids.shape[1] - first}, first


def train_changes(model: nn.Module, tokenizer, requests: Sequence[EditRequest],
                  changes: Mapping[str, TrainableChange], objective: str, train: TrainConfig, *,
                  paraphrases: bool = False, templates: Sequence[str] = ("{}",),
                  constraint: Constraint | None = None, seed: int = 0) -> tuple[dict[str, WeightChange], TrainResult]:
    """Train ``changes`` (module name -> trainable change) so that ``model`` continues each
    request's prompt with its target; returns the deltas and the loop's result.

    All requests (and their paraphrases when ``paraphrases``), in every template, form one batch
    per step. Dropout draws from torch's RNG seeded by ``seed`` (in a fork: the caller's RNG is
    untouched), so the same call gives the same edit.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
    modules = {name: model.get_submodule(name) for name in changes}
    prompts, targets = training_pairs(requests, paraphrases, templates)
    batch = TargetBatch.for_model(model, tokenizer, prompts, targets)
    keep, first = kept_logits(model, batch)
    start = {f"{name}:{k}": t for name, c in changes.items() for k, t in c.tensors().items()}

    def per_module(params: Mapping[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
        return {k: params[f"{name}:{k}"] for k in changes[name].tensors()}

    def loss_fn(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with ExitStack() as stack:
            for name, change in changes.items():
                mine = per_module(params, name)
                stack.enter_context(output_edit(
                    modules[name], lambda x, out, c=change, p=mine: out + c.contribution(p, x)))
            logits = model(**batch.model_inputs(), **keep).logits
        return {"target": edit_loss(logits, batch, objective, first)}

    with seeded_rng(seed, model_device(model)):
        result = train_tensors(start, loss_fn, train, constraint=constraint)
    deltas = {name: change.result(per_module(result.params, name)) for name, change in changes.items()}
    return deltas, result


@dataclass
class FineTuneConfig(MethodConfig):
    """Training fields every fine-tuning method shares (subclasses add what is tuned and may
    change the defaults by redeclaring a field)."""

    steps: int = field(default=25, metadata={"help": "Adam steps at most"})
    lr: float = field(default=5e-4, metadata={"help": "Adam learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "Adam weight decay"})
    stop_loss: float | None = field(default=1e-2, metadata={"help": "stop once the target loss is below this"})
    context_lengths: list = field(default_factory=list, metadata={
        "help": "[[tokens, count], ...]: also train behind sampled context prefixes (none by default)"})
    train_on_paraphrases: bool = field(default=False, metadata={"help": "also train on the requests' paraphrases"})
    replay: bool = field(default=True, metadata={"help": "append: train the adapter's earlier requests again"})
    seed: int = field(default=0, metadata={"help": "seed of the training loop (initialisation, dropout, prefixes)"})

    def validate(self) -> None:
        check(isinstance(self.context_lengths, list) and all(
            isinstance(x, (list, tuple)) and len(x) == 2 and all(isinstance(v, int) and v >= 1 for v in x)
            for x in self.context_lengths), f"context_lengths must be [[tokens, count], ...], got {self.context_lengths!r}")
        check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.stop_loss is None or self.stop_loss > 0, f"stop_loss must be > 0 or null, got {self.stop_loss}")


class FineTuneMethod(EditMethod):
    """Shared ``compute``/``extend`` of the fine-tuning methods: subclasses say which modules
    change and how (:meth:`changes`), the objective, and the training settings.

    Appending (``add_edit(..., append=True)``) continues training the *same* tensors from where
    the adapter left them. With ``config.replay`` (the default) the adapter's earlier requests,
    which it stores, are trained again together with the new ones, so they are kept by the loss
    itself; without it only the new requests are trained and the earlier ones are kept only as far
    as the change does not overwrite them.
    """

    kind = "weight_delta"
    topologies = ("causal", "seq2seq")

    @abstractmethod
    def targets(self, model, config: FineTuneConfig) -> list[str]:
        """Names of the modules whose weights change (invalid names refused here, before training)."""

    @abstractmethod
    def new_change(self, module: nn.Module, config: FineTuneConfig) -> TrainableChange:
        """A fresh trainable change of ``module`` (drawn under the seeded RNG)."""

    @abstractmethod
    def resumed_change(self, delta: WeightChange, module: nn.Module, config: FineTuneConfig) -> TrainableChange:
        """A trainable change continuing from ``delta``, the adapter's stored change of ``module``."""

    def changes(self, model, config: FineTuneConfig,
                existing: Mapping[str, WeightChange] | None = None) -> dict[str, TrainableChange]:
        """Module name -> trainable change: the adapter's ``existing`` ones continued, new targets fresh."""
        existing = existing or {}
        names = list(existing) + [n for n in self.targets(model, config) if n not in existing]
        with seeded_rng(config.seed, model_device(model)):
            return {n: self.resumed_change(existing[n], model.get_submodule(n), config) if n in existing
                    else self.new_change(model.get_submodule(n), config) for n in names}

    def objective(self, config: FineTuneConfig) -> str:
        return "teacher_forced"

    def train_config(self, config: FineTuneConfig) -> TrainConfig:
        return TrainConfig(steps=config.steps, lr=config.lr, stop_loss=config.stop_loss,
                           weight_decay=config.weight_decay, desc=self.name)

    def constraint(self, config: FineTuneConfig) -> Constraint | None:
        return None

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: FineTuneConfig) -> WeightDeltaAdapter:
        deltas = self._train(model, tokenizer, list(requests), self.changes(model, config), config)
        return WeightDeltaAdapter(deltas, method=self.name, hparams=config.to_dict(), requests=list(requests))

    def extend(self, adapter: WeightDeltaAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: FineTuneConfig) -> WeightDeltaAdapter:
        if adapter.merged:
            raise EditError(f"edit {adapter.name!r} is merged into the weights; call unmerge() on it before "
                            "appending requests")
        changes = self.changes(model, config, existing=adapter.deltas)
        trained_on = adapter.requests + list(requests) if config.replay else list(requests)
        # The attached adapter is switched off while its successor trains from its tensors, so
        # the change is not counted twice.
        with adapter.switched_off():
            deltas = self._train(model, tokenizer, trained_on, changes, config)
        return WeightDeltaAdapter(deltas, method=self.name, hparams=config.to_dict(),
                                  requests=adapter.requests + list(requests))

    def _train(self, model, tokenizer, requests: list[EditRequest], changes: Mapping[str, TrainableChange],
               config: FineTuneConfig) -> dict[str, WeightChange]:
        templates = context_templates(model, tokenizer, config.context_lengths, seed=config.seed) \
            if config.context_lengths else ("{}",)
        deltas, _ = train_changes(model, tokenizer, requests, changes, self.objective(config),
                                  self.train_config(config), paraphrases=config.train_on_paraphrases,
                                  templates=templates, constraint=self.constraint(config), seed=config.seed)
        return deltas


def _is_projection(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def match_modules(model, target_modules: Sequence[str] | None, layers: Sequence[int] | None,
                  stack: str | None) -> list[str]:
    """Full names of the projections that ``target_modules`` names, matched as peft matches them
    (a module's name or its last dotted parts) within the blocks ``layers`` of ``stack`` (None: every
    block, every stack); ``target_modules`` None means each block's FFN output projection. A key
    that matches nothing is refused with the module names this family does have.

    >>> match_modules(model, ["q_proj", "down_proj"], [3], None)     # doctest: +SKIP
    ['model.layers.3.self_attn.q_proj', 'model.layers.3.mlp.down_proj']
    """
    arch = get_arch(model)
    if target_modules is None:
        chosen = layers if layers is not None else range(arch.num_blocks(stack))
        return [arch.mlp_out_name(layer, stack) for layer in chosen]
    stacks = [stack] if stack is not None else list(arch.stacks)
    found: dict[str, list[str]] = {key: [] for key in target_modules}
    available: set[str] = set()
    for st in stacks:
        for layer in (layers if layers is not None else range(arch.num_blocks(st))):
            block_name = arch.layer_name(layer, st)
            for rel, module in arch.module(block_name).named_modules():
                if not rel or not _is_projection(module):
                    continue
                available.add(rel.split(".")[-1])
                for key in target_modules:
                    if rel == key or rel.endswith("." + key):
                        found[key].append(f"{block_name}.{rel}")
    missing = [k for k, names in found.items() if not names]
    if missing:
        raise ConfigError(f"target_modules {missing} match no Linear module in the blocks of this "
                          f"{arch.model_type} model; its block modules are: {', '.join(sorted(available))}")
    return list(dict.fromkeys(name for names in found.values() for name in names))
