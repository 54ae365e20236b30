"""Offline text corpora for activation statistics.

``pydoc`` is the English prose of CPython's own documentation (``pydoc_data.topics``, ~65k
words, present in every Python install); ``generated`` is text the model samples itself from
neutral starters; ``questions`` is text the model samples from question openings ("Who", "Which",
"In which year", ...): unrelated inputs in the form of a knowledge query, drawn from no dataset. The default was chosen by measurement (see ``cards/rome/llama.yaml``).
"""
from __future__ import annotations

import re
from typing import Iterator, Sequence

import torch


CORPORA = ("pydoc", "generated", "questions")

#: Openings of the ``questions`` corpus.
QUESTION_STARTERS = ("Who", "What", "When", "Where", "Which", "How many", "In which year", "What is the name of",
                     "Who was the", "Which country", "What kind of", "Where is the")


def pydoc_paragraphs() -> list[str]:
    from pydoc_data.topics import topics
    text = "\n\n".join(topics[k] for k in sorted(topics))
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in text.split("\n\n")]
    return [p for p in paragraphs if len(p.split()) >= 8]


def token_chunks(name: str, model, tokenizer, n_tokens: int, seq_len: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """Yield 1-D token tensors of at most ``seq_len`` tokens, ``n_tokens`` in total."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {CORPORA}")
    produced = 0
    if name == "pydoc":
        source = _pydoc_tokens(tokenizer, seq_len)
    else:
        starters = QUESTION_STARTERS if name == "questions" else GENERATED_STARTERS
        source = _generated_tokens(model, tokenizer, seq_len, seed, starters)
    for chunk in source:
        chunk = chunk[: n_tokens - produced]
        produced += len(chunk)
        yield chunk
        if produced >= n_tokens:
            return
    raise ValueError(f"corpus {name!r} has only {produced} tokens; ask for fewer (n_tokens={n_tokens})")


def _pydoc_tokens(tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    buffer: list[int] = []
    for p in pydoc_paragraphs():
        buffer.extend(tokenizer(p)["input_ids"])
        while len(buffer) >= seq_len:
            yield torch.tensor(buffer[:seq_len])
            buffer = buffer[seq_len:]


#: Openings of the ``generated`` corpus.
GENERATED_STARTERS = ("The", "In", "A", "It", "When", "This", "One", "People", "Today", "There")


def _generated_tokens(model, tokenizer, seq_len: int, seed: int, starters: Sequence[str],
                      batch: int = 16) -> Iterator[torch.Tensor]:
    from .tokens import pad_id, seeded_generate
    pad = pad_id(tokenizer)
    step = 0
    while True:
        prompts = [starters[(step * batch + i) % len(starters)] for i in range(batch)]
        (out,) = seeded_generate(model, tokenizer, [(prompts, seq_len)], seed=seed + step, top_k=50)
        for row in out:
            start = int((row != pad).int().argmax())        # drop the left padding of shorter openings
            yield row[start:start + seq_len].cpu()
        step += 1


def corpus_activations(model, tokenizer, module, name: str, n_tokens: int, *, seq_len: int = 128,
                       seed: int = 0) -> torch.Tensor:
    """``module``'s input at each of ``n_tokens`` tokens of corpus ``name``, as rows (n_tokens, d):
    the "other inputs" an edit must leave alone (T-Patcher's memory, WISE's irrelevant inputs).

    >>> rows = corpus_activations(model, tok, model.model.layers[3].mlp, "pydoc", 256)  # doctest: +SKIP
    """
    from .probe import activations_at
    from .tokens import model_device
    device = model_device(model)
    rows = []
    for chunk in token_chunks(name, model, tokenizer, n_tokens, seq_len=seq_len, seed=seed):
        ids = chunk[None].to(device)
        acts = activations_at(model, module, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        rows.append(acts.reshape(-1, acts.shape[-1]).float())
    return torch.cat(rows)
