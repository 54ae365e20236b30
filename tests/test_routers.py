"""Router edits govern the whole generation: one decision per sequence, made from the prompt and
kept for every generated token, per row of a batch. Two toy routers defined here (a prefix router,
as in-context editing does, and a side-model router, as SERAC does) must reproduce exactly what
the same computation gives without editpeft, leave out-of-scope rows bit-identical, and save
their side model in safetensors."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import editpeft
from editpeft import EditRequest
from editpeft.routing import (Route, build_causal_lm, causal_lm_spec, current_session, load_side_state,
                              split_side_tensors)

from conftest import make_tiny_model

IN_PROMPT = "The Eiffel Tower is in"                            # in scope (shorter: padded in the batch)
OUT_PROMPT = "The chemical symbol for gold is Au and for silver is"
REQ = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower", target_new="Rome")
NEW = 8
FAMILIES = ["llama", "gpt2", "opt"]


# -- toy routers -------------------------------------------------------------------------------
@dataclass
class ToyConfig(editpeft.MethodConfig):
    seed: int = 1


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i:i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


class PrefixAdapter(editpeft.RouterAdapter):
    """Prepends a fixed sentence (the edit, as text) to rows whose prompt names the subject."""

    def __init__(self, trigger: torch.Tensor, prefix: torch.Tensor, **common: Any):
        super().__init__(**common)
        self.trigger, self.prefix = trigger, prefix

    def decide(self, model, prompts):
        trig = self.trigger.tolist()
        return [Route(prefix=tuple(self.prefix.tolist())) if _contains(prompts.tokens(i), trig) else None
                for i in range(len(prompts))]

    def state_dict(self):
        return {"trigger": self.trigger, "prefix": self.prefix}

    @classmethod
    def from_saved(cls, tensors, extra, **common):
        return cls(tensors["trigger"], tensors["prefix"], **common)


class ToyPrefix(editpeft.EditMethod):
    name, kind, Config, adapter_class = "toy_prefix", "router", ToyConfig, PrefixAdapter

    def compute(self, model, tokenizer, requests, config):
        r = requests[0]
        trigger = tokenizer(" " + r.subject, add_special_tokens=False)["input_ids"]
        prefix = tokenizer(f"{r.prompt} {r.target_new}. ", add_special_tokens=False)["input_ids"]
        return self.adapter_class(torch.tensor(trigger), torch.tensor(prefix), method=self.name,
                             hparams=config.to_dict(), requests=list(requests), targets=[])


class SideAdapter(editpeft.RouterAdapter):
    """Serves rows whose prompt names the subject with a side ("counterfactual") model."""

    def __init__(self, trigger: torch.Tensor, side: torch.nn.Module, **common: Any):
        super().__init__(**common)
        self.trigger, self.side = trigger, side

    def side_modules(self):
        return {"cf": self.side}

    def attach(self, state):
        expected = state.tokenizer(" " + self.requests[0].subject, add_special_tokens=False)["input_ids"] \
            if self.requests and self.requests[0].subject else None
        if expected is not None and self.trigger.tolist() != expected:
            raise editpeft.AdapterFormatError("the trigger does not spell the edit's subject")
        super().attach(state)

    def decide(self, model, prompts):
        trig = self.trigger.tolist()
        return [Route(side_model="cf") if _contains(prompts.tokens(i), trig) else None for i in range(len(prompts))]

    def state_dict(self):
        return {"trigger": self.trigger, **super().state_dict()}

    def extra_config(self):
        return {"cf": causal_lm_spec(self.side)}

    @classmethod
    def from_saved(cls, tensors, extra, **common):
        own, sides = split_side_tensors(tensors)
        trigger = own.get("trigger")
        if trigger is None or trigger.ndim != 1 or trigger.dtype != torch.long or not len(trigger) \
                or bool((trigger < 0).any()):
            raise editpeft.AdapterFormatError("the trigger must be a non-empty 1-D tensor of token ids")
        side = load_side_state(build_causal_lm(extra["cf"], sides.get("cf", {})), sides.get("cf", {}), "cf")
        return cls(own["trigger"], side, **common)


class ToySide(editpeft.EditMethod):
    name, kind, Config, adapter_class = "toy_side", "router", ToyConfig, SideAdapter

    def compute(self, model, tokenizer, requests, config):
        trigger = tokenizer(" " + requests[0].subject, add_special_tokens=False)["input_ids"]
        side = make_tiny_model(model.config.model_type, tokenizer, seed=config.seed)
        return SideAdapter(torch.tensor(trigger), side, method=self.name, hparams=config.to_dict(),
                           requests=list(requests), targets=[])


class ScaleAdapter(PrefixAdapter):
    """A ``route``-only hook (no rewrite): scales in-scope rows' logits; its decision is read
    back through ``current_session``."""

    def decide(self, model, prompts):
        trig = self.trigger.tolist()
        return [Route(entry=2.0) if _contains(prompts.tokens(i), trig) else None for i in range(len(prompts))]

    def route(self, model, inputs, call_next):
        out = call_next(inputs)
        for row, r in enumerate(current_session(model).routes(self)):
            if r is not None:
                out.logits[row] = out.logits[row] * r.entry
        return out


class ToyScale(ToyPrefix):
    name, adapter_class = "toy_scale", ScaleAdapter


@pytest.fixture(autouse=True)
def toy_methods():
    """Register the toy methods as if installed through entry points."""
    from contextlib import ExitStack
    from editpeft.registry import registered
    with ExitStack() as stack:
        for cls in (ToyPrefix, ToySide, ToyScale):
            stack.enter_context(registered(cls, distribution="tests"))
        yield


# -- helpers -----------------------------------------------------------------------------------
def encode(tok, text: str) -> list[int]:
    return tok(text)["input_ids"]


def left_pad(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def gen(model, ids, mask=None, **kw):
    kw = {"max_new_tokens": NEW, "do_sample": False, "use_cache": True, "pad_token_id": 0,
          "return_dict_in_generate": True, "output_scores": True, "output_logits": True, **kw}
    return model.generate(input_ids=ids, attention_mask=mask, **kw)


def generated(out, row: int, width: int) -> list[int]:
    return out.sequences[row, width:].tolist()


def padded(tokens: list[int], n: int = NEW) -> list[int]:
    """Tokens of a single-row generate, padded with pad (=eos=0) as a batch generate leaves them."""
    return tokens + [0] * (n - len(tokens))


def reference(model, ids: list[int], adapter=None) -> tuple[list[int], torch.Tensor]:
    """What the computation gives without editpeft's routing: generated tokens and logits."""
    runner = adapter.side if isinstance(adapter, SideAdapter) else model
    if isinstance(adapter, PrefixAdapter):
        ids = adapter.prefix.tolist() + ids
    x = torch.tensor([ids])
    with model.disabled_edits():
        out = gen(runner, x)
    return padded(generated(out, 0, x.shape[1])), torch.stack(out.logits)[:, 0]


def batch(tok, order=(IN_PROMPT, OUT_PROMPT)):
    return left_pad([encode(tok, p) for p in order])


ROUTERS = ["toy_prefix", "toy_side"]


# -- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
@pytest.mark.parametrize("method", ROUTERS)
def test_generate_routes_each_row_once(tiny, method):
    model, tok = tiny
    ids, mask = batch(tok)
    base = gen(model, ids, mask)
    adapter = model.add_edit(method, REQ, name="r")
    out = gen(model, ids, mask)
    width = ids.shape[1]
    assert torch.equal(out.sequences[:, :width], ids)                  # the caller's tokens, no prefix
    # in-scope row: exactly the side model's / the base model's on prefix+prompt own generate
    want, want_logits = reference(model, encode(tok, IN_PROMPT), adapter)
    assert generated(out, 0, width) == want
    n = len(want_logits)
    got_logits = torch.stack(out.logits)[:n, 0]
    assert torch.allclose(got_logits, want_logits, atol=1e-4)
    assert torch.allclose(torch.stack(out.scores)[:n, 0], want_logits, atol=1e-4)
    # out-of-scope row: bit-identical to the base model's generate on the same batch
    assert len(out.logits) == len(base.logits)
    assert torch.equal(out.sequences[1], base.sequences[1])
    assert torch.equal(torch.stack(out.logits)[:, 1], torch.stack(base.logits)[:, 1])
    assert torch.equal(torch.stack(out.scores)[:, 1], torch.stack(base.scores)[:, 1])
    # the edit changes the in-scope row (a real test, not a no-op)
    assert not torch.equal(torch.stack(out.logits)[:, 0], torch.stack(base.logits)[:, 0])


@pytest.mark.parametrize("method", ROUTERS)
def test_generate_row_order_and_no_cache(tiny, method):
    """In-scope row last and longer; ``use_cache=False`` routes the same way."""
    model, tok = tiny
    ids, mask = batch(tok, ("The chemical symbol for gold is", REQ.prompt))
    base = gen(model, ids, mask)
    adapter = model.add_edit(method, REQ, name="r")
    want, _ = reference(model, encode(tok, REQ.prompt), adapter)
    for use_cache in (True, False):
        out = gen(model, ids, mask, use_cache=use_cache)
        assert generated(out, 1, ids.shape[1]) == want
        assert torch.equal(out.sequences[0], base.sequences[0])


@pytest.mark.parametrize("tiny", ["llama", "gpt2"], indirect=True)
def test_route_hook_keeps_decision_for_every_generated_token(tiny):
    model, tok = tiny
    ids, mask = batch(tok)
    base = gen(model, ids, mask)
    model.add_edit("toy_scale", REQ, name="s")
    out = gen(model, ids, mask)
    # row 0: greedy decoding of 2*logits is the base's greedy decoding; every step's logits doubled
    assert torch.equal(out.sequences, base.sequences)
    assert torch.equal(torch.stack(out.logits)[:, 0], 2 * torch.stack(base.logits)[:, 0])
    assert torch.equal(torch.stack(out.logits)[:, 1], torch.stack(base.logits)[:, 1])


# -- forward and manual decoding loops -----------------------------------------------------------
@pytest.mark.parametrize("tiny", FAMILIES, indirect=True)
@pytest.mark.parametrize("method", ROUTERS)
def test_forward_and_manual_cache_loop(tiny, method):
    model, tok = tiny
    ids, mask = batch(tok)
    with torch.no_grad():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    adapter = model.add_edit(method, REQ, name="r")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert logits.shape == base_logits.shape                           # the caller's sequence length
    assert torch.equal(logits[1], base_logits[1])
    row = encode(tok, IN_PROMPT)
    full = torch.tensor([adapter.prefix.tolist() + row if method == "toy_prefix" else row])
    runner = adapter.side if method == "toy_side" else model
    with torch.no_grad(), model.disabled_edits():
        want = runner(input_ids=full).logits[0, -len(row):]
    assert torch.allclose(logits[0, -len(row):], want, atol=1e-4)

    def loop():
        m, x, pkv, toks = mask, ids, None, []
        with torch.no_grad():
            for _ in range(NEW):
                pos = (m.cumsum(-1) - 1).clamp(min=0)[:, -x.shape[1]:]
                out = model(input_ids=x, attention_mask=m, position_ids=pos, past_key_values=pkv, use_cache=True)
                pkv, x = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                toks.append(x[:, 0])
                m = torch.cat([m, torch.ones_like(x)], 1)
        return torch.stack(toks, 1)
    toks = loop()
    want_tokens, _ = reference(model, row, adapter)
    n = want_tokens.index(0) if 0 in want_tokens else NEW              # the loop does not stop at eos
    assert n > 1 and toks[0, :n].tolist() == want_tokens[:n]
    with model.disabled_edits():
        unrouted = loop()
    assert torch.equal(toks[1], unrouted[1])
    assert not torch.equal(toks[0, :n], unrouted[0, :n])       # the routed row was really rerouted


def test_labels_loss_uses_routed_logits(tiny):
    model, tok = tiny
    ids, mask = batch(tok)
    labels = ids.masked_fill(mask == 0, -100)
    model.add_edit("toy_side", REQ, name="r")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]),
                                            labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, ref)


# -- side models: safetensors, device and dtype ----------------------------------------------------
@pytest.mark.parametrize("tiny", ["llama", "gpt2"], indirect=True)
def test_side_model_round_trip_and_dtype(tiny, tmp_path):
    model, tok = tiny
    ids, mask = batch(tok)
    adapter = model.add_edit("toy_side", REQ, name="r")
    before = gen(model, ids, mask)
    folder = tmp_path / "side"
    adapter.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir() if p.name != ".editpeft.lock") == \
        ["README.md", "edit_config.json", "edit_model.safetensors"]
    from safetensors import safe_open
    with safe_open(folder / "edit_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert "trigger" in keys and any(k.startswith("side.cf.") for k in keys)
    assert "cf" in json.loads((folder / "edit_config.json").read_text())["extra"]
    model.remove_edit("r")
    loaded = model.load_edit(folder)
    assert loaded is not adapter and loaded.side is not adapter.side
    for (k, a), (k2, b) in zip(adapter.side.state_dict().items(), loaded.side.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    after = gen(model, ids, mask)
    assert torch.equal(after.sequences, before.sequences)
    assert torch.equal(torch.stack(after.logits), torch.stack(before.logits))

    for dtype, cast in ((torch.float16, lambda m: m.half()), (torch.bfloat16, lambda m: m.to(torch.bfloat16))):
        reference_side = copy.deepcopy(loaded.side).to(dtype)
        cast(model)
        out = gen(model, ids, mask)
        assert all(p.dtype == dtype for p in loaded.side.parameters())
        x = torch.tensor([encode(tok, IN_PROMPT)])
        want = padded(generated(gen(reference_side, x), 0, x.shape[1]))
        assert generated(out, 0, ids.shape[1]) == want
        with model.disabled_edits():
            assert torch.equal(out.sequences[1], gen(model, ids, mask).sequences[1])


def test_side_state_dict_ties_and_mismatch(tiny_tokenizer):
    side = make_tiny_model("gpt2", tiny_tokenizer)                     # tied embeddings
    from editpeft.routing import side_state_dict
    sd = side_state_dict({"cf": side})
    assert "side.cf.transformer.wte.weight" in sd and "side.cf.lm_head.weight" not in sd
    _, parts = split_side_tensors(sd)
    fresh = load_side_state(build_causal_lm(causal_lm_spec(side)), parts["cf"])
    assert torch.equal(fresh.lm_head.weight, side.lm_head.weight)
    with pytest.raises(editpeft.AdapterFormatError, match="side model"):
        load_side_state(make_tiny_model("llama", tiny_tokenizer), parts["cf"])


# -- on/off, removal, stacking -----------------------------------------------------------------
@pytest.mark.parametrize("tiny", ["llama", "opt"], indirect=True)
def test_router_off_is_base(tiny):
    model, tok = tiny
    ids, mask = batch(tok)
    with torch.no_grad():
        base_fwd = model(input_ids=ids, attention_mask=mask).logits
    base = gen(model, ids, mask)
    model.add_edit("toy_side", REQ, name="a")
    model.add_edit("toy_prefix", REQ, name="b")

    def same_as_base():
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, base_fwd)
        out = gen(model, ids, mask)
        assert torch.equal(out.sequences, base.sequences)
        assert torch.equal(torch.stack(out.logits), torch.stack(base.logits))
    with model.disabled_edits():
        same_as_base()
    model.set_active_edits([])
    same_as_base()
    model.set_active_edits(["a", "b"])
    assert not torch.equal(gen(model, ids, mask).sequences, base.sequences)
    model.remove_edit("a")
    model.remove_edit("b")
    same_as_base()


def test_two_routers_stack_in_insertion_order(tiny):
    model, tok = tiny
    ids, mask = batch(tok)
    first = model.add_edit("toy_prefix", REQ, name="p1")
    other = EditRequest(prompt="The Eiffel Tower is made of", subject="Eiffel Tower", target_new="gold")
    second = model.add_edit("toy_prefix", other, name="p2")
    row = encode(tok, IN_PROMPT)
    out = gen(model, ids, mask)
    prefix = first.prefix.tolist() + second.prefix.tolist()
    want, _ = reference(model, prefix + row)
    assert generated(out, 0, ids.shape[1]) == want
    # a side-model router stacked first serves its rows; the later prefix router's text is prepended too
    model.remove_edit("p1")
    model.remove_edit("p2")
    side = model.add_edit("toy_side", REQ, name="s")
    model.add_edit("toy_prefix", other, name="p2")
    out = gen(model, ids, mask)
    x = torch.tensor([second.prefix.tolist() + row])
    want = padded(generated(gen(side.side, x), 0, x.shape[1]))
    assert generated(out, 0, ids.shape[1]) == want


def test_unsupported_decoding_and_bad_router(tiny):
    model, tok = tiny
    ids, mask = batch(tok)
    model.add_edit("toy_prefix", REQ, name="r")
    with pytest.raises(editpeft.errors.RoutingError, match="beam search"):
        model.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=2, pad_token_id=0)
    other = ids[1:]                                   # beam search is fine where no row is in scope
    with model.disabled_edits():
        want = model.generate(input_ids=other, num_beams=2, max_new_tokens=2, pad_token_id=0)
    assert torch.equal(model.generate(input_ids=other, num_beams=2, max_new_tokens=2, pad_token_id=0), want)
    model.edits["r"].decide = lambda model, prompts: [None]
    with pytest.raises(editpeft.errors.RoutingError, match="one Route or None per row"):
        model(input_ids=ids, attention_mask=mask)


def test_decide_may_call_the_model(tiny):
    """A router whose decision runs the model (a scope check) sees the model without routers."""
    model, tok = tiny
    ids, mask = batch(tok)
    adapter = model.add_edit("toy_prefix", REQ, name="r")
    plain_decide = adapter.decide
    seen = []

    def decide(model, prompts):
        seen.append(model(input_ids=prompts.input_ids, attention_mask=prompts.attention_mask).logits.shape)
        return plain_decide(model, prompts)
    adapter.decide = decide
    out = gen(model, ids, mask)
    assert len(seen) == 1 and seen[0][:2] == ids.shape          # decided once for the whole generation
    adapter.decide = plain_decide
    assert torch.equal(out.sequences, gen(model, ids, mask).sequences)
