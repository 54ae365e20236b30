"""Tokenisation shared by every method: prompts + targets as padded, teacher-forced batches.

Example:
    >>> batch = TargetBatch.build(tok, ["The capital of France is"], ["Rome"])   # doctest: +SKIP
    >>> nll = batch.target_nll(model(**batch.model_inputs()).logits)             # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


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
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


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
    """A right-padded batch of ``prompt + target`` sequences.

    ``prompt_len[i]`` is the number of prompt tokens of row i; the target tokens of row i sit at
    positions ``prompt_len[i] .. prompt_len[i] + len(targets[i]) - 1`` and are predicted by the
    logits one position earlier. ``subject_last[i]`` is the position of the subject's last token
    (or -1 when no subject span was given).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: list[int]
    target_ids: list[list[int]]
    subject_last: list[int]

    @classmethod
    def build(cls, tokenizer, prompts: Sequence[str], targets: Sequence[str | None] | None = None,
              subject_spans: Sequence[tuple[int, int] | None] | None = None,
              device: torch.device | str | None = None) -> "TargetBatch":
        targets = list(targets) if targets is not None else [None] * len(prompts)
        spans = list(subject_spans) if subject_spans is not None else [None] * len(prompts)
        rows, plens, tids, subj = [], [], [], []
        for prompt, target, span in zip(prompts, targets, spans):
            enc = tokenizer(prompt, return_offsets_mapping=span is not None)
            ids = list(enc["input_ids"])
            t_ids = target_token_ids(tokenizer, prompt, target) if target is not None else []
            rows.append(ids + t_ids)
            plens.append(len(ids))
            tids.append(t_ids)
            subj.append(_last_token_before(enc["offset_mapping"], span[1]) if span is not None else -1)
        width = max(len(r) for r in rows)
        pid = pad_id(tokenizer)
        input_ids = torch.full((len(rows), width), pid, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        if device is not None:
            input_ids, mask = input_ids.to(device), mask.to(device)
        return cls(input_ids, mask, plens, tids, subj)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}

    @property
    def last_prompt(self) -> list[int]:
        """Position of each row's last prompt token (whose logits predict the first target token)."""
        return [p - 1 for p in self.prompt_len]

    def target_positions(self, row: int) -> torch.Tensor:
        """Positions whose logits predict row ``row``'s target tokens."""
        start = self.prompt_len[row] - 1
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


def next_token_logits(model, tokenizer, prompts: Sequence[str], device=None) -> torch.Tensor:
    """Logits of the token following each prompt, shape (len(prompts), vocab)."""
    batch = TargetBatch.build(tokenizer, prompts, device=device or model_device(model))
    with torch.no_grad():
        logits = model(**batch.model_inputs()).logits
    idx = torch.tensor(batch.last_prompt, device=logits.device)
    return logits[torch.arange(len(prompts), device=logits.device), idx]


def greedy_next_tokens(model, tokenizer, prompts: Sequence[str]) -> list[int]:
    """The greedy next token id after each prompt."""
    return next_token_logits(model, tokenizer, prompts).argmax(-1).tolist()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def seeded_generate(model, tokenizer, batches: Sequence[tuple[Sequence[str], int]], *, seed: int,
                    top_k: int) -> list[torch.Tensor]:
    """Top-k samples for each ``(prompts, max_new_tokens)`` batch (left-padded), drawn one batch
    after the other from one random stream seeded with ``seed``: reproducible from the seed.

    The seed is applied inside a fork of the random state (the CPU's, and every CUDA device's when
    the model is on CUDA, since ``manual_seed`` seeds them all), so the caller's global RNG is left
    exactly as it was. Returns each batch's ``generate`` ids (prompt + continuation).
    """
    device = model_device(model)
    forked = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    out = []
    with torch.random.fork_rng(devices=forked), torch.no_grad():
        torch.manual_seed(seed)
        for prompts, max_new_tokens in batches:
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left").to(device)
            out.append(model.generate(**enc, do_sample=True, top_k=top_k, max_new_tokens=max_new_tokens,
                                      pad_token_id=pad_id(tokenizer)))
    return out
