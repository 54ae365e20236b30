"""T-Patcher — one patch neuron per mistake.

Huang, Shen, Zhang, Zhou, Rong, Xiong. "Transformer-Patcher: One Mistake worth One Neuron",
ICLR 2023 (arXiv:2301.09785).

Each edit adds one neuron (key k, bias b, value v) to the feed-forward layer of one block (the
last by default), the base model frozen:

    FFN'(x) = FFN(x) + f(x·k + b) · v                                                     (Eq. 2)

The patch must fire on the edit and stay silent elsewhere. With a = q·k + b the patch's
pre-activation for a query q (the FFN input at a position), training minimises

    L = L_e + α_w · L_a + m · L_m                                                          (Eq. 6)
    L_e = CE of the target, teacher-forced, with the patch in place                        (Eq. 3)
    L_a = mean_topk exp(α − a(q_e))                     over the edit's positions          (Eq. 4)
    L_m = mean_topk exp(a(q_m) − a(q_e) + β1) + mean_topk exp(a(q_m) − β2)
                                                        over memory queries q_m             (Eq. 5)

L_a keeps the patch active on the edit (pre-activation above the margin α); the first memory term
keeps every memory activation β1 below the edit's, the second keeps memory activations below β2
(< 0), so the patch does not fire on other inputs. The memory holds FFN inputs of unrelated text
(a fixed corpus) and of every earlier edit of the adapter, so later patches stay silent on earlier
edits (the paper's memory update). Top-k means are taken as in the reference implementation
(edit: the 5 least activated positions; memory: the 1,000 largest terms).

Initialisation (§3.3 "patch initialization"): k = q_e / ‖q_e‖², b = 0, so the pre-activation on the
edit is exactly 1 before training; the value is trained through v = c · w with w = 0 at the
start and c = ``value_scale`` (the reference code's value amplification, 10).

Causal LMs: the edit's positions are those that predict the target tokens (the prompt's last token
and the target's, teacher-forced). The paper patches classifiers and short seq2seq answers; here a
target of several tokens needs a different push at each position, which one value vector added
wherever the neuron fires cannot give (measured: "mezzo soprano" stays at NLL 0.76 with five
neurons trained one after another). So by default (``per_token``) an edit first gets one neuron
per target token, neuron j initialised at the position predicting token j and held active there
(L_a on its own position, L_m per neuron), trained jointly — for a one-token target exactly the
paper's single neuron. As in the reference code, an edit that is still not fixed (a target token
not top-1, teacher-forced) gets another neuron, up to ``max_neurons`` in all.

The neuron's activation f is the patch's own (default ReLU: exactly 0 for the memory inputs held
below β2 < 0; the host layers' activations differ across families — gated SiLU, GELU — and are not
a single neuron's). A batch of requests is patched one request after another, each new neuron
trained with the earlier ones in place; ``append=True`` adds neurons to the same adapter. The
memory of earlier edits' queries stays on the adapter in the process (recomputed after loading).

Speed: a patch in the last block changes only what that block adds to the residual stream, so
each step replays the final norm and the output head on the captured last-block output
(:class:`editpeft.suffix.LastBlockReplay`, checked against the model's logits on every edit) instead
of running the model: ~1 s per zsRE edit on SmolLM2-135M on 2 CPU threads (the survey measured
186 s per edit on a GPU for the reference implementation). Behind a post-FFN norm (Gemma 2/3) the
check fails and the full model runs; there the last FFN's output is normalised before it joins the
residual, which bounds what a patch in the last block can add — an earlier ``layer`` is the choice.

Example:
    >>> model.add_edit("t-patcher", request, name="patches")                      # doctest: +SKIP
    >>> model.add_edit("t-patcher", another, name="patches", append=True)         # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

import editpeft
from editpeft import EditRequest, MethodConfig
from editpeft.arch import get_arch
from editpeft.corpus import CORPORA, corpus_activations
from editpeft.method import check
from editpeft.patches import PatchNeuronAdapter, PatchNeurons, PatchSite, activation_fn, temporary_patch
from editpeft.probe import activations_at
from editpeft.suffix import LastBlockReplay
from editpeft.tokens import TargetBatch
from editpeft.train import TrainConfig, train_tensors

logger = logging.getLogger(__name__)


@dataclass
class TPatcherConfig(MethodConfig):
    layer: int = field(default=-1, metadata={"help": "block whose FFN gets the patches (-1: the last, the paper's choice)"})
    steps: int = field(default=100, metadata={"help": "Adam steps at most per edit"})
    lr: float = field(default=1e-2, metadata={"help": "Adam learning rate (paper: 1e-2)"})
    weight_decay: float = field(default=0.01, metadata={"help": "Adam weight decay (paper: 0.01)"})
    stop_loss: float = field(default=0.05, metadata={"help": "stop once the edit's target NLL is below this"})
    activation: str = field(default="relu", metadata={"help": "the patch neuron's activation f"})
    value_scale: float = field(default=10.0, metadata={"help": "v = c·w, w trained from 0 (paper code: 10)"})
    act_weight: float = field(default=1.0, metadata={"help": "weight of the activation loss L_a (paper: 1)"})
    act_margin: float = field(default=0.0, metadata={"help": "α: the edit's pre-activation is kept above it"})
    act_top_k: int = field(default=5, metadata={"help": "L_a averages the k least activated edit positions"})
    memory_weight: float = field(default=10.0, metadata={"help": "m: weight of the memory loss L_m (paper, zsRE: 10)"})
    memory_margin_edit: float = field(default=3.0, metadata={"help": "β1: memory stays this far below the edit"})
    memory_margin: float = field(default=-3.0, metadata={"help": "β2 (< 0): memory pre-activations stay below it"})
    memory_top_k: int = field(default=1000, metadata={"help": "L_m averages the k largest memory terms"})
    memory_tokens: int = field(default=1000, metadata={"help": "tokens of unrelated text in the memory"})
    memory_corpus: str = field(default="pydoc", metadata={"help": f"text of the memory: one of {CORPORA}"})
    seed: int = field(default=0, metadata={"help": "seed of the memory corpus sampling"})
    per_token: bool = field(default=True, metadata={
        "help": "first round: one neuron per target token (each at its own position), else one neuron"})
    max_neurons: int = field(default=5, metadata={
        "help": "neurons one edit may get: another is added while the edit is not fixed (reference code: 5)"})

    def validate(self) -> None:
        check(self.layer >= -1, f"layer must be a block index or -1 (the last), got {self.layer}")
        check(self.steps >= 1, "steps must be >= 1")
        check(self.lr > 0 and self.value_scale > 0, "lr and value_scale must be > 0")
        check(self.weight_decay >= 0 and self.act_weight >= 0 and self.memory_weight >= 0,
              "weight_decay, act_weight and memory_weight must be >= 0")
        check(self.memory_margin < 0, f"memory_margin (β2) must be < 0, got {self.memory_margin}")
        check(self.act_top_k >= 1 and self.memory_top_k >= 1, "act_top_k and memory_top_k must be >= 1")
        check(self.memory_tokens >= 1 and self.max_neurons >= 1, "memory_tokens and max_neurons must be >= 1")
        check(self.memory_corpus in CORPORA, f"memory_corpus must be one of {CORPORA}")
        activation_fn(self.activation)


#: Attribute of an adapter holding its query memory in this process (never saved: recomputed on demand).
MEMORY_ATTR = "_tpatcher_memory"


def _site(model, config: TPatcherConfig) -> PatchSite:
    arch = get_arch(model)
    layer = arch.num_layers - 1 if config.layer == -1 else arch.check_layer(config.layer)
    return PatchSite.ffn(model, layer)


class TPatcher(editpeft.EditMethod):
    name = "t-patcher"
    kind = "module_hook"
    Config = TPatcherConfig
    adapter_class = PatchNeuronAdapter

    def targets(self, model, config: TPatcherConfig) -> list[str]:
        site = _site(model, config)
        return list(dict.fromkeys((site.read, site.write)))

    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: TPatcherConfig) -> PatchNeuronAdapter:
        site = _site(model, config)
        d_in = activations_at(model, model.get_submodule(site.read),
                              TargetBatch.for_model(model, tokenizer, [requests[0].prompt]).model_inputs()).shape[-1]
        d_out = get_arch(model).site_width("mlp_out")
        empty = PatchNeurons.empty(d_in, d_out, activation=config.activation)
        return self._patch(model, tokenizer, site, empty, [], requests, config)

    def extend(self, adapter: PatchNeuronAdapter, model, tokenizer, requests: Sequence[EditRequest],
               config: TPatcherConfig) -> PatchNeuronAdapter:
        ((site, prior),) = adapter.patches.items()
        with adapter.switched_off():    # the earlier neurons are applied by the training patch instead
            return self._patch(model, tokenizer, site, prior, list(adapter.requests), requests, config,
                               memory=getattr(adapter, MEMORY_ATTR, None))

    def _patch(self, model, tokenizer, site: PatchSite, prior: PatchNeurons, earlier: list[EditRequest],
               requests: Sequence[EditRequest], config: TPatcherConfig,
               memory: torch.Tensor | None = None) -> PatchNeuronAdapter:
        """Patch ``requests`` one after another onto ``prior``. ``memory`` is the query memory the
        earlier edits left (kept on the adapter in this process: without it, e.g. after loading,
        it is computed again from the corpus and the earlier requests)."""
        if memory is None:
            read = model.get_submodule(site.read)
            memory = torch.cat([_corpus_queries(model, tokenizer, read, config)]
                               + [_edit_queries(model, tokenizer, read, r) for r in earlier])
        patch = prior
        for request in requests:
            patch, queries = _patch_one(model, tokenizer, site, patch, request, memory, config)
            memory = torch.cat([memory, queries])
        adapter = PatchNeuronAdapter({site: patch}, method=self.name, hparams=config.to_dict(),
                                     requests=[*earlier, *requests])
        setattr(adapter, MEMORY_ATTR, memory)
        return adapter


class _EditView:
    """One request as the training sees it: the FFN inputs at the positions that predict the
    target tokens (the edit's queries) and the logits there with a patch in place — replayed from
    the last block's captured output when the patch is in the last block (exact, checked by
    :class:`editpeft.suffix.LastBlockReplay`), else by running the model."""

    def __init__(self, model, tokenizer, site: PatchSite, request: EditRequest):
        self.model, self.site = model, site
        self.batch = TargetBatch.for_model(model, tokenizer, [request.prompt], [request.target_new])
        self.positions = self.batch.target_positions(0).tolist()
        where = torch.tensor([[0, p] for p in self.positions])
        self.replay = LastBlockReplay.capture(model, site.read, site.write, self.batch.model_inputs(), where)
        if self.replay is not None:
            self.queries = self.replay.inputs.float()
        else:
            acts = activations_at(model, model.get_submodule(site.read), self.batch.model_inputs())
            self.queries = acts.reshape(*self.batch.input_ids.shape, -1)[0, self.positions].float()

    def logits(self, patch: PatchNeurons) -> torch.Tensor:
        """Logits (1, targets, vocab) at the target positions with ``patch`` at the site."""
        if self.replay is not None:
            return self.replay.logits(patch(self.replay.inputs))[None]
        with temporary_patch(self.model, self.site, patch):
            logits = self.model(**self.batch.model_inputs(), use_cache=False).logits
        return logits[:, self.positions]

    def target_nll(self, patch: PatchNeurons) -> torch.Tensor:
        return self.batch.target_nll(self.logits(patch), kept=self.positions)

    def fixed(self, patch: PatchNeurons) -> bool:
        """Every target token is the top-1 prediction, teacher-forced, with ``patch`` in place."""
        with torch.no_grad():
            return self.logits(patch)[0].argmax(-1).tolist() == list(self.batch.target_ids[0])


def _patch_one(model, tokenizer, site: PatchSite, patch: PatchNeurons, request: EditRequest, memory: torch.Tensor,
               config: TPatcherConfig) -> tuple[PatchNeurons, torch.Tensor]:
    """Neurons for one edit, and the edit's queries (for the memory of later edits).

    First round: one neuron per target token when ``per_token`` (each initialised at the position
    predicting its token, trained jointly), else one at the prompt's last token. While the edit is
    not fixed (a target token is not the top-1 prediction, teacher-forced), one more neuron is
    added at the next position, up to ``max_neurons`` in all (the reference code's rule)."""
    view = _EditView(model, tokenizer, site, request)
    n_pos = len(view.queries)
    rounds = [list(range(min(n_pos, config.max_neurons))) if config.per_token else [0]]
    used = len(rounds[0])
    while rounds:
        patch = patch.append(_train_neurons(view, patch, rounds.pop(), memory, config))
        if view.fixed(patch):
            break
        if used < config.max_neurons:
            rounds.append([used % n_pos])
            used += 1
    else:
        logger.warning("t-patcher: %r is not fixed after %d neurons", request.prompt, used)
    return patch, view.queries


def _edit_queries(model, tokenizer, read: torch.nn.Module, request: EditRequest) -> torch.Tensor:
    """FFN inputs (``read``'s input) at the positions that predict the target tokens."""
    batch = TargetBatch.for_model(model, tokenizer, [request.prompt], [request.target_new])
    acts = activations_at(model, read, batch.model_inputs())
    return acts.reshape(*batch.input_ids.shape, -1)[0, batch.target_positions(0).to(acts.device)].float()


def _corpus_queries(model, tokenizer, read: torch.nn.Module, config: TPatcherConfig) -> torch.Tensor:
    """FFN inputs of ``memory_tokens`` tokens of unrelated text (the memory the patch stays silent on)."""
    return corpus_activations(model, tokenizer, read, config.memory_corpus, config.memory_tokens, seed=config.seed)


def _mean_top(values: torch.Tensor, k: int) -> torch.Tensor:
    flat = values.reshape(-1)
    return flat.topk(min(k, flat.numel())).values.mean()


def _train_neurons(view: _EditView, prior: PatchNeurons, positions: list[int], memory: torch.Tensor,
                   config: TPatcherConfig) -> PatchNeurons:
    """Neurons for the edit of ``view``, neuron j initialised at the edit position ``positions[j]``,
    trained jointly with the ``prior`` neurons in place (Eq. 3–6; L_a and L_m per neuron, averaged)."""
    init = view.queries[positions]                                       # (n, d_in)
    own = torch.tensor(positions, device=init.device)
    start = {"keys": init / init.norm(dim=-1, keepdim=True) ** 2,          # pre-activation 1 on its position
             "key_bias": torch.zeros(len(positions), device=init.device),
             "values": torch.zeros(len(positions), prior.dims[1], device=init.device)}
    frozen = {k: getattr(prior, k).detach().to(init.device) for k in ("keys", "key_bias", "values")}
    queries = view.queries
    cols = torch.arange(len(positions), device=init.device)

    def loss(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        neuron = {"keys": p["keys"], "key_bias": p["key_bias"], "values": config.value_scale * p["values"]}
        patch = PatchNeurons(*(torch.cat([frozen[k], neuron[k]]) for k in ("keys", "key_bias", "values")),
                             activation=config.activation)
        edit_act = queries @ p["keys"].T + p["key_bias"]                  # a(q_e): (edit positions, n)
        memory_act = memory @ p["keys"].T + p["key_bias"]                 # a(q_m): (memory, n)
        # one neuron alone (the paper's case) keeps every edit position active; with one neuron per
        # target token, each is held active at its own position
        active = edit_act if len(positions) == 1 else edit_act[own, cols][None]
        l_a = torch.stack([_mean_top(torch.exp(config.act_margin - active[:, j]), config.act_top_k)
                           for j in range(len(positions))]).mean()
        l_m = torch.stack([
            _mean_top(torch.exp(memory_act[:, j, None] - active[None, :, j] + config.memory_margin_edit),
                      config.memory_top_k)
            + _mean_top(torch.exp(memory_act[:, j] - config.memory_margin), config.memory_top_k)
            for j in range(len(positions))]).mean()
        return {"target": view.target_nll(patch), "activation": config.act_weight * l_a,
                "memory": config.memory_weight * l_m}

    result = train_tensors(start, loss, TrainConfig(steps=config.steps, lr=config.lr, weight_decay=config.weight_decay,
                                                    stop_loss=config.stop_loss, desc="t-patcher"))
    logger.info("t-patcher: %d steps, %s", result.steps, result.terms)
    p = result.params
    return PatchNeurons(p["keys"].cpu(), p["key_bias"].cpu(), (config.value_scale * p["values"]).cpu(),
                        activation=config.activation)
