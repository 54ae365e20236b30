"""MELO: the vector index routes each token to one LoRA block (or none) by radius, an edit joins the
cluster whose radius holds its key or opens a block, and index + blocks survive save → load → append."""
from __future__ import annotations

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.errors import AdapterFormatError, ConfigError, EditError

from conftest import TINY_CONFIGS, assert_untouched, logits_of, params_snapshot

M = TINY_CONFIGS["melo"]
R1 = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
R2 = EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")
R3 = EditRequest(prompt="The capital of Japan is", target_new="Paris")
UNRELATED = "Berlin, London, Madrid"


def test_lookup_takes_the_nearest_key_and_routes_nowhere_outside_its_radius():
    from editpeft_melo import NO_BLOCK, BlockIndex
    index = BlockIndex.empty(2).add(torch.tensor([[0.0, 0.0]]), 1.0, 0).add(torch.tensor([[3.0, 0.0]]), 0.5, 1)
    queries = torch.tensor([[0.9, 0.0],     # 0.9 from key 0 (radius 1): block 0
                            [2.6, 0.0],     # nearest is key 1 at 0.4 (radius 0.5): block 1
                            [2.0, 0.0],     # nearest is key 1 at 1.0 > its radius 0.5 (key 0 is 2.0 away): nowhere
                            [1.2, 0.0]])    # nearest key 0 at 1.2 > 1: nowhere
    assert index.lookup(queries).tolist() == [0, 1, NO_BLOCK, NO_BLOCK]
    assert BlockIndex.empty(2).lookup(queries).tolist() == [NO_BLOCK] * 4
    assert index.lookup(index.keys).tolist() == [0, 1]          # a key is at distance 0 from itself


def test_routed_lora_applies_only_the_routed_block_per_token():
    from editpeft_melo import routed_lora
    g = torch.Generator().manual_seed(0)
    r, d_in, d_out = 2, 5, 3
    a, b = torch.randn(3 * r, d_in, generator=g), torch.randn(d_out, 3 * r, generator=g)   # 3 blocks
    x, out = torch.randn(2, 2, d_in, generator=g), torch.randn(2, 2, d_out, generator=g)   # 2 rows x 2 tokens
    route = torch.tensor([2, -1, 0, -1])
    got = routed_lora(x, out, route, a, b, r, scale=1.5)
    assert torch.equal(got[0, 1], out[0, 1]) and torch.equal(got[1, 1], out[1, 1])       # bitwise: no block
    for (row, tok), j in (((0, 0), 2), ((1, 0), 0)):
        want = out[row, tok].double() + 1.5 * b[:, j * r:(j + 1) * r].double() @ (a[j * r:(j + 1) * r].double()
                                                                                 @ x[row, tok].double())
        # float32 against float64: two dot products of <= 5 terms of O(1) values, ~1e-6; 1e-5 leaves room
        torch.testing.assert_close(got[row, tok].double(), want, rtol=0, atol=1e-5)


def test_rows_out_of_scope_keep_the_base_output_exactly_in_forward_and_generate(tiny):
    model, tok = tiny
    prompts = [UNRELATED, R1.prompt.format(R1.subject)]
    before = logits_of(model, tok, prompts)
    base_gen = _generate(model, tok, prompts)
    model.add_edit("melo", R1, name="m", config=M)
    after = logits_of(model, tok, prompts)
    assert torch.equal(after[0], before[0])         # bitwise: the unrelated row routes to no block
    assert not torch.equal(after[1], before[1])
    gen = _generate(model, tok, prompts)
    assert torch.equal(gen[0], base_gen[0])         # token ids: the unrelated row generates as the base model
    target = tok(" Rome", add_special_tokens=False)["input_ids"][0]
    assert int(gen[1, -4]) == target                # the edited row's first generated token is the target


def _generate(model, tok, prompts):
    tok.padding_side = "left"
    try:
        enc = tok(prompts, return_tensors="pt", padding=True)
        return model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        tok.padding_side = "right"


def test_an_edit_inside_a_radius_joins_that_cluster_and_outside_opens_a_block(tiny):
    model, _ = tiny
    near = model.add_edit("melo", [R1, R2], name="near", config={**M, "init_radius": 1e6})
    assert near.request_blocks == [0, 0] and near.num_blocks == 1
    model.remove_edit("near")
    far = model.add_edit("melo", [R1, R2], name="far", config=M)
    assert far.request_blocks == [0, 1] and far.num_blocks == 2
    assert far.index.blocks.unique().tolist() == [0, 1]
    # block 0 is left exactly as R1 trained it: R2 trained only block 1
    model.remove_edit("far")
    only = model.add_edit("melo", R1, name="only", config=M)
    for t, (a, b) in only.factors.items():
        assert torch.equal(far.factors[t][0][:2], a) and torch.equal(far.factors[t][1][:, :2], b)


def test_all_blocks_in_use_refuses_a_new_cluster_and_keeps_the_adapter(tiny):
    model, tok = tiny
    adapter = model.add_edit("melo", R1, name="m", config={**M, "num_blocks": 1})
    before, state = logits_of(model, tok, [R1.prompt.format(R1.subject), UNRELATED]), adapter.state_dict()
    with pytest.raises(EditError, match="raise num_blocks"):
        model.add_edit("melo", R2, name="m", config={**M, "num_blocks": 1}, append=True)
    assert model.edits["m"] is adapter and adapter.active
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(logits_of(model, tok, [R1.prompt.format(R1.subject), UNRELATED]), before)


def test_save_load_append_is_bitwise_the_same_as_appending_in_memory(tiny, tmp_path):
    model, tok = tiny
    model.add_edit("melo", R1, name="m", config=M).save_pretrained(tmp_path / "m")
    model.add_edit("melo", [R2, R3], name="m", config=M, append=True)
    direct = model.edits["m"]
    probes = [R1.prompt.format(R1.subject), R2.prompt, R3.prompt, UNRELATED]
    expected = logits_of(model, tok, probes)
    model.remove_edit("m")
    model.load_edit(tmp_path / "m", name="m")
    model.add_edit("melo", [R2, R3], name="m", config=M, append=True)
    again = model.edits["m"]
    assert again.state_dict().keys() == direct.state_dict().keys()
    for k, v in direct.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k       # bitwise: same tensors, same seeds, same steps
    assert again.request_blocks == direct.request_blocks == [0, 1, 2]
    assert torch.equal(logits_of(model, tok, probes), expected)


@pytest.mark.parametrize("bad,match", [
    ({"lora_layers": [5]}, "outside this model"),
    ({"key_layer": 1, "lora_layers": [0]}, "before key_layer"),
    ({"key_layer": 1, "lora_layers": None}, "last block"),
    ({"rank_per_block": 0}, "rank_per_block"),
    ({"rank_per_block": "2"}, "rank_per_block must be int"),
    ({"init_radius": -1.0}, "init_radius"),
    ({"max_replay": -1}, "max_replay"),
    ({"target_modules": ["nope"]}, "match no Linear"),
    ({"key_layer": 0, "lora_layers": [0], "target_modules": ["up_proj"]}, "run before the key is read"),
    ({"lr": float("nan")}, "finite"),
])
def test_bad_configs_are_refused_before_any_work(tiny, bad, match):
    model, tok = tiny
    snap, base = params_snapshot(model), logits_of(model, tok, [UNRELATED])
    with pytest.raises(ConfigError, match=match):
        model.add_edit("melo", R1, config={**M, **bad})
    assert not model.edits
    assert_untouched(model, snap)
    assert torch.equal(logits_of(model, tok, [UNRELATED]), base)


def test_a_diverging_edit_leaves_model_and_adapter_as_they_were(tiny):
    model, tok = tiny
    adapter = model.add_edit("melo", R1, name="m", config=M)
    snap, state = params_snapshot(model), adapter.state_dict()
    before = logits_of(model, tok, [R1.prompt.format(R1.subject), UNRELATED])
    with pytest.raises(editpeft.EditError, match="lr"):
        model.add_edit("melo", R2, name="m", config={**M, "lr": 1e30}, append=True)
    assert model.edits["m"] is adapter and len(adapter) == 1
    assert all(torch.equal(adapter.state_dict()[k], v) for k, v in state.items())
    assert all(torch.equal(v, snap[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits_of(model, tok, [R1.prompt.format(R1.subject), UNRELATED]), before)


def _saved(tiny):
    model, _ = tiny
    adapter = model.add_edit("melo", [R1, R2], name="m", config=M)
    common = dict(method="melo", hparams=adapter.hparams, requests=adapter.requests, targets=adapter.targets)
    return model, adapter, dict(adapter.state_dict()), adapter.extra_config(), common


@pytest.mark.parametrize("corrupt,match", [
    (lambda t, e: t.update({"index.blocks": t["index.blocks"] + 5}), "block ids"),
    (lambda t, e: t["index.radii"].__setitem__(0, float("nan")), "finite"),
    (lambda t, e: t["index.radii"].__setitem__(0, -1.0), "radii >= 0"),
    (lambda t, e: t.update({"index.keys": t["index.keys"][:, :-1]}), "keys are"),
    (lambda t, e: t.update({"index.radii": t["index.radii"][:-1]}), "needs keys"),
    (lambda t, e: t.pop("index.keys"), "missing"),
    (lambda t, e: t.pop(next(k for k in t if k.endswith("lora_B"))), "missing"),
    (lambda t, e: t.update({k: v[:-1] for k, v in t.items() if k.endswith("lora_A")}), "lora_A"),
    (lambda t, e: t.update({k: v[:, :-1] for k, v in list(t.items()) if k.endswith("lora_A")}), "another model"),
    (lambda t, e: next(v for k, v in t.items() if k.endswith("lora_B")).__setitem__((0, 0), float("inf")), "finite"),
    (lambda t, e: e.update({"request_blocks": [0, 7]}), "request_blocks"),
    (lambda t, e: e.update({"request_blocks": [0]}), "request_blocks"),
    (lambda t, e: e.update({"request_blocks": [0, True]}), "request_blocks"),
])
def test_corrupt_saved_state_is_refused_with_a_clear_error(tiny, corrupt, match):
    from editpeft_melo import MeloAdapter
    model, adapter, tensors, extra, common = _saved(tiny)
    tensors = {k: v.clone() for k, v in tensors.items()}
    corrupt(tensors, extra)
    model.remove_edit("m")
    with pytest.raises(AdapterFormatError, match=match):
        loaded = MeloAdapter.from_saved(tensors, extra, **common)
        loaded.prepare(model._editpeft)


def test_a_saved_adapter_with_its_key_layer_moved_is_refused(tiny, tmp_path):
    model, _ = tiny
    model.add_edit("melo", R1, name="m", config=M).save_pretrained(tmp_path / "m")
    model.remove_edit("m")
    import json
    cfg = json.loads((tmp_path / "m" / "edit_config.json").read_text())
    cfg["hparams"]["lora_layers"] = [1]
    (tmp_path / "m" / "edit_config.json").write_text(json.dumps(cfg))
    with pytest.raises(editpeft.EditError):
        model.load_edit(tmp_path / "m", name="m")
    assert not model.edits
