"""Tokenisation shared by every method: prompts + targets as padded, teacher-forced batches.

A :class:`TargetBatch` has two forms behind one interface. The causal form holds
``prompt + target`` in one sequence; the seq2seq form (encoder-decoder models) feeds the prompt
to the encoder and ``[decoder_start] + target`` to the decoder, teacher forced. Methods written
against ``model_inputs()``, ``target_positions()``, ``target_logprobs()``, ``target_nll()``,
``last_prompt`` and ``decoder_ids`` work with both; :meth:`TargetBatch.for_model` picks the form.

Example:
    >>> batch = TargetBatch.for_model(model, tok, ["The capital of France is"], ["Rome"])   # doctest: +SKIP
    >>> nll = batch.target_nll(model(**batch.model_inputs()).logits)                       # doctest: +SKIP
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from .errors import UnsupportedModelError


def target_token_ids(tokenizer, prompt: str, target: str) -> list[int]:
    """Token ids of ``target`` as a continuation of ``prompt`` (a space joins them)."""
    text = target.strip()
    if prompt and not prompt[-1].isspace():
        text = " " + text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenizes to nothing")
    return list(ids)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (a pad id of 0 is a valid id)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def decoder_start_id(model) -> int:
    """The id an encoder-decoder model starts decoding from (``config.decoder_start_token_id``,
    else the generation config's)."""
    for cfg in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        tid = getattr(cfg, "decoder_start_token_id", None)
        if tid is not None:
            return int(tid)
    raise UnsupportedModelError("this encoder-decoder model has no decoder_start_token_id; set "
                                "model.config.decoder_start_token_id (T5 uses its pad id, 0)")


def pad_rows(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the matching attention mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def _last_token_before(offsets: Sequence[tuple[int, int]], char_end: int) -> int:
    """Index of the last real token that starts before character ``char_end``."""
    best = -1
    for i, (s, e) in enumerate(offsets):
        if e > s and s < char_end:
            best = i
    if best < 0:
        raise ValueError("no token covers the requested characters")
    return best


@dataclass
class TargetBatch:
    """A right-padded batch of prompts with teacher-forced targets, causal or seq2seq.

    Causal form: ``input_ids`` row i is ``prompt + target``; ``prompt_len[i]`` is the number of
    prompt tokens, the target tokens sit at positions ``prompt_len[i] .. prompt_len[i] +
    len(target_ids[i]) - 1`` and are predicted by the logits one position earlier.

    Seq2seq form (``decoder_input_ids`` set): ``input_ids`` row i is the prompt (the encoder's
    input, ``prompt_len[i]`` tokens) and ``decoder_input_ids`` row i is ``[decoder_start] +
    target``; target token j is predicted by the decoder's logits at position j.

    Either way ``target_positions(i)`` are the positions of the logits (and of the hidden states
    of the stack that predicts the target, whose ids are ``decoder_ids``) that predict row i's
    target, and ``subject_last[i]`` is the position in ``input_ids`` of the subject's last token
    (-1 when no subject span was given).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: list[int]
    target_ids: list[list[int]]
    subject_last: list[int]
    decoder_input_ids: torch.Tensor | None = None
    decoder_attention_mask: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, tokenizer, prompts: Sequence[str], targets: Sequence[str | None] | None = None,
                  subject_spans: Sequence[tuple[int, int] | None] | None = None,
                  device: torch.device | str | None = None) -> "TargetBatch":
        """The form ``model`` needs (seq2seq when ``config.is_encoder_decoder``), on ``device``
        (default: the model's).

        >>> batch = TargetBatch.for_model(t5, tok, ["The capital of France is"], ["Paris"])  # doctest: +SKIP
        >>> sorted(batch.model_inputs())                                                      # doctest: +SKIP
        ['attention_mask', 'decoder_attention_mask', 'decoder_input_ids', 'input_ids']
        """
        device = device if device is not None else model_device(model)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return cls.build_seq2seq(tokenizer, prompts, targets, subject_spans,
                                     decoder_start=decoder_start_id(model), device=device)
        batch = cls.build(tokenizer, prompts, targets, subject_spans, device=device)
        _check_positions(model, batch, prompts)
        return batch

    @staticmethod
    def _encode(tokenizer, prompts, targets, subject_spans):
        targets = list(targets) if targets is not None else [None] * len(prompts)
        spans = list(subject_spans) if subject_spans is not None else [None] * len(prompts)
        if len(targets) != len(prompts) or len(spans) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts, {len(targets)} targets and {len(spans)} subject spans; "
                             "pass one of each per prompt")
        prompt_ids, tids, subj = [], [], []
        for prompt, target, span in zip(prompts, targets, spans):
            enc = tokenizer(prompt, return_offsets_mapping=span is not None)
            prompt_ids.append(list(enc["input_ids"]))
            tids.append(target_token_ids(tokenizer, prompt, target) if target is not None else [])
            subj.append(_last_token_before(enc["offset_mapping"], span[1]) if span is not None else -1)
        return prompt_ids, tids, subj

    @classmethod
    def build(cls, tokenizer, prompts: Sequence[str], targets: Sequence[str | None] | None = None,
              subject_spans: Sequence[tuple[int, int] | None] | None = None,
              device: torch.device | str | None = None) -> "TargetBatch":
        """The causal form (``prompt + target`` in one sequence)."""
        prompt_ids, tids, subj = cls._encode(tokenizer, prompts, targets, subject_spans)
        input_ids, mask = pad_rows([p + t for p, t in zip(prompt_ids, tids)], pad_id(tokenizer))
        if device is not None:
            input_ids, mask = input_ids.to(device), mask.to(device)
        return cls(input_ids, mask, [len(p) for p in prompt_ids], tids, subj)

    @classmethod
    def build_seq2seq(cls, tokenizer, prompts: Sequence[str], targets: Sequence[str | None] | None = None,
                      subject_spans: Sequence[tuple[int, int] | None] | None = None, *, decoder_start: int,
                      device: torch.device | str | None = None) -> "TargetBatch":
        """The seq2seq form: prompts to the encoder, ``[decoder_start] + target`` to the decoder."""
        prompt_ids, tids, subj = cls._encode(tokenizer, prompts, targets, subject_spans)
        pad = pad_id(tokenizer)
        input_ids, mask = pad_rows(prompt_ids, pad)
        dec_ids, dec_mask = pad_rows([[int(decoder_start)] + t for t in tids], pad)
        if device is not None:
            input_ids, mask, dec_ids, dec_mask = (t.to(device) for t in (input_ids, mask, dec_ids, dec_mask))
        return cls(input_ids, mask, [len(p) for p in prompt_ids], tids, subj, dec_ids, dec_mask)

    def prefixed(self, prefixes: Sequence[Sequence[int]], pad: int) -> "TargetBatch":
        """The causal batch with token ids ``prefixes[i]`` before row i (what a router that prepends
        tokens feeds a model); prompt lengths and subject positions shift accordingly.

        >>> b = TargetBatch.build(tok, ["Paris is in"], ["France"]).prefixed([[5, 6]], pad=0)  # doctest: +SKIP
        """
        if self.is_seq2seq:
            raise ValueError("prefixed() builds causal batches; prepend to a seq2seq prompt before encoding it")
        rows = [list(map(int, p)) + self.input_ids[i, : self.prompt_len[i] + len(self.target_ids[i])].tolist()
                for i, p in enumerate(prefixes)]
        ids, mask = pad_rows(rows, pad)
        shift = [len(p) for p in prefixes]
        return TargetBatch(ids.to(self.input_ids.device), mask.to(self.input_ids.device),
                           [n + k for n, k in zip(self.prompt_len, shift)], self.target_ids,
                           [s + k if s >= 0 else s for s, k in zip(self.subject_last, shift)])

    @property
    def is_seq2seq(self) -> bool:
        return self.decoder_input_ids is not None

    @property
    def decoder_ids(self) -> torch.Tensor:
        """The ids whose positions index the logits and the hidden states where the targets are
        predicted: ``decoder_input_ids`` (seq2seq) or ``input_ids`` (causal). Use it to shape
        activations captured in the predicting stack, e.g. ``as_btd(acts, batch.decoder_ids)``."""
        return self.decoder_input_ids if self.decoder_input_ids is not None else self.input_ids

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of the model's forward."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.decoder_input_ids is not None:
            out.update(decoder_input_ids=self.decoder_input_ids, decoder_attention_mask=self.decoder_attention_mask)
        return out

    def select(self, rows: Sequence[int]) -> "TargetBatch":
        """The sub-batch of ``rows`` (same form, same padding width)."""
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        pick = (lambda t: None if t is None else t[idx])
        return TargetBatch(self.input_ids[idx], self.attention_mask[idx], [self.prompt_len[j] for j in rows],
                           [self.target_ids[j] for j in rows], [self.subject_last[j] for j in rows],
                           pick(self.decoder_input_ids), pick(self.decoder_attention_mask))

    @property
    def last_prompt(self) -> list[int]:
        """Per row, the position (in ``decoder_ids``) whose logits predict the first target token:
        the last prompt token (causal) or the decoder start (seq2seq, always 0)."""
        if self.is_seq2seq:
            return [0] * len(self.prompt_len)
        return [p - 1 for p in self.prompt_len]

    def target_positions(self, row: int) -> torch.Tensor:
        """Positions (in ``decoder_ids``) whose logits predict row ``row``'s target tokens."""
        start = self.last_prompt[row]
        return torch.arange(start, start + len(self.target_ids[row]))

    def target_logprobs(self, logits: torch.Tensor, kept: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Per row, the log-probabilities of each target token (teacher forced). ``kept`` names
        the absolute positions ``logits`` covers when it was computed at some positions only."""
        col = {p: j for j, p in enumerate(kept)} if kept is not None else None
        out = []
        for i, t_ids in enumerate(self.target_ids):
            if not t_ids:
                out.append(logits.new_zeros(0))
                continue
            pos = self.target_positions(i).tolist()
            pos = torch.tensor([col[p] for p in pos] if col else pos, device=logits.device)
            logp = F.log_softmax(logits[i, pos].float(), dim=-1)
            out.append(logp.gather(-1, torch.tensor(t_ids, device=logits.device)[:, None])[:, 0])
        return out

    def target_nll(self, logits: torch.Tensor, rows: Sequence[int] | None = None,
                   kept: Sequence[int] | None = None) -> torch.Tensor:
        """Mean over ``rows`` (default: rows with a target) of the mean per-token target NLL."""
        lps = self.target_logprobs(logits, kept)
        rows = [i for i, t in enumerate(self.target_ids) if t] if rows is None else rows
        return torch.stack([-lps[i].mean() for i in rows]).mean()

    def target_where(self) -> torch.Tensor:
        """(n, 2) long tensor of (row, position) for every target token of every row, row by row:
        where to take logits that :meth:`flat_target_nll` scores."""
        pairs = [(i, int(p)) for i, t in enumerate(self.target_ids) if t for p in self.target_positions(i)]
        return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)

    def flat_target_nll(self, logits: torch.Tensor) -> torch.Tensor:
        """:meth:`target_nll` for logits (n, vocab) taken at :meth:`target_where` only: the mean
        over rows with a target of each row's mean target-token NLL."""
        rows = [i for i, t in enumerate(self.target_ids) if t]
        ids = torch.tensor([t for i in rows for t in self.target_ids[i]], device=logits.device)
        row_of = torch.tensor([k for k, i in enumerate(rows) for _ in self.target_ids[i]], device=logits.device)
        nll = -F.log_softmax(logits.float(), -1).gather(-1, ids[:, None])[:, 0]
        per_row = torch.zeros(len(rows), device=logits.device).index_add(0, row_of, nll)
        return (per_row / torch.bincount(row_of, minlength=len(rows))).mean()


def position_limit(config) -> int | None:
    """The longest sequence a model can read when its positions are a fixed table (GPT-2's and
    GPT-J's ``n_positions``, OPT's learned ``max_position_embeddings``); None for rotary or
    relative positions, which extend past the configured length."""
    if isinstance(getattr(config, "n_positions", None), int):
        return config.n_positions
    if getattr(config, "model_type", None) == "opt":
        return getattr(config, "max_position_embeddings", None)
    return None


#: Room left for what methods put before a prompt (ROME's and MEMIT's sampled context prefixes).
PREFIX_ROOM = 16


def check_lengths(model, tokenizer, requests) -> None:
    """Refuse requests whose prompt and target (plus :data:`PREFIX_ROOM`) do not fit a model with
    a fixed position table, before any method runs."""
    from .errors import InvalidRequestError
    limit = position_limit(getattr(model, "config", None))
    if limit is None:
        return
    for r in requests:
        for prompt in (r.prompt, *r.paraphrases):
            n = len(tokenizer(prompt)["input_ids"]) + len(target_token_ids(tokenizer, prompt, r.target_new))
            if n + PREFIX_ROOM > limit:
                raise InvalidRequestError(f"prompt {prompt[:60]!r}... is {n} tokens with its target; this model reads "
                                          f"{limit} positions and methods add up to {PREFIX_ROOM} before the prompt: "
                                          "shorten the prompt")


def _check_positions(model, batch: "TargetBatch", prompts: Sequence[str]) -> None:
    from .errors import InvalidRequestError
    limit = position_limit(getattr(model, "config", None))
    if limit is None or batch.input_ids.shape[1] <= limit:
        return
    lengths = batch.attention_mask.sum(-1).tolist()
    row = max(range(len(lengths)), key=lambda i: lengths[i])
    raise InvalidRequestError(f"prompt {prompts[row][:60]!r}... is {int(lengths[row])} tokens with its target, more than "
                              f"the {limit} positions this model reads; shorten the prompt")


def next_token_logits(model, tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    """Logits of the token following each prompt (seq2seq: the first decoded token), shape
    (len(prompts), vocab)."""
    batch = TargetBatch.for_model(model, tokenizer, prompts, device=device)
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    idx = torch.tensor(batch.last_prompt, device=logits.device)
    return logits[torch.arange(len(prompts), device=logits.device), idx]


def greedy_next_tokens(model, tokenizer, prompts: Sequence[str]) -> list[int]:
    """The greedy next token id after each prompt."""
    return next_token_logits(model, tokenizer, prompts).argmax(-1).tolist()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG seeded with ``seed``, inside a fork of the random state (the
    CPU's, and every CUDA device's when ``device`` is CUDA, since ``manual_seed`` seeds them all):
    the caller's global RNG is left exactly as it was."""
    forked = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed)
        yield


def seeded_generate(model, tokenizer, batches: Sequence[tuple[Sequence[str], int]], *, seed: int,
                    top_k: int) -> list[torch.Tensor]:
    """Top-k samples for each ``(prompts, max_new_tokens)`` batch (left-padded), drawn one batch
    after the other from one random stream seeded with ``seed``: reproducible from the seed.

    The seed is applied inside a fork of the random state (the CPU's, and every CUDA device's when
    the model is on CUDA, since ``manual_seed`` seeds them all), so the caller's global RNG is left
    exactly as it was. Returns each batch's ``generate`` ids (prompt + continuation).
    """
    device = model_device(model)
    out = []
    with seeded_rng(seed, device), torch.no_grad():
        for prompts, max_new_tokens in batches:
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
            out.append(model.generate(**enc, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                                      pad_token_id=pad_id(tokenizer)))
    return out


def cache_kwarg(model) -> str:
    """The keyword a model's ``forward`` takes its KV cache by: ``cache`` since transformers 5.24,
    ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def cache_in(inputs_or_output: Any) -> Any:
    """The KV cache in a forward's keyword arguments or in its output, under either name
    (see :func:`cache_kwarg`; callers' own decoding loops may still pass ``past_key_values``)."""
    get = inputs_or_output.get if isinstance(inputs_or_output, Mapping) else (
        lambda k: getattr(inputs_or_output, k, None))
    cache = get("cache")
    return cache if cache is not None else get("past_key_values")
