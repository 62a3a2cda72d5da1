"""Streaming WARC / WARC.gz and ARC / ARC.gz response records (Common Crawl's format, and the Internet Archive's
older one) into decoded HTML pages.

WARC reading uses FastWARC (resiliparse's C++ WARC reader: several times faster than warcio, same files). FastWARC
does not read ARC, the format before WARC (a `filedesc://` header record, then one line `URL IP date mime length`
per record followed by that many bytes of HTTP response); `iter_responses` reads it with its own reader, plain or
gzipped (one member per record, or one for the whole file), version 1 and 2 header lines, URLs with spaces. Every
record that does not become a `PageRecord` is counted in a `DropCounter` under stage "warc" with one reason:

- `truncated_archive`: the file ends inside a record (a cut gzip member or a short block). A corrupt gzip member
  in the middle of a WARC.gz file is skipped: reading resumes at the next whole gzip member that starts a WARC
  record, whether FastWARC raised at the corrupt member or stopped there quietly (it may read a cut member into
  the next ones and end the stream without an error: every .warc.gz read is checked for whole members after the
  last record FastWARC returned). One corrupt stretch counts once. An ARC record whose declared length runs past
  the end of the file is complete after all when its HTTP response is (its body has its Content-Length): ARC
  files whose line endings were rewritten (CRLF to LF) keep their old lengths. A corrupt member of an ARC.gz
  file ends the reading of that file.
- `broken_warc_record` (ARC): a record header line that is not `URL IP date mime length` with a numeric length;
  a reader cannot know where such a record ends, so reading resumes at the next line that is a record header.
- `broken_http_headers`: the HTTP status line / headers of a response cannot be parsed.
- `http_status` (not 200), `not_html` (Content-Type other than HTML), `page_too_large` (block over
  `max_page_bytes`, its body is never read into memory; or a `Content-Encoding` gzip / deflate / br body that
  decodes past it, decoded in a stream stopped at the bound: `content_coding`), `empty_body`, `undecodable`.

Variants read as well-formed: a whole-file gzip instead of one member per record, gzip members that do not end
at record boundaries, an HTTP body sent with `Transfer-Encoding: chunked` (de-chunked here; a body whose chunks
do not parse is kept as it is), a `WARC-Target-URI` in angle brackets (wget writes `<http://...>`). Request,
metadata, revisit, resource and warcinfo records are read past without a count; docs/lait.md has the table of
warcio's test files and what each gives.

Body decoding: the charset declared in the HTTP Content-Type, else in a `<meta charset>` within the first 2 KB,
is tried strictly (labels read as browsers do, WHATWG: "iso-8859-1" is windows-1252); when it fails (or names an unknown codec) the page counts as `charset_misdeclared` (an event,
not a drop) and the charset is detected with uchardet (`resiliparse.parse.encoding.detect_encoding`). A page
declared Latin-1 / Windows-1252 whose non-ASCII bytes are valid UTF-8 is read as UTF-8 (the most common
mis-declaration on the web; a Latin-1 decoder never fails, so it would otherwise pass as mojibake). A body that
no codec decodes with fewer than `max_replacement_ratio` replaced characters is dropped as `undecodable`.
"""

from __future__ import annotations

import codecs
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

from fastwarc.warc import ArchiveIterator, WarcRecordType
from resiliparse.parse.encoding import detect_encoding, map_encoding_to_html5

from .content_coding import CorruptEncoding, DecodedTooLarge, UnsupportedEncoding
from .content_coding import decode_body as decode_content
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
    transfer_encoding: str = ""


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
    if _is_arc(path, gz):
        yield from _iter_arc(path, name, drops, max_bytes, start_offset, gz)
        return
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
        target_uri=_clean_target_uri(record.headers.get("WARC-Target-URI", "") or ""),
        status=int(http.status_code),
        content_type=content_type,
        charset=record.http_charset,
        body=body,
        warc_date=record.headers.get("WARC-Date", "") or "",
        content_encoding=(http.get("Content-Encoding") or "").strip().lower(),
        transfer_encoding=(http.get("Transfer-Encoding") or "").strip().lower(),
    )
    return response, False


def _clean_target_uri(uri: str) -> str:
    """A target URI as written, without the angle brackets wget puts around it."""
    uri = uri.strip()
    if uri.startswith("<") and uri.endswith(">"):
        uri = uri[1:-1].strip()
    return uri


def dechunk(body: bytes) -> bytes | None:
    """The payload of an HTTP body sent with `Transfer-Encoding: chunked` (hex size line, data, CRLF, ... a zero
    size); None when the chunks do not parse."""
    out, position, size_line = [], 0, re.compile(rb"([0-9a-fA-F]{1,8})[ \t]*(?:;[^\r\n]*)?\r?\n")
    while True:
        match = size_line.match(body, position)
        if match is None:
            return None
        size = int(match.group(1), 16)
        position = match.end()
        if size == 0:
            return b"".join(out)
        if position + size > len(body):
            return None
        out.append(body[position : position + size])
        position += size
        if body.startswith(b"\r\n", position):
            position += 2
        elif body.startswith(b"\n", position):
            position += 1


# ---------------------------------------------------------------------------------------------------------------
# ARC


_ARC_HEADER = re.compile(rb"^\S+://\S")


class _ArcStream:
    """Sequential reads of an ARC file's bytes, plain or gzipped (one member per record, or one for the whole file).
    `offset_of(position)` is the provenance offset of a decompressed position: the file offset for a plain file,
    the start of the gzip member holding it for a gzipped one. Reads never raise on a corrupt member: `corrupt`
    is set and the stream ends there."""

    def __init__(self, handle, gz: bool, start_offset: int):
        self.handle, self.gz = handle, gz
        self.buffer = b""
        self.position = 0  # decompressed position of buffer[0]
        self.corrupt = False
        self.done = False
        self.compressed = start_offset  # compressed bytes consumed so far (absolute file offset)
        self.members: list[tuple[int, int]] = [
            (0, start_offset)
        ]  # (decompressed start, file offset) per member
        self.member_open = False  # a gzip member has begun and not ended
        self.inflater = zlib.decompressobj(31) if gz else None
        handle.seek(start_offset)

    def _fill(self, size: int) -> None:
        while len(self.buffer) < size and not self.done:
            chunk = self.handle.read(1 << 16)
            if not chunk:
                self.done = True
                # The file ends inside a gzip member: it was cut.
                self.corrupt = self.corrupt or self.member_open
                return
            if not self.gz:
                self.buffer += chunk
                continue
            data = chunk
            while data:
                try:
                    self.buffer += self.inflater.decompress(data)
                except zlib.error:
                    self.corrupt = self.done = True
                    return
                self.member_open = not self.inflater.eof
                if self.inflater.eof:
                    used = len(data) - len(self.inflater.unused_data)
                    self.compressed += used
                    data = self.inflater.unused_data
                    self.inflater = zlib.decompressobj(31)
                    self.members.append((self.position + len(self.buffer), self.compressed))
                else:
                    self.compressed += len(data)
                    data = b""

    def readline(self, limit: int = 1 << 16) -> bytes:
        while True:
            end = self.buffer.find(b"\n", 0, limit)
            if end >= 0 or len(self.buffer) >= limit or self.done:
                break
            self._fill(len(self.buffer) + (1 << 16))
        end = self.buffer.find(b"\n", 0, limit)
        cut = end + 1 if end >= 0 else min(len(self.buffer), limit)
        line, self.buffer = self.buffer[:cut], self.buffer[cut:]
        self.position += cut
        return line

    def read(self, size: int) -> bytes:
        self._fill(size)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        self.position += len(data)
        return data

    def skip(self, size: int) -> int:
        """Skips `size` bytes without keeping them; returns how many were there."""
        skipped = 0
        while skipped < size:
            self._fill(min(size - skipped, 1 << 20))
            if not self.buffer:
                break
            take = min(len(self.buffer), size - skipped)
            self.buffer = self.buffer[take:]
            self.position += take
            skipped += take
        return skipped

    def offset_of(self, position: int) -> int:
        if not self.gz:
            return position + self.members[0][1]
        offset = self.members[0][1]
        for start, member_offset in self.members:
            if start > position:
                break
            offset = member_offset
        return offset


def _is_arc(path: str, gz: bool) -> bool:
    """True when the file is an ARC file: it starts with a `filedesc://` header (decompressed)."""
    with open(path, "rb") as handle:
        head = handle.read(4096)
    if gz:
        try:
            head = zlib.decompressobj(31).decompress(head, 64)
        except zlib.error:
            return False
    return head.lstrip().startswith(b"filedesc://")


def _parse_http(data: bytes) -> tuple[int, dict[str, str], bytes] | None:
    """(status, lower-cased headers, body) of an HTTP response as ARC stores it, None when it is not one."""
    end = data.find(b"\r\n\r\n")
    separator = 4
    alternative = data.find(b"\n\n")
    if end < 0 or (0 <= alternative < end):
        end, separator = alternative, 2
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").splitlines()
    if not lines:
        return None
    status_line = lines[0].split(None, 2)
    if len(status_line) < 2 or not status_line[0].upper().startswith("HTTP/") or not status_line[1].isdigit():
        return None
    headers = {}
    for line in lines[1:]:
        key, colon, value = line.partition(":")
        if colon:
            headers[key.strip().lower()] = value.strip()
    return int(status_line[1]), headers, data[end + separator :]


def _iter_arc(
    path: str, name: str, drops: DropCounter, max_bytes: int, start_offset: int, gz: bool
) -> Iterator[WarcResponse]:
    """The HTTP responses of an ARC / ARC.gz file (see the module docstring for the counts)."""
    version = 1
    with open(path, "rb") as handle:
        stream = _ArcStream(handle, gz, start_offset)
        resync = cut = False
        while True:
            record_position = stream.position
            line = stream.readline()
            if not line:
                break
            stripped = line.strip()
            if not stripped:
                continue
            if resync and not _ARC_HEADER.match(stripped):
                continue
            resync = False
            fields = stripped.split()
            # v1: URL IP date mime length; v2: URL IP date mime result checksum location offset filename length.
            fixed = 9 if version == 2 else 4
            if len(fields) < fixed + 1 or not _ARC_HEADER.match(stripped) or not fields[-1].isdigit():
                drops.drop(STAGE, "broken_warc_record")
                resync = True
                continue
            length = int(fields[-1])
            uri = b" ".join(fields[: len(fields) - fixed]).decode("utf-8", "replace")
            date = fields[len(fields) - fixed + 1].decode("ascii", "replace")
            if uri.startswith("filedesc://"):
                block = stream.read(min(length, 1 << 16))
                stream.skip(length - len(block))
                first = block.split(b"\n", 1)[0].split()
                version = 2 if first[:1] == [b"2"] else 1
                continue
            if length > max_bytes:
                if stream.skip(length) < length:
                    cut = True
                    break
                drops.drop(STAGE, "page_too_large")
                continue
            data = stream.read(length)
            parsed = _parse_http(data) if uri.startswith(("http://", "https://")) else None
            if len(data) < length:
                # The file ends before the declared length. Complete after all when the HTTP response is (its body
                # has its Content-Length): a length counted before line endings were changed (CRLF -> LF).
                declared = parsed[1].get("content-length", "") if parsed is not None else ""
                if not (declared.isdigit() and len(parsed[2]) >= int(declared)):
                    cut = True
                    break
            if not uri.startswith(("http://", "https://")):
                continue  # dns: and other non-HTTP captures
            if parsed is None:
                drops.drop(STAGE, "broken_http_headers")
                continue
            status, headers, body = parsed
            content_type = headers.get("content-type", "").lower()
            charset = None
            if "charset=" in content_type:
                charset = content_type.split("charset=", 1)[1].split(";", 1)[0].strip().strip("\"'") or None
            yield WarcResponse(
                warc_file=name,
                warc_offset=stream.offset_of(record_position),
                target_uri=uri,
                status=status,
                content_type=content_type.split(";", 1)[0].strip(),
                charset=charset,
                body=body,
                warc_date=date,
                content_encoding=headers.get("content-encoding", "").lower(),
                transfer_encoding=headers.get("transfer-encoding", "").lower(),
            )
        if cut or stream.corrupt:  # one cut file counts once
            drops.drop(STAGE, "truncated_archive")


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


def _encoded(content_encoding: str, body: bytes) -> bool:
    """True when `body` is to be decoded from its Content-Encoding. A crawler often stores the body already
    decoded under the original header: a gzip body must start with the gzip magic to count as coded (a deflate or
    br body that does not decode is kept as stored)."""
    if content_encoding in ("gzip", "x-gzip"):
        return body.startswith(_GZIP_MAGIC)
    return content_encoding in ("deflate", "br")


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
        if "chunked" in response.transfer_encoding:
            payload = dechunk(body)
            body = payload if payload is not None else body
        if _encoded(response.content_encoding, body):
            # Decoded in a stream that stops at max_page_bytes: a small body may decode to gigabytes.
            try:
                body = decode_content(body, response.content_encoding, max_page_bytes)
            except DecodedTooLarge:
                drops.drop(STAGE, "page_too_large")
                continue
            except (CorruptEncoding, UnsupportedEncoding):
                if response.content_encoding in ("deflate", "br"):
                    pass  # stored decoded under the original header (no magic number tells)
                else:
                    drops.drop(STAGE, "undecodable")
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


__all__ = ["HTML_TYPES", "WarcResponse", "dechunk", "decode_body", "iter_pages", "iter_responses"]
