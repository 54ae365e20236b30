"""Hostile-file fuzzing of adapter folders: mutate a valid folder every way an attacker or a
careless user could, load each mutant, and check that editpeft either refuses it with an
:class:`~editpeft.errors.EditError` (model untouched) or accepts it *by design* (documented,
and then the adapter computes exactly what the original did).

Plugin authors can run it on their own adapter kind (its tensors must be validated on load).

Example:
    >>> report = fuzz_adapter(model, "edits/eiffel", probes=["The Eiffel Tower is in"])  # doctest: +SKIP
    >>> report.counts()                                                               # doctest: +SKIP
    {'refused': 412, 'accepted-by-design': 57}
    >>> report.failures                                                               # doctest: +SKIP
    []
"""
from __future__ import annotations

import copy
import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .errors import EditError
from .io import CONFIG_NAME, README_NAME, WEIGHTS_NAME

#: JSON values of every type, used to replace a field's value.
WRONG_VALUES: tuple[Any, ...] = (None, "", "x", "\x1b]0;pwned\x07", 0, -1, 1.5, True, [], [1], {}, {"a": 1}, "NaN")

#: Config fields whose *valid* replacement values are accepted by design: names, free text and
#: records of how an edit was made (hparams the method's Config accepts, the edited facts,
#: measured metrics). They do not change what the adapter computes: the tensors do, and the hash,
#: the schema and the kind's own checks guard those. Shell-style patterns over dotted paths.
ACCEPTED_PATHS: tuple[str, ...] = (
    "name", "metrics", "metrics.*", "editor", "editor.*", "editpeft_version", "plugin.version",
    "base_model.name_or_path", "base_model.license", "hparams", "hparams.*", "requests", "requests.*",
    "extra",   # deleted, null or {} where the kind keeps nothing there (any other change is refused)
)

#: Config fields that are an adapter's *content* like its tensors (a side model's transformers
#: config): a value its own validator accepts is accepted, and must give finite outputs.
CONTENT_PATHS: tuple[str, ...] = ("extra.*.config.*",)

#: The values tried on content fields (a side model's config has dozens of fields, each mutant
#: builds a model: one value of each JSON type keeps the run short).
CONTENT_VALUES: tuple[Any, ...] = (None, "x", -1, 1.5, [1])

#: Mutations of the tensors file accepted by design: another floating dtype (adapters keep the
#: dtype they were saved in and cast when applied).
ACCEPTED_TENSOR_MUTATIONS = ("as float16", "as bfloat16", "as float64")


@dataclass
class Mutation:
    """One hostile change of an adapter folder."""

    name: str
    apply: Callable[[Path], None]
    accept_path: str | None = None   # the config path it changes (for the accepted-by-design rule)
    category: str = "config"         # config | tensors | files | card


@dataclass
class Outcome:
    mutation: str
    category: str
    result: str          # "refused" | "accepted-by-design" | "FAILED"
    detail: str
    seconds: float
    peak_bytes: int


@dataclass
class FuzzReport:
    outcomes: list[Outcome] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return dict(Counter(o.result for o in self.outcomes))

    @property
    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.result == "FAILED"]

    def slowest(self) -> Outcome | None:
        return max(self.outcomes, key=lambda o: o.seconds, default=None)


# -- the mutations -------------------------------------------------------------------------------
def _read_config(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CONFIG_NAME).read_text())


def _write_config(folder: Path, config: Any) -> None:
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _paths(value: Any, prefix: str = "") -> Iterator[tuple[str, tuple]]:
    """(dotted path, key tuple) of every field in ``value``, depth first (lists: the first item)."""
    if isinstance(value, dict):
        for k, v in value.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            yield path, (k,)
            for sub, keys in _paths(v, path):
                yield sub, (k, *keys)
    elif isinstance(value, list) and value:
        path = f"{prefix}.0"
        yield path, (0,)
        for sub, keys in _paths(value[0], path):
            yield sub, (0, *keys)


def _set(config: Any, keys: tuple, value: Any, delete: bool = False) -> None:
    for k in keys[:-1]:
        config = config[k]
    if delete:
        del config[keys[-1]]
    else:
        config[keys[-1]] = value


def config_mutations(config: dict[str, Any]) -> Iterator[Mutation]:
    """Every field deleted, and set to each of :data:`WRONG_VALUES`; the whole config replaced by
    other JSON values; the format changed."""
    for path, keys in list(_paths(config)):
        original = config
        for k in keys:
            original = original[k]

        def delete(folder: Path, keys=keys) -> None:
            c = _read_config(folder)
            _set(c, keys, None, delete=True)
            _write_config(folder, c)
        yield Mutation(f"delete {path}", delete, path)
        content = any(fnmatch.fnmatchcase(path, p) for p in CONTENT_PATHS)
        for value in CONTENT_VALUES if content else WRONG_VALUES:
            if json.dumps(value) == json.dumps(original):
                continue   # not a change
            def replace(folder: Path, keys=keys, value=value) -> None:
                c = _read_config(folder)
                _set(c, keys, copy.deepcopy(value))
                _write_config(folder, c)
            yield Mutation(f"{path} = {json.dumps(value)}", replace, path)
    for value in ([], "x", 1, None, [config]):
        yield Mutation(f"config is {json.dumps(value)[:20]}", lambda f, v=value: _write_config(f, v))
    for fmt in ("editpeft/2", "editpeft/0", "peft/1"):
        yield Mutation(f"format {fmt}", lambda f, fmt=fmt: _write_config(f, {**_read_config(f), "format": fmt}))
    yield Mutation("config not JSON", lambda f: (f / CONFIG_NAME).write_bytes(b"{\"format\": "))
    yield Mutation("config nested 100k deep", lambda f: (f / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000))
    yield Mutation("config not UTF-8", lambda f: (f / CONFIG_NAME).write_bytes(b"\xff\xfe{}"))
    yield Mutation("unknown top-level field", lambda f: _write_config(f, {**_read_config(f), "layr": 3}))


def _rewrite_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                     rehash: bool = True) -> None:
    """Replace the tensors by ``change(tensors)``; with ``rehash`` the config's hash is updated
    too (an attacker who edits both files), so the hash check alone cannot catch it."""
    tensors = load_bytes((folder / WEIGHTS_NAME).read_bytes())
    blob = save_bytes({k: v.contiguous().clone() for k, v in change(dict(tensors)).items()})
    (folder / WEIGHTS_NAME).write_bytes(blob)
    if rehash:
        c = _read_config(folder)
        c["tensors_sha256"] = hashlib.sha256(blob).hexdigest()
        _write_config(folder, c)


def _with(tensors: dict[str, torch.Tensor], key: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    out = dict(tensors)
    if value is None:
        del out[key]
    else:
        out[key] = value
    return out


def _fill(t: torch.Tensor, value: float) -> torch.Tensor:
    if not t.is_floating_point() or t.numel() == 0:
        return t.float().flatten().new_full((max(t.numel(), 1),), value)
    out = t.clone()
    out.view(-1)[0] = value
    return out


def tensor_mutations(tensors: dict[str, torch.Tensor]) -> Iterator[Mutation]:
    """For each tensor: removed, truncated, grown, reshaped to 1-D and 3-D, recast (float16,
    bfloat16, float64, int8, bool, int64), filled with NaN and inf, made negative where no valid
    adapter holds a negative value; an extra tensor added; the file
    truncated, emptied, replaced by garbage; the tensors changed without updating the hash."""
    changes: dict[str, Callable[[torch.Tensor], torch.Tensor | None]] = {
        "removed": lambda t: None,
        "truncated": lambda t: t[:-1] if t.ndim and t.shape[0] else t.reshape(-1)[:0],
        "grown": lambda t: torch.cat([t, t[:1]]) if t.ndim and t.shape[0] else t.reshape(-1).repeat(2),
        "flattened": lambda t: t.reshape(-1),
        "made 3-D": lambda t: t.reshape(1, *t.shape) if t.ndim >= 2 else t.reshape(1, 1, -1),
        "transposed": lambda t: t.T.contiguous() if t.ndim == 2 and t.shape[0] != t.shape[1] else t.reshape(1, -1),
        "as float16": lambda t: t.half() if t.is_floating_point() else t,
        "as bfloat16": lambda t: t.bfloat16() if t.is_floating_point() else t,
        "as float64": lambda t: t.double() if t.is_floating_point() else t,
        "as int8": lambda t: t.to(torch.int8),
        "as bool": lambda t: t != 0,
        "as int64": lambda t: t.long(),
        "NaN": lambda t: _fill(t, math.nan),
        "inf": lambda t: _fill(t, math.inf),
        "-inf": lambda t: _fill(t, -math.inf),
    }
    # Values an attacker re-hashes are outside what a hash can catch (a malicious author can make any
    # adapter); only values that no valid adapter holds are checked: negative radii and label ids.
    negative_only = lambda key, t: not t.is_floating_point() or key.endswith("radii")  # noqa: E731
    for key, tensor in tensors.items():
        for label, change in {**changes, "negative": lambda t: -t.abs() - 1}.items():
            if label == "negative" and not negative_only(key, tensor):
                continue
            changed = change(tensor)
            if changed is not None and changed.dtype == tensor.dtype and changed.shape == tensor.shape \
                    and torch.equal(changed, tensor):
                continue   # not a mutation of this tensor (e.g. int64 labels "as int64")
            yield Mutation(f"tensor {key} {label}",
                           lambda f, key=key, change=change: _rewrite_tensors(f, lambda ts: _with(ts, key, change(ts[key]))),
                           accept_path=f"tensor:{label}")
        if not bool(tensor.any()):
            continue   # all zeros (MELO's block ids with one block, unused biases): x50 writes the same bytes
        yield Mutation(f"tensor {key} scaled x50 (hash not updated)",
                       lambda f, key=key: _rewrite_tensors(f, lambda ts: _with(ts, key, ts[key] * 50), rehash=False))
    first = next(iter(tensors))
    yield Mutation("extra tensor", lambda f: _rewrite_tensors(f, lambda ts: {**ts, "model.extra.up": ts[first].clone()}))
    yield Mutation("extra tensor (same module prefix)",
                   lambda f: _rewrite_tensors(f, lambda ts: {**ts, f"{first}.extra": ts[first].clone()}))
    yield Mutation("no tensors", lambda f: _rewrite_tensors(f, lambda ts: {}))
    yield Mutation("tensors file truncated", lambda f: _truncate(f / WEIGHTS_NAME, rehash=True))
    yield Mutation("tensors file empty", lambda f: _replace_bytes(f, b""))
    yield Mutation("tensors file garbage", lambda f: _replace_bytes(f, os.urandom(256)))
    yield Mutation("tensors header claims 1 PB", lambda f: _replace_bytes(f, (2**50).to_bytes(8, "little") + b"{}"))


def _truncate(path: Path, rehash: bool) -> None:
    data = path.read_bytes()
    _replace_bytes(path.parent, data[: len(data) // 2], rehash=rehash)


def _replace_bytes(folder: Path, data: bytes, rehash: bool = True) -> None:
    (folder / WEIGHTS_NAME).write_bytes(data)
    if rehash:
        c = _read_config(folder)
        c["tensors_sha256"] = hashlib.sha256(data).hexdigest()
        _write_config(folder, c)


def file_mutations(outside: Path) -> Iterator[Mutation]:
    """Each file deleted, replaced by a directory, or by a link to a copy outside the folder
    (``outside``: a folder the fuzzer owns); the folder itself a file; a README that is huge."""
    for name in (CONFIG_NAME, WEIGHTS_NAME, README_NAME):
        yield Mutation(f"{name} deleted", lambda f, n=name: (f / n).unlink(), accept_path=None if name != README_NAME
                       else "file:README deleted")
        yield Mutation(f"{name} is a directory", lambda f, n=name: _to_dir(f / n))

        def link_out(f: Path, n: str = name) -> None:
            copy_ = outside / f"{n}.{len(list(outside.iterdir()))}"
            shutil.copyfile(f / n, copy_)
            (f / n).unlink()
            (f / n).symlink_to(copy_)
        yield Mutation(f"{name} links outside the folder", link_out)

        def link_in(f: Path, n: str = name) -> None:
            (f / n).rename(f / f".{n}.real")
            (f / n).symlink_to(f".{n}.real")
        yield Mutation(f"{name} links inside the folder", link_in, accept_path="file:link inside")
    yield Mutation("README 5 MB", lambda f: (f / README_NAME).write_text("---\ntags: []\n---\n" + "x" * 5_000_000))


def _to_dir(path: Path) -> None:
    path.unlink()
    path.mkdir()


def card_mutations() -> Iterator[Mutation]:
    """Model cards with hostile or contradicting YAML front matter."""
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [" + ", ".join([f"*{chr(97 + i)}"] * 9) + "]\n" for i in range(8))
    fronts = {
        "alias bomb": bomb,
        "one alias": "base: &b x\nbase_model: *b\n",
        "not a mapping": "- a\n- b\n",
        "invalid YAML": "tags: [a\n",
        "python tag": "tags: !!python/object/apply:os.system ['echo pwned']\n",
        "100k elements": "tags: [" + ", ".join(["t"] * 100_000) + "]\n",
        "tags not a list": "tags: 5\n",
        "another library": "library_name: peft\n",
        "another base model": "base_model: someone/else\n",
        "method not tagged": "tags: [editpeft, other]\n",
    }
    for label, front in fronts.items():
        yield Mutation(f"card {label}", lambda f, front=front: (f / README_NAME).write_text(f"---\n{front}---\n# card\n"))
    yield Mutation("card front matter not closed", lambda f: (f / README_NAME).write_text("---\ntags: [x]\n"))


def all_mutations(folder: Path, outside: Path) -> list[Mutation]:
    """Every mutation of the adapter folder ``folder`` (see the generators above)."""
    config = _read_config(folder)
    tensors = load_bytes((folder / WEIGHTS_NAME).read_bytes())
    groups = {"config": config_mutations(config), "tensors": tensor_mutations(tensors),
              "files": file_mutations(outside), "card": card_mutations()}
    out = []
    for category, mutations in groups.items():
        for m in mutations:
            m.category = category
            out.append(m)
    return out


# -- running them --------------------------------------------------------------------------------
def _is_content(mutation: Mutation) -> bool:
    return any(fnmatch.fnmatchcase(mutation.accept_path or "", p) for p in CONTENT_PATHS)


def _accepted_by_design(mutation: Mutation) -> bool:
    path = mutation.accept_path
    if path is None:
        return False
    if _is_content(mutation):
        return True
    if path.startswith("tensor:"):
        return path[len("tensor:"):] in ACCEPTED_TENSOR_MUTATIONS
    if path.startswith("file:"):
        return True
    return any(fnmatch.fnmatchcase(path, pattern) for pattern in ACCEPTED_PATHS)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, snapshot: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == snapshot.keys() and all(torch.equal(now[k], v) for k, v in snapshot.items())


def _listing(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")} if root.exists() else {}


def fuzz_adapter(model, folder: str | os.PathLike, probes: Sequence[str], *,
                 watch: Sequence[str | os.PathLike] = (), time_limit_s: float = 20.0,
                 memory_limit_bytes: int = 256 * 2**20) -> FuzzReport:
    """Load every mutant of the adapter ``folder`` onto editable ``model`` and classify it.

    A mutant passes when ``load_edit`` raises an EditError subclass with the model's state dict
    bit-identical and no edit attached, or when it is accepted by design and the loaded adapter's
    logits on ``probes`` equal the original's (float recasts: within the recast's rounding, bounded
    relative to the logits' scale). In every case no file under ``watch`` (nor the fuzzer's own
    outside folder) changes, and the load takes less than ``time_limit_s`` and allocates less than
    ``memory_limit_bytes`` of Python memory (tracemalloc peak).
    """
    from .testing import logits_of
    folder = Path(folder)
    tokenizer = model.edit_state.tokenizer
    reference = model.load_edit(folder, name="__fuzz_reference__")
    expected = logits_of(model, tokenizer, probes)
    model.remove_edit("__fuzz_reference__")
    del reference
    snapshot = _state(model)
    report = FuzzReport()
    with tempfile.TemporaryDirectory(prefix="editpeft-fuzz-") as tmp:
        outside = Path(tmp) / "outside"
        outside.mkdir()
        for mutation in all_mutations(folder, outside):
            mutant = Path(tmp) / "mutant"
            shutil.rmtree(mutant, ignore_errors=True)
            shutil.copytree(folder, mutant)
            mutation.apply(mutant)
            watched = {str(w): _listing(Path(w)) for w in (*watch, outside)}
            report.outcomes.append(_try_load(model, mutant, mutation, probes, expected, snapshot, watched,
                                             time_limit_s, memory_limit_bytes))
    return report


def _try_load(model, mutant: Path, mutation: Mutation, probes, expected, snapshot, watched,
              time_limit_s: float, memory_limit_bytes: int) -> Outcome:
    from .testing import logits_of
    tracemalloc.start()
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        model.load_edit(mutant, name="__fuzz__")
    except BaseException as e:   # noqa: BLE001 (classified below; KeyboardInterrupt re-raised)
        if isinstance(e, KeyboardInterrupt):
            raise
        error = e
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    problems = []
    if seconds > time_limit_s:
        problems.append(f"took {seconds:.1f}s")
    if peak > memory_limit_bytes:
        problems.append(f"allocated {peak / 2**20:.0f} MiB")
    for root, before in watched.items():
        if _listing(Path(root)) != before:
            problems.append(f"changed files under {root}")
    if error is not None:
        result, detail = "refused", f"{type(error).__name__}: {str(error)[:160]}"
        if not isinstance(error, EditError):
            problems.append(f"raised {type(error).__name__}, not an EditError")
        if "__fuzz__" in model.edits:
            problems.append("an edit stayed attached")
        if not _same_state(model, snapshot):
            problems.append("the model's weights changed")
    else:
        result, detail = "accepted-by-design", "loaded"
        if not _accepted_by_design(mutation):
            problems.append("loaded, but this mutation must be refused")
        else:
            got = logits_of(model, model.edit_state.tokenizer, probes)
            recast = (mutation.accept_path or "").startswith("tensor:as")
            # float32 logits: equal for a record-only change; a float16/bfloat16 recast of the tensors
            # rounds them by 2^-8 relative, which moves logits by at most that share of their scale.
            tol = 2.0 ** -6 * float(expected.abs().max()) if recast else 0.0
            if _is_content(mutation):
                if not bool(torch.isfinite(got).all()):
                    problems.append("loaded, and its outputs are not finite")
            elif not torch.allclose(got, expected, rtol=0, atol=tol):
                problems.append("loaded, and it computes something else than the original adapter")
        model.remove_edit("__fuzz__")
        if not _same_state(model, snapshot):
            problems.append("removing it did not restore the weights")
    if problems:
        return Outcome(mutation.name, mutation.category, "FAILED", "; ".join(problems) + f" [{detail}]", seconds, peak)
    return Outcome(mutation.name, mutation.category, result, detail, seconds, peak)
