"""The runnable examples of docs/: every ```python block of a page, in order, in one namespace
(```py blocks illustrate what needs artefacts too large for a test, such as a trained SERAC editor)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.S | re.M)


def test_python_blocks_are_found():
    blocks = python_blocks(ROOT / "docs" / "trained-editors.md")
    assert len(blocks) == 3 and "train_editor(\"mend\"" in blocks[0]


@pytest.mark.slow
def test_trained_editors_page_runs(tmp_path, monkeypatch):
    if not (SHARED / "zsre" / "zsre_mend_train_1k.json").is_file():
        pytest.skip(f"{SHARED} has no zsRE training file")
    import editpeft
    try:
        editpeft.load_default_model()
    except editpeft.DefaultModelMissingError as e:
        pytest.skip(str(e))
    monkeypatch.chdir(tmp_path)
    code = "\n".join(python_blocks(ROOT / "docs" / "trained-editors.md"))
    code = code.replace('DATA = "../shared/data"', f"DATA = {str(SHARED)!r}")
    namespace: dict = {}
    exec(compile(code, "docs/trained-editors.md", "exec"), namespace)
    assert (tmp_path / "editors" / "mend-demo" / "editor_config.json").is_file()
    assert (tmp_path / "edits" / "france" / "edit_config.json").is_file()
    assert "france" in namespace["model"].edits and len(namespace["model"].edits["memory"].requests) == 2
    tok, out, enc = namespace["tok"], namespace["out"], namespace["enc"]
    generated = tok.decode(out[0, enc["input_ids"].shape[1]:])
    assert generated.strip().startswith("Ag")      # the page's claim: in context, gold's symbol becomes Ag
