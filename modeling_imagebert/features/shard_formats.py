"""The files an extraction run writes for one shard of images, in three layouts, each written atomically.

- `dataset` (default): one Arrow file per shard (`shard-00000.arrow`, written with `datasets.arrow_writer`), rows
  in the image part of our schema (`data/schema.py`) plus the detector's attributes:

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

  `load_features(folder)` memory-maps all shards as one `datasets.Dataset`; `python -m
  modeling_imagebert.data.convert features FOLDER ...` joins it with captions.
- `butd-tsv`: one `shard-00000.tsv` per shard in the bottom-up-attention TSV layout of LXMERT / Oscar (no header;
  img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features; base64 of
  little-endian int64 / float32 buffers; float32 features), read by `data.importers.read_butd_tsv`.
- `npz`: one folder `shard-00000/` per shard of `<image_id>.npz` files with bottom-up-attention.pytorch keys (`x`,
  `bbox`, `image_w`, `image_h`, `num_bbox`, `objects_id`, `objects_conf`, `attrs_id`, `attrs_conf`, and
  `global_feature` when computed), read by `data.importers.read_npz_dir`.

Each shard is first written under a `.tmp-` name in the same folder and renamed into place when complete, so a
killed run leaves shards complete or absent (plus `.tmp-` leftovers that the next run removes).
"""

from __future__ import annotations

import base64
import csv
import io
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

OUTPUT_FORMATS = ("dataset", "butd-tsv", "npz")
TEMP_PREFIX = ".tmp-"
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def _file_mode() -> int:
    # mkstemp creates files readable by their owner only; give finished files the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def image_features_schema(feature_dim: int, with_global_feature: bool):
    """The `datasets.Features` of a `dataset`-format shard (see the module docstring)."""
    from datasets import Array2D, Features, Sequence, Value

    columns = {
        "image_id": Value("string"),
        "region_features": Array2D(shape=(None, feature_dim), dtype="float16"),
        "region_boxes": Array2D(shape=(None, 4), dtype="float32"),
        "image_width": Value("int32"),
        "image_height": Value("int32"),
        "region_classes": Sequence(Value("int32")),
        "region_scores": Sequence(Value("float32")),
        "region_attributes": Sequence(Value("int32")),
        "region_attribute_scores": Sequence(Value("float32")),
    }
    if with_global_feature:
        columns["global_feature"] = Sequence(Value("float32"))
    return Features(columns)


def detection_to_record(image_id: str, detection: Mapping, global_feature: np.ndarray | None = None) -> dict:
    """One image's detector output (`BUTDDetector.detect` dict) -> an image record with float32 features.

    Returns:
        {"image_id", "image_width", "image_height", "region_features" float32 (N, F), "region_boxes" float32
        (N, 4), "region_classes" int32 (N,), "region_scores" float32 (N,), "region_attributes" int32 (N,),
        "region_attribute_scores" float32 (N,)[, "global_feature" float32 (G,)]}.
    """
    record = {
        "image_id": image_id,
        "image_width": int(detection["image_width"]),
        "image_height": int(detection["image_height"]),
        "region_features": np.asarray(detection["features"], dtype=np.float32),
        "region_boxes": np.asarray(detection["boxes"], dtype=np.float32).reshape(-1, 4),
        "region_classes": np.asarray(detection["classes"]).astype(np.int32),
        "region_scores": np.asarray(detection["scores"], dtype=np.float32),
        "region_attributes": np.asarray(detection["attributes"]).astype(np.int32),
        "region_attribute_scores": np.asarray(detection["attribute_scores"], dtype=np.float32),
    }
    if global_feature is not None:
        record["global_feature"] = np.asarray(global_feature, dtype=np.float32)
    return record


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


def _temp_sibling(target: Path, directory: bool = False) -> Path:
    if directory:
        folder = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent))
        os.chmod(folder, _FILE_MODE | 0o111)
        return folder
    handle, name = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{target.name}-", dir=target.parent)
    os.close(handle)
    os.chmod(name, _FILE_MODE)
    return Path(name)


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary sibling and a rename."""
    temp = _temp_sibling(path)
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _write_dataset(records: Sequence[Mapping], temp: Path, feature_dim: int, with_global: bool) -> None:
    from datasets.arrow_writer import ArrowWriter

    writer = ArrowWriter(features=image_features_schema(feature_dim, with_global), path=str(temp))
    try:
        for record in records:
            row = dict(record)
            row["region_features"] = record["region_features"].astype(np.float16)
            writer.write(row)
        writer.finalize()
    finally:
        writer.close()


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(
        np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    ).decode()


def butd_tsv_row(record: Mapping) -> list[str]:
    """The 10 TSV columns of one record in the LXMERT / Oscar layout."""
    return [
        record["image_id"],
        str(record["image_height"]),
        str(record["image_width"]),
        _b64(record["region_classes"], "int64"),
        _b64(record["region_scores"], "float32"),
        _b64(record["region_attributes"], "int64"),
        _b64(record["region_attribute_scores"], "float32"),
        str(record["region_features"].shape[0]),
        _b64(record["region_boxes"], "float32"),
        _b64(record["region_features"], "float32"),
    ]


def _write_tsv(records: Sequence[Mapping], temp: Path) -> None:
    with open(temp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for record in records:
            writer.writerow(butd_tsv_row(record))


def _write_npz_folder(records: Sequence[Mapping], temp: Path) -> None:
    for record in records:
        arrays = {
            "x": record["region_features"],
            "bbox": record["region_boxes"],
            "image_w": np.int64(record["image_width"]),
            "image_h": np.int64(record["image_height"]),
            "num_bbox": np.int64(record["region_features"].shape[0]),
            "objects_id": record["region_classes"].astype(np.int64),
            "objects_conf": record["region_scores"],
            "attrs_id": record["region_attributes"].astype(np.int64),
            "attrs_conf": record["region_attribute_scores"],
        }
        if "global_feature" in record:
            arrays["global_feature"] = record["global_feature"]
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        (temp / f"{record['image_id']}.npz").write_bytes(buffer.getvalue())


def write_shard(
    records: Sequence[Mapping],
    target: Path,
    output_format: str,
    *,
    feature_dim: int,
    with_global_feature: bool,
) -> None:
    """Write one shard's records (from `detection_to_record`) to `target` atomically.

    Args:
        records: image records in the order they are to be stored.
        target: the shard's final path (`folder / shard_name(index, output_format)`).
        output_format: one of `OUTPUT_FORMATS`.
        feature_dim: F of the region features (the Arrow column type needs it even for an empty shard).
        with_global_feature: whether records carry `global_feature`.
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    directory = output_format == "npz"
    temp = _temp_sibling(target, directory=directory)
    try:
        if output_format == "dataset":
            _write_dataset(records, temp, feature_dim, with_global_feature)
        elif output_format == "butd-tsv":
            _write_tsv(records, temp)
        else:
            _write_npz_folder(records, temp)
        if directory and target.exists():  # a folder of an unfinished earlier attempt: ours, replaced
            shutil.rmtree(target)
        os.replace(temp, target)
    except BaseException:
        if directory:
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)
        raise


def read_shard_records(path: Path, output_format: str) -> Iterator[dict]:
    """Image records of one finished shard in the importers' layout (float16 region features, int32 classes;
    `global_feature` when stored), for joining with captions."""
    if output_format == "butd-tsv":
        from ..data.importers import read_butd_tsv

        yield from read_butd_tsv(path, show_progress=False)
    elif output_format == "npz":
        from ..data.importers import read_npz_dir

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
    "TEMP_PREFIX",
    "butd_tsv_row",
    "detection_to_record",
    "image_features_schema",
    "read_shard_records",
    "record_problem",
    "shard_name",
    "write_shard",
    "write_text_atomic",
]
