"""Per-model caches kept on an editable model's edit state: explicit, typed, in one place.

Each cache is a field with one meaning; plugins that derive tensors from the model (AlphaEdit's
null-space projector) use :meth:`ModelCaches.derived_tensor` under their own namespace. Nothing
here is written to disk (the disk cache of statistics lives in :mod:`editpeft.stats`).

Example:
    >>> caches = ModelCaches()
    >>> caches.derived_tensor("demo", 1, lambda: torch.ones(2)).tolist()
    [1.0, 1.0]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch


@dataclass
class StatsCounters:
    """How often statistics came from memory, from disk, or were computed."""

    memory_hits: int = 0
    disk_hits: int = 0
    computed: int = 0


@dataclass
class ModelCaches:
    """What editpeft remembers about one model between edits (all derived from its original weights)."""

    #: hash of the config and every original weight (see :func:`editpeft.stats.weights_fingerprint`)
    weights_fingerprint: str | None = None
    #: sampled context prefixes, keyed by (lengths, seed)
    context_templates: dict[Hashable, list[str]] = field(default_factory=dict)
    #: second moments E[k kᵀ] of module inputs, keyed by the statistics' cache key
    second_moments: dict[str, torch.Tensor] = field(default_factory=dict)
    #: token chunks of a statistics corpus, keyed by (corpus, n_tokens, seq_len): a sampled corpus
    #: (``generated``, ``questions``) is sampled once, not once per module
    corpus_chunks: dict[Hashable, list[torch.Tensor]] = field(default_factory=dict)
    stats_counters: StatsCounters = field(default_factory=StatsCounters)
    #: tensors plugins derive from the above, keyed by (namespace, key)
    derived: dict[tuple[str, Hashable], torch.Tensor] = field(default_factory=dict)

    def derived_tensor(self, namespace: str, key: Hashable, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The tensor cached under ``(namespace, key)``, computed by ``compute()`` on first use."""
        slot = (namespace, key)
        if slot not in self.derived:
            self.derived[slot] = compute()
        return self.derived[slot]

    def clear(self) -> None:
        """Forget everything (e.g. after the base weights were changed outside editpeft)."""
        self.__init__()
