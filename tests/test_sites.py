"""Named sites of every family (both stacks of encoder-decoder models): each one sees a tensor of
the expected width once per forward, and changing it changes the logits."""
from __future__ import annotations

import pytest
import torch

from editpeft.arch import SITE_NAMES, Site, get_arch, replace_site_tensor, site_tensor
from editpeft.tokens import TargetBatch

from conftest import FAMILIES, SEQ2SEQ_FAMILIES, make_tiny_model

PROMPTS = ["The Eiffel Tower is located in the city of", "Berlin, London"]
TARGETS = ["Paris", "Madrid and Tokyo"]
ALL = FAMILIES + ["gemma2"] + SEQ2SEQ_FAMILIES


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    """Tiny models in float64 (so an unperturbed rerun is bit-identical and a perturbation's
    effect stands far above rounding noise), created lazily per family."""
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str):
        if family not in cache:
            cache[family] = make_tiny_model(family, tiny_tokenizer).double()
        return cache[family]
    return get


def _hook(module: torch.nn.Module, site: Site, fn):
    """Register ``fn(tensor) -> tensor | None`` at ``site`` with plain torch hooks."""
    if site.where == "input":
        def pre(m, args):
            new = fn(args[0])
            return None if new is None else (new,) + tuple(args[1:])
        return module.register_forward_pre_hook(pre)

    def post(m, args, out):
        new = fn(site_tensor(out))
        return None if new is None else replace_site_tensor(out, new)
    return module.register_forward_hook(post)


def _cases():
    for family in ALL:
        stacks = ("encoder", "decoder") if family in SEQ2SEQ_FAMILIES else ("decoder",)
        for stack in stacks:
            yield family, stack


@pytest.mark.parametrize("family,stack", list(_cases()))
def test_every_site_has_its_width_and_changes_the_logits(models, tiny_tokenizer, family, stack):
    model = models(family)
    arch = get_arch(model)
    assert arch.topology == ("seq2seq" if family in SEQ2SEQ_FAMILIES else "causal")
    assert stack in arch.stacks
    batch = TargetBatch.for_model(model, tiny_tokenizer, PROMPTS, TARGETS)
    ids = batch.input_ids if stack == "encoder" else batch.decoder_ids
    with torch.no_grad():
        base = model(**batch.model_inputs()).logits
    scale = base.abs().max().item()
    for layer in range(arch.num_blocks(stack)):
        for name in SITE_NAMES:
            site = arch.site(layer, name, stack)
            module = arch.module(site.module)
            seen: list[torch.Tensor] = []
            handle = _hook(module, site, lambda x: seen.append(x.detach().clone()))
            with torch.no_grad():
                again = model(**batch.model_inputs()).logits
            handle.remove()
            assert torch.equal(again, base), f"{site}: an observing hook changed the logits"  # bitwise: an observing hook must not touch the computation
            assert len(seen) == 1, f"{site} ran {len(seen)} times in one forward"
            x = seen[0]
            assert x.shape[-1] == arch.site_width(name, stack), (site, tuple(x.shape))
            assert x.numel() // x.shape[-1] == ids.numel(), (site, tuple(x.shape), tuple(ids.shape))

            # A perturbation of the site's own size moves the logits by O(scale); float64 rounding
            # is ~1e-16 relative, so 1e-6 of the logits' scale separates the two by many orders.
            gen = torch.Generator().manual_seed(layer)
            handle = _hook(module, site, lambda x: x + torch.randn(x.shape, generator=gen, dtype=x.dtype) * x.std())
            with torch.no_grad():
                moved = model(**batch.model_inputs()).logits
            handle.remove()
            assert (moved - base).abs().max().item() > 1e-6 * scale, f"{site}: changing it left the logits unchanged"


@pytest.mark.parametrize("family,stack", list(_cases()))
def test_sites_fit_together(models, tiny_tokenizer, family, stack):
    """block_out of block l is the input of block l+1; mlp_out_proj is the weight-delta target."""
    model = models(family)
    arch = get_arch(model)
    batch = TargetBatch.for_model(model, tiny_tokenizer, PROMPTS, TARGETS)
    seen: dict[str, torch.Tensor] = {}
    handles = [arch.module(arch.site(0, "block_out", stack).module).register_forward_hook(
                   lambda m, a, out: seen.__setitem__("out0", site_tensor(out))),
               arch.layers(stack)[1].register_forward_pre_hook(
                   lambda m, args, kwargs: seen.__setitem__("in1", args[0] if args else kwargs["hidden_states"]),
                   with_kwargs=True)]
    with torch.no_grad():
        model(**batch.model_inputs())
    for h in handles:
        h.remove()
    assert torch.equal(seen["out0"], seen["in1"])  # bitwise: the same tensor seen from both sides
    assert arch.mlp_out_name(1, stack) == arch.site(1, "mlp_out_proj", stack).module
    assert arch.layer_name(1, stack) == f"{arch.stack(stack).layers}.1"


def test_site_table_of_opt_and_t5(tiny_tokenizer, models):
    opt = get_arch(models("opt"))
    assert opt.sites(1) == {"mlp_in": Site("model.decoder.layers.1.fc1", "input"),
                            "mlp_act": Site("model.decoder.layers.1.fc2", "input"),
                            "mlp_out_proj": Site("model.decoder.layers.1.fc2", "output"),
                            "mlp_out": Site("model.decoder.layers.1.fc2", "output"),
                            "block_out": Site("model.decoder.layers.1", "output")}
    t5 = get_arch(models("t5"))
    assert t5.stacks == ("encoder", "decoder") and t5.num_layers == 2
    assert t5.mlp_out_name(0) == "decoder.block.0.layer.2.DenseReluDense.wo"
    assert t5.site(1, "mlp_in", "encoder") == ("encoder.block.1.layer.1.DenseReluDense", "input")
    assert t5.site(1, "mlp_act", "decoder") == ("decoder.block.1.layer.2.DenseReluDense.wo", "input")


def test_bad_site_stack_or_layer_say_what_is_valid(models):
    import editpeft
    arch = get_arch(models("llama"))
    with pytest.raises(editpeft.ConfigError, match="known sites"):
        arch.site(0, "attn_out")
    with pytest.raises(editpeft.ConfigError, match="stacks are decoder"):
        arch.site(0, "mlp_in", stack="encoder")
    with pytest.raises(editpeft.ConfigError, match="valid: 0..1"):
        get_arch(models("t5")).site(2, "mlp_in", stack="encoder")
