"""SERAC: the scope classifier routes each row, the counterfactual model answers in-scope rows with
the edit's descriptor prepended (forward and generate), out-of-scope rows are the base model's
bitwise; the adapter holds only the memory and finds its editor again on load."""
from __future__ import annotations

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.errors import EditorFormatError, EditorRequiredError
from editpeft.testing import DEFAULT_REQUEST, TOY_EDITOR_REQUESTS, make_tiny_model, train_toy_editor
from editpeft.tokens import TargetBatch, greedy_next_tokens, target_token_ids

from conftest import TINY_CONFIGS

CFG = TINY_CONFIGS["serac"]
OTHER = "Berlin, London, Madrid"


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    """(model, tokenizer, editor): a tiny llama and a SERAC editor trained 20 steps on the toy requests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    tok = tiny_tokenizer
    model = editpeft.enable_editing(make_tiny_model("llama", tok), tok)
    editor = train_toy_editor("serac", model, tok, CFG, steps=20)
    yield model, tok, editor
    torch.set_num_threads(threads)


@pytest.fixture
def clean(trained):
    model, tok, editor = trained
    for name in list(model.edits):
        model.remove_edit(name)
    return model, tok, editor


def _prompt(r: EditRequest) -> str:
    return r.prompt.replace("{}", r.subject or "")


def test_in_scope_rows_go_to_the_counterfactual_model_and_others_stay_bitwise(clean):
    model, tok, editor = clean
    tok.padding_side = "left"
    prompts = [_prompt(DEFAULT_REQUEST), OTHER]
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        base = model(**enc).logits
        base_tokens = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    adapter = model.add_edit("serac", DEFAULT_REQUEST, name="m", editor=editor)
    routes = adapter.decide(model, editpeft.routing.Prompts(enc["input_ids"], enc["attention_mask"], tok))
    assert routes[0] is not None and routes[0].entry == 0 and routes[1] is None
    with torch.no_grad():
        edited = model(**enc).logits
    assert torch.equal(edited[1], base[1])            # bitwise: the out-of-scope row runs the base model as is
    assert not torch.equal(edited[0], base[0])
    target = target_token_ids(tok, _prompt(DEFAULT_REQUEST), DEFAULT_REQUEST.target_new)[0]
    assert greedy_next_tokens(model, tok, [_prompt(DEFAULT_REQUEST)])[0] == target
    tokens = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(tokens[1], base_tokens[1])
    assert int(tokens[0, enc["input_ids"].shape[1]]) == target


def test_the_counterfactual_model_reads_the_descriptor_before_the_query(clean):
    """The in-scope row's logits are those of the counterfactual model on descriptor + prompt."""
    from editpeft_serac import describe
    model, tok, editor = clean
    model.add_edit("serac", DEFAULT_REQUEST, name="m", editor=editor)
    _, cf = editor.modules(torch.device("cpu"))
    prefix = tok(describe(editor.hparams["descriptor"], DEFAULT_REQUEST))["input_ids"]
    ids = torch.tensor([prefix + tok(_prompt(DEFAULT_REQUEST))["input_ids"]])
    with torch.no_grad():
        want = cf(input_ids=ids).logits[0, -1]
        got = model(**tok([_prompt(DEFAULT_REQUEST)], return_tensors="pt")).logits[0, -1]
    assert torch.equal(got, want)                     # bitwise: the same model on the same ids, no padding


def test_save_load_finds_the_editor_again_and_refuses_without_it(clean, tmp_path, monkeypatch):
    """A local editor is recorded by its folder name (no absolute path goes into a shareable
    adapter), found again relative to the working directory; a Hub editor by its repo id."""
    model, tok, editor = clean
    monkeypatch.chdir(tmp_path)
    editor_dir = tmp_path / "editor"
    editor.save_pretrained(editor_dir)
    from_folder = editpeft.load_editor(editor_dir)
    adapter = model.add_edit("serac", DEFAULT_REQUEST, name="m", editor=from_folder)
    adapter.save_pretrained(tmp_path / "m")
    logits = _logits(model, tok)
    model.remove_edit("m")
    again = model.load_edit(tmp_path / "m")                  # the editor named in edit_config.json
    assert torch.equal(_logits(model, tok), logits)          # bitwise: the same memory, the same models
    assert len(again) == 1 and again.embeddings.shape == (1, 384)
    model.remove_edit("m")
    import shutil
    shutil.rmtree(editor_dir)
    with pytest.raises(EditorRequiredError, match="editor="):
        model.load_edit(tmp_path / "m")
    assert not model.edits
    model.load_edit(tmp_path / "m", editor=editor)           # given explicitly
    assert torch.equal(_logits(model, tok), logits)


def test_another_editor_is_refused_on_load(clean, tmp_path):
    model, tok, editor = clean
    model.add_edit("serac", DEFAULT_REQUEST, name="m", editor=editor).save_pretrained(tmp_path / "m")
    model.remove_edit("m")
    other = train_toy_editor("serac", model, tok, CFG, steps=1)
    with pytest.raises(EditorFormatError, match="not the one"):
        model.load_edit(tmp_path / "m", editor=other)
    assert not model.edits


def test_append_adds_to_the_memory_and_routes_to_the_nearest_edit(clean):
    model, tok, editor = clean
    first, second = TOY_EDITOR_REQUESTS[0], TOY_EDITOR_REQUESTS[2]
    model.add_edit("serac", first, name="m", editor=editor)
    adapter = model.add_edit("serac", second, name="m", append=True, editor=editor)
    assert len(adapter) == 2 and adapter.embeddings.shape == (2, 384)
    enc = tok([_prompt(first), _prompt(second)], return_tensors="pt", padding=True)
    routes = adapter.decide(model, editpeft.routing.Prompts(enc["input_ids"], enc["attention_mask"], tok))
    assert [r.entry if r else None for r in routes] == [0, 1]


def test_training_lowers_both_losses(trained):
    model, tok, editor = trained
    from editpeft_serac import Serac, SeracConfig
    cfg = SeracConfig(**CFG)
    fresh = train_toy_editor("serac", model, tok, CFG, steps=0)
    batch = list(TOY_EDITOR_REQUESTS)
    with torch.no_grad():
        before = Serac().editor_step(fresh.to("cpu"), model, tok, batch, cfg)
        after = Serac().editor_step(editor, model, tok, batch, cfg)
    assert float(after["cls_loss"]) < float(before["cls_loss"])
    assert float(after["cf_nll"]) < float(before["cf_nll"])


def test_prefixed_batch_prepends_ids_and_shifts_positions(tiny_tokenizer):
    tok = tiny_tokenizer
    batch = TargetBatch.build(tok, ["Gold is", "The city that holds"], ["Au", "Rome"], [(0, 4), None])
    pre = batch.prefixed([[7, 8], [9]], pad=0)
    for i, k in enumerate((2, 1)):
        n = batch.prompt_len[i] + len(batch.target_ids[i])
        assert pre.input_ids[i, :k].tolist() == [[7, 8], [9]][i]
        assert torch.equal(pre.input_ids[i, k:k + n], batch.input_ids[i, :n])
        assert pre.prompt_len[i] == batch.prompt_len[i] + k
        assert torch.equal(pre.target_positions(i), batch.target_positions(i) + k)
    assert pre.subject_last[0] == batch.subject_last[0] + 2 and pre.subject_last[1] == -1


def _logits(model, tok):
    tok.padding_side = "left"
    enc = tok([_prompt(DEFAULT_REQUEST), OTHER], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits
