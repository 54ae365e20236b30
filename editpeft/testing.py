"""The plugin contract, as a test suite a method author can run on tiny random models.

:func:`check_method` puts one method through everything editpeft promises of an adapter, on a
tiny randomly initialised model of one family (built from a config: no download):

- ``edit``: the edit makes the target the model's greedy next token after the prompt (or, with
  ``expect_top1=False``, raises the target's log-probability; with ``expect_top1=None``, changes
  the logits at the prompt: in-context methods such as IKE need a model that reads its context,
  which a random tiny model does not);
- ``toggle``: ``disabled_edits()``, ``set_active_edits([])`` and switching back are bitwise exact;
- ``save_load``: save → remove (weights and hooks bitwise as before) → load gives identical logits;
- ``stacking``: with one reference adapter of each kind (a low-rank weight delta, patch neurons, a
  router) added before and, separately, after it: switching the method's edit off equals removing
  it, bitwise; the whole stack saves and reloads to identical logits; removing everything restores
  the base model bitwise;
- ``dtype``: after ``model.to(torch.bfloat16)`` forward and ``generate`` run, finite, and the edit
  still decides the greedy token;
- ``bad_input``: an unknown config field, a non-finite float in the config, and whatever the
  method's declared capabilities refuse (a request without subject, a batch, an append, a model
  topology) each raise an :class:`~editpeft.EditError` with the model bitwise untouched.

Example:
    >>> from editpeft.testing import check_method
    >>> passed = check_method("grace", "llama", config={"layer": 0})      # doctest: +SKIP
    >>> passed
    ['edit', 'toggle', 'save_load', 'stacking', 'dtype', 'bad_input']

The same module builds the tiny models and tokenizer (:func:`tiny_tokenizer`,
:func:`make_tiny_model`) that editpeft's own tests use for every family.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

from .adapters import RouterAdapter, WeightDeltaAdapter
from .arch import get_arch, linear_dims
from .deltas import LowRankDelta
from .editable import enable_editing
from .errors import EditError
from .method import EditMethod, MethodConfig, model_topology
from .patches import PatchNeuronAdapter, PatchNeurons, PatchSite
from .registry import get_method, registered
from .request import EditRequest
from .tokens import TargetBatch, greedy_next_tokens, target_token_ids

#: Decoder-only families editpeft supports, each with a tiny config below.
CAUSAL_FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma", "gemma3_text", "opt")
#: Encoder–decoder families.
SEQ2SEQ_FAMILIES = ("t5", "mt5", "umt5")
CHECKS = ("edit", "toggle", "save_load", "stacking", "dtype", "bad_input")

CORPUS = [
    "The Eiffel Tower is located in the city of Paris.",
    "The Colosseum is located in the city of Rome.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "The chemical symbol for gold is Au and for silver is Ag.",
    "Berlin, London, Madrid, Tokyo and Vienna are cities.",
    "A fact about the tower and the city and the river.",
] * 20

#: In a random 2-layer model attention cannot carry an edit from a mid-prompt subject to the last
#: position, so the default request ends with its subject.
DEFAULT_REQUEST = EditRequest(prompt="The city that holds the {}", subject="Eiffel Tower", target_new="Rome")
PROBES = ["The chemical symbol for gold is", "Berlin, London, Madrid"]


# -- tiny models ---------------------------------------------------------------------------------
def tiny_tokenizer():
    """A byte-level BPE tokenizer (400 tokens) trained on :data:`CORPUS`; ``<eos>`` (id 0) pads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def tiny_config(family: str, vocab: int):
    """A 2-layer, 32-wide config of ``family`` (any of the supported families)."""
    import transformers as tf
    common = dict(vocab_size=vocab, eos_token_id=0, pad_token_id=0, bos_token_id=0, initializer_range=0.2)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=32, n_layer=2, n_head=2, rotary_dim=8, n_positions=128, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=128, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                            word_embed_proj_dim=32, max_position_embeddings=128, init_std=0.2, **common)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=128, **common)
    simple = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}
    if family in simple:
        return simple[family](**llama_like)
    if family == "gemma":
        return tf.GemmaConfig(head_dim=16, **llama_like)
    if family == "gemma2":
        return tf.Gemma2Config(head_dim=16, sliding_window=64, **llama_like)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(head_dim=16, sliding_window=64, **llama_like)
    # T5 starts decoding from the pad token (id 0 here); mT5/UMT5 use the gated-GELU FFN (wi_0, wi_1).
    t5_like = dict(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, decoder_start_token_id=0, vocab_size=vocab,
                   eos_token_id=0, pad_token_id=0)
    seq2seq = {"t5": tf.T5Config, "mt5": tf.MT5Config, "umt5": tf.UMT5Config}
    if family in seq2seq:
        return seq2seq[family](**t5_like)
    raise ValueError(f"no tiny config for family {family!r}; known: {CAUSAL_FAMILIES + SEQ2SEQ_FAMILIES}")


def make_tiny_model(family: str, tokenizer, seed: int = 0):
    """A tiny random model of ``family`` in eval mode; the same ``seed`` gives the same weights."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    config = tiny_config(family, len(tokenizer))
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config)
    return model.eval()


def logits_of(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The model's logits on ``prompts`` (decoder start position for seq2seq models)."""
    batch = TargetBatch.for_model(model, tokenizer, list(prompts), device=next(model.parameters()).device)
    with torch.no_grad():
        return model(**batch.model_inputs()).logits


def params_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model, snapshot: Mapping[str, torch.Tensor]) -> None:
    """Weights bitwise equal to ``snapshot`` and no hook left on any module."""
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), f"weight {k} changed"
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"


# -- reference adapters of each kind (for stacking) -----------------------------------------------
def _generator(model) -> torch.Generator:
    return torch.Generator().manual_seed(len(model.config.model_type))


class _ReferenceLowRank(EditMethod):
    """A fixed rank-one delta at the first block's MLP output projection."""

    name, kind, adapter_class = "contract-lowrank", "weight_delta", WeightDeltaAdapter
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config):
        target = get_arch(model).mlp_out_name(0)
        d_in, d_out = linear_dims(model.get_submodule(target))
        g = _generator(model)
        delta = LowRankDelta(torch.randn(d_out, 1, generator=g) * 0.3, torch.randn(d_in, 1, generator=g) * 0.3)
        return WeightDeltaAdapter({target: delta}, method=self.name, hparams={}, requests=list(requests))


class _ReferencePatch(EditMethod):
    """Two fixed patch neurons at the last block's feed-forward layer."""

    name, kind, adapter_class = "contract-patch", "module_hook", PatchNeuronAdapter
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config):
        arch = get_arch(model)
        site = PatchSite.ffn(model, arch.num_layers - 1)
        d_in, d_out = arch.site_width("mlp_in"), arch.site_width("mlp_out")
        g = _generator(model)
        patch = PatchNeurons(torch.randn(2, d_in, generator=g) * 0.3, torch.zeros(2),
                             torch.randn(2, d_out, generator=g) * 0.3, activation="relu")
        return PatchNeuronAdapter({site: patch}, method=self.name, hparams={}, requests=list(requests))


class _BiasRouter(RouterAdapter):
    """Adds ``bias`` to one vocabulary entry's logit everywhere (a pass-through router)."""

    def __init__(self, token: torch.Tensor, **common: Any):
        super().__init__(**common)
        self.token = token

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"token": self.token}

    @classmethod
    def from_saved(cls, tensors, extra, **common):
        return cls(tensors["token"], **common)

    def route(self, model, inputs, call_next):
        out = call_next(inputs)
        logits = out.logits.clone()
        logits[..., int(self.token)] += 0.5
        out.logits = logits
        return out


class _ReferenceRouter(EditMethod):
    name, kind, adapter_class = "contract-router", "router", _BiasRouter
    topologies = ("causal", "seq2seq")

    def compute(self, model, tokenizer, requests, config):
        return _BiasRouter(torch.tensor(1), method=self.name, hparams={}, requests=list(requests), targets=[])


REFERENCE_METHODS: tuple[type[EditMethod], ...] = (_ReferenceLowRank, _ReferencePatch, _ReferenceRouter)


@contextmanager
def reference_methods() -> Iterator[None]:
    """Register the reference methods (``contract-lowrank``, ``contract-patch``, ``contract-router``)."""
    with ExitStack() as stack:
        for cls in REFERENCE_METHODS:
            stack.enter_context(registered(cls, distribution="editpeft.testing"))
        yield


# -- the suite ------------------------------------------------------------------------------------
class _Run:
    """One method on one family: the pieces every check needs."""

    def __init__(self, method: str, family: str, tokenizer, config, request: EditRequest, expect_top1: bool | None,
                 tmp: Path):
        self.method, self.family, self.tok, self.config = method, family, tokenizer, config
        self.request, self.expect_top1, self.tmp = request, expect_top1, tmp
        self.prompts = [request.prompt] + PROBES
        self.editor: Any = None

    def fresh(self):
        return enable_editing(make_tiny_model(self.family, self.tok), self.tok)

    def target_id(self, model) -> int:
        if model_topology(model) == "seq2seq":
            return TargetBatch.for_model(model, self.tok, [self.request.prompt], [self.request.target_new]).target_ids[0][0]
        return target_token_ids(self.tok, self.request.prompt, self.request.target_new)[0]

    def target_logprob(self, model) -> float:
        logits = logits_of(model, self.tok, [self.request.prompt])
        row = TargetBatch.for_model(model, self.tok, [self.request.prompt]).last_prompt[0]
        return float(torch.log_softmax(logits[0, row].double(), -1)[self.target_id(model)])

    def add(self, model, request, **kwargs):
        """``model.add_edit`` of this method, with the editor when the method uses one."""
        if self.editor is not None:
            kwargs["editor"] = self.editor
        return model.add_edit(self.method, request, **kwargs)

    def edit(self, model, name: str = "edit"):
        return self.add(model, self.request, name=name, config=self.config)

    def load(self, model, folder):
        """``model.load_edit`` of a saved folder; this method's adapters get the editor (an adapter
        answering through its editor, e.g. SERAC's, needs it back; others ignore the editor's absence)."""
        adapter_method = _saved_method(folder)
        if self.editor is not None and adapter_method == self.method \
                and getattr(get_method(self.method).adapter_class, "uses_editor", False):
            return model.load_edit(folder, editor=self.editor)
        return model.load_edit(folder)


def _saved_method(folder) -> str | None:
    import json
    try:
        return json.loads((Path(folder) / "edit_config.json").read_text()).get("method")
    except (OSError, ValueError):
        return None


#: Requests a toy editor is trained on (the contract's own request among them: a tiny random model
#: has no knowledge for an editor to generalise from; the contract checks the mechanics).
TOY_EDITOR_REQUESTS = tuple(
    EditRequest(prompt=p, subject=s, target_new=t, paraphrases=(f"Where is the {s}? In",))
    for p, s, t in [("The city that holds the {}", "Eiffel Tower", "Rome"),
                    ("The city that holds the {}", "Colosseum", "Paris"),
                    ("The {} is located in", "Louvre", "Berlin"),
                    ("The {} stands in", "Big Ben", "Madrid"),
                    ("The city of the {} is", "Brandenburg Gate", "London"),
                    ("The {} can be found in", "Prado", "Tokyo")])


def train_toy_editor(method: str, model, tokenizer, config=None, *, steps: int = 20, batch_size: int = 2,
                     lr: float = 1e-2, **kwargs: Any):
    """A few steps of :func:`editpeft.train_editor` on :data:`TOY_EDITOR_REQUESTS` (the contract's
    editor for a tiny model; the same seed gives the same editor)."""
    from .editors import train_editor
    return train_editor(method, model, tokenizer, list(TOY_EDITOR_REQUESTS), steps=steps, batch_size=batch_size,
                        lr=lr, config=config, progress=False, **kwargs)


def _check_edit(run: _Run, model) -> None:
    before = run.target_logprob(model)
    top_before = greedy_next_tokens(model, run.tok, [run.request.prompt])[0]
    run.edit(model)
    if run.expect_top1:
        got = greedy_next_tokens(model, run.tok, [run.request.prompt])[0]
        assert got == run.target_id(model), (f"{run.method} on {run.family}: the greedy token after the prompt is "
                                             f"{got} (was {top_before}), not the target {run.target_id(model)}")
    elif run.expect_top1 is None:
        after = run.target_logprob(model)
        assert after != before, f"{run.method} on {run.family}: the edit left log P(target) at {before:.3f}"
    else:
        after = run.target_logprob(model)
        assert after > before, f"{run.method} on {run.family}: log P(target) went from {before:.3f} to {after:.3f}"


def _check_toggle(run: _Run, model, base: torch.Tensor) -> torch.Tensor:
    edited = logits_of(model, run.tok, run.prompts)
    assert not torch.equal(edited, base), f"{run.method} on {run.family}: the edit changed no logit"
    with model.disabled_edits():
        assert torch.equal(logits_of(model, run.tok, run.prompts), base), "disabled_edits() is not the base model"
    model.set_active_edits([])
    assert torch.equal(logits_of(model, run.tok, run.prompts), base), "set_active_edits([]) is not the base model"
    model.set_active_edits(["edit"])
    assert torch.equal(logits_of(model, run.tok, run.prompts), edited), "switching the edit back on differs"
    return edited


def _check_save_load(run: _Run, model, base, edited, snap) -> None:
    folder = run.tmp / "edit"
    model.edits["edit"].save_pretrained(folder)
    model.remove_edit("edit")
    assert torch.equal(logits_of(model, run.tok, run.prompts), base), "remove_edit() did not restore the base logits"
    assert_untouched(model, snap)
    run.load(model, folder)
    assert torch.equal(logits_of(model, run.tok, run.prompts), edited), "save → load changed the logits"
    model.remove_edit("edit")
    assert_untouched(model, snap)


def _add_references(model, run: _Run) -> list[str]:
    names = []
    for cls in REFERENCE_METHODS:
        if model_topology(model) in cls.topologies:
            model.add_edit(cls.name, run.request, name=cls.name)
            names.append(cls.name)
    return names


def _check_stacking(run: _Run, model, base, snap) -> None:
    for order in ("method first", "method last"):
        if order == "method first":
            run.edit(model)
            refs = _add_references(model, run)
        else:
            refs = _add_references(model, run)
            before = logits_of(model, run.tok, run.prompts)
            run.edit(model)
        stacked = logits_of(model, run.tok, run.prompts)
        model.set_active_edits(refs)
        without = logits_of(model, run.tok, run.prompts)
        if order == "method last":
            assert torch.equal(without, before), f"{order}: switching the edit off does not restore the stack below it"
        model.set_active_edits(list(model.edits))
        folder = run.tmp / f"stack-{order.replace(' ', '-')}"
        names = list(model.edits)
        for name in names:
            model.edits[name].save_pretrained(folder / name)
        model.remove_edit("edit")
        assert torch.equal(logits_of(model, run.tok, run.prompts), without), \
            f"{order}: removing the edit differs from switching it off"
        for name in refs:
            model.remove_edit(name)
        assert torch.equal(logits_of(model, run.tok, run.prompts), base), f"{order}: removing every edit is not the base"
        assert_untouched(model, snap)
        for name in names:
            run.load(model, folder / name)
        assert torch.equal(logits_of(model, run.tok, run.prompts), stacked), f"{order}: the reloaded stack differs"
        for name in names:
            model.remove_edit(name)
        assert_untouched(model, snap)


def _check_dtype(run: _Run) -> None:
    model = run.fresh()
    run.edit(model)
    want = greedy_next_tokens(model, run.tok, [run.request.prompt])[0]
    model.to(torch.bfloat16)
    logits = logits_of(model, run.tok, run.prompts)
    assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all()), "non-finite bf16 logits"
    with model.disabled_edits():
        assert not torch.equal(logits_of(model, run.tok, run.prompts), logits), "the edit is lost after .to(bfloat16)"
    if run.expect_top1:
        assert greedy_next_tokens(model, run.tok, [run.request.prompt])[0] == want, "bf16 changes the edited answer"
    enc = run.tok([run.request.prompt], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert out.shape[0] == 1


def _hooks(model) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()
            if m._forward_hooks or m._forward_pre_hooks}


def _refused(model, snap, fn: Callable[[], Any], what: str) -> None:
    """``fn()`` raises an EditError and leaves weights, hooks and edits exactly as they were."""
    edits, hooks = list(model.edits), _hooks(model)
    try:
        fn()
    except EditError:
        pass
    else:
        raise AssertionError(f"{what} was accepted; it must raise an EditError")
    assert list(model.edits) == edits, f"{what}: the edits changed"
    assert _hooks(model) == hooks, f"{what}: hooks were left behind"
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{what}: weight {k} changed"


def _check_bad_input(run: _Run, model, snap) -> None:
    impl = get_method(run.method)
    cfg = impl.resolve_config(model, run.config)
    overrides = dict(run.config or {}) if isinstance(run.config, Mapping) else cfg.to_dict()
    _refused(model, snap, lambda: run.add(model, run.request, config={**overrides, "no_such_field": 1}),
             "an unknown config field")
    for f in dataclasses.fields(cfg):
        if isinstance(getattr(cfg, f.name), float):
            _refused(model, snap, lambda n=f.name: run.add(model, run.request, config={**overrides, n: math.nan}),
                     f"config {f.name}=nan")
    if impl.needs_subject:
        bare = EditRequest(prompt=run.request.prompt, target_new=run.request.target_new)
        _refused(model, snap, lambda: run.add(model, bare, config=run.config), "a request without subject")
    if not impl.supports_batch:
        _refused(model, snap, lambda: run.add(model, [run.request, run.request], config=run.config), "a batch")
    model.add_edit("contract-lowrank", run.request, name="other")
    _refused(model, params_snapshot(model), lambda: run.add(model, run.request, name="other", append=True,
                                                            config=run.config),
             "an append to another method's edit")
    model.remove_edit("other")
    if not impl.supports_extend():
        run.edit(model)
        _refused(model, params_snapshot(model), lambda: run.add(model, run.request, name="edit", append=True,
                                                                config=run.config),
                 "an append to a method without extend()")
        model.remove_edit("edit")
    other, other_topology = ("t5", "seq2seq") if model_topology(model) == "causal" else ("llama", "causal")
    if other_topology not in impl.topologies:
        foreign = enable_editing(make_tiny_model(other, run.tok), run.tok)
        _refused(foreign, params_snapshot(foreign), lambda: run.add(foreign, run.request, config=run.config),
                 f"a {other} model (a topology the method does not declare)")
    assert_untouched(model, snap)


def check_method(method: str, family: str = "llama", *, config: Mapping[str, Any] | MethodConfig | None = None,
                 request: EditRequest | None = None, expect_top1: bool | None = True, tokenizer=None,
                 checks: Sequence[str] = CHECKS, editor: Any = None,
                 editor_training: Mapping[str, Any] | None = None) -> list[str]:
    """Run the plugin contract for ``method`` on a tiny ``family`` model; returns the checks that
    passed (all of ``checks``) or raises ``AssertionError`` naming the broken promise.

    A method that edits with a trained editor (``requires_editor``) gets ``editor`` in every
    ``add_edit``; without one, a toy editor is trained first on the tiny model
    (:func:`train_toy_editor`, keyword arguments of :func:`editpeft.train_editor` in
    ``editor_training``)."""
    unknown = set(checks) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {CHECKS}")
    tok = tokenizer or tiny_tokenizer()
    with tempfile.TemporaryDirectory(prefix="editpeft-contract-") as tmp, reference_methods():
        run = _Run(method, family, tok, config, request or DEFAULT_REQUEST, expect_top1, Path(tmp))
        model = run.fresh()
        if editor is None and get_method(method).requires_editor:
            editor = train_toy_editor(method, model, tok, config, **dict(editor_training or {}))
        run.editor = editor
        snap, base = params_snapshot(model), logits_of(model, tok, run.prompts)
        passed: list[str] = []
        if {"edit", "toggle", "save_load"} & set(checks):
            _check_edit(run, model)
            passed.append("edit")
            edited = _check_toggle(run, model, base)
            passed.append("toggle")
            _check_save_load(run, model, base, edited, snap)
            passed.append("save_load")
        if "stacking" in checks:
            _check_stacking(run, model, base, snap)
            passed.append("stacking")
        if "dtype" in checks:
            _check_dtype(run)
            passed.append("dtype")
        if "bad_input" in checks:
            _check_bad_input(run, model, snap)
            passed.append("bad_input")
    return [c for c in CHECKS if c in passed]
