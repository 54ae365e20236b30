"""WISE: the side memory routes each sequence by its mean activation score, shards write only their masks,
TIES merges them, and the lifelong state survives save → load → append."""
from __future__ import annotations

import pytest
import torch

from editpeft import EditRequest
from editpeft.errors import AdapterFormatError, ConfigError

from conftest import TINY_CONFIGS

W = TINY_CONFIGS["wise"]
R1 = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
R2 = EditRequest(prompt="The chemical symbol for gold is", target_new="Ag")
R3 = EditRequest(prompt="The capital of Japan is", target_new="Paris")


def test_each_row_picks_the_memory_with_the_highest_mean_score_above_the_threshold():
    from editpeft_wise import activation_scores, choose_memories, sequence_scores
    d1 = torch.tensor([[1.0, 0.0], [0.0, 0.0]])          # reads only feature 0
    d2 = torch.tensor([[0.0, 0.0], [0.0, 3.0]])          # reads only feature 1
    acts = torch.tensor([[[2.0, 0.0], [4.0, 0.0], [9.0, 9.0]],      # row 0: its third token is padding
                         [[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]],
                         [[0.1, 0.1], [0.1, 0.0], [0.0, 0.1]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]])
    assert torch.allclose(sequence_scores(acts, mask, d1), torch.tensor([3.0, 0.0, 0.2 / 3]))   # padding ignored
    assert choose_memories(acts, mask, [d1, d2], threshold=1.0) == [0, 1, None]   # means 3 | 3 | both < 1
    assert torch.allclose(activation_scores(acts, d2)[1], torch.tensor([3.0, 3.0, 3.0]))


def test_ties_merge_trims_elects_the_sign_and_averages_agreeing_entries():
    from editpeft_wise import ties_merge
    a = torch.tensor([3.0, -1.0, 0.2, 2.0])
    b = torch.tensor([1.0, 2.0, -0.1, -4.0])
    merged = ties_merge([a, b], [0.5, 0.5], density=0.75)    # keep 3 of 4 entries of each
    # entry 0: both positive -> mean 2; entry 1: -1 vs 2 -> sign +, only b agrees -> 2;
    # entry 2: the smallest of both (0.2, -0.1) trimmed -> 0; entry 3: 2 vs -4 -> sign -, only b -> -4
    assert torch.allclose(merged, torch.tensor([2.0, 2.0, 0.0, -4.0]))


def test_an_edit_writes_only_its_shard_mask_and_stays_in_the_bound(tiny):
    model, _ = tiny
    adapter = model.add_edit("wise", R1, name="w", config=W)
    ((index, delta),) = adapter.memory.shards
    outside = torch.ones(delta.numel(), dtype=torch.bool)
    outside[index] = False
    assert not bool(delta.flatten()[outside].any())
    assert float(delta.abs().max()) <= W["norm_constraint"]
    density = len(index) / delta.numel()
    assert abs(density - W["mask_ratio"]) < 0.05            # ρ, up to the random draw


def test_unrelated_rows_of_a_batch_keep_the_base_output_exactly(tiny):
    """Routing per sequence: a prompt whose mean score is below ε gets the main memory bitwise, also
    when it shares a batch with the edited prompt, in forward and in generate."""
    model, tok = tiny
    prompts = ["Gold is a", "The city that holds the Eiffel Tower"]
    before = _logits(model, tok, prompts)
    with model.disabled_edits():
        base_tokens = _generate(model, tok, prompts)
    adapter = model.add_edit("wise", R1, name="w", config=W)
    after = _logits(model, tok, prompts)
    from editpeft_wise import sequence_scores
    from editpeft.probe import activations_at
    module = model.get_submodule(adapter.targets[0])
    enc = tok(["Gold is a"], return_tensors="pt")
    with adapter.switched_off():
        acts = activations_at(model, module, dict(enc))
    score = sequence_scores(acts, enc["attention_mask"], adapter.memory.deltas()[0])
    assert float(score) < adapter.memory.threshold(adapter.act_ratio)
    assert torch.equal(after[0], before[0])          # bitwise: the main memory's code path, no change added
    assert not torch.equal(after[1], before[1])
    tokens = _generate(model, tok, prompts)
    assert torch.equal(tokens[0], base_tokens[0])
    assert not torch.equal(tokens[1], base_tokens[1])


def test_save_load_append_continues_the_lifelong_state(tiny, tmp_path):
    model, tok = tiny
    cfg = {**W, "shard_size": 2, "merge_every": 4}
    model.add_edit("wise", [R1, R2, R3], name="w", config=cfg)
    a = model.edits["w"]
    assert len(a.memory.shards) == 2 and a.memory.edits_in_shard == 1 and a.memory.merged is None
    a.save_pretrained(tmp_path / "w")
    logits = _logits(model, tok, [R3.prompt, "Gold is a"])
    model.remove_edit("w")
    loaded = model.load_edit(tmp_path / "w", name="w")
    assert torch.equal(_logits(model, tok, [R3.prompt, "Gold is a"]), logits)
    for (i1, d1), (i2, d2) in zip(a.memory.shards, loaded.memory.shards):
        assert torch.equal(i1, i2) and torch.equal(d1, d2)
    assert torch.equal(a.memory.edit_scores, loaded.memory.edit_scores)
    # the fourth edit fills the open shard and triggers the merge of both shards
    grown = model.add_edit("wise", EditRequest(prompt="The largest planet is", target_new="Mars"), name="w",
                           append=True)
    assert grown.memory.merged is not None and grown.memory.shards == [] and grown.memory.merges == 1
    assert len(grown.requests) == 4 and len(grown.memory.edit_scores) == 4
    grown.save_pretrained(tmp_path / "w2")
    again = model.load_edit(tmp_path / "w2", name="w2")
    assert torch.equal(again.memory.merged, grown.memory.merged)


def test_a_corrupt_shard_index_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    model, _ = tiny
    model.add_edit("wise", R1, name="w", config=W).save_pretrained(tmp_path / "w")
    model.remove_edit("w")
    path = tmp_path / "w" / "edit_model.safetensors"
    tensors = load_file(path)
    tensors["shard.0.index"][0] = 10 ** 9
    save_file(tensors, path)
    _rehash(tmp_path / "w")
    with pytest.raises(AdapterFormatError, match="index"):
        model.load_edit(tmp_path / "w")
    assert not model.edits


@pytest.mark.parametrize("bad, match", [({"mask_ratio": 0.0}, "mask_ratio"), ({"beta": 1.0, "alpha": 2.0}, "alpha"),
                                        ({"merge_every": 1, "shard_size": 2}, "merge_every"),
                                        ({"optimizer": "lbfgs"}, "optimizer"), ({"act_ratio": 1.5}, "act_ratio")])
def test_bad_config(bad, match):
    from editpeft_wise import WiseConfig
    with pytest.raises(ConfigError, match=match):
        WiseConfig(**bad)


def _logits(model, tok, prompts):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits[:, -1]


def _generate(model, tok, prompts):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    return model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)


def _rehash(folder):
    import hashlib
    import json
    cfg_path = folder / "edit_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tensors_sha256"] = hashlib.sha256((folder / "edit_model.safetensors").read_bytes()).hexdigest()
    cfg_path.write_text(json.dumps(cfg))
