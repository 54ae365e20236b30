"""``logit_bias``: the smallest complete editpeft method, as a template for plugin authors.

When the subject's tokens occur in the input, the adapter adds ``bias`` to the logit of the new
object's first token at every position after the subject, until that token appears. It is a *router* adapter (the model-level attachment
point: it decides once per sequence, from the prompt, and sees the outputs of every forward of
that sequence, generated tokens included), it has one hyper-parameter with help text, and its
tensors are saved and loaded by editpeft like any other adapter's.

Example:
    >>> model.add_edit("logit_bias", EditRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower",
    ...                target_new="Rome"), config={"bias": 50.0})                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import editpeft
from editpeft.routing import Prompts, Route, current_session
from editpeft.tokens import target_token_ids


@dataclass
class BiasConfig(editpeft.MethodConfig):
    bias: float = field(default=50.0, metadata={"help": "logit added to the new object's first token"})

    def validate(self) -> None:
        if not self.bias > 0:
            raise editpeft.ConfigError(f"bias must be positive, got {self.bias}")


class LogitBiasAdapter(editpeft.RouterAdapter):
    """Tensors: the subject's token ids (``trigger``) and the target token (``target``)."""

    def __init__(self, trigger: torch.Tensor, target: torch.Tensor, **common: Any):
        super().__init__(**common)
        self.trigger, self.target = trigger, target

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"trigger": self.trigger, "target": self.target}

    @classmethod
    def from_saved(cls, tensors: dict[str, torch.Tensor], extra: dict[str, Any], **common: Any) -> "LogitBiasAdapter":
        """Rebuild from a file that may come from anyone: token ids must be integers >= 0, the
        trigger a non-empty row, the target one id (what only this kind knows; the core checks the rest)."""
        trigger, target = tensors.get("trigger"), tensors.get("target")
        if trigger is None or target is None:
            raise editpeft.AdapterFormatError("a logit_bias adapter needs the tensors 'trigger' and 'target'")
        for name, t, ndim in (("trigger", trigger, 1), ("target", target, 0)):
            if t.dtype not in (torch.int32, torch.int64) or t.ndim != ndim or t.numel() == 0 or bool((t < 0).any()):
                raise editpeft.AdapterFormatError(f"{name} must be {'a row of' if ndim else 'one'} token id(s) >= 0, "
                                                  f"got {t.dtype} of shape {tuple(t.shape)}")
        return cls(trigger.long(), target.long(), **common)

    def attach(self, state) -> None:
        """Refuse token ids this model's vocabulary does not have, or a trigger that does not spell
        the edit's subject (a mixed-up or modified file)."""
        vocab = state.model.get_output_embeddings().weight.shape[0]
        if int(self.trigger.max()) >= vocab or int(self.target) >= vocab:
            raise editpeft.AdapterFormatError(f"token ids beyond this model's vocabulary ({vocab})")
        subject = self.requests[0].subject if self.requests else None
        if subject and self.trigger.tolist() != state.tokenizer(" " + subject, add_special_tokens=False)["input_ids"]:
            raise editpeft.AdapterFormatError("the trigger does not spell the edit's subject")
        super().attach(state)

    def decide(self, model, prompts: Prompts) -> list[Route | None]:
        """Once per sequence: a row is in scope when its prompt contains the subject; the
        route's ``entry`` is the column of the subject's last token."""
        trig, n = self.trigger.tolist(), len(self.trigger)
        routes: list[Route | None] = []
        for row in range(len(prompts)):
            seq, cols = prompts.tokens(row), prompts.positions(row)
            ends = [cols[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n] == trig]
            routes.append(Route(entry=ends[0]) if ends else None)
        return routes

    def route(self, model, inputs: dict[str, Any], call_next: Callable[[dict[str, Any]], Any]) -> Any:
        """Boost the target at every position from the end of the subject until the target appears
        (in the prompt or among the tokens generated so far)."""
        out = call_next(inputs)
        session = current_session(model)
        if session is None:
            return out
        ids = session.input_ids                          # the whole sequence so far
        target = int(self.target)
        shift = ids.shape[1] - out.logits.shape[1]       # logits cover only the last columns
        logits = out.logits.clone()
        for row, decision in enumerate(session.routes(self)):
            if decision is None:
                continue
            seq = ids[row].tolist()
            stop = next((j - 1 for j in range(decision.entry + 1, len(seq)) if seq[j] == target), len(seq) - 1)
            for q in range(max(decision.entry, shift), stop + 1):
                logits[row, q - shift, target] += self.hparams["bias"]
        out.logits = logits
        return out


class LogitBias(editpeft.EditMethod):
    name, kind, Config, adapter_class = "logit_bias", "router", BiasConfig, LogitBiasAdapter
    needs_subject, supports_batch = True, False     # checked by add_edit before compute is called

    def compute(self, model, tokenizer, requests, config: BiasConfig) -> LogitBiasAdapter:
        r = requests[0]
        trigger = tokenizer(" " + r.subject, add_special_tokens=False)["input_ids"]
        target = target_token_ids(tokenizer, r.prompt, r.target_new)[0]
        return LogitBiasAdapter(torch.tensor(trigger), torch.tensor(target), method=self.name,
                                hparams=config.to_dict(), requests=list(requests), targets=[])
