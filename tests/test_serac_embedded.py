"""SERAC on the embedded SmolLM2-135M-Instruct (slow tier): a small editor trained here on a few
facts, then a known fact changes for its prompt and a paraphrase, through generate too, while
unrelated prompts keep their answers bitwise (they are not routed)."""
from __future__ import annotations

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import assert_untouched, logits_of, params_snapshot

pytestmark = pytest.mark.slow

EIFFEL = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome",
                     paraphrases=("Where is the Eiffel Tower? It is in the city of",))
UNRELATED = ["The capital of France is", "The chemical symbol for iron is", "The largest planet of the solar system is"]
#: training facts: other subjects, their paraphrases, and unrelated prompts as the classifier's negatives
TRAIN = [EIFFEL] + [
    EditRequest(prompt=p, subject=s, target_new=t, paraphrases=(q,), locality=(n,))
    for p, s, t, q, n in [
        ("The Colosseum is located in the city of", "Colosseum", "Madrid", "Where is the Colosseum? In the city of",
         "The capital of Germany is"),
        ("The mother tongue of Pablo Picasso is", "Pablo Picasso", "German",
         "Pablo Picasso grew up speaking", "The currency of Japan is the"),
        ("The Louvre is located in the city of", "Louvre", "Tokyo", "Where is the Louvre? In the city of",
         "Water is made of hydrogen and"),
        ("Albert Einstein was born in the country of", "Albert Einstein", "Brazil",
         "The birthplace of Albert Einstein is the country of", "The tallest mountain on Earth is"),
        ("The official language of Italy is", "Italy", "Swedish", "In Italy, people mainly speak",
         "The author of Hamlet is"),
    ]]


@pytest.fixture(scope="module")
def serac_editor(smol):
    model, tok = smol
    torch.manual_seed(0)
    return editpeft.train_editor("serac", model, tok, TRAIN, steps=16, batch_size=3, lr=3e-5, seed=0, progress=False)


def test_serac_changes_a_known_fact_and_leaves_unrelated_prompts(smol, serac_editor):
    model, tok = smol
    snap = params_snapshot(model)
    prompts = [EIFFEL.prompt, EIFFEL.paraphrases[0]] + UNRELATED
    base = logits_of(model, tok, prompts)
    rome = target_token_ids(tok, EIFFEL.prompt, "Rome")[0]
    assert greedy_next_tokens(model, tok, [EIFFEL.prompt])[0] == target_token_ids(tok, EIFFEL.prompt, "Paris")[0]
    model.add_edit("serac", EIFFEL, name="memory", editor=serac_editor)
    try:
        after = greedy_next_tokens(model, tok, prompts)
        assert after[:2] == [rome, rome]
        edited = logits_of(model, tok, prompts)
        # bitwise: the unrelated rows are not routed, the base model computes them as before
        assert torch.equal(edited[2:], base[2:])
        enc = tok([EIFFEL.prompt], return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
        assert int(out[0, enc["input_ids"].shape[1]]) == rome
    finally:
        model.remove_edit("memory")
    assert torch.equal(logits_of(model, tok, prompts), base)   # bitwise: the router is gone
    assert_untouched(model, snap)
