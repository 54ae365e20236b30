"""Model cards (``README.md``): the adapter folder's card and its check on load, and the parts
every editpeft card shares (YAML front matter with the common tags, the table of edited facts),
used also by the merged-model card (:mod:`editpeft.merge`) and the LoRA export's card
(:mod:`editpeft.lora_export`).

The adapter card's YAML front matter (``library_name: editpeft``, ``base_model``, ``tags`` with the method
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
from typing import Any, Iterable, Sequence

import yaml

from .errors import AdapterFormatError
from .safe_paths import adapter_file

#: The tags every editpeft card carries; each kind of card adds its own (method, "merged", "lora").
COMMON_TAGS = ("editpeft", "knowledge-editing")


def front_matter(library_name: str, extra_tags: Sequence[str], *, base_model: str | None = None,
                 license: str | None = None) -> list[str]:
    """The card's YAML front matter lines (``---`` to ``---``) with the common tags first."""
    front: dict[str, Any] = {"library_name": library_name, "tags": [*COMMON_TAGS, *extra_tags]}
    if base_model:
        front["base_model"] = base_model
    if license:
        front["license"] = license
    return ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---"]


def table_row(cells: Iterable[Any]) -> str:
    """One Markdown table row; a ``|`` inside a cell is escaped."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def facts_table(facts: Iterable[tuple[Sequence[Any], Any]], lead_columns: Sequence[str] = ()) -> list[str]:
    """The table of edited facts: one row per ``(lead_cells, request)``; a request is an
    :class:`~editpeft.request.EditRequest` or its ``to_dict()`` form, ``lead_cells`` fill
    ``lead_columns`` (e.g. the edit's name and method)."""
    header = [*lead_columns, "subject", "prompt", "old", "new"]
    lines = [table_row(header), "|" + "---|" * len(header)]
    for lead, r in facts:
        r = r if isinstance(r, dict) else r.to_dict()
        lines.append(table_row([*lead, r.get("subject") or "", r["prompt"], r.get("target_true") or "",
                                r["target_new"]]))
    return lines


def adapters_facts_table(adapters: Iterable[Any]) -> list[str]:
    """The facts table of several edits, each row led by its edit's name and method."""
    return facts_table((([a.name or "", a.method], r) for a in adapters for r in a.requests),
                       lead_columns=["edit", "method"])


def render_model_card(config: dict[str, Any]) -> str:
    base = config.get("base_model") or {}
    lines = front_matter("editpeft", [config["method"]], base_model=base.get("name_or_path"),
                         license=base.get("license"))
    lines += ["", f"# {config.get('name') or config['method']} — a {config['method']} edit",
             "", f"An [editpeft](https://pypi.org/project/editpeft/) `{config['kind']}` adapter for "
             f"`{base.get('name_or_path')}` ({base.get('model_type')}).", "",
             "## Edited facts", ""]
    lines += facts_table(((), r) for r in config["requests"])
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
    front = text[3:end]
    if len(front) > MAX_FRONT_MATTER:
        raise AdapterFormatError(f"the model card's YAML front matter is {len(front):,} characters long "
                                 f"(editpeft reads at most {MAX_FRONT_MATTER:,}); regenerate the card")
    try:
        _check_plain_yaml(front)
        data = yaml.safe_load(front)
    except yaml.YAMLError as e:
        raise AdapterFormatError(f"the model card's YAML front matter is invalid ({str(e)[:200]})") from None
    if data is not None and not isinstance(data, dict):
        raise AdapterFormatError("the model card's YAML front matter is not a mapping")
    return data or {}


#: Limits on a card's YAML front matter: its length, and the number of parser events (an
#: alias-free document has at most a few events per character, so this bounds the work).
MAX_FRONT_MATTER = 64 * 1024
MAX_YAML_EVENTS = 20_000
#: Largest README read when checking a card.
MAX_CARD_BYTES = 4 * 1024 * 1024


def _check_plain_yaml(front: str) -> None:
    """Refuse anchors/aliases (they expand exponentially) and documents over the event limit,
    before anything is built from the YAML; parsing events is linear in the text."""
    for count, event in enumerate(yaml.parse(front, Loader=yaml.SafeLoader)):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            raise AdapterFormatError("the model card's YAML front matter uses anchors/aliases, which editpeft "
                                     "cards never contain; regenerate the card")
        if count > MAX_YAML_EVENTS:
            raise AdapterFormatError(f"the model card's YAML front matter has more than {MAX_YAML_EVENTS:,} "
                                     "elements; regenerate the card")


def read_card(folder: Path) -> str | None:
    """The folder's README text (None when there is none), refused when it is a link out of the
    folder or larger than :data:`MAX_CARD_BYTES`."""
    readme = adapter_file(Path(folder), "README.md", AdapterFormatError, "the adapter folder")
    if not readme.is_file():
        return None
    if readme.stat().st_size > MAX_CARD_BYTES:
        raise AdapterFormatError(f"{readme} is larger than editpeft reads ({MAX_CARD_BYTES:,} bytes); regenerate "
                                 "the card by saving the adapter again")
    return readme.read_text(encoding="utf-8", errors="replace")


def check_card(folder: Path, config: dict[str, Any], text: str | None | type(...) = ...) -> None:
    """Refuse a README whose metadata contradicts ``edit_config.json`` (a tampered or mixed-up
    card); ``text`` is the README already read (default: read it from ``folder``)."""
    text = read_card(folder) if text is ... else text
    if text is None:
        return
    meta = card_metadata(text)
    if not meta:
        return
    problems = []
    if meta.get("library_name") not in (None, "editpeft"):
        problems.append(f"library_name is {meta['library_name']!r}, not 'editpeft'")
    base = (config.get("base_model") or {}).get("name_or_path") or None
    if meta.get("base_model") is not None and meta["base_model"] != base:
        problems.append(f"base_model is {meta['base_model']!r} but edit_config.json says {base!r}")
    tags = meta.get("tags") or []
    if not isinstance(tags, list):
        problems.append(f"tags is {type(tags).__name__}, not a list")
    elif tags and config["method"] not in tags:
        problems.append(f"tags {tags} do not name the method {config['method']!r}")
    if problems:
        raise AdapterFormatError(f"the model card of {str(folder)!r} contradicts its edit_config.json: "
                                 + "; ".join(problems) + ". Re-save the adapter to regenerate the card")
