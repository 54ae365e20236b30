"""Run editing methods over evaluation cases: single, batch and sequential modes, resumable.

A run folder ``OUT/<method>/`` holds ``run.json`` (the settings and the case ids), ``cases.jsonl``
(one line per scored case, written as soon as it is scored) and, in sequential mode, ``state/``
(the adapters at the last checkpoint). Starting the same run again skips what is already scored;
different settings on an existing folder are an error rather than a silent mix.

Example:
    >>> import editpeft
    >>> summary = editpeft.evaluate(model, tokenizer, "rome", "counterfact.json", n=20,
    ...                             out="runs/rome-cf")                       # doctest: +SKIP
    >>> summary["rome"]["metrics"]["reliability"]["token_em"]                 # doctest: +SKIP
    1.0
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from .. import __version__
from ..atomic import atomic_dir, write_text
from ..errors import ConfigError, DatasetFormatError, EditError
from ..tokens import target_token_ids
from .cases import EvalCase
from .datasets import load_dataset
from .metrics import PROTOCOLS, CaseScorer
from .prefix import PrefixStates, prefix_layer
from .report import summarize, write_report

logger = logging.getLogger(__name__)

MODES = ("single", "batch", "sequential")
DEFAULT_CHECKPOINTS = (1, 10, 50, 100, 200, 500, 1000)


@dataclass
class RunSettings:
    """Everything that defines a run; a resumed run must match it exactly."""

    method: str
    mode: str = "single"
    config: Any = None
    data: str = ""
    format: str = ""
    n: int | None = None
    known_only: bool = False
    batch_size: int | None = None
    checkpoints: list[int] = field(default_factory=lambda: list(DEFAULT_CHECKPOINTS))
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    shard: list[int] = field(default_factory=lambda: [0, 1])
    model: str = ""
    sample: int | None = None
    editor: dict[str, str] | None = None      # the trained editor's id and sha256 (methods that use one)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        if self.sample is not None and (self.mode != "sequential" or self.sample < 1):
            raise ConfigError("sample (cases scored per checkpoint) needs mode='sequential' and a positive count")
        i, n = self.shard
        if not 0 <= i < n:
            raise ConfigError(f"shard {i}/{n} is out of range; use i/n with 0 <= i < n")

    @property
    def step(self) -> int:
        """Edits per edit call: ``batch_size`` (default 10 in batch mode, 1 in sequential mode)."""
        if self.batch_size is not None:
            return self.batch_size
        return 10 if self.mode == "batch" else 1


def known_mask(model, tokenizer, cases: Sequence[EvalCase], chunk: int = 64) -> list[bool]:
    """Whether the unedited model's greedy next token after each edited prompt is the first token
    of its true answer, for every request of the case (cases without a true answer: False)."""
    from .scoring import score_branches
    out = []
    for start in range(0, len(cases), chunk):
        part = cases[start:start + chunk]
        items = [(r.prompt, [[]]) for c in part for r in c.requests]
        preds = [s[0].argmax[0] for s in score_branches(model, tokenizer, items)]
        k = 0
        for c in part:
            ok = True
            for r in c.requests:
                ok &= r.target_true is not None and preds[k] == target_token_ids(tokenizer, r.prompt, r.target_true)[0]
                k += 1
            out.append(bool(ok))
    return out


def peak_memory_mb(device: torch.device | None = None) -> float | None:
    """Peak resident memory of this process (CPU) or peak allocated memory (CUDA), in MiB; None
    where the platform gives no peak (no ``resource`` module and no ``psutil``)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:
        import resource            # Unix only
    except ImportError:
        resource = None
    if resource is not None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux, bytes on macOS
        return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024
    try:
        import psutil
    except ImportError:
        return None
    info = psutil.Process().memory_info()
    return getattr(info, "peak_wset", info.rss) / 2 ** 20               # Windows: peak working set


class _RunDir:
    """The on-disk record of one method's run: settings, appended case lines, resume state."""

    def __init__(self, path: Path, settings: dict[str, Any], case_ids: list[str], overwrite: bool,
                 hparams: dict[str, Any] | None = None):
        self.path = path
        # the resolved hyper-parameters too: a card edited between runs must not resume an old run
        meta = {"settings": settings, "case_ids": case_ids, "hparams": hparams}
        run_json = path / "run.json"
        if overwrite and path.exists():
            shutil.rmtree(path)
        if run_json.is_file():
            old = json.loads(run_json.read_text())
            # a setting added after the run was written (absent there) defaults to None
            old["settings"] = {**{k: None for k in settings}, **(old.get("settings") or {})}
            if {k: old.get(k) for k in meta} != meta:
                raise EditError(f"{path} holds a run with other settings or cases; choose another --out, "
                                "or pass overwrite=True (--overwrite) to start it afresh")
        else:
            path.mkdir(parents=True, exist_ok=True)
            _write_json(run_json, {**meta, "editpeft_version": __version__})
        self.lines_path = path / "cases.jsonl"
        if self.lines_path.is_file():     # drop a line cut off by an interruption before appending again
            kept = self.lines()
            write_text(self.lines_path, "".join(json.dumps(r) + "\n" for r in kept))

    def lines(self) -> list[dict[str, Any]]:
        if not self.lines_path.is_file():
            return []
        out = []
        for line in self.lines_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:   # a line cut off by an interruption: rescored
                break
        return out

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        with self.lines_path.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2))


class Runner:
    """Evaluates one method on fixed cases; use :func:`evaluate` for the whole pipeline."""

    def __init__(self, model, tokenizer, settings: RunSettings, cases: list[EvalCase], run_dir: _RunDir,
                 progress: bool = True, editor: Any = None):
        self.model, self.tokenizer, self.s, self.cases, self.dir = model, tokenizer, settings, cases, run_dir
        self.editor = editor        # the trained editor every add_edit gets (methods that use one)
        self.scorer = CaseScorer(model, tokenizer, settings.protocols)
        self.scorer.prefix = _prefix_states(model, settings)
        self.progress = progress
        self.device = next(model.parameters()).device

    def run(self) -> None:
        getattr(self, f"_run_{self.s.mode}")()

    # -- helpers -----------------------------------------------------------------------------------
    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, disable=not self.progress, dynamic_ncols=True)

    def _edit(self, cases: Sequence[EvalCase], name: str, append: bool = False):
        requests = [r for c in cases for r in c.requests]
        start = time.perf_counter()
        try:
            extra = {"editor": self.editor} if self.editor is not None else {}
            adapter = self.model.add_edit(self.s.method, requests, name=name, config=self.s.config, append=append,
                                          **extra)
        except EditError as e:
            logger.warning("edit of case(s) %s failed: %s", [c.case_id for c in cases], e)
            return None, time.perf_counter() - start, str(e)
        return adapter, time.perf_counter() - start, None

    def _scored(self, cases: Sequence[EvalCase], baselines: Sequence[dict]) -> list[dict]:
        scores = self.scorer.score(cases, baselines)
        if self.scorer.fluency:
            for sc, flu in zip(scores, self.scorer.fluency_scores(cases)):
                if flu is not None:
                    sc["fluency"] = {"ngram_entropy": flu}
        return scores

    def _line(self, case: EvalCase, scores: dict | None, **extra) -> dict[str, Any]:
        peak = peak_memory_mb(self.device)
        memory = {"peak_memory_mb": round(peak, 1)} if peak is not None else {}     # unknown: left out
        return {"case_id": case.case_id, "method": self.s.method, "mode": self.s.mode, "scores": scores,
                **memory, **extra}

    def _running(self, bar, lines: list[dict]) -> None:
        vals = [ln["scores"]["reliability"].get("token_em") for ln in lines if ln.get("scores")]
        vals = [v for v in vals if v is not None]
        if vals:
            bar.set_postfix(rel_token_em=f"{sum(vals) / len(vals):.3f}")

    # -- modes -------------------------------------------------------------------------------------
    def _run_single(self) -> None:
        self._run_groups(1)

    def _run_batch(self) -> None:
        self._run_groups(self.s.step)

    def _run_groups(self, size: int) -> None:
        written = self.dir.lines()
        done = {ln["case_id"] for ln in written}
        groups = [self.cases[i:i + size] for i in range(0, len(self.cases), size)]
        todo = [g for g in groups if not all(c.case_id in done for c in g)]
        bar = self._bar(len(self.cases), len(self.cases) - sum(len(g) for g in todo), f"{self.s.method} {self.s.mode}")
        name = f"eval-{self.s.method}"
        for gi, group in enumerate(todo):
            baselines = self.scorer.baseline(group)
            adapter, seconds, error = self._edit(group, name)
            if adapter is None:
                lines = [self._line(c, None, error=error, edit_seconds=seconds / len(group)) for c in group]
            else:
                try:
                    scores = self._scored(group, baselines)
                finally:
                    self.model.remove_edit(name)
                    if self.scorer.prefix is not None:     # each group's probes are scored once
                        self.scorer.prefix.clear()
                lines = [self._line(c, sc, edit_seconds=seconds / len(group), adapter_bytes=adapter.num_bytes(),
                                    group_size=len(group)) for c, sc in zip(group, scores)]
            self.dir.append(lines)
            written.extend(lines)
            bar.update(len(group))
            self._running(bar, written)
        bar.close()

    def _run_sequential(self) -> None:
        state_dir = self.dir.path / "state"
        progress_file = state_dir / "progress.json"
        checkpoints = sorted({k for k in self.s.checkpoints if k <= len(self.cases)} | {len(self.cases)})
        done_ckpts = {ln["checkpoint"] for ln in self.dir.lines() if ln.get("checkpoint_complete")}
        applied, names = 0, []
        from ..registry import get_method
        extendable = get_method(self.s.method).supports_extend()
        baselines = _LazyBaselines(self.model, self.scorer, self.cases)
        try:
            if progress_file.is_file():
                prog = json.loads(progress_file.read_text())
                applied, names = prog["applied"], prog["names"]
                for nm in names:
                    self.model.load_edit(state_dir / nm, name=nm)
            edit_seconds: list[float] = []
            bar = self._bar(len(self.cases), applied, f"{self.s.method} sequential")
            for start in range(applied, len(self.cases), self.s.step):
                group = self.cases[start:start + self.s.step]
                n_done = start + len(group)
                name = "eval-seq" if extendable else f"eval-seq-{start}"
                append = extendable and name in self.model.edits
                adapter, seconds, error = self._edit(group, name, append=append)
                edit_seconds.extend([seconds / len(group)] * len(group))
                if adapter is not None and name not in names:
                    names.append(name)
                if error is not None:
                    self.dir.append([self._line(c, None, error=error, failed_at=n_done, edit_seconds=seconds / len(group))
                                     for c in group])
                bar.update(len(group))
                reached = any(start < c <= n_done for c in checkpoints)
                if reached and n_done not in done_ckpts:
                    self._checkpoint(n_done, baselines, edit_seconds, names)
                    edit_seconds = []
                    self._save_state(state_dir, progress_file, n_done, names)
                    self._running(bar, [ln for ln in self.dir.lines() if ln.get("checkpoint") == n_done])
            bar.close()
        finally:
            for nm in names:
                if nm in self.model.edits:
                    self.model.remove_edit(nm)

    def _checkpoint(self, n_done: int, baselines: "_LazyBaselines", edit_seconds: list[float],
                    names: list[str]) -> None:
        shard, shards = self.s.shard
        # every shard applies the whole stream; each scores its share of the checkpoint's cases
        picked = checkpoint_sample(n_done, len(self.cases), self.s.sample)[shard::shards]
        lines = []
        size = sum(self.model.edits[nm].num_bytes() for nm in names if nm in self.model.edits)
        bar = self._bar(len(picked), 0, f"scoring after {n_done} edits")
        for i in range(0, len(picked), 16):
            part = picked[i:i + 16]
            cases = [self.cases[j] for j in part]
            for c, sc in zip(cases, self._scored(cases, baselines.get(part))):
                lines.append(self._line(c, sc, checkpoint=n_done, adapter_bytes=size))
            bar.update(len(part))
        bar.close()
        if not lines:                        # a shard with no case to score at this checkpoint
            lines.append({"case_id": f"<checkpoint {n_done}>", "checkpoint": n_done, "scores": None})
        if shard == 0:                       # the stream's edit time is counted once over the shards
            lines[-1]["edit_seconds_since_last_checkpoint"] = edit_seconds
        if self.scorer.prefix is not None:   # harness memory inside the peak: the probes' kept states
            lines[-1]["kept_states_mb"] = round(self.scorer.prefix.nbytes() / 2**20, 1)
        lines[-1]["checkpoint_complete"] = True
        self.dir.append(lines)

    def _save_state(self, state_dir: Path, progress_file: Path, applied: int, names: list[str]) -> None:
        with atomic_dir(state_dir) as tmp:     # the previous checkpoint stays until this one is complete
            for nm in names:
                self.model.edits[nm].save_pretrained(tmp / nm)
            _write_json(tmp / "progress.json", {"applied": applied, "names": names})


def _prefix_states(model, settings: RunSettings) -> PrefixStates | None:
    """Kept unedited states for scoring from the first block the method edits (None: whole model)."""
    from ..registry import get_method
    method = get_method(settings.method)
    try:
        targets = method.targets(model, method.resolve_config(model, settings.config))
    except EditError:          # an invalid config: every edit fails, nothing is scored
        return None
    layer = prefix_layer(model, targets)
    return PrefixStates(layer) if layer is not None else None


def checkpoint_sample(n_done: int, n_total: int, sample: int | None) -> list[int]:
    """Indices of the edits scored at checkpoint ``n_done``: all of them at the last checkpoint or
    without ``sample``, else ``sample`` drawn without replacement, seeded by ``n_done`` (a resumed run
    scores the same ones), so a checkpoint's scoring cost does not grow with the stream.

        >>> checkpoint_sample(1000, 10_000, 200) == checkpoint_sample(1000, 10_000, 200)
        True
        >>> len(checkpoint_sample(1000, 10_000, 200)), checkpoint_sample(10_000, 10_000, 200)[-1]
        (200, 9999)
    """
    if sample is None or n_done >= n_total or sample >= n_done:
        return list(range(n_done))
    return sorted(random.Random(n_done).sample(range(n_done), sample))


class _LazyBaselines:
    """The unedited model's locality baselines of each case, computed when a checkpoint first needs
    them (with every edit switched off: exactly the base model) and kept.

    They are computed in fixed chunks of the case list (cases 0-15, 16-31, ...) whichever case asks:
    a batch's padding changes float32 results in the last bits, so fixed chunks make a resumed or a
    sampled run score exactly as an uninterrupted, unsampled one. The same passes keep the states the
    scored passes replay from the first edited block (:mod:`editpeft.evaluation.prefix`), so those
    too are computed in the same chunks whichever checkpoint first needs them.
    """

    def __init__(self, model, scorer: CaseScorer, cases: Sequence[EvalCase], chunk: int = 16):
        self.model, self.scorer, self.cases, self.chunk = model, scorer, cases, chunk
        self.known: dict[int, dict] = {}

    def get(self, indices: Sequence[int]) -> list[dict]:
        starts = sorted({i - i % self.chunk for i in indices if i not in self.known})
        if starts:
            with self.model.disabled_edits():
                for start in starts:
                    part = range(start, min(start + self.chunk, len(self.cases)))
                    for i, b in zip(part, self.scorer.baseline([self.cases[i] for i in part])):
                        self.known[i] = b
        return [self.known[i] for i in indices]


def _select(model, tokenizer, cases: list[EvalCase], n: int | None, known_only: bool,
            shard: tuple[int, int], mode: str = "single") -> tuple[list[EvalCase], int]:
    """Keep known cases (when asked) until ``n`` are kept, then take shard ``i`` of ``k`` (every
    k-th case), so the shards of a run partition exactly the cases of the unsharded run; in
    sequential mode every shard keeps the whole stream (the scoring is what is sharded).
    Returns (cases, number of records examined)."""
    i, k = shard if mode != "sequential" else (0, 1)
    if not known_only:
        kept = cases[:n] if n is not None else cases
        return kept[i::k], len(kept)
    kept, examined = [], 0
    for start in range(0, len(cases), 64):
        part = cases[start:start + 64]
        for c, ok in zip(part, known_mask(model, tokenizer, part)):
            examined += 1
            if ok:
                kept.append(c)
            if n is not None and len(kept) >= n:
                return kept[i::k], examined
    return kept[i::k], examined


def evaluate(model, tokenizer, methods: str | Sequence[str], data: str | Path | Sequence[EvalCase], *,
             out: str | Path | None = None, mode: str = "single", n: int | None = None, format: str | None = None,
             config: Any = None, batch_size: int | None = None, checkpoints: Sequence[int] = DEFAULT_CHECKPOINTS,
             protocols: Sequence[str] = PROTOCOLS, known_only: bool = False, shard: tuple[int, int] = (0, 1),
             overwrite: bool = False, progress: bool = True, editors: Mapping[str, Any] | None = None,
             sample: int | None = None) -> dict[str, Any]:
    """Evaluate one or several methods on identical cases; returns ``{method: summary}``.

    ``sample`` (sequential mode): every checkpoint but the last scores this many of the edits so far
    (drawn with a fixed seed per checkpoint) instead of all, so long streams score at a constant cost.

    ``editors`` maps a method that edits with a trained editor to its editor (an Editor, a folder or
    a Hub repo id, loaded once for the whole run).

    ``data`` is a dataset file (format detected, or named by ``format``) or a list of
    :class:`EvalCase`. ``config`` is one config for every method, or ``{method: config}``.
    Results go to ``out/<method>/`` (a temporary folder when ``out`` is None).
    """
    import tempfile

    import editpeft
    from ..registry import get_method
    model = editpeft.enable_editing(model, tokenizer)
    methods = [methods] if isinstance(methods, str) else list(methods)
    RunSettings(method="", mode=mode, batch_size=batch_size, shard=list(shard), sample=sample)   # bad settings fail first
    for m in methods:
        get_method(m)   # unknown or broken methods fail before any work
    if isinstance(data, (str, Path)):
        dataset = load_dataset(data, format)
        cases, fmt, data_name, skipped = dataset.cases, dataset.format, str(data), len(dataset.skipped)
    else:
        given = list(data) if isinstance(data, Iterable) and not isinstance(data, (bytes, Mapping)) else None
        if given is None or not all(isinstance(c, EvalCase) for c in given):
            raise DatasetFormatError("data must be a dataset file path, or a list of EvalCase (load records with "
                                     "editpeft.evaluation.load_dataset)")
        cases, fmt, data_name, skipped = given, format or "cases", "<cases>", 0
    cases, examined = _select(model, tokenizer, cases, n, known_only, tuple(shard), mode)
    if not cases:
        raise EditError("no case to evaluate" + (" (none is known to the model; drop --known-only)" if known_only else ""))
    root = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="editpeft-eval-"))
    results = {}
    per_method = isinstance(config, dict) and bool(config) and set(config) <= set(methods)
    for method in methods:
        cfg = config.get(method) if per_method else config
        editor = (editors or {}).get(method)
        if editor is not None and not hasattr(editor, "tensors"):
            from ..editors import load_editor
            editor = load_editor(editor)
        # the editor is part of what defines a run: another editor must not resume this one's cases
        settings = RunSettings(method=method, mode=mode, config=cfg, data=data_name, format=fmt, n=n,
                               known_only=known_only, batch_size=batch_size, checkpoints=list(checkpoints),
                               protocols=list(protocols), shard=list(shard),
                               model=str(getattr(model.config, "_name_or_path", "")), sample=sample,
                               editor=editor.provenance() if editor is not None else None)
        try:
            hparams = get_method(method).resolve_config(model, cfg).to_dict()
        except EditError:     # an invalid config: every edit fails and is recorded as failed
            hparams = None
        run_dir = _RunDir(root / method, asdict(settings), [c.case_id for c in cases], overwrite, hparams)
        Runner(model, tokenizer, settings, cases, run_dir, progress, editor=editor).run()
        summary = summarize(run_dir.lines(), settings=asdict(settings),
                            counts={"examined": examined, "kept": len(cases), "skipped_records": skipped})
        _write_json(run_dir.path / "summary.json", summary)
        results[method] = summary
    write_report([root / m for m in methods], root)
    return results
