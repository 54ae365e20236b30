"""Teacher-forced scoring of many continuations of many prompts in few forward passes.

Each item is a prompt with one or more *branches* (token-id continuations: the new target, the old
one, aliases, a greedy continuation to verify). Items are packed into rows without padding; the
branches of one prompt share its tokens through a tree-shaped 4-D attention mask with explicit
position ids, so a prompt is run once however many answers are scored after it. Packing makes the
tokenizer's padding side irrelevant; logits are computed only at the positions that are read.

When a model-level router edit is active (IKE, SERAC: they rewrite the input), items are scored
as plain right-padded sequences instead, one per branch, so the router sees ordinary inputs.

Encoder-decoder models (T5) score a branch as decoder labels: the prompt is the encoder's input,
``[decoder_start] + branch`` the decoder's, one right-padded row per branch.

Example:
    >>> scores = score_branches(model, tok, [("The capital of France is", [[ids_of_paris]])])  # doctest: +SKIP
    >>> scores[0][0].argmax[0] == ids_of_paris[0]                                             # doctest: +SKIP
    True
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from ..suffix import BlockSuffix
from ..tokens import decoder_start_id, model_device, pad_id, pad_rows
from .prefix import PrefixDone, PrefixStates, recording, replaying

logger = logging.getLogger(__name__)

Item = tuple[str, Sequence[Sequence[int]]]


@dataclass
class BranchScore:
    """``logprobs[i]``: log-probability of branch token i; ``argmax[i]``: the greedy token at the
    position predicting token i (``argmax[-1]`` is the greedy token after the whole branch)."""

    tokens: list[int]
    logprobs: list[float]
    argmax: list[int]

    @property
    def total_logprob(self) -> float:
        return float(sum(self.logprobs))

    def matches(self, limit: int | None = None) -> list[bool]:
        n = len(self.tokens) if limit is None else min(limit, len(self.tokens))
        return [self.argmax[i] == self.tokens[i] for i in range(n)]


@dataclass
class _Segment:
    item: int
    ids: list[int]               # prompt + all branches, concatenated
    positions: list[int]
    parent_end: list[int]        # token j may attend to tokens [0, parent_end[j]) of the prompt ...
    branch_start: list[int]      # ... and to tokens [branch_start[j], j] of its own branch
    prompt_len: int
    branches: list[tuple[int, int]]  # (start, length) of each branch within ids


def _segment(index: int, prompt_ids: list[int], branches: Sequence[Sequence[int]]) -> _Segment:
    p = len(prompt_ids)
    ids, pos = list(prompt_ids), list(range(p))
    parent_end, branch_start = list(range(1, p + 1)), [0] * p
    spans = []
    for b in branches:
        start = len(ids)
        spans.append((start, len(b)))
        ids.extend(int(t) for t in b)
        pos.extend(range(p, p + len(b)))
        parent_end.extend([p] * len(b))
        branch_start.extend([start] * len(b))
    return _Segment(index, ids, pos, parent_end, branch_start, p, spans)


def _pack(segments: list[_Segment], max_row_tokens: int) -> list[list[_Segment]]:
    """First-fit-decreasing packing of segments into rows of at most ``max_row_tokens``."""
    rows: list[list[_Segment]] = []
    sizes: list[int] = []
    for seg in sorted(segments, key=lambda s: -len(s.ids)):
        k = next((i for i, used in enumerate(sizes) if used + len(seg.ids) <= max_row_tokens), None)
        if k is None:
            rows.append([seg])
            sizes.append(len(seg.ids))
        else:
            rows[k].append(seg)
            sizes[k] += len(seg.ids)
    return rows


@dataclass
class _Row:
    segments: list[_Segment]
    offsets: list[int]
    ids: torch.Tensor        # (width,)
    positions: torch.Tensor  # (width,)
    allowed: torch.Tensor    # (width, width) bool
    read: list[int]          # positions whose logits are needed


def _build_row(segments: list[_Segment]) -> _Row:
    width = sum(len(s.ids) for s in segments)
    ids = torch.empty(width, dtype=torch.long)
    pos = torch.empty(width, dtype=torch.long)
    allowed = torch.zeros((width, width), dtype=torch.bool)
    offsets, read, off = [], [], 0
    for s in segments:
        n = len(s.ids)
        ids[off:off + n] = torch.tensor(s.ids)
        pos[off:off + n] = torch.tensor(s.positions)
        col, row = torch.arange(n)[None, :], torch.arange(n)[:, None]
        parent_end, branch_start = torch.tensor(s.parent_end)[:, None], torch.tensor(s.branch_start)[:, None]
        allowed[off:off + n, off:off + n] = (col < parent_end) | ((col >= branch_start) & (col <= row))
        offsets.append(off)
        read.append(off + s.prompt_len - 1)
        read.extend(off + start + i for start, n_b in s.branches for i in range(n_b))
        off += n
    return _Row(segments, offsets, ids, pos, allowed, read)


def _dtype(model) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _keeps_logits(model) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _has_router(model) -> bool:
    state = getattr(model, "_editpeft", None)
    return state is not None and bool(state.live_routers())


def _read_branches(seg: _Segment, logp_at, argmax_at, offset: int) -> list[BranchScore]:
    """Scores of a segment's branches from per-position log-probs / argmax at row offset ``offset``."""
    out = []
    last_prompt = offset + seg.prompt_len - 1
    for start, n in seg.branches:
        toks = seg.ids[start:start + n]
        preds = [last_prompt] + [offset + start + i for i in range(n)]
        out.append(BranchScore(toks, [logp_at(preds[i], toks[i]) for i in range(n)],
                               [argmax_at(q) for q in preds]))
    return out


def _key(seg: _Segment) -> tuple:
    """What a segment's hidden states depend on: its tokens and their tree layout."""
    return tuple(seg.ids), seg.prompt_len, tuple(seg.branches)


def _score_packed(model, segments: list[_Segment], max_row_tokens: int, rows_per_batch: int, pad: int,
                  prefix: PrefixStates | None = None, record: bool = False) -> dict[int, list[BranchScore]]:
    """Packed rows through the model. With ``prefix``: ``record`` keeps each segment's hidden state
    entering block ``prefix.layer``; otherwise segments whose states are kept run from that block
    only (see :mod:`editpeft.evaluation.prefix`)."""
    if prefix is None or record or not prefix.usable:
        keeping = record and prefix is not None and prefix.usable and not prefix.full
        return _run_rows(model, segments, max_row_tokens, rows_per_batch, pad, prefix if keeping else None,
                         replay=False)
    kept = [s for s in segments if _key(s) in prefix.states]
    rest = [s for s in segments if _key(s) not in prefix.states]
    out = _run_rows(model, kept, max_row_tokens, rows_per_batch, pad, prefix, replay=True) if kept else {}
    out.update(_run_rows(model, rest, max_row_tokens, rows_per_batch, pad, None, replay=False) if rest else {})
    return out


@torch.no_grad()
def _run_rows(model, segments: list[_Segment], max_row_tokens: int, rows_per_batch: int, pad: int,
              prefix: PrefixStates | None, replay: bool, states_only: bool = False) -> dict[int, list[BranchScore]]:
    """Scores of packed rows of ``segments``; with ``prefix``, ``replay`` runs them from its block
    (their states are kept), else their states are recorded — and, with ``states_only``, nothing
    else: each forward stops at the block (no scores are returned)."""
    device, dtype = model_device(model), _dtype(model)
    rows = [_build_row(r) for r in _pack(segments, max_row_tokens)]
    out: dict[int, list[BranchScore]] = {}
    for b0 in range(0, len(rows), rows_per_batch):
        group = rows[b0:b0 + rows_per_batch]
        width = max(len(r.ids) for r in group)
        ids = torch.full((len(group), width), pad, dtype=torch.long)
        pos = torch.zeros((len(group), width), dtype=torch.long)
        allowed = torch.eye(width, dtype=torch.bool).repeat(len(group), 1, 1)   # padding sees itself only
        for g, r in enumerate(group):
            n = len(r.ids)
            ids[g, :n], pos[g, :n], allowed[g, :n, :n] = r.ids, r.positions, r.allowed
        mask = torch.zeros((len(group), 1, width, width), dtype=dtype)
        mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
        keep = sorted({q for r in group for q in r.read})
        inputs = dict(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                      use_cache=False)
        if replay:
            logits = _replayed_logits(model, inputs, keep, group, prefix)
        elif prefix is not None:                       # record the states entering block prefix.layer
            seen: list[torch.Tensor] = []
            try:
                with recording(model, prefix, seen, stop=states_only):
                    logits = _logits(model, inputs, keep)
            except PrefixDone:
                pass
            for g, r in enumerate(group):
                for s, o in zip(r.segments, r.offsets):
                    prefix.keep(_key(s), seen[0][g, o:o + len(s.ids)])
            if states_only:
                continue
        else:
            logits = _logits(model, inputs, keep)
        logp = F.log_softmax(logits.float(), dim=-1)
        best = logp.argmax(-1).tolist()
        col = {q: i for i, q in enumerate(keep)}
        for g, r in enumerate(group):
            for s, o in zip(r.segments, r.offsets):
                out[s.item] = _read_branches(s, lambda q, t, g=g: float(logp[g, col[q], t]),
                                             lambda q, g=g: best[g][col[q]], o)
    return out


def _logits(model, inputs: dict, keep: list[int]) -> torch.Tensor:
    if _keeps_logits(model):
        return model(**inputs, logits_to_keep=torch.tensor(keep, device=inputs["input_ids"].device)).logits
    return model(**inputs).logits[:, keep]


def _replayed_logits(model, inputs: dict, keep: list[int], group: list[_Row], prefix: PrefixStates) -> torch.Tensor:
    """Logits of a group of rows whose segments' states are kept, from block ``prefix.layer`` on;
    the first replay of ``prefix`` is compared with the full forward (then dropped if it differs)."""
    B, width = inputs["input_ids"].shape
    first = next(iter(prefix.states.values()))
    hidden = torch.zeros((B, width, first.shape[-1]), dtype=first.dtype, device=first.device)
    for g, r in enumerate(group):
        for s, o in zip(r.segments, r.offsets):
            hidden[g, o:o + len(s.ids)] = prefix.states[_key(s)]
    with replaying(model, prefix, hidden):
        logits = _logits(model, inputs, keep)
    if prefix.verified is None:
        full = _logits(model, inputs, keep)
        # only the logits a row reads are compared: a shorter row's padding columns (read by a longer
        # row) carry zeros in the replay and the pad token's own states in the full pass
        col = {q: i for i, q in enumerate(keep)}
        rows = torch.tensor([g for g, r in enumerate(group) for q in r.read])
        cols = torch.tensor([col[q] for r in group for q in r.read])
        prefix.verified = BlockSuffix.reproduces(logits[rows, cols], full[rows, cols])
        if not prefix.verified:
            logger.warning("scoring from block %d does not reproduce the model's logits; scoring with the whole "
                           "model instead", prefix.layer)
            prefix.clear()
            return full
    prefix.replayed += sum(len(r.segments) for r in group)
    return logits


@torch.no_grad()
def _score_padded(model, segments: list[_Segment], batch_size: int, pad: int) -> dict[int, list[BranchScore]]:
    """One right-padded sequence per branch: for models whose forward must see ordinary inputs."""
    device = model_device(model)
    flat = []
    for s in segments:
        prompt = s.ids[:s.prompt_len]
        for k, (start, n) in enumerate(s.branches or [(s.prompt_len, 0)]):
            flat.append((s, k, prompt + s.ids[start:start + n], n))
    out: dict[int, list[BranchScore]] = {s.item: [None] * len(s.branches) for s in segments}
    for b0 in range(0, len(flat), batch_size):
        chunk = flat[b0:b0 + batch_size]
        width = max(len(seq) for _, _, seq, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (_, _, seq, _) in enumerate(chunk):
            ids[i, :len(seq)] = torch.tensor(seq)
            mask[i, :len(seq)] = 1
        logp = F.log_softmax(model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float(), -1)
        best = logp.argmax(-1)
        for i, (s, k, seq, n) in enumerate(chunk):
            if not s.branches:
                continue
            single = _Segment(s.item, seq, [], [], [], s.prompt_len, [(s.prompt_len, n)])
            out[s.item][k] = _read_branches(single, lambda q, t: float(logp[i, q, t]),
                                            lambda q: int(best[i, q]), 0)[0]
    return out


@torch.no_grad()
def _score_seq2seq(model, segments: list[_Segment], batch_size: int, pad: int) -> dict[int, list[BranchScore]]:
    """Encoder-decoder models: the prompt to the encoder, ``[start] + branch`` to the decoder, whose
    logits at position i predict branch token i (position ``len(branch)``: the token after it)."""
    device, start = model_device(model), decoder_start_id(model)
    flat = []
    for s in segments:
        for k, (b0, n) in enumerate(s.branches or [(s.prompt_len, 0)]):
            flat.append((s, k, s.ids[:s.prompt_len], s.ids[b0:b0 + n]))
    flat.sort(key=lambda f: (len(f[2]), len(f[3])))    # similar lengths share a batch: less padding
    out: dict[int, list[BranchScore]] = {s.item: [None] * len(s.branches) for s in segments}
    for c0 in range(0, len(flat), batch_size):
        chunk = flat[c0:c0 + batch_size]
        enc_ids, enc_mask = pad_rows([p for _, _, p, _ in chunk], pad)
        dec_ids, dec_mask = pad_rows([[start] + b for _, _, _, b in chunk], pad)
        logits = model(input_ids=enc_ids.to(device), attention_mask=enc_mask.to(device),
                       decoder_input_ids=dec_ids.to(device), decoder_attention_mask=dec_mask.to(device),
                       use_cache=False).logits
        logp = F.log_softmax(logits.float(), dim=-1)
        best = logp.argmax(-1).tolist()
        for i, (s, k, _, b) in enumerate(chunk):
            if s.branches:
                out[s.item][k] = BranchScore(list(b), [float(logp[i, j, t]) for j, t in enumerate(b)],
                                             best[i][:len(b) + 1])
    return out


def score_branches(model, tokenizer, items: Sequence[Item], *, max_row_tokens: int = 512,
                   rows_per_batch: int = 4, batch_size: int = 32, packed: bool | None = None,
                   prefix: PrefixStates | None = None, record: bool = False) -> list[list[BranchScore]]:
    """Teacher-forced scores of every branch of every ``(prompt, branches)`` item, in input order.

    ``packed=None`` packs unless a router edit is active; ``True``/``False`` force a path (tests
    check that both give the same numbers). Encoder-decoder models always take their own path
    (the branches as decoder labels) and ignore ``packed`` and ``max_row_tokens``.

    ``prefix`` (packed path only): with ``record=True`` the passes keep each item's hidden states
    entering block ``prefix.layer``; without, items whose states are kept run from that block on
    (:mod:`editpeft.evaluation.prefix`; the caller guarantees nothing below it has changed).
    """
    segments, where = [], []
    for i, (prompt, branches) in enumerate(items):
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        if not prompt_ids:
            raise ValueError(f"prompt {prompt!r} tokenizes to nothing")
        unique = _unique(branches)                                                  # score repeats once
        where.append([unique.index([int(t) for t in b]) for b in branches])
        segments.append(_segment(i, prompt_ids, unique))
    pad = pad_id(tokenizer)
    if getattr(model.config, "is_encoder_decoder", False):
        by_item = _score_seq2seq(model, segments, batch_size, pad)
        return [[by_item[i][k] for k in where[i]] for i in range(len(items))]
    if packed is None:
        packed = not _has_router(model)
    by_item = (_score_packed(model, segments, max_row_tokens, rows_per_batch, pad, prefix, record) if packed
               else _score_padded(model, segments, batch_size, pad))
    return [[by_item[i][k] for k in where[i]] for i in range(len(items))]


def record_states(model, tokenizer, items: Sequence[Item], prefix: PrefixStates, *, max_row_tokens: int = 512,
                  rows_per_batch: int = 4, **_: object) -> None:
    """Keep in ``prefix`` the hidden states entering its block for every ``(prompt, branches)`` item
    not kept yet, running only the blocks below it (the items can then be scored from there)."""
    if not prefix.usable or prefix.full or getattr(model.config, "is_encoder_decoder", False):
        return
    segments = [_segment(i, list(tokenizer(p)["input_ids"]), _unique(branches)) for i, (p, branches) in enumerate(items)]
    missing = list({_key(s): s for s in segments if _key(s) not in prefix.states}.values())
    if missing:
        _run_rows(model, missing, max_row_tokens, rows_per_batch, pad_id(tokenizer), prefix, replay=False,
                  states_only=True)


def _unique(branches: Sequence[Sequence[int]]) -> list[list[int]]:
    """The distinct branches in first-seen order (a repeated answer is scored once)."""
    return [list(b) for b in dict.fromkeys(tuple(int(t) for t in b) for b in branches)]


def greedy_continuations(model, tokenizer, prompts: Sequence[str], length: int,
                         drafts: Sequence[Sequence[int]] | None = None,
                         verified: Sequence[BranchScore] | None = None, **kw) -> list[list[int]]:
    """The greedy continuation of ``length`` tokens after each prompt.

    Decoding verifies a draft (for example the expected answer) in one teacher-forced pass and
    keeps the longest agreeing prefix plus the model's own next token, so a prompt whose greedy
    output is the draft costs one pass; every further pass adds at least one token. ``verified``
    passes scores of the drafts already computed by the caller, saving the first pass.
    """
    current = [list(d)[:length] for d in drafts] if drafts is not None else [[] for _ in prompts]
    done = [None] * len(prompts)
    pending = list(range(len(prompts)))
    first = list(verified) if verified is not None else None
    while pending:
        if first is not None:   # the caller already scored the drafts
            scores, first = [[first[i]] for i in pending], None
        else:
            scores = score_branches(model, tokenizer, [(prompts[i], [current[i]]) for i in pending], **kw)
        still = []
        for i, (score,) in zip(pending, scores):
            agree = score.matches()
            m = agree.index(False) if False in agree else len(agree)
            greedy = current[i][:m] + [score.argmax[m]]
            if len(greedy) >= length:
                done[i] = greedy[:length]
            else:
                current[i] = greedy
                still.append(i)
        pending = still
    return done
