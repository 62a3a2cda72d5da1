"""Region-feature extraction throughput of the full-size BUTD detector (random weights): images/s at 600x1000.

The detector is `BUTDDetector(BUTDConfig())` (ResNet-101 C4, dilated res5, 1601 classes, 401 attributes) with
random weights, so nothing is downloaded; the cost does not depend on the weights except through the number of
proposals, which the RPN always fills up to `--proposals` (300 as the original extraction) on real-size images.
Images are random RGB of exactly `--height` x `--width` (600 x 1000 by default, the size the preprocessing produces
for a 3:5 photo), so every batch is one same-shape group.

Two rows per dtype: `detect` on one image at a time (batch 1), and on `--batch-size` images per call with
`batch_invariant=False` (one backbone batch, RoI work batched across the images). The script prints images/s and the batched speed-up, and appends
markdown rows to `benchmarks/RESULTS.md` unless `--no-record`, under the columns
`| date | commit | machine | device | dtype | image | proposals | row | images/s | vs batch 1 |`.

Usage:
    python benchmarks/bench_features.py --proposals 50 --images 2 --batch-size 2   # CPU smoke run (minutes)
    python benchmarks/bench_features.py --device cuda --dtype bf16 --images 64 --batch-size 16   # target >= 30 img/s
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import platform
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

from modeling_imagebert.features import BUTDConfig, BUTDDetector, BUTDImageProcessor

RESULTS = Path(__file__).with_name("RESULTS.md")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default="fp32", help="fp32, bf16, fp16 or a comma list (autocast for 16-bit)"
    )
    parser.add_argument("--images", type=int, default=4, help="images timed per row")
    parser.add_argument(
        "--batch-size", type=int, default=4, help="images per detect() call in the batched row"
    )
    parser.add_argument("--height", type=int, default=600)
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument(
        "--proposals", type=int, default=300, help="RPN proposals kept per image (post-NMS top-n)"
    )
    parser.add_argument("--roi-chunk-size", type=int, default=512, help="most RoIs through res5 at once")
    parser.add_argument("--warmup", type=int, default=1, help="untimed detect() calls before each row")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    return parser.parse_args(argv)


def synthetic_images(count: int, height: int, width: int) -> list[np.ndarray]:
    generator = np.random.default_rng(0)
    return [generator.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


def time_rows(
    detector: BUTDDetector, images: list[np.ndarray], args, dtype: torch.dtype | None
) -> dict[str, float]:
    """images/s of batch-1 and batched `detect` under autocast to `dtype` (None: fp32)."""
    processor = BUTDImageProcessor(
        min_size=min(args.height, args.width), max_size=max(args.height, args.width)
    )
    device_type = torch.device(args.device).type
    autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    rows = {}
    for name, per_call in (("batch 1", 1), (f"batch {args.batch_size}", args.batch_size)):
        with autocast:
            for _ in range(args.warmup):
                detector.detect(
                    images[:per_call], processor=processor, batch_size=per_call, batch_invariant=per_call == 1
                )
            _synchronize(args.device)
            start = time.perf_counter()
            for first in range(0, len(images), per_call):
                detector.detect(
                    images[first : first + per_call],
                    processor=processor,
                    batch_size=per_call,
                    roi_chunk_size=args.roi_chunk_size,
                    batch_invariant=per_call == 1,
                )
            _synchronize(args.device)
        rows[name] = len(images) / (time.perf_counter() - start)
    return rows


def _synchronize(device: str):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    torch.manual_seed(0)
    config = BUTDConfig(rpn_post_nms_top_n=args.proposals)
    detector = BUTDDetector(config).to(args.device).eval()
    images = synthetic_images(args.images, args.height, args.width)
    lines = []
    print(
        f"BUTD detector, {args.height}x{args.width}, {args.proposals} proposals, {args.device} ({machine()})"
    )
    print(f"{'dtype':<6} {'row':<10} {'images/s':>9}")
    for dtype_name in args.dtype.split(","):
        rows = time_rows(detector, images, args, DTYPES[dtype_name])
        single = rows["batch 1"]
        for name, rate in rows.items():
            speedup = f"{rate / single:.2f}x" if name != "batch 1" else "1.00x"
            print(f"{dtype_name:<6} {name:<10} {rate:>9.3g}  ({speedup} batch 1)")
            lines.append(
                f"| {datetime.datetime.now():%Y-%m-%d %H:%M} | {commit()} | {machine()} | {args.device} | {dtype_name} "
                f"| {args.height}x{args.width} | {args.proposals} | {name} | {rate:.3g} | {speedup} |"
            )
    if not args.no_record:
        with open(RESULTS, "a") as handle:
            handle.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
