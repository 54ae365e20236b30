"""IKE's demonstration pool: copy, update and retain demonstrations built from a training set,
retrieved by sentence-embedding similarity of their facts to a new fact.

The pool is an editor without tensors (saved as JSON only, see :mod:`editpeft.editors`): its
``extra`` holds ``facts`` (the training facts, "prompt target_new") and ``demonstrations`` (one
object per demonstration: ``kind``, ``fact`` (an index into ``facts``), ``prompt``, ``answer``).
The facts' embeddings are computed once per pool object, on first use.

Example:
    >>> pool = build_pool(cases, per_case=2)                                     # doctest: +SKIP
    >>> pool.retrieve("The Eiffel Tower is in Rome", quotas={"copy": 1, "update": 3, "retain": 4})  # doctest: +SKIP
    [17, 254, ...]
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from editpeft.editors import Editor
from editpeft.embeddings import embed, load_sentence_encoder
from editpeft.errors import EditorFormatError

#: The three kinds of demonstration (Zheng et al. 2023, §3.2).
KINDS = ("copy", "update", "retain")


def fact_text(prompt: str, target: str) -> str:
    """A fact as one sentence: the prompt continued by its target."""
    return f"{prompt} {target}"


class DemonstrationPool(Editor):
    """IKE's editor: demonstrations as JSON, their facts' embeddings computed lazily."""

    def __init__(self, method: str, tensors: Mapping[str, torch.Tensor] | None = None, **kwargs: Any):
        super().__init__(method, tensors or {}, **kwargs)
        self._fact_embeddings: tuple[str, torch.Tensor] | None = None      # (content sha256, embeddings)

    @property
    def facts(self) -> list[str]:
        return list(self.extra.get("facts") or [])

    @property
    def demonstrations(self) -> list[dict[str, Any]]:
        return list(self.extra.get("demonstrations") or [])

    def validate(self) -> None:
        """Refuse a pool whose JSON is not well formed (tensors: none allowed)."""
        super().validate()
        if self.tensors:
            raise EditorFormatError(f"an IKE demonstration pool holds no tensors, got {sorted(self.tensors)[:5]}")
        facts, demos = self.extra.get("facts", []), self.extra.get("demonstrations", [])
        if not isinstance(facts, list) or not all(isinstance(f, str) and f.strip() for f in facts):
            raise EditorFormatError("the pool's 'facts' must be a list of non-empty strings; build it again")
        if not isinstance(demos, list):
            raise EditorFormatError("the pool's 'demonstrations' must be a list; build it again")
        for i, d in enumerate(demos):
            ok = (isinstance(d, dict) and d.get("kind") in KINDS and isinstance(d.get("fact"), int)
                  and not isinstance(d.get("fact"), bool) and 0 <= d["fact"] < len(facts)
                  and all(isinstance(d.get(k), str) and d[k].strip() for k in ("prompt", "answer")))
            if not ok:
                raise EditorFormatError(f"demonstration {i} of the pool is malformed ({str(d)[:120]}); it needs kind "
                                        f"in {KINDS}, a fact index < {len(facts)}, and non-empty prompt and answer")

    def fact_embeddings(self) -> torch.Tensor:
        """(len(facts), 384) unit embeddings of the facts, computed on first use (and again only
        when the content changes)."""
        sha = self.sha256
        if self._fact_embeddings is None or self._fact_embeddings[0] != sha:
            self._fact_embeddings = (sha, embed(load_sentence_encoder(), self.facts).cpu())
        return self._fact_embeddings[1]

    def retrieve(self, query: torch.Tensor, quotas: Mapping[str, int]) -> list[tuple[int, float]]:
        """(demonstration index, similarity) of the demonstrations whose facts are nearest (cosine)
        to the unit embedding ``query``: ``quotas[kind]`` of each kind, least similar first."""
        sims = self.fact_embeddings() @ query.to(torch.float32).cpu()
        order = torch.argsort(sims, descending=True, stable=True).tolist()
        by_fact: dict[int, list[int]] = {}
        for i, d in enumerate(self.demonstrations):
            by_fact.setdefault(d["fact"], []).append(i)
        left, chosen = dict(quotas), []
        demos = self.demonstrations
        for f in order:
            if not any(left.values()):
                break
            for i in by_fact.get(f, ()):
                kind = demos[i]["kind"]
                if left.get(kind, 0) > 0:
                    left[kind] -= 1
                    chosen.append((i, float(sims[f])))
        return sorted(chosen, key=lambda t: t[1])


def build_pool(method: str, cases: Sequence[Any], *, per_case: int, hparams: Mapping[str, Any]) -> DemonstrationPool:
    """A pool from training ``cases`` (:class:`~editpeft.evaluation.cases.EvalCase`): per case, a copy
    demonstration of its fact, up to ``per_case`` update demonstrations (its paraphrases answered
    by the new target) and up to ``per_case`` retain demonstrations (its locality prompts with
    their own answers; probes without an answer are skipped)."""
    facts: list[str] = []
    demos: list[dict[str, Any]] = []
    for case in cases:
        for r in case.requests:
            f = len(facts)
            facts.append(fact_text(r.prompt, r.target_new))
            demos.append({"kind": "copy", "fact": f, "prompt": r.prompt, "answer": r.target_new})
            for p in case.generalization[:per_case]:
                demos.append({"kind": "update", "fact": f, "prompt": p.prompt, "answer": r.target_new})
            retain = [p for probes in case.locality.values() for p in probes if p.answers and p.answers[0].strip()]
            for p in retain[:per_case]:
                demos.append({"kind": "retain", "fact": f, "prompt": p.prompt, "answer": p.answers[0]})
    pool = DemonstrationPool(method, hparams=dict(hparams), extra={"facts": facts, "demonstrations": demos})
    pool.validate()
    return pool
