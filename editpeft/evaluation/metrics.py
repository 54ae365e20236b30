"""Scores of evaluation cases under named protocols.

Protocols (every number the harness writes carries one of these names):

- ``token_em`` — teacher-forced token accuracy: the fraction of the answer's tokens that are the
  model's argmax given the prompt and the answer's preceding tokens (EasyEdit's definition;
  multi-token answers are scored per token; with aliases, the best alias counts).
- ``gen_em`` — greedy generation begins with the answer: every answer token is the argmax, which
  is exactly what ``generate(do_sample=False)`` would emit (any alias counts).
- ``prob_margin`` — P(answer) > P(contrast) over the whole answer string (ROME's efficacy,
  paraphrase and neighbourhood scores); ``prob_margin_mean`` is the mean of
  log P(answer) - log P(contrast) in nats. Only defined where a probe has a contrast.

Metrics: ``reliability`` (edited prompts), ``generalization`` (rephrasings), ``portability`` and
``portability/<kind>``, ``locality`` / ``locality/<kind>`` — agreement with the unedited model's
own predictions (token_em: same argmax at each answer token, EasyEdit's locality; gen_em: same
greedy continuation; prob_margin: same sign of the margin) — and ``locality_answer`` /
``locality_answer/<kind>`` — correctness against the dataset's locality answers.

Example:
    >>> scorer = CaseScorer(model, tokenizer)                                   # doctest: +SKIP
    >>> before = scorer.baseline(cases)          # unedited model, once per case  # doctest: +SKIP
    >>> scorer.score(cases, before)[0]["reliability"]["token_em"]               # doctest: +SKIP
    1.0
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..tokens import pad_id, target_token_ids
from .cases import EvalCase, Probe
from .prefix import PrefixStates, attached_floor
from .scoring import BranchScore, greedy_continuations, record_states, score_branches

PROTOCOLS = ("token_em", "prob_margin", "gen_em")
FLUENCY = "ngram_entropy"

#: Greedy tokens compared for locality probes that have no answer to fix the length.
DEFAULT_GREEDY_TOKENS = 3


@dataclass
class _Plan:
    """Which branches of a scored item belong to which answer."""

    case: int
    group: str
    probe: Probe
    aliases: list[list[int]]
    contrast: list[int] | None
    greedy: list[int] | None      # the unedited model's greedy continuation (locality only)

    def branches(self) -> list[list[int]]:
        out = list(self.aliases)
        if self.contrast is not None:
            out.append(self.contrast)
        if self.greedy is not None:
            out.append(self.greedy)
        return out

    def split(self, scores: list[BranchScore]):
        k = len(self.aliases)
        aliases, rest = scores[:k], scores[k:]
        contrast = rest.pop(0) if self.contrast is not None else None
        greedy = rest.pop(0) if self.greedy is not None else None
        return aliases, contrast, greedy


def _ids(tokenizer, prompt: str, text: str) -> list[int]:
    return target_token_ids(tokenizer, prompt, text)


def _is_locality(group: str) -> bool:
    return group.startswith("locality/")


def _probe_key(group: str, index: int) -> str:
    return f"{group}#{index}"


class CaseScorer:
    """Scores cases in few packed forward passes; see the module docstring for the definitions.

    ``baseline(cases)`` records what the unedited model does on every locality probe (call it
    with edits off, once per case); ``score(cases, baselines)`` then scores the edited model.
    """

    def __init__(self, model, tokenizer, protocols: Sequence[str] = PROTOCOLS,
                 greedy_tokens: int = DEFAULT_GREEDY_TOKENS, **score_kw: Any):
        unknown = set(protocols) - set(PROTOCOLS) - {FLUENCY}
        if unknown:
            raise ValueError(f"unknown protocol(s) {sorted(unknown)}; known: {', '.join(PROTOCOLS + (FLUENCY,))}")
        self.model, self.tokenizer = model, tokenizer
        self.protocols = [p for p in PROTOCOLS if p in protocols]
        self.fluency = FLUENCY in protocols
        self.greedy_tokens = greedy_tokens
        self.score_kw = score_kw
        #: unedited hidden states of the probes, kept by ``baseline`` and replayed by ``score`` from
        #: the first edited block (set by the harness: :mod:`editpeft.evaluation.prefix`); None: off
        self.prefix: PrefixStates | None = None

    # -- the unedited model ----------------------------------------------------------------------
    def baseline(self, cases: Sequence[EvalCase]) -> list[dict[str, Any]]:
        """Per case, per locality probe: the unedited model's argmax on the primary answer, its
        margin against the contrast, and its greedy continuation. JSON-serialisable."""
        plans, prompts, lengths = [], [], []
        for ci, case in enumerate(cases):
            for group, probes in case.groups().items():
                if not _is_locality(group):
                    continue
                for pi, probe in enumerate(probes):
                    plan = self._plan(ci, group, probe, greedy=None)
                    plan.aliases = plan.aliases[:1] or [[]]   # the primary answer is the greedy draft
                    plans.append((pi, plan))
                    prompts.append(probe.prompt)
                    lengths.append(len(plan.aliases[0]) or self.greedy_tokens)
        out: list[dict[str, Any]] = [{} for _ in cases]
        scores = score_branches(self.model, self.tokenizer, [(p.probe.prompt, p.branches()) for _, p in plans],
                                prefix=self.prefix, record=True, **self.score_kw) if plans else []
        greedy = self._greedy(prompts, [p.aliases[0] for _, p in plans], lengths, [sc[0] for sc in scores])
        for (pi, plan), sc, g in zip(plans, scores, greedy):
            aliases, contrast, _ = plan.split(sc)
            aliases = [a for a in aliases if a.tokens]
            primary = aliases[0] if aliases else None
            out[plan.case][_probe_key(plan.group, pi)] = {
                "argmax": primary.argmax[:len(primary.tokens)] if primary else None,
                "margin": (primary.total_logprob - contrast.total_logprob) if primary and contrast else None,
                "greedy": g,
            }
        if self.prefix is not None:      # every probe score() will run, from the kept block on
            record_states(self.model, self.tokenizer, [(p.probe.prompt, p.branches())
                                                       for _, _, p in self._scored_plans(cases, out)],
                          self.prefix, **self.score_kw)
        return out

    def _scored_plans(self, cases: Sequence[EvalCase], baselines: Sequence[dict[str, Any]]) -> list:
        """(probe index, baseline, plan) of every probe ``score`` scores, in order."""
        plans = []
        for ci, case in enumerate(cases):
            for group, probes in case.groups().items():
                for pi, probe in enumerate(probes):
                    base = baselines[ci].get(_probe_key(group, pi)) if _is_locality(group) else None
                    if _is_locality(group) and base is None:
                        raise ValueError(f"case {case.case_id}: no baseline for {group}#{pi}; "
                                         "call baseline() on the unedited model first")
                    plans.append((pi, base, self._plan(ci, group, probe, base["greedy"] if base else None)))
        return plans

    def _replayable_prefix(self) -> PrefixStates | None:
        """The kept states, when every attached edit writes at or above their block."""
        floor = attached_floor(self.model) if self.prefix is not None else None
        return self.prefix if floor is not None and floor >= self.prefix.layer else None

    def _greedy(self, prompts, drafts, lengths, verified) -> list[list[int]]:
        by_len: dict[int, list[int]] = defaultdict(list)
        for i, n in enumerate(lengths):
            by_len[n].append(i)
        out: list[list[int]] = [[] for _ in prompts]
        for n, idx in by_len.items():
            got = greedy_continuations(self.model, self.tokenizer, [prompts[i] for i in idx], n,
                                       drafts=[drafts[i] for i in idx], verified=[verified[i] for i in idx],
                                       **self.score_kw)
            for i, g in zip(idx, got):
                out[i] = g
        return out

    def _plan(self, ci: int, group: str, probe: Probe, greedy: list[int] | None) -> _Plan:
        tok = self.tokenizer
        aliases = [_ids(tok, probe.prompt, a) for a in probe.answers]
        contrast = _ids(tok, probe.prompt, probe.contrast) if probe.contrast else None
        return _Plan(ci, group, probe, aliases, contrast, greedy)

    # -- the edited model ------------------------------------------------------------------------
    def score(self, cases: Sequence[EvalCase], baselines: Sequence[dict[str, Any]]) -> list[dict[str, dict[str, float]]]:
        """Per case: ``{metric: {protocol: value}}`` (see the module docstring)."""
        plans = self._scored_plans(cases, baselines)
        scores = score_branches(self.model, self.tokenizer, [(p.probe.prompt, p.branches()) for _, _, p in plans],
                                prefix=self._replayable_prefix(), **self.score_kw)
        per_case: list[dict[str, list[dict[str, float]]]] = [defaultdict(list) for _ in cases]
        for (pi, base, plan), sc in zip(plans, scores):
            aliases, contrast, greedy = plan.split(sc)
            values = self._probe_values(aliases, contrast)
            if _is_locality(plan.group):
                kind = plan.group.split("/", 1)[1]
                if plan.aliases:
                    per_case[plan.case][f"locality_answer/{kind}"].append(values)
                per_case[plan.case][plan.group].append(self._agreement(aliases, contrast, greedy, base))
            else:
                per_case[plan.case][plan.group].append(values)
        out = []
        for groups in per_case:
            pooled: dict[str, list[dict[str, float]]] = defaultdict(list)
            for name, vals in groups.items():
                head = name.split("/", 1)[0]
                if head != name:
                    pooled[head].extend(vals)
            merged = {**{k: _mean_dicts(v) for k, v in groups.items()}, **{k: _mean_dicts(v) for k, v in pooled.items()}}
            out.append(dict(sorted(merged.items())))
        return out

    def _probe_values(self, aliases: list[BranchScore], contrast: BranchScore | None) -> dict[str, float]:
        v: dict[str, float] = {}
        if not aliases:
            return v
        if "token_em" in self.protocols:
            v["token_em"] = max(sum(a.matches()) / len(a.tokens) for a in aliases)
        if "gen_em" in self.protocols:
            v["gen_em"] = float(any(all(a.matches()) for a in aliases))
        if "prob_margin" in self.protocols and contrast is not None:
            margin = aliases[0].total_logprob - contrast.total_logprob
            v["prob_margin"] = float(margin > 0)
            v["prob_margin_mean"] = margin
        return v

    def _agreement(self, aliases, contrast, greedy: BranchScore, base: dict[str, Any]) -> dict[str, float]:
        v: dict[str, float] = {}
        if "token_em" in self.protocols:
            if aliases and base["argmax"] is not None:
                now = aliases[0].argmax[:len(base["argmax"])]
                v["token_em"] = sum(a == b for a, b in zip(now, base["argmax"])) / len(base["argmax"])
            else:   # no answer to teacher-force: compare along the unedited greedy continuation
                v["token_em"] = sum(greedy.matches()) / len(greedy.tokens)
        if "gen_em" in self.protocols:
            v["gen_em"] = float(all(greedy.matches()))
        if "prob_margin" in self.protocols and contrast is not None and base["margin"] is not None:
            now = aliases[0].total_logprob - contrast.total_logprob
            v["prob_margin"] = float((now > 0) == (base["margin"] > 0))
            v["prob_margin_mean"] = now - base["margin"]
        return v

    # -- fluency -----------------------------------------------------------------------------------
    def fluency_scores(self, cases: Sequence[EvalCase], max_new_tokens: int = 50) -> list[float | None]:
        """ROME's generation entropy of each case's generation prompts (None when it has none)."""
        out = []
        for case in cases:
            if not case.generation_prompts:
                out.append(None)
                continue
            texts = generate_texts(self.model, self.tokenizer, case.generation_prompts, max_new_tokens)
            out.append(sum(ngram_entropy(t) for t in texts) / len(texts))
        return out


def _mean_dicts(values: list[dict[str, float]]) -> dict[str, float]:
    sums: dict[str, list[float]] = defaultdict(list)
    for v in values:
        for k, x in v.items():
            sums[k].append(x)
    return {k: sum(xs) / len(xs) for k, xs in sums.items()}


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Iterable[int] = (2, 3), weights: Iterable[float] = (2 / 3, 4 / 3)) -> float:
    """ROME's fluency score: the weighted mean of the n-gram entropies (bits) of a text's words,
    bigrams weighted 2/3 and trigrams 4/3. Repetitive text scores low.

    >>> round(ngram_entropy("a b a b a b a b"), 3) < round(ngram_entropy("the cat sat on a warm mat today"), 3)
    True
    """
    words = _WORD.findall(text.lower())
    parts = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i:i + n]) for i in range(max(0, len(words) - n + 1)))
        total = sum(grams.values())
        h = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        parts.append(w * h)
    return sum(parts) / len(parts)


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 50) -> list[str]:
    """Greedy continuations (prompt included, as ROME scores them), left-padded for batching.
    Encoder-decoder models generate decoder text only; the prompt is prepended to it."""
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    side = tokenizer.padding_side
    tokenizer.padding_side = "right" if seq2seq else "left"
    try:
        if tokenizer.pad_token is None:
            enc = [tokenizer(p, return_tensors="pt") for p in prompts]
            outs = [model.generate(**{k: v.to(model.device) for k, v in e.items()}, max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=pad_id(tokenizer))[0] for e in enc]
            texts = [tokenizer.decode(o, skip_special_tokens=True) for o in outs]
        else:
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True).to(model.device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tokenizer))
            texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return [f"{p} {t}" for p, t in zip(prompts, texts)] if seq2seq else texts
