"""Integration on the embedded SmolLM2-135M-Instruct (slow tier): facts the model knows."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from editpeft import EditRequest
from editpeft.tokens import greedy_next_tokens, next_token_logits, target_token_ids

from conftest import assert_untouched, logits_of, params_snapshot

pytestmark = pytest.mark.slow

EIFFEL = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                     target_new="Rome", target_true="Paris")
GOLD = EditRequest(prompt="The chemical symbol for gold is", subject="gold", target_new="Ag", target_true="Au")
UNRELATED = ["The capital of France is", "The Colosseum is located in the city of",
             "The capital of Japan is", "The chemical symbol for iron is"]


def first_token(tok, req):
    return target_token_ids(tok, req.prompt, req.target_new)[0]


@pytest.fixture
def clean(smol):
    model, tok = smol
    snap = params_snapshot(model)
    yield model, tok
    for name in list(model.edits):
        model.remove_edit(name)
    assert_untouched(model, snap)


@pytest.mark.parametrize("method", ["rome", "grace", "memit", "alphaedit", "emmet", "t-patcher", "melo", "calinet"])
def test_known_fact_changes_and_unrelated_stay(clean, method):
    model, tok = clean
    prompts = [EIFFEL.prompt] + UNRELATED
    base = logits_of(model, tok, prompts)
    before = greedy_next_tokens(model, tok, prompts)
    assert before[0] == target_token_ids(tok, EIFFEL.prompt, "Paris")[0]
    model.add_edit(method, EIFFEL, name="e")
    after = greedy_next_tokens(model, tok, prompts)
    assert after[0] == first_token(tok, EIFFEL)
    assert after[1:] == before[1:]
    model.remove_edit("e")
    assert torch.equal(logits_of(model, tok, prompts), base)  # bitwise: edits off, every module runs its original code path


def test_knowledge_neurons_move_the_fact_towards_the_new_answer(clean):
    """KN (Dai et al. 2022) writes embeddings into a few neurons' value slots; on SmolLM2 with the
    paper's λ1 = 1, λ2 = 8 this raises the new answer by orders of magnitude but does not make it
    the top-1 answer, and it disturbs unrelated prompts (measured in cards/kn/llama.yaml). The test
    holds the part that works: the edit moves probability from the old answer to the new one."""
    model, tok = clean
    new, old = first_token(tok, EIFFEL), target_token_ids(tok, EIFFEL.prompt, "Paris")[0]
    before = next_token_logits(model, tok, [EIFFEL.prompt])[0].softmax(-1)
    adapter = model.add_edit("kn", EIFFEL, name="kn")
    after = next_token_logits(model, tok, [EIFFEL.prompt])[0].softmax(-1)
    assert after[new] > 100 * before[new] and after[old] < before[old]
    assert 1 <= sum(int((d.down != 0).sum()) for d in adapter.deltas.values()) <= 5


def test_stack_rome_and_grace(clean):
    model, tok = clean
    prompts = [EIFFEL.prompt, GOLD.prompt] + UNRELATED
    before = greedy_next_tokens(model, tok, prompts)
    model.add_edit("rome", EIFFEL, name="eiffel")
    model.add_edit("grace", GOLD, name="gold")
    assert list(model.edits) == ["eiffel", "gold"]
    after = greedy_next_tokens(model, tok, prompts)
    assert after[:2] == [first_token(tok, EIFFEL), first_token(tok, GOLD)]
    assert after[2:] == before[2:]
    model.remove_edit("eiffel")
    after = greedy_next_tokens(model, tok, prompts)
    assert after[0] == before[0] and after[1] == first_token(tok, GOLD)
    model.set_active_edits([])
    assert greedy_next_tokens(model, tok, prompts) == before


def test_save_load_in_fresh_process_identical(clean, tmp_path):
    model, tok = clean
    prompts = [EIFFEL.prompt, GOLD.prompt] + UNRELATED
    model.add_edit("rome", EIFFEL, name="eiffel").save_pretrained(tmp_path / "eiffel")
    model.add_edit("grace", GOLD, name="gold").save_pretrained(tmp_path / "gold")
    expected = logits_of(model, tok, prompts)
    size = sum(p.stat().st_size for p in (tmp_path / "eiffel").iterdir() if p.name != "README.md")
    assert size <= 20_000
    script = textwrap.dedent(f"""
        import sys, torch, editpeft
        from safetensors.torch import save_file
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from conftest import logits_of
        torch.set_num_threads(2)
        model, tok = editpeft.load_default_model()
        model = editpeft.enable_editing(model, tok)
        model.load_edit({str(tmp_path / 'eiffel')!r})
        model.load_edit({str(tmp_path / 'gold')!r})
        save_file({{"logits": logits_of(model, tok, {prompts!r})}}, {str(tmp_path / 'out.safetensors')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], expected)  # bitwise: another process, same kernels and 2 threads


def test_grace_sequential_appends_round_trip(clean, tmp_path):
    model, tok = clean
    facts = [EIFFEL, GOLD,
             EditRequest(prompt="The capital of Japan is", target_new="Seoul"),
             EditRequest(prompt="The Colosseum is located in the city of", target_new="London")]
    for i, r in enumerate(facts):
        model.add_edit("grace", r, name="memory", append=i > 0)
    adapter = model.edits["memory"]
    assert len(adapter.requests) == 4
    preds = greedy_next_tokens(model, tok, [r.prompt for r in facts])
    assert preds == [first_token(tok, r) for r in facts]
    adapter.save_pretrained(tmp_path / "memory")
    expected = logits_of(model, tok, [r.prompt for r in facts])
    model.remove_edit("memory")
    loaded = model.load_edit(tmp_path / "memory")
    for k, v in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)  # bitwise: safetensors round trip
    assert torch.equal(logits_of(model, tok, [r.prompt for r in facts]), expected)  # bitwise: reloaded factors, same hooks


def test_mismatched_base_model_refused(clean, tmp_path, tiny_tokenizer):
    import editpeft
    from conftest import make_tiny_model
    model, tok = clean
    model.add_edit("rome", EIFFEL, name="eiffel").save_pretrained(tmp_path / "eiffel")
    other = editpeft.enable_editing(make_tiny_model("llama", tiny_tokenizer), tiny_tokenizer)
    with pytest.raises(editpeft.BaseModelMismatchError):
        other.load_edit(tmp_path / "eiffel")


KNOWN_CASES = [
    {"case_id": i, "prompt": p, "subject": s, "target_new": new, "ground_truth": true,
     "rephrase_prompt": r, "locality_prompt": "The capital of Japan is", "locality_ground_truth": "Tokyo"}
    for i, (p, s, new, true, r) in enumerate([
        ("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome", "Paris",
         "Where is the Eiffel Tower? It is in the city of"),
        ("The chemical symbol for gold is", "gold", "Ag", "Au", "In chemistry, gold is written as"),
        ("The capital of France is", "France", "Berlin", "Paris", "France's capital city is"),
    ])]


def test_harness_unedited_and_edited(clean, tmp_path):
    """Unedited: reliability on the counterfactual targets is near 0 and the known facts are known.
    ROME through the harness: reliability 1, the locality probe kept, nothing left attached."""
    from editpeft.evaluation import CaseScorer, evaluate, load_cases
    model, tok = clean
    cases = load_cases(KNOWN_CASES)
    scorer = CaseScorer(model, tok)
    base = scorer.baseline(cases)
    unedited = scorer.score(cases, base)
    assert sum(s["reliability"]["token_em"] for s in unedited) / len(cases) <= 0.1
    assert all(s["reliability"]["prob_margin"] == 0.0 for s in unedited)     # the true object is preferred
    assert all(s["locality_answer"]["gen_em"] == 1.0 for s in unedited)      # the model knows Tokyo
    summary = evaluate(model, tok, "rome", cases, out=tmp_path, known_only=True, progress=False)["rome"]
    assert summary["counts"]["kept"] == 3 and summary["failed_edits"] == 0
    m = summary["metrics"]
    assert m["reliability"]["token_em"]["mean"] == 1.0 and m["reliability"]["prob_margin"]["mean"] == 1.0
    assert m["locality"]["gen_em"]["mean"] == 1.0
    assert not model.edits


def test_calinet_append_keeps_both_facts_and_round_trips(clean, tmp_path):
    """CaliNet (card hparams): a second fact appended trains the same 64 slots further with the first
    replayed; both edits hold, and the adapter reloads to bitwise the same logits."""
    model, tok = clean
    prompts = [EIFFEL.prompt, GOLD.prompt] + UNRELATED
    model.add_edit("calinet", EIFFEL, name="cal")
    adapter = model.add_edit("calinet", GOLD, name="cal", append=True)
    assert len(adapter) == 64 and len(adapter.requests) == 2
    assert greedy_next_tokens(model, tok, prompts[:2]) == [first_token(tok, EIFFEL), first_token(tok, GOLD)]
    expected = logits_of(model, tok, prompts)
    adapter.save_pretrained(tmp_path / "cal")
    model.remove_edit("cal")
    model.load_edit(tmp_path / "cal")
    assert torch.equal(logits_of(model, tok, prompts), expected)  # bitwise: same slots, same hook, same kernels
