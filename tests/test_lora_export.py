"""Weight-delta edits exported as a standard PEFT LoRA adapter reproduce editpeft's logits."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import editpeft
import editpeft.lora_export
from editpeft import EditRequest
from editpeft.cli import main

from conftest import FAMILIES, assert_close_reordered, editable_float64, logits_of, make_tiny_model, rounding_atol

ROME = {"layer": 0, "v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000,
        "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
A = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
B = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Paris")
PROMPTS = [A.prompt, B.prompt, "Berlin, London, Madrid"]


@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
def test_exported_lora_reproduces_the_stack(tiny, tmp_path):
    from peft import PeftModel
    model, tok = tiny
    a = model.add_edit("rome", A, name="a", config=ROME)
    b = model.add_edit("rome", B, name="b", config=ROME)     # the same module: ranks concatenate
    editpeft.lora_export.export_peft_lora([a, b], tmp_path / "lora")
    family = model.config.model_type
    edited = logits_of(editable_float64(family, tok, [a, b], tmp_path), tok, PROMPTS)
    fresh = make_tiny_model(family, tok).double()               # same seed: the same base weights
    peft_model = PeftModel.from_pretrained(fresh, tmp_path / "lora")
    # LoRA (x A^T) B^T vs editpeft's (x V) U^T on the same float32 factors: reordered sums, so
    # compared in float64 (rounding ~1e-14, a lost or doubled edit ~1); depth: 2 blocks + head
    assert_close_reordered(logits_of(peft_model, tok, PROMPTS), edited, depth=3)
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == a.deltas[next(iter(a.deltas))].rank * 2


@pytest.mark.parametrize("tiny", ["llama", "gpt2"], indirect=True)
def test_every_weight_delta_method_stacked_exports_exactly(tiny, tmp_path):
    """ROME, MEMIT, AlphaEdit (its keys are not exported: they are state, not weights), EMMET and
    KN stacked on overlapping modules: one LoRA reproduces the stack."""
    from peft import PeftModel
    model, tok = tiny
    value = {k: v for k, v in ROME.items() if k != "layer"}
    adapters = [model.add_edit("rome", A, name="rome", config=ROME),
                model.add_edit("memit", B, name="memit", config={"layers": [0, 1], "mom2_update_weight": 1.0, **value}),
                model.add_edit("alphaedit", A, name="alpha", config={"layers": [1], "nullspace_threshold": 1.0,
                                                                     "l2": 0.1, **value}),
                model.add_edit("emmet", B, name="emmet", config={"layers": [0], **value}),
                model.add_edit("kn", A, name="kn", config={"ig_steps": 4, "context_lengths": [[4, 2]]})]
    editpeft.lora_export.export_peft_lora(adapters, tmp_path / "lora")
    family = model.config.model_type
    edited = logits_of(editable_float64(family, tok, adapters, tmp_path), tok, PROMPTS)
    peft_model = PeftModel.from_pretrained(make_tiny_model(family, tok).double(), tmp_path / "lora")
    # the same stack in two summation orders, in float64 (see the test above)
    assert_close_reordered(logits_of(peft_model, tok, PROMPTS), edited, depth=3)


def test_loads_with_plain_peft_in_a_process_without_editpeft(tiny_tokenizer, tmp_path):
    model = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer), tiny_tokenizer)
    model.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    a = model.add_edit("rome", A, name="a", config=ROME)
    a.to_peft_lora(tmp_path / "lora")
    expected = logits_of(editable_float64("llama", tiny_tokenizer, [a], tmp_path), tiny_tokenizer, PROMPTS)
    torch.save(expected, tmp_path / "expected.pt")
    # LoRA vs hook, other padding: reordered float64 sums through 2 blocks + head (see conftest)
    atol = rounding_atol(expected.abs().max(), depth=3, dtype=torch.float64)
    script = f"""
import sys, torch
sys.modules["editpeft"] = None          # importing editpeft would fail here
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'base')!r})
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r}, dtype=torch.float64)
m = PeftModel.from_pretrained(base, {str(tmp_path / 'lora')!r})
enc = tok({PROMPTS!r}, return_tensors="pt", padding=True)
got = m(**enc).logits
want = torch.load({str(tmp_path / 'expected.pt')!r}, weights_only=True)
mask = enc["attention_mask"].bool()
assert got.dtype == want.dtype == torch.float64
assert torch.allclose(got[mask], want[mask], atol={atol!r}, rtol=0), (got[mask] - want[mask]).abs().max()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_cli_export_and_refusals(tiny, tmp_path, capsys):
    model, tok = tiny
    model.add_edit("rome", A, name="a", config=ROME).save_pretrained(tmp_path / "a")
    assert main(["export-lora", "--edit", str(tmp_path / "a"), "--out", str(tmp_path / "lora")]) == 0
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
    g = model.add_edit("grace", B, name="g", config={"layer": 0})
    with pytest.raises(editpeft.EditError, match="only weight deltas"):
        editpeft.lora_export.export_peft_lora([g], tmp_path / "x")
