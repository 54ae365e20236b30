"""AlphaEdit: null-space projection, reduction to MEMIT, sequential state across save/load;
EMMET and r-ROME on the same core."""
from __future__ import annotations

import pytest
import torch

import editpeft
import editpeft.locate
import editpeft_alphaedit
import editpeft_memit
from editpeft import EditRequest
from editpeft.arch import get_arch, linear_dims
from editpeft.tokens import greedy_next_tokens, target_token_ids

from conftest import assert_close_reordered, assert_untouched, logits_of, params_snapshot, rounding_atol

VALUE = {"v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0, "stats_tokens": 4000,
         "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
A = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
B = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Paris")
C = EditRequest(prompt="The river that runs by the {}", subject="tower", target_new="Berlin")
D = EditRequest(prompt="A fact about the {}", subject="city", target_new="Madrid")
PROMPTS = [A.prompt, B.prompt, C.prompt, D.prompt, "Berlin, London, Madrid"]
ALPHA = {"layers": [0, 1], "nullspace_threshold": 1.0, "l2": 0.1, **VALUE}


def test_projector_spans_the_small_eigenvalues_and_update_avoids_preserved_keys():
    torch.manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    mom2 = basis @ torch.diag(torch.tensor([5.0, 3.0, 2.0, 1e-3, 1e-4, 1e-5], dtype=torch.float64)) @ basis.T
    proj = editpeft_alphaedit.null_space_projector(mom2, threshold=1e-2)
    torch.testing.assert_close(proj @ proj, proj)      # float64 defaults (1e-7) ≫ eps64 rounding; a non-projector is O(1) off
    assert round(float(proj.trace())) == 3
    down = editpeft_alphaedit.null_space_direction(proj, torch.randn(2, 6), None, l2=0.5)
    preserved = basis[:, :3]                                       # the large-eigenvalue directions
    # exact in float64; what is left is down's float32 rounding (one stage of its scale)
    assert float((preserved.T @ down.double()).abs().max()) < rounding_atol(down.abs().max(), depth=1)
    with pytest.raises(editpeft.EditOptimizationError, match="null space is empty"):
        editpeft_alphaedit.null_space_projector(mom2, threshold=1e-9)


def test_empty_preserved_set_solves_memit_rule():
    """P = I: AlphaEdit's Eq. 14 is MEMIT's Eq. 14 with λC replaced by the ridge αI."""
    keys = torch.randn(3, 8)
    alpha = editpeft_alphaedit.null_space_direction(torch.eye(8, dtype=torch.float64), keys, None, l2=0.7)
    memit = editpeft_memit.spread_direction(torch.eye(8), keys, weight=0.7)
    assert_close_reordered(alpha, memit, depth=1)       # one linear solve each, reordered (float64 P vs float32 C)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_empty_preserved_set_reduces_to_memit(tiny, monkeypatch):
    model, tok = tiny
    model.add_edit("alphaedit", [A, B], name="a", config={**ALPHA, "preserve": False, "l2": 1.0})
    alpha = logits_of(model, tok, PROMPTS)
    model.remove_edit("a")
    monkeypatch.setattr(editpeft.locate, "second_moment",
                        lambda m, t, name, **kw: torch.eye(linear_dims(m.get_submodule(name))[0]))
    model.add_edit("memit", [A, B], name="m", config={**VALUE, "layers": [0, 1], "mom2_update_weight": 1.0})
    memit = logits_of(model, tok, PROMPTS)
    # same value optimisation (same seed); the two rules' solves are reordered: 1 solve + 2 blocks + head
    assert_close_reordered(alpha, memit, depth=4)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_sequential_state_survives_save_load_continue(tiny, tmp_path):
    model, tok = tiny
    snap = params_snapshot(model)
    first = model.add_edit("alphaedit", [A, B], name="life", config=ALPHA)
    assert all(k.shape[1] == 2 for k in first.keys.values())
    first.save_pretrained(tmp_path / "life")
    cont = model.add_edit("alphaedit", [C, D], name="life", append=True)       # settings come from the adapter
    assert [r.subject for r in cont.requests] == ["Eiffel Tower", "Colosseum", "tower", "city"]
    assert all(k.shape[1] == 4 for k in cont.keys.values()) and all(d.rank == 4 for d in cont.deltas.values())
    in_memory = logits_of(model, tok, PROMPTS)
    in_memory_state = {k: v.clone() for k, v in cont.state_dict().items()}
    model.remove_edit("life")
    assert_untouched(model, snap)

    model.load_edit(tmp_path / "life", name="life")
    resumed = model.add_edit("alphaedit", [C, D], name="life", append=True)
    # the continuation solves from reloaded float32 state instead of the in-memory one: reordered
    # float32 sums in the solve (1) and the forward (2 blocks + head)
    assert_close_reordered(logits_of(model, tok, PROMPTS), in_memory, depth=4)
    for k, v in resumed.state_dict().items():
        assert_close_reordered(v, in_memory_state[k], depth=4)      # the factors of that solve (same bound)
    resumed.save_pretrained(tmp_path / "life2")
    model.remove_edit("life")
    loaded = model.load_edit(tmp_path / "life2")
    assert_close_reordered(logits_of(model, tok, PROMPTS), in_memory, depth=4)      # as above
    assert loaded.keys.keys() == resumed.keys.keys()
    model.remove_edit(loaded.name)
    assert_untouched(model, snap)


def test_earlier_keys_folded_into_a_gram_factor_give_the_same_update():
    """Eq. 14 reads the earlier keys Kp only as Kp Kpᵀ: past in columns the adapter keeps a square F with
    F Fᵀ = Kp Kpᵀ, and the update is the same. float64 keys (eigh and solve in float64, ~1e-15 of the
    values' scale); the returned factor is float32, so they agree to its rounding."""
    g = torch.Generator().manual_seed(0)
    dim = 16
    earlier = torch.randn(dim, 40, generator=g, dtype=torch.float64)
    folded = editpeft_alphaedit.gram_factor(earlier)
    assert folded.shape == (dim, dim)
    assert torch.equal(editpeft_alphaedit.gram_factor(earlier[:, :dim]), earlier[:, :dim])   # not yet wider
    torch.testing.assert_close(folded @ folded.T, earlier @ earlier.T, rtol=0,
                               atol=float((earlier @ earlier.T).abs().max()) * 1e-12)
    keys = torch.randn(5, dim, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    proj = q[:, :10] @ q[:, :10].T                         # a projector onto a 10-dim subspace
    want = editpeft_alphaedit.null_space_direction(proj, keys, earlier, l2=1.0)
    got = editpeft_alphaedit.null_space_direction(proj, keys, folded, l2=1.0)
    torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2 ** -22)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_a_long_sequence_keeps_square_state(tiny, tmp_path):
    """Appends past the key width (64 for the tiny down_proj) keep keys at 64 × 64 and the deltas as
    one dense change per module; the sequence continues after save → load."""
    from editpeft.deltas import DenseDelta
    model, tok = tiny
    snap = params_snapshot(model)
    cities = ["Rome", "Paris", "Berlin", "Madrid", "London", "Tokyo"]
    batch = [EditRequest(prompt="A fact about the {}", subject=f"city {i}", target_new=cities[i % 6])
             for i in range(36)]
    model.add_edit("alphaedit", batch[:18], name="life", config={**ALPHA, "v_steps": 5})
    adapter = model.add_edit("alphaedit", batch, name="life", append=True)          # 54 keys
    assert all(k.shape == (64, 54) for k in adapter.keys.values())
    adapter = model.add_edit("alphaedit", batch[18:], name="life", append=True)    # 72 > 64
    assert all(k.shape == (64, 64) for k in adapter.keys.values())
    assert all(isinstance(d, DenseDelta) for d in adapter.deltas.values())
    adapter.save_pretrained(tmp_path / "life")
    model.remove_edit("life")
    assert_untouched(model, snap)
    model.load_edit(tmp_path / "life", name="life")
    again = model.add_edit("alphaedit", batch[:4], name="life", append=True)
    assert all(k.shape == (64, 64) for k in again.keys.values()) and len(again.requests) == 76
    model.remove_edit("life")
    assert_untouched(model, snap)


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_corrupt_keys_are_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file
    model, tok = tiny
    adapter = model.add_edit("alphaedit", A, name="a", config=ALPHA)
    adapter.save_pretrained(tmp_path / "a")
    model.remove_edit("a")
    path = tmp_path / "a" / "edit_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".keys"))
    tensors[key] = tensors[key][:-1]
    save_file(tensors, str(path))
    with pytest.raises(editpeft.AdapterFormatError):
        model.load_edit(tmp_path / "a", allow_mismatch=True)
    assert not model.edits


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_emmet_with_one_edit_is_rome(tiny):
    """EMMET's equality-constrained update for one key is ROME's rank-one update exactly."""
    model, tok = tiny
    rome = model.add_edit("rome", A, name="r", config={"layer": 1, **VALUE})
    r_logits = logits_of(model, tok, PROMPTS)
    model.remove_edit("r")
    emmet = model.add_edit("emmet", A, name="e", config={"layers": [1], "ridge": 0.0, **VALUE})
    # EMMET's batch solve vs ROME's rank-one formula: reordered float32, 1 solve + 2 blocks + head
    assert_close_reordered(logits_of(model, tok, PROMPTS), r_logits, depth=4)
    (r_delta,), (e_delta,) = rome.deltas.values(), emmet.deltas.values()
    assert_close_reordered(e_delta.down, r_delta.down, depth=1)    # the two solves, reordered


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_emmet_batch_meets_every_constraint(tiny):
    model, tok = tiny
    model.add_edit("emmet", [A, B, C], name="e", config={"layers": [1], "ridge": 0.0, **VALUE})
    got = greedy_next_tokens(model, tok, [A.prompt, B.prompt, C.prompt])
    assert got == [target_token_ids(tok, r.prompt, r.target_new)[0] for r in (A, B, C)]


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_rrome_key_mode(tiny):
    """r-ROME (averaged key) maps k* exactly; the original ('prompt') maps the bare prompt's key."""
    model, tok = tiny
    from editpeft.locate import context_templates, subject_keys
    cfg = {"layer": 1, **VALUE}
    target = get_arch(model).mlp_out_name(1)
    templates = context_templates(model, tok, cfg["context_lengths"], 0)
    k_avg = subject_keys(model, tok, target, [A], templates)[0]
    k_prompt = subject_keys(model, tok, target, [A], templates[:1])[0]
    for mode, key in (("averaged", k_avg), ("prompt", k_prompt)):
        adapter = model.add_edit("rome", A, name=mode, config={**cfg, "key_mode": mode})
        (delta,) = adapter.deltas.values()
        # the same key; ROME's solve and this dot product reorder float32 sums of scale Σ|k_i d_i|
        scale = float((key.abs() * delta.down[:, 0].abs()).sum())
        assert float(key @ delta.down[:, 0]) == pytest.approx(1.0, rel=0, abs=rounding_atol(scale, depth=2))
        model.remove_edit(mode)
    with pytest.raises(editpeft.ConfigError, match="key_mode"):
        model.add_edit("rome", A, config={**cfg, "key_mode": "nope"})


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
@pytest.mark.parametrize("method", ["rome", "memit", "emmet"])
def test_append_joins_factors(tiny, method):
    model, tok = tiny
    cfg = {"layer": 1, **VALUE} if method == "rome" else {"layers": [1], **VALUE}
    if method == "memit":
        cfg["mom2_update_weight"] = 1.0
    model.add_edit(method, A, name="s", config=cfg)
    joined = model.add_edit(method, B, name="s", append=True)
    assert [d.rank for d in joined.deltas.values()] == [2] and len(joined.requests) == 2
    got = greedy_next_tokens(model, tok, [A.prompt, B.prompt])
    assert got == [target_token_ids(tok, r.prompt, r.target_new)[0] for r in (A, B)]
