"""The Hub model card (``README.md``) of an adapter folder, and its check on load.

The card's YAML front matter (``library_name: editpeft``, ``base_model``, ``tags`` with the method
and ``knowledge-editing``, the base model's licence when known) is what the Hub indexes; it must
agree with ``edit_config.json``, and a card that contradicts it is refused on load.

Example:
    >>> text = render_model_card({"method": "rome", "kind": "weight_delta", "requests": [],
    ...                           "hparams": {}, "base_model": {"name_or_path": "org/base"}})
    >>> card_metadata(text)["base_model"]
    'org/base'
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import AdapterFormatError


def render_model_card(config: dict[str, Any]) -> str:
    base = config.get("base_model") or {}
    front: dict[str, Any] = {"library_name": "editpeft",
                             "tags": ["editpeft", "knowledge-editing", config["method"]]}
    if base.get("name_or_path"):
        front["base_model"] = base["name_or_path"]
    if base.get("license"):
        front["license"] = base["license"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {config.get('name') or config['method']} — a {config['method']} edit",
             "", f"An [editpeft](https://pypi.org/project/editpeft/) `{config['kind']}` adapter for "
             f"`{base.get('name_or_path')}` ({base.get('model_type')}).", "",
             "## Edited facts", "", "| subject | prompt | old | new |", "|---|---|---|---|"]
    for r in config["requests"]:
        cells = [r.get("subject") or "", r["prompt"], r.get("target_true") or "", r["target_new"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Method and hyper-parameters", "", f"Method `{config['method']}`"
              + (f" from `{config['plugin']['distribution']}` {config['plugin'].get('version')}"
                 if (config.get("plugin") or {}).get("distribution") else "") + ".", "", "```json",
              json.dumps(config["hparams"], indent=2), "```", ""]
    if config.get("metrics"):
        lines += ["## Measured metrics", "", "Measured with the editpeft evaluation harness; each name carries "
                  "its protocol.", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in config["metrics"].items()]
        lines.append("")
    lines += ["## Provenance", "", f"- editpeft {config.get('editpeft_version')}",
              f"- base-model fingerprint `{base.get('fingerprint')}`",
              f"- tensors sha256 `{config.get('tensors_sha256')}`"]
    if config.get("editor"):
        lines.append(f"- made with the trained editor `{config['editor'].get('id')}` "
                     f"(sha256 `{config['editor'].get('sha256')}`)")
    lines += ["", "## Use", "", "```python", "import editpeft",
              "model, tokenizer = editpeft.load_default_model()  # or the base model above",
              "model = editpeft.enable_editing(model, tokenizer)",
              "model.load_edit(\"<this repo or folder>\")", "```", ""]
    return "\n".join(lines)


def card_metadata(text: str) -> dict[str, Any]:
    """The YAML front matter of a model card ({} when there is none)."""
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        raise AdapterFormatError("the model card's YAML front matter is not closed by '---'")
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError as e:
        raise AdapterFormatError(f"the model card's YAML front matter is invalid ({e})") from None
    if data is not None and not isinstance(data, dict):
        raise AdapterFormatError("the model card's YAML front matter is not a mapping")
    return data or {}


def check_card(folder: Path, config: dict[str, Any]) -> None:
    """Refuse a README whose metadata contradicts ``edit_config.json`` (a tampered or mixed-up card)."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return
    meta = card_metadata(readme.read_text(encoding="utf-8", errors="replace"))
    if not meta:
        return
    problems = []
    if meta.get("library_name") not in (None, "editpeft"):
        problems.append(f"library_name is {meta['library_name']!r}, not 'editpeft'")
    base = (config.get("base_model") or {}).get("name_or_path")
    if meta.get("base_model") is not None and base and meta["base_model"] != base:
        problems.append(f"base_model is {meta['base_model']!r} but edit_config.json says {base!r}")
    tags = meta.get("tags") or []
    if tags and config["method"] not in tags:
        problems.append(f"tags {tags} do not name the method {config['method']!r}")
    if problems:
        raise AdapterFormatError(f"the model card of {str(folder)!r} contradicts its edit_config.json: "
                                 + "; ".join(problems) + ". Re-save the adapter to regenerate the card")
