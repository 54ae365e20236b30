"""Cached activation statistics: the second moment ``C = E[k k^T]`` of a module's inputs.

ROME, MEMIT and AlphaEdit all need ``C`` of the MLP output projection's input (the "keys").
It is computed once per (model fingerprint, module, corpus, token count) with a progress bar,
stored as safetensors under ``$EDITPEFT_CACHE/stats`` and memoised on the model's edit state,
so every method and every edit reuses it. The forward pass stops right after the module.

Example:
    >>> C = second_moment(model, tokenizer, "model.layers.7.mlp.down_proj")   # doctest: +SKIP
    >>> C.shape
    torch.Size([1536, 1536])
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from contextlib import nullcontext
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic import atomic_file
from .probe import activations_at, as_btd
from .corpus import token_chunks
from .caches import StatsCounters
from .errors import EditOptimizationError
from .fingerprint import config_digest_source, tensor_digest
from .paths import cache_root
from .tokens import pad_id

logger = logging.getLogger(__name__)


def _state(model):
    return getattr(model, "_editpeft", None)


def counters(model) -> StatsCounters:
    state = _state(model)
    if state is None:
        return StatsCounters()
    return state.caches.stats_counters


def weights_fingerprint(model) -> str:
    """Hash of the config and all original weights (memoised on the edit state)."""
    state = _state(model)
    if state is not None and state.caches.weights_fingerprint is not None:
        return state.caches.weights_fingerprint
    h = hashlib.sha256(config_digest_source(model.config).encode())
    for name, param in sorted(model.named_parameters()):
        module_name = name.rsplit(".", 1)[0]
        if state is not None and name.endswith(".weight") and module_name in state.slots:
            param = state.original_weight(module_name)
        h.update(name.encode())
        tensor_digest(h, param)
    digest = h.hexdigest()
    if state is not None:
        state.caches.weights_fingerprint = digest
    return digest


def second_moment(model, tokenizer, module_name: str, *, corpus: str = "pydoc", n_tokens: int = 40_000,
                  seq_len: int = 128, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """``E[k k^T]`` (float32, on CPU) over the inputs ``k`` of ``module_name`` on ``corpus``."""
    key_src = json.dumps({"model": weights_fingerprint(model), "module": module_name, "corpus": corpus,
                          "n_tokens": n_tokens, "seq_len": seq_len, "version": 1}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
    state, count = _state(model), counters(model)
    if state is not None and key in state.caches.second_moments:
        count.memory_hits += 1
        return state.caches.second_moments[key]
    path = cache_root() / "stats" / f"{key}.safetensors"
    if path.is_file():
        mom2 = load_file(str(path))["mom2"]
        count.disk_hits += 1
    else:
        mom2 = _compute(model, tokenizer, module_name, corpus, n_tokens, seq_len, batch_size, progress)
        if not torch.isfinite(mom2).all():
            raise EditOptimizationError(f"the activation statistics of {module_name!r} are not finite: the "
                                        "model produces NaN/inf; nothing was cached and the model was left unchanged")
        _save_atomic(path, mom2, {"module": module_name, "corpus": corpus, "n_tokens": str(n_tokens),
                                  "seq_len": str(seq_len), "model": getattr(model.config, "_name_or_path", "")})
        count.computed += 1
    if state is not None:
        state.caches.second_moments[key] = mom2
    return mom2


def precompute(model, tokenizer, module_names: Sequence[str], *, corpus: str = "pydoc", n_tokens: int = 40_000,
               progress: bool = True) -> list[dict]:
    """Compute (or find in the cache) the statistics of each module; one row per module with
    ``module``, ``source`` ("computed", "disk" or "memory") and ``seconds``.

    Example:
        >>> rows = precompute(model, tok, ["model.layers.3.mlp.down_proj"])   # doctest: +SKIP
        >>> rows[0]["source"]
        'computed'
    """
    rows = []
    for name in module_names:
        before = dataclasses.replace(counters(model))
        start = time.perf_counter()
        second_moment(model, tokenizer, name, corpus=corpus, n_tokens=n_tokens, progress=progress)
        after = counters(model)
        source = ("computed" if after.computed > before.computed else
                  "disk" if after.disk_hits > before.disk_hits else "memory")
        rows.append({"module": name, "source": source, "seconds": time.perf_counter() - start})
    return rows


def _compute(model, tokenizer, module_name, corpus, n_tokens, seq_len, batch_size, progress) -> torch.Tensor:
    module = model.get_submodule(module_name)
    device = next(model.parameters()).device
    state = _state(model)
    total, seen = None, 0
    ctx = state.disabled() if state is not None else nullcontext()
    with ctx, torch.no_grad():
        chunks = _corpus_chunks(model, tokenizer, corpus, n_tokens, seq_len)
        bar = tqdm(total=n_tokens, desc=f"stats {module_name}", unit="tok", disable=not progress, leave=False)
        for start in range(0, len(chunks), batch_size):
            group = chunks[start:start + batch_size]
            width = max(len(c) for c in group)
            ids = torch.full((len(group), width), pad_id(tokenizer), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, c in enumerate(group):
                ids[i, : len(c)], mask[i, : len(c)] = c, 1
            acts = activations_at(model, module, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
            keys = as_btd(acts, ids)[mask.to(device).bool()].double()
            total = keys.T @ keys if total is None else total + keys.T @ keys
            seen += keys.shape[0]
            bar.update(keys.shape[0])
    bar.close()
    return (total / seen).float().cpu()


def _corpus_chunks(model, tokenizer, corpus: str, n_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """The corpus's token chunks, kept on the model's caches: a corpus the model samples itself is
    sampled once for all the modules whose statistics use it (the caller turns the edits off, so it
    is the base model's text, as the statistics' cache key says)."""
    state = _state(model)
    if state is None:
        return list(token_chunks(corpus, model, tokenizer, n_tokens, seq_len))
    key = (corpus, n_tokens, seq_len)
    if key not in state.caches.corpus_chunks:
        state.caches.corpus_chunks[key] = list(token_chunks(corpus, model, tokenizer, n_tokens, seq_len))
    return state.caches.corpus_chunks[key]


def _save_atomic(path, tensor: torch.Tensor, metadata: dict[str, str]) -> None:
    with atomic_file(path) as tmp:
        save_file({"mom2": tensor.contiguous()}, tmp, metadata=metadata)
