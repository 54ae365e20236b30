"""A third-party plugin, built and installed here as its own distribution, works with no core
change: ``add_edit`` and ``editpeft methods`` see it. Its method is a router (the model-level
attachment point); a second entry point that fails to import is reported, not fatal."""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import assert_untouched, logits_of, params_snapshot

PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"
[project]
name = "editpeft-logitbias"
version = "0.3.1"
[project.entry-points."editpeft.methods"]
logit_bias = "editpeft_logitbias:LogitBias"
broken = "editpeft_logitbias.broken:Missing"
"""

PLUGIN = '''
"""A toy router method: adds a bias to the target's logit when the subject appears."""
from dataclasses import dataclass, field
import torch
import editpeft


@dataclass
class BiasConfig(editpeft.MethodConfig):
    bias: float = field(default=50.0, metadata={"help": "logit added to the target token"})


class LogitBiasAdapter(editpeft.RouterAdapter):
    def __init__(self, trigger, target, **common):
        super().__init__(**common)
        self.trigger, self.target = trigger, target

    def state_dict(self):
        return {"trigger": self.trigger, "target": self.target}

    @classmethod
    def from_saved(cls, tensors, extra, **common):
        return cls(tensors["trigger"], tensors["target"], **common)

    def route(self, model, inputs, call_next):
        out = call_next(inputs)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is None:
            return out
        last = mask.sum(1) - 1 if mask is not None else torch.full((ids.shape[0],), ids.shape[1] - 1)
        trig, n = self.trigger.tolist(), len(self.trigger)
        logits = out.logits.clone()
        for row in range(ids.shape[0]):
            seq = ids[row, : int(last[row]) + 1].tolist()
            pos = int(last[row]) - (ids.shape[1] - logits.shape[1])  # logits may cover only the tail
            if pos >= 0 and any(seq[i:i + n] == trig for i in range(len(seq) - n + 1)):
                logits[row, pos, int(self.target)] += self.hparams["bias"]
        out.logits = logits
        return out


class LogitBias(editpeft.EditMethod):
    name, kind, Config, adapter_class = "logit_bias", "router", BiasConfig, LogitBiasAdapter

    def compute(self, model, tokenizer, requests, config):
        r = requests[0]
        trigger = tokenizer(" " + r.subject, add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + r.target_new, add_special_tokens=False)["input_ids"][0]
        return LogitBiasAdapter(torch.tensor(trigger), torch.tensor(target), method=self.name,
                                hparams=config.to_dict(), requests=list(requests), targets=[])
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "pyproject.toml").write_text(PYPROJECT)
    pkg = src / "editpeft_logitbias"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    (pkg / "broken.py").write_text("raise ImportError('this plugin is broken on purpose')\n")
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
    assert torch.equal(edited[1], base[1])  # the router leaves other prompts alone
    with model.disabled_edits():
        assert torch.equal(logits_of(model, tok, prompts), base)
    # generate() goes through the router too
    enc = tok(REQ.prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=0)
    assert out[0, -1].item() == rome_target
    # stacks with a core method; save/load round trip
    model.add_edit("grace", EditRequest(prompt="The chemical symbol for gold is", target_new="Ag"),
                   name="g", config={"layer": 0})
    adapter.save_pretrained(tmp_path / "bias")
    model.remove_edit("bias")
    model.remove_edit("g")
    assert_untouched(model, snap)
    model.load_edit(tmp_path / "bias")
    assert torch.equal(logits_of(model, tok, prompts), edited)


def test_cli_methods_sees_plugin_and_reports_broken(plugin_site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin_site), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "editpeft.cli", "methods", "--verbose"], env=env,
                         capture_output=True, text=True, check=True).stdout
    assert "logit_bias" in out and "editpeft-logitbias 0.3.1" in out
    assert "broken" in out and "FAILED" in out and "broken on purpose" in out
    assert "rome" in out and "grace" in out
