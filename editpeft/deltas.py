"""Weight changes of one Linear/Conv1D module: low-rank (``up @ down.T``) or dense.

Both kinds are applied by a forward hook as an added output, ``y += delta(x)``, so the module's
own weights are never touched until :meth:`merge`; both can say what they add to the weight
(:meth:`dense`, laid out like ``module.weight``) for merging and for export. A delta keeps its
tensors in the dtype it was computed in (that is what is saved) and follows the dtype and device
of whatever it is applied to: after ``model.half()`` or ``model.to(device)`` the hook casts once
and caches the cast copy.

Example:
    >>> d = LowRankDelta(torch.ones(3, 1), torch.ones(4, 1))
    >>> d(torch.ones(2, 4)).shape, d.rank
    (torch.Size([2, 3]), 1)
    >>> DenseDelta(torch.eye(3, 4))(torch.ones(1, 4)).tolist()
    [[1.0, 1.0, 1.0]]
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .arch import is_conv1d


class _Follow:
    """Casts of a fixed set of tensors to the device/dtype of a reference tensor, cached."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._cast: tuple[torch.Tensor, ...] = ()

    def get(self, tensors: tuple[torch.Tensor, ...], like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (like.device, like.dtype)
        if all(t.device == like.device and t.dtype == like.dtype for t in tensors):
            return tensors
        if self._key != key:
            self._cast = tuple(t.to(like.device, like.dtype) for t in tensors)
            self._key = key
        return self._cast


def _check_float_finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(t.is_floating_point() for t in tensors):
        raise ValueError(f"{name} tensors must be floating point; got {[str(t.dtype) for t in tensors]}")
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"{name} tensors contain NaN or inf")


class WeightChange(Protocol):
    """What every weight change of a module offers the core."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def dense(self, module: nn.Module) -> torch.Tensor: ...
    def tensors(self) -> dict[str, torch.Tensor]: ...
    def shape(self) -> tuple[int, int]: ...


class LowRankDelta:
    """A weight change ``up @ down.T`` (shape out × in), applied as ``y += (x @ down) @ up.T``."""

    suffixes = ("up", "down")

    def __init__(self, up: torch.Tensor, down: torch.Tensor):
        if up.ndim != 2 or down.ndim != 2 or up.shape[1] != down.shape[1]:
            raise ValueError(f"low-rank factors must be (out, r) and (in, r); got "
                             f"{tuple(up.shape)} and {tuple(down.shape)}")
        _check_float_finite("low-rank factor", up, down)
        self.up, self.down = up, down
        self._follow = _Follow()

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the module this delta fits."""
        return self.up.shape[0], self.down.shape[0]

    def to(self, like: torch.Tensor) -> "LowRankDelta":
        return LowRankDelta(self.up.to(like.device, like.dtype), self.down.to(like.device, like.dtype))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        up, down = self._follow.get((self.up, self.down), x)
        return (x @ down) @ up.T

    def dense(self, module: nn.Module) -> torch.Tensor:
        w = module.weight
        delta = self.up.to(w) @ self.down.to(w).T   # (out, in)
        return delta.T if is_conv1d(module) else delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"up": self.up.detach().contiguous(), "down": self.down.detach().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "LowRankDelta":
        return cls(tensors["up"], tensors["down"])


class DenseDelta:
    """A dense weight change ``weight`` (shape out × in, whatever the module's own layout),
    applied as ``y += x @ weight.T``. For changes with no low-rank form (constrained fine-tuning)."""

    suffixes = ("weight",)

    def __init__(self, weight: torch.Tensor):
        if weight.ndim != 2:
            raise ValueError(f"a dense delta must be (out, in); got shape {tuple(weight.shape)}")
        _check_float_finite("dense delta", weight)
        self.weight = weight
        self._follow = _Follow()

    def shape(self) -> tuple[int, int]:
        return self.weight.shape[0], self.weight.shape[1]

    @property
    def rank(self) -> int:
        """The numerical rank (singular values above float32 round-off of the largest)."""
        s = torch.linalg.svdvals(self.weight.double())
        tol = s.max() * max(self.weight.shape) * torch.finfo(torch.float32).eps if s.numel() else 0.0
        return int((s > tol).sum())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        (w,) = self._follow.get((self.weight,), x)
        return torch.nn.functional.linear(x, w)

    def dense(self, module: nn.Module) -> torch.Tensor:
        delta = self.weight.to(module.weight)
        return delta.T if is_conv1d(module) else delta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight.detach().contiguous()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "DenseDelta":
        return cls(tensors["weight"])


DELTA_TYPES: dict[str, type] = {"low_rank": LowRankDelta, "dense": DenseDelta}


def matrix(delta: WeightChange) -> torch.Tensor:
    """The change as one (out × in) matrix in float64, independent of any module's layout."""
    if isinstance(delta, LowRankDelta):
        return delta.up.double() @ delta.down.double().T
    return delta.weight.double()


def add_changes(first: WeightChange, second: WeightChange) -> WeightChange:
    """``first + second`` in the smaller exact form: factors of rank r1 + r2 while they hold no more
    numbers than the dense matrix, else one :class:`DenseDelta` (summed in float64, stored in
    ``first``'s dtype). A stream of appended low-rank turns therefore never outgrows the module:
    its size and the cost of applying it stop growing at rank out·in / (out + in).

    >>> a, b = LowRankDelta(torch.ones(30, 8), torch.ones(40, 8)), LowRankDelta(torch.ones(30, 1), torch.ones(40, 1))
    >>> type(add_changes(a, b)).__name__, add_changes(a, b).rank        # 9 x (30 + 40) <= 30 x 40 numbers
    ('LowRankDelta', 9)
    >>> type(add_changes(add_changes(a, b), a)).__name__                  # 17 x 70 < 1200 < 18 x 70
    'LowRankDelta'
    >>> type(add_changes(add_changes(a, b), add_changes(a, b))).__name__   # 18 x 70 > 1200
    'DenseDelta'
    """
    if first.shape() != second.shape():
        raise ValueError(f"cannot add weight changes of shapes {first.shape()} and {second.shape()}")
    out_f, in_f = first.shape()
    if isinstance(first, LowRankDelta) and isinstance(second, LowRankDelta) \
            and (first.rank + second.rank) * (out_f + in_f) <= out_f * in_f:
        return LowRankDelta(torch.cat([first.up, second.up.to(first.up)], 1),
                            torch.cat([first.down, second.down.to(first.down)], 1))
    dtype = first.up.dtype if isinstance(first, LowRankDelta) else first.weight.dtype
    return DenseDelta((matrix(first) + matrix(second)).to(dtype).contiguous())
