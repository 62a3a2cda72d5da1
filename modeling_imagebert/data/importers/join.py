"""Joining captions with image records into a `datasets.Dataset` in the image-text schema (one row per caption),
streaming the image records once and counting what was skipped."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Iterator, Mapping

from tqdm.auto import tqdm

from ...feature_formats.columns import GLOBAL_FEATURE_COLUMN, IMAGE_COLUMNS
from ...feature_formats.report import ImportFormatError, ImportReport, check_on_error, log_skips

logger = logging.getLogger(__name__)


def make_pair_row(image: Mapping, caption: str) -> dict:
    """One schema row from an image record and a caption (features are repeated per caption by design)."""
    row = {"image_id": str(image["image_id"]), "caption": caption}
    for key in IMAGE_COLUMNS[1:]:  # the image columns after image_id
        row[key] = image[key]
    if GLOBAL_FEATURE_COLUMN in image:
        row[GLOBAL_FEATURE_COLUMN] = image[GLOBAL_FEATURE_COLUMN]
    return row


def _validate_image(
    image: Mapping, caption: str, index: int, feature_dim: int, num_classes: int | None
) -> None:
    from ..schema import validate_record

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

    from ..schema import DataValidationError, image_text_features

    check_on_error(on_missing, "on_missing")
    check_on_error(on_duplicate, "on_duplicate")
    check_on_error(on_invalid, "on_invalid")
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
    log_skips(report, "caption-feature join (including skips of the feature readers it drove)", before)
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


__all__ = ["build_pair_dataset", "make_pair_row"]
