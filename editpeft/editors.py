"""Trained editors: what MEND, KE and SERAC learn from data before they can edit.

Some methods first learn an *editor* (MEND and KE a hypernetwork that turns the fine-tuning
gradient into a weight change; SERAC a scope classifier and a counterfactual model) and then
edit with it. The core owns the whole lifecycle, so a method implements only its maths:

* **Training** — :func:`train_editor` (CLI: ``editpeft train METHOD --data FILE --out DIR``)
  reads a JSON/JSONL list of requests (or any format of :mod:`editpeft.evaluation.datasets`:
  zsRE, CounterFact, ...; paraphrases and locality prompts are carried into the requests),
  batches it in a seeded order, runs Adam on the editor's tensors with the method's
  :meth:`~editpeft.EditMethod.editor_step` losses, shows a tqdm bar, logs validation metrics and
  writes checkpoints every ``checkpoint_every`` steps. Each step runs under its own seed
  (``seed``, step), so an interrupted run resumed with ``resume=True`` ends with exactly the
  editor an uninterrupted run gives.
* **The editor folder** — ``editor_config.json`` (format ``editpeft-editor/1``: method, plugin,
  hparams, ``base_model`` with the fingerprint of the modules the editor was trained on, training
  provenance: data file name and sha256, steps, seed, validation metrics; the tensors' sha256),
  ``editor_model.safetensors`` and a ``README.md`` model card. Loading reads JSON and
  safetensors only (nothing is unpickled), checks the hash, finiteness and dtypes, and, once a
  model is known, the base-model fingerprint and the tensor shapes the method expects on it.
* **Checkpoints** — ``OUT/checkpoints/step-NNNNNNNN/``: an editor folder plus
  ``optimizer.safetensors`` (Adam's moments) and ``trainer_state.json`` (step, settings, loss
  history), written to a temporary folder and renamed into place; the last ``keep_checkpoints``
  are kept. The finished editor is written to ``OUT`` itself.
* **Use** — ``model.add_edit(method, request, editor=...)`` takes an :class:`Editor`, a folder or a
  Hub repo id; the editor's hparams are the default config; the adapter records
  ``{"editor": {"id": ..., "sha256": ...}}`` in its ``edit_config.json``. A method with
  ``requires_editor = True`` refuses to edit without one (:class:`~editpeft.errors.EditorRequiredError`, raised by ``add_edit``).

* **Built editors** — a method that learns nothing by optimisation (IKE's demonstration pool)
  implements :meth:`~editpeft.EditMethod.build_editor` instead of ``editor_step``:
  :func:`train_editor` reads the data as evaluation cases (:func:`read_training_cases`: locality
  prompts keep their answers), builds the editor in one seeded pass and records the same
  provenance (``steps`` 0). An editor without tensors is *JSON only*: its folder holds
  ``editor_config.json`` (the content in ``extra``, verified by ``content_sha256``) and the card,
  no safetensors file; its ``sha256`` is the hash of that content.

(:mod:`editpeft.train` is the other loop: it fits one edit's tensors to its requests; this one
trains an editor across a dataset, with batches, checkpoints and resuming.)

Example:
    >>> editor = editpeft.train_editor("mend", model, tok, "zsre_train.json", out="editors/mend",
    ...                                steps=2000, checkpoint_every=200)           # doctest: +SKIP
    >>> editor.push_to_hub("user/mend-smollm2")                                  # doctest: +SKIP
    >>> editor = editpeft.load_editor("user/mend-smollm2")                        # doctest: +SKIP
    >>> model.add_edit("mend", request, editor=editor)                           # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .errors import (BaseModelMismatchError, ConfigError, EditError, EditOptimizationError, EditorFormatError,
                     EditorRequiredError, MethodNotInstalledError)
from .atomic import atomic_dir, write_folder_files
from .fingerprint import base_model_record, check_base_model, model_fingerprint
from .method import computing
from .request import EditRequest
from .tokens import seeded_rng

logger = logging.getLogger(__name__)

FORMAT = "editpeft-editor/1"
CONFIG_NAME = "editor_config.json"
WEIGHTS_NAME = "editor_model.safetensors"
#: The files an editor folder publishes (a training run's checkpoints stay local).
EDITOR_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md")
README_NAME = "README.md"
OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"
CHECKPOINTS = "checkpoints"
_CKPT = re.compile(r"^step-(\d{8})$")


class Editor:
    """A trained editor: the learned tensors of one method, its hparams, and where it came from.

    ``tensors`` are the learned parameters (a flat name -> tensor dict); ``targets`` the modules
    whose weights it was trained on (their fingerprint binds it to its base model); ``extra`` any
    JSON state. Methods subclass it only to add consistency checks (:meth:`validate`).

    Example:
        >>> import torch
        >>> ed = Editor("toy", {"log_lr": torch.zeros(1)}, hparams={"layer": 1})
        >>> len(ed.sha256)
        64
    """

    def __init__(self, method: str, tensors: Mapping[str, torch.Tensor], *, hparams: Mapping[str, Any] | None = None,
                 targets: Sequence[str] = (), extra: Mapping[str, Any] | None = None):
        self.method = method
        self.tensors: dict[str, torch.Tensor] = dict(tensors)
        self.hparams: dict[str, Any] = dict(hparams or {})
        self.targets: list[str] = list(targets)
        self.extra: dict[str, Any] = dict(extra or {})
        self.base_model: dict[str, Any] = {}
        self.plugin: dict[str, Any] = {}
        self.training: dict[str, Any] = {}
        self.id: str | None = None
        #: skip the base-model fingerprint check when used (set by ``load_editor(allow_mismatch=True)``)
        self.allow_mismatch = False
        self._sha: tuple[tuple, str] | None = None          # (tensor identities and versions, sha256)
        self._checked: tuple | None = None                   # what check_editor last accepted

    # -- tensors ------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise :class:`EditorFormatError` when the tensors are inconsistent (subclasses add checks)."""
        for key, t in self.tensors.items():
            if not t.is_floating_point():
                raise EditorFormatError(f"editor tensor {key!r} is {t.dtype}, not floating point; the file is "
                                        "corrupt or was modified")
            if not torch.isfinite(t).all():
                raise EditorFormatError(f"editor tensor {key!r} contains NaN or inf; the editor is corrupt "
                                        "(or its training diverged): train it again or load another")

    def to(self, device: torch.device | str) -> "Editor":
        """Move the tensors to ``device`` (in place, like ``nn.Module.to``); returns the editor."""
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}

    def to_bytes(self) -> bytes:
        return save_safetensors_bytes(self.state_dict())

    @property
    def json_only(self) -> bool:
        """True for an editor without tensors (e.g. IKE's demonstration pool): saved as JSON only."""
        return not self.tensors

    @property
    def sha256(self) -> str:
        """sha256 of the serialised tensors (what ``editor_config.json`` records); computed again only
        after a tensor was replaced or changed in place (an editor may hold hundreds of MB). A
        tensor-free editor's is the hash of its JSON content (``extra``)."""
        if self.json_only:
            return content_sha256(self.extra)
        key = self._tensor_key()
        if self._sha is None or self._sha[0] != key:
            self._sha = (key, hashlib.sha256(self.to_bytes()).hexdigest())
        return self._sha[1]

    def _tensor_key(self) -> tuple:
        return tuple((k, id(t), t._version) for k, t in sorted(self.tensors.items()))

    def provenance(self) -> dict[str, Any]:
        """What an adapter made with this editor records: ``{"id": ..., "sha256": ...}``."""
        return {"id": self.id or f"{self.method}-editor", "sha256": self.sha256}

    # -- base model ---------------------------------------------------------------------------
    def fingerprint(self, model) -> str:
        """The fingerprint ``model`` has for this editor's target modules (original weights)."""
        state = getattr(model, "_editpeft", None)
        if state is not None:
            return state.fingerprint(self.targets)
        return model_fingerprint(model, self.targets)

    def bind(self, model) -> None:
        """Record ``model`` as this editor's base model (done by :func:`train_editor`)."""
        self.base_model = base_model_record(model, self.fingerprint(model))

    def check_base(self, model, allow_mismatch: bool = False) -> None:
        """Refuse ``model`` unless it is the base model this editor was trained on."""
        def actual() -> str:
            for target in self.targets:
                try:
                    model.get_submodule(target)
                except AttributeError:
                    raise BaseModelMismatchError(f"this model has no module {target!r}; editor {self.id!r} was "
                                                 "trained on another architecture") from None
            return self.fingerprint(model)
        check_base_model(self.base_model or {}, model, actual, what=f"editor {self.id!r}",
                         targets=self.targets, allow_mismatch=allow_mismatch,
                         advice="use it with the model it was trained on, train one for this model (editpeft train), "
                                "or load it with load_editor(..., allow_mismatch=True)")

    # -- folder / Hub ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The ``editor_config.json`` content."""
        from .io import editpeft_version
        return {"format": FORMAT, "method": self.method, "editor_class": type(self).__name__,
                "plugin": self.plugin, "editpeft_version": editpeft_version(), "base_model": self.base_model,
                "targets": self.targets, "hparams": self.hparams, "extra": self.extra, "training": self.training,
                "tensors_sha256": None}

    def save_pretrained(self, path: str | os.PathLike, *, readme: bool = True) -> str:
        """Write the editor folder atomically (``editor_config.json``, ``editor_model.safetensors``,
        ``README.md``); files of other kinds in ``path`` (a training run's checkpoints) are kept."""
        dest = Path(path)
        dest.mkdir(parents=True, exist_ok=True)
        if self.json_only:      # no safetensors file; the content hash stands in for the tensors' hash
            config, files = {**self.config(), "content_sha256": self.sha256}, {}
        else:
            blob = self.to_bytes()
            config = {**self.config(), "tensors_sha256": hashlib.sha256(blob).hexdigest()}
            files = {WEIGHTS_NAME: blob}
        files[CONFIG_NAME] = json.dumps(config, indent=2, ensure_ascii=False).encode()
        if readme:
            files[README_NAME] = render_editor_card(config).encode()
        _write_files(dest, files, remove=(WEIGHTS_NAME,) if self.json_only else ())
        if self.id is None:
            self.id = dest.name
        return str(dest)

    def push_to_hub(self, repo_id: str, *, subfolder: str | None = None, private: bool | None = None,
                    commit_message: str | None = None, token: str | None = None) -> str:
        """Upload the editor folder to a Hub model repo (``subfolder`` of it); returns the commit URL."""
        from .hub import upload
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "editor"
            keep = self.id
            self.save_pretrained(folder)
            self.id = keep
            return upload(folder, repo_id, files=EDITOR_FILES, subfolder=subfolder, private=private, token=token,
                          commit_message=commit_message or f"Add {self.method} editor")

    @classmethod
    def from_saved(cls, config: Mapping[str, Any], tensors: dict[str, torch.Tensor]) -> "Editor":
        editor = cls(config["method"], tensors, hparams=config.get("hparams") or {},
                     targets=config.get("targets") or [], extra=config.get("extra") or {})
        editor.base_model = dict(config.get("base_model") or {})
        editor.plugin = dict(config.get("plugin") or {})
        editor.training = dict(config.get("training") or {})
        return editor

    def __repr__(self) -> str:
        steps = self.training.get("steps")
        return (f"<{type(self).__name__} {self.id!r} method={self.method} tensors={len(self.tensors)}"
                + (f" steps={steps}" if steps is not None else "") + ">")


# -- reading ---------------------------------------------------------------------------------------
def read_editor_files(folder: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read and verify an editor folder's config and tensors (JSON + safetensors, hash checked);
    a JSON-only editor (no safetensors file) has its ``content_sha256`` checked and no tensors."""
    from .io import read_verified_folder
    if not (Path(folder) / WEIGHTS_NAME).is_file() and (Path(folder) / CONFIG_NAME).is_file():
        return _read_json_only(Path(folder)), {}
    return read_verified_folder(folder, config_name=CONFIG_NAME, weights_name=WEIGHTS_NAME, fmt=FORMAT,
                                required=("method", "hparams", "tensors_sha256"), error=EditorFormatError,
                                what="an editor folder", how_to_fix="download it or train the editor again "
                                "with `editpeft train`")


def content_sha256(extra: Mapping[str, Any]) -> str:
    """sha256 of a JSON-only editor's content (canonical JSON of its ``extra``)."""
    return hashlib.sha256(json.dumps(extra, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _read_json_only(folder: Path) -> dict[str, Any]:
    """The verified config of a JSON-only editor folder."""
    from .atomic import folder_lock
    from .io import MAX_CONFIG_BYTES, _read_capped
    fix = "download it again or build the editor again with `editpeft train`"
    with folder_lock(folder, shared=True):
        path = folder / CONFIG_NAME
        try:
            config = json.loads(_read_capped(path, MAX_CONFIG_BYTES, EditorFormatError))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise EditorFormatError(f"{path} is not valid JSON ({str(e)[:200]}); the file is corrupt") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise EditorFormatError(f"{path} is not a {FORMAT} config")
    for key in ("method", "hparams", "content_sha256"):
        if key not in config:
            raise EditorFormatError(f"{WEIGHTS_NAME} is missing from {str(folder)!r} and {CONFIG_NAME} records no "
                                    f"{key!r} of a JSON-only editor ({fix})")
    extra = config.get("extra") if isinstance(config.get("extra"), dict) else {}
    if config["content_sha256"] != content_sha256(extra):
        raise EditorFormatError(f"the content of {path} does not match its recorded content_sha256: it is corrupt "
                                f"or was modified ({fix})")
    return config


def resolve_editor_dir(path_or_repo: str | os.PathLike, *, revision: str | None = None,
                       subfolder: str | None = None, force_download: bool = False) -> tuple[Path, str]:
    """(local folder, editor id) for a folder or a Hub repo id (downloaded into the HF cache);
    ``subfolder`` must stay inside the folder or the downloaded snapshot."""
    from .hub import check_subfolder, folder_inside, snapshot
    from .safe_paths import as_path
    if as_path(path_or_repo, "an editor to load (a folder or Hub repo id 'user/repo')").exists():
        local = folder_inside(Path(path_or_repo), subfolder)
        return local, local.name
    text = str(path_or_repo)
    if text.count("/") == 1 and not text.startswith((".", "/")):
        subfolder = check_subfolder(subfolder)
        patterns = [f"{subfolder}/*"] if subfolder else ["*.json", "*.safetensors", "*.md"]
        root = snapshot(text, revision=revision, allow_patterns=patterns, force_download=force_download)
        folder = folder_inside(root, subfolder)
        if not (folder / CONFIG_NAME).is_file():
            raise EditorFormatError(f"Hub repo {text!r}{f' folder {subfolder!r}' if subfolder else ''} holds no "
                                    f"editpeft editor (no {CONFIG_NAME})")
        return folder, text + (f"/{subfolder}" if subfolder else "")
    raise EditorFormatError(f"{text!r} is neither an editor folder nor a Hub repo id ('user/repo')")


def load_editor(path_or_repo: str | os.PathLike, *, revision: str | None = None, subfolder: str | None = None,
                model=None, tokenizer=None, allow_mismatch: bool = False, force_download: bool = False) -> Editor:
    """Load a trained editor from a folder or a Hub repo ``user/repo`` (offline: the HF cache).

    The tensors' hash, dtypes and finiteness are checked here; with ``model`` (and ``tokenizer``)
    also the base-model fingerprint and the shapes the method expects on that model (``add_edit``
    does both in any case). ``allow_mismatch=True`` accepts a fingerprint mismatch, here and when
    the editor is used; ``force_download=True`` fetches a Hub repo's files again.

    Example:
        >>> editor = load_editor("user/mend-smollm2", model=model, tokenizer=tok)   # doctest: +SKIP
    """
    from .card import check_card
    from .registry import method_info
    folder, editor_id = resolve_editor_dir(path_or_repo, revision=revision, subfolder=subfolder,
                                           force_download=force_download)
    config, tensors = read_editor_files(folder)
    try:
        check_card(folder, config)
    except EditError as e:
        raise EditorFormatError(str(e).replace("edit_config.json", CONFIG_NAME)) from None
    info = method_info(config["method"])
    if info is None or not info.loaded:
        from .schema import DISTRIBUTION_NAME
        dist = (config.get("plugin") or {}).get("distribution")
        hint = (f"install it with: pip install {dist}" if isinstance(dist, str) and DISTRIBUTION_NAME.fullmatch(dist)
                else "its plugin field names no valid distribution, so install the plugin that provides it")
        raise MethodNotInstalledError(f"editor {editor_id!r} is for method {str(config['method'])[:60]!r}, which "
                                      f"is not installed; {hint}")
    editor = (info.cls.editor_class or Editor).from_saved(config, tensors)
    editor.id = editor_id
    editor.allow_mismatch = allow_mismatch
    editor.validate()
    if model is not None:
        method = info.cls()
        if tokenizer is None and getattr(model, "_editpeft", None) is not None:
            tokenizer = model._editpeft.tokenizer
        cfg = method.resolve_config(model, dict(editor.hparams))
        check_editor(method, model, tokenizer, editor, cfg)
    return editor


# -- use in add_edit --------------------------------------------------------------------------------
def check_editor(method, model, tokenizer, editor: Editor, config) -> None:
    """Refuse an editor of another method, another base model, or with tensors of the wrong shapes."""
    if editor.method != method.name:
        raise EditError(f"editor {editor.id!r} was trained for method {editor.method!r}, not {method.name!r}")
    accepted = (id(model), editor._tensor_key(), json.dumps(config.to_dict(), sort_keys=True, default=str))
    if editor._checked == accepted:
        return                      # the same editor, unchanged, with the same settings on this model
    editor.validate()
    editor.check_base(model, editor.allow_mismatch)
    with _seeded(0, model, "template"):
        template = method.init_editor(model, tokenizer, config)
    if list(template.targets) != list(editor.targets):
        raise ConfigError(f"editor {editor.id!r} was trained on {', '.join(editor.targets)} but this config selects "
                          f"{', '.join(template.targets)}; keep the editor's hparams ({editor.hparams}) or train "
                          "an editor for these settings")
    want, have = template.tensors, editor.tensors
    if set(want) != set(have):
        raise EditorFormatError(f"editor {editor.id!r} has tensors {sorted(have)} but method {method.name!r} with "
                                f"these hparams expects {sorted(want)}; the editor is corrupt or from another version")
    for key, t in want.items():
        if tuple(have[key].shape) != tuple(t.shape):
            raise EditorFormatError(f"editor tensor {key!r} has shape {tuple(have[key].shape)} but method "
                                    f"{method.name!r} expects {tuple(t.shape)} on this model; the editor is "
                                    "corrupt or was trained for another model")
    editor._checked = accepted


def editor_for_edit(method, model, tokenizer, editor: "Editor | str | os.PathLike | None", config: Any):
    """(editor, resolved config) for ``add_edit``: loads ``editor`` (object, folder or repo id), uses its
    hparams as the default config, and checks it against ``model``."""
    if not isinstance(editor, Editor):
        editor = load_editor(editor)
    if config is None or isinstance(config, Mapping):
        config = {**editor.hparams, **dict(config or {})}
    cfg = method.resolve_config(model, config)
    check_editor(method, model, tokenizer, editor, cfg)
    return editor.to(next(model.parameters()).device), cfg


def bind_loaded_editor(adapter, model, tokenizer, editor: "Editor | str | os.PathLike | None") -> None:
    """Give a loaded adapter that computes with its editor at inference (SERAC routes through the
    editor's classifier and counterfactual model; its folder holds only the edits) that editor:
    ``editor`` if given, else the one its ``edit_config.json`` names (a folder or a Hub repo in the
    cache). The editor's tensors must hash to what the adapter recorded."""
    from .registry import get_method
    record = getattr(adapter, "editor", None) or {}
    if editor is None:
        ident = record.get("id")
        try:
            editor = load_editor(ident) if isinstance(ident, str) else None
        except EditError:
            editor = None
        if editor is None:
            raise EditorRequiredError(f"this {adapter.method} adapter answers with the editor it was made with "
                                      f"({ident!r}), which is not a folder or a cached Hub repo here; pass "
                                      "load_edit(..., editor=<its folder, Hub repo id or Editor>)")
    elif not isinstance(editor, Editor):
        editor = load_editor(editor)
    if record.get("sha256") and editor.sha256 != record["sha256"]:
        raise EditorFormatError(f"editor {editor.id!r} is not the one this adapter was made with (sha256 "
                                f"{editor.sha256[:12]}… against the recorded {str(record['sha256'])[:12]}…); "
                                "load the adapter with the editor that made it")
    impl = get_method(adapter.method)
    cfg = impl.resolve_config(model, dict(adapter.hparams))
    check_editor(impl, model, tokenizer, editor, cfg)
    adapter.bind_editor(editor.to(next(model.parameters()).device))


def push_editor_folder(folder: str | os.PathLike, repo_id: str, *, subfolder: str | None = None,
                       private: bool | None = None, commit_message: str | None = None, token: str | None = None) -> str:
    """Upload a saved editor folder (verified first; a training run's checkpoints stay local)."""
    from .hub import upload
    editor = load_editor(folder)
    return upload(folder, repo_id, files=EDITOR_FILES, subfolder=subfolder, private=private, token=token,
                  commit_message=commit_message or f"Add {editor.method} editor")


# -- training ----------------------------------------------------------------------------------------
@dataclass
class TrainSettings:
    """The settings a resumed run must share with the run it continues (``steps`` may grow)."""

    method: str
    hparams: dict
    data: str
    data_sha256: str
    val_sha256: str | None
    batch_size: int
    lr: float
    seed: int
    max_grad_norm: float | None
    base_fingerprint: str | None


def read_training_data(data: "str | os.PathLike | Sequence[EditRequest | Mapping[str, Any]]"
                       ) -> tuple[list[EditRequest], str, str]:
    """(requests, name, sha256) of a training file or list.

    A file is a JSON list (or JSONL) of request objects (``prompt``, ``target_new``, optional
    ``subject``, ``paraphrases``, ``locality``), or a file of a dataset format the evaluation
    harness reads (zsRE, CounterFact, ...), whose rephrasings and locality prompts become the
    requests' ``paraphrases`` and ``locality``.
    """
    from .evaluation.datasets import load_dataset
    records, name, digest = _read_records(data)
    if _is_request_list(records):
        requests = [EditRequest.from_dict(dict(r)) for r in records]
    else:
        requests = []
        for case in load_dataset(records).cases:
            for r in case.requests:
                requests.append(dataclasses.replace(
                    r, paraphrases=r.paraphrases or tuple(p.prompt for p in case.generalization),
                    locality=r.locality or tuple(p.prompt for ps in case.locality.values() for p in ps)))
    return requests, name, digest


def read_training_cases(data: "str | os.PathLike | Sequence[EditRequest | Mapping[str, Any]]") -> tuple[list, str, str]:
    """(cases, name, sha256): the data of :func:`read_training_data` as evaluation cases
    (:class:`~editpeft.evaluation.cases.EvalCase`), whose locality probes keep their answers (what a
    built editor such as IKE's pool needs). A request list gives one case per request: its
    paraphrases answered by ``target_new``, its locality prompts without answers."""
    from .evaluation.cases import EvalCase, Probe
    from .evaluation.datasets import load_dataset
    records, name, digest = _read_records(data)
    if not _is_request_list(records):
        return list(load_dataset(records).cases), name, digest
    cases = []
    for i, raw in enumerate(records):
        r = EditRequest.from_dict(dict(raw))
        cases.append(EvalCase(case_id=str(i), source="requests", requests=(r,),
                              generalization=tuple(Probe(p, (r.target_new,)) for p in r.paraphrases),
                              locality={"locality": tuple(Probe(p) for p in r.locality)} if r.locality else {}))
    return cases, name, digest


def _read_records(data) -> tuple[list, str, str]:
    """(raw records, name, sha256) of a training file or list."""
    from .evaluation.datasets import read_records
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        records = read_records(path)
        name, digest = path.name, hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        records = [r.to_dict() if isinstance(r, EditRequest) else dict(r) for r in data]
        name = "<memory>"
        digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()
    if not records:
        raise ConfigError(f"the training data {name} holds no records")
    return records, name, digest


def _is_request_list(records: list) -> bool:
    return isinstance(records[0], Mapping) and "prompt" in records[0] and "target_new" in records[0] \
        and set(records[0]) <= {f.name for f in dataclasses.fields(EditRequest)}


def _fact_key(request: EditRequest) -> str:
    """What identifies a fact across datasets: its subject, else its prompt (case-folded)."""
    return " ".join((request.subject or request.prompt).split()).casefold()


def _excluding(items: list, keys_of, exclude, name: str, digest: str) -> tuple[list, str, str]:
    """``items`` without those whose fact (``keys_of(item)``: their requests' subjects or prompts)
    appears in ``exclude`` (a file or list of the formats :func:`read_training_data` reads): a
    training set kept disjoint from an evaluation set. Returns (kept, name, sha256 of both)."""
    if exclude is None:
        return items, name, digest
    held_out, ex_name, ex_digest = read_training_data(exclude)
    banned = {_fact_key(r) for r in held_out}
    kept = [it for it in items if not any(_fact_key(r) in banned for r in keys_of(it))]
    logger.info("excluded %d of %d training records whose subject is in %s", len(items) - len(kept), len(items),
                ex_name)
    if not kept:
        raise ConfigError(f"every training record shares a subject with {ex_name}; nothing is left to train on")
    return kept, f"{name} minus {ex_name}", hashlib.sha256(f"{digest}-{ex_digest}".encode()).hexdigest()


def train_editor(method: str, model, tokenizer, data, *, out: str | os.PathLike | None = None, steps: int = 100,
                 batch_size: int = 4, lr: float = 1e-3, seed: int = 0, config: Any = None,
                 checkpoint_every: int | None = None, eval_every: int | None = None, keep_checkpoints: int = 2,
                 resume: bool = False, val_data=None, val_fraction: float = 0.0, max_grad_norm: float | None = None,
                 progress: bool = True, exclude=None) -> Editor:
    """Train ``method``'s editor on ``model`` with ``data`` and return it (also saved to ``out``).

    ``data`` is a file (see :func:`read_training_data`) or a list of requests. Each step draws
    ``batch_size`` requests in a seeded order and runs Adam (``lr``) on the method's
    ``editor_step`` loss. With ``out``, a checkpoint is written every ``checkpoint_every`` steps and
    at the end; ``resume=True`` continues from the newest checkpoint in ``out`` (same settings
    required; ``steps`` may be larger) and ends with the same editor an uninterrupted run gives.
    Validation (on ``val_data``, or a ``val_fraction`` of ``data``) runs at step 0, every
    ``eval_every`` steps (default: ``checkpoint_every``) and at the end; its metrics go into the
    editor's ``training`` provenance. ``exclude`` (a file or list) drops every training record
    whose subject (else prompt) appears in it, e.g. the evaluation set the editor will be measured on.

    Example:
        >>> editor = train_editor("mend", model, tok, "zsre_train.json", out="editors/mend", steps=500,
        ...                       checkpoint_every=100)                         # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    from .registry import get_method, method_info
    impl = get_method(method)
    if not type(impl).trains_editor():
        raise EditError(f"method {impl.name!r} does not learn an editor; methods that do: "
                        + (", ".join(trainable_methods()) or "none installed"))
    if not (isinstance(steps, int) and steps >= 0 and isinstance(batch_size, int) and batch_size > 0):
        raise ConfigError(f"steps must be an int >= 0 and batch_size an int > 0 (got {steps!r}, {batch_size!r})")
    if not (lr > 0 and math.isfinite(lr)):
        raise ConfigError(f"lr must be a positive finite number, got {lr!r}")
    if checkpoint_every is not None and checkpoint_every <= 0:
        raise ConfigError(f"checkpoint_every must be positive, got {checkpoint_every}")
    cfg = impl.resolve_config(model, config)
    if type(impl).builds_editor():
        return _build_editor(impl, model, tokenizer, data, cfg, out, seed, exclude)
    requests, data_name, data_sha = read_training_data(data)
    requests, data_name, data_sha = _excluding(requests, lambda r: [r], exclude, data_name, data_sha)
    requests, val, val_sha = _validation_split(requests, val_data, val_fraction, seed)
    eval_every = eval_every or checkpoint_every
    device = next(model.parameters()).device

    with _seeded(seed, model, "init"):
        editor = impl.init_editor(model, tokenizer, cfg)
    if not isinstance(editor, Editor) or editor.method != impl.name:
        raise EditError(f"{impl.name}.init_editor returned {editor!r}, not an Editor of method {impl.name!r}")
    editor.bind(model)
    info = method_info(impl.name)
    editor.plugin = {"distribution": info.distribution, "version": info.version} if info else {}
    settings = TrainSettings(impl.name, cfg.to_dict(), data_name, data_sha, val_sha, batch_size, float(lr), seed,
                             max_grad_norm, editor.base_model.get("fingerprint"))
    names = sorted(editor.tensors)
    params = [editor.tensors[k].detach().clone().to(device).requires_grad_(True) for k in names]
    editor.tensors = dict(zip(names, params))
    optimizer = torch.optim.Adam(_param_groups(names, params, lr, impl.editor_lr_scales(cfg)), lr=lr)
    out_dir = Path(out) if out is not None else None
    start, history = _resume_point(out_dir, resume, impl, editor, optimizer, settings)
    if start > steps:
        raise ConfigError(f"the checkpoint in {out_dir} is at step {start}, past steps={steps}; pass a larger steps")

    def validate(step: int) -> None:
        if not val:
            return
        sums: dict[str, float] = {}
        for i in range(0, len(val), batch_size):
            with _seeded(seed, model, f"val-{i}"):
                metrics = impl.editor_eval(editor, model, tokenizer, val[i:i + batch_size], cfg)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * len(val[i:i + batch_size])
        row = {f"val_{k}": v / len(val) for k, v in sums.items()}
        history.append({"step": step, **row})
        logger.info("step %d validation: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in row.items()))

    log_every = max(1, steps // 50)
    with computing(model):
        if start == 0:
            validate(0)
        bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"training {impl.name} editor",
                   unit="step")
        try:
            for step in range(start, steps):
                batch = [requests[i] for i in _batch_indices(step, batch_size, len(requests), seed)]
                with _seeded(seed, model, f"step-{step}"):
                    losses = impl.editor_step(editor, model, tokenizer, batch, cfg)
                    _optimizer_step(impl.name, editor, losses, optimizer, max_grad_norm, step, out_dir)
                done = step + 1
                values = {k: float(v.detach() if torch.is_tensor(v) else v) for k, v in losses.items()}
                bar.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
                bar.update(1)
                if done % log_every == 0 or done == steps:
                    history.append({"step": done, **values})
                if eval_every and done % eval_every == 0 and done != steps:
                    validate(done)
                if out_dir is not None and checkpoint_every and done % checkpoint_every == 0 and done != steps:
                    _save_checkpoint(out_dir, done, editor, optimizer, settings, history, keep_checkpoints)
        finally:
            bar.close()
        if not history or history[-1].get("step") != steps or not any(k.startswith("val_") for k in history[-1]):
            validate(steps)
    editor.tensors = {k: p.detach().to("cpu") for k, p in editor.tensors.items()}
    editor.training = _provenance(settings, steps, len(requests), len(val), history)
    editor.validate()
    if out_dir is not None:
        _save_checkpoint(out_dir, steps, editor, optimizer, settings, history, keep_checkpoints)
        editor.save_pretrained(out_dir)
        editor.id = out_dir.name
        logger.info("saved the %s editor to %s", impl.name, out_dir)
    return editor


def _param_groups(names: Sequence[str], params: Sequence[torch.Tensor], lr: float,
                  scales: Mapping[str, float]) -> list[dict[str, Any]]:
    """Adam parameter groups: each tensor at ``lr`` times the scale of its longest matching name
    prefix in ``scales`` (1 when none matches), groups in the order of the sorted names."""
    for prefix, scale in scales.items():
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ConfigError(f"editor lr scale for {prefix!r} must be a positive finite number, got {scale!r}")
    groups: dict[float, list[torch.Tensor]] = {}
    for name, p in zip(names, params):
        match = max((k for k in scales if name.startswith(k)), key=len, default=None)
        groups.setdefault(float(scales[match]) if match is not None else 1.0, []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items()]


def _build_editor(impl, model, tokenizer, data, cfg, out: str | os.PathLike | None, seed: int,
                  exclude=None) -> Editor:
    """One seeded pass of ``impl.build_editor`` over the data as cases; provenance as training's (0 steps)."""
    from .registry import method_info
    cases, data_name, data_sha = read_training_cases(data)
    cases, data_name, data_sha = _excluding(cases, lambda c: c.requests, exclude, data_name, data_sha)
    with computing(model), _seeded(seed, model, "build"):
        editor = impl.build_editor(model, tokenizer, cases, cfg)
    if not isinstance(editor, Editor) or editor.method != impl.name:
        raise EditError(f"{impl.name}.build_editor returned {editor!r}, not an Editor of method {impl.name!r}")
    editor.bind(model)
    info = method_info(impl.name)
    editor.plugin = {"distribution": info.distribution, "version": info.version} if info else {}
    editor.training = {"data": data_name, "data_sha256": data_sha, "records": len(cases), "val_records": 0,
                       "steps": 0, "built": True, "seed": seed, "metrics": dict(editor.training.get("metrics") or {}),
                       "history": []}
    editor.validate()
    if out is not None:
        editor.save_pretrained(out)
        editor.id = Path(out).name
        logger.info("saved the %s editor to %s", impl.name, out)
    return editor


def _validation_split(requests: list, val_data, val_fraction: float, seed: int) -> tuple[list, list, str | None]:
    """(training requests, validation requests, validation data id): ``val_data`` if given, else a
    seeded ``val_fraction`` of ``requests``, else none."""
    if val_data is not None:
        val, _, val_sha = read_training_data(val_data)
        return requests, val, val_sha
    if val_fraction <= 0:
        return requests, [], None
    n_val = max(1, int(round(len(requests) * val_fraction)))
    if n_val >= len(requests):
        raise ConfigError(f"val_fraction={val_fraction} leaves no training data ({len(requests)} records)")
    order = torch.randperm(len(requests), generator=torch.Generator().manual_seed(seed)).tolist()
    return [requests[i] for i in sorted(order[n_val:])], [requests[i] for i in order[:n_val]], f"fraction:{val_fraction}"


def _resume_point(out_dir: Path | None, resume: bool, impl, editor: "Editor", optimizer, settings) -> tuple[int, list]:
    """(first step, history): from the newest checkpoint in ``out_dir`` when resuming, else (0, [])."""
    if out_dir is None:
        return 0, []
    found = _checkpoints(out_dir)
    if found and not resume:
        raise EditError(f"{out_dir} holds checkpoints of an earlier run (newest: {found[-1].name}); pass "
                        "resume=True (CLI: --resume) to continue it, or choose another output folder")
    if resume and found:
        return _restore(found, impl, editor, optimizer, settings)
    if resume:
        logger.info("no checkpoint in %s; starting from step 0", out_dir)
    return 0, []


def _optimizer_step(method: str, editor: "Editor", losses, optimizer, max_grad_norm: float | None, step: int,
                    out_dir: Path | None) -> None:
    """One optimiser step on ``losses["loss"]``; refuses a malformed or non-finite loss or gradient."""
    loss = losses.get("loss") if isinstance(losses, Mapping) else None
    if not (torch.is_tensor(loss) and loss.ndim == 0 and loss.requires_grad):
        raise EditError(f"{method}.editor_step must return a dict whose 'loss' is a scalar "
                        "tensor depending on the editor's tensors")
    where = f", then resume from the last checkpoint in {out_dir}" if out_dir else ""
    if not torch.isfinite(loss):
        raise EditOptimizationError(f"editor training diverged at step {step + 1} (loss {float(loss.detach())}); "
                                    f"lower lr{where}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    bad = [k for k, p in editor.tensors.items() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    if bad:
        raise EditOptimizationError(f"non-finite gradient for editor tensor(s) {bad} at step "
                                    f"{step + 1}; lower lr or set max_grad_norm{where}")
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(editor.tensors.values()), max_grad_norm)
    optimizer.step()


def trainable_methods() -> dict[str, Any]:
    """Installed methods that can train an editor: name -> MethodInfo."""
    from .registry import discover
    return {n: i for n, i in sorted(discover().items()) if i.loaded and i.cls.trains_editor()}


# -- training helpers ----------------------------------------------------------------------------
def _provenance(settings: TrainSettings, steps: int, n_train: int, n_val: int, history: list) -> dict[str, Any]:
    vals = [h for h in history if any(k.startswith("val_") for k in h)]
    metrics = {k: v for k, v in vals[-1].items() if k != "step"} if vals else {}
    if vals and vals[0]["step"] == 0:
        metrics.update({f"initial_{k}": v for k, v in vals[0].items() if k != "step"})
    return {"data": settings.data, "data_sha256": settings.data_sha256, "records": n_train, "val_records": n_val,
            "steps": steps, "batch_size": settings.batch_size, "lr": settings.lr, "seed": settings.seed,
            "max_grad_norm": settings.max_grad_norm, "metrics": metrics, "history": history}


def _batch_indices(step: int, batch_size: int, n: int, seed: int) -> list[int]:
    """The data indices of ``step``: a seeded permutation per epoch, read in order."""
    out, perms = [], {}
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch = pos // n
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
        out.append(perms[epoch][pos % n])
    return out


@contextmanager
def _seeded(seed: int, model, tag: str) -> Iterator[None]:
    """Run the block under a seed derived from (``seed``, ``tag``), leaving the global RNG as it was."""
    derived = int.from_bytes(hashlib.sha256(f"{seed}/{tag}".encode()).digest()[:8], "little") % (2 ** 63)
    with seeded_rng(derived, next(model.parameters()).device):
        yield


def _write_files(dest: Path, files: Mapping[str, bytes], remove: Sequence[str] = ()) -> None:
    """Write ``files`` into ``dest`` under the folder's lock, each atomically, deleting ``remove``;
    the folder's other files (a training run's checkpoints) are kept."""
    write_folder_files(dest, files, own=(*files, *remove), overwrite=True, remove=remove)


def _checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders of ``out``, oldest first."""
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: p.name)


def _save_checkpoint(out: Path, step: int, editor: Editor, optimizer: torch.optim.Optimizer,
                     settings: TrainSettings, history: list, keep: int) -> Path:
    root = out / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    dest = root / f"step-{step:08d}"
    with atomic_dir(dest) as tmp:
        snapshot = type(editor).from_saved({**editor.config(), "method": editor.method}, editor.state_dict())
        snapshot.base_model, snapshot.plugin = editor.base_model, editor.plugin
        snapshot.training = {"steps": step, "checkpoint": True}
        snapshot.save_pretrained(tmp, readme=False)
        tensors, meta = _optimizer_to_safetensors(optimizer)
        blob = save_safetensors_bytes(tensors)
        state = {"format": "editpeft-trainer/1", "step": step, "settings": asdict(settings), "history": history,
                 "optimizer": meta, "optimizer_sha256": hashlib.sha256(blob).hexdigest()}
        _write_files(tmp, {OPTIMIZER_NAME: blob, STATE_NAME: json.dumps(state, indent=1).encode()})
    for old in _checkpoints(out)[:-max(1, keep)]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", dest)
    return dest


def _restore(found: list[Path], impl, editor: Editor, optimizer: torch.optim.Optimizer,
             settings: TrainSettings) -> tuple[int, list]:
    """Load the newest readable checkpoint into ``editor`` and ``optimizer``; returns (step, history)."""
    for ckpt in reversed(found):
        try:
            state = json.loads((ckpt / STATE_NAME).read_text())
            config, tensors = read_editor_files(ckpt)
            blob = (ckpt / OPTIMIZER_NAME).read_bytes()
            if hashlib.sha256(blob).hexdigest() != state.get("optimizer_sha256"):
                raise EditorFormatError(f"{ckpt / OPTIMIZER_NAME} does not match its recorded hash")
            opt_tensors = load_safetensors_bytes(blob)
        except (EditError, OSError, json.JSONDecodeError, SafetensorError) as e:
            logger.warning("skipping unreadable checkpoint %s: %s", ckpt, e)
            continue
        saved = state.get("settings") or {}
        mine = json.loads(json.dumps(asdict(settings)))   # tuples compare as the lists JSON holds
        diff = sorted(k for k in mine if saved.get(k) != mine[k])
        if diff:
            raise EditError(f"cannot resume from {ckpt}: its run used other settings ({', '.join(diff)}: "
                            + "; ".join(f"{saved.get(k)!r} then, {mine[k]!r} now" for k in diff)
                            + "). Use the same data and settings, or train into a new output folder")
        if set(tensors) != set(editor.tensors) or any(tensors[k].shape != editor.tensors[k].shape for k in tensors):
            raise EditorFormatError(f"the editor tensors in {ckpt} do not match method {impl.name!r}'s editor")
        with torch.no_grad():
            for k, p in editor.tensors.items():
                p.copy_(tensors[k])
        optimizer.load_state_dict(_optimizer_from_safetensors(opt_tensors, state["optimizer"]))
        logger.info("resuming %s editor training from %s", impl.name, ckpt)
        return int(state["step"]), list(state.get("history") or [])
    raise EditError(f"no readable checkpoint among {', '.join(p.name for p in found)}; start a new run "
                    "(without --resume) in another output folder")


def _optimizer_to_safetensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_safetensors(tensors: dict[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    for idx, values in (meta.get("scalars") or {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# -- model card --------------------------------------------------------------------------------------
def render_editor_card(config: Mapping[str, Any]) -> str:
    """The Hub model card of an editor folder (front matter agrees with ``editor_config.json``)."""
    import yaml
    base = config.get("base_model") or {}
    training = config.get("training") or {}
    plugin = config.get("plugin") or {}
    front: dict[str, Any] = {"library_name": "editpeft",
                             "tags": ["editpeft", "knowledge-editing", "editor", config["method"]]}
    if base.get("name_or_path"):
        front["base_model"] = base["name_or_path"]
    if base.get("license"):
        front["license"] = base["license"]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# A trained {config['method']} editor", "",
             f"An [editpeft](https://pypi.org/project/editpeft/) editor for method `{config['method']}`, trained on "
             f"{'`' + base['name_or_path'] + '`' if base.get('name_or_path') else 'a model without a recorded name'} "
             f"({base.get('model_type')}). It makes edits; it is not an edit itself.",
             "", "## Training", "",
             f"- data `{training.get('data')}` (sha256 `{training.get('data_sha256')}`), "
             f"{training.get('records')} records, {training.get('val_records')} for validation",
             (f"- built in one pass (no optimisation), seed {training.get('seed')}" if training.get("built") else
              f"- {training.get('steps')} steps, batch size {training.get('batch_size')}, lr {training.get('lr')}, "
              f"seed {training.get('seed')}"), ""]
    if training.get("metrics"):
        lines += ["| validation metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in training["metrics"].items()]
        lines.append("")
    lines += ["## Method hyper-parameters", "", "```json", json.dumps(config.get("hparams") or {}, indent=2), "```", "",
              "## Provenance", "", f"- editpeft {config.get('editpeft_version')}",
              f"- plugin {plugin.get('distribution')} {plugin.get('version')}",
              f"- base-model fingerprint `{base.get('fingerprint')}` over {', '.join(config.get('targets') or [])}",
              (f"- JSON only, content sha256 `{config.get('content_sha256')}`" if config.get("content_sha256")
               else f"- tensors sha256 `{config.get('tensors_sha256')}`"), "",
              "## Use", "", "```python", "import editpeft",
              "model = editpeft.enable_editing(model, tokenizer)   # the base model above",
              "editor = editpeft.load_editor(\"<this repo or folder>\")",
              f"model.add_edit({config['method']!r}, request, editor=editor)", "```", ""]
    return "\n".join(lines)
