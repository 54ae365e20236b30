"""IKE (in-context knowledge editing): the demonstration pool as a JSON-only editor (build, save,
load, Hub, tampering), retrieval of the nearest stored fact per row, routing through ``generate``,
refusals; and, in the slow tier, a known fact of the embedded SmolLM2 changed in context.

The contract suite (tests/test_contract.py) runs IKE on every causal family."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.cli import main
from editpeft.routing import Prompts
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import assert_untouched, params_snapshot
from hub_server import pointed_at_loopback

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"

#: zsRE-format training records written by the tests (invented facts; no dataset is copied).
ZSRE_RECORDS = [
    {"subject": s, "src": q, "rephrase": rq, "alt": alt, "answers": [true], "loc": loc, "loc_ans": la,
     "pred": true, "cond": ""}
    for s, q, rq, alt, true, loc, la in [
        ("Eiffel Tower", "Which city holds the Eiffel Tower?", "Where is the Eiffel Tower?", "Rome", "Paris",
         "nq question: what is the capital of Italy", "Rome"),
        ("Colosseum", "Which city holds the Colosseum?", "Where is the Colosseum?", "Paris", "Rome",
         "nq question: what is the capital of France", "Paris"),
        ("gold", "What is the chemical symbol for gold?", "Which symbol stands for gold?", "Ag", "Au",
         "nq question: what is the chemical symbol for silver", "Ag"),
        ("Big Ben", "Which city holds Big Ben?", "Where is Big Ben?", "Madrid", "London",
         "nq question: what is the capital of Spain", "Madrid"),
    ]]

FACTS = [EditRequest(prompt="The Eiffel Tower is located in", target_new="Rome"),
         EditRequest(prompt="The chemical symbol for gold is", target_new="Ag"),
         EditRequest(prompt="Berlin is the capital of", target_new="Tokyo")]
QUERIES = ["Berlin is capital of", "The Eiffel Tower is in", "The symbol for gold is"]   # nearest: 2, 0, 1


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "zsre_train.json"
    path.write_text(json.dumps(ZSRE_RECORDS))
    return path


@pytest.fixture
def pool(tiny, data, tmp_path):
    model, tok = tiny
    return editpeft.train_editor("ike", model, tok, data, out=tmp_path / "pool", progress=False)


def test_pool_builds_as_json_only_editor_and_round_trips(tiny, pool, data, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    model, tok = tiny
    folder = tmp_path / "pool"
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["README.md",
                                                                                      "editor_config.json"]
    config = json.loads((folder / "editor_config.json").read_text())
    kinds = [d["kind"] for d in config["extra"]["demonstrations"]]
    assert kinds.count("copy") == 4 and kinds.count("update") == 4 and kinds.count("retain") == 4
    assert config["training"]["data"] == "zsre_train.json" and config["training"]["steps"] == 0
    assert config["tensors_sha256"] is None and config["content_sha256"] == pool.sha256
    assert config["base_model"]["fingerprint"] == pool.base_model["fingerprint"]

    loaded = editpeft.load_editor(folder, model=model, tokenizer=tok)
    assert loaded.sha256 == pool.sha256 and loaded.demonstrations == pool.demonstrations
    assert type(loaded).__name__ == "DemonstrationPool" and loaded.id == "pool"
    adapter = model.add_edit("ike", FACTS[0], name="a", editor=folder)
    assert adapter.editor == {"id": "pool", "sha256": pool.sha256}
    model.remove_edit("a")

    # rebuilding is deterministic; the Hub round trip and the offline cache give the same pool
    again = editpeft.train_editor("ike", model, tok, data, progress=False)
    assert again.sha256 == pool.sha256
    with pointed_at_loopback(monkeypatch, tmp_path / "hf-cache"):
        pool.push_to_hub("user/ike-pool")
        assert main(["inspect", "user/ike-pool"]) == 0
    assert "JSON only" in capsys.readouterr().out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert editpeft.load_editor("user/ike-pool").sha256 == pool.sha256
    model.add_edit("ike", FACTS[0], name="hub", editor="user/ike-pool")

    # a tampered pool, or one for another model, is refused
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config["extra"]["demonstrations"][0]["answer"] = "Berlin"
    (bad / "editor_config.json").write_text(json.dumps(config))
    with pytest.raises(editpeft.EditorFormatError, match="content_sha256"):
        editpeft.load_editor(bad)
    other = editpeft.enable_editing(editpeft.testing.make_tiny_model("gpt2", tok), tok)
    with pytest.raises(editpeft.BaseModelMismatchError):
        other.add_edit("ike", FACTS[0], editor=folder)
    assert not other.edits


def test_cli_builds_a_pool(tmp_path, tiny_tokenizer, data, capsys):
    model = editpeft.testing.make_tiny_model("llama", tiny_tokenizer)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    assert main(["train", "ike", "--data", str(data), "--out", str(tmp_path / "p"), "--model", str(tmp_path / "m"),
                 "--config", '{"per_case": 1}', "--no-progress"]) == 0
    assert "built the ike editor from 4 records" in capsys.readouterr().out
    assert not (tmp_path / "p" / "editor_model.safetensors").exists()


def test_router_prepends_the_nearest_fact_per_row_and_generate_follows(tiny, pool, tmp_path):
    model, tok = tiny
    model.add_edit("ike", FACTS[0], name="facts", editor=pool, config={"generation_room": 8, "k": 4})
    adapter = model.add_edit("ike", FACTS[1:], name="facts", editor=pool, append=True)
    assert len(adapter) == 3 and adapter.hparams["k"] == 4
    enc = tok(QUERIES, return_tensors="pt", padding=True)
    routes = adapter.decide(model, Prompts(enc["input_ids"], enc["attention_mask"], tok))
    assert [r.entry for r in routes] == [2, 0, 1]
    for route, fact in zip(routes, [FACTS[2], FACTS[0], FACTS[1]]):
        text = tok.decode(route.prefix)
        assert text.endswith(f"New Fact: {fact.prompt} {fact.target_new}\nPrompt:\n")
        assert len(route.prefix) <= 128 - 8

    # each row is computed as the base model on prefix + its own tokens, through generate too
    tok.padding_side = "left"
    enc = tok(QUERIES, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    with model.disabled_edits():
        for row, route in enumerate(routes):
            ids = torch.tensor([list(route.prefix) + tok(QUERIES[row])["input_ids"]])
            alone = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False, pad_token_id=0)
            assert out[row, -3:].tolist() == alone[0, -3:].tolist()
    # the adapter saves and reloads with its facts, keys and chosen demonstrations
    adapter.save_pretrained(tmp_path / "facts")
    model.remove_edit("facts")
    reloaded = model.load_edit(tmp_path / "facts")
    assert reloaded.chosen == adapter.chosen and torch.equal(reloaded.keys, adapter.keys)
    assert model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0).tolist() == out.tolist()


def test_min_similarity_leaves_far_rows_to_the_base_model(tiny, pool):
    model, tok = tiny
    adapter = model.add_edit("ike", FACTS[0], editor=pool, config={"min_similarity": 0.5})
    enc = tok(["The Eiffel Tower is in", "A fact about the river"], return_tensors="pt", padding=True)
    routes = adapter.decide(model, Prompts(enc["input_ids"], enc["attention_mask"], tok))
    assert routes[0] is not None and routes[1] is None


def test_bad_input_is_refused_and_the_model_untouched(tiny, pool, tmp_path):
    model, tok = tiny
    snap = params_snapshot(model)
    with pytest.raises(editpeft.EditorRequiredError, match="editpeft train ike"):
        model.add_edit("ike", FACTS[0])
    for config, message in [({"k": -1}, "k must be"), ({"kind_ratio": [0, 0, 0]}, "kind_ratio"),
                            ({"min_similarity": 2.0}, "min_similarity"), ({"max_context": 4}, "max_context")]:
        with pytest.raises(editpeft.ConfigError, match=message):
            model.add_edit("ike", FACTS[0], editor=pool, config=config)
    assert not model.edits
    assert_untouched(model, snap)

    model.add_edit("ike", FACTS[0], name="e", editor=pool)
    model.edits["e"].save_pretrained(tmp_path / "e")
    model.remove_edit("e")
    config = json.loads((tmp_path / "e" / "edit_config.json").read_text())
    config["extra"]["chosen"] = [[999]]
    (tmp_path / "e" / "edit_config.json").write_text(json.dumps(config))
    with pytest.raises(editpeft.EditError):
        model.load_edit(tmp_path / "e")
    assert not model.edits
    assert_untouched(model, snap)


def test_quotas_follow_the_ratio():
    from editpeft_ike import IkeConfig
    assert IkeConfig(k=8).quotas() == {"copy": 1, "update": 3, "retain": 4}
    assert sum(IkeConfig(k=5).quotas().values()) == 5
    assert IkeConfig(k=0).quotas() == {"copy": 0, "update": 0, "retain": 0}


# -- the embedded model (slow tier) ------------------------------------------------------------
#: a known fact IKE overturns on SmolLM2 (measured: log P(" Ag") -7.85 -> -0.41, top-1). The Eiffel Tower's
#: "Paris" is held more firmly: log P(" Rome") rises from -5.17 to -0.97 but " Paris" stays top-1.
GOLD = EditRequest(prompt="The chemical symbol for gold is", subject="gold", target_new="Ag", target_true="Au")
UNRELATED = ["The capital of Japan is", "The chemical symbol for iron is"]


@pytest.mark.slow
def test_known_fact_changes_in_context_and_unrelated_prompts_keep_their_answers(smol, tmp_path):
    """A pool from the zsRE training sample (skipped without ../shared/data) teaches SmolLM2 to
    answer with the new fact; unrelated prompts keep their answers (also when the nearest fact is
    prepended to them, the paper's setting), and greedy generation starts with the new target."""
    data = SHARED / "zsre" / "zsre_mend_train_1k.json"
    if not data.is_file():
        pytest.skip(f"{data} is not here")
    model, tok = smol
    snap = params_snapshot(model)
    pool = editpeft.train_editor("ike", model, tok, data, out=tmp_path / "pool", progress=False)
    prompts = [GOLD.prompt] + UNRELATED
    before = greedy_next_tokens(model, tok, prompts)
    assert before[0] == target_token_ids(tok, GOLD.prompt, "Au")[0]
    model.add_edit("ike", GOLD, name="e", editor=pool)
    try:
        after = greedy_next_tokens(model, tok, prompts)
        assert after[0] == target_token_ids(tok, GOLD.prompt, "Ag")[0]
        assert after[1:] == before[1:]
        tok.padding_side = "left"
        enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        assert texts[0].strip().startswith("Ag")
        with model.disabled_edits():
            base = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
        assert out[1:, enc["input_ids"].shape[1]][:1].tolist() == base[1:, enc["input_ids"].shape[1]][:1].tolist()
    finally:
        model.remove_edit("e")
    assert_untouched(model, snap)
