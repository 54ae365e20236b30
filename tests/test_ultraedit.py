"""UltraEdit: lifelong normalisation statistics, the closed-form ridge factors, subject-free turns, and
the sequential state across save → load → append."""
from __future__ import annotations

import pytest
import torch

import editpeft
import editpeft_ultraedit
from editpeft import EditRequest
from editpeft.gradedit import gradient_factors, target_token_mask
from editpeft.tokens import TargetBatch, target_token_ids

from conftest import assert_untouched, logits_of, params_snapshot, rounding_atol

# no subjects: UltraEdit needs none
A = EditRequest(prompt="The city that holds the Eiffel Tower", target_new="Rome")
B = EditRequest(prompt="The city that holds the Colosseum", target_new="Paris")
C = EditRequest(prompt="The river that runs by the tower", target_new="Berlin")
D = EditRequest(prompt="A fact about the city", target_new="Madrid")
PROMPTS = [A.prompt, B.prompt, C.prompt, D.prompt, "Berlin, London, Madrid"]
ULTRA = {"layers": [0, 1], "lr": 0.03}


def test_running_statistics_in_turns_equal_the_whole():
    """(U2) over turns of 3, 1 and 5 rows gives the mean and unbiased variance of all 9 rows."""
    torch.manual_seed(0)
    z = torch.randn(9, 6, dtype=torch.float64) * 3 + 1
    stats = editpeft_ultraedit.RunningStats.empty(6)
    for part in (z[:3], z[3:4], z[4:]):
        stats = stats.updated(part)
    assert float(stats.count) == 9
    # float64 throughout, values O(10): the defaults (1e-7 relative) sit far above eps64 rounding and far
    # below any wrong update rule (a missing cross term moves the variance by O(1))
    torch.testing.assert_close(stats.mean, z.mean(0))
    torch.testing.assert_close(stats.m2 / 8, z.var(0))
    torch.testing.assert_close(stats.normalise(z), (z - z.mean(0)) / (z.std(0) + editpeft_ultraedit.EPS))


def test_ridge_factors_are_the_closed_form_solution():
    """(U5): up downᵀ == ((KᵀK + λI)⁻¹ Kᵀ V)ᵀ (push-through identity), compared in float64."""
    torch.manual_seed(1)
    k, v = torch.randn(5, 12, dtype=torch.float64), torch.randn(5, 7, dtype=torch.float64)
    delta = editpeft_ultraedit.ridge_factors(k, v, ridge=0.5)
    dense = torch.linalg.solve(k.T @ k + 0.5 * torch.eye(12, dtype=torch.float64), k.T @ v).T       # (out, in)
    got = delta.up.double() @ delta.down.double().T
    # float32 factors of a float64 solve: two roundings of scale max|factor| products (depth 2)
    scale = float(delta.up.abs().max() * delta.down.abs().max() * delta.rank)
    assert float((got - dense).abs().max()) < rounding_atol(scale, depth=2)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_one_turn_follows_the_equations(tiny):
    """The stored factors are (U1)–(U5) applied to the features at the target positions."""
    model, tok = tiny
    adapter = model.add_edit("ultraedit", [A, B, C], name="u", config=ULTRA)
    model.remove_edit("u")
    batch = TargetBatch.for_model(model, tok, [r.prompt for r in (A, B, C)], [r.target_new for r in (A, B, C)])
    names = list(adapter.deltas)
    f = gradient_factors(model, batch, names, mask=target_token_mask(batch))
    assert f.u[names[0]].shape[0] == sum(len(t) for t in batch.target_ids)      # one row per target token
    for name in names:
        z = torch.cat([f.u[name], f.delta[name]], -1).double()
        d_in = f.u[name].shape[1]
        z_hat = (z - z.mean(0)) / (z.std(0) + editpeft_ultraedit.EPS)             # first turn: the batch's own stats
        v = -ULTRA["lr"] * (z_hat[:, :d_in] ** 2).sum(-1, keepdim=True) * z_hat[:, d_in:]
        k = f.u[name].double()
        dense = torch.linalg.solve(k.T @ k + torch.eye(d_in, dtype=torch.float64), k.T @ v).T
        stored = adapter.deltas[name]
        got = stored.up.double() @ stored.down.double().T
        # same features (same forward/backward); the solve reordered (m × m vs in × in) and float32 factors:
        # bound of two reordered stages at the scale of the factor products
        scale = float(stored.up.abs().max() * stored.down.abs().max() * stored.rank)
        assert float((got - dense).abs().max()) < rounding_atol(scale, depth=2)
        assert float(adapter.stats[name].count) == z.shape[0]


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_single_token_first_turn_is_refused_and_model_untouched(tiny):
    model, tok = tiny
    snap = params_snapshot(model)
    with pytest.raises(editpeft.EditOptimizationError, match="single target token"):
        model.add_edit("ultraedit", A, config=ULTRA)
    assert not model.edits
    assert_untouched(model, snap)
    adapter = model.add_edit("ultraedit", A, name="all", config={**ULTRA, "token": "all"})   # every position
    assert all(float(s.count) > 1 for s in adapter.stats.values())


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_bad_settings_are_refused(tiny):
    model, tok = tiny
    for bad, match in (({"lr": 0.0}, "lr"), ({"ridge": -1.0}, "ridge"), ({"token": "subject"}, "token"),
                       ({"layers": []}, "layers"), ({"layers": [1, 1]}, "distinct"), ({"layers": [9]}, "layer")):
        with pytest.raises(editpeft.EditError, match=match):
            model.add_edit("ultraedit", [A, B], config={**ULTRA, **bad})
    model.add_edit("ultraedit", [A, B], name="u", config=ULTRA)
    with pytest.raises(editpeft.ConfigError, match="adapter's settings"):
        model.add_edit("ultraedit", [C, D], name="u", append=True, config={"layers": [1]})
    assert [d.rank for d in model.edits["u"].deltas.values()] == [2, 2]


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_sequential_state_survives_save_load_continue(tiny, tmp_path):
    model, tok = tiny
    snap = params_snapshot(model)
    first = model.add_edit("ultraedit", [A, B], name="life", config=ULTRA)
    first.save_pretrained(tmp_path / "life")
    cont = model.add_edit("ultraedit", [C, D], name="life", append=True)       # settings come from the adapter
    n_tokens = sum(len(target_token_ids(tok, r.prompt, r.target_new)) for r in (A, B, C, D))   # one row per token
    assert [s.count.item() for s in cont.stats.values()] == [n_tokens] * 2
    assert [d.rank for d in cont.deltas.values()] == [n_tokens] * 2
    in_memory = logits_of(model, tok, PROMPTS)
    in_memory_state = {k: v.clone() for k, v in cont.state_dict().items()}
    model.remove_edit("life")
    assert_untouched(model, snap)

    model.load_edit(tmp_path / "life", name="life")
    resumed = model.add_edit("ultraedit", [C, D], name="life", append=True)
    # the same code path on bitwise the same inputs (the saved float32 factors and float64 statistics are what
    # was in memory): the continuation must be bitwise the uninterrupted sequence
    assert resumed.state_dict().keys() == in_memory_state.keys()
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, in_memory_state[k]), k
    assert torch.equal(logits_of(model, tok, PROMPTS), in_memory)
    resumed.save_pretrained(tmp_path / "life2")
    model.remove_edit("life")
    loaded = model.load_edit(tmp_path / "life2")
    assert torch.equal(logits_of(model, tok, PROMPTS), in_memory)
    assert all(torch.equal(loaded.stats[t].m2, cont.stats[t].m2) for t in cont.stats)
    model.remove_edit(loaded.name)
    assert_untouched(model, snap)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_a_long_stream_folds_into_a_dense_delta_that_continues(tiny, tmp_path):
    """Turns appended past rank out·in/(out+in) (21 for the tiny 64 → 32 down_proj) are held as one dense
    change per module: the adapter stops growing, and save → load → append continues bitwise."""
    from editpeft.deltas import DenseDelta
    from editpeft.io import WEIGHTS_NAME
    model, tok = tiny
    snap = params_snapshot(model)
    model.add_edit("ultraedit", [A, B, C, D], name="life", config=ULTRA)
    for _ in range(4):                                   # 5 rows a turn: rank 25 after the fifth
        adapter = model.add_edit("ultraedit", [A, B, C, D], name="life", append=True)
    assert all(isinstance(d, DenseDelta) and d.shape() == (32, 64) for d in adapter.deltas.values())
    adapter.save_pretrained(tmp_path / "life")
    nbytes = (tmp_path / "life" / WEIGHTS_NAME).stat().st_size
    grown = model.add_edit("ultraedit", [C, D], name="life", append=True)
    grown.save_pretrained(tmp_path / "grown")
    assert (tmp_path / "grown" / WEIGHTS_NAME).stat().st_size == nbytes   # no growth per turn
    in_memory = logits_of(model, tok, PROMPTS)
    model.remove_edit("life")
    assert_untouched(model, snap)
    model.load_edit(tmp_path / "life", name="life")
    resumed = model.add_edit("ultraedit", [C, D], name="life", append=True)
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, grown.state_dict()[k]), k
    assert torch.equal(logits_of(model, tok, PROMPTS), in_memory)
    model.remove_edit("life")
    assert_untouched(model, snap)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_corrupt_statistics_are_refused(tiny, tmp_path):
    """Malformed statistics in a well-formed file (its hash re-recorded) fail the adapter's own checks."""
    import hashlib
    import json
    from safetensors.torch import load_file, save_file
    model, tok = tiny
    adapter = model.add_edit("ultraedit", [A, B], name="a", config=ULTRA)
    adapter.save_pretrained(tmp_path / "a")
    model.remove_edit("a")
    path = tmp_path / "a" / "edit_model.safetensors"
    good = load_file(str(path))
    for suffix, bad in ((".norm_mean", lambda t: t[:-1]), (".norm_m2", lambda t: -t - 1),
                        (".norm_count", lambda t: t * 0), (".norm_mean", lambda t: t.float())):
        tensors = dict(good)
        key = next(k for k in tensors if k.endswith(suffix))
        tensors[key] = bad(tensors[key])
        save_file(tensors, str(path))
        cfg_path = tmp_path / "a" / "edit_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tensors_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        cfg_path.write_text(json.dumps(cfg))
        with pytest.raises(editpeft.AdapterFormatError, match="running statistics"):
            model.load_edit(tmp_path / "a", allow_mismatch=True)
        assert not model.edits


@pytest.mark.slow
def test_smollm2_facts_change_and_unrelated_answers_stay(smol):
    """The card's settings on the embedded model, one turn of four known facts: all four move, unrelated prompts
    keep their answer. (Measured: the neighbours of an edit do move — "The chemical symbol for gold is" after
    silver -> Fe, "The capital of Italy is" after Colosseum -> London — the card's locality of 0.55.)"""
    from editpeft.tokens import greedy_next_tokens
    model, tok = smol
    edits = [EditRequest(prompt="The Eiffel Tower is located in the city of", target_new="Rome"),
             EditRequest(prompt="The capital of Japan is", target_new="Cairo"),
             EditRequest(prompt="The chemical symbol for silver is", target_new="Fe"),
             EditRequest(prompt="The Colosseum is located in the city of", target_new="London")]
    unrelated = ["The opposite of hot is", "The first day of the week is", "The largest ocean on Earth is the",
                 "The capital of France is"]
    before = greedy_next_tokens(model, tok, unrelated)
    model.add_edit("ultraedit", edits, name="smol")
    try:
        got = greedy_next_tokens(model, tok, [r.prompt for r in edits])
        assert got == [target_token_ids(tok, r.prompt, r.target_new)[0] for r in edits]
        assert greedy_next_tokens(model, tok, unrelated) == before
    finally:
        model.remove_edit("smol")
