"""``EditRequest``: one fact to edit.

Example:
    >>> from editpeft import EditRequest
    >>> r = EditRequest(prompt="{} is located in the city of", subject="The Eiffel Tower",
    ...                 target_new="Rome")
    >>> r.prompt
    'The Eiffel Tower is located in the city of'
    >>> r.subject_span
    (0, 16)
"""
from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

from .errors import InvalidRequestError

logger = logging.getLogger(__name__)

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class EditRequest:
    """A fact to write into a model: ``prompt`` should be continued by ``target_new``.

    ``prompt`` contains ``subject`` once as a whole word (or words), or a ``{}`` placeholder that
    is replaced by it (CounterFact style, and the way to say which occurrence is meant when the
    subject appears several times; ``subject_span=(start, end)`` says it too). ``paraphrases`` and ``locality`` are optional probes used by the
    evaluation harness: prompts that should and should not follow the edit. Each field is checked
    for its type and content; a mistake raises :class:`InvalidRequestError` saying what to change.
    """

    prompt: str
    target_new: str
    subject: str | None = None
    target_true: str | None = None
    paraphrases: tuple[str, ...] = ()
    locality: tuple[str, ...] = ()
    subject_span: tuple[int, int] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"{msg} (request: prompt={_short(self.prompt)}, subject={_short(self.subject)})")

        _check_text("prompt", self.prompt, bad, "give the text the model should continue")
        _check_text("target_new", self.target_new, bad, "give the text the edited model should produce")
        _check_text("target_true", self.target_true, bad, "give the current answer, or leave it None", optional=True)
        _check_text("subject", self.subject, bad, "give the entity the fact is about, or leave it None",
                    optional=True)
        paraphrases = _text_list("paraphrases", self.paraphrases, bad)
        locality = _text_list("locality", self.locality, bad)
        prompt, span = _place_subject(self.prompt, self.subject, self.subject_span, bad)
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "subject_span", span)
        object.__setattr__(self, "paraphrases", paraphrases)
        object.__setattr__(self, "locality", locality)
        if self.target_true is not None and self.target_true.strip() == self.target_new.strip():
            logger.warning("edit request %s: target_new equals target_true (%r); the edit changes nothing",
                           _short(prompt), self.target_new)

    @classmethod
    def at_first_occurrence(cls, prompt: str, subject: str, **fields: Any) -> "EditRequest":
        """A request about the first whole-word occurrence of ``subject`` in ``prompt`` (else its
        first occurrence at all): for datasets whose records do not say which occurrence is meant.
        The library's own constructor refuses such ambiguity; dataset loaders decide this way."""
        if isinstance(prompt, str) and isinstance(subject, str) and subject and PLACEHOLDER not in prompt:
            found = _word_occurrences(prompt, subject)
            start = found[0] if found else prompt.find(subject)
            if start >= 0:
                prompt = prompt[:start] + PLACEHOLDER + prompt[start + len(subject):]
        return cls(prompt=prompt, subject=subject, **fields)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the form stored in ``edit_config.json``); the subject's
        character span is kept, so an occurrence chosen with ``{}`` survives a round trip."""
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject,
                               "target_new": self.target_new}
        if self.target_true is not None:
            out["target_true"] = self.target_true
        if self.paraphrases:
            out["paraphrases"] = list(self.paraphrases)
        if self.locality:
            out["locality"] = list(self.locality)
        if self.subject_span is not None:
            out["subject_span"] = list(self.subject_span)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditRequest":
        """Build a request from a dict; unknown keys are an error naming the accepted ones. A
        ``subject_span`` [start, end] marks which occurrence of the subject is meant."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"an edit request must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"unknown request field(s) {sorted(map(str, unknown))}; accepted: {sorted(known)}")
        if "prompt" not in data or "target_new" not in data:
            raise InvalidRequestError(f"a request needs 'prompt' and 'target_new'; got {sorted(map(str, data))}")
        data = dict(data)
        span = data.pop("subject_span", None)
        if span is not None:
            data["prompt"] = _mark_span(data.get("prompt"), data.get("subject"), span)
        return cls(**data)


# -- checks ----------------------------------------------------------------------------------------
def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _visible(text: str) -> bool:
    """Whether ``text`` has a character that is neither whitespace nor an invisible format
    character (zero-width spaces and joiners, word joiner, byte-order mark, bidi controls)."""
    return any(not ch.isspace() and unicodedata.category(ch) != "Cf" for ch in text)


def _check_text(name: str, value: Any, bad, what: str, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        kind = "None" if value is None else type(value).__name__
        decode = "; decode bytes first (value.decode('utf-8'))" if isinstance(value, (bytes, bytearray)) else ""
        raise bad(f"{name} must be a string, got {kind}{decode}")
    if not _visible(value):
        shown = "empty" if not value else "only whitespace or invisible characters"
        raise bad(f"{name} is {shown}; {what}")


def _text_list(name: str, value: Any, bad) -> tuple[str, ...]:
    if isinstance(value, (str, bytes, bytearray)):
        raise bad(f"{name} must be a list of strings, not a single {type(value).__name__}; wrap it: "
                  f"{name}=[{_short(value)}]")
    if not isinstance(value, (list, tuple)):
        raise bad(f"{name} must be a list of strings, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise bad(f"{name}[{i}] must be a string, got {'None' if item is None else type(item).__name__}")
        if not _visible(item):
            raise bad(f"{name}[{i}] is empty; remove it or give the prompt")
    return tuple(value)


def _word_occurrences(prompt: str, subject: str) -> list[int]:
    """Start offsets of ``subject`` in ``prompt`` that are not inside a longer word."""
    before = r"(?<!\w)" if re.match(r"\w", subject[0]) else ""
    after = r"(?!\w)" if re.match(r"\w", subject[-1]) else ""
    return [m.start() for m in re.finditer(before + re.escape(subject) + after, prompt)]


def _place_subject(prompt: str, subject: str | None, span: Any, bad) -> tuple[str, tuple[int, int] | None]:
    """The final prompt and the subject's character span in it (``span``, when given, says which
    occurrence is meant, as ``dataclasses.replace`` of a request passes it back)."""
    if span is not None and subject is not None and PLACEHOLDER not in prompt:
        try:
            return _mark_span(prompt, subject, span).replace(PLACEHOLDER, subject, 1), (span[0], span[1])
        except InvalidRequestError as e:
            raise bad(str(e)) from None
    if subject is not None and PLACEHOLDER in subject:
        raise bad("the subject itself contains '{}'; the placeholder belongs in the prompt, the subject is "
                  "the entity's name")
    if PLACEHOLDER in prompt:
        if subject is None:
            raise bad("the prompt has a '{}' placeholder but no subject was given")
        if prompt.count(PLACEHOLDER) > 1:
            raise bad("the prompt has more than one '{}' placeholder; use exactly one")
        start = prompt.index(PLACEHOLDER)
        return prompt.replace(PLACEHOLDER, subject, 1), (start, start + len(subject))
    if subject is None:
        return prompt, None
    found = _word_occurrences(prompt, subject)
    if not found:
        inside = " (it occurs only inside a longer word)" if subject in prompt else ""
        raise bad(f"subject {_short(subject)} does not occur in the prompt as a word{inside}; put it in the "
                  "prompt literally or mark its place with '{}'")
    if len(found) > 1:
        raise bad(f"subject {_short(subject)} occurs {len(found)} times in the prompt; mark the one the fact is "
                  "about with '{}' (e.g. prompt='{} is larger than ...', subject=...)")
    return prompt, (found[0], found[0] + len(subject))


def _mark_span(prompt: Any, subject: Any, span: Any) -> Any:
    """``prompt`` with ``{}`` in place of ``span`` (a stored request's subject occurrence)."""
    ok = (isinstance(span, (list, tuple)) and len(span) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in span))
    if not ok or not isinstance(prompt, str) or not isinstance(subject, str) \
            or not 0 <= span[0] <= span[1] <= len(prompt) or prompt[span[0]:span[1]] != subject:
        raise InvalidRequestError(f"subject_span {_short(span)} does not mark the subject {_short(subject)} in the "
                                  f"prompt {_short(prompt)}; give [start, end] of the subject in the prompt")
    return prompt[:span[0]] + PLACEHOLDER + prompt[span[1]:]


def as_request_list(requests: EditRequest | Iterable[EditRequest]) -> list[EditRequest]:
    """Normalise one request or a sequence of requests; anything else is a clear error."""
    if isinstance(requests, EditRequest):
        return [requests]
    if isinstance(requests, (str, bytes, dict)) or not isinstance(requests, Iterable):
        raise InvalidRequestError(
            f"expected an EditRequest or a list of them, got {type(requests).__name__}; "
            "build one with EditRequest(prompt=..., subject=..., target_new=...)")
    out = list(requests)
    if not out:
        raise InvalidRequestError("the request list is empty; give at least one EditRequest")
    for i, r in enumerate(out):
        if not isinstance(r, EditRequest):
            raise InvalidRequestError(
                f"item {i} of the request list is a {type(r).__name__}, not an EditRequest; "
                "every item must be an EditRequest (use EditRequest.from_dict for dicts)")
    return out


def require_subjects(requests: Sequence[EditRequest], method: str) -> None:
    """Raise unless every request names its subject (locate-then-edit methods need it)."""
    for r in requests:
        if r.subject is None:
            raise InvalidRequestError(f"method {method!r} needs the subject of each fact; "
                                      f"request {r.prompt!r} has none: pass subject=...")
