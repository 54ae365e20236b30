"""The normalised evaluation case every dataset loader produces.

A case holds the edit (one request, or several for multi-hop sets such as MQuAKE) and the probes
that measure it. A :class:`Probe` is a prompt with the answers that count as right (aliases) and,
where the dataset has one, a ``contrast``: the competing answer that ``prob_margin`` compares
against (the old object for edit probes, the new object for locality probes).

Example:
    >>> from editpeft import EditRequest
    >>> case = EvalCase("cf-1", (EditRequest(prompt="{} is in", subject="The Louvre",
    ...                 target_new="Rome", target_true="Paris"),),
    ...                 locality={"neighborhood": (Probe("The Eiffel Tower is in", ("Paris",), "Rome"),)})
    >>> [p.prompt for p in case.reliability]
    ['The Louvre is in']
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..request import EditRequest


@dataclass(frozen=True)
class Probe:
    """A prompt to score: ``answers`` are the accepted continuations (first = primary);
    ``contrast`` is the competing continuation for ``prob_margin`` (None: not defined)."""

    prompt: str
    answers: tuple[str, ...] = ()
    contrast: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "answers": list(self.answers), "contrast": self.contrast}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Probe":
        return cls(d["prompt"], tuple(d.get("answers", ())), d.get("contrast"))


@dataclass(frozen=True)
class EvalCase:
    """One evaluation case, whatever the dataset it came from.

    ``generalization`` holds rephrasings of the edited prompts; ``locality`` and ``portability``
    are keyed by kind (``neighborhood``, ``relation_specificity``, ``one_hop``, ``subject_aliasing``,
    ...) so reports can break scores down; ``generation_prompts`` feed the fluency metric.
    """

    case_id: str
    requests: tuple[EditRequest, ...]
    generalization: tuple[Probe, ...] = ()
    locality: Mapping[str, tuple[Probe, ...]] = field(default_factory=dict)
    portability: Mapping[str, tuple[Probe, ...]] = field(default_factory=dict)
    generation_prompts: tuple[str, ...] = ()
    source: str = ""

    @property
    def reliability(self) -> tuple[Probe, ...]:
        """The edited prompts themselves, each expecting its new target."""
        return tuple(Probe(r.prompt, (r.target_new,), r.target_true) for r in self.requests)

    def groups(self) -> dict[str, tuple[Probe, ...]]:
        """Every probe group of the case by metric name (``locality/<kind>``, ``portability/<kind>``)."""
        out: dict[str, tuple[Probe, ...]] = {"reliability": self.reliability}
        if self.generalization:
            out["generalization"] = self.generalization
        out.update({f"locality/{k}": v for k, v in self.locality.items() if v})
        out.update({f"portability/{k}": v for k, v in self.portability.items() if v})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "case_id": self.case_id, "source": self.source,
            "requests": [r.to_dict() for r in self.requests],
            "generalization": [p.to_dict() for p in self.generalization],
            "locality": {k: [p.to_dict() for p in v] for k, v in self.locality.items()},
            "portability": {k: [p.to_dict() for p in v] for k, v in self.portability.items()},
            "generation_prompts": list(self.generation_prompts),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "EvalCase":
        probes = lambda items: tuple(Probe.from_dict(p) for p in items)  # noqa: E731
        return cls(
            case_id=str(d["case_id"]), source=d.get("source", ""),
            requests=tuple(EditRequest.from_dict(r) for r in d["requests"]),
            generalization=probes(d.get("generalization", ())),
            locality={k: probes(v) for k, v in d.get("locality", {}).items()},
            portability={k: probes(v) for k, v in d.get("portability", {}).items()},
            generation_prompts=tuple(d.get("generation_prompts", ())),
        )
