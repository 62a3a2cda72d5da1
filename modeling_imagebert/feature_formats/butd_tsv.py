"""The bottom-up-attention TSV of LXMERT / Oscar: its reader and its writer.

No header; one image per line, tab-separated columns img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
attrs_conf, num_boxes, boxes, features. Array columns are base64 of raw little-endian numpy buffers (int64,
float32, int64, float32, float32 [N, 4] pixel x1, y1, x2, y2, float32 [N, F]).

`read_butd_tsv` yields image records (float16 features, see `decode_butd_row`); `write_butd_tsv` writes the
records of an extraction run (`features/runner.py`) in the same layout, so the two stay one format.
"""

from __future__ import annotations

import base64
import binascii
import csv
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .report import ImportFormatError, ImportReport, check_on_error, log_skips
from .values import parse_int, to_float16_features, to_int32

BUTD_TSV_COLUMNS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)


def _decode_b64_array(
    text: str, dtype: type, *, source: Any, line: int | None, image_id: str, column: str
) -> np.ndarray:
    # Some Python 3 ports of generate_tsv.py wrote str(bytes), i.e. "b'....'": accept that variant.
    if text.startswith(("b'", 'b"')) and text.endswith(text[1]) and len(text) >= 3:
        text = text[2:-1]
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImportFormatError(
            f"invalid or truncated base64 ({len(text)} characters): {error}",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="bad_base64",
        ) from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        raise ImportFormatError(
            f"decoded buffer of {len(raw)} bytes is not a whole number of {np.dtype(dtype).name} values",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="buffer_length",
        )
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def decode_butd_row(
    row: list[str] | Mapping[str, str],
    *,
    feature_dim: int | None = None,
    source: str | os.PathLike | None = None,
    line: int | None = None,
) -> dict:
    """Decode one bottom-up-attention TSV row into an image record.

    Args:
        row: the 10 column strings in `BUTD_TSV_COLUMNS` order, or a mapping from those column names.
        feature_dim: F expected; None infers it from the buffer length (len / 4 / num_boxes).
        source, line: where the row came from, for error messages.

    Returns:
        {"image_id", "image_width", "image_height", "region_features" float16 [N, F],
        "region_boxes" float32 [N, 4] pixel x1y1x2y2, "region_classes" int32 [N] (objects_id),
        "region_scores" float32 [N] (objects_conf)}. Attribute columns are checked and dropped.

    Raises:
        ImportFormatError naming source, line, img_id and the column.
    """
    if isinstance(row, Mapping):
        missing = [c for c in BUTD_TSV_COLUMNS if c not in row]
        if missing:
            raise ImportFormatError(
                f"missing columns {missing}",
                source=source,
                line=line,
                field=missing[0],
                reason="column_count",
            )
        values = {c: row[c] for c in BUTD_TSV_COLUMNS}
    else:
        if len(row) != len(BUTD_TSV_COLUMNS):
            image_id = row[0] if row else None
            hint = ""
            if len(row) == 6:
                hint = (
                    " (this looks like the 6-column generate_tsv.py format image_id, image_w, image_h, "
                    "num_boxes, boxes, features, which has no object classes; ImageBERT needs them for MOC)"
                )
            raise ImportFormatError(
                f"expected {len(BUTD_TSV_COLUMNS)} tab-separated columns {list(BUTD_TSV_COLUMNS)}, "
                f"got {len(row)}{hint}",
                source=source,
                line=line,
                image_id=image_id,
                reason="column_count",
            )
        values = dict(zip(BUTD_TSV_COLUMNS, row, strict=True))

    image_id = values["img_id"]
    if not image_id:
        raise ImportFormatError("empty img_id", source=source, line=line, field="img_id", reason="bad_id")
    where = {"source": source, "line": line, "image_id": image_id}
    height = parse_int(values["img_h"], column="img_h", **where)
    width = parse_int(values["img_w"], column="img_w", **where)
    num_boxes = parse_int(values["num_boxes"], column="num_boxes", **where)
    for column, value in (("img_h", height), ("img_w", width), ("num_boxes", num_boxes)):
        if value <= 0:
            raise ImportFormatError(
                f"must be positive, got {value}", field=column, reason="bad_count", **where
            )

    decoded = {}
    for column, dtype, per_box in (
        ("objects_id", np.int64, 1),
        ("objects_conf", np.float32, 1),
        ("attrs_id", np.int64, 1),
        ("attrs_conf", np.float32, 1),
        ("boxes", np.float32, 4),
    ):
        array = _decode_b64_array(values[column], dtype, column=column, **where)
        if array.size != num_boxes * per_box:
            raise ImportFormatError(
                f"expected num_boxes * {per_box} = {num_boxes * per_box} values, got {array.size}",
                field=column,
                reason="buffer_length",
                **where,
            )
        decoded[column] = array.reshape((num_boxes, 4) if per_box == 4 else (num_boxes,))

    features = _decode_b64_array(values["features"], np.float32, column="features", **where)
    if feature_dim is not None:
        if features.size != num_boxes * feature_dim:
            raise ImportFormatError(
                f"expected num_boxes * feature_dim = {num_boxes} * {feature_dim} = {num_boxes * feature_dim} "
                f"float32 values, got {features.size}",
                field="features",
                reason="buffer_length",
                **where,
            )
    elif features.size % num_boxes or features.size == 0:
        raise ImportFormatError(
            f"{features.size} float32 values cannot be split into num_boxes={num_boxes} equal rows",
            field="features",
            reason="buffer_length",
            **where,
        )
    features = features.reshape(num_boxes, -1)

    scores = decoded["objects_conf"].astype(np.float32)
    if not np.isfinite(scores).all():
        raise ImportFormatError("non-finite confidences", field="objects_conf", reason="non_finite", **where)
    boxes = decoded["boxes"].astype(np.float32)
    if not np.isfinite(boxes).all():
        raise ImportFormatError("non-finite boxes", field="boxes", reason="non_finite", **where)
    return {
        "image_id": image_id,
        "image_width": width,
        "image_height": height,
        "region_features": to_float16_features(features, column="features", **where),
        "region_boxes": boxes,
        "region_classes": to_int32(decoded["objects_id"], column="objects_id", **where),
        "region_scores": scores,
    }


def _has_surrogate(text: str) -> bool:
    """True when `text` holds a byte that was not UTF-8 (decoded with errors="surrogateescape")."""
    return not text.isascii() and any("\udc80" <= char <= "\udcff" for char in text)


def _raise_csv_field_limit() -> None:
    # BUTD rows hold ~100 x 2048 float32 as base64 (~1 MB per field), far beyond csv's 128 KiB default.
    limit = sys.maxsize
    while True:
        try:
            if csv.field_size_limit() < limit:
                csv.field_size_limit(limit)
            return
        except OverflowError:  # C long is 32 bits on some platforms
            limit //= 2


def read_butd_tsv(
    path: str | os.PathLike,
    *,
    feature_dim: int | None = None,
    on_error: str = "raise",
    report: ImportReport | None = None,
    show_progress: bool = True,
) -> Iterator[dict]:
    """Yield the image records of one bottom-up-attention TSV file (LXMERT / Oscar layout, no header).

    Args:
        path: the `.tsv` file.
        feature_dim: F expected in every row; None infers it per row.
        on_error: "raise" stops at the first bad row with an `ImportFormatError` naming file, line number,
            img_id and column; "skip" skips the row, counts it in `report` by reason, and logs a warning
            with the counts at the end of the file.
        report: collects images read and skips; a fresh one is used (and logged) when None.

    Yields:
        image records, see `decode_butd_row`: region_features float16 [N, F], region_boxes float32 [N, 4].
    """
    check_on_error(on_error)
    report = ImportReport() if report is None else report
    before = report.skipped.copy()
    _raise_csv_field_limit()
    # Undecodable bytes become lone surrogates instead of a UnicodeDecodeError from deep inside csv (which could
    # name no line and would end the file in skip mode); rows holding one are refused by line below.
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as handle:
        reader = csv.reader(handle, delimiter="\t")
        bar = tqdm(desc=f"reading {Path(path).name}", unit="img", disable=not show_progress)
        try:
            while True:
                try:
                    row = next(reader)
                except StopIteration:
                    break
                except csv.Error as error:
                    failure = ImportFormatError(
                        f"unreadable TSV row: {error}", source=path, line=reader.line_num, reason="bad_row"
                    )
                    if on_error == "raise":
                        raise failure from None
                    report.skip(failure.reason, str(failure))
                    continue
                if not row or row == [""]:
                    continue
                bad = next((i for i, text in enumerate(row[:8]) if _has_surrogate(text)), None)
                if bad is not None:
                    failure = ImportFormatError(
                        "not UTF-8 text (undecodable bytes); the file is corrupt or not a BUTD TSV",
                        source=path,
                        line=reader.line_num,
                        field=BUTD_TSV_COLUMNS[bad],
                        reason="bad_encoding",
                    )
                    report.skip_or_raise(failure, on_error)
                    continue
                try:
                    record = decode_butd_row(row, feature_dim=feature_dim, source=path, line=reader.line_num)
                except ImportFormatError as failure:
                    report.skip_or_raise(failure, on_error)
                    continue
                report.images_read += 1
                bar.update(1)
                yield record
        finally:
            bar.close()
    log_skips(report, str(path), before)


def _b64(array: np.ndarray, dtype: str) -> str:
    return base64.b64encode(
        np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()
    ).decode()


def butd_tsv_row(record: Mapping) -> list[str]:
    """The 10 TSV columns of one image record (`features/runner.py`'s layout, float32 features) in the LXMERT /
    Oscar layout."""
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


def write_butd_tsv(records: Iterable[Mapping], path: str | os.PathLike) -> None:
    """Writes one TSV line per record (see `butd_tsv_row`) to `path`, in the order given. Not atomic by itself:
    `shards.write_shard` writes it under a temporary name."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        for record in records:
            writer.writerow(butd_tsv_row(record))


__all__ = ["BUTD_TSV_COLUMNS", "butd_tsv_row", "decode_butd_row", "read_butd_tsv", "write_butd_tsv"]
