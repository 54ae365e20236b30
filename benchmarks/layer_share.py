"""Where a locate-then-edit step spends its time, block by block: the share that suffix-only
computation (running only the blocks at and above the edited layer) could save.

One value-optimisation step of ROME on the embedded model is a forward over the edit's rows (the
prompt in each context template plus the KL prompt) and a backward that stops at the edited layer
(only the shift there requires a gradient). This script times a real such step with a pre-hook on
every block and reports, for each edit layer asked, the share of the step spent below that layer
(which suffix-only computation removes) and the speed-up it bounds: 1 / (1 - share).

    cd benchmarks
    python layer_share.py [--layers 3 4 6 20 29] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import editable_default_model

from editpeft import EditRequest
from editpeft.arch import get_arch
from editpeft.attach import output_edit
from editpeft.locate import context_templates, in_template
from editpeft.probe import as_btd
from editpeft.tokens import TargetBatch

REQUEST = EditRequest(prompt="Danielle Darrieux's mother tongue is", subject="Danielle Darrieux", target_new="English")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="*", type=int, default=[3, 4, 6, 20, 29])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model, tok = editable_default_model(args.threads)
    arch = get_arch(model)
    model.requires_grad_(False)           # as during an edit: only the shift at the edited layer has a gradient
    templates = context_templates(model, tok, [[5, 5]], 0)
    texts, spans = zip(*(in_template(t, REQUEST) for t in templates))
    batch = TargetBatch.build(tok, list(texts), [REQUEST.target_new] * len(texts), list(spans))
    rows = torch.arange(len(texts))
    cols = torch.tensor(batch.subject_last)
    blocks = list(arch.layers())
    print(f"{len(texts)} rows x {batch.input_ids.shape[1]} tokens, {len(blocks)} blocks, {args.threads} threads")
    for layer in args.layers:
        module = model.get_submodule(arch.mlp_out_name(layer))
        stamps: list[float] = []
        hooks = [b.register_forward_pre_hook(lambda m, a: stamps.append(time.perf_counter())) for b in blocks]
        below, totals = [], []
        try:
            for _ in range(args.repeats + 1):
                delta = torch.zeros(module.out_features if hasattr(module, "out_features") else
                                    module.weight.shape[-1], requires_grad=True)

                def shift(x, out):
                    add = torch.zeros_like(as_btd(out, batch.input_ids))
                    add[rows, cols] = delta.to(out.dtype)
                    return out + add.reshape(out.shape)
                stamps.clear()
                start = time.perf_counter()
                with output_edit(module, shift):
                    # the LM head at the last positions only, as the optimisation does (logits_to_keep)
                    logits = model(**batch.model_inputs(), use_cache=False, logits_to_keep=2).logits
                    loss = -torch.log_softmax(logits.float(), -1)[..., 0].mean()   # any scalar: only its cost matters
                    loss.backward()
                end = time.perf_counter()
                totals.append(end - start)
                below.append(stamps[layer] - start)           # embedding + blocks below `layer`
        finally:
            for h in hooks:
                h.remove()
        b, t = statistics.median(below[1:]), statistics.median(totals[1:])
        print(f"| edit layer {layer} | step {t * 1000:.0f} ms | below the layer {b * 1000:.0f} ms "
              f"({b / t:.1%}) | suffix-only bound {1 / (1 - b / t):.2f}x |")


if __name__ == "__main__":
    main()
