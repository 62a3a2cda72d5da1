"""Rows/s of the vectorised `validate_dataset` against the row-by-row reference on a synthetic valid dataset.

    python benchmarks/bench_validation.py [--rows 20000] [--regions 36] [--feature-dims 2048 64]
                                          [--old-rows 20000] [--batch-size 1000] [--workdir DIR]

For each feature dimension, writes a memory-mapped Arrow file of `--rows` valid rows (`--regions` x F float16
features, as BUTD CC3M features are stored) into a temporary folder (removed afterwards), validates it once with
each validator and prints rows/s, the ratio, and a Markdown row for benchmarks/RESULTS.md. The row-by-row
reference is timed on the first `--old-rows` rows (it is slow; its rate does not depend on the row count).
"""

import argparse
import datetime
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from datasets import Dataset
from datasets.arrow_writer import ArrowWriter
from datasets.features.features import Array2DExtensionType

from modeling_imagebert.data.schema import _validate_dataset_rowwise, image_text_features, validate_dataset


def nested(values: np.ndarray, regions: int, rows: int, width: int, dtype: str) -> pa.Array:
    """An Array2D column [rows] of [regions, width] from flat `values` [rows * regions * width]."""
    inner = pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * regions * width + 1, width, dtype=np.int32)), pa.array(values)
    )
    outer = pa.ListArray.from_arrays(
        pa.array(np.arange(0, rows * regions + 1, regions, dtype=np.int32)), inner
    )
    return pa.ExtensionArray.from_storage(Array2DExtensionType(shape=(None, width), dtype=dtype), outer)


def write_synthetic(path: Path, rows: int, regions: int, feature_dim: int, chunk: int = 500) -> Dataset:
    """Writes `rows` valid image-text rows to an Arrow file at `path` in chunks and returns it memory-mapped."""
    features = image_text_features(feature_dim)
    rng = np.random.default_rng(0)
    # One block of features reused by every chunk: generating gigabytes of random numbers would dominate.
    block = rng.standard_normal(chunk * regions * feature_dim).astype(np.float16)
    with ArrowWriter(path=str(path), features=features) as writer:
        for start in range(0, rows, chunk):
            count = min(chunk, rows - start)
            x1 = rng.uniform(0, 300, (count, regions)).astype(np.float32)
            y1 = rng.uniform(0, 200, (count, regions)).astype(np.float32)
            boxes = np.stack([x1, y1, x1 + 100, y1 + 100], axis=-1)  # [count, regions, 4]
            table = pa.table(
                {
                    "image_id": pa.array([f"img-{start + i}" for i in range(count)]),
                    "caption": pa.array([f"a synthetic caption number {start + i}" for i in range(count)]),
                    "region_features": nested(
                        block[: count * regions * feature_dim], regions, count, feature_dim, "float16"
                    ),
                    "region_boxes": nested(boxes.reshape(-1), regions, count, 4, "float32"),
                    "image_width": pa.array(np.full(count, 640, np.int32)),
                    "image_height": pa.array(np.full(count, 480, np.int32)),
                    "region_classes": pa.array(list(rng.integers(0, 1600, (count, regions), dtype=np.int32))),
                    "region_scores": pa.array(list(rng.uniform(0, 1, (count, regions)).astype(np.float32))),
                },
                schema=features.arrow_schema,
            )
            writer.write_table(table)
    return Dataset.from_file(str(path))


def rows_per_second(validator, dataset: Dataset, batch_size: int) -> float:
    start = time.perf_counter()
    checked = validator(dataset, num_classes=1600, batch_size=batch_size, show_progress=False)
    return checked / (time.perf_counter() - start)


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "-"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--feature-dims", type=int, nargs="+", default=[2048, 64])
    parser.add_argument(
        "--old-rows", type=int, default=20000, help="rows timed with the row-by-row reference"
    )
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument(
        "--workdir", default=None, help="where the temporary Arrow file goes (default: $TMPDIR)"
    )
    args = parser.parse_args()

    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    rows_out = []
    for feature_dim in args.feature_dims:
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_validation_") as folder:
            dataset = write_synthetic(Path(folder) / "data.arrow", args.rows, args.regions, feature_dim)
            size_gb = dataset.data.nbytes / 1e9
            # An untimed pass first, so neither validator pays for faulting the memory-mapped file in.
            validate_dataset(dataset, show_progress=False)
            old_rows = min(args.old_rows, args.rows)
            old = rows_per_second(_validate_dataset_rowwise, dataset.select(range(old_rows)), args.batch_size)
            new = rows_per_second(validate_dataset, dataset, args.batch_size)
            del dataset
        print(
            f"F={feature_dim}: {args.rows} rows x {args.regions} regions ({size_gb:.2f} GB): vectorised "
            f"{new:,.0f} rows/s, row-by-row {old:,.0f} rows/s (on {old_rows} rows), ratio {new / old:.1f}x"
        )
        rows_out.append(
            f"| {date} | {git_commit()} | {machine} | {args.rows} | {args.regions} x {feature_dim} fp16 "
            f"| {args.batch_size} | {new:,.0f} | {old:,.0f} | {new / old:.1f}x |"
        )
    print(
        "\n| date | commit | machine | rows | regions x F | batch | vectorised rows/s | row-by-row rows/s | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_out))


if __name__ == "__main__":
    main()
