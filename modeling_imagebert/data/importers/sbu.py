"""SBU Captioned Photo (a captions file and a URLs file, line-aligned): (image_id, caption) pairs, with ids from
the line index or the Flickr photo id in the URL."""

from __future__ import annotations

import os
from collections.abc import Iterator

from ...feature_formats.report import ImportFormatError, ImportReport, check_on_error, log_skips
from .text_files import read_lines


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
    check_on_error(on_error)
    if image_id_style not in ("line", "photo_id"):
        raise ValueError(f"image_id_style must be 'line' or 'photo_id', got {image_id_style!r}")
    report = ImportReport() if report is None else report
    before = report.skipped.copy()
    captions, urls = read_lines(captions_path), read_lines(urls_path)
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
    log_skips(report, str(captions_path), before)


__all__ = ["read_sbu_captions", "sbu_photo_id"]
