#!/usr/bin/env python
"""Check a folder converted from UNITER / VILLA against UNITER's own forward on the same inputs.

    python tools/check_uniter_parity.py uniter-base.pt imagebert-uniter-base

Reads the checkpoint (weights only) and the converted `ImageBertForPreTraining`, draws random inputs with
real-looking boxes (images of 300-800 x 200-640 pixels, padded text and regions), runs both in fp32 and prints the
largest absolute difference of each output: the ITM score (as the folder's `conversion_report.json` says it was
converted: UNITER's softmax P(matched), or its retrieval score), the MLM logits, the region-class logits (UNITER's
background column left out) and the MRFR features. UNITER's forward is `modeling_imagebert.pretraining.uniter_reference`,
a plain-torch restatement of its code (no apex, no horovod); the test suite runs the same check on a synthetic
checkpoint (tests/test_convert_uniter.py). Exit status 0 when every difference is within --tolerance, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modeling_imagebert import ImageBertForPreTraining  # noqa: E402
from modeling_imagebert.cli import run_cli  # noqa: E402
from modeling_imagebert.pretraining.convert_uniter import REPORT_NAME, read_uniter_checkpoint  # noqa: E402
from modeling_imagebert.pretraining.uniter_reference import check_parity, parity_inputs  # noqa: E402


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="the UNITER / VILLA .pt the folder was converted from")
    parser.add_argument("folder", help="the folder convert_uniter wrote")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3, help="draws of random inputs")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="largest absolute difference accepted (fp32; the tests reach 1e-5 at tiny sizes, 12-24 layers add "
        "rounding)",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    report_path = Path(args.folder) / REPORT_NAME
    if not report_path.is_file():
        raise FileNotFoundError(f"{args.folder}: no {REPORT_NAME} ; pass a folder written by convert_uniter")
    itm_logit = json.loads(report_path.read_text())["itm_logit"]
    state = {key: value.float() for key, value in read_uniter_checkpoint(args.checkpoint).items()}
    model = ImageBertForPreTraining.from_pretrained(args.folder, dtype=torch.float32).eval()
    worst: dict[str, float] = {}
    for seed in range(args.seeds):
        inputs = parity_inputs(
            model.config.vocab_size,
            model.config.visual_feature_dim,
            batch_size=args.batch_size,
            max_text=min(16, model.config.max_text_length),
            max_regions=min(36, model.config.max_regions),
            seed=seed,
        )
        for name, value in check_parity(state, model, inputs, itm_logit=itm_logit).items():
            worst[name] = max(worst.get(name, 0.0), value)
    print(
        f"largest |ImageBERT - UNITER| over {args.seeds} draws of {args.batch_size} pairs (ITM as {itm_logit}):"
    )
    for name, value in worst.items():
        print(
            f"  {name:13s} {value:.2e} {'ok' if value <= args.tolerance else 'ABOVE ' + str(args.tolerance)}"
        )
    if max(worst.values()) > args.tolerance:
        sys.exit(1)


if __name__ == "__main__":
    sys.exit(run_cli(_main))
