"""The Hub model card (``README.md``) of an adapter folder."""
from __future__ import annotations

from typing import Any

import yaml


def render_model_card(config: dict[str, Any]) -> str:
    base = config.get("base_model") or {}
    front = {"library_name": "editpeft",
             "tags": ["editpeft", "knowledge-editing", config["method"]]}
    if base.get("name_or_path"):
        front["base_model"] = base["name_or_path"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {config.get('name') or config['method']} — a {config['method']} edit",
             "", f"An [editpeft](https://pypi.org/project/editpeft/) `{config['kind']}` adapter for "
             f"`{base.get('name_or_path')}` ({base.get('model_type')}).", "",
             "| subject | prompt | old | new |", "|---|---|---|---|"]
    for r in config["requests"]:
        cells = [r.get("subject") or "", r["prompt"], r.get("target_true") or "", r["target_new"]]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    lines += ["", "## Method and hyper-parameters", "", "```json"]
    import json
    lines += [json.dumps(config["hparams"], indent=2), "```", ""]
    if config.get("metrics"):
        lines += ["## Measured metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in config["metrics"].items()]
        lines.append("")
    lines += ["## Use", "", "```python", "import editpeft",
              "model, tokenizer = editpeft.load_default_model()  # or the base model above",
              "model = editpeft.enable_editing(model, tokenizer)",
              "model.load_edit(\"<this repo or folder>\")", "```", ""]
    return "\n".join(lines)
