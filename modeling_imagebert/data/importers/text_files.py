"""Caption text files read as the caption readers need them: UTF-8 (a decoding error names the line and byte) and
split into lines exactly, so line-aligned files (SBU) never shift."""

from __future__ import annotations

import os

from ...feature_formats.report import ImportFormatError
from ...safe_loading import TEXT_MAX_BYTES, InputTooLargeError, read_input_bytes


def decode_text(data: bytes, path: str | os.PathLike) -> str:
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


def read_lines(path: str | os.PathLike) -> list[str]:
    """The lines of a text file, without their endings.

    Lines end with LF (a CR before it is dropped, CRLF files); a file without any LF but with CRs is read as
    CR-only (old Mac) line endings instead of as one long line. A CR alone inside an LF file stays in its line:
    splitting there would shift every later caption of a line-aligned file (SBU) onto the wrong image.
    """
    try:
        data = read_input_bytes(path, "a caption text file", TEXT_MAX_BYTES)
    except (OSError, InputTooLargeError) as error:  # a FIFO or device is refused, never read (it could block)
        raise ImportFormatError(
            f"cannot read the file: {error.strerror or getattr(error, 'reason', None) or error}",
            source=path,
            reason="missing_file",
        ) from None
    text = decode_text(data, path)
    if text.startswith("\ufeff"):  # a UTF-8 byte order mark is not part of the first caption
        text = text[1:]
    separator = "\n" if "\n" in text or "\r" not in text else "\r"
    lines = text.split(separator)
    if lines and lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines] if separator == "\n" else lines


__all__ = ["decode_text", "read_lines"]
