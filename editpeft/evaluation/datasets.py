"""Loaders that turn the standard knowledge-editing datasets into :class:`EvalCase` objects.

Formats (detected from the records, or named with ``format=``):

=====================  ==========================================================================
``counterfact``        ROME's CounterFact (``requested_rewrite``, ``paraphrase_prompts``,
                       ``neighborhood_prompts``, ...) with the survey's extra columns
                       (``portability``, ``alternative_subject``, ``unrelated_relation``,
                       ``distracting_neighborhood_prompts``)
``counterfact_easyedit``  EasyEdit's flat CounterFact (``prompt, subject, target_new, ground_truth,
                       rephrase_prompt, locality_prompt, locality_ground_truth``)
``zsre``               MEND's zsRE (``src, alt, answers, rephrase, loc, loc_ans, subject``) with the
                       survey's ``portability``, ``alter_subject_question``, ``inverse question``
``knowedit``           KnowEdit (``prompt, target_new, ground_truth, portability{...}, locality{...}``;
                       answers may be strings, lists, or lists of alias lists)
``mquake``             MQuAKE multi-hop (``requested_rewrite[]``, ``questions``, ``new_answer``,
                       ``new_answer_alias``)
=====================  ==========================================================================

Example:
    >>> cases = load_cases("../shared/data/counterfact/counterfact_rome_format_1129.json", n=10)  # doctest: +SKIP
    >>> cases[0].requests[0].prompt                                                           # doctest: +SKIP
    'Laurent Cars was employed in'
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from ..errors import DatasetFormatError, InvalidRequestError
from ..request import EditRequest
from .cases import EvalCase, Probe

#: At most this many aliases of one answer are scored (KnowEdit lists up to a dozen).
MAX_ALIASES = 8

logger = logging.getLogger(__name__)


class InvalidRecord(DatasetFormatError):
    """A record of the right shape whose content cannot be used (an empty answer, a subject that
    is not in its prompt); skipped with its reason unless loading is strict."""


class _Record:
    """Field access on one raw record that fails with the record and the field named."""

    def __init__(self, raw: Any, index: int, fmt: str):
        if not isinstance(raw, Mapping):
            raise DatasetFormatError(f"{fmt} record {index}: expected a JSON object, got {type(raw).__name__}")
        self.raw, self.index, self.fmt = raw, index, fmt

    def error(self, field: str, what: str) -> DatasetFormatError:
        return DatasetFormatError(f"{self.fmt} record {self.index}: field {field!r} {what}")

    def get(self, path: str, default: Any = ..., kind: type | tuple[type, ...] | None = None) -> Any:
        value: Any = self.raw
        for key in path.split("."):
            if not isinstance(value, Mapping) or key not in value:
                if default is ...:
                    raise self.error(path, "is missing")
                return default
            value = value[key]
        if kind is not None and not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(path, f"should be {names}, got {type(value).__name__}")
        return value

    def text(self, path: str, default: Any = ...) -> str:
        value = self.get(path, default, kind=(str, type(None)) if default is None else str)
        if isinstance(value, str) and not value.strip():
            raise InvalidRecord(f"{self.fmt} record {self.index}: field {path!r} is empty")
        return value

    def texts(self, path: str) -> tuple[str, ...]:
        value = self.get(path, [], kind=list)
        if not all(isinstance(v, str) for v in value):
            raise self.error(path, "should be a list of strings")
        return tuple(value)

    def answers(self, path: str, value: Any = ...) -> tuple[str, ...]:
        """Accepted answers from a string, a list of strings, or a list of alias lists."""
        value = self.get(path) if value is ... else value
        flat = _flatten(value)
        if flat is None or not flat:
            raise self.error(path, "should be an answer string or a (nested) list of answer strings")
        return tuple(dict.fromkeys(flat))[:MAX_ALIASES]

    def request(self, prompt: str, target_new: str, subject: str | None, target_true: str | None) -> EditRequest:
        try:
            if subject is None:
                return EditRequest(prompt=prompt, target_new=target_new, target_true=target_true)
            # a record does not say which occurrence of its subject it means: the first whole word
            return EditRequest.at_first_occurrence(prompt, subject, target_new=target_new, target_true=target_true)
        except InvalidRequestError as e:
            raise InvalidRecord(f"{self.fmt} record {self.index}: {e}") from None

    def case_id(self, key: str = "case_id") -> str:
        return str(self.raw.get(key, self.index))


def _flatten(value: Any) -> list[str] | None:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        out: list[str] = []
        for v in value:
            f = _flatten(v)
            if f is None:
                return None
            out.extend(f)
        return out
    return None


def _snake(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# -- formats -----------------------------------------------------------------------------------

def _counterfact(rec: _Record) -> EvalCase:
    subject = rec.text("requested_rewrite.subject")
    new = rec.text("requested_rewrite.target_new.str")
    true = rec.text("requested_rewrite.target_true.str")
    request = rec.request(rec.text("requested_rewrite.prompt"), new, subject, true)
    locality = {"neighborhood": tuple(Probe(p, (true,), new) for p in rec.texts("neighborhood_prompts"))}
    if "distracting_neighborhood_prompts" in rec.raw:
        locality["distracting_neighborhood"] = tuple(
            Probe(p, (true,), new) for p in rec.texts("distracting_neighborhood_prompts"))
    if "unrelated_relation" in rec.raw:
        locality["other_attribution"] = (Probe(rec.text("unrelated_relation.question"),
                                               rec.answers("unrelated_relation.object")),)
    portability = {}
    if "portability" in rec.raw:
        portability["one_hop"] = (Probe(rec.text("portability.New Question"),
                                        rec.answers("portability.New Answer")),)
    if "alternative_subject" in rec.raw:
        alt = rec.text("alternative_subject")
        portability["subject_replace"] = (Probe(request.prompt.replace(subject, alt, 1), (new,), true),)
    return EvalCase(
        case_id=rec.case_id(), source="counterfact", requests=(request,),
        generalization=tuple(Probe(p, (new,), true) for p in rec.texts("paraphrase_prompts")),
        locality=locality, portability=portability, generation_prompts=rec.texts("generation_prompts"))


def _counterfact_easyedit(rec: _Record) -> EvalCase:
    new, true = rec.text("target_new"), rec.text("ground_truth")
    request = rec.request(rec.text("prompt"), new, rec.text("subject"), true)
    rephrase = rec.text("rephrase_prompt", None)
    loc = rec.text("locality_prompt", None)
    locality = {"neighborhood": (Probe(loc, rec.answers("locality_ground_truth"), new),)} if loc else {}
    return EvalCase(case_id=rec.case_id(), source="counterfact_easyedit", requests=(request,),
                    generalization=(Probe(rephrase, (new,), true),) if rephrase else (), locality=locality)


def _zsre(rec: _Record) -> EvalCase:
    new = rec.text("alt")
    answers = rec.answers("answers")
    subject = rec.text("subject")
    request = rec.request(rec.text("src"), new, subject, answers[0])
    rephrase = rec.text("rephrase", None)
    locality = {}
    if rec.raw.get("loc"):
        locality["nq"] = (Probe(rec.text("loc"), rec.answers("loc_ans"), new),)
    portability = {}
    if "portability" in rec.raw:
        portability["one_hop"] = (Probe(rec.text("portability.New Question"),
                                        rec.answers("portability.New Answer")),)
    if "alter_subject_question" in rec.raw:
        portability["subject_replace"] = (Probe(rec.text("alter_subject_question"), (new,), answers[0]),)
    if "inverse question" in rec.raw:
        portability["inverse_relation"] = (Probe(rec.text("inverse question"), (subject,)),)
    return EvalCase(case_id=rec.case_id(), source="zsre", requests=(request,),
                    generalization=(Probe(rephrase, (new,), answers[0]),) if rephrase else (),
                    locality=locality, portability=portability)


def _knowedit_probes(rec: _Record, key: str, contrast: str | None) -> dict[str, tuple[Probe, ...]]:
    groups = rec.get(key, {}, kind=Mapping)
    out = {}
    for kind, items in groups.items():
        if not isinstance(items, list):
            raise rec.error(f"{key}.{kind}", "should be a list of {prompt, ground_truth} objects")
        probes = []
        for j, item in enumerate(items):
            field = f"{key}.{kind}[{j}]"
            if not isinstance(item, Mapping) or not isinstance(item.get("prompt"), str):
                raise rec.error(field, "should be an object with a 'prompt' string")
            probes.append(Probe(item["prompt"], rec.answers(f"{field}.ground_truth", item.get("ground_truth")),
                                contrast))
        if probes:
            out[_snake(kind)] = tuple(probes)
    return out


def _knowedit(rec: _Record) -> EvalCase:
    new = rec.text("target_new")
    truth = rec.get("ground_truth", None)
    true = rec.answers("ground_truth", truth)[0] if truth not in (None, "", []) else None
    request = rec.request(rec.text("prompt"), new, rec.text("subject"), true)
    rephrase = rec.raw.get("rephrase_prompt") or rec.raw.get("rephrase")
    if rephrase is not None and not isinstance(rephrase, (str, list)):
        raise rec.error("rephrase_prompt", "should be a string or a list of strings")
    rephrases = [rephrase] if isinstance(rephrase, str) else list(rephrase or [])
    return EvalCase(case_id=rec.case_id(), source="knowedit", requests=(request,),
                    generalization=tuple(Probe(p, (new,), true) for p in rephrases),
                    locality=_knowedit_probes(rec, "locality", new),
                    portability=_knowedit_probes(rec, "portability", None))


def _mquake(rec: _Record) -> EvalCase:
    rewrites = rec.get("requested_rewrite", kind=list)
    if not rewrites:
        raise rec.error("requested_rewrite", "is empty")
    requests, generalization = [], []
    for j, _ in enumerate(rewrites):
        path = f"requested_rewrite.{j}"
        sub = _Record(rewrites[j], rec.index, rec.fmt)
        try:
            new, true = sub.text("target_new.str"), sub.text("target_true.str")
            requests.append(rec.request(sub.text("prompt"), new, sub.text("subject"), true))
            question = sub.text("question", None)
        except DatasetFormatError as e:
            raise type(e)(str(e).replace("field '", f"field '{path}.", 1)) from None
        if question:
            generalization.append(Probe(question, (new,), true))
    answers = rec.answers("new_answer", [rec.get("new_answer")] + list(rec.get("new_answer_alias", [], kind=list)))
    hops = tuple(Probe(q, answers) for q in rec.texts("questions"))
    if not hops:
        raise rec.error("questions", "is empty")
    return EvalCase(case_id=rec.case_id(), source="mquake", requests=tuple(requests),
                    generalization=tuple(generalization), portability={"multi_hop": hops})


FORMATS: dict[str, tuple[Callable[[_Record], EvalCase], tuple[str, ...]]] = {
    "counterfact": (_counterfact, ("requested_rewrite", "paraphrase_prompts", "neighborhood_prompts")),
    "mquake": (_mquake, ("requested_rewrite", "questions", "new_answer")),
    "counterfact_easyedit": (_counterfact_easyedit, ("prompt", "subject", "target_new", "ground_truth",
                                                     "rephrase_prompt", "locality_prompt")),
    "zsre": (_zsre, ("src", "alt", "answers", "subject")),
    "knowedit": (_knowedit, ("prompt", "subject", "target_new", "locality")),
}


def detect_format(records: Sequence[Any]) -> str:
    """The format whose required fields the first record has; an error lists every format's fields."""
    if not records:
        raise DatasetFormatError("the evaluation file holds no records")
    first = records[0]
    if not isinstance(first, Mapping):
        raise DatasetFormatError(f"record 0 is a {type(first).__name__}; evaluation files are lists of JSON objects")
    for name, (_, required) in FORMATS.items():
        if all(k in first for k in required):
            if name == "counterfact" and isinstance(first["requested_rewrite"], list):
                continue
            if name == "mquake" and not isinstance(first["requested_rewrite"], list):
                continue
            return name
    if {"text", "labels", "concept"} <= set(first):
        raise DatasetFormatError("this is KnowEdit's WikiBio (long-form text edits: text/labels/concept); the harness "
                                 "scores fact edits and does not read it")
    expected = "; ".join(f"{n}: {', '.join(req)}" for n, (_, req) in FORMATS.items())
    raise DatasetFormatError(f"record 0 matches no known format (its fields: {sorted(first)}); expected one of "
                             f"{expected}")


def read_records(path: str | Path) -> list[Any]:
    """Records of a ``.json`` list or a ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"evaluation file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path} is not valid JSON ({e})") from None
    if isinstance(data, Mapping) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DatasetFormatError(f"{path} holds a {type(data).__name__}; expected a list of records")
    return data


@dataclass
class Dataset:
    """Cases read from one source, its format, and the records skipped as unusable (id, reason)."""

    cases: list[EvalCase]
    format: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    source: str = ""


def load_dataset(source: str | Path | Iterable[Mapping[str, Any]], format: str | None = None,
                 n: int | None = None, strict: bool = False) -> Dataset:
    """Read a dataset file (or records) into evaluation cases, the first ``n`` records when given.

    A record missing a field of its format is an error naming the record and the field. A record
    of the right shape with unusable content (empty answer, subject absent from its prompt) is
    skipped and listed in ``Dataset.skipped``; with ``strict=True`` it is an error too.
    """
    records = read_records(source) if isinstance(source, (str, Path)) else list(source)
    fmt = format or detect_format(records)
    if fmt not in FORMATS:
        raise DatasetFormatError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    build = FORMATS[fmt][0]
    records = records[:n] if n is not None else records
    cases, skipped = [], []
    for i, raw in enumerate(records):
        rec = _Record(raw, i, fmt)
        try:
            cases.append(build(rec))
        except InvalidRecord as e:
            if strict:
                raise
            skipped.append((rec.case_id(), str(e)))
    if skipped:
        logger.warning("%d of %d %s records skipped as unusable (first: %s)", len(skipped), len(records), fmt,
                       skipped[0][1])
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise DatasetFormatError(f"{fmt}: case id {c.case_id!r} occurs twice; case ids must be unique")
        seen.add(c.case_id)
    name = str(source) if isinstance(source, (str, Path)) else "<records>"
    return Dataset(cases, fmt, skipped, name)


def load_cases(source: str | Path | Iterable[Mapping[str, Any]], format: str | None = None,
               n: int | None = None, strict: bool = False) -> list[EvalCase]:
    """The cases of :func:`load_dataset` (unusable records skipped unless ``strict``)."""
    return load_dataset(source, format, n, strict).cases
