"""A key-value codebook with deferral radii, attached at a module's output.

Each entry is (key k_i, value v_i, radius ε_i, label y_i). For every token position the module
input is the query q; if the nearest key satisfies |q − k_i| ≤ ε_i the module output at that
position is replaced by v_i, otherwise the module runs unchanged (GRACE's deferral mechanism).

Example:
    >>> book = Codebook.empty(d_in=4, d_out=3)
    >>> book, trainable = book.insert(torch.ones(4), label=7, eps_init=1.0, init_value=torch.zeros(3))
    >>> len(book), trainable
    (1, 0)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Codebook:
    keys: torch.Tensor    # (N, d_in)
    values: torch.Tensor  # (N, d_out)
    radii: torch.Tensor   # (N,)
    labels: torch.Tensor  # (N,) int64

    @classmethod
    def empty(cls, d_in: int, d_out: int) -> "Codebook":
        return cls(torch.zeros(0, d_in), torch.zeros(0, d_out), torch.zeros(0), torch.zeros(0, dtype=torch.long))

    @classmethod
    def checked(cls, keys: torch.Tensor, values: torch.Tensor, radii: torch.Tensor,
                labels: torch.Tensor) -> "Codebook":
        """A codebook from stored tensors, refused (ValueError) unless keys (N, d_in) and values
        (N, d_out) are finite floats, radii (N,) finite floats >= 0 and labels (N,) integers >= 0."""
        shapes = ", ".join(f"{n} {tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                           for n, t in zip(("keys", "values", "radii", "labels"), (keys, values, radii, labels)))
        n = keys.shape[0] if keys.ndim else -1
        if keys.ndim != 2 or values.ndim != 2 or radii.ndim != 1 or labels.ndim != 1 \
                or not (values.shape[0] == radii.shape[0] == labels.shape[0] == n):
            raise ValueError(f"a codebook needs keys (N, d_in), values (N, d_out), radii (N,), labels (N,); got {shapes}")
        floats = (keys, values, radii)
        if not all(t.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) for t in floats) \
                or labels.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"codebook keys, values and radii must be floats and labels integers; got {shapes}")
        if not all(bool(torch.isfinite(t).all()) for t in floats) or bool((radii < 0).any()):
            raise ValueError("codebook keys, values and radii must be finite and radii >= 0")
        if bool((labels < 0).any()):
            raise ValueError("codebook labels are token ids and must be >= 0")
        return cls(keys, values, radii, labels.long())

    def __len__(self) -> int:
        return self.keys.shape[0]

    def to(self, device) -> "Codebook":
        return Codebook(self.keys.to(device), self.values.to(device), self.radii.to(device), self.labels.to(device))

    def nearest(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(distance, index) of the nearest key for each query row (N must be > 0)."""
        dist = torch.cdist(queries.float(), self.keys.float())
        return dist.min(-1)

    def insert(self, key: torch.Tensor, label: int, eps_init: float, init_value: torch.Tensor) -> tuple["Codebook", int | None]:
        """GRACE's codebook update for a new (key, label). Returns the new codebook (self is not
        changed) and the index of an entry whose value must be trained, or None.

        - no entry within ε_i + ε_init: add (key, value, ε_init);
        - nearest entry has the same label: expand its radius to reach the key;
        - nearest entry has another label: split — both radii become d/2 and the key is added.
        """
        key = key.detach().float().cpu()
        if len(self):
            d, i = (t.item() for t in self.nearest(key[None]))
            i = int(i)
            if d <= self.radii[i].item() + eps_init:
                radii = self.radii.clone()
                if int(self.labels[i]) == label:
                    radii[i] = max(radii[i].item(), d)
                    return Codebook(self.keys, self.values, radii, self.labels), None
                radii[i] = d / 2
                return self._append(key, init_value, d / 2, label, radii), len(self)
        return self._append(key, init_value, eps_init, label, self.radii), len(self)

    def _append(self, key, value, radius, label, radii) -> "Codebook":
        return Codebook(torch.cat([self.keys, key[None]]),
                        torch.cat([self.values, value.detach().float().cpu()[None]]),
                        torch.cat([radii, torch.tensor([float(radius)])]),
                        torch.cat([self.labels, torch.tensor([int(label)])]))

    def replace(self, inputs: torch.Tensor, output: torch.Tensor, values: torch.Tensor | None = None) -> torch.Tensor:
        """``output`` with positions whose input falls inside a radius replaced by the value."""
        if not len(self):
            return output
        values = self.values if values is None else values
        flat = inputs.reshape(-1, inputs.shape[-1])
        dist, idx = self.nearest(flat)
        hit = dist <= self.radii[idx]
        if not bool(hit.any()):
            return output
        new = values[idx].to(output.dtype).reshape(output.shape)
        return torch.where(hit.reshape(*output.shape[:-1], 1), new, output)
