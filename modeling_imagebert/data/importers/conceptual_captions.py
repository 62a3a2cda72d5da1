"""Conceptual Captions TSV (caption<TAB>url per line, no header): (image_id, caption) pairs, with ids from the
line index, the URL's SHA-1 or an id column added by a downloader."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator

from ...feature_formats.report import ImportFormatError, ImportReport, check_on_error, log_skips
from .text_files import read_lines

logger = logging.getLogger(__name__)


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
    check_on_error(on_error)
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
    lines = read_lines(path)
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
    log_skips(report, str(path), before)


__all__ = ["read_cc_captions"]
