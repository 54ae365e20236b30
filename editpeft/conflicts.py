"""Conflicts between edits: two requests that rewrite the same subject and relation to
different objects. The relation is the prompt with the subject replaced by ``{}``.

Example:
    >>> from editpeft import EditRequest
    >>> a = EditRequest(prompt="{} is in", subject="The Louvre", target_new="Rome")
    >>> b = EditRequest(prompt="{} is in", subject="The Louvre", target_new="Oslo")
    >>> [c.describe() for c in find_conflicts([("x", [a]), ("y", [b])])]
    ["'The Louvre' / '{} is in': edit 'x' says 'Rome', edit 'y' says 'Oslo'"]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .request import EditRequest


@dataclass(frozen=True)
class Conflict:
    subject: str
    relation: str
    first: tuple[str, str]    # (edit name, target)
    second: tuple[str, str]

    def describe(self) -> str:
        return (f"{self.subject!r} / {self.relation!r}: edit {self.first[0]!r} says {self.first[1]!r}, "
                f"edit {self.second[0]!r} says {self.second[1]!r}")


def relation_key(request: EditRequest) -> tuple[str, str] | None:
    """(subject, relation template) of a request; None when it names no subject."""
    if request.subject is None or request.subject_span is None:
        return None
    s, e = request.subject_span
    return request.subject.strip().casefold(), (request.prompt[:s] + "{}" + request.prompt[e:]).strip()


def _norm(target: str) -> str:
    return " ".join(target.split()).casefold()


def find_conflicts(groups: Iterable[tuple[str, Sequence[EditRequest]]]) -> list[Conflict]:
    """Conflicts among named groups of requests (an adapter's, or one batch's), first seen first."""
    seen: dict[tuple[str, str], tuple[str, str, str]] = {}
    out: list[Conflict] = []
    for name, requests in groups:
        for r in requests:
            key = relation_key(r)
            if key is None:
                continue
            if key in seen and _norm(seen[key][1]) != _norm(r.target_new):
                first_name, first_target, subject = seen[key]
                out.append(Conflict(subject, key[1], (first_name, first_target), (name, r.target_new)))
            else:
                seen.setdefault(key, (name, r.target_new, r.subject or ""))
    return out
