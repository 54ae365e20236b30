"""A third-party plugin, built and installed here as its own distribution, works with no core
change: ``add_edit`` and ``editpeft methods`` see it. Its method is a router (the model-level
attachment point); a second entry point that fails to import is reported, not fatal."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import shutil
from pathlib import Path

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import assert_untouched, logits_of, params_snapshot

EXAMPLE = Path(__file__).resolve().parents[1] / "plugins" / "example_logitbias"
BROKEN_ENTRY = 'broken = "editpeft_logitbias.broken:Missing"\n'


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The example plugin of plugins/example_logitbias, installed as its own distribution, plus an
    entry point that fails to import (added here, not in the example)."""
    src = tmp_path_factory.mktemp("plugin_src") / "example"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    pyproject = (src / "pyproject.toml").read_text()
    (src / "pyproject.toml").write_text(pyproject.replace('logit_bias = "editpeft_logitbias:LogitBias"\n',
                                                          'logit_bias = "editpeft_logitbias:LogitBias"\n'
                                                          + BROKEN_ENTRY))
    (src / "editpeft_logitbias" / "broken.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(site), str(src)], check=True)
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    yield site
    sys.path.remove(str(site))
    for name in [m for m in sys.modules if m.startswith("editpeft_logitbias")]:
        del sys.modules[name]
    importlib.invalidate_caches()


REQ = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome")


def test_third_party_router_plugin(plugin_site, tiny, tmp_path):
    methods = editpeft.list_methods()
    assert methods["logit_bias"] == ("router", "editpeft-logitbias", "0.3.1")
    assert "broken" not in methods and "rome" in methods
    model, tok = tiny
    snap = params_snapshot(model)
    prompts = [REQ.prompt, "The chemical symbol for gold is"]
    base = logits_of(model, tok, prompts)
    adapter = model.add_edit("logit_bias", REQ, name="bias")
    rome_target = target_token_ids(tok, REQ.prompt, "Rome")[0]
    assert greedy_next_tokens(model, tok, [REQ.prompt]) == [rome_target]
    edited = logits_of(model, tok, prompts)
    assert torch.equal(edited[1], base[1])  # the router leaves other prompts alone; bitwise: same batch, same path
    with pytest.raises(editpeft.EditError, match="cannot append"):   # a method without extend()
        model.add_edit("logit_bias", REQ, name="bias", append=True)
    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, prompts), base)  # bitwise: edits off, every module runs its original code path
    # generate() goes through the router too
    enc = tok(REQ.prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert out[0, -1].item() == rome_target
    # ... for every generated token (KV cache): the bias holds until the target appears, then stops
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out[0, enc["input_ids"].shape[1]].item() == rome_target
    with model.disabled_edits():
        plain = model.generate(input_ids=out[:, :enc["input_ids"].shape[1] + 1], max_new_tokens=3,
                               do_sample=False, pad_token_id=0)
    assert torch.equal(out, plain)
    # stacks with a core method; save/load round trip
    model.add_edit("grace", EditRequest(prompt="The chemical symbol for gold is", target_new="Ag"),
                   name="g", config={"layer": 0})
    adapter.save_pretrained(tmp_path / "bias")
    model.remove_edit("bias")
    model.remove_edit("g")
    assert_untouched(model, snap)
    model.load_edit(tmp_path / "bias")
    assert torch.equal(logits_of(model, tok, prompts), edited)  # bitwise: the reloaded router does the same computation


def test_cli_methods_sees_plugin_and_reports_broken(plugin_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "editpeft.cli", "methods", "--verbose"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "logit_bias" in out and "editpeft-logitbias 0.3.1" in out
    assert "broken" in out and "FAILED" in out and "broken on purpose" in out
    assert "rome" in out and "grace" in out


def test_harness_scores_a_router_edit_on_plain_inputs(plugin_site, tiny):
    """Router edits rewrite whole inputs, so the harness scores them on ordinary padded
    sequences rather than packed rows."""
    from editpeft.evaluation import CaseScorer, EvalCase, Probe
    model, tok = tiny
    case = EvalCase("r", (REQ,), locality={"other": (Probe("The chemical symbol for gold is", ()),)})
    scorer = CaseScorer(model, tok)
    base = scorer.baseline([case])
    model.add_edit("logit_bias", REQ, name="bias")
    (s,) = scorer.score([case], base)
    assert s["reliability"]["token_em"] == 1.0 and s["locality"]["gen_em"] == 1.0
