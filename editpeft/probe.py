"""Compute-time probes: capture a module's input or output, replace it, or stop the forward.

Methods use these while computing an edit (never attached to a model for longer than a block).
:func:`activations_at` is the capture-then-stop pattern in one call: the forward runs only up to
the module whose activations are wanted.

Example:
    >>> acts = activations_at(model, model.model.layers[3].mlp.down_proj, batch.model_inputs())  # doctest: +SKIP
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn


@contextmanager
def capture_inputs(module: nn.Module, store: list) -> Iterator[list]:
    """Collect ``module``'s first positional input of every forward call into ``store``."""
    handle = module.register_forward_hook(lambda m, args, out: store.append(args[0]))
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def capture_outputs(module: nn.Module, store: list) -> Iterator[list]:
    """Collect ``module``'s output (the hidden states of a decoder block) of every forward call."""
    handle = module.register_forward_hook(lambda m, args, out: store.append(out[0] if isinstance(out, tuple) else out))
    try:
        yield store
    finally:
        handle.remove()


@contextmanager
def output_edit(module: nn.Module, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Temporarily replace ``module``'s output by ``fn(input, output)`` (for optimisation loops)."""
    handle = module.register_forward_hook(lambda m, args, out: fn(args[0], out))
    try:
        yield
    finally:
        handle.remove()


def as_btd(acts: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Captured activations as (batch, seq, dim); some families (OPT) flatten to (batch*seq, dim)."""
    return acts.reshape(input_ids.shape[0], input_ids.shape[1], acts.shape[-1])


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once the needed activations are captured."""


@contextmanager
def stop_after(module: nn.Module) -> Iterator[None]:
    """Abort the forward pass right after ``module`` runs (callers catch :class:`StopForward`)."""
    def hook(m, args, out):
        raise StopForward
    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def activations_at(model: nn.Module, module: nn.Module, inputs: Mapping[str, Any], which: str = "input") -> torch.Tensor:
    """``module``'s first input (``which="input"``) or its output in one forward of ``model`` on
    ``inputs``, which stops right after ``module`` (no gradient)."""
    if which not in ("input", "output"):
        raise ValueError(f"which must be 'input' or 'output', got {which!r}")
    captured: list = []
    grab = capture_inputs(module, captured) if which == "input" else capture_outputs(module, captured)
    with torch.no_grad(), grab, stop_after(module):
        try:
            model(**inputs, use_cache=False)
        except StopForward:
            pass
    return captured[0]
