"""Karpathy-split caption JSON (`dataset_flickr30k.json`, `dataset_coco.json`, `dataset_flickr8k.json`): one
split's (image_id, caption) pairs, with image ids formed to match the feature files' names."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from ...feature_formats.report import ImportFormatError, ImportReport, check_on_error
from ...safe_loading import TEXT_MAX_BYTES, InputTooLargeError, read_input_bytes
from .text_files import decode_text

logger = logging.getLogger(__name__)


_KARPATHY_SPLITS = ("train", "val", "test", "restval")
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
    check_on_error(on_duplicate, "on_duplicate")
    report = ImportReport() if report is None else report
    try:
        raw_bytes = read_input_bytes(path, "a Karpathy JSON caption file", TEXT_MAX_BYTES)
    except (OSError, InputTooLargeError) as error:  # a FIFO or device is refused, never read (it could block)
        raise ImportFormatError(
            f"cannot read the file: {error.strerror or getattr(error, 'reason', None) or error}",
            source=path,
            reason="missing_file",
        ) from None
    try:
        data = json.loads(decode_text(raw_bytes, path))
    except json.JSONDecodeError as error:
        raise ImportFormatError(
            f"invalid JSON: {error.msg} (column {error.colno})",
            source=path,
            line=error.lineno,
            reason="bad_json",
        ) from None
    except (
        RecursionError
    ):  # json's decoder recurses per nesting level: a 200,000-deep list overflows the stack
        raise ImportFormatError(
            "invalid JSON: nested deeper than Python's recursion limit (a Karpathy split file is an object with "
            "an 'images' list, a few levels deep)",
            source=path,
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


__all__ = ["KARPATHY_IMAGE_ID_STYLES", "karpathy_image_id", "read_karpathy_captions"]
