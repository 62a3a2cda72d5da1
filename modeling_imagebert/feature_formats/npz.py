"""Folders of per-image `.npz` files (UNITER, bottom-up-attention.pytorch): their reader and their writer.

`read_npz_dir` reads a folder of `<image_id>.npz` files in either code base's key variant (see
`decode_npz_record`); every array is read with numpy's `allow_pickle=False`, and only the pickled `info` dict of a
bottom-up-attention.pytorch dump is read, on request, through `safe_loading.RestrictedUnpickler`.
`write_npz_folder` writes the records of an extraction run (`features/runner.py`) with bottom-up-attention.pytorch
keys (`x`, `bbox`, `image_w`, `image_h`, `num_bbox`, `objects_id`, `objects_conf`, `attrs_id`, `attrs_conf`, and
`global_feature` when computed), which the reader reads back.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ..safe_loading import NUMPY_ARRAYS, PLAIN_VALUES, RestrictedUnpickler
from .report import ImportFormatError, ImportReport, check_on_error, log_skips
from .values import parse_int, to_float16_features, to_int32

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
        an image record (see `modeling_imagebert.feature_formats`): float16 region features [N, F].
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
        "region_features": to_float16_features(features, column=feature_key, **where),
        "region_boxes": boxes.astype(np.float32),
        "region_classes": to_int32(classes.astype(np.int64), column=class_key, **where),
        "region_scores": scores,
    }


def _scalar_int(value: Any, key: str, where: dict) -> int:
    array = np.asarray(value)
    if array.size != 1:
        raise ImportFormatError(
            f"expected a scalar, got shape {array.shape}", field=key, reason="bad_count", **where
        )
    return parse_int(str(array.reshape(()).item()), column=key, **where)


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
    check_on_error(on_error)
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
    log_skips(report, str(folder), before)


def npz_arrays(record: Mapping) -> dict[str, np.ndarray]:
    """The arrays of one image record (`features/runner.py`'s layout) under bottom-up-attention.pytorch keys."""
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
    return arrays


def write_npz_folder(records: Iterable[Mapping], folder: str | os.PathLike) -> None:
    """Writes `<image_id>.npz` per record (see `npz_arrays`) into the existing `folder`. Not atomic by itself:
    `shards.write_shard` fills a temporary folder."""
    folder = Path(folder)
    for record in records:
        buffer = io.BytesIO()
        np.savez(buffer, **npz_arrays(record))
        (folder / f"{record['image_id']}.npz").write_bytes(buffer.getvalue())


__all__ = ["decode_npz_record", "npz_arrays", "read_npz_dir", "read_npz_file", "write_npz_folder"]
