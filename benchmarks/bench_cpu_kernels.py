#!/usr/bin/env python
"""Speed-up of each CPU-only kernel of the model file over the PyTorch op it replaces, at base size (batch 8,
length 144, hidden 768, 12 heads), forward + backward, median of `--repeats` alternating runs.

    python benchmarks/bench_cpu_kernels.py [--repeats 7] [--threads 2]

The kernels are used only on CPU in training (see modeling_imagebert/kernels_imagebert.py);
CUDA keeps PyTorch's fused ops.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from modeling_imagebert import kernels_imagebert as kernels


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _dropout_rows(dtype, batch, length, hidden, p, repeats) -> list[tuple[str, float, float]]:
    hidden_states = torch.randn(batch, length, hidden, dtype=dtype, requires_grad=True)
    residual = torch.randn(batch, length, hidden, dtype=dtype)

    def plain():
        (F.dropout(hidden_states, p, training=True) + residual).sum().backward()

    def fast():
        kernels._fast_dropout_add(hidden_states, residual, p).sum().backward()

    return [(f"dropout + residual, {dtype}", _time(plain, repeats), _time(fast, repeats))]


def _attention_rows(dtype, batch, length, hidden, heads, p, repeats) -> list[tuple[str, float, float]]:
    q, k, v = (
        torch.randn(batch, heads, length, hidden // heads, dtype=dtype, requires_grad=True) for _ in range(3)
    )
    mask = torch.zeros(batch, 1, length, length, dtype=dtype)
    scaling = (hidden // heads) ** -0.5

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scaling).sum().backward()

    def ours():
        kernels._cpu_training_attention(q, k, v, mask, scaling, p).sum().backward()

    return [(f"attention with dropout, {dtype}", _time(sdpa, repeats), _time(ours, repeats))]


def main(argv: list[str] | None = None) -> list[tuple[str, float, float]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, length, hidden, heads = 8, 144, 768, 12
    p = 0.1
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += _dropout_rows(dtype, batch, length, hidden, p, args.repeats)
        rows += _attention_rows(dtype, batch, length, hidden, heads, p, args.repeats)
    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}")
    print("| kernel | PyTorch op (ms) | ours (ms) | speed-up |")
    print("|---|---|---|---|")
    for name, plain, fast in rows:
        print(f"| {name} | {plain * 1e3:.1f} | {fast * 1e3:.1f} | {plain / fast:.2f}x |")
    return rows


if __name__ == "__main__":
    main()
