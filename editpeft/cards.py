"""Hyper-parameter cards: ``cards/<method>/<model_type>.yaml`` with defaults and measured results.

A card holds ``hparams`` (the defaults), ``tuned_on`` (the model they were chosen on, with its
depth) and ``results`` / ``sweep`` blocks written by the benchmarks. Cards are looked up in the
folders of ``$EDITPEFT_CARDS`` (``os.pathsep``-separated) and then in the built-in cards.

Example:
    >>> read_card(card_path("rome", "llama"))["tuned_on"]["name"]     # doctest: +SKIP
    'SmolLM2-135M-Instruct'
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ConfigError

logger = logging.getLogger(__name__)


def card_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("EDITPEFT_CARDS", "").split(os.pathsep) if p]
    spec = importlib.util.find_spec("editpeft_cards")
    if spec is not None and spec.origin:
        dirs.append(Path(spec.origin).parent)
    return dirs


def card_path(method: str, model_type: str) -> Path | None:
    for d in card_dirs():
        p = d / method / f"{model_type}.yaml"
        if p.is_file():
            return p
    return None


def read_card(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"card {str(path)!r} does not exist") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"card {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"card {str(path)!r} must be a mapping with an 'hparams' block")
    return data


def card_hparams(method: str, model, layer_fields: Iterable[str] = ()) -> dict[str, Any]:
    """The card's hparams for ``model``'s family, layer fields rescaled to the model's depth."""
    model_type = getattr(model.config, "model_type", None)
    path = card_path(method, model_type) if model_type else None
    if path is None:
        return {}
    card = read_card(path)
    hp = dict(card.get("hparams") or {})
    tuned_layers = (card.get("tuned_on") or {}).get("num_hidden_layers")
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    if tuned_layers and n_layers and tuned_layers != n_layers:
        for name in layer_fields:
            if isinstance(hp.get(name), list) and all(isinstance(x, int) for x in hp[name]):
                hp[name] = sorted({min(n_layers - 1, round(x * n_layers / tuned_layers)) for x in hp[name]})
                continue
            if isinstance(hp.get(name), int):
                scaled = min(n_layers - 1, round(hp[name] * n_layers / tuned_layers))
                logger.info("card %s tuned %s=%d on %d layers; using %d for this %d-layer model",
                            path, name, hp[name], tuned_layers, scaled, n_layers)
                hp[name] = scaled
    return hp
