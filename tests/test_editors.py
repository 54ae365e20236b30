"""Trained editors: train -> save -> push -> reload offline -> edit, resume after an interruption,
refusals (no editor, another base model, tampered files), the CLI.

The method under test is a small but real MEND-like editor, defined here and registered through a
genuine ``editpeft.methods`` entry point (a ``.dist-info`` folder in a temporary site directory,
which is what ``pip install`` writes). It turns the gradient of the target NLL at one MLP output
projection, ``dW = sum_t g_t x_t^T``, into the low-rank delta ``up = -lr * (1 + s) * g``, ``down = x``
(one rank-one piece per token), with a learned step size ``lr`` and per-output scales ``s``,
trained so that the edited model predicts the new targets of the edit and its paraphrases.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field

import pytest
import torch

import editpeft
from editpeft import EditRequest, WeightDeltaAdapter
from editpeft.arch import get_arch, linear_dims
from editpeft.attach import LowRankDelta, output_edit
from editpeft.cli import main
from editpeft.editors import Editor
from editpeft.tokens import TargetBatch, model_device

from conftest import make_tiny_model
from hub_server import pointed_at_loopback


# -- the toy editor method ----------------------------------------------------------------------
@dataclass
class GradStepConfig(editpeft.MethodConfig):
    layer: int = field(default=1, metadata={"help": "decoder block whose MLP output projection is edited"})
    init_log_lr: float = field(default=-1.0, metadata={"help": "initial log step size of the untrained editor"})


class GradStepEditor(editpeft.EditMethod):
    """Edits with a learned gradient step (a minimal MEND)."""

    name, kind, Config = "grad_step", "weight_delta", GradStepConfig
    requires_editor = True
    interrupt_at: int | None = None     # test hook: raise KeyboardInterrupt at this training call
    calls = 0

    def init_editor(self, model, tokenizer, config):
        target = get_arch(model).mlp_out_name(config.layer)
        _, d_out = linear_dims(model.get_submodule(target))
        return Editor(self.name, {"log_lr": torch.full((1,), config.init_log_lr),
                                  "out_scale": 0.01 * torch.randn(d_out)},
                      hparams=config.to_dict(), targets=[target])

    def _factors(self, model, tokenizer, requests, target):
        """(g, x): the output gradients and inputs of ``target`` at every real token, so dW = g^T x."""
        batch = TargetBatch.build(tokenizer, [r.prompt for r in requests], [r.target_new for r in requests],
                                  device=model_device(model))
        seen = {}

        def hook(module, args, out):
            seen["x"], seen["y"] = args[0].detach(), out.detach().requires_grad_(True)
            return seen["y"]
        handle = model.get_submodule(target).register_forward_hook(hook)
        try:
            with torch.enable_grad():
                loss = batch.target_nll(model(**batch.model_inputs()).logits)
                (g,) = torch.autograd.grad(loss, seen["y"])
        finally:
            handle.remove()
        mask = batch.attention_mask.bool()
        return g[mask], seen["x"][mask], loss.detach()

    def _delta(self, editor, g, x):
        t = editor.tensors
        scale = t["log_lr"].exp() * (1 + t["out_scale"])
        return -(g * scale).T, x.T          # up (out, tokens), down (in, tokens)

    def editor_step(self, editor, model, tokenizer, batch, config):
        type(self).calls += 1
        if type(self).interrupt_at is not None and type(self).calls == type(self).interrupt_at:
            raise KeyboardInterrupt
        target = editor.targets[0]
        g, x, pre = self._factors(model, tokenizer, batch, target)
        up, down = self._delta(editor, g, x)
        prompts = [p for r in batch for p in (r.prompt, *r.paraphrases)]
        targets = [r.target_new for r in batch for _ in (r.prompt, *r.paraphrases)]
        probe = TargetBatch.build(tokenizer, prompts, targets, device=model_device(model))
        with output_edit(model.get_submodule(target), lambda inp, out: out + (inp @ down) @ up.T):
            post = probe.target_nll(model(**probe.model_inputs()).logits)
        return {"loss": post, "pre_nll": pre}

    def compute(self, model, tokenizer, requests, config, *, editor):
        g, x, _ = self._factors(model, tokenizer, requests, editor.targets[0])
        with torch.no_grad():
            up, down = self._delta(editor, g, x)
        return WeightDeltaAdapter({editor.targets[0]: LowRankDelta(up.contiguous(), down.contiguous())},
                                  method=self.name, hparams=config.to_dict(), requests=list(requests))


@pytest.fixture(autouse=True)
def grad_step_plugin(tmp_path, monkeypatch):
    """Register GradStepEditor through an entry point of a distribution installed in a temp site dir."""
    site = tmp_path / "site"
    info = site / "editpeft_gradstep-0.2.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: editpeft-gradstep\nVersion: 0.2.0\n")
    (info / "entry_points.txt").write_text(f"[editpeft.methods]\ngrad_step = {__name__}:GradStepEditor\n")
    monkeypatch.syspath_prepend(str(site))
    GradStepEditor.interrupt_at, GradStepEditor.calls = None, 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # tiny matrices: extra threads only wait for each other on a busy machine
    yield
    torch.set_num_threads(threads)


CITIES = ["Rome", "Paris", "Berlin", "London", "Madrid", "Tokyo", "Vienna"]
SUBJECTS = ["Eiffel Tower", "Colosseum", "tower", "river", "city", "fact", "gold", "silver"]


def toy_requests(n: int, offset: int = 0) -> list[dict]:
    out = []
    for i in range(offset, offset + n):
        s, c = SUBJECTS[i % len(SUBJECTS)], CITIES[(i * 3) % len(CITIES)]
        out.append({"prompt": "The city that holds the {}", "subject": s, "target_new": c,
                    "paraphrases": [f"The {s} is located in the city of"]})
    return out


@pytest.fixture
def toy_data(tmp_path):
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text(json.dumps(toy_requests(12)))
    val.write_text(json.dumps(toy_requests(4, offset=12)))
    return train, val


TRAIN = dict(steps=12, batch_size=3, lr=0.1, seed=3, progress=False)
REQ = EditRequest(prompt="The city that holds the {}", subject="Colosseum", target_new="Tokyo")


def adapter_tensors(adapter):
    return {k: v.clone() for k, v in adapter.state_dict().items()}


# -- tests --------------------------------------------------------------------------------------
def test_train_save_push_reload_offline_same_adapter(tiny, toy_data, tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants
    model, tok = tiny
    train, val = toy_data
    editor = editpeft.train_editor("grad_step", model, tok, train, val_data=val, out=tmp_path / "ed",
                                   checkpoint_every=4, **TRAIN)
    metrics = editor.training["metrics"]
    assert metrics["val_loss"] < 0.8 * metrics["initial_val_loss"]   # held-out edits succeed more than before
    losses = [h["loss"] for h in editor.training["history"] if "loss" in h]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])   # the training loss decreases
    assert editor.training["data"] == "train.json" and editor.training["steps"] == 12
    assert editor.id == "ed" and (tmp_path / "ed" / "README.md").is_file()
    before = adapter_tensors(model.add_edit("grad_step", REQ, name="a", editor=editor))
    provenance = editor.provenance()
    model.remove_edit("a")

    # folder round trip; the adapter records the editor
    adapter = model.add_edit("grad_step", REQ, name="b", editor=tmp_path / "ed")
    assert all(torch.equal(v, before[k]) for k, v in adapter_tensors(adapter).items())
    adapter.save_pretrained(tmp_path / "edit")
    cfg = json.loads((tmp_path / "edit" / "edit_config.json").read_text())
    assert cfg["editor"] == {"id": "ed", "sha256": provenance["sha256"]}
    assert provenance["sha256"] in (tmp_path / "edit" / "README.md").read_text()
    model.remove_edit("b")
    assert model.load_edit(tmp_path / "edit").editor == cfg["editor"]
    model.remove_edit("b")

    # Hub round trip, then offline from the HF cache
    with pointed_at_loopback(monkeypatch, tmp_path / "hf-cache") as server:
        editor.push_to_hub("user/grad-step-editor")
        assert main(["push", str(tmp_path / "ed"), "user/grad-step-editor", "--subfolder", "v1"]) == 0
        assert not any("checkpoints" in f for _, files in server.repos["user/grad-step-editor"].commits
                       for f in files)
        editpeft.load_editor("user/grad-step-editor")
        assert editpeft.load_editor("user/grad-step-editor", subfolder="v1").id == "user/grad-step-editor/v1"
        assert main(["inspect", "user/grad-step-editor"]) == 0 and main(["inspect", "user/grad-step-editor",
                                                                         "--subfolder", "v1"]) == 0
    assert capsys.readouterr().out.count("(verified)") == 2
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_editor = editpeft.load_editor("user/grad-step-editor", model=model, tokenizer=tok)
    assert hub_editor.id == "user/grad-step-editor" and hub_editor.sha256 == provenance["sha256"]
    assert hub_editor.training["metrics"] == metrics
    assert editpeft.load_editor("user/grad-step-editor", subfolder="v1").sha256 == provenance["sha256"]
    adapter = model.add_edit("grad_step", REQ, name="c", editor="user/grad-step-editor")
    assert all(torch.equal(v, before[k]) for k, v in adapter_tensors(adapter).items())
    assert adapter.editor == {"id": "user/grad-step-editor", "sha256": provenance["sha256"]}
    model.remove_edit("c")

    # another base model is refused (explicit override possible)
    other = editpeft.enable_editing(make_tiny_model("llama", tok, seed=1), tok)
    with pytest.raises(editpeft.BaseModelMismatchError, match="made for base model"):
        other.add_edit("grad_step", REQ, editor=hub_editor)
    with pytest.raises(editpeft.BaseModelMismatchError):
        editpeft.load_editor(tmp_path / "ed", model=other, tokenizer=tok)
    assert not other.edits
    with pytest.raises(editpeft.ConfigError, match="was trained on model.layers.1.mlp.down_proj"):
        model.add_edit("grad_step", REQ, editor=editor, config={"layer": 0})
    other.add_edit("grad_step", REQ, editor=editpeft.load_editor(tmp_path / "ed", allow_mismatch=True))


def test_interrupted_training_resumes_to_the_same_editor(tiny, toy_data, tmp_path):
    model, tok = tiny
    train, val = toy_data
    full = editpeft.train_editor("grad_step", model, tok, train, val_data=val, out=tmp_path / "full",
                                 checkpoint_every=4, **TRAIN)
    # editor_step calls: 2 per validation (4 val records, batches of 3) at steps 0, 4, 8, one per training
    # step: call 16 is training step 10, after the checkpoint at step 8
    GradStepEditor.calls, GradStepEditor.interrupt_at = 0, 16
    with pytest.raises(KeyboardInterrupt):
        editpeft.train_editor("grad_step", model, tok, train, val_data=val, out=tmp_path / "cut",
                              checkpoint_every=4, **TRAIN)
    GradStepEditor.interrupt_at = None
    ckpts = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert ckpts == ["step-00000004", "step-00000008"]
    assert not (tmp_path / "cut" / "editor_config.json").exists()
    with pytest.raises(editpeft.EditError, match="resume=True"):
        editpeft.train_editor("grad_step", model, tok, train, val_data=val, out=tmp_path / "cut",
                              checkpoint_every=4, **TRAIN)
    with pytest.raises(editpeft.EditError, match="other settings .*lr"):
        editpeft.train_editor("grad_step", model, tok, train, val_data=val, out=tmp_path / "cut",
                              checkpoint_every=4, resume=True, **{**TRAIN, "lr": 0.2})
    resumed = editpeft.train_editor("grad_step", model, tok, train, val_data=val, out=tmp_path / "cut",
                                    checkpoint_every=4, resume=True, **TRAIN)
    assert resumed.sha256 == full.sha256
    assert resumed.training == full.training
    assert (tmp_path / "cut" / "editor_model.safetensors").read_bytes() == \
        (tmp_path / "full" / "editor_model.safetensors").read_bytes()


def test_method_needing_an_editor_refuses_without_one(tiny):
    model, tok = tiny
    with pytest.raises(editpeft.EditorRequiredError, match=r"train_editor\('grad_step'.*editpeft train grad_step"):
        model.add_edit("grad_step", REQ)
    with pytest.raises(editpeft.EditError, match="does not use a trained editor"):
        model.add_edit("grace", REQ, config={"layer": 0}, editor="somewhere/else")
    with pytest.raises(editpeft.EditError, match="does not learn an editor.*grad_step"):
        editpeft.train_editor("grace", model, tok, [REQ])
    assert not model.edits


def test_tampered_editor_files_are_refused(tiny, tmp_path):
    import hashlib

    from safetensors.torch import load_file, save_file
    model, tok = tiny
    editor = editpeft.train_editor("grad_step", model, tok, [EditRequest.from_dict(r) for r in toy_requests(4)],
                                   steps=2, batch_size=2, lr=0.1, progress=False)
    editor.save_pretrained(tmp_path / "ok")

    def variant(name, change, rehash=True):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "ok", folder)
        tensors = load_file(folder / "editor_model.safetensors")
        save_file(change(tensors), folder / "editor_model.safetensors")
        if rehash:
            cfg = json.loads((folder / "editor_config.json").read_text())
            cfg["tensors_sha256"] = hashlib.sha256((folder / "editor_model.safetensors").read_bytes()).hexdigest()
            (folder / "editor_config.json").write_text(json.dumps(cfg))
        return folder

    cases = [
        (variant("hash", lambda t: {**t, "log_lr": t["log_lr"] + 1}, rehash=False), "does not match the hash"),
        (variant("nan", lambda t: {**t, "log_lr": torch.full_like(t["log_lr"], float("nan"))}), "NaN"),
        (variant("shape", lambda t: {**t, "out_scale": torch.zeros(7)}), "expects \\(32,\\)"),
        (variant("dtype", lambda t: {**t, "log_lr": t["log_lr"].to(torch.int32)}), "not floating point"),
        (variant("missing", lambda t: {"log_lr": t["log_lr"]}), "has tensors"),
    ]
    for folder, message in cases:
        with pytest.raises(editpeft.EditorFormatError, match=message):
            model.add_edit("grad_step", REQ, editor=folder)
    (tmp_path / "ok" / "README.md").write_text((tmp_path / "ok" / "README.md").read_text()
                                                .replace("grad_step", "rome"))
    with pytest.raises(editpeft.EditorFormatError, match="model card"):
        editpeft.load_editor(tmp_path / "ok")
    assert not model.edits
    # an Editor object is accepted as is
    model.add_edit("grad_step", REQ, editor=editor)


def test_cli_train_help_lists_trainable_methods_and_trains(tmp_path, tiny_tokenizer, toy_data, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "grad_step" in out and "--resume" in out and "--checkpoint-every" in out
    assert "rome" not in out.split("methods that can train an editor")[1]
    model = make_tiny_model("llama", tiny_tokenizer)
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    train, val = toy_data
    args = ["train", "grad_step", "--data", str(train), "--val-data", str(val), "--out", str(tmp_path / "ed"),
            "--model", str(tmp_path / "m"), "--steps", "4", "--checkpoint-every", "2", "--batch-size", "3",
            "--lr", "0.1", "--config", '{"init_log_lr": -2.0}', "--no-progress"]
    assert main(args) == 0
    assert "saved" in capsys.readouterr().out
    assert json.loads((tmp_path / "ed" / "editor_config.json").read_text())["hparams"]["init_log_lr"] == -2.0
    assert main(args) == 2 and "--resume" in capsys.readouterr().err
    assert main(args[:-1] + ["--steps", "6", "--resume", "--no-progress"]) == 0
    assert json.loads((tmp_path / "ed" / "editor_config.json").read_text())["training"]["steps"] == 6
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "ed")]) == 0
    out = capsys.readouterr().out
    assert "grad_step, installed" in out and "train.json" in out and "6 steps" in out and "(verified)" in out
    assert main(["train", "rome", "--data", str(train), "--out", str(tmp_path / "x"), "--model",
                 str(tmp_path / "m")]) == 2
    assert "does not learn an editor" in capsys.readouterr().err


def test_training_data_reads_request_lists_and_dataset_formats(tmp_path):
    from editpeft.editors import read_training_data
    zsre = [{"src": "What city holds the Eiffel Tower?", "alt": "Rome", "answers": ["Paris"], "subject": "Eiffel Tower",
             "rephrase": "Where is the Eiffel Tower?", "loc": "nq question: who wrote hamlet",
             "loc_ans": "Shakespeare"}]
    (tmp_path / "zsre.json").write_text(json.dumps(zsre))
    (req,), name, digest = read_training_data(tmp_path / "zsre.json")
    assert (req.target_new, req.target_true, req.subject) == ("Rome", "Paris", "Eiffel Tower")
    assert req.paraphrases == ("Where is the Eiffel Tower?",) and req.locality == ("nq question: who wrote hamlet",)
    assert name == "zsre.json" and len(digest) == 64
    (tmp_path / "reqs.jsonl").write_text("\n".join(json.dumps(r) for r in toy_requests(3)))
    reqs, _, _ = read_training_data(tmp_path / "reqs.jsonl")
    assert [r.subject for r in reqs] == SUBJECTS[:3] and reqs[0].paraphrases
    with pytest.raises(editpeft.DatasetFormatError, match="matches no known format"):
        read_training_data([{"question": "?"}])


def test_diverging_training_stops_with_a_clear_error(tiny):
    model, tok = tiny
    reqs = [EditRequest.from_dict(r) for r in toy_requests(4)]
    with pytest.raises(editpeft.EditOptimizationError, match="diverged at step 1|non-finite"):
        editpeft.train_editor("grad_step", model, tok, reqs, steps=3, batch_size=2, progress=False,
                              config={"init_log_lr": 1000.0})   # exp overflows: inf step


def test_evaluation_runs_are_tied_to_their_editor(tiny, toy_data, tmp_path):
    """The harness records the editor of a run: the same command with another editor does not
    resume the first editor's scored cases (it is refused until --overwrite or another --out)."""
    from conftest import toy_eval_cases
    model, tok = tiny
    train, _ = toy_data
    first = editpeft.train_editor("grad_step", model, tok, train, **{**TRAIN, "steps": 2})
    second = editpeft.train_editor("grad_step", model, tok, train, **{**TRAIN, "steps": 3})
    assert first.sha256 != second.sha256
    cases = toy_eval_cases([("Colosseum", "Tokyo"), ("tower", "Rome")])
    summary = editpeft.evaluate(model, tok, "grad_step", cases, out=tmp_path / "run", editors={"grad_step": first},
                                progress=False)["grad_step"]
    assert summary["settings"]["editor"] == first.provenance() and summary["counts"]["scored"] == 2
    with pytest.raises(editpeft.EditError, match="other settings"):
        editpeft.evaluate(model, tok, "grad_step", cases, out=tmp_path / "run", editors={"grad_step": second},
                          progress=False)
    again = editpeft.evaluate(model, tok, "grad_step", cases, out=tmp_path / "run", editors={"grad_step": second},
                              progress=False, overwrite=True)["grad_step"]
    assert again["settings"]["editor"] == second.provenance()


def test_training_can_exclude_the_facts_of_an_evaluation_set(tiny, toy_data, tmp_path):
    """--exclude drops every training record sharing a subject with the given file; the provenance
    names both files and a resumed run must use the same exclusion."""
    model, tok = tiny
    train, _ = toy_data
    held_out = tmp_path / "eval.json"
    held_out.write_text(json.dumps([{"prompt": "Where is the {}?", "subject": "colosseum", "target_new": "x"}]))
    editor = editpeft.train_editor("grad_step", model, tok, train, exclude=held_out, **{**TRAIN, "steps": 1})
    subjects = [r["subject"] for r in toy_requests(12)]
    assert editor.training["records"] == len(subjects) - subjects.count("Colosseum") == 10
    assert editor.training["data"] == "train.json minus eval.json"
    plain = editpeft.train_editor("grad_step", model, tok, train, **{**TRAIN, "steps": 1})
    assert plain.training["data_sha256"] != editor.training["data_sha256"]
    everything = tmp_path / "all.json"
    everything.write_text(json.dumps(toy_requests(12)))
    with pytest.raises(editpeft.ConfigError, match="nothing is left"):
        editpeft.train_editor("grad_step", model, tok, train, exclude=everything, **{**TRAIN, "steps": 1})
