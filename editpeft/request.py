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

from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Sequence

from .errors import InvalidRequestError

PLACEHOLDER = "{}"


@dataclass(frozen=True)
class EditRequest:
    """A fact to write into a model: ``prompt`` should be continued by ``target_new``.

    ``prompt`` contains ``subject`` literally, or a ``{}`` placeholder that is replaced by it
    (CounterFact style). ``paraphrases`` and ``locality`` are optional probes used by the
    evaluation harness: prompts that should and should not follow the edit.
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
            return InvalidRequestError(f"{msg} (request: prompt={self.prompt!r}, subject={self.subject!r})")

        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise bad("the prompt is empty; give the text the model should continue")
        if not isinstance(self.target_new, str) or not self.target_new.strip():
            raise bad("target_new is empty; give the text the edited model should produce")
        if self.target_true is not None and not isinstance(self.target_true, str):
            raise bad("target_true must be a string or None")
        if self.subject is not None and (not isinstance(self.subject, str) or not self.subject.strip()):
            raise bad("subject is empty; give the entity the fact is about, or leave it None")
        prompt = self.prompt
        span = self.subject_span
        if PLACEHOLDER in prompt:
            if self.subject is None:
                raise bad("the prompt has a '{}' placeholder but no subject was given")
            start = prompt.index(PLACEHOLDER)
            prompt = prompt.replace(PLACEHOLDER, self.subject, 1)
            if PLACEHOLDER in prompt:
                raise bad("the prompt has more than one '{}' placeholder; use exactly one")
            span = (start, start + len(self.subject))
        elif self.subject is not None:
            start = prompt.find(self.subject)
            if start < 0:
                raise bad(f"subject {self.subject!r} does not occur in the prompt; put it in the "
                          "prompt literally or mark its place with '{}'")
            span = (start, start + len(self.subject))
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "subject_span", span)
        object.__setattr__(self, "paraphrases", tuple(self.paraphrases))
        object.__setattr__(self, "locality", tuple(self.locality))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (the form stored in ``edit_config.json``)."""
        out: dict[str, Any] = {"prompt": self.prompt, "subject": self.subject,
                               "target_new": self.target_new}
        if self.target_true is not None:
            out["target_true"] = self.target_true
        if self.paraphrases:
            out["paraphrases"] = list(self.paraphrases)
        if self.locality:
            out["locality"] = list(self.locality)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EditRequest":
        """Build a request from a dict; unknown keys are an error naming the accepted ones."""
        if not isinstance(data, dict):
            raise InvalidRequestError(f"an edit request must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.name != "subject_span"}
        unknown = set(data) - known
        if unknown:
            raise InvalidRequestError(f"unknown request field(s) {sorted(unknown)}; accepted: {sorted(known)}")
        if "prompt" not in data or "target_new" not in data:
            raise InvalidRequestError(f"a request needs 'prompt' and 'target_new'; got {sorted(data)}")
        return cls(**data)


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
