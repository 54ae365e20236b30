"""The one training loop for tensors trained through the hooked model.

Codebook values (GRACE), fine-tuned rows and dense deltas (FT-L/FT-M), LoRA factors, patch
neurons (T-Patcher, CaliNet) and side memories (WISE) are all trained the same way: a few named
tensors, a loss computed by running the model with those tensors hooked in, an optimiser, and
the same safety rails. The model's own parameters are never optimised here, so a failure (NaN,
interrupt) leaves the model exactly as it was.

``loss_fn(params)`` returns either the loss tensor or a mapping of named terms; the terms are
summed, and early stopping looks at the ``"target"`` term (the loss over the target tokens only)
when there is one. After each step an optional constraint projects the tensors (e.g. an L∞ box
around their start, FT-L's norm constraint), and gradient masks zero what must not move.

Example:
    >>> w = torch.zeros(3, requires_grad=True)
    >>> result = train_tensors({"w": w}, lambda p: {"target": ((p["w"] - 1) ** 2).sum()},
    ...                        TrainConfig(steps=200, lr=0.1, stop_loss=1e-4))
    >>> bool(result.loss < 1e-4), result.params["w"].requires_grad
    (True, False)
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .errors import ConfigError, EditOptimizationError

logger = logging.getLogger(__name__)

Constraint = Callable[[dict[str, torch.Tensor]], None]

#: A loop shows its progress bar once it has run this many seconds (``EDITPEFT_PROGRESS=0`` hides it).
PROGRESS_DELAY_S = 2.0


@dataclass
class TrainConfig:
    """How to train: optimiser, steps, early stop, norm constraints."""

    steps: int = 100
    lr: float = 1e-2
    optimizer: str = "adam"
    weight_decay: float = 0.0
    stop_loss: float | None = None
    linf_bound: float | None = None
    l2_bound: float | None = None
    grad_clip: float | None = None
    progress: bool | None = None
    desc: str = "training"
    betas: tuple[float, float] = field(default=(0.9, 0.999))

    def __post_init__(self) -> None:
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ConfigError(f"steps must be an int >= 1, got {self.steps!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"the learning rate must be a finite number > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; use one of {sorted(OPTIMIZERS)}")
        for name in ("linf_bound", "l2_bound", "grad_clip"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be > 0 (or None for no constraint), got {v!r}")


OPTIMIZERS: dict[str, Callable] = {
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "adamw": lambda params, c: torch.optim.AdamW(params, lr=c.lr, betas=c.betas, weight_decay=c.weight_decay),
    "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, weight_decay=c.weight_decay),
}


@dataclass
class TrainResult:
    """The trained tensors (detached), the last losses and how the loop ended."""

    params: dict[str, torch.Tensor]
    loss: float
    terms: dict[str, float]
    steps: int
    stopped_early: bool
    history: list[float]


def box_constraint(start: Mapping[str, torch.Tensor], bound: float) -> Constraint:
    """Keep every tensor within ``bound`` of its start in every entry (an L∞ ball)."""
    start = {k: v.detach().clone() for k, v in start.items()}

    def project(params: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            p.copy_(torch.maximum(torch.minimum(p, start[k] + bound), start[k] - bound))
    return project


def l2_constraint(start: Mapping[str, torch.Tensor], bound: float) -> Constraint:
    """Keep every tensor's change from its start within L2 norm ``bound`` (rescaling it)."""
    start = {k: v.detach().clone() for k, v in start.items()}

    def project(params: dict[str, torch.Tensor]) -> None:
        for k, p in params.items():
            change = p - start[k]
            norm = change.norm()
            if norm > bound:
                p.copy_(start[k] + change * (bound / norm))
    return project


def _split(out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    if isinstance(out, torch.Tensor):
        return out, {"target": out}
    terms = dict(out)
    if not terms:
        raise EditOptimizationError("the loss function returned no terms")
    return torch.stack([t.float() for t in terms.values()]).sum(), terms


def _progress(config: TrainConfig):
    show = config.progress
    if show is None:
        show = os.environ.get("EDITPEFT_PROGRESS", "1") != "0"
    if not show:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=config.steps, desc=config.desc, leave=False, delay=PROGRESS_DELAY_S)


def train_tensors(params: Mapping[str, torch.Tensor], loss_fn: Callable[[dict[str, torch.Tensor]], object],
                  config: TrainConfig, *, grad_masks: Mapping[str, torch.Tensor] | None = None,
                  constraint: Constraint | None = None) -> TrainResult:
    """Optimise ``params`` (copied; the inputs are not changed) to minimise ``loss_fn``.

    Stops early when the target term falls below ``config.stop_loss`` (checked before the step,
    so the returned tensors are the ones that reached it). Raises
    :class:`EditOptimizationError` on a non-finite loss or gradient, an overflowing update, or a
    target loss that ends above where it started (divergence).
    """
    live = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    if not live:
        raise ConfigError("nothing to train: no tensors were given")
    constraints = [c for c in (
        constraint,
        box_constraint(live, config.linf_bound) if config.linf_bound else None,
        l2_constraint(live, config.l2_bound) if config.l2_bound else None) if c is not None]
    masks = {k: m.to(live[k].device, live[k].dtype) for k, m in (grad_masks or {}).items()}
    unknown = set(masks) - set(live)
    if unknown:
        raise ConfigError(f"gradient masks for unknown tensors {sorted(unknown)}")
    opt = OPTIMIZERS[config.optimizer](list(live.values()), config)
    bar = _progress(config)
    history: list[float] = []
    loss_val, terms_val, stopped, step = float("nan"), {}, False, 0
    try:
        with torch.enable_grad():
            for step in range(1, config.steps + 1):
                opt.zero_grad(set_to_none=True)
                total, terms = _split(loss_fn(live))
                terms_val = {k: float(v.detach()) for k, v in terms.items()}
                loss_val = float(total.detach())
                target = terms_val.get("target", loss_val)
                history.append(target)
                if not math.isfinite(loss_val):
                    raise EditOptimizationError(
                        f"{config.desc}: the loss became {loss_val} at step {step} ({terms_val}); the model was "
                        "left unchanged. Lower the learning rate (lr).")
                if config.stop_loss is not None and target < config.stop_loss:
                    stopped = True
                    break
                total.backward()
                for k, p in live.items():
                    if p.grad is None:
                        continue
                    if k in masks:
                        p.grad.mul_(masks[k])
                    if not bool(torch.isfinite(p.grad).all()):
                        raise EditOptimizationError(f"{config.desc}: non-finite gradient for {k!r} at step {step}; "
                                                    "the model was left unchanged. Lower lr.")
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(list(live.values()), config.grad_clip)
                try:
                    opt.step()
                except RuntimeError as e:        # a step too large for the tensors' dtype
                    if "overflow" not in str(e):
                        raise
                    raise EditOptimizationError(f"{config.desc}: the update overflowed at step {step} ({e}); the "
                                                "model was left unchanged. Lower lr.") from None
                with torch.no_grad():
                    for c in constraints:
                        c(live)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{target:.4f}")
                logger.debug("%s step %d: %s", config.desc, step, terms_val)
    finally:
        if bar is not None:
            bar.close()
    if not stopped and len(history) > 1 and history[-1] > history[0]:
        # normalised models (RMSNorm, LayerNorm) rarely overflow to NaN: a step too large
        # saturates them instead, and the loss ends above where it started
        raise EditOptimizationError(f"{config.desc}: the target loss rose from {history[0]:.4g} to {history[-1]:.4g} "
                                    f"in {step} steps (training diverged); the model was left unchanged. Lower lr.")
    out = {k: v.detach() for k, v in live.items()}
    bad = [k for k, v in out.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise EditOptimizationError(f"{config.desc}: tensors {bad} became non-finite; the model was left "
                                    "unchanged. Lower lr.")
    logger.info("%s: %d step(s), loss %.4f%s", config.desc, step, loss_val, " (early stop)" if stopped else "")
    return TrainResult(out, loss_val, terms_val, step, stopped, history)
