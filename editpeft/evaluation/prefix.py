"""Scoring an edited model from its first edited block, reusing the unedited hidden states.

An edit that writes only to blocks ``L`` and above (a weight delta, a module hook, patch neurons,
a side memory) leaves the hidden state entering block ``L`` exactly as the unedited model computes
it. The harness already runs the unedited model on every locality probe (its baseline); while it
does, :class:`PrefixStates` keeps, per packed *segment* (one prompt with the continuations scored
after it), the hidden state entering block ``L``. When the edited model later scores the same
segment — after every checkpoint of a sequential run, too — only blocks ``L``.. and the head run:

    logits(segment) = head(blocks[L:](h_L(segment)))         h_L cached, blocks[L:] edited

The states are kept in memory for the run (bounded by ``max_bytes``; past it, new probes run the
whole model). A segment's states depend only on its own tokens (the packed rows' masks keep
segments apart and give each its own positions), so states recorded in one packing replay in any
other. Below ``L`` the blocks are skipped, not run: each is called as the identity, and block ``L``
receives the cached states, so masks, rotary tables and every other argument come from the model's
own forward.

What makes it exact is checked, not assumed: the first replay of a :class:`PrefixStates` is compared
with the full forward of the same rows at the positions they read
(:meth:`editpeft.suffix.BlockSuffix.reproduces`: to ``REPLAY_RTOL`` of the logits' scale; the two
differ only in how float32 matmuls are blocked); if it differs, the states are dropped and every
pass runs the whole model. Routers (IKE, SERAC rewrite the input), edits outside the blocks
(embeddings, head) and methods that cannot name their targets before editing
get no prefix (:func:`prefix_layer` returns None).

Example:
    >>> states = PrefixStates(layer=27)                                                  # doctest: +SKIP
    >>> with model.disabled_edits():                                                     # doctest: +SKIP
    ...     base = score_branches(model, tok, items, prefix=states, record=True)
    >>> edited = score_branches(model, tok, items, prefix=states)  # blocks 27.. only    # doctest: +SKIP
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from ..arch import get_arch

logger = logging.getLogger(__name__)

SegmentKey = tuple

#: Default bound on the kept states (a full CounterFact case keeps ~0.6 MB on SmolLM2-135M; a zsRE or
#: CounterFact-edit case ~0.1 MB). Past it, new probes are not kept and run the whole model.
MAX_BYTES = 2 << 30


@dataclass
class PrefixStates:
    """Hidden states entering block ``layer``, per segment key; see the module docstring."""

    layer: int
    states: dict[SegmentKey, torch.Tensor] = field(default_factory=dict)
    #: None until the first replay was compared with a full forward; then whether it matched
    verified: bool | None = None
    #: whether the blocks return tuples (older transformers) rather than tensors; seen while recording
    tuple_output: bool | None = None
    #: segments scored from block ``layer`` so far (reported by benchmarks; tests check the path ran)
    replayed: int = 0
    max_bytes: int = MAX_BYTES
    _bytes: int = 0

    @property
    def usable(self) -> bool:
        return self.verified is not False

    @property
    def full(self) -> bool:
        return self._bytes >= self.max_bytes

    def keep(self, key: SegmentKey, hidden: torch.Tensor) -> None:
        """Keep ``hidden`` (the segment's states entering block ``layer``) unless the bound is reached."""
        if key not in self.states and not self.full:
            self.states[key] = hidden.clone()
            self._bytes += hidden.numel() * hidden.element_size()

    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self.states.clear()
        self._bytes = 0


def lowest_edited_block(model, targets: Iterable[str] | None) -> int | None:
    """The lowest block any of ``targets`` lies in; None when unknown or when one lies outside
    every block (an embedding or the head: the states below would change or the head differs)."""
    if targets is None:
        return None
    arch = get_arch(model)
    if arch.topology != "causal":
        return None
    layers = [arch.layer_of(t) for t in targets]
    if not layers or any(x is None for x in layers):
        return None
    return min(layers)


def attached_floor(model) -> int | None:
    """The lowest block written by any edit attached to ``model`` (live or not); None when an
    attached edit is a router or writes outside the blocks; ``num_layers`` when there is none."""
    edits = getattr(model, "edits", None) or {}
    floor = get_arch(model).num_layers
    for adapter in edits.values():
        if adapter.kind == "router":
            return None
        layer = lowest_edited_block(model, adapter.targets)
        if layer is None:
            return None
        floor = min(floor, layer)
    return floor


def prefix_layer(model, method_targets: Iterable[str] | None) -> int | None:
    """The block a harness run of a method writing to ``method_targets`` can score from: the
    lowest block written by it or by any edit already attached; None when there is nothing to gain
    (block 0) or it cannot be known."""
    own = lowest_edited_block(model, method_targets)
    floor = attached_floor(model)
    if own is None or floor is None:
        return None
    layer = min(own, floor)
    return layer if layer > 0 else None


class PrefixDone(Exception):
    """Raised by :func:`recording` with ``stop=True`` once block ``layer``'s input is recorded."""


@contextmanager
def recording(model: nn.Module, prefix: PrefixStates, sink: list, stop: bool = False) -> Iterator[None]:
    """Inside the block, each forward appends the hidden state entering block ``prefix.layer`` to
    ``sink`` (and notes whether blocks return tuples); ``stop=True`` ends the forward there by
    raising :class:`PrefixDone` (the caller catches it): only the blocks below run."""
    blocks = list(get_arch(model).layers())

    def grab(module, args, kwargs):
        sink.append((args[0] if args else kwargs["hidden_states"]).detach())
        if stop:
            raise PrefixDone

    def shape(module, args, kwargs, out):
        prefix.tuple_output = isinstance(out, tuple)

    with ExitStack() as stack:
        for hook in (blocks[prefix.layer].register_forward_pre_hook(grab, with_kwargs=True),
                     blocks[0].register_forward_hook(shape, with_kwargs=True)):
            stack.callback(hook.remove)
        yield


@contextmanager
def replaying(model: nn.Module, prefix: PrefixStates, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward skips blocks below ``prefix.layer`` (each returns its input)
    and block ``prefix.layer`` receives ``hidden`` instead of what reaches it."""
    blocks = list(get_arch(model).layers())
    as_tuple = bool(prefix.tuple_output)

    def skip(*args: Any, **kwargs: Any):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if as_tuple else h

    def put(module, args, kwargs):
        if args:
            return (hidden.to(args[0].dtype),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

    with ExitStack() as stack:
        for block in blocks[:prefix.layer]:
            own = block.__dict__.get("forward")      # an instance-level forward (accelerate's hooks) is kept
            block.forward = skip
            stack.callback(_restore_forward, block, own)
        hook = blocks[prefix.layer].register_forward_pre_hook(put, with_kwargs=True)
        stack.callback(hook.remove)
        yield


def _restore_forward(block: nn.Module, own: Any) -> None:
    if own is None:
        del block.forward
    else:
        block.forward = own

