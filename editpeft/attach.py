"""The attachment points: one forward hook per edited module, plus the model-level router.

Every edited module gets one :class:`ModuleSlot`. Its single forward hook applies the
contributions of the attached adapters in insertion order: weight deltas add ``(x @ V) @ U^T``
to the output, module hooks (codebooks, patch neurons) transform the output. A contribution
whose adapter is inactive, merged, or switched off by ``disabled_edits()`` is skipped, so the
module then runs exactly its original code path (bitwise-identical outputs).

Merging bakes weight deltas into ``module.weight``; the slot keeps a pristine copy so that
unmerging restores the original weights bit for bit, whatever the order of merges. A merged
delta obeys the on/off switch like a hooked one: the weight always holds the pristine copy plus
the merged deltas of the adapters that are live (:meth:`ModuleSlot.sync`), so switching a merged
adapter off (``set_active_edits``, ``adapter.active = False``, ``disabled_edits()``) takes its
delta out of the weight, and merging one that is off leaves the weight as it is until it is on.
"""
from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from .deltas import DenseDelta, LowRankDelta, WeightChange  # noqa: F401  (re-exported)
from .probe import (StopForward, as_btd, capture_inputs, capture_outputs, output_edit,  # noqa: F401  (re-exported)
                    stop_after)

if TYPE_CHECKING:  # pragma: no cover
    from .adapters import EditAdapter
    from .editable import EditState

Contribution = Callable[[tuple, Any], Any]
InputContribution = Callable[[tuple], "torch.Tensor | None"]


class ModuleSlot:
    """The hooks of one module and the ordered contributions attached to it.

    ``output`` contributions get ``(args, output)`` and return the new output (weight deltas,
    codebooks, patch neurons); ``input`` contributions get ``args`` and return the new first
    positional input (or None to leave it), run by a forward pre-hook. Each list applies in stack
    order; a hook is registered only while its list is non-empty.
    """

    def __init__(self, state: "EditState", name: str, module: nn.Module):
        self.state, self.name, self.module = state, name, module
        self.entries: list[tuple["EditAdapter", Contribution]] = []
        self.input_entries: list[tuple["EditAdapter", InputContribution]] = []
        self.pristine: torch.Tensor | None = None
        self.merged: list[tuple["EditAdapter", torch.Tensor]] = []
        self._in_weight: tuple[int, ...] = ()   # ids of the merged adapters whose delta is in the weight
        self._handle = None
        self._pre_handle = None

    def add(self, adapter: "EditAdapter", fn: Callable, where: str = "output") -> None:
        if where == "output":
            self.entries.append((adapter, fn))
            if self._handle is None:
                self._handle = self.module.register_forward_hook(self._hook)
        elif where == "input":
            self.input_entries.append((adapter, fn))
            if self._pre_handle is None:
                self._pre_handle = self.module.register_forward_pre_hook(self._pre_hook)
        else:
            raise ValueError(f"where must be 'input' or 'output', got {where!r}")

    def remove(self, adapter: "EditAdapter") -> None:
        self.entries = [(a, f) for a, f in self.entries if a is not adapter]
        self.input_entries = [(a, f) for a, f in self.input_entries if a is not adapter]
        if not self.entries and self._handle is not None:
            self._handle.remove()
            self._handle = None
        if not self.input_entries and self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None

    @property
    def empty(self) -> bool:
        return not self.entries and not self.input_entries and self.pristine is None

    def sort(self, order: dict[int, int]) -> None:
        """Put the contributions in stack order (``order``: id(adapter) -> position)."""
        last = len(order)
        self.entries.sort(key=lambda e: order.get(id(e[0]), last))
        self.input_entries.sort(key=lambda e: order.get(id(e[0]), last))

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        for adapter, fn in self.entries:
            if self.state.is_live(adapter) and not adapter.merged:
                output = fn(args, output)
        return output

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        changed = False
        for adapter, fn in self.input_entries:
            if self.state.is_live(adapter) and not adapter.merged:
                new = fn(args)
                if new is not None:
                    args = (new, *args[1:])
                    changed = True
        return args if changed else None

    # -- merging -----------------------------------------------------------------------------
    def merge(self, adapter: "EditAdapter", delta: WeightChange) -> None:
        dense = delta.dense(self.module)
        if self.pristine is None:
            self.pristine = self.module.weight.detach().clone()
        self.merged.append((adapter, dense))
        self.sync()

    def unmerge(self, adapter: "EditAdapter") -> None:
        self.merged = [(a, d) for a, d in self.merged if a is not adapter]
        self.sync()
        if not self.merged:
            self.pristine = None
            self._in_weight = ()

    def sync(self) -> None:
        """Make the weight the pristine copy plus the merged deltas of the live adapters, in merge
        order (bitwise what merging them one after another gives); a no-op when nothing changed."""
        if self.pristine is None:
            return
        live = [(a, d) for a, d in self.merged if self.state.is_live(a)]
        ids = tuple(id(a) for a, _ in live)
        if ids == self._in_weight:
            return
        with torch.no_grad():
            self.module.weight.copy_(self.pristine)
            for _, dense in live:
                self.module.weight.add_(dense)
        self._in_weight = ids


@contextmanager
def temporary_deltas(model: nn.Module, deltas: "dict[str, WeightChange]") -> Iterator[None]:
    """Apply low-rank deltas to named modules for the duration of the block (used while an edit is
    being computed on top of its own earlier parts: ROME's later requests, MEMIT's later layers)."""
    with ExitStack() as stack:
        for name, delta in deltas.items():
            stack.enter_context(output_edit(model.get_submodule(name), lambda x, out, d=delta: out + d(x)))
        yield
