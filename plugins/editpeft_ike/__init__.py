"""IKE — In-Context Knowledge Editing.

Zheng, Li, Dong, Fan, Wu, Xu, Chang. "Can We Edit Factual Knowledge by In-Context Learning?",
EMNLP 2023 (arXiv:2305.12740).

IKE changes no parameter. For a new fact f = (s, r, o*) it builds a context C of k
demonstrations c_i = (f_i, x_i, y_i) and lets the frozen model M read it (§3):

    o* = argmax_o  P_M(o | [C; f; x])                                         (the edit)
    C = {c_1, ..., c_k},  c_i retrieved from a training corpus by k-NN:
        score(c_i) = cos(e(f), e(f_i)),  e = a sentence encoder (all-MiniLM-L6-v2, §3.2)

Three kinds of demonstration teach the model what to do with a new fact (§3.2):
*copy* (x_i is f_i's own prompt, y_i = o_i*), *update* (x_i a paraphrase of f_i's prompt,
y_i = o_i*: generalisation) and *retain* (x_i a prompt outside f_i's scope, y_i its original
answer: locality). Each is written as

    New Fact: {f_i}
    Prompt: {x_i} {y_i}

and the query as the same lines without the answer. Here the prompt starts its own line after
``Prompt:``, so the caller's tokens continue the prefix exactly as x_i continues it inside the
demonstrations (one tokenisation for both). Demonstrations are ordered least similar first, so the
most similar stands next to the query.

What editpeft makes of it:

* **The demonstration pool** is an editor built once, JSON only: ``editpeft train ike --data
  FILE --out DIR`` (zsRE or CounterFact train splits: a copy demonstration per training fact, up
  to ``per_case`` update and retain demonstrations), saved, fingerprinted and pushed like any
  editor (:mod:`editpeft.editors`).
* **An edit is a memory insertion** (one embedding, one k-NN over the pool's facts): the adapter
  holds the new facts, the embedding of each fact's prompt (its routing key) and the k
  demonstrations chosen for it (``kind_ratio`` of copy:update:retain, rounded to k).
* **A router** (:class:`~editpeft.RouterAdapter`) decides once per sequence and row: the stored
  fact whose prompt is nearest to the row's text (cosine of MiniLM embeddings) is prepended with
  its demonstrations, out of the caller's sight, for ``forward`` and every token of ``generate``.
  As in the paper every row gets a fact (``min_similarity=-1``); IKE relies on the retain
  demonstrations, not on a scope decision, for locality. Many edits share one adapter
  (``append=True``); a row sees only its nearest fact.
* **Context budget**: the prefix is cut (least similar demonstrations first) so that prefix +
  prompt + ``generation_room`` stays within ``max_context`` and the model's position limit.

Example:
    >>> editpeft.train_editor("ike", model, tok, "../shared/data/zsre/zsre_mend_train_1k.json",
    ...                       out="editors/ike")                                   # doctest: +SKIP
    >>> model.add_edit("ike", EditRequest(prompt="The Eiffel Tower is located in", target_new="Rome"),
    ...                name="facts", editor="editors/ike")                         # doctest: +SKIP
    >>> model.add_edit("ike", another, name="facts", append=True, editor="editors/ike")  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig
from editpeft.embeddings import EMBEDDING_DIM, embed, load_sentence_encoder
from editpeft.errors import EditError
from editpeft.method import check

from .adapter import IkeAdapter
from .pool import KINDS, DemonstrationPool, build_pool, fact_text

__all__ = ["Ike", "IkeConfig", "IkeAdapter", "DemonstrationPool"]

logger = logging.getLogger(__name__)


@dataclass
class IkeConfig(MethodConfig):
    k: int = field(default=16, metadata={"help": "demonstrations retrieved per fact (the paper: 32; "
                                                 "see the card for the measurement behind the default)"})
    kind_ratio: tuple[int, int, int] = field(default=(1, 3, 4), metadata={
        "help": "copy:update:retain proportions of the k demonstrations (largest remainders round them to k)"})
    max_context: int = field(default=1024, metadata={
        "help": "most tokens of demonstrations + fact + prompt + generation_room per row; the least similar "
                "demonstrations are dropped first (the model's position limit applies too)"})
    generation_room: int = field(default=64, metadata={"help": "positions kept free for generated tokens"})
    min_similarity: float = field(default=-1.0, metadata={
        "help": "rows whose nearest fact's prompt has a lower cosine similarity are left to the base model "
                "(-1: every row gets its nearest fact, as the paper)"})
    per_case: int = field(default=2, metadata={
        "help": "pool building: at most this many update and retain demonstrations per training case"})

    def validate(self) -> None:
        check(self.k >= 0, f"k must be >= 0, got {self.k}")
        check(len(self.kind_ratio) == 3 and all(r >= 0 for r in self.kind_ratio) and sum(self.kind_ratio) > 0,
              f"kind_ratio must be three non-negative ints (copy, update, retain), not all 0; got {self.kind_ratio}")
        check(self.max_context >= 16, f"max_context must be >= 16 tokens, got {self.max_context}")
        check(self.generation_room >= 0, f"generation_room must be >= 0, got {self.generation_room}")
        check(-1.0 <= self.min_similarity <= 1.0, f"min_similarity must be within [-1, 1], got {self.min_similarity}")
        check(self.per_case >= 0, f"per_case must be >= 0, got {self.per_case}")

    def quotas(self) -> dict[str, int]:
        """Demonstrations of each kind among k (largest-remainder rounding of ``kind_ratio``)."""
        total = sum(self.kind_ratio)
        exact = [self.k * r / total for r in self.kind_ratio]
        counts = [int(x) for x in exact]
        for i in sorted(range(3), key=lambda i: exact[i] - counts[i], reverse=True)[:self.k - sum(counts)]:
            counts[i] += 1
        return dict(zip(KINDS, counts))


class Ike(editpeft.EditMethod):
    """In-context editing: a router prepends retrieved demonstrations and the new fact."""

    name, kind, Config, adapter_class = "ike", "router", IkeConfig, IkeAdapter
    editor_class = DemonstrationPool
    requires_editor = True

    def init_editor(self, model, tokenizer, config: IkeConfig) -> DemonstrationPool:
        """An empty pool (no tensors, no targets): what a saved pool is checked against."""
        return DemonstrationPool(self.name, hparams=config.to_dict())

    def build_editor(self, model, tokenizer, cases, config: IkeConfig) -> DemonstrationPool:
        pool = build_pool(self.name, cases, per_case=config.per_case, hparams=config.to_dict())
        if not pool.facts:
            raise EditError("the training data gave no fact to build demonstrations from")
        missing = [k for k in KINDS if not any(d["kind"] == k for d in pool.demonstrations)]
        if missing and config.per_case:
            logger.warning("the IKE pool has no %s demonstrations (the data has no %s)",
                                           " or ".join(missing), "paraphrases or answered locality prompts")
        return pool

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: IkeConfig, *,
                editor: DemonstrationPool) -> IkeAdapter:
        empty = IkeAdapter(torch.zeros(0, EMBEDDING_DIM), [], [], method=self.name, hparams=config.to_dict(), requests=[],
                           targets=[])
        return self.extend(empty, model, tokenizer, requests, config, editor=editor)

    def extend(self, adapter: IkeAdapter, model, tokenizer, requests: Sequence[EditRequest], config: IkeConfig, *,
               editor: DemonstrationPool) -> IkeAdapter:
        """A new adapter with ``adapter``'s facts and ``requests``: per request, one embedding of its
        fact (retrieval) and of its prompt (routing key), and a k-NN over the pool."""
        if not isinstance(editor, DemonstrationPool):
            raise EditError(f"IKE edits with a demonstration pool (editpeft train ike); got {type(editor).__name__}")
        if config.k and not editor.facts:
            raise EditError("the demonstration pool is empty; build it from a training set with `editpeft train ike`")
        vectors = embed(load_sentence_encoder(), [fact_text(r.prompt, r.target_new) for r in requests]
                        + [r.prompt for r in requests]).cpu()
        facts, keys = vectors[:len(requests)], vectors[len(requests):]
        demos, chosen = list(adapter.demonstrations), list(adapter.chosen)
        where = {_demo_key(d): i for i, d in enumerate(demos)}
        pool_demos, pool_facts = editor.demonstrations, editor.facts
        quotas = config.quotas()
        for q in facts:
            picked = []
            for i, _ in (editor.retrieve(q, quotas) if config.k else []):
                d = pool_demos[i]
                entry = {"kind": d["kind"], "fact": pool_facts[d["fact"]], "prompt": d["prompt"], "answer": d["answer"]}
                key = _demo_key(entry)
                if key not in where:
                    where[key] = len(demos)
                    demos.append(entry)
                picked.append(where[key])
            chosen.append(picked)
        return IkeAdapter(torch.cat([adapter.keys, keys.float()]), demos, chosen, method=self.name,
                          hparams=config.to_dict(), requests=adapter.requests + list(requests), targets=[])


def _demo_key(d: dict) -> tuple[str, str, str, str]:
    return d["kind"], d["fact"], d["prompt"], d["answer"]
