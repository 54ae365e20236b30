"""The fuzzing suite: every adapter kind's folder mutated every hostile way (editpeft.fuzzing) and
loaded; each mutant is refused with an EditError (model bit-identical, nothing attached) or
accepted by design (then it computes exactly what the original did), with no file outside the
fuzzer's temporary folder touched, in bounded time and memory."""
from __future__ import annotations

import logging
from contextlib import ExitStack

import pytest
import torch

import editpeft
from editpeft.fuzzing import _accepted_by_design, Mutation, fuzz_adapter
from editpeft.registry import registered
from editpeft.testing import DEFAULT_REQUEST, PROBES, make_tiny_model

from conftest import TINY_CONFIGS
from test_routers import ToySide as ToySideRouter
from toy_methods import ToyPatch

#: One method per adapter shape: low-rank and dense weight deltas, deltas with sequential state,
#: a codebook, patch neurons (a toy and T-Patcher's), a routed side memory (WISE), a router with a
#: side model and one without.
KINDS = {
    "rome": TINY_CONFIGS["rome"],
    "ft-m": TINY_CONFIGS["ft-m"],
    "alphaedit": TINY_CONFIGS["alphaedit"],
    "grace": TINY_CONFIGS["grace"],
    "toy-patch": {"steps": 30},
    "t-patcher": TINY_CONFIGS["t-patcher"],
    "wise": TINY_CONFIGS["wise"],          # sparse shard deltas + per-edit scores: its own validation
    "melo": TINY_CONFIGS["melo"],          # an index (keys, radii, block ids) + block factors + request blocks
    "calinet": {**TINY_CONFIGS["calinet"], "slots": 8},   # patch neurons with a gate (SwiGLU host)
    "toy_side": {},
    "logit_bias": {},      # the plugin template (plugins/example_logitbias): a router without side model
}


@pytest.fixture(scope="module")
def toy_registered():
    with ExitStack() as stack:
        stack.enter_context(registered(ToyPatch, distribution="tests"))
        stack.enter_context(registered(ToySideRouter, distribution="tests"))
        stack.enter_context(registered(_logit_bias(), distribution="tests"))
        yield


def _logit_bias():
    """The example plugin's method, importable from its folder without installing it."""
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins" / "example_logitbias"))
    from editpeft_logitbias import LogitBias
    return LogitBias


@pytest.mark.parametrize("method", list(KINDS))
def test_every_mutation_is_refused_or_accepted_by_design(method, tiny_tokenizer, tmp_path, toy_registered):
    model = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer), tiny_tokenizer)
    model.add_edit(method, DEFAULT_REQUEST, name="orig", config=KINDS[method]).save_pretrained(tmp_path / "adapter")
    model.remove_edit("orig")
    sentinel = tmp_path / "bystander"
    sentinel.mkdir()
    (sentinel / "notes.txt").write_text("must stay as it is")
    logging.disable(logging.WARNING)       # hundreds of expected warnings (version, provenance)
    try:
        report = fuzz_adapter(model, tmp_path / "adapter", PROBES, watch=[tmp_path / "adapter", sentinel])
    finally:
        logging.disable(logging.NOTSET)
    counts = report.counts()
    failures = "\n".join(f"{o.mutation}: {o.detail}" for o in report.failures)
    assert not report.failures, f"{len(report.failures)} mutations mishandled:\n{failures}"
    assert counts.get("refused", 0) > 300 and counts.get("accepted-by-design", 0) > 10, counts
    assert not model.edits


def test_accepted_by_design_is_the_documented_list():
    """The acceptance rule itself: records may change, integrity and provenance fields may not."""
    def m(path):
        return Mutation(path, lambda f: None, path)
    for path in ("name", "hparams.layer", "requests.0.prompt", "metrics", "editpeft_version", "extra"):
        assert _accepted_by_design(m(path)), path
    for path in ("tensors_sha256", "base_model.fingerprint", "base_model.model_type", "plugin.distribution",
                 "method", "kind", "targets.0", "format", "extra.patches", None):
        assert not _accepted_by_design(m(path)), path
    assert _accepted_by_design(m("tensor:as float16")) and not _accepted_by_design(m("tensor:as int8"))


def test_fuzzer_catches_a_lax_loader(tiny_tokenizer, tmp_path, monkeypatch):
    """The fuzzer is not vacuous: with the hash check switched off, tampered tensors load and it
    reports them."""
    import editpeft.io as io
    model = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer), tiny_tokenizer)
    model.add_edit("rome", DEFAULT_REQUEST, name="o", config=TINY_CONFIGS["rome"]).save_pretrained(tmp_path / "a")
    model.remove_edit("o")
    real = io.read_verified_folder

    def lax(folder, **kw):
        import hashlib
        import json
        from pathlib import Path
        config = json.loads((Path(folder) / io.CONFIG_NAME).read_text())
        blob = (Path(folder) / io.WEIGHTS_NAME).read_bytes()
        config["tensors_sha256"] = hashlib.sha256(blob).hexdigest()     # trusts whatever is there
        (Path(folder) / io.CONFIG_NAME).write_text(json.dumps(config))
        return real(folder, **kw)
    monkeypatch.setattr(io, "read_verified_folder", lax)
    logging.disable(logging.WARNING)
    try:
        report = fuzz_adapter(model, tmp_path / "a", PROBES)
    finally:
        logging.disable(logging.NOTSET)
    assert any("scaled x50" in o.mutation for o in report.failures)
    assert torch.equal(model.get_submodule("model.layers.0.mlp.down_proj").weight,
                       make_tiny_model("llama", tiny_tokenizer).get_submodule("model.layers.0.mlp.down_proj").weight)
