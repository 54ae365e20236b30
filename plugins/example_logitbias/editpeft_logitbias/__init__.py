"""``logit_bias``: the smallest complete editpeft method, as a template for plugin authors.

When the subject's tokens occur in the input, the adapter adds ``bias`` to the logit of the new
object's first token at every position after the subject, until that token appears. It is a *router* adapter (the model-level attachment
point: it sees the inputs and the outputs of the whole forward), it has one hyper-parameter with
help text, and its tensors are saved and loaded by editpeft like any other adapter's.

Example:
    >>> model.add_edit("logit_bias", EditRequest(prompt="The Eiffel Tower is in", subject="Eiffel Tower",
    ...                target_new="Rome"), config={"bias": 50.0})                  # doctest: +SKIP
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import editpeft
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
        return cls(tensors["trigger"], tensors["target"], **common)

    def route(self, model, inputs: dict[str, Any], call_next: Callable[[dict[str, Any]], Any]) -> Any:
        """Boost the target at every position from the end of the subject until the target appears."""
        out = call_next(inputs)
        ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
        if ids is None or (mask is not None and mask.dim() != 2):
            return out
        lengths = mask.sum(1) if mask is not None else torch.full((ids.shape[0],), ids.shape[1])
        trig, n, target = self.trigger.tolist(), len(self.trigger), int(self.target)
        shift = ids.shape[1] - out.logits.shape[1]          # logits may cover only the tail
        logits = out.logits.clone()
        for row in range(ids.shape[0]):
            seq = ids[row, : int(lengths[row])].tolist()
            ends = [i + n - 1 for i in range(len(seq) - n + 1) if seq[i:i + n] == trig]
            if not ends:
                continue
            stop = next((j - 1 for j in range(ends[0] + 1, len(seq)) if seq[j] == target), len(seq) - 1)
            for q in range(max(ends[0], shift), stop + 1):
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
