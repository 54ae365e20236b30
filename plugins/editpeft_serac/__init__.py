"""SERAC — edits kept in a memory, answered by a counterfactual model when a scope classifier
says a query is about one of them.

Mitchell, Lin, Bosselut, Manning, Finn. "Memory-Based Model Editing at Scale", ICML 2022
(arXiv:2206.06520).

The base model f_base is never changed. An edit e (its *descriptor* z_e: the prompt with the new
answer) is only *stored*. At inference, for a query x':

    scope classifier    g_φ(z_e, x') = σ(s · cos(E(z_e), E(x')) + b)           (§3, embedding form)
    in scope            i* = argmax_i g_φ(z_i, x'),  answered by h_ψ(z_{i*}, x') when g_φ ≥ ½,
    otherwise           f_base(x')                                             (Eq. 1, §3)

with E a sentence encoder fine-tuned with the classifier (here all-MiniLM-L6-v2, from the offline
package; the paper's DistilBERT plays that role) and h_ψ the *counterfactual model*, a causal LM
(here a copy of the base model, fine-tuned) that reads z_e before x'.

**Training** (the editor; §3.1). On a training set of edits with equivalent inputs x_e (the edit's
prompt and its paraphrases) and unrelated inputs x_loc (locality prompts, and the other edits'
inputs of the batch):

    L(φ) = − Σ_{(z, x) in scope} log g_φ(z, x) − Σ_{(z, x) out of scope} log(1 − g_φ(z, x))
    L(ψ) = − Σ_{(z_e, x_e)} log p_ψ(y_e | z_e, x_e)

both minimised together (the core's editor loop: ``editpeft train serac --data FILE``); the
encoder is fine-tuned at ``classifier_lr_scale`` × the run's learning rate, the scale and bias of
the classifier's logit at ``head_lr_scale`` ×.

**In editpeft.** The adapter is a router (:class:`editpeft.RouterAdapter`): per row of a batch,
``decide`` embeds the prompt and routes it, for the whole sequence (``generate`` included), to the
counterfactual model with the chosen edit's descriptor prepended, or leaves it to the base model
bitwise. Adding an edit is a memory insertion (its descriptor embedded once). The adapter folder
holds the edits and their embeddings (a few KB); the *editor folder* holds the classifier and the
counterfactual model, and loading an adapter finds that editor again (or takes ``editor=``).

Example:
    >>> editor = editpeft.train_editor("serac", model, tok, "zsre_train.json", out="editors/serac",
    ...                                steps=1000, lr=3e-5)                       # doctest: +SKIP
    >>> model.add_edit("serac", request, name="memory", editor=editor)            # doctest: +SKIP
    >>> model.add_edit("serac", another, name="memory", append=True, editor=editor)  # doctest: +SKIP
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn
from torch.func import functional_call

import editpeft
from editpeft import EditRequest, MethodConfig
from editpeft.adapters import RouterAdapter
from editpeft.editors import Editor
from editpeft.embeddings import EMBEDDING_DIM, embed, embed_with_grad, load_sentence_encoder
from editpeft.errors import AdapterFormatError, EditorFormatError, EditorRequiredError
from editpeft.method import check
from editpeft.routing import Prompts, Route, build_causal_lm, causal_lm_spec, load_side_state, side_state_dict
from editpeft.tokens import TargetBatch, pad_id

logger = logging.getLogger(__name__)

CLASSIFIER, COUNTERFACTUAL = "cls", "cf"


@dataclass
class SeracConfig(MethodConfig):
    threshold: float = field(default=0.5, metadata={
        "help": "a query is in an edit's scope when the classifier's probability reaches this (paper: 0.5)"})
    descriptor: str = field(default="{prompt} {target}\n", metadata={
        "help": "how an edit is written before a query for the counterfactual model ({prompt}, {target})"})
    classifier_text: str = field(default="{prompt} {target}", metadata={
        "help": "how an edit is written for the scope classifier ({prompt}, {target})"})
    init_scale: float = field(default=10.0, metadata={"help": "initial s of the classifier logit s·cos + b"})
    init_bias: float = field(default=-6.0, metadata={"help": "initial b of the classifier logit s·cos + b"})
    classifier_lr_scale: float = field(default=1.0, metadata={
        "help": "the encoder's learning rate as a multiple of the run's lr"})
    head_lr_scale: float = field(default=1000.0, metadata={
        "help": "the learning rate of s and b as a multiple of the run's lr (two scalars need larger steps)"})
    counterfactual_weight: float = field(default=1.0, metadata={"help": "weight of L(ψ) against L(φ)"})

    def validate(self) -> None:
        check(0 < self.threshold < 1, f"threshold must be in (0, 1), got {self.threshold}")
        for name in ("descriptor", "classifier_text"):
            template = getattr(self, name)
            check(isinstance(template, str) and "{target}" in template and "{prompt}" in template,
                  f"{name} must contain {{prompt}} and {{target}}, got {template!r}")
        check(self.init_scale > 0, "init_scale must be > 0")
        check(self.classifier_lr_scale > 0 and self.head_lr_scale > 0, "the lr scales must be > 0")
        check(self.counterfactual_weight > 0, "counterfactual_weight must be > 0")


def describe(template: str, request: EditRequest) -> str:
    """An edit's descriptor z_e in ``template`` (the prompt with its subject filled in)."""
    return template.format(prompt=request.prompt.replace("{}", request.subject or ""), target=request.target_new)


def _query(request: EditRequest) -> str:
    return request.prompt.replace("{}", request.subject or "")


class SeracEditor(Editor):
    """SERAC's trained parts: the encoder ``cls.*`` with the logit's ``cls_scale``/``cls_bias``, and
    the counterfactual model ``cf.*`` (its architecture in ``extra["counterfactual"]``)."""

    def validate(self) -> None:
        super().validate()
        keys = set(self.tensors)
        if not {"cls_scale", "cls_bias"} <= keys or not any(k.startswith("cls.") for k in keys) \
                or not any(k.startswith("cf.") for k in keys):
            raise EditorFormatError("a SERAC editor needs cls_scale, cls_bias, cls.* (the scope classifier) and "
                                    "cf.* (the counterfactual model) tensors; the editor is corrupt")
        if not isinstance(self.extra.get("counterfactual"), dict):
            raise EditorFormatError("a SERAC editor records its counterfactual model's config in "
                                    "extra.counterfactual; the editor is corrupt")

    def modules(self, device: torch.device) -> tuple[nn.Module, nn.Module]:
        """(encoder, counterfactual model) with this editor's weights, built once and reused until a
        tensor changes."""
        key = (self._tensor_key(), str(device))
        cached = getattr(self, "_modules", None)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        own = {k.split(".", 1)[1]: v for k, v in self.tensors.items() if k.startswith(CLASSIFIER + ".")}
        encoder = load_side_state(load_sentence_encoder(str(device), fresh=True), own, name="scope classifier")
        cf_tensors = {k.split(".", 1)[1]: v for k, v in self.tensors.items() if k.startswith(COUNTERFACTUAL + ".")}
        cf = load_side_state(build_causal_lm(self.extra["counterfactual"], cf_tensors), cf_tensors,
                             name="counterfactual model").to(device)
        for m in (encoder, cf):
            m.requires_grad_(False)
        self._modules = (key, encoder, cf)
        return encoder, cf


class SeracAdapter(RouterAdapter):
    """The edit memory: each edit's descriptors and classifier embedding; answers through its editor."""

    #: the core binds the trained editor when loading (:func:`editpeft.editors.bind_loaded_editor`)
    uses_editor = True

    def __init__(self, embeddings: torch.Tensor, **common: Any):
        super().__init__(**common)
        self.embeddings = embeddings
        self._editor: SeracEditor | None = None

    def __len__(self) -> int:
        return len(self.requests)

    def bind_editor(self, editor: SeracEditor) -> None:
        self._editor = editor

    def _parts(self) -> tuple[nn.Module, nn.Module, SeracEditor]:
        if self._editor is None:
            raise EditorRequiredError("this SERAC adapter has no editor bound; load it with "
                                      "model.load_edit(folder, editor=<the editor it was made with>)")
        encoder, cf = self._editor.modules(self._editor.tensors["cls_scale"].device)
        return encoder, cf, self._editor

    def attach(self, state) -> None:
        self._parts()                      # refuse to attach without an editor
        super().attach(state)

    def side_modules(self) -> dict[str, nn.Module]:
        return {COUNTERFACTUAL: self._parts()[1]} if self._editor is not None else {}

    def decide(self, model, prompts: Prompts) -> list[Route | None]:
        if not len(self.requests):
            return [None] * len(prompts)
        encoder, _, editor = self._parts()
        cfg = SeracConfig.from_dict(self.hparams)
        queries = embed(encoder, prompts.texts())
        logits = (queries @ self.embeddings.to(queries).T) * editor.tensors["cls_scale"].to(queries) \
            + editor.tensors["cls_bias"].to(queries)
        best, which = logits.max(dim=1)
        tok = prompts.tokenizer
        routes: list[Route | None] = []
        for logit, i in zip(best.tolist(), which.tolist()):
            if torch.sigmoid(torch.tensor(logit)) >= cfg.threshold:
                prefix = tok(describe(cfg.descriptor, self.requests[i]))["input_ids"]
                routes.append(Route(prefix=prefix, side_model=COUNTERFACTUAL, entry=i))
            else:
                routes.append(None)
        return routes

    # -- saved form: the memory only (the editor folder holds the models) ----------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"embeddings": self.embeddings.float().contiguous()}

    @classmethod
    def from_saved(cls, tensors, extra, **common) -> "SeracAdapter":
        e = tensors.get("embeddings")
        n = len(common.get("requests") or [])
        if e is None or e.ndim != 2 or e.shape != (n, EMBEDDING_DIM) or not e.is_floating_point():
            raise AdapterFormatError(f"a SERAC adapter holds one {EMBEDDING_DIM}-wide embedding per edit ({n} edits); "
                                     f"got {None if e is None else tuple(e.shape)}: the file is corrupt")
        if set(tensors) != {"embeddings"}:
            raise AdapterFormatError(f"unexpected SERAC tensors {sorted(set(tensors) - {'embeddings'})}")
        return cls(e.float(), **common)


class Serac(editpeft.EditMethod):
    name = "serac"
    kind = "router"
    Config = SeracConfig
    adapter_class = SeracAdapter
    editor_class = SeracEditor
    requires_editor = True
    needs_subject = False
    supports_batch = True
    topologies = ("causal",)

    # -- the editor ---------------------------------------------------------------------------
    def init_editor(self, model, tokenizer, config: SeracConfig) -> SeracEditor:
        """The pre-trained encoder, s and b at their initial values, and the counterfactual model a
        copy of the base model's own (unedited) weights."""
        encoder = load_sentence_encoder(fresh=True)
        cf = build_causal_lm(causal_lm_spec(model))
        with model.disabled_edits():
            base = {k: v.detach().clone().float().cpu() for k, v in model.state_dict().items()}
        cf.load_state_dict(base, strict=False)
        tensors = {k[len("side."):]: v.detach().clone().float() for k, v in
                   side_state_dict({CLASSIFIER: encoder, COUNTERFACTUAL: cf}).items()}
        tensors["cls_scale"] = torch.tensor([config.init_scale])
        tensors["cls_bias"] = torch.tensor([config.init_bias])
        return SeracEditor(self.name, tensors, hparams=config.to_dict(), targets=[_embedding_name(model)],
                           extra={"counterfactual": causal_lm_spec(model)})

    def editor_lr_scales(self, config: SeracConfig) -> dict[str, float]:
        return {"cls.": config.classifier_lr_scale, "cls_": config.head_lr_scale}

    def editor_step(self, editor: SeracEditor, model, tokenizer, batch: Sequence[EditRequest],
                    config: SeracConfig) -> dict[str, Any]:
        device = editor.tensors["cls_scale"].device
        encoder, cf = editor.modules(device)
        logits, labels = self._scope_logits(editor, encoder, batch, config)
        cls_loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        accuracy = ((logits > 0).float() == labels).float().mean()
        cf_nll = self._counterfactual_nll(editor, cf, tokenizer, batch, config, device)
        return {"loss": cls_loss + config.counterfactual_weight * cf_nll, "cls_loss": cls_loss.detach(),
                "cls_acc": accuracy, "cf_nll": cf_nll.detach()}

    def _scope_logits(self, editor, encoder, batch, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits s·cos + b of every (edit, query) pair of the batch and their labels: a query is in
        scope of its own edit (the prompt, the paraphrases), out of scope of the others; locality
        prompts are out of scope of every edit."""
        edits = [describe(config.classifier_text, r) for r in batch]
        queries, owner = [], []
        for i, r in enumerate(batch):
            for q in (_query(r), *r.paraphrases):
                queries.append(q)
                owner.append(i)
            for q in r.locality:
                queries.append(q)
                owner.append(-1)
        params = {k.split(".", 1)[1]: v for k, v in editor.tensors.items() if k.startswith(CLASSIFIER + ".")}
        both = embed_with_grad(encoder, edits + queries, params)
        e, q = both[:len(edits)], both[len(edits):]
        logits = (e @ q.T) * editor.tensors["cls_scale"] + editor.tensors["cls_bias"]
        labels = (torch.tensor(owner, device=logits.device)[None, :]
                  == torch.arange(len(edits), device=logits.device)[:, None]).float()
        return logits, labels

    def _counterfactual_nll(self, editor, cf, tokenizer, batch, config, device) -> torch.Tensor:
        """−log p_ψ(y_e | z_e, x_e) over each edit's prompt and paraphrases."""
        prefixes, prompts, targets = [], [], []
        for r in batch:
            z = tokenizer(describe(config.descriptor, r))["input_ids"]
            for q in (_query(r), *r.paraphrases):
                prefixes.append(z)
                prompts.append(q)
                targets.append(r.target_new)
        tb = TargetBatch.build(tokenizer, prompts, targets, device=device).prefixed(prefixes, pad_id(tokenizer))
        params = {k.split(".", 1)[1]: v for k, v in editor.tensors.items() if k.startswith(COUNTERFACTUAL + ".")}
        logits = functional_call(cf, params, (), {**tb.model_inputs(), "use_cache": False}).logits
        return tb.target_nll(logits)

    # -- edits --------------------------------------------------------------------------------
    def compute(self, model, tokenizer, requests: Sequence[EditRequest], config: SeracConfig, *,
                editor: SeracEditor) -> SeracAdapter:
        return self._memory(model, [], torch.zeros(0, EMBEDDING_DIM), requests, config, editor)

    def extend(self, adapter: SeracAdapter, model, tokenizer, requests: Sequence[EditRequest], config: SeracConfig,
               *, editor: SeracEditor) -> SeracAdapter:
        if adapter._editor is not None and adapter._editor.sha256 != editor.sha256:
            raise EditorFormatError("append to a SERAC memory with the editor that made it (its sha256 differs)")
        return self._memory(model, adapter.requests, adapter.embeddings, requests, config, editor)

    def _memory(self, model, old: Sequence[EditRequest], old_embeddings: torch.Tensor,
                requests: Sequence[EditRequest], config: SeracConfig, editor: SeracEditor) -> SeracAdapter:
        encoder, _ = editor.modules(editor.tensors["cls_scale"].device)
        new = embed(encoder, [describe(config.classifier_text, r) for r in requests]).cpu()
        adapter = SeracAdapter(torch.cat([old_embeddings.cpu(), new]), method=self.name, hparams=config.to_dict(),
                               requests=[*old, *requests], targets=[])
        adapter.bind_editor(editor)
        return adapter


def _embedding_name(model) -> str:
    """The name of the input embedding module: SERAC's editor is bound to the base model's vocabulary."""
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


__all__ = ["Serac", "SeracAdapter", "SeracConfig", "SeracEditor", "describe"]
