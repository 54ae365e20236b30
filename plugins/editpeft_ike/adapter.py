"""IKE's router adapter: the stored facts, their routing keys, and the demonstrations chosen for
each; per row of a batch it prepends the demonstrations and the nearest fact to the prompt.

Example:
    >>> adapter = model.add_edit("ike", request, editor="editors/ike")           # doctest: +SKIP
    >>> model.generate(**tok("Where is the Eiffel Tower?", return_tensors="pt"))  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch

import editpeft
from editpeft.embeddings import EMBEDDING_DIM, embed, load_sentence_encoder
from editpeft.errors import AdapterFormatError
from editpeft.routing import Prompts, Route
from editpeft.tokens import position_limit

from .pool import KINDS, fact_text

logger = logging.getLogger(__name__)

#: The paper's demonstration format, with the prompt on its own line so that the caller's tokens
#: continue the prefix exactly as the prompts continue it inside the demonstrations.
HEADER = "New Fact: {fact}\nPrompt:\n"
BODY = "{prompt} {answer}"
SEPARATOR = "\n\n"


class IkeAdapter(editpeft.RouterAdapter):
    """Tensors: ``keys`` (n facts, 384), the unit embeddings of the facts' prompts (routing).
    JSON: ``demonstrations`` (kind, fact, prompt, answer) and ``chosen`` (per fact, indices into
    ``demonstrations``, least similar first). The facts are the adapter's requests."""

    def __init__(self, keys: torch.Tensor, demonstrations: Sequence[dict[str, str]], chosen: Sequence[Sequence[int]],
                 **common: Any):
        super().__init__(**common)
        self.keys = keys
        self.demonstrations = [dict(d) for d in demonstrations]
        self.chosen = [list(c) for c in chosen]
        self._prefixes: dict[int, tuple[list[int], list[list[int]]]] = {}

    def __len__(self) -> int:
        return len(self.chosen)

    # -- serialisation ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "keys": self.keys}

    def extra_config(self) -> dict[str, Any]:
        return {"demonstrations": self.demonstrations, "chosen": self.chosen}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], **common: Any) -> "IkeAdapter":
        """Rebuild from a file that may come from anyone: shapes, indices and texts are checked."""
        keys, demos, chosen = tensors.get("keys"), extra.get("demonstrations"), extra.get("chosen")
        n = len(common.get("requests") or [])
        if keys is None or not keys.is_floating_point() or keys.shape != (n, EMBEDDING_DIM):
            raise AdapterFormatError(f"an IKE adapter needs 'keys' of shape ({n}, {EMBEDDING_DIM}) (one per fact), "
                                     f"got {None if keys is None else (tuple(keys.shape), keys.dtype)}")
        if not isinstance(demos, list) or not all(
                isinstance(d, dict) and d.get("kind") in KINDS
                and all(isinstance(d.get(k), str) and d[k] for k in ("fact", "prompt", "answer")) for d in demos):
            raise AdapterFormatError("the IKE adapter's 'demonstrations' must be objects with kind, fact, prompt and "
                                     "answer; the file is corrupt or was modified")
        if not isinstance(chosen, list) or len(chosen) != n or not all(
                isinstance(c, list) and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(demos)
                                            for i in c) for c in chosen):
            raise AdapterFormatError(f"the IKE adapter's 'chosen' must list, for each of its {n} facts, indices into "
                                     "its demonstrations; the file is corrupt or was modified")
        if not bool(torch.isfinite(keys).all()):
            raise AdapterFormatError("the IKE adapter's keys contain NaN or inf; the file is corrupt")
        return cls(keys.float(), demos, chosen, **common)

    def attach(self, state) -> None:
        self._prefixes = {}          # token ids depend on the model's tokenizer
        super().attach(state)

    # -- routing ------------------------------------------------------------------------------
    def decide(self, model, prompts: Prompts) -> list[Route | None]:
        """Per row: the nearest fact by cosine similarity of the row's text to the facts' prompts;
        its demonstrations and the fact are prepended (``min_similarity`` leaves far rows alone)."""
        if not len(self.chosen) or not len(prompts):
            return [None] * len(prompts)
        rows = embed(load_sentence_encoder(), prompts.texts()).cpu()
        sims = rows @ self.keys.to(rows.dtype).T
        best, index = sims.max(dim=1)
        limit = _context_limit(model.config, int(self.hparams["max_context"]))
        routes: list[Route | None] = []
        for row in range(len(prompts)):
            if float(best[row]) < float(self.hparams["min_similarity"]):
                routes.append(None)
                continue
            room = limit - len(prompts.tokens(row)) - int(self.hparams["generation_room"])
            prefix = self._prefix(prompts.tokenizer, int(index[row]), room)
            routes.append(Route(prefix=prefix, entry=int(index[row])) if prefix else None)
        return routes

    def _prefix(self, tokenizer, fact: int, room: int) -> tuple[int, ...]:
        """Demonstrations (most similar last) + the fact's header, at most ``room`` tokens: the
        least similar demonstrations are dropped first; () when not even the header fits."""
        if fact not in self._prefixes:
            def ids(text: str) -> list[int]:
                return tokenizer(text, add_special_tokens=False)["input_ids"]
            demos = [ids(HEADER.format(fact=d["fact"])) + ids(BODY.format(**d)) + ids(SEPARATOR)
                     for d in (self.demonstrations[i] for i in self.chosen[fact])]
            r = self.requests[fact]
            self._prefixes[fact] = (ids(HEADER.format(fact=fact_text(r.prompt, r.target_new))), demos)
        header, demos = self._prefixes[fact]
        if len(header) > room:
            logger.debug("IKE: no room for fact %d's header (%d tokens, room %d)", fact, len(header), room)
            return ()
        kept, used = [], len(header)
        for d in reversed(demos):                       # most similar first
            if used + len(d) > room:
                break
            kept.append(d)
            used += len(d)
        return tuple(t for d in reversed(kept) for t in d) + tuple(header)


def _context_limit(config, max_context: int) -> int:
    """The most tokens a row may take (prefix + prompt + generation room): ``max_context``, or the
    model's position table (or configured length) when that is shorter."""
    table = position_limit(config) or getattr(config, "max_position_embeddings", None)
    return int(table) if isinstance(table, int) and table < max_context else max_context
