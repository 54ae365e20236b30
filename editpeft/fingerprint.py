"""Base-model fingerprints: a hash of the config and of the original weights an adapter touches.

Weights are hashed after rounding to bfloat16, so the same checkpoint loaded in float32 or
bfloat16 has the same fingerprint, while any real change of the weights changes it.

Example:
    >>> model_fingerprint(model, ["model.layers.7.mlp.down_proj"])    # doctest: +SKIP
    'sha256:5f0c...'
"""
from __future__ import annotations

import hashlib
import json
from typing import Callable, Iterable

import torch

# Config keys that describe how a model was loaded or saved, not what it computes.
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
             "quantization_config", "use_cache", "output_attentions", "output_hidden_states",
             "return_dict", "pad_token_id", "tokenizer_class", "chunk_size_feed_forward",
             "problem_type", "id2label", "label2id"}


def config_digest_source(config) -> str:
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE and not k.startswith("_")}
    return json.dumps(data, sort_keys=True, default=str)


def tensor_digest(h: "hashlib._Hash", tensor: torch.Tensor) -> None:
    t = tensor.detach().to("cpu", torch.bfloat16).contiguous()
    h.update(str(tuple(t.shape)).encode())
    h.update(t.view(torch.int16).numpy().tobytes())


def model_fingerprint(model, targets: Iterable[str],
                      weight_of: Callable[[str], torch.Tensor] | None = None) -> str:
    """``sha256:`` of the config plus the weights of the ``targets`` modules (sorted by name)."""
    h = hashlib.sha256()
    h.update(config_digest_source(model.config).encode())
    for name in sorted(set(targets)):
        h.update(name.encode())
        weight = weight_of(name) if weight_of else model.get_submodule(name).weight
        tensor_digest(h, weight)
    return "sha256:" + h.hexdigest()
