"""Importers: read detector features and captions from their standard files into the image-text schema.

Every format is read by a function of one record (one TSV row, one `.npz` file, one caption entry) wrapped
by a generator over a file or folder, so the record functions can also run under `datasets.map` or a
cluster engine. Image records (the features of one image) are plain dicts:

    {"image_id": str, "image_width": int, "image_height": int,
     "region_features": float16 [N, F], "region_boxes": float32 [N, 4] (pixel x1, y1, x2, y2),
     "region_classes": int32 [N], "region_scores": float32 [N]}

Captions are `(image_id, caption)` pairs. `build_pair_dataset` joins both into a `datasets.Dataset` in the
schema of `modeling_imagebert.data.schema.image_text_features` (one row per caption).

Bad input raises `ImportFormatError` naming the file, the line or record, the image id and the field; with
`on_error="skip"` the record is skipped instead, counted by reason in an `ImportReport` and logged, never
silently dropped.

Formats:

- bottom-up-attention TSV as written for LXMERT / Oscar (`read_butd_tsv`): no header, tab-separated columns
  img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features; array
  columns are base64 of raw little-endian numpy buffers (int64, float32, int64, float32, float32 [N, 4],
  float32 [N, F]).
- a folder of per-image `.npz` files (`read_npz_dir`): UNITER (`features`, `norm_bb`, `conf`,
  `soft_labels`) and bottom-up-attention.pytorch (`x`, `bbox`, `image_w`, `image_h`, `info`) key variants.
- Karpathy-split caption JSON for Flickr30k and COCO (`read_karpathy_captions`).
- Conceptual Captions TSV (`read_cc_captions`) and SBU captions + URL files (`read_sbu_captions`).
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import json
import logging
import os
import sys
import uuid
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..safe_loading import NUMPY_ARRAYS, PLAIN_VALUES, RestrictedUnpickler

logger = logging.getLogger(__name__)

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
_ON_ERROR = ("raise", "skip")
_KARPATHY_SPLITS = ("train", "val", "test", "restval")
_MAX_REPORT_MESSAGES = 20


class ImportFormatError(ValueError):
    """A source file does not hold what its format promises.

    The message is one line naming the file, the line or record, the image id and the field; the same facts
    are kept as attributes (`source`, `line`, `image_id`, `field`, `reason`) for programmatic use. `reason`
    is a short key (e.g. "bad_base64") used to count skips in an `ImportReport`.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | os.PathLike | None = None,
        line: int | None = None,
        image_id: str | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ):
        self.source = None if source is None else str(source)
        self.line = line
        self.image_id = image_id
        self.field = field
        self.reason = reason
        where = []
        if self.source is not None:
            where.append(self.source + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if image_id is not None:
            where.append(f"image_id={image_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        full = f"{prefix}: {message}" if prefix else message
        super().__init__(" ".join(full.split("\n")))


@dataclass
class ImportReport:
    """Counts of what an import read, wrote and skipped, by reason.

    Pass one instance to the readers and to `build_pair_dataset` to collect everything in one place.
    `skipped` maps a reason key (e.g. "bad_base64", "missing_image", "duplicate_image_id") to a count;
    `messages` keeps the first few full error messages for each reason.
    """

    images_read: int = 0
    captions_read: int = 0
    rows_written: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped record under `reason` and keep its message (the first few per reason)."""
        self.skipped[reason] += 1
        kept = self.messages.setdefault(reason, [])
        if len(kept) < _MAX_REPORT_MESSAGES:
            kept.append(message)

    def skip_or_raise(self, failure: ImportFormatError, on_error: str) -> None:
        """With `on_error="raise"` re-raise `failure`; otherwise count it as a skip (see `skip`)."""
        if on_error == "raise":
            raise failure
        self.skip(failure.reason, str(failure))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """A short multi-line human-readable summary."""
        lines = [
            f"images read: {self.images_read}",
            f"captions read: {self.captions_read}",
            f"rows written: {self.rows_written}",
        ]
        if self.skipped:
            lines.append(f"skipped: {self.total_skipped}")
            for reason, count in sorted(self.skipped.items()):
                example = self.messages.get(reason, [""])[0]
                lines.append(f"  {reason}: {count}" + (f" (first: {example})" if example else ""))
        else:
            lines.append("skipped: 0")
        return "\n".join(lines)


def _check_on_error(on_error: str, name: str = "on_error") -> None:
    if on_error not in _ON_ERROR:
        raise ValueError(f"{name} must be one of {_ON_ERROR}, got {on_error!r}")


def _log_skips(report: ImportReport, what: str, before: Counter) -> None:
    new = report.skipped - before
    if new:
        details = ", ".join(f"{reason}: {count}" for reason, count in sorted(new.items()))
        logger.warning("%s: skipped %d record(s) (%s)", what, sum(new.values()), details)


def _to_float16_features(
    features: np.ndarray, *, source: Any, line: int | None, image_id: str, column: str
) -> np.ndarray:
    """Cast float32 features to float16, refusing non-finite values and values float16 cannot hold."""
    features = np.asarray(features)
    if not np.issubdtype(features.dtype, np.floating):
        raise ImportFormatError(
            f"features must be floating point, got dtype {features.dtype}",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="bad_features",
        )
    if not np.isfinite(features).all():
        raise ImportFormatError(
            "features contain NaN or infinity",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="non_finite",
        )
    with np.errstate(over="ignore"):
        half = features.astype(np.float16)
    if not np.isfinite(half).all():
        raise ImportFormatError(
            f"features exceed the float16 range (max |value| {float(np.abs(features).max()):.4g} > 65504)",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="float16_overflow",
        )
    return half


def _to_int32(values: np.ndarray, *, source: Any, line: int | None, image_id: str, column: str) -> np.ndarray:
    values = np.asarray(values)
    if values.size and (values.min() < np.iinfo(np.int32).min or values.max() > np.iinfo(np.int32).max):
        raise ImportFormatError(
            "class ids do not fit in int32",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="bad_classes",
        )
    return values.astype(np.int32)


# --------------------------------------------------------------------------------------------------------
# bottom-up-attention TSV (LXMERT / Oscar)
# --------------------------------------------------------------------------------------------------------


def _parse_int(text: str, *, source: Any, line: int | None, image_id: str | None, column: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (np.isfinite(value) and value == int(value)):
        raise ImportFormatError(
            f"expected an integer, got {text[:40]!r}",
            source=source,
            line=line,
            image_id=image_id,
            field=column,
            reason="bad_count",
        )
    return int(value)


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
    height = _parse_int(values["img_h"], column="img_h", **where)
    width = _parse_int(values["img_w"], column="img_w", **where)
    num_boxes = _parse_int(values["num_boxes"], column="num_boxes", **where)
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
        "region_features": _to_float16_features(features, column="features", **where),
        "region_boxes": boxes,
        "region_classes": _to_int32(decoded["objects_id"], column="objects_id", **where),
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
    _check_on_error(on_error)
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
    _log_skips(report, str(path), before)


# --------------------------------------------------------------------------------------------------------
# per-image .npz folders (UNITER, bottom-up-attention.pytorch)
# --------------------------------------------------------------------------------------------------------

_INFO_HINT = (
    " (a pickled 'info' dict is present: pass allow_pickle=True / --allow-pickle to read it through a restricted "
    "unpickler)"
)
_NPZ_FEATURE_KEYS = ("features", "x")
_NPZ_PIXEL_BOX_KEYS = ("boxes", "bbox")
_NPZ_SCORE_KEYS = ("conf", "scores", "objects_conf")
_NPZ_CLASS_KEYS = ("objects_id", "classes", "cls")
_NPZ_SIZE_KEYS = (("image_w", "image_h"), ("img_w", "img_h"))


def _first_key(keys: Iterable[str], available: Iterable[str]) -> str | None:
    available = set(available)
    return next((key for key in keys if key in available), None)


def decode_npz_record(
    arrays: Mapping[str, Any],
    image_id: str,
    *,
    feature_dim: int | None = None,
    image_size: tuple[int, int] | None = None,
    source: str | os.PathLike | None = None,
) -> dict:
    """Decode the arrays of one per-image `.npz` into an image record.

    Key variants (first present wins):
        features: `features` (UNITER) or `x` (bottom-up-attention.pytorch), float [N, F];
        boxes: pixel `boxes` / `bbox` [N, 4] x1y1x2y2, or UNITER's normalised `norm_bb` [N, 6 or 7]
            (x1, y1, x2, y2, w, h[, area] in [0, 1]; scaled back to pixels with the image size);
        image size: `image_w`/`image_h` or `img_w`/`img_h`, else `image_size` = (W, H), else an error;
        scores: `conf` / `scores` / `objects_conf`, else `info["objects_conf"]`, else the max of
            `soft_labels[:, 1:]`;
        classes: `objects_id` / `classes` / `cls`, else `info["objects_id"]`, else
            argmax of `soft_labels[:, 1:]` (column 0 of soft_labels is background, so class ids are 0-based
            object classes, the convention of LXMERT's objects_id).

    Args:
        arrays: a mapping of key -> array (an opened `np.load` result or a plain dict).
        image_id: id of the image (the file stem for folders).
        image_size: (width, height) in pixels, used when the file does not carry its size.

    Returns:
        an image record (see module docstring).
    """
    keys = list(arrays.keys())
    where = {"source": source, "line": None, "image_id": image_id}

    def fail(message: str, key: str | None, reason: str) -> ImportFormatError:
        return ImportFormatError(
            f"{message} (keys present: {sorted(keys)})", field=key, reason=reason, **where
        )

    info: Mapping | None = None
    if "info" in keys:
        try:
            loaded = np.asarray(arrays["info"])
        except ImportFormatError:
            raise
        except ValueError as error:  # np.load(allow_pickle=False) refuses the pickled dict
            if "pickle" in str(error).lower():
                loaded = None
            else:
                raise
        if loaded is not None and loaded.dtype == object and loaded.shape == ():
            info = loaded.item() if isinstance(loaded.item(), Mapping) else None

    feature_key = _first_key(_NPZ_FEATURE_KEYS, keys)
    if feature_key is None:
        raise fail(f"no region features: expected one of {list(_NPZ_FEATURE_KEYS)}", None, "missing_key")
    features = np.asarray(arrays[feature_key])
    if features.ndim != 2 or features.shape[0] == 0:
        raise fail(
            f"features must be [N, F] with N > 0, got shape {features.shape}", feature_key, "bad_shape"
        )
    num_boxes = features.shape[0]
    if feature_dim is not None and features.shape[1] != feature_dim:
        raise fail(f"expected feature_dim {feature_dim}, got {features.shape[1]}", feature_key, "bad_shape")

    width = height = None
    for w_key, h_key in _NPZ_SIZE_KEYS:
        if w_key in keys and h_key in keys:
            width = _scalar_int(arrays[w_key], w_key, where)
            height = _scalar_int(arrays[h_key], h_key, where)
            break
    else:
        if info is not None and "image_w" in info and "image_h" in info:
            width = _scalar_int(info["image_w"], "info.image_w", where)
            height = _scalar_int(info["image_h"], "info.image_h", where)
        elif image_size is not None:
            width, height = int(image_size[0]), int(image_size[1])
    if width is not None and (width <= 0 or height <= 0):
        raise fail(f"image size must be positive, got {width} x {height}", "image_w", "bad_count")

    box_key = _first_key(_NPZ_PIXEL_BOX_KEYS, keys)
    if box_key is not None:
        boxes = np.asarray(arrays[box_key], dtype=np.float32)
        if boxes.shape != (num_boxes, 4):
            raise fail(
                f"expected pixel boxes of shape ({num_boxes}, 4), got {boxes.shape}", box_key, "bad_shape"
            )
        if width is None:
            raise fail(
                "no image size: expected image_w/image_h or img_w/img_h in the file, or pass image_size",
                "image_w",
                "missing_size",
            )
    elif "norm_bb" in keys:
        norm = np.asarray(arrays["norm_bb"], dtype=np.float32)
        if norm.ndim != 2 or norm.shape[0] != num_boxes or norm.shape[1] not in (4, 6, 7):
            raise fail(
                f"expected norm_bb of shape ({num_boxes}, 6 or 7) (x1, y1, x2, y2, w, h[, area]), got {norm.shape}",
                "norm_bb",
                "bad_shape",
            )
        if width is None:
            raise fail(
                "norm_bb holds normalised boxes but the file has no image size (image_w/image_h or "
                "img_w/img_h): pass image_size=(W, H) (--image-size W H on the command line)",
                "norm_bb",
                "missing_size",
            )
        boxes = norm[:, :4] * np.array([width, height, width, height], dtype=np.float32)
    else:
        raise fail(
            f"no boxes: expected one of {list(_NPZ_PIXEL_BOX_KEYS) + ['norm_bb']}", None, "missing_key"
        )
    if not np.isfinite(boxes).all():
        raise fail("non-finite boxes", box_key or "norm_bb", "non_finite")

    soft = None
    if "soft_labels" in keys:
        soft = np.asarray(arrays["soft_labels"], dtype=np.float32)
        if soft.ndim != 2 or soft.shape[0] != num_boxes or soft.shape[1] < 2:
            raise fail(
                f"expected soft_labels of shape ({num_boxes}, K+1), got {soft.shape}",
                "soft_labels",
                "bad_shape",
            )

    def lookup(names: tuple[str, ...], info_name: str) -> tuple[str | None, Any]:
        key = _first_key(names, keys)
        if key is not None:
            return key, arrays[key]
        if info is not None and info_name in info:
            return f"info.{info_name}", info[info_name]
        return None, None

    score_key, scores = lookup(_NPZ_SCORE_KEYS, "objects_conf")
    if score_key is None and soft is not None:
        score_key, scores = "soft_labels", soft[:, 1:].max(axis=1)
    if score_key is None:
        hint = _INFO_HINT if "info" in keys else ""
        raise fail(
            f"no confidences: expected one of {list(_NPZ_SCORE_KEYS)} or soft_labels{hint}",
            None,
            "missing_key",
        )
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if scores.shape != (num_boxes,):
        raise fail(f"expected {num_boxes} confidences, got {scores.shape}", score_key, "bad_shape")
    if not np.isfinite(scores).all():
        raise fail("non-finite confidences", score_key, "non_finite")

    class_key, classes = lookup(_NPZ_CLASS_KEYS, "objects_id")
    if class_key is None and soft is not None:
        class_key, classes = "soft_labels", soft[:, 1:].argmax(axis=1)
    if class_key is None:
        hint = _INFO_HINT if "info" in keys else ""
        raise fail(
            f"no classes: expected one of {list(_NPZ_CLASS_KEYS)} or soft_labels{hint}", None, "missing_key"
        )
    classes = np.asarray(classes).reshape(-1)
    if classes.shape != (num_boxes,) or not (
        np.issubdtype(classes.dtype, np.integer) or np.all(np.equal(np.mod(classes, 1), 0))
    ):
        raise fail(
            f"expected {num_boxes} integer class ids, got {classes.dtype} {classes.shape}",
            class_key,
            "bad_classes",
        )

    return {
        "image_id": image_id,
        "image_width": width,
        "image_height": height,
        "region_features": _to_float16_features(features, column=feature_key, **where),
        "region_boxes": boxes.astype(np.float32),
        "region_classes": _to_int32(classes.astype(np.int64), column=class_key, **where),
        "region_scores": scores,
    }


def _scalar_int(value: Any, key: str, where: dict) -> int:
    array = np.asarray(value)
    if array.size != 1:
        raise ImportFormatError(
            f"expected a scalar, got shape {array.shape}", field=key, reason="bad_count", **where
        )
    return _parse_int(str(array.reshape(()).item()), column=key, **where)


_ZIP_MAGIC = b"PK\x03\x04"


def _read_info_entry(archive: zipfile.ZipFile, path: Path) -> Any:
    """The `info` entry of an .npz, its pickle read by a `RestrictedUnpickler` admitting what a dict of numbers
    and numeric arrays pickles to, nothing that can run code (never `pickle.load`)."""
    with archive.open("info.npy") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version == (2, 0):
            _shape, _fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy format version {version} of the info entry")
        if not dtype.hasobject:
            return np.lib.format.read_array(handle, allow_pickle=False)
        try:
            return RestrictedUnpickler(
                handle, allowed=NUMPY_ARRAYS | PLAIN_VALUES, admits="plain containers and numbers"
            ).load()
        except Exception as error:
            raise ImportFormatError(
                f"the pickled 'info' entry cannot be read safely: {error}",
                source=path,
                image_id=path.stem,
                field="info",
                reason="unsafe_pickle",
            ) from None


class _NpzEntries(Mapping):
    """The arrays of an opened .npz (loaded with allow_pickle=False); `info` is read by the restricted unpickler
    when `allow_pickle` is True and refused otherwise."""

    def __init__(self, arrays: Any, path: Path, allow_pickle: bool):
        self.arrays, self.path, self.allow_pickle = arrays, path, allow_pickle

    def __getitem__(self, key: str) -> Any:
        if key != "info":
            return self.arrays[key]
        if not self.allow_pickle:
            raise ValueError("pickled info entry not read: allow_pickle is off")
        return _read_info_entry(self.arrays.zip, self.path)

    def __iter__(self) -> Iterator[str]:
        return iter(self.arrays.files)

    def __len__(self) -> int:
        return len(self.arrays.files)


def read_npz_file(
    path: str | os.PathLike,
    *,
    feature_dim: int | None = None,
    image_size: tuple[int, int] | None = None,
    allow_pickle: bool = False,
) -> dict:
    """Read one per-image `.npz` file into an image record (image_id = file stem); see `decode_npz_record`.

    Every array is read with numpy's `allow_pickle=False`. `allow_pickle=True` reads the `info` entry of a
    bottom-up-attention.pytorch dump (classes, confidences) through a restricted unpickler that admits only plain
    containers, numbers, strings and numeric arrays; nothing else is ever unpickled, and a file that is not a zip
    archive (e.g. a raw pickle named `.npz`) is refused before numpy opens it.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(len(_ZIP_MAGIC))
    except OSError as error:
        raise ImportFormatError(
            f"cannot read the file: {error.strerror or error}",
            source=path,
            image_id=path.stem,
            reason="unreadable_file",
        ) from None
    if magic != _ZIP_MAGIC:
        raise ImportFormatError(
            "not an .npz (zip) archive; refusing to read it (a raw pickle or a truncated file?)",
            source=path,
            image_id=path.stem,
            reason="unreadable_file",
        )
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return decode_npz_record(
                _NpzEntries(arrays, path, allow_pickle),
                path.stem,
                feature_dim=feature_dim,
                image_size=image_size,
                source=path,
            )
    except ImportFormatError:
        raise
    except Exception as error:  # zip / header corruption surfaces as many exception types
        message = str(error).split("\n")[0]
        if "allow_pickle" in message:  # numpy's advice to enable pickle is not advice we give
            message = "an entry holds pickled Python objects, which are never read"
        raise ImportFormatError(
            f"unreadable .npz file: {type(error).__name__}: {message}",
            source=path,
            image_id=path.stem,
            reason="unreadable_file",
        ) from None


def read_npz_dir(
    folder: str | os.PathLike,
    *,
    feature_dim: int | None = None,
    image_size: tuple[int, int] | None = None,
    image_sizes: Mapping[str, tuple[int, int]] | None = None,
    allow_pickle: bool = False,
    on_error: str = "raise",
    report: ImportReport | None = None,
    show_progress: bool = True,
) -> Iterator[dict]:
    """Yield the image records of a folder of per-image `.npz` files, in sorted file-name order.

    Args:
        folder: directory holding `<image_id>.npz` files (not searched recursively).
        feature_dim: F expected; None accepts any.
        image_size: (W, H) for every file without its own size (needed with normalised `norm_bb` boxes).
        image_sizes: per-image (W, H) by image id, taking precedence over `image_size`.
        allow_pickle: read the pickled `info` dict of bottom-up-attention.pytorch dumps through a restricted
            unpickler (plain containers, numbers, numeric arrays); nothing else is ever unpickled.
        on_error: "raise" or "skip" (counted in `report` by reason and logged).

    Yields:
        image records, see `decode_npz_record`.
    """
    _check_on_error(on_error)
    folder = Path(folder)
    if not folder.is_dir():
        raise ImportFormatError("not a directory", source=folder, reason="missing_file")
    report = ImportReport() if report is None else report
    before = report.skipped.copy()
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise ImportFormatError("no .npz files in the folder", source=folder, reason="missing_file")
    for path in tqdm(files, desc=f"reading {folder.name}", unit="img", disable=not show_progress):
        size = image_sizes.get(path.stem, image_size) if image_sizes is not None else image_size
        try:
            record = read_npz_file(path, feature_dim=feature_dim, image_size=size, allow_pickle=allow_pickle)
        except ImportFormatError as failure:
            report.skip_or_raise(failure, on_error)
            continue
        report.images_read += 1
        yield record
    _log_skips(report, str(folder), before)


# --------------------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------------------

KARPATHY_IMAGE_ID_STYLES = ("filename", "cocoid", "imgid")


def karpathy_image_id(entry: Mapping, style: str = "filename") -> str:
    """The image id of one Karpathy-split image entry, used to join with features.

    Styles:
        "filename": the file-name stem: Flickr30k "1000092795" (from "1000092795.jpg"); COCO
            "COCO_val2014_000000391895", the name LXMERT / Oscar TSVs use as img_id.
        "cocoid": COCO's numeric image id as a string ("391895"), the name used by detectron-style dumps.
        "imgid": Karpathy's running index within the JSON file (rarely used by feature files).
    """
    if style == "filename":
        if "filename" not in entry:
            raise KeyError("filename")
        return Path(str(entry["filename"])).stem
    if style in ("cocoid", "imgid"):
        if style not in entry:
            raise KeyError(style)
        return str(entry[style])
    raise ValueError(f"image_id_style must be one of {KARPATHY_IMAGE_ID_STYLES}, got {style!r}")


def read_karpathy_captions(
    path: str | os.PathLike,
    split: str | Iterable[str],
    *,
    image_id_style: str = "filename",
    restval_as_train: bool = True,
    on_duplicate: str = "raise",
    report: ImportReport | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield (image_id, caption) pairs of one split of a Karpathy-split JSON (`dataset_flickr30k.json`,
    `dataset_coco.json`, `dataset_flickr8k.json`).

    Args:
        path: the JSON file {"images": [{"filename", "imgid", "split", "sentences": [{"raw", ...}], ...}],
            "dataset"}.
        split: "train", "val", "test" or "restval", or several of them.
        image_id_style: how image ids are formed, see `karpathy_image_id` ("filename" by default, which
            matches LXMERT/Oscar TSV img_ids for COCO and Flickr feature file names).
        restval_as_train: with split "train", also yield COCO's "restval" images (the usual 113k train set).
        on_duplicate: two image entries with the same image id or file name (in any split: the same image in
            train and test is a leak too) would merge two images' captions: "raise" (default) stops naming both
            entries; "skip" keeps the first entry's captions and counts the later entry as "duplicate_image_entry".
        report: counts captions read and duplicate entries skipped.

    Yields:
        (image_id, caption) with the caption taken from `raw`, surrounding whitespace stripped.
    """
    splits = {split} if isinstance(split, str) else set(split)
    unknown = splits - set(_KARPATHY_SPLITS)
    if unknown or not splits:
        raise ValueError(f"split must be among {_KARPATHY_SPLITS}, got {sorted(unknown) or split!r}")
    if image_id_style not in KARPATHY_IMAGE_ID_STYLES:
        raise ValueError(f"image_id_style must be one of {KARPATHY_IMAGE_ID_STYLES}, got {image_id_style!r}")
    if restval_as_train and "train" in splits:
        splits.add("restval")
    _check_on_error(on_duplicate, "on_duplicate")
    report = ImportReport() if report is None else report
    try:
        raw_bytes = Path(path).read_bytes()
    except OSError as error:
        raise ImportFormatError(
            f"cannot read the file: {error.strerror or error}", source=path, reason="missing_file"
        ) from None
    try:
        data = json.loads(_decode_text(raw_bytes, path))
    except json.JSONDecodeError as error:
        raise ImportFormatError(
            f"invalid JSON: {error.msg} (column {error.colno})",
            source=path,
            line=error.lineno,
            reason="bad_json",
        ) from None
    if not isinstance(data, Mapping) or not isinstance(data.get("images"), list):
        raise ImportFormatError(
            "expected a JSON object with an 'images' list (Karpathy split format)",
            source=path,
            field="images",
            reason="bad_json",
        )
    seen_ids: dict[str, int] = {}
    seen_files: dict[str, int] = {}
    for index, entry in enumerate(data["images"]):
        record = f"images[{index}]"
        if (
            not isinstance(entry, Mapping)
            or "split" not in entry
            or not isinstance(entry.get("sentences"), list)
        ):
            raise ImportFormatError(
                f"{record} needs 'split' and a 'sentences' list",
                source=path,
                field="split" if "split" not in entry else "sentences",
                reason="bad_json",
            )
        if entry["split"] not in _KARPATHY_SPLITS:
            raise ImportFormatError(
                f"{record} has unknown split {entry['split']!r}",
                source=path,
                field="split",
                reason="bad_json",
            )
        try:
            image_id = karpathy_image_id(entry, image_id_style)
        except KeyError as missing:
            if entry["split"] not in splits:
                continue  # an entry of another split is only checked for duplicates when it has an id
            raise ImportFormatError(
                f"{record} has no {missing.args[0]!r} for image_id_style={image_id_style!r}",
                source=path,
                field=missing.args[0],
                reason="bad_json",
            ) from None
        filename = str(entry.get("filename", "")) if entry.get("filename") is not None else ""
        duplicate = None
        if image_id in seen_ids:
            duplicate = (f"image id {image_id!r}", seen_ids[image_id], "image_id")
        elif filename and filename in seen_files:
            duplicate = (f"filename {filename!r}", seen_files[filename], "filename")
        seen_ids.setdefault(image_id, index)
        if filename:
            seen_files.setdefault(filename, index)
        if duplicate is not None:
            what, first, key = duplicate
            failure = ImportFormatError(
                f"{record} repeats the {what} of images[{first}]: their captions would be merged onto one image",
                source=path,
                image_id=image_id,
                field=key,
                reason="duplicate_image_entry",
            )
            if on_duplicate == "raise":
                raise failure
            report.skip(failure.reason, str(failure))
            logger.warning(f"{failure} (kept the first entry)")
            continue
        if entry["split"] not in splits:
            continue
        for number, sentence in enumerate(entry["sentences"]):
            raw = sentence.get("raw") if isinstance(sentence, Mapping) else None
            if not isinstance(raw, str) or not raw.strip():
                raise ImportFormatError(
                    f"{record}.sentences[{number}] has no non-empty 'raw' caption",
                    source=path,
                    image_id=image_id,
                    field="raw",
                    reason="empty_caption",
                )
            report.captions_read += 1
            yield image_id, raw.strip()


def _decode_text(data: bytes, path: str | os.PathLike) -> str:
    """UTF-8 text of a caption file; a decoding error names the file, line and byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = (
            data.count(b"\n", 0, error.start) + 1 if b"\n" in data else data.count(b"\r", 0, error.start) + 1
        )
        raise ImportFormatError(
            f"not UTF-8 text: byte {data[error.start : error.start + 1]!r} at offset {error.start} ({error.reason}); "
            "re-encode the file as UTF-8",
            source=path,
            line=line,
            reason="bad_encoding",
        ) from None


def _read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a text file, without their endings.

    Lines end with LF (a CR before it is dropped, CRLF files); a file without any LF but with CRs is read as
    CR-only (old Mac) line endings instead of as one long line. A CR alone inside an LF file stays in its line:
    splitting there would shift every later caption of a line-aligned file (SBU) onto the wrong image.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise ImportFormatError(
            f"cannot read the file: {error.strerror or error}", source=path, reason="missing_file"
        ) from None
    text = _decode_text(data, path)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark is not part of the first caption
        text = text[1:]
    separator = "\n" if "\n" in text or "\r" not in text else "\r"
    lines = text.split(separator)
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines] if separator == "\n" else lines


_CC_HEADER_WORDS = {
    "caption",
    "captions",
    "text",
    "url",
    "urls",
    "image_url",
    "image",
    "key",
    "id",
    "image_id",
}


def _looks_like_url(text: str) -> bool:
    return "://" in text or text.startswith("www.")


def _is_cc_header(columns: list[str], next_columns: list[str] | None) -> bool:
    """A first line whose URL column is not a URL while the next line's is, or whose columns are all header words."""
    names = [column.strip().lower() for column in columns]
    if len(names) >= 2 and all(name in _CC_HEADER_WORDS for name in names[:2]):
        return True
    if len(columns) < 2 or _looks_like_url(columns[1]):
        return False
    return next_columns is not None and len(next_columns) >= 2 and _looks_like_url(next_columns[1])


def read_cc_captions(
    path: str | os.PathLike,
    *,
    id_column: int | None = None,
    id_format: str = "{row}",
    header: str = "auto",
    on_error: str = "raise",
    report: ImportReport | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield (image_id, caption) pairs of a Conceptual Captions TSV (caption<TAB>url per line, no header).

    The format has no quoting, so a line with more tab-separated columns than the format's two (or than
    `id_column` needs) is an error naming the line (a tab inside a caption would otherwise cut the caption and
    take part of it as the URL). LF, CRLF and CR-only line endings are all read line by line.

    Args:
        path: e.g. `Train_GCC-training.tsv` or `Validation_GCC-1.1.0-Validation.tsv`.
        id_column: 0-based column holding the image id, for TSVs extended with one (e.g. a downloader's
            key); None forms ids with `id_format`. Extended files may have any number of columns >= 2.
        id_format: a `str.format` template with fields `row` (0-based line index of the caption among the data
            lines, the default id: "{row}", or zero-padded "{row:09d}") and `url_sha1` (hex SHA-1 of the URL, as
            some downloaders name files).
        header: "auto" (default) skips a first line that is a header (header words, or a URL column that is not a
            URL while the next line's is), counted as "header_line" in the report; "none" reads the first line as
            data; "skip" always skips the first line.
        on_error: "raise" or "skip" for lines with the wrong number of columns or an empty caption.

    Yields:
        (image_id, caption) with surrounding whitespace stripped from the caption.
    """
    _check_on_error(on_error)
    if header not in ("auto", "none", "skip"):
        raise ValueError(f"header must be 'auto', 'none' or 'skip', got {header!r}")
    try:
        id_format.format(row=0, url_sha1="0" * 40)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"id_format {id_format!r} (--image-id-style): cannot be filled ({type(error).__name__}: {error}) ; use "
            "only the fields {row} and {url_sha1}, e.g. '{row}' or '{row:09d}'"
        ) from None
    report = ImportReport() if report is None else report
    before = report.skipped.copy()
    lines = _read_lines(path)
    first = 0
    if lines and (
        header == "skip"
        or (
            header == "auto"
            and _is_cc_header(lines[0].split("\t"), lines[1].split("\t") if len(lines) > 1 else None)
        )
    ):
        first = 1
        report.skip("header_line", f"{path}:1: header line {lines[0][:80]!r} skipped")
        logger.warning(
            f"{path}:1: skipped a header line {lines[0][:80]!r} (pass header='none' to read it as data)"
        )
    for row, line in enumerate(lines[first:]):
        number = row + first + 1
        columns = line.split("\t")
        try:
            need = max(2, (id_column or 0) + 1)
            if len(columns) < need or (id_column is None and len(columns) > 2):
                extra = " (a tab inside the caption?)" if len(columns) > 2 else ""
                raise ImportFormatError(
                    f"expected {'at least ' if id_column is not None else ''}{need} tab-separated columns "
                    f"(caption, url), got {len(columns)}{extra}",
                    source=path,
                    line=number,
                    reason="column_count",
                )
            caption, url = columns[0].strip(), columns[1].strip()
            if id_column is not None:
                image_id = columns[id_column].strip()
            else:
                image_id = id_format.format(row=row, url_sha1=hashlib.sha1(url.encode("utf-8")).hexdigest())
            if not caption:
                raise ImportFormatError(
                    "empty caption",
                    source=path,
                    line=number,
                    image_id=image_id,
                    field="caption",
                    reason="empty_caption",
                )
            if not image_id:
                raise ImportFormatError(
                    "empty image id", source=path, line=number, field=f"column {id_column}", reason="bad_id"
                )
        except ImportFormatError as failure:
            report.skip_or_raise(failure, on_error)
            continue
        report.captions_read += 1
        yield image_id, caption
    _log_skips(report, str(path), before)


def sbu_photo_id(url: str) -> str:
    """The Flickr photo id in an SBU URL: "http://static.flickr.com/2723/4385058960_b0f291553e.jpg" ->
    "4385058960"."""
    name = url.strip().rsplit("/", 1)[-1]
    photo_id = name.split("_", 1)[0]
    if not photo_id.isdigit():
        raise ValueError(f"no Flickr photo id in URL {url!r}")
    return photo_id


def read_sbu_captions(
    captions_path: str | os.PathLike,
    urls_path: str | os.PathLike,
    *,
    image_id_style: str = "line",
    on_error: str = "raise",
    report: ImportReport | None = None,
) -> Iterator[tuple[str, str]]:
    """Yield (image_id, caption) pairs of SBU Captioned Photo (`SBU_captioned_photo_dataset_captions.txt` and
    `SBU_captioned_photo_dataset_urls.txt`, one entry per line, line-aligned).

    Args:
        image_id_style: "line" (0-based line index as a string) or "photo_id" (the Flickr photo id in the URL).
        on_error: "raise" or "skip" for empty captions or URLs without a photo id. Files of different lengths
            always raise: their alignment cannot be trusted.

    Yields:
        (image_id, caption), caption stripped.
    """
    _check_on_error(on_error)
    if image_id_style not in ("line", "photo_id"):
        raise ValueError(f"image_id_style must be 'line' or 'photo_id', got {image_id_style!r}")
    report = ImportReport() if report is None else report
    before = report.skipped.copy()
    captions, urls = _read_lines(captions_path), _read_lines(urls_path)
    if len(captions) != len(urls):
        raise ImportFormatError(
            f"captions file has {len(captions)} lines but URLs file {urls_path} has {len(urls)}; they must be "
            "line-aligned",
            source=captions_path,
            reason="misaligned",
        )
    for row, (caption, url) in enumerate(zip(captions, urls, strict=True)):
        try:
            if image_id_style == "line":
                image_id = str(row)
            else:
                try:
                    image_id = sbu_photo_id(url)
                except ValueError as error:
                    raise ImportFormatError(
                        str(error), source=urls_path, line=row + 1, field="url", reason="bad_id"
                    ) from None
            if not caption.strip():
                raise ImportFormatError(
                    "empty caption",
                    source=captions_path,
                    line=row + 1,
                    image_id=image_id,
                    field="caption",
                    reason="empty_caption",
                )
        except ImportFormatError as failure:
            report.skip_or_raise(failure, on_error)
            continue
        report.captions_read += 1
        yield image_id, caption.strip()
    _log_skips(report, str(captions_path), before)


# --------------------------------------------------------------------------------------------------------
# joining captions with features
# --------------------------------------------------------------------------------------------------------

_RECORD_KEYS = (
    "image_width",
    "image_height",
    "region_features",
    "region_boxes",
    "region_classes",
    "region_scores",
)


def make_pair_row(image: Mapping, caption: str) -> dict:
    """One schema row from an image record and a caption (features are repeated per caption by design)."""
    row = {"image_id": str(image["image_id"]), "caption": caption}
    for key in _RECORD_KEYS:
        row[key] = image[key]
    if "global_feature" in image:
        row["global_feature"] = image["global_feature"]
    return row


def _validate_image(
    image: Mapping, caption: str, index: int, feature_dim: int, num_classes: int | None
) -> None:
    from .schema import validate_record

    validate_record(make_pair_row(image, caption), index, feature_dim=feature_dim, num_classes=num_classes)


def build_pair_dataset(
    captions: Iterable[tuple[str, str]],
    features: Mapping[str, Mapping] | Iterable[Mapping],
    *,
    feature_dim: int,
    on_missing: str = "skip",
    on_duplicate: str = "raise",
    on_invalid: str = "raise",
    num_classes: int | None = None,
    report: ImportReport | None = None,
    show_progress: bool = True,
    cache_dir: str | None = None,
):
    """Join captions with image records into a `datasets.Dataset` in the image-text schema.

    Args:
        captions: (image_id, caption) pairs; read fully into memory (captions are small).
        features: image records, either a mapping image_id -> record, or an iterable of records (e.g.
            `read_butd_tsv(...)`), which is streamed once so that only one image's features are in memory.
        feature_dim: F, the width of `region_features` in the schema.
        on_missing: captions whose image has no features: "skip" (counted as "missing_image" in `report`
            and logged) or "raise" (`ImportFormatError` naming the image id).
        on_duplicate: an image id seen twice in an iterable of records: "raise" or "skip" (keep the first,
            count "duplicate_image_id").
        on_invalid: an image record that fails `schema.validate_record` (checked once per image, with its
            first caption): "raise" (`DataValidationError`) or "skip" (its captions counted as
            "invalid_record").
        num_classes: passed to `validate_record` to check class ids, when given.
        report: collects rows written and skips by reason; a fresh one is used (and logged) when None.
        cache_dir: where the Arrow file is written (datasets' cache by default).

    Returns:
        a `datasets.Dataset` with features `image_text_features(feature_dim)`, one row per caption whose
        image was found; rows follow caption order for a mapping and feature order for an iterable (captions
        of one image stay in their original order).
    """
    import datasets

    from .schema import DataValidationError, image_text_features

    _check_on_error(on_missing, "on_missing")
    _check_on_error(on_duplicate, "on_duplicate")
    _check_on_error(on_invalid, "on_invalid")
    report = ImportReport() if report is None else report
    before = report.skipped.copy()

    by_image: dict[str, list[str]] = {}
    for image_id, caption in tqdm(captions, desc="reading captions", unit="cap", disable=not show_progress):
        by_image.setdefault(str(image_id), []).append(caption)
    if not by_image:
        raise ImportFormatError("no captions to join (empty caption source or split)", reason="no_captions")

    if isinstance(features, Mapping):
        missing = [image_id for image_id in by_image if image_id not in features]
        _handle_missing(missing, by_image, features.keys(), on_missing, report)
        images = (features[image_id] for image_id in by_image if image_id in features)
    else:
        images = iter(features)

    images = iter(images)
    first = next(images, None)  # decides the optional global_feature column
    if first is None:
        raise ImportFormatError("no image records to join (empty feature source)", reason="no_images")
    schema = image_text_features(feature_dim, with_global_feature="global_feature" in first)

    state = {"rows": 0, "seen": set()}

    def chained() -> Iterator[Mapping]:
        yield first
        yield from images

    def generate(token: str) -> Iterator[dict]:
        del token  # only makes the datasets cache fingerprint unique per call
        seen: set[str] = state["seen"]
        for image in chained():
            image_id = str(image.get("image_id"))
            if image_id in seen:
                failure = ImportFormatError(
                    "duplicate image id in the features"
                    + (
                        " ; pass --on-duplicate skip to keep the first"
                        if on_duplicate == "raise"
                        else " (kept the first)"
                    ),
                    image_id=image_id,
                    field="image_id",
                    reason="duplicate_image_id",
                )
                if on_duplicate == "raise":
                    raise failure
                report.skip(failure.reason, str(failure))
                continue
            seen.add(image_id)
            if image_id not in by_image:
                continue  # features of images without captions in this split
            image_captions = by_image[image_id]
            try:
                _validate_image(image, image_captions[0], state["rows"], feature_dim, num_classes)
            except DataValidationError as failure:
                if on_invalid == "raise":
                    raise
                message = " ".join(str(failure).split("\n"))
                for _ in image_captions:
                    report.skip("invalid_record", message)
                continue
            for caption in image_captions:
                yield make_pair_row(image, caption)
                state["rows"] += 1
        if not isinstance(features, Mapping):
            missing = [image_id for image_id in by_image if image_id not in seen]
            _handle_missing(missing, by_image, seen, on_missing, report)
        if state["rows"] == 0:  # an empty result is almost always an id-scheme mismatch: say so
            raise ImportFormatError(
                f"no caption matched any image record: {len(by_image)} captioned image(s), e.g. "
                f"{list(by_image)[:3]}{_id_hint(list(by_image), seen)}",
                field="image_id",
                reason="no_rows",
            )

    try:
        dataset = datasets.Dataset.from_generator(
            generate,
            features=schema,
            gen_kwargs={"token": uuid.uuid4().hex},
            cache_dir=cache_dir,
            fingerprint=uuid.uuid4().hex,
        )
    except datasets.exceptions.DatasetGenerationError as error:
        cause = error.__cause__
        while cause is not None and not isinstance(cause, ValueError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
    report.rows_written += len(dataset)
    _log_skips(report, "caption-feature join (including skips of the feature readers it drove)", before)
    return dataset


def _handle_missing(
    missing: list[str],
    by_image: Mapping[str, list[str]],
    available: Iterable[str],
    on_missing: str,
    report: ImportReport,
) -> None:
    if not missing:
        return
    captions = sum(len(by_image[image_id]) for image_id in missing)
    message = f"{len(missing)} image(s) with {captions} caption(s) have no features, e.g. {missing[:3]}"
    hint = _id_hint(missing, available)
    if on_missing == "raise":
        raise ImportFormatError(message + hint, image_id=missing[0], field="image_id", reason="missing_image")
    for image_id in missing:
        for _ in by_image[image_id]:
            report.skip("missing_image", f"image_id={image_id!r}: no features for this caption's image")
    logger.warning("%s%s; skipped their captions", message, hint)


def _id_hint(missing: list[str], available: Iterable[str]) -> str:
    """Explain a likely id-scheme mismatch (e.g. "391895" vs "COCO_val2014_000000391895")."""
    sample = list(available)[:1000]
    if not sample:
        return ""
    folded = {image_id.lower(): image_id for image_id in sample}
    probe = missing[0]
    if probe.lower() in folded:
        return f" (feature ids differ only in case, e.g. {folded[probe.lower()]!r})"
    digits = probe.lstrip("0") if probe.isdigit() else None
    for image_id in sample:
        tail = image_id.rsplit("_", 1)[-1]
        if digits and tail.isdigit() and tail.lstrip("0") == digits:
            return f" (feature ids look like {image_id!r}: try another image_id_style)"
    return f" (feature ids look like {sample[0]!r})"


__all__ = [
    "BUTD_TSV_COLUMNS",
    "KARPATHY_IMAGE_ID_STYLES",
    "ImportFormatError",
    "ImportReport",
    "build_pair_dataset",
    "decode_butd_row",
    "decode_npz_record",
    "karpathy_image_id",
    "make_pair_row",
    "read_butd_tsv",
    "read_cc_captions",
    "read_karpathy_captions",
    "read_npz_dir",
    "read_npz_file",
    "read_sbu_captions",
    "sbu_photo_id",
]
