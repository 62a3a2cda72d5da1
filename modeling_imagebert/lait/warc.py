"""Streaming WARC / WARC.gz response records (Common Crawl's format) into decoded HTML pages.

Reading uses FastWARC (resiliparse's C++ WARC reader: several times faster than warcio, same files). Every record
that does not become a `PageRecord` is counted in a `DropCounter` under stage "warc" with one reason:

- `truncated_archive`: the file ends inside a record (a cut gzip member or a short block). A corrupt gzip
  member in the middle of a file is skipped: reading resumes at the next whole gzip member that starts a WARC
  record, whether FastWARC raised at the corrupt member or stopped there quietly (it may read a cut member into
  the next ones and end the stream without an error: every .warc.gz read is checked for whole members after the
  last record FastWARC returned). One corrupt stretch counts once.
- `broken_http_headers`: FastWARC could not parse the HTTP status line / headers of a response.
- `http_status` (not 200), `not_html` (Content-Type other than HTML), `page_too_large` (block over
  `max_page_bytes`, its body is never read into memory), `empty_body`, `undecodable`.

Body decoding: the charset declared in the HTTP Content-Type, else in a `<meta charset>` within the first 2 KB,
is tried strictly (labels read as browsers do, WHATWG: "iso-8859-1" is windows-1252); when it fails (or names an unknown codec) the page counts as `charset_misdeclared` (an event,
not a drop) and the charset is detected with uchardet (`resiliparse.parse.encoding.detect_encoding`). A page
declared Latin-1 / Windows-1252 whose non-ASCII bytes are valid UTF-8 is read as UTF-8 (the most common
mis-declaration on the web; a Latin-1 decoder never fails, so it would otherwise pass as mojibake). A body that
no codec decodes with fewer than `max_replacement_ratio` replaced characters is dropped as `undecodable`.
"""

from __future__ import annotations

import codecs
import gzip
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from fastwarc.warc import ArchiveIterator, WarcRecordType
from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5

from .records import DropCounter, PageRecord

STAGE = "warc"
HTML_TYPES = ("text/html", "application/xhtml+xml")
DEFAULT_MAX_PAGE_BYTES = 2_000_000
_GZIP_MAGIC = b"\x1f\x8b\x08"
_META_CHARSET = re.compile(
    rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]{2,40})""", re.IGNORECASE
)
_LATIN_FAMILY = {"latin-1", "iso8859-1", "cp1252", "iso8859-15", "ascii"}


@dataclass
class WarcResponse:
    """One HTTP response record: provenance, status, headers of interest and the raw payload bytes."""

    warc_file: str
    warc_offset: int
    target_uri: str
    status: int
    content_type: str
    charset: str | None
    body: bytes
    warc_date: str = ""
    content_encoding: str = ""


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(3) == _GZIP_MAGIC


def _member_complete(handle, offset: int) -> bool:
    """True when a whole gzip member starts at `offset` (decompression reaches its end before the file does)."""
    handle.seek(offset)
    inflater = zlib.decompressobj(31)
    try:
        while not inflater.eof:
            chunk = handle.read(1 << 16)
            if not chunk:
                return False
            inflater.decompress(chunk, 1 << 16)
            # A member's tail is in unconsumed_tail when max_length cut the output: keep inflating it.
            while inflater.unconsumed_tail and not inflater.eof:
                inflater.decompress(inflater.unconsumed_tail, 1 << 16)
    except zlib.error:
        return False
    return True


def _plain_record_complete(handle, offset: int, file_size: int) -> bool:
    """True when the uncompressed WARC record at `offset` (header + Content-Length block) fits in the file."""
    handle.seek(offset)
    head = handle.read(1 << 16)
    end = head.find(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head[: end if end >= 0 else len(head)])
    if end < 0 or match is None:
        return False
    return offset + end + 4 + int(match.group(1)) <= file_size


def _record_complete(path: str, offset: int, gz: bool) -> bool:
    with open(path, "rb") as handle:
        if gz:
            return _member_complete(handle, offset)
        return _plain_record_complete(handle, offset, os.path.getsize(path))


def _next_member(path: str, after: int) -> int | None:
    """Offset of the first gzip member after `after` that decompresses, whole, to a WARC record: a member cut short
    (its deflate stream runs into the next member's bytes) is not one, so a resync never lands on the corrupt
    member it is skipping."""
    with open(path, "rb") as handle, open(path, "rb") as probe:
        handle.seek(after + 1)
        position = after + 1
        carry = b""
        while True:
            chunk = handle.read(1 << 20)
            if not chunk:
                return None
            data = carry + chunk
            start = 0
            while (hit := data.find(_GZIP_MAGIC, start)) >= 0:
                candidate = position - len(carry) + hit
                try:
                    head = zlib.decompressobj(31).decompress(data[hit : hit + 4096], 16)
                except zlib.error:
                    head = b""
                if head.startswith(b"WARC/") and _member_complete(probe, candidate):
                    return candidate
                start = hit + 1
            carry = data[-2:]
            position += len(chunk)


def _next_plain_record(path: str, after: int) -> int | None:
    """Offset of the first line starting a WARC record after `after` in an uncompressed WARC file."""
    pattern = re.compile(rb"\n(WARC/1\.[01]\r?\n)")
    with open(path, "rb") as handle:
        handle.seek(after + 1)
        position, carry = after + 1, b""
        while chunk := handle.read(1 << 20):
            data = carry + chunk
            match = pattern.search(data)
            if match is not None:
                return position - len(carry) + match.start(1)
            carry = data[-12:]
            position += len(chunk)
    return None


def iter_responses(
    path: str | os.PathLike,
    drops: DropCounter,
    *,
    max_bytes: int = DEFAULT_MAX_PAGE_BYTES,
    start_offset: int = 0,
    warc_name: str | None = None,
) -> Iterator[WarcResponse]:
    """Streams the HTTP response records of one WARC or WARC.gz file.

    Inputs: `path`; `drops` receives every record that cannot be read (stage "warc": truncated_archive,
    broken_http_headers, page_too_large); `max_bytes` caps a payload (larger ones are skipped unread);
    `start_offset` starts at a record boundary (a `warc_offset` seen before); `warc_name` is the provenance name
    (default: the path as given). Yields `WarcResponse`s in file order; never raises on malformed content, only
    `OSError` when the file cannot be opened.
    """
    path = os.fspath(path)
    name = warc_name if warc_name is not None else path
    gz = _is_gzip(path)
    offset = start_offset
    while offset is not None:
        resume_at = None
        pending: WarcResponse | None = None
        pending_broken = False
        last_offset = offset
        with open(path, "rb") as handle:
            handle.seek(offset)
            # Every record type is iterated (only responses are read), so `last_offset` is where FastWARC really got
            # to: a whole member after it means reading stopped early.
            records = ArchiveIterator(handle, parse_http=True)
            try:
                for record in records:
                    if pending is not None:
                        yield pending
                    elif pending_broken:
                        drops.drop(STAGE, "broken_http_headers")
                    pending, pending_broken = None, False
                    last_offset = record.stream_pos
                    if record.record_type != WarcRecordType.response:
                        continue
                    response, broken = _read_record(record, name, max_bytes, drops)
                    if broken:
                        pending_broken = True
                    else:
                        pending = response
            except OSError:
                # A corrupt gzip member mid-file: the record being read is lost, the next member may be fine.
                if pending is not None:
                    yield pending
                elif pending_broken:
                    drops.drop(STAGE, "broken_http_headers")
                pending, pending_broken = None, False
                drops.drop(STAGE, "truncated_archive")
                resume_at = _next_member(path, last_offset) if gz else _next_plain_record(path, last_offset)
        if resume_at is None and gz:
            # FastWARC can also stop quietly at a corrupt member (a cut member read on into the next ones ends the
            # stream without an error). A whole member after the last record it returned means exactly that.
            later = _next_member(path, last_offset)
            if later is not None:
                if pending is not None:
                    yield pending
                elif pending_broken and _record_complete(path, last_offset, gz):
                    # A whole record with broken headers; the corrupt member comes after it.
                    drops.drop(STAGE, "broken_http_headers")
                pending, pending_broken = None, False
                drops.drop(STAGE, "truncated_archive")
                resume_at = later
        if pending is not None or pending_broken:
            # The last record of a file: an incomplete one means the file was cut, not that the page was broken.
            if pending is not None:
                yield pending
            elif _record_complete(path, last_offset, gz):
                drops.drop(STAGE, "broken_http_headers")
            else:
                drops.drop(STAGE, "truncated_archive")
        offset = resume_at


def _read_record(record, name: str, max_bytes: int, drops: DropCounter) -> tuple[WarcResponse | None, bool]:
    """Reads one FastWARC record; returns (response or None when dropped here, broken-or-short flag)."""
    http = record.http_headers
    if http is None or http.status_code is None:
        return None, True
    declared_length = record.content_length
    if declared_length > max_bytes:
        drops.drop(STAGE, "page_too_large")
        return None, False
    body = record.reader.read(max_bytes + 1)
    if len(body) < declared_length:
        # The stream ended inside the block: only possible for the file's last record, judged by the caller.
        return None, True
    content_type = (record.http_content_type or "").lower()
    response = WarcResponse(
        warc_file=name,
        warc_offset=int(record.stream_pos),
        target_uri=record.headers.get("WARC-Target-URI", "") or "",
        status=int(http.status_code),
        content_type=content_type,
        charset=record.http_charset,
        body=body,
        warc_date=record.headers.get("WARC-Date", "") or "",
        content_encoding=(http.get("Content-Encoding") or "").strip().lower(),
    )
    return response, False


def _codec(label: str | None) -> str | None:
    """Python codec name for a charset label as browsers read it (WHATWG: "iso-8859-1" means windows-1252),
    or None when the label names no known encoding."""
    if not label:
        return None
    label = label.strip().strip("\"'")
    try:
        codecs.lookup(label)
    except LookupError:
        return None
    try:
        return codecs.lookup(map_encoding_to_html5(label)).name
    except LookupError:
        return None


def _strict(body: bytes, codec: str) -> str | None:
    try:
        return body.decode(codec)
    except (UnicodeDecodeError, LookupError):
        return None


def decode_body(
    body: bytes, declared: str | None, drops: DropCounter, *, max_replacement_ratio: float = 0.01
) -> tuple[str, str, str] | None:
    """Decodes an HTML body to text.

    Inputs: raw `body` bytes, the `declared` HTTP charset (or None). Output: (text, codec, source) with source
    "http", "meta" or "detected", or None (counted as `undecodable`) when no codec decodes it with fewer than
    `max_replacement_ratio` replacement characters. Counts events `charset_misdeclared` (a declared charset that
    is wrong or unknown) and `charset_detected` (the charset came from detection).
    """
    source = "http"
    label = declared
    if not label:
        match = _META_CHARSET.search(body[:2048])
        label, source = (match.group(1).decode("ascii", "ignore"), "meta") if match else (None, "")
    codec = _codec(label)
    if label and codec is None:
        drops.event(STAGE, "charset_misdeclared")
    elif codec is not None:
        if codec in _LATIN_FAMILY and not body.isascii():
            utf8 = _strict(body, "utf-8")
            if utf8 is not None:
                drops.event(STAGE, "charset_misdeclared")
                return utf8, "utf-8", "detected"
        text = _strict(body, codec)
        if text is not None:
            return text, codec, source
        drops.event(STAGE, "charset_misdeclared")
    if body.isascii():
        return body.decode("ascii"), "ascii", "detected"
    detected = _codec(detect_encoding(body)) or "utf-8"
    drops.event(STAGE, "charset_detected")
    for candidate in dict.fromkeys((detected, "utf-8")):
        text = _strict(body, candidate)
        if text is not None:
            return text, candidate, "detected"
    text = body.decode(detected, errors="replace")
    if text.count("\ufffd") > max_replacement_ratio * max(len(text), 1):
        drops.drop(STAGE, "undecodable")
        return None
    return text, detected, "detected"


def _looks_like_html(body: bytes) -> bool:
    head = body[:1024].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html")) or b"<body" in head or b"<head" in head


def iter_pages(
    path: str | os.PathLike,
    drops: DropCounter,
    *,
    max_page_bytes: int = DEFAULT_MAX_PAGE_BYTES,
    max_replacement_ratio: float = 0.01,
    start_offset: int = 0,
    warc_name: str | None = None,
) -> Iterator[PageRecord]:
    """Streams the decoded HTML pages of one WARC / WARC.gz file (stage "warc").

    Inputs: as `iter_responses`, plus `max_replacement_ratio` for `decode_body`. Output: `PageRecord`s (one per
    200 HTML response that decodes), in file order; every other record is counted in `drops` by reason and
    `drops.keep("warc")` counts the pages yielded.
    """
    for response in iter_responses(
        path, drops, max_bytes=max_page_bytes, start_offset=start_offset, warc_name=warc_name
    ):
        if response.status != 200:
            drops.drop(STAGE, "http_status")
            continue
        if response.content_type not in HTML_TYPES and not (
            response.content_type == "" and _looks_like_html(response.body)
        ):
            drops.drop(STAGE, "not_html")
            continue
        body = response.body
        if response.content_encoding in ("gzip", "x-gzip") and body.startswith(_GZIP_MAGIC):
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                drops.drop(STAGE, "undecodable")
                continue
            if len(body) > max_page_bytes:
                drops.drop(STAGE, "page_too_large")
                continue
        if not body.strip():
            drops.drop(STAGE, "empty_body")
            continue
        decoded = decode_body(body, response.charset, drops, max_replacement_ratio=max_replacement_ratio)
        if decoded is None:
            continue
        text, codec, source = decoded
        drops.keep(STAGE)
        yield PageRecord(
            warc_file=response.warc_file,
            warc_offset=response.warc_offset,
            page_url=response.target_uri,
            html=text,
            status=response.status,
            content_type=response.content_type,
            charset=codec,
            charset_source=source,
            warc_date=response.warc_date,
            content_length=len(body),
        )


__all__ = ["HTML_TYPES", "WarcResponse", "decode_body", "iter_pages", "iter_responses"]
