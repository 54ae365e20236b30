"""Batched probe scoring shared by tests, benchmarks and (later) the harness.

- ``token_em``: teacher-forced token accuracy of a target (fraction of target tokens that are
  the argmax given the prompt and the preceding target tokens) — EasyEdit's definition.
- ``top1``: the greedy next token after each prompt (locality: compare before/after an edit).

Example:
    >>> token_em(model, tokenizer, ["The capital of France is"], ["Paris"])   # doctest: +SKIP
    [1.0]
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..tokens import TargetBatch, greedy_next_tokens


def token_em(model, tokenizer, prompts: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> list[float]:
    device = next(model.parameters()).device
    scores: list[float] = []
    for start in range(0, len(prompts), batch_size):
        batch = TargetBatch.build(tokenizer, prompts[start:start + batch_size],
                                  targets[start:start + batch_size], device=device)
        with torch.no_grad():
            logits = model(**batch.model_inputs()).logits
        for i, ids in enumerate(batch.target_ids):
            pred = logits[i, batch.target_positions(i).to(device)].argmax(-1)
            scores.append((pred == torch.tensor(ids, device=device)).float().mean().item())
    return scores


def top1(model, tokenizer, prompts: Sequence[str], batch_size: int = 32) -> list[int]:
    out: list[int] = []
    for start in range(0, len(prompts), batch_size):
        out.extend(greedy_next_tokens(model, tokenizer, list(prompts[start:start + batch_size])))
    return out
