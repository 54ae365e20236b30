"""Knowledge Neurons — find the FFN neurons that express a fact, then rewrite their value slots.

Dai, Dong, Hao, Sui, Chang, Wei. "Knowledge Neurons in Pretrained Transformers", ACL 2022
(arXiv:2104.08696).

The "neurons" of layer l are the inputs of its FFN output projection (the intermediate
activations w^(l)); the projection's i-th column is neuron i's value slot.

1. **Attribution** (§3.1, Eq. 3–4): for a prompt x and its answer y*, P_x(ŵ) is the probability of
   y* when neuron i of layer l is set to ŵ. Its integrated gradient from 0 to the actual
   activation w̄ is ``Attr(w_i) = w̄_i ∫₀¹ ∂P_x(α w̄_i)/∂w_i dα``, approximated by the Riemann sum
   over α = k/m, k = 1…m (m = ``ig_steps``, 20 in the paper). As in the paper, the whole layer is
   scaled at once and the gradient taken per neuron; every layer is attributed separately (the
   others keep their actual activations). The intervention is at the position that predicts the
   answer (the prompt's last token), so the prompt's prefix is run once and its key/value cache
   shared by the m × L scaled rows.
2. **Refining** (§3.2): per prompt keep the neurons whose attribution exceeds t × the prompt's
   largest (t = ``attribution_threshold``, 0.2); keep the neurons shared by at least p of the
   prompts (p = ``share_threshold``, 0.7), moving p in steps of 0.05 until between ``min_neurons``
   and ``max_neurons`` remain (the paper adjusts p the same way). The prompts are the request's
   prompt behind sampled context prefixes (the paper uses paraphrased prompts of the same fact).
3. **Updating a fact** (§5.1): each selected neuron's value slot becomes
   ``FFN(val)_i − λ1 t + λ2 t'`` with t, t' the word embeddings of the old and the new answer
   (first token; λ1 = ``erase_weight`` = 1, λ2 = ``write_weight`` = 8 in the paper). BERT ties its
   input and output embeddings; for models that do not, the rows of the output embedding (the LM
   head) are used, since they are what turns the written vector into the answer's logit.

All selected neurons of a layer get the same change u = λ2 t' − λ1 t, so the edit of that layer is
the rank-one, sparse delta ``u sᵀ`` (``up = u``, ``down = s``, nonzero only at the selected neurons).
In BERT's GELU FFN the attributed neurons fire positively and s is their indicator, as in the
paper; gated FFNs (SwiGLU, GeGLU) also have strongly negative activations, and a negative
activation times λ2 t' would push *away* from the new answer, so s_i = sign(w̄_i) on the prompt.

Example:
    >>> model.add_edit("kn", EditRequest(prompt="The Eiffel Tower is located in the city of",
    ...                subject="Eiffel Tower", target_new="Rome", target_true="Paris"))   # doctest: +SKIP
"""
from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Sequence

import torch

import editpeft
from editpeft import EditRequest, WeightDeltaAdapter
from editpeft.arch import get_arch, linear_dims
from editpeft.attach import LowRankDelta, as_btd, capture_inputs
from editpeft.errors import EditError, EditOptimizationError
from editpeft.locate import context_templates, in_template
from editpeft.mass_edit import AppendByStacking, join_deltas
from editpeft.method import MethodConfig, check
from editpeft.tokens import cache_in, cache_kwarg, greedy_next_tokens, model_device, target_token_ids

logger = logging.getLogger(__name__)


@dataclass
class KnowledgeNeuronsConfig(MethodConfig):
    layers: list | None = field(default=None, metadata={"help": "decoder blocks searched (default: all)"})
    ig_steps: int = field(default=20, metadata={"help": "m: Riemann steps of the integrated gradients"})
    attribution_threshold: float = field(default=0.2, metadata={"help": "t: keep neurons above t x max attribution"})
    share_threshold: float = field(default=0.7, metadata={"help": "p: keep neurons found in at least p of the prompts"})
    min_neurons: int = field(default=2, metadata={"help": "lower end of the neuron count p is adjusted to"})
    max_neurons: int = field(default=5, metadata={"help": "upper end of the neuron count p is adjusted to"})
    erase_weight: float = field(default=1.0, metadata={"help": "λ1: weight of the old answer's embedding removed"})
    write_weight: float = field(default=8.0, metadata={"help": "λ2: weight of the new answer's embedding added"})
    context_lengths: list = field(default_factory=lambda: [[5, 4]],
                                  metadata={"help": "[[tokens, count], ...] of context prefixes giving more prompts"})
    seed: int = field(default=0, metadata={"help": "seed of the context-prefix sampling"})

    layer_fields = ("layers",)

    def validate(self) -> None:
        check(self.layers is None or (isinstance(self.layers, list) and self.layers
                                      and all(isinstance(x, int) and x >= 0 for x in self.layers)),
              f"layers must be null or a non-empty list of non-negative ints, got {self.layers!r}")
        check(self.ig_steps >= 1, "ig_steps must be >= 1")
        check(0 < self.attribution_threshold <= 1, "attribution_threshold must be in (0, 1]")
        check(0 < self.share_threshold <= 1, "share_threshold must be in (0, 1]")
        check(1 <= self.min_neurons <= self.max_neurons, "need 1 <= min_neurons <= max_neurons")


class KnowledgeNeurons(AppendByStacking, editpeft.EditMethod):
    name = "kn"
    kind = "weight_delta"
    Config = KnowledgeNeuronsConfig

    def targets(self, model, config: KnowledgeNeuronsConfig) -> list[str]:
        arch = get_arch(model)
        return [arch.mlp_out_name(arch.check_layer(x)) for x in (config.layers or range(arch.num_layers))]

    def compute(self, model, tokenizer, requests: Sequence[EditRequest],
                config: KnowledgeNeuronsConfig) -> WeightDeltaAdapter:
        targets = self.targets(model, config)
        embed = model.get_output_embeddings().weight
        d_in, d_out = linear_dims(model.get_submodule(targets[0]))
        if embed.shape[1] != d_out:
            raise EditError(f"the word embeddings ({embed.shape[1]}) and the FFN output ({d_out}) differ in size "
                            "in this model; Knowledge Neurons cannot write embeddings into its value slots")
        templates = context_templates(model, tokenizer, config.context_lengths, config.seed)
        deltas: dict[str, LowRankDelta] = {}
        for request in requests:
            old = _old_answer_id(model, tokenizer, request)
            new = target_token_ids(tokenizer, request.prompt, request.target_new)[0]
            prompts = [in_template(t, request)[0] for t in templates]
            attributed = [attribution_scores(model, tokenizer, p, old, targets, config.ig_steps) for p in prompts]
            scores = torch.stack([a for a, _ in attributed])                            # (prompts, L, inter)
            activation = attributed[0][1]                                               # w̄ on the bare prompt
            neurons = refine(scores, config)
            logger.info("kn %r: neurons %s", request.prompt, [(targets[l], i) for l, i in neurons])
            u = (config.write_weight * embed[new] - config.erase_weight * embed[old]).detach().float().cpu()
            for l_idx in sorted({l for l, _ in neurons}):
                indicator = torch.zeros(d_in, 1)
                for l, i in neurons:
                    if l == l_idx:
                        indicator[i, 0] = 1.0 if activation[l, i] >= 0 else -1.0
                deltas = join_deltas(deltas, {targets[l_idx]: LowRankDelta(u[:, None].clone(), indicator)})
        return WeightDeltaAdapter(deltas, method=self.name, hparams=config.to_dict(), requests=list(requests))


def _old_answer_id(model, tokenizer, request: EditRequest) -> int:
    if request.target_true:
        return target_token_ids(tokenizer, request.prompt, request.target_true)[0]
    return greedy_next_tokens(model, tokenizer, [request.prompt])[0]


def attribution_scores(model, tokenizer, prompt: str, answer_id: int, targets: Sequence[str],
                       steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrated-gradients attribution (Eq. 3–4) of every neuron of every module in ``targets``
    (inputs of the FFN output projections) to P(answer | prompt), and the actual activations w̄;
    both (len(targets), inter)."""
    device = model_device(model)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    modules = [model.get_submodule(t) for t in targets]
    # actual activations w̄ at the last position
    acts: list[list] = [[] for _ in modules]
    with torch.no_grad(), ExitStack() as stack:
        for m, a in zip(modules, acts):
            stack.enter_context(capture_inputs(m, a))
        model(input_ids=ids, use_cache=False)
    w_bar = torch.stack([as_btd(a[0], ids)[0, -1].float() for a in acts])           # (L, inter)

    rows = len(modules) * steps
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    leaves = (alphas[None, :, None] * w_bar[:, None, :]).requires_grad_(True)       # (L, m, inter)
    cache = None
    if ids.shape[1] > 1:
        with torch.no_grad():
            cache = cache_in(model(input_ids=ids[:, :-1], use_cache=True))
        cache.batch_repeat_interleave(rows)
    last = ids[:, -1:].expand(rows, 1)

    def set_layer(l_idx: int):
        def pre_hook(module, args):
            x = args[0]
            xb = as_btd(x, last).clone()
            xb[l_idx * steps:(l_idx + 1) * steps, -1] = leaves[l_idx].to(x.dtype)
            return (xb.reshape(x.shape),) + tuple(args[1:])
        return pre_hook

    handles = [m.register_forward_pre_hook(set_layer(i)) for i, m in enumerate(modules)]
    try:
        with torch.enable_grad():
            kwargs = dict(input_ids=last, attention_mask=torch.ones(rows, ids.shape[1], dtype=torch.long, device=device),
                          use_cache=cache is not None, **{cache_kwarg(model): cache})
            logits = model(**kwargs).logits[:, -1].float()
            prob = torch.softmax(logits, -1)[:, answer_id]
            (grad,) = torch.autograd.grad(prob.sum(), leaves)
    finally:
        for h in handles:
            h.remove()
    scores = w_bar * grad.mean(1)                                                   # (L, inter)
    if not torch.isfinite(scores).all():
        raise EditOptimizationError(f"the attributions for {prompt!r} are not finite; the model was left unchanged")
    return scores.detach().cpu(), w_bar.cpu()


def refine(scores: torch.Tensor, config: KnowledgeNeuronsConfig) -> list[tuple[int, int]]:
    """(layer index, neuron) pairs kept by the paper's two thresholds (§3.2), p adjusted so that
    between ``min_neurons`` and ``max_neurons`` remain (the most-shared, then highest-scoring, first)."""
    n_prompts = scores.shape[0]
    flat = scores.flatten(1)                                                        # (prompts, L*inter)
    above = flat > config.attribution_threshold * flat.max(1, keepdim=True).values.clamp_min(1e-12)
    shared = above.float().mean(0)                                                  # fraction of prompts
    p = config.share_threshold
    kept = (shared >= p - 1e-9).nonzero().flatten()
    while len(kept) < config.min_neurons and p > 1.0 / n_prompts + 1e-9:
        p -= 0.05
        kept = (shared >= p - 1e-9).nonzero().flatten()
    while len(kept) > config.max_neurons and p < 1.0:
        p = min(1.0, p + 0.05)
        kept = (shared >= p - 1e-9).nonzero().flatten()
    if len(kept) == 0:
        raise EditOptimizationError("no neuron passes the attribution threshold in any prompt; lower "
                                    "attribution_threshold. The model was left unchanged.")
    order = sorted(kept.tolist(), key=lambda j: (-float(shared[j]), -float(flat[:, j].mean())))
    inter = scores.shape[2]
    return [(j // inter, j % inter) for j in order[: config.max_neurons]]

