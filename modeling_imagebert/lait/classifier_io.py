"""The files of LAIT's trainable classifiers (the stage-2 image filter, the stage-4 scorer): labelled rows in
(CSV or JSONL), models out as skops files with a JSON sidecar, never pickle.

A skops file is loaded only when every type it holds is among skops' defaults (numpy, scikit-learn estimators)
and `TRUSTED_SKOPS_TYPES`, and its sidecar names the kind of model the caller expects.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_file, atomic_write_text

# The only types a skops file of ours may contain beyond skops' own defaults (numpy, sklearn estimators).
TRUSTED_SKOPS_TYPES: tuple[str, ...] = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


def read_labelled_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a labelled CSV or JSONL file, each checked to have the `required` columns; a bad row raises
    ValueError naming the file, the line and the field."""
    import csv

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
    text = _utf8_text(path, data)
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: not a JSON object") from None
    else:
        reader = csv.DictReader(io.StringIO(text))
        try:
            rows = list(reader)
        except csv.Error as error:
            raise ValueError(f"{path}:{reader.line_num}: not a CSV row ({error})") from None
    for line_no, row in enumerate(rows, 1):
        for key in required:
            if not isinstance(row, dict) or row.get(key) in (None, ""):
                raise ValueError(
                    f"{path}: row {line_no}: missing field {key!r} (expected columns {', '.join(required)})"
                )
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def _utf8_text(path: Path, data: bytes) -> str:
    """`data` read as UTF-8 (a byte-order mark allowed); a file in another encoding (Latin-1, UTF-16) or a binary
    file raises ValueError naming the file, the line and the byte offset."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise ValueError(
            f"{path}: line {line}, byte {error.start}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
            "expected a UTF-8 CSV or JSONL label file (re-save it as UTF-8)"
        ) from None


def parse_label(value: Any, where: str) -> int:
    """A 0/1 label from 0, 1, true, false, yes, no; ValueError naming `where` otherwise."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return 1
    if text in ("0", "false", "no"):
        return 0
    raise ValueError(f"{where}: expected a 0/1 label, got {value!r}")


def load_skops(path: str | Path, expected_kind: str) -> tuple[Any, dict[str, Any]]:
    """Loads a model saved by `save_skops`, refusing any type outside skops' defaults and `TRUSTED_SKOPS_TYPES`.
    Output: `(estimator, sidecar)`; the JSON sidecar (`<path>.json`) must say `kind == expected_kind`."""
    import skops.io as sio

    path = Path(path)
    sidecar_path = path.with_suffix(path.suffix + ".json")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{sidecar_path}: missing or unreadable sidecar of {path.name} ({error})") from None
    if sidecar.get("kind") != expected_kind:
        raise ValueError(f"{sidecar_path}: kind {sidecar.get('kind')!r}, expected {expected_kind!r}")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as error:
        raise ValueError(f"{path}: not a skops file ({error})") from None
    unknown = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if unknown:
        raise ValueError(f"{path}: refusing to load untrusted type(s) {', '.join(unknown)}")
    return sio.load(path, trusted=list(untrusted)), sidecar


def save_skops(model: Any, path: str | Path, sidecar: Mapping[str, Any]) -> None:
    """Saves `model` with skops and `sidecar` as `<path>.json`, both atomically."""
    import skops.io as sio

    path = Path(path)
    with atomic_file(path) as temp:
        sio.dump(model, temp)
    atomic_write_text(
        path.with_suffix(path.suffix + ".json"), json.dumps(dict(sidecar), indent=2, sort_keys=True)
    )


__all__ = ["TRUSTED_SKOPS_TYPES", "load_skops", "parse_label", "read_labelled_rows", "save_skops"]
