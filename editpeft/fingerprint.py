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
import logging
from typing import Callable, Iterable

logger = logging.getLogger(__name__)

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


def base_model_record(model, fingerprint: str) -> dict:
    """What an adapter or editor records of the base model it was made on."""
    record = {"name_or_path": getattr(model.config, "_name_or_path", None) or getattr(model, "name_or_path", None),
              "model_type": model.config.model_type, "fingerprint": fingerprint}
    license_ = getattr(model, "editpeft_license", None)
    if license_:
        record["license"] = license_
    return record


def check_base_model(base: dict, model, actual_fingerprint: Callable[[], str], *, what: str, targets: Iterable[str],
                     allow_mismatch: bool, advice: str) -> None:
    """Refuse ``model`` unless it matches the recorded ``base`` (family, then fingerprint of
    ``targets``); with ``allow_mismatch`` a fingerprint mismatch is only logged. ``what`` names the
    artefact in messages ("adapter 'x'"); ``advice`` says what to do instead."""
    from .errors import BaseModelMismatchError
    model_type = model.config.model_type
    if not isinstance(base, dict) or not base.get("model_type") or not base.get("fingerprint"):
        raise BaseModelMismatchError(f"{what} records no base model (model type and fingerprint), so it cannot be "
                                     "checked against this model; it is corrupt or was modified. Save it again "
                                     "from the model it was made on")
    if base["model_type"] != model_type:
        raise BaseModelMismatchError(f"{what} was made for a {base['model_type']!r} model "
                                     f"({base.get('name_or_path')}); this model is {model_type!r}")
    expected, actual = base["fingerprint"], actual_fingerprint()
    if expected != actual:
        if not allow_mismatch:
            raise BaseModelMismatchError(
                f"{what} was made for base model {base.get('name_or_path')!r} with fingerprint {expected[:19]}..., "
                f"but this model's config/weights of {', '.join(targets)} give {actual[:19]}...; {advice}")
        logger.warning("using %s despite a base-model fingerprint mismatch", what)
