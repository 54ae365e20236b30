"""The runner: modes, resume after an interruption, shards merged by the report, the CLI."""
from __future__ import annotations

import json
import math

import pytest

import editpeft
from editpeft import EditRequest
from editpeft.evaluation import CaseScorer, EvalCase, evaluate, write_report
from editpeft.evaluation.report import combine
from editpeft.evaluation import runner as runner_mod

from conftest import rounding_atol, toy_eval_cases

GRACE = {"grace": {"layer": 0, "eps_init": 1.0, "steps": 100}}
SUBJECTS = ["Eiffel Tower", "Colosseum", "gold", "silver", "river", "tower"]
TARGETS = ["Rome", "Paris", "Berlin", "Tokyo", "Madrid", "Vienna"]


def _cases() -> list[EvalCase]:
    return toy_eval_cases(list(zip(SUBJECTS, TARGETS)))


def _metrics(summary):
    return summary["metrics"]


def test_no_edit_locality_is_exactly_one(tiny):
    model, tok = tiny
    cases = _cases()
    scorer = CaseScorer(model, tok)
    base = scorer.baseline(cases)
    for s in scorer.score(cases, base):
        assert s["locality"]["token_em"] == 1.0 and s["locality"]["gen_em"] == 1.0
        assert s["locality"]["prob_margin"] == 1.0
    model.add_edit("grace", cases[0].requests, name="g", config=GRACE["grace"])
    with model.disabled_edits():      # an edit that is present but touches nothing
        for s in scorer.score(cases, base):
            assert s["locality"] == {"token_em": 1.0, "gen_em": 1.0, "prob_margin": 1.0, "prob_margin_mean": 0.0}


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_modes_write_lines_summary_and_report(tiny, tmp_path, mode):
    model, tok = tiny
    out = evaluate(model, tok, "grace", _cases(), out=tmp_path, mode=mode, config=GRACE,
                   batch_size=3 if mode == "batch" else None, checkpoints=[1, 3], progress=False)
    s = out["grace"]
    assert s["counts"]["scored"] == 6 and s["failed_edits"] == 0
    assert _metrics(s)["reliability"]["token_em"]["mean"] == 1.0
    assert set(_metrics(s)) >= {"reliability", "generalization", "locality", "locality_answer", "portability",
                                "portability/one_hop", "locality/neighborhood"}
    lines = [json.loads(x) for x in (tmp_path / "grace" / "cases.jsonl").read_text().splitlines()]
    if mode == "sequential":
        assert [p["edits"] for p in s["curve"]] == [1, 3, 6]
        assert {ln["checkpoint"] for ln in lines} == {1, 3, 6} and len(lines) == 1 + 3 + 6
        assert len(model.edits) == 0       # the run removes its edits
    else:
        assert len(lines) == 6 and all(ln["group_size"] == (3 if mode == "batch" else 1) for ln in lines)
    assert not model.edits
    report = (tmp_path / "report.md").read_text()
    assert "## Protocol `token_em`" in report and "## Protocol `prob_margin`" in report
    assert (tmp_path / "bars_token_em.png").stat().st_size > 1000
    if mode == "sequential":
        assert (tmp_path / "sequential_token_em.png").is_file()


def test_sequential_in_batches_checkpoints_at_batch_ends(tiny, tmp_path):
    """Batches of 2 appended to one MEMIT adapter; a checkpoint inside a batch is taken at its end."""
    model, tok = tiny
    memit = {"layers": [0, 1], "mom2_update_weight": 1.0, "v_steps": 60, "v_lr": 0.5, "clamp_norm_factor": 1000.0,
             "stats_tokens": 4000, "context_lengths": [[4, 2]], "kl_factor": 0.0, "v_weight_decay": 0.0}
    seen = []
    real = runner_mod.Runner._edit

    def spy(self, group, name, append=False):
        seen.append((len(group), name, append))
        return real(self, group, name, append=append)

    import unittest.mock
    with unittest.mock.patch.object(runner_mod.Runner, "_edit", spy):
        s = evaluate(model, tok, "memit", _cases(), out=tmp_path, mode="sequential", config=memit, batch_size=2,
                     checkpoints=[3], progress=False)["memit"]
    assert seen == [(2, "eval-seq", False), (2, "eval-seq", True), (2, "eval-seq", True)]
    assert [p["edits"] for p in s["curve"]] == [4, 6]
    assert s["counts"]["scored"] == 6 and not model.edits


def test_sequential_sample_scores_a_fixed_number_until_the_last_checkpoint(tiny, tmp_path):
    """A stream scored on a sample: earlier checkpoints score `sample` edits (the same ones when run
    again), the last one every edit; baselines come from the base model even though they are
    computed lazily while edits are live."""
    model, tok = tiny
    kw = dict(mode="sequential", config=GRACE, checkpoints=[3, 5], progress=False, sample=2)
    s = evaluate(model, tok, "grace", _cases(), out=tmp_path / "a", **kw)["grace"]
    assert [(p["edits"], p["scored"]) for p in s["curve"]] == [(3, 2), (5, 2), (6, 6)]
    assert s["curve"][-1]["edit_seconds_total"] > 0 and s["counts"]["scored"] == 6
    lines = [json.loads(x) for x in (tmp_path / "a" / "grace" / "cases.jsonl").read_text().splitlines()]
    picked = [ln["case_id"] for ln in lines if ln["checkpoint"] == 3]
    assert picked == [_cases()[i].case_id for i in runner_mod.checkpoint_sample(3, 6, 2)]
    full = evaluate(model, tok, "grace", _cases(), out=tmp_path / "b", mode="sequential", config=GRACE,
                    checkpoints=[3, 5], progress=False)["grace"]
    assert _metrics(s) == _metrics(full)          # the last checkpoint scores all edits in both
    with pytest.raises(editpeft.ConfigError, match="sample"):
        evaluate(model, tok, "grace", _cases(), out=tmp_path / "c", config=GRACE, sample=2, progress=False)


def test_sequential_shards_score_parts_of_one_stream_and_merge(tiny, tmp_path):
    """Sequential shards each apply the whole stream and score every k-th case of each checkpoint;
    the merged report equals the unsharded run (edit seconds counted once)."""
    model, tok = tiny
    kw = dict(mode="sequential", config=GRACE, checkpoints=[2, 4], progress=False)
    full = evaluate(model, tok, "grace", _cases(), out=tmp_path / "full", **kw)["grace"]
    for i in range(2):
        evaluate(model, tok, "grace", _cases(), out=tmp_path / "sharded" / f"s{i}", shard=(i, 2), **kw)
    (m,) = combine([tmp_path / "sharded"]).values()
    assert m["counts"]["kept"] == 6 and m["counts"]["shards"] == 2
    assert [(p["edits"], p["scored"]) for p in m["curve"]] == [(p["edits"], p["scored"]) for p in full["curve"]]
    for a, b in zip(m["curve"], full["curve"]):
        for metric, by_protocol in b["metrics"].items():
            for protocol in ("token_em", "gen_em", "prob_margin"):
                if protocol in by_protocol:
                    assert a["metrics"][metric][protocol] == by_protocol[protocol], (metric, protocol)
    shard1 = [json.loads(x) for x in (tmp_path / "sharded" / "s1" / "grace" / "cases.jsonl").read_text().splitlines()]
    assert not any("edit_seconds_since_last_checkpoint" in ln for ln in shard1)


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_interrupt_and_resume_gives_the_same_summary(tiny, tmp_path, monkeypatch, mode):
    model, tok = tiny
    kw = dict(mode=mode, config=GRACE, checkpoints=[1, 2, 4], progress=False)
    full = evaluate(model, tok, "grace", _cases(), out=tmp_path / "full", **kw)["grace"]

    calls = {"n": 0}
    real = runner_mod.Runner._scored

    def flaky(self, cases, baselines):
        calls["n"] += 1
        if calls["n"] == 3:
            raise _Interrupt()
        return real(self, cases, baselines)

    monkeypatch.setattr(runner_mod.Runner, "_scored", flaky)
    with pytest.raises(_Interrupt):
        evaluate(model, tok, "grace", _cases(), out=tmp_path / "cut", **kw)
    assert not model.edits                                   # nothing left attached
    with (tmp_path / "cut" / "grace" / "cases.jsonl").open("a") as f:
        f.write('{"case_id": "c9", "trunc')                  # a line cut off mid-write
    monkeypatch.setattr(runner_mod.Runner, "_scored", real)
    resumed = evaluate(model, tok, "grace", _cases(), out=tmp_path / "cut", **kw)["grace"]
    assert _metrics(resumed) == _metrics(full)
    assert resumed["counts"]["scored"] == full["counts"]["scored"]
    if mode == "sequential":
        assert [p["metrics"] for p in resumed["curve"]] == [p["metrics"] for p in full["curve"]]


def test_fluency_protocol(tiny, tmp_path):
    model, tok = tiny
    s = evaluate(model, tok, "grace", _cases()[:2], out=tmp_path, config=GRACE, progress=False,
                 protocols=["token_em", "ngram_entropy"])["grace"]
    assert set(s["metrics"]["fluency"]) == {"ngram_entropy"} and s["metrics"]["fluency"]["ngram_entropy"]["n"] == 2
    assert s["metrics"]["fluency"]["ngram_entropy"]["mean"] > 0
    assert set(s["metrics"]["reliability"]) == {"token_em"}
    assert "## Protocol `ngram_entropy`" in (tmp_path / "report.md").read_text()


def test_other_settings_on_an_existing_run_are_refused(tiny, tmp_path):
    model, tok = tiny
    evaluate(model, tok, "grace", _cases()[:2], out=tmp_path, config=GRACE, progress=False)
    with pytest.raises(editpeft.EditError, match="other settings"):
        evaluate(model, tok, "grace", _cases()[:3], out=tmp_path, config=GRACE, progress=False)
    evaluate(model, tok, "grace", _cases()[:3], out=tmp_path, config=GRACE, progress=False, overwrite=True)


def test_a_changed_card_does_not_resume_the_old_run(tiny, tmp_path, monkeypatch):
    """Runs without an explicit config take the card's hparams: editing the card between two runs
    must not silently reuse the first run's scores."""
    model, tok = tiny
    impl = editpeft.registry.get_method("grace")
    card = dict(GRACE["grace"])
    monkeypatch.setattr(type(impl), "resolve_config", lambda self, m, c: impl.Config.from_dict(card))
    evaluate(model, tok, "grace", _cases()[:2], out=tmp_path, progress=False)
    card["steps"] += 1
    with pytest.raises(editpeft.EditError, match="other settings"):
        evaluate(model, tok, "grace", _cases()[:2], out=tmp_path, progress=False)


def test_shards_merge_into_the_unsharded_summary(tiny, tmp_path):
    model, tok = tiny
    whole = evaluate(model, tok, "grace", _cases(), out=tmp_path / "whole", config=GRACE, progress=False)["grace"]
    for i in range(2):
        evaluate(model, tok, "grace", _cases(), out=tmp_path / "sharded" / f"s{i}", config=GRACE, shard=(i, 2),
                 progress=False)
    write_report([tmp_path / "sharded"], tmp_path / "merged")
    (merged,) = json.loads((tmp_path / "merged" / "summary.json").read_text()).values()
    assert merged["counts"]["kept"] == 6 and merged["counts"]["shards"] == 2
    for metric, by_protocol in _metrics(whole).items():
        for protocol, v in by_protocol.items():
            # baselines are scored in other batches (other padding): reordered float32 sums over
            # 2 blocks + head + log-softmax, for margins of two log-probs of scale ~log V each
            tol = rounding_atol(2 * math.log(len(tok)), depth=4)
            assert merged["metrics"][metric][protocol]["mean"] == pytest.approx(v["mean"], rel=0, abs=tol)


def test_failed_edit_is_recorded_and_leaves_nothing(tiny, tmp_path):
    model, tok = tiny
    bad = {"grace": {"layer": 0, "eps_init": 1.0, "steps": 100, "lr": float("nan")}}
    s = evaluate(model, tok, "grace", _cases()[:2], out=tmp_path, config=bad, progress=False)["grace"]
    assert s["failed_edits"] == 2 and s["counts"]["scored"] == 0 and not model.edits


def test_cli_eval_and_report(tmp_path, tiny_tokenizer, capsys):
    from conftest import make_tiny_model
    from editpeft.cli import main
    model = make_tiny_model("llama", tiny_tokenizer)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "cases.json"
    data.write_text(json.dumps([{"case_id": i, "prompt": f"The city that holds the {s}", "subject": s,
                                 "target_new": t, "ground_truth": "London", "rephrase_prompt": f"About the {s}",
                                 "locality_prompt": "Berlin, London", "locality_ground_truth": "Madrid"}
                                for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]))
    args = ["eval", "--method", "grace", "--data", str(data), "--model", str(tmp_path / "m"), "--n", "4",
            "--config", json.dumps(GRACE["grace"]), "--out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "grace: 4 cases; reliability" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "| grace (single, cases) |" in capsys.readouterr().out
    assert main(args[:-2] + ["--shard", "3/2", "--out", str(tmp_path / "x")]) != 0
    # the measured metrics go into a saved adapter's config and card
    editable = editpeft.enable_editing(model, tiny_tokenizer)
    adapter = editable.add_edit("grace", EditRequest(prompt="The city that holds the tower", subject="tower",
                                                     target_new="Rome"), config=GRACE["grace"])
    adapter.save_pretrained(tmp_path / "adapter")
    assert main(args + ["--save-metrics-to", str(tmp_path / "adapter")]) == 0
    cfg = json.loads((tmp_path / "adapter" / "edit_config.json").read_text())
    assert cfg["metrics"]["reliability (token_em)"] == 1.0 and cfg["metrics"]["cases"] == 4
    assert "| reliability (token_em) | 1.0 |" in (tmp_path / "adapter" / "README.md").read_text()
    editable.remove_edit(adapter.name)
    editable.load_edit(tmp_path / "adapter")        # hash and card still consistent


def test_cli_takes_the_shard_from_a_distributed_launch(tmp_path, tiny_tokenizer, monkeypatch, capsys):
    """Under `accelerate launch` / torchrun each process evaluates its own shard; report merges them."""
    from conftest import make_tiny_model
    from editpeft.cli import main
    make_tiny_model("llama", tiny_tokenizer).save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    data = tmp_path / "cases.json"
    records = [{"case_id": i, "prompt": f"The city that holds the {s}", "subject": s, "target_new": t,
                "ground_truth": "London", "rephrase_prompt": f"About the {s}", "locality_prompt": "Berlin, London",
                "locality_ground_truth": "Madrid"} for i, (s, t) in enumerate(zip(SUBJECTS, TARGETS))]
    data.write_text(json.dumps(records))
    for rank in (0, 1):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", str(rank))
        assert main(["eval", "--method", "grace", "--data", str(data), "--model", str(tmp_path / "m"),
                     "--config", json.dumps(GRACE["grace"]), "--out", str(tmp_path / "run")]) == 0
        assert (tmp_path / "run" / f"shard-{rank}-of-2" / "grace" / "cases.jsonl").is_file()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "run")]) == 0
    assert "6 cases scored of 6 kept" in capsys.readouterr().out
