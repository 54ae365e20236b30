"""Bake a stack of weight-delta edits into a plain model folder, for serving without editpeft.

The in-memory model is unchanged afterwards (the edits are unmerged again); the folder is a
normal ``transformers`` checkpoint whose README lists every edit it contains.

Example:
    >>> save_merged(model, tokenizer, "merged/eiffel")     # all active edits   # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("merged/eiffel")                    # doctest: +SKIP
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from .card import adapters_facts_table, front_matter
from .errors import EditError


def save_merged(model, tokenizer, out_dir: str | Path, names: Sequence[str] | None = None) -> Path:
    """Merge the edits ``names`` (default: every active edit) into the weights and save the model."""
    state = model.edit_state
    if names is not None and (isinstance(names, (str, bytes, dict)) or not isinstance(names, Iterable)):
        raise EditError(f"names must be a list of edit names (or None for every active edit), got "
                        f"{type(names).__name__}")
    names = list(names) if names is not None else [n for n, a in state.edits.items() if a.active]
    for n in names:
        if not isinstance(n, str):
            raise EditError(f"an edit name is a string, got {type(n).__name__}")
    if not names:
        raise EditError("there is no edit to merge; load or add edits first")
    adapters = []
    for n in names:
        if n not in state.edits:
            raise EditError(f"no edit named {n!r}; edits on this model: {', '.join(state.edits) or 'none'}")
        a = state.edits[n]
        if a.kind != "weight_delta":
            raise EditError(f"edit {n!r} is a {a.kind} adapter ({a.method}); only weight deltas can be merged "
                            "into a plain model. Leave it out, or serve it with editpeft")
        adapters.append(a)
    out = Path(out_dir)
    newly = [a for a in adapters if not a.merged]
    with state.only_live(names):     # exactly these edits in the weights, whatever the switch says
        for a in newly:
            a.merge()
        try:
            super(type(model), model).save_pretrained(out)   # the base class's (editpeft's refuses live edits)
        finally:
            for a in reversed(newly):
                a.unmerge()
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    _write_card(out, model, adapters)
    return out


def _write_card(out: Path, model, adapters) -> None:
    base = getattr(model.config, "_name_or_path", "") or ""
    lines = front_matter("transformers", ["merged"], base_model=base)
    lines += ["", f"# {base or 'model'} with {len(adapters)} merged editpeft edit(s)", "",
              "The weight deltas below are baked into the weights; load it with plain transformers.", ""]
    lines += adapters_facts_table(adapters)
    (out / "README.md").write_text("\n".join(lines) + "\n")
