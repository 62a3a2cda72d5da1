"""The one dataset schema for image-text pairs, shared by importers, the toy world, the processor and collators.

One row is one (image, caption) pair. Region arrays are in detector order (the processor keeps the top
`max_regions` by `region_scores`); boxes are in pixels of the original image. Every column but `caption` is an
image column, defined once in `feature_formats/columns.py` and shared with the feature shards of extraction runs.

| column            | type                         | meaning                                              |
|-------------------|------------------------------|------------------------------------------------------|
| image_id          | string                       | identifies the image; captions of one image share it |
| caption           | string                       | the text, non-empty UTF-8                            |
| region_features   | Array2D (N, F) float16       | pooled RoI features                                  |
| region_boxes      | Array2D (N, 4) float32       | pixel boxes x1, y1, x2, y2                           |
| image_width       | int32                        | W in pixels                                          |
| image_height      | int32                        | H in pixels                                          |
| region_classes    | Sequence(int32), length N    | detector class ids (targets of MOC)                  |
| region_scores     | Sequence(float32), length N  | detector confidences                                 |
| global_feature    | Sequence(float32), optional  | a whole-image feature (paper ablation)               |
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
from datasets import Array2D, Dataset, Features, Value
from tqdm.auto import tqdm

from ..feature_formats.columns import (
    GLOBAL_FEATURE_COLUMN,
    IMAGE_COLUMNS,
    global_feature_column,
    image_columns,
)


def image_text_features(feature_dim: int = 2048, with_global_feature: bool = False) -> Features:
    """The `datasets.Features` of an image-text dataset with `feature_dim`-d region features: the image columns
    (`feature_formats.columns`, shared with the feature shards) with `caption` after `image_id`."""
    image = image_columns(feature_dim)
    columns = {"image_id": image.pop("image_id"), "caption": Value("string"), **image}
    if with_global_feature:
        columns[GLOBAL_FEATURE_COLUMN] = global_feature_column()
    return Features(columns)


IMAGE_TEXT_FEATURES = image_text_features()


# --------------------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------------------

REQUIRED_COLUMNS = ("image_id", "caption", *IMAGE_COLUMNS[1:])
OPTIONAL_COLUMNS = (GLOBAL_FEATURE_COLUMN,)


class DataValidationError(ValueError):
    """A record or a dataset does not follow the image-text schema. The message names the record (row index and
    image_id), the field, what was found and what was expected."""


def _describe_record(index: int | None, image_id: Any) -> str:
    where = f"record {index}" if index is not None else "record"
    if isinstance(image_id, (str, np.str_)) and str(image_id).strip():
        where += f" (image_id={str(image_id)!r})"
    return where


def _text_problem(value: Any) -> tuple[str | None, str | None]:
    """Returns (decoded text, problem) for a text field value: str, numpy str, or UTF-8 bytes."""
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as error:
            return (
                None,
                f"found bytes that are not valid UTF-8 ({error.reason} at byte {error.start}); expected UTF-8 text",
            )
    if not isinstance(value, (str, np.str_)):
        return None, f"found {type(value).__name__}; expected a string"
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return None, (
            f"found a string with a lone surrogate {text[error.start]!r} at character {error.start}; "
            "expected valid UTF-8 text"
        )
    return text, None


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _first_bad(mask: np.ndarray) -> int:
    """Index of the first True in a 1-D boolean mask."""
    return int(np.flatnonzero(mask)[0])


def validate_record(
    record: dict,
    index: int,
    *,
    feature_dim: int | None = None,
    num_classes: int | None = None,
    require_global_feature: bool = False,
) -> None:
    """Checks one image-text record against the schema (see the table at the top of this module).

    Args:
        record: a dict with the schema's columns. Array fields may be Python lists, numpy arrays or torch tensors;
            `region_features` is [N, F], `region_boxes` [N, 4] (pixel x1, y1, x2, y2), `region_classes` and
            `region_scores` [N], `global_feature` [G]. N may be 0.
        index: the row index of the record, used in messages.
        feature_dim: the expected F; any F is accepted when None.
        num_classes: when given, class ids must lie in [0, num_classes); otherwise they must be >= 0.
        require_global_feature: whether the `global_feature` column must be present.

    Raises:
        DataValidationError: listing every problem found in the record, one per line, each naming the record
            (row index and image_id), the field, what was found and what was expected.
    """
    problems: list[tuple[str, str]] = []  # (field, message)

    def problem(field: str, message: str) -> None:
        problems.append((field, message))

    if not isinstance(record, Mapping):
        raise DataValidationError(
            f"record {index}: found {type(record).__name__}; expected a dict of columns"
        )

    # Columns.
    columns = set(record)
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if require_global_feature and "global_feature" not in columns:
        missing.append("global_feature")
    for column in missing:
        problem(column, "found no such column; expected every column of the schema")
    for column in sorted(columns - set(REQUIRED_COLUMNS) - set(OPTIONAL_COLUMNS)):
        problem(column, f"unexpected column; expected only {list(REQUIRED_COLUMNS) + list(OPTIONAL_COLUMNS)}")

    # Text.
    image_id = record.get("image_id")
    if "image_id" in columns:
        text, issue = _text_problem(image_id)
        if issue is not None:
            problem("image_id", issue)
        elif not text.strip():
            problem("image_id", f"found {text!r}; expected a non-empty identifier")
    if "caption" in columns:
        text, issue = _text_problem(record["caption"])
        if issue is not None:
            problem("caption", issue)
        elif not text.strip():
            problem("caption", f"found {text!r}; expected non-empty text (not only whitespace)")

    # Image size.
    size: dict[str, int] = {}
    for field in ("image_width", "image_height"):
        if field not in columns:
            continue
        value = record[field]
        if hasattr(value, "item") and _as_array(value).size == 1:
            value = _as_array(value).item()
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            problem(field, f"found {value!r} ({type(value).__name__}); expected a positive integer")
        elif value <= 0:
            problem(field, f"found {value}; expected a positive integer (pixels)")
        else:
            size[field] = int(value)

    # Region features fix N.
    num_regions: int | None = None
    if "region_features" in columns:
        features = _as_array(record["region_features"])
        if features.ndim == 1 and features.size == 0:  # an empty list: zero regions
            features = features.reshape(0, feature_dim or 0)
        if features.ndim != 2:
            problem(
                "region_features",
                f"found shape {tuple(features.shape)}; expected a 2-D array [N, feature_dim]",
            )
        elif not np.issubdtype(features.dtype, np.floating) and features.size:
            problem("region_features", f"found dtype {features.dtype}; expected floating point")
        else:
            num_regions = features.shape[0]
            if feature_dim is not None and features.shape[1] != feature_dim:
                problem(
                    "region_features",
                    f"found shape {tuple(features.shape)}; expected [N, {feature_dim}] (feature_dim={feature_dim})",
                )
            finite = np.isfinite(features).all(axis=1) if features.size else np.ones(0, dtype=bool)
            if not finite.all():
                bad = _first_bad(~finite)
                problem(
                    "region_features",
                    f"found NaN or Inf in {int((~finite).sum())} of {num_regions} regions (first: region {bad}); "
                    "expected finite values",
                )

    # Boxes.
    if "region_boxes" in columns:
        boxes = _as_array(record["region_boxes"])
        if boxes.ndim == 1 and boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        expected_rows = "N" if num_regions is None else str(num_regions)
        if (
            boxes.ndim != 2
            or boxes.shape[1] != 4
            or (num_regions is not None and boxes.shape[0] != num_regions)
        ):
            problem(
                "region_boxes",
                f"found shape {tuple(boxes.shape)}; expected [{expected_rows}, 4] (one x1, y1, x2, y2 box per region)",
            )
        elif boxes.size and not np.issubdtype(boxes.dtype, np.number):
            problem("region_boxes", f"found dtype {boxes.dtype}; expected numbers (pixel coordinates)")
        elif boxes.size:
            boxes = boxes.astype(np.float64)
            finite = np.isfinite(boxes).all(axis=1)
            if not finite.all():
                bad = _first_bad(~finite)
                problem(
                    "region_boxes",
                    f"found NaN or Inf in region {bad}: {boxes[bad].tolist()}; expected finite pixel coordinates",
                )
            else:
                x1, y1, x2, y2 = boxes.T
                inverted = (x2 < x1) | (y2 < y1)
                if inverted.any():
                    bad = _first_bad(inverted)
                    problem(
                        "region_boxes",
                        f"found an inverted box in region {bad} (x1, y1, x2, y2) = {boxes[bad].tolist()} "
                        f"({int(inverted.sum())} such regions); expected x1 <= x2 and y1 <= y2",
                    )
                if len(size) == 2:
                    width, height = size["image_width"], size["image_height"]
                    outside = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height)
                    if outside.any():
                        bad = _first_bad(outside)
                        problem(
                            "region_boxes",
                            f"found region {bad} (x1, y1, x2, y2) = {boxes[bad].tolist()} outside the image "
                            f"({int(outside.sum())} such regions); expected inside [0, {width}] x [0, {height}]",
                        )

    # Classes.
    if "region_classes" in columns:
        classes = _as_array(record["region_classes"])
        if classes.ndim != 1 or (num_regions is not None and classes.shape[0] != num_regions):
            expected = "N" if num_regions is None else num_regions
            problem(
                "region_classes",
                f"found shape {tuple(classes.shape)}; expected a 1-D array of length {expected}",
            )
        elif classes.size:
            if not np.issubdtype(classes.dtype, np.integer):
                problem("region_classes", f"found dtype {classes.dtype}; expected integer class ids")
            else:
                high = num_classes if num_classes is not None else None
                bad_mask = (classes < 0) if high is None else ((classes < 0) | (classes >= high))
                if bad_mask.any():
                    bad = _first_bad(bad_mask)
                    expected_range = f"[0, {high})" if high is not None else ">= 0"
                    problem(
                        "region_classes",
                        f"found class id {int(classes[bad])} in region {bad} ({int(bad_mask.sum())} such regions); "
                        f"expected ids in {expected_range}",
                    )

    # Scores.
    if "region_scores" in columns:
        scores = _as_array(record["region_scores"])
        if scores.ndim != 1 or (num_regions is not None and scores.shape[0] != num_regions):
            expected = "N" if num_regions is None else num_regions
            problem(
                "region_scores",
                f"found shape {tuple(scores.shape)}; expected a 1-D array of length {expected}",
            )
        elif scores.size and not np.issubdtype(scores.dtype, np.number):
            problem("region_scores", f"found dtype {scores.dtype}; expected numbers in [0, 1]")
        elif scores.size:
            scores = scores.astype(np.float64)
            finite = np.isfinite(scores)
            if not finite.all():
                bad = _first_bad(~finite)
                problem(
                    "region_scores", f"found {scores[bad]} in region {bad}; expected finite scores in [0, 1]"
                )
            else:
                outside = (scores < 0) | (scores > 1)
                if outside.any():
                    bad = _first_bad(outside)
                    problem(
                        "region_scores",
                        f"found {scores[bad]} in region {bad} ({int(outside.sum())} such regions); "
                        "expected scores in [0, 1]",
                    )

    # Global feature.
    if "global_feature" in columns and record["global_feature"] is not None:
        global_feature = _as_array(record["global_feature"])
        if global_feature.ndim != 1 or global_feature.size == 0:
            problem(
                "global_feature",
                f"found shape {tuple(global_feature.shape)}; expected a non-empty 1-D vector [G]",
            )
        elif not np.issubdtype(global_feature.dtype, np.number):
            problem("global_feature", f"found dtype {global_feature.dtype}; expected floating point")
        elif not np.isfinite(global_feature).all():
            bad = _first_bad(~np.isfinite(global_feature))
            problem(
                "global_feature", f"found {global_feature[bad]} at position {bad}; expected finite values"
            )
    elif require_global_feature and "global_feature" in columns:
        problem("global_feature", "found None; expected a 1-D vector [G]")

    if problems:
        where = _describe_record(index, image_id)
        lines = [f"{where}, field {field!r}: {message}" for field, message in problems]
        raise DataValidationError("\n".join(lines))


def validate_features(features: Features, *, feature_dim: int | None = None) -> int:
    """Checks the column types of a dataset against the schema and returns its region feature dimension F.

    Args:
        features: `dataset.features`.
        feature_dim: the expected F; read from the `region_features` column when None.

    Raises:
        DataValidationError: naming each missing, unexpected or wrongly typed column and the type expected.
    """
    problems = []
    region_type = features.get("region_features")
    found_dim = None
    if isinstance(region_type, Array2D) and len(region_type.shape) == 2:
        found_dim = region_type.shape[1]
    dim = feature_dim if feature_dim is not None else (found_dim if found_dim is not None else 2048)
    expected = image_text_features(dim, with_global_feature="global_feature" in features)
    for column, expected_type in expected.items():
        if column not in features:
            problems.append(f"column {column!r} is missing; expected {expected_type}")
        elif features[column] != expected_type:
            problems.append(f"column {column!r} has type {features[column]}; expected {expected_type}")
    for column in features:
        if column not in expected:
            problems.append(f"column {column!r} is unexpected; expected only the columns {list(expected)}")
    if problems:
        raise DataValidationError(
            "dataset features do not match the image-text schema:\n" + "\n".join(problems)
        )
    return dim


# Vectorised dataset validation: each batch is read as Arrow and every column is checked at once; only the rows a
# batch-level check flags (a superset of the rows `validate_record` refuses) are read as numpy and passed to
# `validate_record`, so the messages are exactly the row-by-row ones.


def _storage(array: pa.Array) -> pa.Array:
    """The plain Arrow array under a `datasets` extension column (Array2D is stored as a list of lists)."""
    return array.storage if isinstance(array, pa.ExtensionArray) else array


def _list_parts(array: pa.Array) -> tuple[np.ndarray, pa.Array] | None:
    """Offsets [rows + 1] (starting at 0) and the child values of a list array, or None when it holds nulls
    (their rows are then all suspect: nulls hide child values and need the record-level messages)."""
    if not pa.types.is_list(array.type) or array.null_count:
        return None
    offsets = array.offsets.to_numpy().astype(np.int64)
    # A sliced list array keeps absolute offsets into the unsliced child values.
    values = array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))
    return offsets - offsets[0], values


def _rows_of(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """The list (row) index holding each flat position, for list offsets [rows + 1] (empty lists skipped)."""
    return np.searchsorted(offsets, positions, side="right") - 1


def _numbers(values: pa.Array) -> np.ndarray | None:
    """The values of a flat numeric array as numpy, or None when they hold nulls or are not numbers."""
    if values.null_count or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        return None
    return values.to_numpy(zero_copy_only=False)


_HALF_EXPONENT = np.uint64(0x7C00_7C00_7C00_7C00)  # the exponent bits of four float16 lanes in a uint64
_HALF_CARRY = np.uint64(0x0400_0400_0400_0400)  # turns an all-ones exponent (0x7C00) into the lane's top bit
_HALF_TOP = np.uint64(0x8000_8000_8000_8000)


def _any_half_not_finite(values: np.ndarray, block: int = 1 << 16) -> bool:
    """Whether a flat float16 array holds NaN or Inf, reading four values per uint64 in cache-sized blocks.

    A float16 is NaN/Inf when its exponent bits are all ones: masking them and adding 0x0400 per lane sets a
    lane's top bit exactly then (no carry crosses lanes, since a masked lane is at most 0x7C00).
    """
    whole = values.size - values.size % 4
    if whole < values.size and _not_finite(values[whole:]).any():
        return True
    words = values[:whole].view(np.uint64)  # [size / 4]
    buffer = np.empty(min(block, words.size), dtype=np.uint64)
    for start in range(0, words.size, block):
        part = words[start : start + block]
        lanes = buffer[: part.size]
        np.bitwise_and(part, _HALF_EXPONENT, out=lanes)
        lanes += _HALF_CARRY
        lanes &= _HALF_TOP
        if lanes.any():
            return True
    return False


def _not_finite(values: np.ndarray) -> np.ndarray:
    """Mask of NaN/Inf entries; float16 is checked on its bits (all-ones exponent) to avoid upcasting."""
    if values.dtype == np.float16:
        return (values.view(np.uint16) & 0x7C00) == 0x7C00
    if np.issubdtype(values.dtype, np.floating):
        return ~np.isfinite(values)
    return np.zeros(values.shape, dtype=bool)


def _blank_text_rows(column: pa.Array) -> np.ndarray:
    """Rows whose text is null, not a string, empty after `str.strip` (Python's whitespace rules) or ending in
    NUL (numpy's fixed-width strings, which the row-level check reads, drop trailing NULs)."""
    array = _storage(column)
    if not pa.types.is_string(array.type) and not pa.types.is_large_string(array.type):
        return np.ones(len(array), dtype=bool)
    try:
        texts = array.to_pylist()
    except UnicodeDecodeError:  # bytes that are not UTF-8: `validate_record` names them
        return np.ones(len(array), dtype=bool)
    return np.fromiter(
        (text is None or not text.strip() or text.endswith("\x00") for text in texts),
        dtype=bool,
        count=len(array),
    )


def _nested_rows(column: pa.Array, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Splits an [N, width] per-row column (Array2D storage: a list of lists) into per-row N [rows], the flat
    values [sum N, width] and the row of each of them [sum N]. None when the column holds nulls, non-numbers or
    an inner list of another length (every row of the batch is then suspect)."""
    outer = _list_parts(_storage(column))
    if outer is None:
        return None
    outer_offsets, inner_array = outer
    inner = _list_parts(inner_array)
    if inner is None:
        return None
    inner_offsets, flat = inner
    values = _numbers(flat)
    if values is None or (np.diff(inner_offsets) != width).any():
        return None
    counts = np.diff(outer_offsets)  # [rows] N per row
    rows = np.repeat(np.arange(len(counts)), counts)  # [sum N] row of each region
    return counts, values.reshape(-1, width), rows  # [sum N, width]


def _suspect_rows(
    table: pa.RecordBatch, *, feature_dim: int, num_classes: int | None, require_global_feature: bool
) -> np.ndarray | None:
    """Marks the rows of a batch that may break a rule of `validate_record`, checking each column at once.

    Args:
        table: one record batch of an image-text dataset, as Arrow (columns already checked by
            `validate_features`).
        feature_dim: the expected F.
        num_classes: when given, class ids must lie in [0, num_classes).
        require_global_feature: whether rows need a `global_feature`.

    Returns:
        A boolean mask [rows]: True for every row `validate_record` would refuse (and possibly a few more), or
        None when the batch holds nulls or values of another type: `datasets` then formats the whole numpy batch
        differently (a null width makes every width a float), so every row of the batch must be checked.
    """
    num_rows = table.num_rows
    suspect = np.zeros(num_rows, dtype=bool)
    for field in ("image_id", "caption"):
        suspect |= _blank_text_rows(table.column(field))

    size = {}
    for field in ("image_width", "image_height"):
        values = _numbers(_storage(table.column(field)))
        if values is None or not np.issubdtype(values.dtype, np.integer):
            return None
        suspect |= values <= 0
        size[field] = values.astype(np.float64)

    features = _nested_rows(table.column("region_features"), feature_dim)
    if features is None:
        return None
    num_regions, feature_values, feature_rows = features  # [rows], [sum N, F], [sum N]
    flat = feature_values.reshape(-1)  # [sum N * F]
    if flat.dtype != np.float16 or _any_half_not_finite(flat):
        # One bad region marks its row: reduce the [sum N, F] mask to regions, then map regions to rows.
        bad_regions = _not_finite(feature_values).any(axis=1)
        suspect[feature_rows[bad_regions]] = True

    boxes = _nested_rows(table.column("region_boxes"), 4)
    if boxes is None:
        return None
    box_counts, box_values, box_rows = boxes  # [rows], [sum N, 4], [sum N]
    suspect |= box_counts != num_regions
    if len(box_rows):
        box_values = box_values.astype(np.float64)
        x1, y1, x2, y2 = box_values.T
        width, height = size["image_width"][box_rows], size["image_height"][box_rows]
        bad_boxes = (
            _not_finite(box_values).any(axis=1)
            | (x2 < x1)
            | (y2 < y1)
            | (x1 < 0)
            | (y1 < 0)
            | (x2 > width)
            | (y2 > height)
        )
        suspect[box_rows[bad_boxes]] = True

    for field in ("region_classes", "region_scores"):
        parts = _list_parts(_storage(table.column(field)))
        values = None if parts is None else _numbers(parts[1])
        if values is None:
            return None
        offsets = parts[0]
        suspect |= np.diff(offsets) != num_regions
        if field == "region_classes":
            if not np.issubdtype(values.dtype, np.integer):
                suspect |= np.diff(offsets) > 0
                continue
            bad = (values < 0) if num_classes is None else ((values < 0) | (values >= num_classes))
        else:
            values = values.astype(np.float64)
            bad = ~np.isfinite(values) | (values < 0) | (values > 1)
        suspect[_rows_of(np.flatnonzero(bad), offsets)] = True

    if "global_feature" in table.schema.names:
        parts = _list_parts(_storage(table.column("global_feature")))
        values = None if parts is None else _numbers(parts[1])
        if values is None:
            return None
        offsets = parts[0]
        suspect |= np.diff(offsets) == 0
        suspect[_rows_of(np.flatnonzero(_not_finite(values)), offsets)] = True
    elif require_global_feature:  # cannot happen after `validate_features`; let `validate_record` say so
        return None
    return suspect


def _read_record(numpy_view: Dataset, batch: dict | None, table: pa.Table, start: int, offset: int) -> dict:
    """Row `offset` of the numpy batch starting at row `start`, or that row read alone when the batch is None
    (`table` is the same batch as Arrow, for the image_id of a row that cannot be read).

    Raises:
        DataValidationError: naming the record when `datasets` cannot read it as numpy arrays.
    """
    if batch is not None:
        return {column: batch[column][offset] for column in batch}
    try:
        return numpy_view[start + offset]
    except (ValueError, TypeError, AttributeError) as error:
        image_id = table.column("image_id")[offset].as_py()
        raise DataValidationError(
            f"{_describe_record(start + offset, image_id)}: cannot be read as arrays ({type(error).__name__}: "
            f"{error}); expected region_features [N, F] and region_boxes [N, 4] with one full row per region"
        ) from error


class _RecordErrors:
    """Runs `validate_record` on rows and collects what it refuses (the first `max_errors` messages and the count);
    `raise_if_any` raises the one DataValidationError both validators report."""

    def __init__(self, feature_dim, num_classes, require_global: bool, max_errors: int):
        self.options = {
            "feature_dim": feature_dim,
            "num_classes": num_classes,
            "require_global_feature": require_global,
        }
        self.max_errors = max_errors
        self.messages: list[str] = []
        self.num_bad = 0

    def add(self, error: DataValidationError) -> None:
        self.num_bad += 1
        if len(self.messages) < self.max_errors:
            self.messages.append(str(error))

    def check(self, record: dict, index: int) -> None:
        try:
            validate_record(record, index, **self.options)
        except DataValidationError as error:
            self.add(error)

    def raise_if_any(self, checked: int) -> None:
        if self.num_bad:
            shown = f"the first {len(self.messages)}" if self.num_bad > len(self.messages) else "all"
            raise DataValidationError(
                f"{self.num_bad} of {checked} records are invalid ({shown} listed):\n"
                + "\n".join(self.messages)
            )


def validate_dataset(
    dataset: Dataset,
    *,
    feature_dim: int | None = None,
    num_classes: int | None = None,
    batch_size: int = 1000,
    max_errors: int = 20,
    show_progress: bool = True,
) -> int:
    """Validates every row of an image-text `datasets.Dataset` (column types, then every rule of
    `validate_record`), reading it in batches of `batch_size` rows as Arrow and checking each batch's columns at
    once (float16 features are not upcast). Rows a batch check flags are re-checked with `validate_record`, so
    the messages are the row-by-row ones.

    Args:
        dataset: a `datasets.Dataset` with the schema's columns.
        feature_dim: the expected F; read from the `region_features` column type when None.
        num_classes: when given, class ids must lie in [0, num_classes).
        batch_size: rows read at a time.
        max_errors: at most this many record messages are kept in the error.
        show_progress: show a tqdm progress bar.

    Returns:
        The number of rows checked.

    Raises:
        DataValidationError: listing the first `max_errors` bad records and the total number of bad records.
    """
    feature_dim = validate_features(dataset.features, feature_dim=feature_dim)
    require_global = "global_feature" in dataset.features
    errors = _RecordErrors(feature_dim, num_classes, require_global, max_errors)
    checked = 0
    arrow_view = dataset.with_format("arrow")
    numpy_view = dataset.with_format("numpy", dtype=None)
    with tqdm(
        total=len(dataset), desc="validating records", unit="rows", disable=not show_progress
    ) as progress:
        for table in arrow_view.iter(batch_size=batch_size):
            rows = table.num_rows
            # Record batches are zero-copy slices of the table's chunks (combining the chunks would copy them).
            masks = [
                _suspect_rows(
                    part,
                    feature_dim=feature_dim,
                    num_classes=num_classes,
                    require_global_feature=require_global,
                )
                for part in table.to_batches()
            ]
            if any(mask is None for mask in masks):
                suspect = np.ones(rows, dtype=bool)
            else:
                suspect = np.concatenate(masks) if masks else np.zeros(rows, dtype=bool)
            if suspect.any():
                try:
                    # The same numpy rows the row-by-row validator reads, so its messages are reproduced exactly.
                    batch = numpy_view[checked : checked + rows]
                except (ValueError, TypeError, AttributeError):
                    # `datasets` cannot format this batch as numpy (a null list, regions of another width):
                    # read the flagged rows one at a time instead of failing deep inside the formatter.
                    batch = None
                for offset in np.flatnonzero(suspect).tolist():
                    try:
                        record = _read_record(numpy_view, batch, table, checked, offset)
                    except DataValidationError as error:
                        errors.add(error)
                        continue
                    errors.check(record, checked + offset)
            checked += rows
            progress.update(rows)
    errors.raise_if_any(checked)
    return checked


def _validate_dataset_rowwise(
    dataset: Dataset,
    *,
    feature_dim: int | None = None,
    num_classes: int | None = None,
    batch_size: int = 1000,
    max_errors: int = 20,
    show_progress: bool = True,
) -> int:
    """The reference row-by-row validator: `validate_record` on every row. `validate_dataset` gives the same
    result and the same messages, checking whole batches at once; the tests compare the two."""
    feature_dim = validate_features(dataset.features, feature_dim=feature_dim)
    errors = _RecordErrors(feature_dim, num_classes, "global_feature" in dataset.features, max_errors)
    checked = 0
    view = dataset.with_format("numpy", dtype=None)
    with tqdm(
        total=len(dataset), desc="validating records", unit="rows", disable=not show_progress
    ) as progress:
        for batch in view.iter(batch_size=batch_size):
            columns = list(batch)
            rows = len(batch[columns[0]]) if columns else 0
            for offset in range(rows):
                errors.check({column: batch[column][offset] for column in columns}, checked + offset)
            checked += rows
            progress.update(rows)
    errors.raise_if_any(checked)
    return checked
