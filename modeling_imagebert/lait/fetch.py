"""Where stage 2 of LAIT gets an image's bytes: local copies first, then a bounded HTTP fetcher.

In order (config `images`): image responses stored in the same WARC file (`warc_images`), an img2dataset output
folder (`img2dataset_output`: its webdataset shards, read back by URL), then HTTP(S) with a bounded fetcher
(`fetch_http`): a timeout per socket operation (`timeout_s`), a total deadline (`total_timeout_s`, enforced by
shutting the sockets down, so a server trickling headers or body cannot hold a fetch) and a minimum rate
(`min_bytes_per_s` over each `timeout_s` window of the body), at most `max_redirects` redirects (a URL seen twice
in one chain is a loop), at most `max_bytes` (decoded: a gzip, deflate or br body is decoded in a stream that
stops there, `content_coding`), a Content-Type that must be an image. At scale, write the URL
list with `write_img2dataset_input` and let img2dataset download (see docs/lait.md for the command); img2dataset is
not a dependency (on this machine its install would downgrade pandas and webdataset), we only read the shards it
writes.

A fetch never raises for a network or server fault: it returns a `FetchResult` with a stable drop reason,
`not_found` (HTTP 404/410), `http_error` (any other non-200), `timeout` (no byte for `timeout_s`), `too_slow`
(past `total_timeout_s`, or under `min_bytes_per_s`), `redirect_loop`, `connection_error`
(refused, reset, not HTTP), `truncated` (fewer bytes than the Content-Length), `unsupported_scheme`, `not_an_image`
(Content-Type not image/*, e.g. an HTML error page), `too_large` (bytes over the bound), `undecodable` (a
Content-Encoding that does not decode, or one not supported) or `no_source` (HTTP off and no local copy).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
from .content_coding import CorruptEncoding, DecodedTooLarge, StreamDecoder, UnsupportedEncoding
from .records import ImageCandidate


@dataclass
class FetchResult:
    """Outcome of one fetch: `data` (bytes) or `reason` (a stable drop reason), and what the server said."""

    data: bytes | None = None
    reason: str | None = None
    content_type: str = ""
    final_url: str = ""
    status: int = 0


class _BoundedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `max_redirects` redirects and refuses a URL seen twice in one chain (a loop)."""

    def __init__(self, max_redirects: int):
        super().__init__()
        self.max_redirects = max_redirects
        self.chain: list[str] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        if not self.chain:
            self.chain.append(req.full_url)
        if newurl in self.chain or len(self.chain) > self.max_redirects:
            raise _RedirectLoop(newurl)
        self.chain.append(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RedirectLoop(Exception):
    pass


def _is_timeout(error: BaseException) -> bool:
    if isinstance(error, (TimeoutError, socket.timeout)):
        return True
    reason = getattr(error, "reason", None)
    return isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason or error)


class _Deadline:
    """The total deadline of one fetch: at `seconds`, a timer shuts down every socket the fetch opened, so a read
    blocked on a server that trickles bytes (or headers) returns at once. A socket timeout alone bounds one read,
    not a fetch: a byte every 0.2 s passes a 10 s read timeout forever."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                with contextlib.suppress(OSError):  # already closed: nothing to stop
                    sock.shutdown(socket.SHUT_RDWR)

    def track(self, sock: socket.socket | None) -> None:
        if sock is None:
            return
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self.end

    def cancel(self) -> None:
        with self._lock:
            self._timer.cancel()
            self._sockets.clear()

    def connection(self, base: type[http.client.HTTPConnection]):
        """An `http_class` for urllib's `do_open` whose connections register their socket here."""

        def make(host, **kwargs):
            connection = base(host, **kwargs)
            connect = connection.connect

            def tracked_connect():
                connect()
                self.track(connection.sock)

            connection.connect = tracked_connect
            return connection

        return make


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(self.deadline.connection(http.client.HTTPConnection), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):
        return self.do_open(self.deadline.connection(http.client.HTTPSConnection), req, context=self._context)


class _TooSlow(Exception):
    pass


def fetch_url(url: str, params: Mapping[str, Any]) -> FetchResult:
    """Fetches `url` over HTTP(S) within the bounds of config section `images` (`timeout_s` per socket operation,
    `total_timeout_s` for the whole fetch, `min_bytes_per_s` averaged over each `timeout_s` window of the body,
    `max_redirects`, `max_bytes` of the decoded body, `user_agent`). A body sent with `Content-Encoding` gzip,
    deflate or br is decoded in a stream that stops at `max_bytes`. Output: a `FetchResult` with the body, or
    with the drop reason; never raises for a network or server fault."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return FetchResult(reason="unsupported_scheme", final_url=url)
    timeout = float(params["timeout_s"])
    max_bytes = int(params["max_bytes"])
    min_rate = float(params.get("min_bytes_per_s", 0.0))
    deadline = _Deadline(float(params.get("total_timeout_s", 3 * timeout)))
    redirects = _BoundedRedirects(int(params["max_redirects"]))
    opener = urllib.request.build_opener(redirects, _HTTPHandler(deadline), _HTTPSHandler(deadline))
    request = urllib.request.Request(url, headers={"User-Agent": params["user_agent"], "Accept": "image/*"})
    try:
        with opener.open(request, timeout=timeout) as response:
            return _read_body(response, max_bytes, timeout, min_rate, deadline)
    except _RedirectLoop:
        return FetchResult(reason="redirect_loop", final_url=url)
    except _TooSlow:
        return FetchResult(reason="too_slow", final_url=url)
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            return FetchResult(reason="redirect_loop", final_url=url, status=error.code)
        reason = "not_found" if error.code in (404, 410) else "http_error"
        return FetchResult(reason=reason, final_url=url, status=error.code)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        # HTTPException: a malformed status line, a body cut short (IncompleteRead), oversized headers. A socket
        # shut down at the total deadline surfaces as any of these.
        if deadline.passed():
            return FetchResult(reason="too_slow", final_url=url)
        return FetchResult(reason="timeout" if _is_timeout(error) else "connection_error", final_url=url)
    finally:
        deadline.cancel()


def _read_body(
    response, max_bytes: int, window_s: float, min_rate: float, deadline: _Deadline
) -> FetchResult:
    """The body of an open response within the bounds of `fetch_url`; raises `_TooSlow` past the deadline or
    under the minimum rate."""
    content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
    result = FetchResult(content_type=content_type, final_url=response.geturl(), status=response.status)
    if content_type and not content_type.startswith("image/") and content_type != "application/octet-stream":
        result.reason = "not_an_image"
        return result
    encoding = response.headers.get("Content-Encoding", "").strip().lower()
    declared = response.headers.get("Content-Length")
    declared = int(declared) if declared is not None and declared.isdigit() else None
    if declared is not None and encoding in ("", "identity") and declared > max_bytes:
        result.reason = "too_large"
        return result
    try:
        decoder = StreamDecoder(encoding, max_bytes)
    except UnsupportedEncoding:
        result.reason = "undecodable"
        return result
    chunks, received = [], 0
    window_start, window_bytes = time.monotonic(), 0
    try:
        while True:
            # read1: returns what one socket read gave (read(n) waits for n bytes, however slowly they come).
            chunk = response.read1(65536)
            if deadline.passed():
                raise _TooSlow
            if not chunk:
                break
            received += len(chunk)
            chunks.append(decoder.feed(chunk))
            now = time.monotonic()
            window_bytes += len(chunk)
            if now - window_start >= window_s:
                # The body's rate over the last window (curl's --speed-limit over --speed-time).
                if window_bytes < min_rate * (now - window_start):
                    raise _TooSlow
                window_start, window_bytes = now, 0
        chunks.append(decoder.finish())
    except DecodedTooLarge:
        result.reason = "too_large"
        return result
    except CorruptEncoding:
        result.reason = "truncated" if declared is not None and received < declared else "undecodable"
        return result
    if declared is not None and received < declared:
        # The connection closed early: `read1` returns what came, without an error.
        result.reason = "truncated"
        return result
    result.data = b"".join(chunks)
    return result


# Local copies: images stored in the WARC, img2dataset shards.


def index_warc_images(path: str | Path) -> dict[str, int]:
    """Image responses stored in one WARC / WARC.gz file: `{target URL: record offset}`; a damaged file
    yields the records read before the damage."""
    from warcio.archiveiterator import ArchiveIterator

    index: dict[str, int] = {}
    try:
        with open(path, "rb") as stream:
            records = ArchiveIterator(stream)
            for record in records:
                if record.rec_type != "response" or record.http_headers is None:
                    continue
                content_type = (record.http_headers.get_header("Content-Type") or "").lower()
                if content_type.startswith("image/"):
                    index[record.rec_headers.get_header("WARC-Target-URI")] = records.get_record_offset()
    except Exception:
        # Truncated or broken archives are counted by stage 1's reader; here only what was readable counts.
        pass
    return index


def read_warc_image(path: str | Path, offset: int, max_bytes: int | None = None) -> bytes | None:
    """The HTTP body of the response record at `offset` of a WARC / WARC.gz file, decoded from its
    Content-Encoding (None if unreadable). With `max_bytes`, raises `DecodedTooLarge` past that many decoded
    bytes: read in pieces, so a small gzip body that decodes to gigabytes is never held whole."""
    from warcio.archiveiterator import ArchiveIterator

    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            for record in ArchiveIterator(stream):
                body = record.content_stream()
                if max_bytes is None:
                    return body.read()
                chunks, size = [], 0
                while chunk := body.read(65536):
                    size += len(chunk)
                    if size > max_bytes:
                        raise DecodedTooLarge(f"decoded body over {max_bytes} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
    except DecodedTooLarge:
        raise
    except Exception:
        return None
    return None


def index_img2dataset_output(folder: str | Path) -> dict[str, tuple[str, str]]:
    """Reads an img2dataset webdataset output folder: `{url: (tar path, image member name)}` for every sample
    whose `{key}.json` says status "success"."""
    index: dict[str, tuple[str, str]] = {}
    for tar_path in sorted(Path(folder).glob("*.tar")):
        try:
            with tarfile.open(tar_path) as tar:
                names = set(tar.getnames())
                for name in sorted(n for n in names if n.endswith(".json")):
                    meta = json.loads(tar.extractfile(name).read())
                    key = name[: -len(".json")]
                    image = next(
                        (f"{key}.{e}" for e in ("jpg", "png", "webp") if f"{key}.{e}" in names), None
                    )
                    if image and meta.get("url") and meta.get("status", "success") == "success":
                        index[meta["url"]] = (str(tar_path), image)
        except (tarfile.TarError, OSError, ValueError) as error:
            raise ValueError(f"{tar_path}: not a readable img2dataset webdataset shard ({error})") from None
    return index


def read_img2dataset_image(location: tuple[str, str]) -> bytes | None:
    """The image bytes of one img2dataset sample, `location` as returned by `index_img2dataset_output`."""
    tar_path, member = location
    try:
        with tarfile.open(tar_path) as tar:
            return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, AttributeError):
        return None


def write_img2dataset_input(candidates: Iterable[ImageCandidate], path: str | Path) -> int:
    """Writes the unique image URLs of `candidates` as an img2dataset URL list (parquet with columns `url`,
    `caption` (the first text candidate's raw text) and `page_url`), atomically. Output: the number of URLs.

    Then: `img2dataset --url_list PATH --input_format parquet --url_col url --caption_col caption
    --save_additional_columns '["page_url"]' --output_format webdataset --output_folder images/ --resize_mode no`
    and `images.img2dataset_output: images/` in the LAIT config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows: dict[str, dict[str, str]] = {}
    for candidate in candidates:
        if candidate.image_url not in rows:
            caption = candidate.text_candidates[0].raw if candidate.text_candidates else ""
            rows[candidate.image_url] = {
                "url": candidate.image_url,
                "caption": caption,
                "page_url": candidate.page_url,
            }
    table = pa.Table.from_pylist(
        list(rows.values()), schema=pa.schema([(n, pa.string()) for n in ("url", "caption", "page_url")])
    )
    with atomic_file(Path(path)) as temp:
        pq.write_table(table, temp)
    return len(rows)


@dataclass
class ImageSources:
    """Where stage 2 looks for an image's bytes before fetching it: one WARC file's stored images and an
    img2dataset output folder."""

    warc_file: str | None = None
    warc_index: dict[str, int] = field(default_factory=dict)
    img2dataset_index: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def for_warc_file(cls, warc_file: str, params: Mapping[str, Any], img2dataset_index=None) -> ImageSources:
        """The sources for the pages of `warc_file` under config section `images`."""
        warc_index = index_warc_images(warc_file) if params["warc_images"] else {}
        if img2dataset_index is None and params["img2dataset_output"]:
            img2dataset_index = index_img2dataset_output(params["img2dataset_output"])
        return cls(warc_file, warc_index, img2dataset_index or {})

    def get(self, url: str, params: Mapping[str, Any]) -> FetchResult:
        """The bytes of `url`: a local copy when there is one, else HTTP when allowed."""
        if url in self.warc_index and self.warc_file is not None:
            try:
                data = read_warc_image(self.warc_file, self.warc_index[url], int(params["max_bytes"]))
            except DecodedTooLarge:
                return FetchResult(reason="too_large", final_url=url)
            if data is not None:
                return FetchResult(data=data, final_url=url, status=200)
        if url in self.img2dataset_index:
            data = read_img2dataset_image(self.img2dataset_index[url])
            if data is not None:
                return FetchResult(data=data, final_url=url, status=200)
        if not params["fetch_http"]:
            return FetchResult(reason="no_source", final_url=url)
        return fetch_url(url, params)


__all__ = [
    "FetchResult",
    "ImageSources",
    "fetch_url",
    "index_img2dataset_output",
    "index_warc_images",
    "read_img2dataset_image",
    "read_warc_image",
    "write_img2dataset_input",
]
