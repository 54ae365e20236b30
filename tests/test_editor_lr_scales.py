"""Editor training's per-prefix learning rates (EditMethod.editor_lr_scales): the longest matching
prefix sets a tensor's rate, the rest train at the run's lr, and bad scales are refused."""
from __future__ import annotations

import pytest
import torch

from editpeft.editors import _param_groups
from editpeft.errors import ConfigError


def test_longest_prefix_sets_each_tensors_rate():
    names = ["cf.w", "cls.a", "cls.b", "cls_bias"]
    params = [torch.zeros(1) for _ in names]
    groups = _param_groups(names, params, 1e-3, {"cls.": 0.01, "cls_": 100.0, "c": 2.0})
    rates = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert [rates[id(p)] for p in params] == pytest.approx([2e-3, 1e-5, 1e-5, 1e-1])
    assert len(groups) == 3 and sum(len(g["params"]) for g in groups) == 4


def test_no_scales_is_one_group_at_the_runs_lr():
    params = [torch.zeros(1), torch.zeros(2)]
    assert [(len(g["params"]), g["lr"]) for g in _param_groups(["a", "b"], params, 0.5, {})] == [(2, 0.5)]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "1"])
def test_bad_scales_are_refused(bad):
    with pytest.raises(ConfigError, match="lr scale"):
        _param_groups(["a"], [torch.zeros(1)], 1e-3, {"a": bad})
