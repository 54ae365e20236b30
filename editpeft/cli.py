"""The ``editpeft`` command; each subcommand mirrors one call of the Python API.

    editpeft methods [--verbose]
    editpeft edit --method rome --prompt "The Eiffel Tower is located in the city of" \
                  --subject "Eiffel Tower" --target-new Rome --out edits/eiffel
    editpeft stats --method memit            # precompute the key statistics (cached)
    editpeft generate "The Eiffel Tower is located in the city of" --edit edits/eiffel
    editpeft eval --method rome --method grace --data counterfact.json --n 200 --known-only \
                  --mode sequential --out runs/cf
    editpeft report runs/cf runs/zsre --out runs/all
    editpeft push edits/eiffel user/my-edits --subfolder eiffel     # or an editor folder
    editpeft inspect user/my-edits --subfolder eiffel
    editpeft merge --edit edits/eiffel --edit user/my-edits --out merged/
    editpeft export-lora --edit edits/eiffel --out lora/eiffel
    editpeft train mend --data zsre_train.json --out editors/mend --steps 2000 --checkpoint-every 200
    editpeft demo
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import time
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import EditError
from .text import printable


def _load_model(path: str | None, device_map: str | None = None, dtype: str | None = None):
    import editpeft
    if path is None:
        model, tok = editpeft.load_default_model()
    else:
        from .models import load_model
        model, tok = load_model(path, device_map=device_map, dtype=dtype)
    return editpeft.enable_editing(model, tok), tok


def _distributed_rank() -> tuple[int, int] | None:
    """(rank, world size) under ``accelerate launch`` / ``torchrun``, else None."""
    import os
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 else None


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise EditError(f"--shard takes i/n (for example 0/4), got {text!r}") from None
    return i, n


def resolve_shard(text: str | None) -> tuple[int, int]:
    """The shard ``(i, n)`` a process evaluates: ``--shard i/n`` if given, else the rank under
    ``accelerate launch`` / ``torchrun``, else ``(0, 1)``."""
    return _parse_shard(text) or _distributed_rank() or (0, 1)


def cmd_eval(args) -> int:
    import os

    import torch

    from .evaluation import evaluate
    shard = resolve_shard(args.shard)
    model, tok = _load_model(args.model, args.device_map, args.dtype)
    if "LOCAL_RANK" in os.environ and torch.cuda.is_available() and not args.device_map:
        model.to(f"cuda:{int(os.environ['LOCAL_RANK'])}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if shard[1] > 1:
        out = out / f"shard-{shard[0]}-of-{shard[1]}"
    methods = [m for arg in args.method for m in arg.split(",") if m]
    config = _parse_config(args.config)
    protocols = [p for p in args.protocols.split(",") if p]
    checkpoints = [int(k) for k in args.checkpoints.split(",") if k]
    summaries = evaluate(model, tok, methods, args.data, out=out, mode=args.mode, n=args.n, format=args.format,
                         config=config, batch_size=args.batch_size, checkpoints=checkpoints, protocols=protocols,
                         known_only=args.known_only, shard=shard, overwrite=args.overwrite, sample=args.sample)
    if args.save_metrics_to:
        _save_metrics(args.save_metrics_to, summaries, args.data)
    for method, s in summaries.items():
        rel = s["metrics"].get("reliability", {})
        print(f"{method}: {s['counts'].get('scored', 0)} cases; reliability "
              + ", ".join(f"{p}={v['mean']:.3f}" for p, v in rel.items() if p in ("token_em", "prob_margin", "gen_em")))
    print(f"report: {out / 'report.md'}")
    return 0


def cmd_push(args) -> int:
    from .editors import CONFIG_NAME as EDITOR_CONFIG, push_editor_folder
    from .hub import push_folder
    push = push_editor_folder if (Path(args.folder) / EDITOR_CONFIG).is_file() else push_folder
    url = push(args.folder, args.repo_id, subfolder=args.subfolder, private=args.private or None,
               commit_message=args.message)
    print(url)
    return 0


def cmd_inspect(args) -> int:
    """Print an adapter's provenance and contents; reads JSON and safetensors only, loads no model."""
    from .card import check_card
    from .io import read_adapter_files
    from .loading import resolve_adapter_dir
    from .editors import CONFIG_NAME as EDITOR_CONFIG
    from .hub import folder_inside
    from .registry import method_info
    if Path(args.adapter).exists() and (folder_inside(Path(args.adapter), args.subfolder) / EDITOR_CONFIG).is_file():
        return _inspect_editor(args)
    try:
        folder = resolve_adapter_dir(args.adapter, revision=args.revision, subfolder=args.subfolder,
                                     force_download=args.force_download)
    except EditError as e:
        if "no editpeft adapter" in str(e) or "has no adapter folder" in str(e):
            return _inspect_editor(args)     # a Hub repo holding a trained editor
        raise
    if (folder / EDITOR_CONFIG).is_file() and not (folder / "edit_config.json").is_file():
        return _inspect_editor(args)
    config, tensors = read_adapter_files(folder)      # raises on a hash mismatch
    base = config.get("base_model") or {}
    plugin = config.get("plugin") or {}
    info = method_info(config["method"])
    installed = "installed" if info is not None and info.loaded else "NOT installed"
    try:
        check_card(folder, config)
        card = "consistent with edit_config.json" if (folder / "README.md").is_file() else "none"
    except EditError as e:
        card = f"INCONSISTENT: {e}"
    # everything below comes from the file: escaped (printable) so that it is data, never terminal control
    show = printable
    print(f"adapter        {show(folder)}")
    print(f"name           {show(config.get('name'))}")
    print(f"method         {show(config['method'])} ({show(config['kind'])}), {installed}")
    print(f"plugin         {show(plugin.get('distribution'))} {show(plugin.get('version'))}")
    print(f"made with      editpeft {show(config.get('editpeft_version'))} ({show(config['format'])})")
    print(f"base model     {show(base.get('name_or_path'))} ({show(base.get('model_type'))}), licence "
          f"{show(base.get('license'))}")
    print(f"fingerprint    {show(base.get('fingerprint'))}")
    print(f"tensors sha256 {show(config.get('tensors_sha256'))} (verified)")
    print(f"model card     {show(card)}")
    print(f"targets        {show(', '.join(config['targets']))}")
    total = 0
    for key, t in tensors.items():
        total += t.numel() * t.element_size()
        print(f"  {show(key):<40} {str(tuple(t.shape)):<16} {str(t.dtype).replace('torch.', '')}")
    print(f"tensor bytes   {total:,}")
    print(f"hparams        {show(json.dumps(config['hparams']))}")
    print(f"requests       {len(config['requests'])}")
    for r in config["requests"]:
        old = f"{show(r.get('target_true'))} -> " if r.get("target_true") else ""
        print(f"  [{show(r.get('subject'))}] {show(repr(r['prompt']))}: {old}{show(repr(r['target_new']))}")
    if config.get("metrics"):
        print("metrics        " + show(json.dumps(config["metrics"])))
    return 0


def _inspect_editor(args) -> int:
    """Print a trained editor's provenance and tensors (hash verified; no model is loaded)."""
    from .editors import read_editor_files, resolve_editor_dir
    from .registry import method_info
    folder, editor_id = resolve_editor_dir(args.adapter, revision=args.revision, subfolder=args.subfolder,
                                           force_download=args.force_download)
    config, tensors = read_editor_files(folder)
    base, plugin, training = (config.get(k) if isinstance(config.get(k), dict) else {}
                              for k in ("base_model", "plugin", "training"))
    info = method_info(str(config["method"]))
    show = printable        # every field comes from the file: escaped, never terminal control
    print(f"editor         {show(editor_id)} ({show(folder)})")
    print(f"method         {show(config['method'])}, "
          f"{'installed' if info is not None and info.loaded else 'NOT installed'}")
    print(f"plugin         {show(plugin.get('distribution'))} {show(plugin.get('version'))}")
    print(f"made with      editpeft {show(config.get('editpeft_version'))} ({show(config['format'])})")
    print(f"base model     {show(base.get('name_or_path'))} ({show(base.get('model_type'))})")
    print(f"fingerprint    {show(base.get('fingerprint'))} over {show(', '.join(map(str, config.get('targets') or [])))}")
    if config.get("content_sha256"):            # a JSON-only editor (IKE's demonstration pool)
        print(f"content sha256 {show(config['content_sha256'])} (verified; JSON only, no tensors)")
    else:
        print(f"tensors sha256 {show(config['tensors_sha256'])} (verified)")
    print(f"trained on     {show(training.get('data'))} (sha256 {show(training.get('data_sha256'))}), "
          f"{show(training.get('records'))} records, {show(training.get('steps'))} steps, seed {show(training.get('seed'))}")
    for key, t in tensors.items():
        print(f"  {show(key):<40} {str(tuple(t.shape)):<16} {str(t.dtype).replace('torch.', '')}")
    print(f"hparams        {show(json.dumps(config['hparams']))}")
    if training.get("metrics"):
        print("metrics        " + show(json.dumps(training["metrics"])))
    return 0


def cmd_merge(args) -> int:
    from .merge import save_merged
    model, tok = _load_model(args.model)
    for path in args.edit:
        model.load_edit(path, allow_mismatch=args.allow_mismatch, force_download=args.force_download)
    out = save_merged(model, tok, args.out)
    print(f"merged {len(args.edit)} edit(s) into {out}")
    return 0


def _save_metrics(folder: str, summaries: dict, data: str) -> None:
    """Write the harness's summary of the adapter's own method into its config and card."""
    from .io import read_adapter_files, save_metrics
    config, _ = read_adapter_files(folder)
    if config["method"] not in summaries:
        raise EditError(f"--save-metrics-to {folder}: that adapter is a {config['method']!r} edit, but this run "
                        f"evaluated {', '.join(summaries)}; evaluate --method {config['method']}")
    s = summaries[config["method"]]
    metrics: dict = {"data": Path(data).name, "mode": s["settings"]["mode"], "cases": s["counts"].get("scored")}
    for metric in ("reliability", "generalization", "locality", "portability"):
        for protocol, v in s["metrics"].get(metric, {}).items():
            if protocol in ("token_em", "prob_margin", "gen_em"):
                metrics[f"{metric} ({protocol})"] = round(v["mean"], 4)
    save_metrics(folder, metrics)
    print(f"metrics written to {folder}")


def cmd_export_lora(args) -> int:
    """Export saved weight-delta adapters (summed, in order) as one PEFT LoRA folder; no model is loaded."""
    from .loading import load_adapter, resolve_adapter_dir
    from .lora_export import export_peft_lora
    adapters = [load_adapter(resolve_adapter_dir(e, force_download=args.force_download)) for e in args.edit]
    out = export_peft_lora(adapters, args.out, base_model_name_or_path=args.base_model)
    print(f"wrote a PEFT LoRA adapter to {out} (load it with peft.PeftModel.from_pretrained)")
    return 0


def cmd_report(args) -> int:
    from .evaluation.report import write_report
    path = write_report(args.runs, args.out or (args.runs[0] if len(args.runs) == 1 else "report"))
    print(path.read_text())
    return 0


def _parse_config(text: str | None):
    if text is None:
        return None
    if Path(text).is_file():
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise EditError(f"--config must be a JSON object or the path of a card, got {text!r}") from None


def cmd_methods(args) -> int:
    from .registry import discover
    infos = discover()
    width = max([len(n) for n in infos] + [6])
    for name, info in sorted(infos.items()):
        status = "ok" if info.loaded else f"FAILED: {info.error}"
        line = f"{name:<{width}}  {info.kind or '-':<12}  {info.distribution} {info.version}"
        if args.verbose:
            line += f"  [{info.target}]  {status}"
        elif not info.loaded:
            line += "  (failed to load; see --verbose)"
        print(line)
    return 0


def _requests_from_args(args):
    from .request import EditRequest
    if args.requests:
        data = json.loads(Path(args.requests).read_text())
        data = data if isinstance(data, list) else [data]
        return [EditRequest.from_dict(d) for d in data]
    if not (args.prompt and args.target_new):
        raise EditError("give --prompt and --target-new (and --subject), or --requests FILE.json")
    return [EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target_new,
                        target_true=args.target_true)]


def cmd_edit(args) -> int:
    requests = _requests_from_args(args)
    model, tok = _load_model(args.model)
    t = time.perf_counter()
    adapter = model.add_edit(args.method, requests, name=args.name or Path(args.out).name,
                             config=_parse_config(args.config))
    print(f"computed {args.method} edit of {len(requests)} fact(s) in {time.perf_counter() - t:.1f}s")
    adapter.save_pretrained(args.out)
    size = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.name != "README.md")
    print(f"saved {args.out} ({size / 1024:.1f} KB without README)")
    return 0


def _generate(model, tok, prompt: str, max_new_tokens: int) -> str:
    import torch

    from .tokens import pad_id
    enc = tok(prompt, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id(tok))
    new = out[0] if model.config.is_encoder_decoder else out[0, enc["input_ids"].shape[1]:]   # seq2seq: decoder ids only
    return tok.decode(new, skip_special_tokens=True)


def cmd_train(args) -> int:
    from .editors import train_editor
    model, tok = _load_model(args.model)
    editor = train_editor(args.method, model, tok, args.data, out=args.out, steps=args.steps,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed, config=_parse_config(args.config),
                          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every, resume=args.resume,
                          val_data=args.val_data, val_fraction=args.val_fraction, max_grad_norm=args.max_grad_norm,
                          progress=not args.no_progress, exclude=args.exclude)
    metrics = editor.training.get("metrics") or {}
    print((f"built the {args.method} editor from {editor.training['records']} records" if editor.training.get("built")
           else f"trained the {args.method} editor for {editor.training['steps']} steps")
          + (": " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) if metrics else ""))
    print(f"saved {args.out} (sha256 {editor.sha256[:12]}...)")
    if args.push:
        print(editor.push_to_hub(args.push))
    return 0


def _trainable_epilog() -> str:
    from .editors import trainable_methods
    found = trainable_methods()
    names = "\n".join(f"  {n:<16} {i.distribution} {i.version}" for n, i in found.items()) or "  (none installed)"
    return ("installed methods that can train an editor:\n" + names
            + "\n\nAn interrupted run continues from its last checkpoint with --resume.")


def cmd_stats(args) -> int:
    from .arch import get_arch
    from .stats import precompute
    model, tok = _load_model(args.model)
    arch = get_arch(model)
    if args.layers:
        layers = [int(x) for x in args.layers.split(",")]
    else:
        from .registry import get_method
        hparams = get_method(args.method).resolve_config(model, None).to_dict()
        layers = hparams.get("layers") or [hparams["layer"]]
    names = [arch.mlp_out_name(arch.check_layer(layer)) for layer in layers]
    rows = precompute(model, tok, names, corpus=args.corpus, n_tokens=args.tokens)
    print(f"{'module':<40} {'source':<9} {'seconds':>8}")
    for r in rows:
        print(f"{r['module']:<40} {r['source']:<9} {r['seconds']:>8.1f}")
    counts = {s: sum(r["source"] == s for r in rows) for s in ("computed", "disk", "memory")}
    print(f"computed {counts['computed']}, cache hits {counts['disk'] + counts['memory']} "
          f"(corpus {args.corpus}, {args.tokens} tokens per module)")
    return 0


def cmd_generate(args) -> int:
    model, tok = _load_model(args.model)
    for path in args.edit or []:
        model.load_edit(path, allow_mismatch=args.allow_mismatch, force_download=args.force_download)
    print(args.prompt + _generate(model, tok, args.prompt, args.max_new_tokens))
    return 0


def cmd_demo(args) -> int:
    import tempfile

    from .request import EditRequest
    start = time.perf_counter()
    print("editpeft demo on the embedded SmolLM2-135M-Instruct (CPU)\n")
    model, tok = _load_model(None)
    print(f"loaded model in {time.perf_counter() - start:.1f}s")
    rome_req = EditRequest(prompt="The Eiffel Tower is located in the city of", subject="Eiffel Tower",
                           target_new="Rome", target_true="Paris")
    grace_req = EditRequest(prompt="The chemical symbol for gold is", target_new="Ag", target_true="Au")
    probes = [rome_req.prompt, "The Eiffel Tower is in the city of", grace_req.prompt,
              "The capital of France is", "The Colosseum is located in the city of"]
    columns: dict[str, list[str]] = {"before": [_generate(model, tok, p, 4) for p in probes]}
    t = time.perf_counter()
    rome = model.add_edit("rome", rome_req, name="eiffel-in-rome")
    print(f"ROME edit (statistics cached after the first run) in {time.perf_counter() - t:.1f}s")
    t = time.perf_counter()
    grace = model.add_edit("grace", grace_req, name="gold-is-ag")
    print(f"GRACE edit in {time.perf_counter() - t:.1f}s")
    columns["rome+grace"] = [_generate(model, tok, p, 4) for p in probes]
    with tempfile.TemporaryDirectory() as tmp:
        for adapter in (rome, grace):
            adapter.save_pretrained(f"{tmp}/{adapter.name}")
        sizes = {a.name: (Path(tmp) / a.name / "edit_model.safetensors").stat().st_size for a in (rome, grace)}
        model.remove_edit("eiffel-in-rome")
        model.remove_edit("gold-is-ag")
        columns["removed"] = [_generate(model, tok, p, 4) for p in probes]
        model.load_edit(f"{tmp}/eiffel-in-rome")
        model.load_edit(f"{tmp}/gold-is-ag")
        columns["reloaded"] = [_generate(model, tok, p, 4) for p in probes]
    with model.disabled_edits():
        columns["disabled"] = [_generate(model, tok, p, 4) for p in probes]
    print()
    print("| prompt | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for i, p in enumerate(probes):
        cells = [columns[c][i].strip().replace("\n", " ").replace("|", "/") for c in columns]
        print(f"| {p} | " + " | ".join(cells) + " |")
    print()
    for name, size in sizes.items():
        print(f"adapter {name}: {size / 1024:.1f} KB of tensors")
    print(f"\ndemo finished in {time.perf_counter() - start:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="editpeft", description="Knowledge edits as adapters.")
    ap.add_argument("--version", action="version", version=f"editpeft {__version__}")
    ap.add_argument("-v", "--log-level", default="WARNING", help="logging level (INFO shows progress details)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error (else one line)")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list installed editing methods")
    p.add_argument("--verbose", action="store_true", help="show entry points and load errors")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("edit", help="compute an edit and save it as an adapter folder")
    p.add_argument("--method", required=True)
    p.add_argument("--prompt")
    p.add_argument("--subject")
    p.add_argument("--target-new")
    p.add_argument("--target-true")
    p.add_argument("--requests", help="JSON file with one request object or a list of them")
    p.add_argument("--config", help="JSON object of hyper-parameters or a card path")
    p.add_argument("--name")
    p.add_argument("--model", help="a local transformers model folder (default: the embedded model)")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("stats", help="precompute the cached key statistics of the locate-then-edit methods")
    p.add_argument("--method", default="memit", help="take the layers from this method's card (default: memit)")
    p.add_argument("--layers", help="comma-separated decoder block indices (overrides --method)")
    p.add_argument("--corpus", default="pydoc")
    p.add_argument("--tokens", type=int, default=40_000)
    p.add_argument("--model", help="a local transformers model folder (default: the embedded model)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("generate", help="generate from a prompt with adapters loaded")
    p.add_argument("prompt")
    p.add_argument("--edit", action="append", help="adapter folder or Hub repo (repeatable, in order)")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--model")
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--force-download", action="store_true", help="fetch Hub adapters again even if cached")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate methods on a dataset (single, batch or sequential editing)")
    p.add_argument("--method", action="append", required=True,
                   help="method to evaluate (repeatable, or comma-separated); all run on identical cases")
    p.add_argument("--data", required=True, help="dataset file (.json or .jsonl)")
    p.add_argument("--format", help="dataset format (default: detected): counterfact, counterfact_easyedit, "
                                    "zsre, knowedit, mquake")
    p.add_argument("--config", help="JSON object of hyper-parameters or a card path")
    p.add_argument("--n", type=int, help="number of cases (after --known-only filtering)")
    p.add_argument("--mode", choices=["single", "batch", "sequential"], default="single")
    p.add_argument("--batch-size", type=int, default=None,
                   help="edits per edit call (default: 10 in batch mode, 1 in sequential mode)")
    p.add_argument("--checkpoints", default="1,10,50,100,200,500,1000",
                   help="sequential mode: numbers of edits at which all edits so far are scored")
    p.add_argument("--protocols", default="token_em,prob_margin,gen_em",
                   help="comma-separated protocols; add ngram_entropy for fluency (slow: it generates text)")
    p.add_argument("--known-only", action="store_true",
                   help="keep cases whose true answer the unedited model predicts")
    p.add_argument("--sample", type=int, default=None,
                   help="sequential mode: score this many of the edits so far at each checkpoint but the last "
                        "(a seeded sample: the scoring cost stays constant along a long stream)")
    p.add_argument("--shard", help="i/n: evaluate every n-th case starting at i (sequential mode: every shard "
                                   "applies the whole stream and scores every n-th case); merge with `editpeft report`")
    p.add_argument("--out", required=True, help="run folder; an interrupted run resumes when started again")
    p.add_argument("--overwrite", action="store_true", help="discard an existing run in --out")
    p.add_argument("--save-metrics-to", metavar="DIR",
                   help="record the measured metrics in this saved adapter's config and model card")
    p.add_argument("--model", help="a transformers model folder or id (default: the embedded model)")
    p.add_argument("--device-map", help="passed to from_pretrained, for example auto")
    p.add_argument("--dtype", help="passed to from_pretrained, for example bfloat16")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="upload a saved adapter (or trained editor) folder to a Hub model repo")
    p.add_argument("folder")
    p.add_argument("repo_id")
    p.add_argument("--subfolder", help="put it in this sub-folder of the repo (several adapters per repo)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--message", help="commit message")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("inspect", help="print an adapter's (or trained editor's) provenance and contents "
                                       "(no model is loaded)")
    p.add_argument("adapter", help="adapter folder or Hub repo id")
    p.add_argument("--revision")
    p.add_argument("--subfolder")
    p.add_argument("--force-download", action="store_true",
                   help="fetch a Hub repo's files again even if the cache has them")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("merge", help="bake weight-delta edits into a plain transformers model folder")
    p.add_argument("--edit", action="append", required=True, help="adapter folder or Hub repo (repeatable, in order)")
    p.add_argument("--model", help="base model folder (default: the embedded model)")
    p.add_argument("--out", required=True)
    p.add_argument("--allow-mismatch", action="store_true")
    p.add_argument("--force-download", action="store_true", help="fetch Hub adapters again even if cached")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export-lora", help="export weight-delta edits as a standard PEFT LoRA adapter")
    p.add_argument("--edit", action="append", required=True, help="adapter folder or Hub repo (repeatable)")
    p.add_argument("--force-download", action="store_true", help="fetch Hub adapters again even if cached")
    p.add_argument("--out", required=True)
    p.add_argument("--base-model", help="base_model_name_or_path to record (default: the adapters')")
    p.set_defaults(func=cmd_export_lora)

    p = sub.add_parser("report", help="combine evaluation runs (and shards) into one report")
    p.add_argument("runs", nargs="+", help="run folders (OUT or OUT/<method>)")
    p.add_argument("--out", help="where to write report.md, summary.json and plots")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="train the editor of a method that learns one (MEND, KE, SERAC)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", metavar="METHOD", help="a method that can train an editor (listed below)")
    p.add_argument("--data", required=True, help="training requests (.json/.jsonl list, or zsRE/CounterFact files)")
    p.add_argument("--out", required=True, help="editor folder; checkpoints go to OUT/checkpoints")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate of the editor's tensors")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, help="write a resumable checkpoint every N steps")
    p.add_argument("--eval-every", type=int, help="validate every N steps (default: --checkpoint-every)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--config", help="JSON object of the method's hyper-parameters or a card path")
    p.add_argument("--val-data", help="validation requests (same formats as --data)")
    p.add_argument("--val-fraction", type=float, default=0.0, help="hold out this fraction of --data instead")
    p.add_argument("--exclude", metavar="FILE",
                   help="drop training records whose subject (else prompt) appears in FILE, e.g. the evaluation set")
    p.add_argument("--max-grad-norm", type=float)
    p.add_argument("--model", help="a transformers model folder or id (default: the embedded model)")
    p.add_argument("--push", metavar="REPO", help="push the trained editor to this Hub repo")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
    _lazy_epilog(p, _trainable_epilog)

    p = sub.add_parser("demo", help="edit facts of the embedded model with ROME and GRACE")
    p.set_defaults(func=cmd_demo)
    return ap


def _lazy_epilog(parser: argparse.ArgumentParser, make) -> None:
    """Compute ``parser``'s epilog only when its help is shown (no plugin discovery otherwise)."""
    plain = parser.format_help

    def format_help() -> str:
        parser.epilog = make()
        return plain()
    parser.format_help = format_help


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; an error is one escaped line on stderr and exit code 2 (the traceback
    with ``--debug``), an interruption exit code 130."""
    args = build_parser().parse_args(argv)
    try:
        logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    except ValueError:
        print(f"error: unknown log level {printable(args.log_level)!r} (use DEBUG, INFO, WARNING or ERROR)",
              file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:   # noqa: BLE001 (the CLI's one place that turns errors into a line)
        if args.debug:
            traceback.print_exc()
        if isinstance(e, EditError):
            print(f"error: {printable(e)}", file=sys.stderr)
        else:
            print(f"error: {type(e).__name__}: {printable(e)} (an unexpected error; run with --debug for the "
                  "traceback and report it)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
