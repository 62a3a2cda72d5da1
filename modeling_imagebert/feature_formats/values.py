"""Checked conversions of decoded values, shared by the BUTD TSV and `.npz` readers: features to float16 (refusing
what float16 cannot hold), class ids to int32, counts to int. Each failure is an `ImportFormatError` naming the
source, line, image id and column."""

from __future__ import annotations

from typing import Any

import numpy as np

from .report import ImportFormatError


def to_float16_features(
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


def to_int32(values: np.ndarray, *, source: Any, line: int | None, image_id: str, column: str) -> np.ndarray:
    """Class ids as int32, refusing ids int32 cannot hold."""
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


def parse_int(text: str, *, source: Any, line: int | None, image_id: str | None, column: str) -> int:
    """The integer a text field holds ("600", "600.0"), refusing anything else."""
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


__all__ = ["parse_int", "to_float16_features", "to_int32"]
