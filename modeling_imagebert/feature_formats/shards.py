"""The shards an extraction run writes, in three layouts, each written atomically and read back here.

- `dataset` (default): one Arrow file per shard (`shard-00000.arrow`, written with `datasets.arrow_writer`), rows
  in the image columns of our schema (`columns.py`) plus the detector's attributes:

  | column                  | type                        |
  |-------------------------|-----------------------------|
  | image_id                | string                      |
  | region_features         | Array2D (N, F) float16      |
  | region_boxes            | Array2D (N, 4) float32, pixel x1, y1, x2, y2 of the original image |
  | image_width, image_height | int32                     |
  | region_classes          | Sequence(int32), in [0, 1600) for the VG detector |
  | region_scores           | Sequence(float32)           |
  | region_attributes       | Sequence(int32), the best attribute per region |
  | region_attribute_scores | Sequence(float32)           |
  | global_feature          | Sequence(float32), only with a global model |

  `features_folder.load_features(folder)` memory-maps all shards as one `datasets.Dataset`; `python -m
  modeling_imagebert.data.convert features FOLDER ...` joins it with captions.
- `butd-tsv`: one `shard-00000.tsv` per shard in the bottom-up-attention TSV layout of LXMERT / Oscar
  (`butd_tsv.py`, float32 features).
- `npz`: one folder `shard-00000/` per shard of `<image_id>.npz` files with bottom-up-attention.pytorch keys
  (`npz.py`).

Each shard is first written inside a temporary sibling folder (`atomic.temporary_sibling`, a `.tmp-` name) and
renamed into place when complete, so a killed run leaves shards complete or absent (plus `.tmp-` leftovers that
the next run removes).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from ..atomic import move_into_place, temporary_sibling
from ..detection_imagebert import round_features_as_stored
from .butd_tsv import read_butd_tsv, write_butd_tsv
from .columns import GLOBAL_FEATURE_COLUMN, global_feature_column, image_columns
from .npz import read_npz_dir, write_npz_folder

OUTPUT_FORMATS = ("dataset", "butd-tsv", "npz")
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def image_features_schema(feature_dim: int, with_global_feature: bool):
    """The `datasets.Features` of a `dataset`-format shard (see the module docstring)."""
    from datasets import Features, Sequence, Value

    columns = image_columns(feature_dim)
    columns["region_attributes"] = Sequence(Value("int32"))
    columns["region_attribute_scores"] = Sequence(Value("float32"))
    if with_global_feature:
        columns[GLOBAL_FEATURE_COLUMN] = global_feature_column()
    return Features(columns)


def record_problem(record: Mapping, output_format: str) -> tuple[str, str] | None:
    """Why a record cannot be written, as (reason, message), or None. Images without regions are refused (the
    BUTD TSV cannot hold them and pre-training needs regions), and so are features float16 cannot hold."""
    features = record["region_features"]
    if features.shape[0] == 0:
        return "no_regions", "the detector kept no region for this image"
    if not np.isfinite(features).all():
        return "non_finite", "the detector returned NaN or infinite features"
    if output_format == "dataset" and np.abs(features).max() > _FLOAT16_MAX:
        return (
            "float16_overflow",
            f"a feature exceeds the float16 range (|value| {np.abs(features).max():.4g})",
        )
    return None


def shard_name(index: int, output_format: str) -> str:
    """File (or folder) name of shard `index`: shard-00000.arrow / .tsv / shard-00000 (npz folder)."""
    suffix = {"dataset": ".arrow", "butd-tsv": ".tsv", "npz": ""}[output_format]
    return f"shard-{index:05d}{suffix}"


def _write_dataset(records: Sequence[Mapping], path: Path, feature_dim: int, with_global: bool) -> None:
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=image_features_schema(feature_dim, with_global), path=str(path))
    try:
        for record in records:
            row = dict(record)
            row["region_features"] = round_features_as_stored(record["region_features"])
            writer.write(row)
        writer.finalize()
    finally:
        writer.close()


def write_shard(
    records: Sequence[Mapping],
    target: Path,
    output_format: str,
    *,
    feature_dim: int,
    with_global_feature: bool,
) -> None:
    """Write one shard's records to `target` atomically.

    Args:
        records: image records in the order they are to be stored: "image_id", "image_width", "image_height",
            "region_features" float32 (N, F), "region_boxes" float32 (N, 4), "region_classes" int32 (N,),
            "region_scores" float32 (N,), "region_attributes" int32 (N,), "region_attribute_scores" float32 (N,)
            [, "global_feature" float32 (G,)].
        target: the shard's final path (`folder / shard_name(index, output_format)`).
        output_format: one of `OUTPUT_FORMATS`.
        feature_dim: F of the region features (the Arrow column type needs it even for an empty shard).
        with_global_feature: whether records carry `global_feature`.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    # The shard is built inside a temporary folder beside `target` (same file system: the rename is atomic), and
    # created there with the usual umask-based modes, as any file the user writes.
    staging = temporary_sibling(target)
    try:
        built = staging / target.name
        if output_format == "dataset":
            _write_dataset(records, built, feature_dim, with_global_feature)
        elif output_format == "butd-tsv":
            write_butd_tsv(records, built)
        else:
            built.mkdir()
            write_npz_folder(records, built)
        if (
            output_format == "npz" and target.exists()
        ):  # a folder of an unfinished earlier attempt: ours, replaced
            shutil.rmtree(target)
        move_into_place(built, target)  # refuses a symlink or special file planted at the shard's name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_shard_records(path: Path, output_format: str) -> Iterator[dict]:
    """Image records of one finished shard in the importers' layout (float16 region features, int32 classes;
    `global_feature` when stored), for joining with captions."""
    if output_format == "butd-tsv":
        yield from read_butd_tsv(path, show_progress=False)
    elif output_format == "npz":
        for record in read_npz_dir(path, show_progress=False):
            stored = np.load(path / f"{record['image_id']}.npz")
            if "global_feature" in stored.files:
                record["global_feature"] = stored["global_feature"].astype(np.float32)
            yield record
    else:
        import datasets

        dataset = datasets.Dataset.from_file(str(path)).with_format("numpy", dtype=None)
        keep = [c for c in dataset.column_names if c not in ("region_attributes", "region_attribute_scores")]
        for row in dataset.select_columns(keep):
            record = dict(row)
            record["image_id"] = str(record["image_id"])
            record["image_width"] = int(record["image_width"])
            record["image_height"] = int(record["image_height"])
            record["region_features"] = np.asarray(record["region_features"], dtype=np.float16).reshape(
                -1, dataset.features["region_features"].shape[1]
            )
            record["region_boxes"] = np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)
            yield record


__all__ = [
    "OUTPUT_FORMATS",
    "image_features_schema",
    "read_shard_records",
    "record_problem",
    "shard_name",
    "write_shard",
]
