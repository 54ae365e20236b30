"""Heterogeneous stacking: a rank-one weight delta (ROME), a codebook (GRACE), patch neurons
(T-Patcher), a routed side memory (WISE) and a LoRA edit on one model, all at the same FFN — each
switchable and removable bit-exactly, each saved and reloaded in one call."""
from __future__ import annotations

import torch

from editpeft import EditRequest
from editpeft.tokens import next_token_logits

from conftest import TINY_CONFIGS, assert_untouched, logits_of, params_snapshot

STACK = [
    ("rome", EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")),
    ("grace", EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")),
    ("t-patcher", EditRequest(prompt="The capital of Japan is", target_new="Paris")),
    ("wise", EditRequest(prompt="The largest planet is", target_new="Mars")),
    ("lora", EditRequest(prompt="The river through Cairo is the", target_new="Thames")),
]
PROMPTS = [r.prompt.replace("{}", r.subject or "") for _, r in STACK] + ["Berlin, London, Madrid"]


def _config(method: str) -> dict:
    cfg = dict(TINY_CONFIGS[method])
    if method == "lora":                      # the same FFN output projection as the others
        cfg.update(target_modules=["down_proj"], layers=[0])
    return cfg


def test_five_kinds_stack_switch_remove_and_reload_bit_exactly(tiny, tmp_path):
    model, tok = tiny
    snap, base = params_snapshot(model), logits_of(model, tok, PROMPTS)
    for method, request in STACK:
        model.add_edit(method, request, name=method, config=_config(method))
    full = logits_of(model, tok, PROMPTS)
    names = [m for m, _ in STACK]
    for name in names:
        model.edits[name].save_pretrained(tmp_path / name)

    for name in names:
        model.edits[name].active = False
        switched_off = logits_of(model, tok, PROMPTS)
        model.edits[name].active = True
        assert torch.equal(logits_of(model, tok, PROMPTS), full)
        # removing it instead gives the same logits, bitwise; then put the stack back in order
        for other in names:
            model.remove_edit(other)
        for other in names:
            if other != name:
                model.load_edit(tmp_path / other, name=other)
        assert torch.equal(logits_of(model, tok, PROMPTS), switched_off), name
        for other in names:
            if other in model.edits:
                model.remove_edit(other)
        for other in names:
            model.load_edit(tmp_path / other, name=other)
        assert torch.equal(logits_of(model, tok, PROMPTS), full), name

    # every edit still pushes its target inside the stack (on a tiny random model later edits at the
    # same FFN disturb earlier ones, so top-1 is not promised; the embedded model's numbers are in
    # benchmarks/stacking.py)
    wanted = [tok(" " + r.target_new, add_special_tokens=False)["input_ids"][0] for _, r in STACK]
    rows = torch.arange(len(STACK))
    stacked = next_token_logits(model, tok, PROMPTS[:len(STACK)]).log_softmax(-1)[rows, wanted]
    for name in names:
        model.edits[name].active = False
    unedited = next_token_logits(model, tok, PROMPTS[:len(STACK)]).log_softmax(-1)[rows, wanted]
    assert bool((stacked > unedited).all()), (stacked, unedited)
    for name in names:
        model.remove_edit(name)
    assert_untouched(model, snap)
    assert torch.equal(logits_of(model, tok, PROMPTS), base)
