"""Where stage 2 of LAIT gets an image's bytes: local copies first, then a bounded HTTP fetcher.

In order (config `images`): image responses stored in the same WARC file (`warc_images`), an img2dataset output
folder (`img2dataset_output`: its webdataset shards, read back by URL), then HTTP(S) with a bounded fetcher
(`fetch_http`): a timeout per socket operation and a total deadline, at most `max_redirects` redirects (a URL seen
twice in one chain is a loop), at most `max_bytes`, a Content-Type that must be an image. At scale, write the URL
list with `write_img2dataset_input` and let img2dataset download (see docs/lait.md for the command); img2dataset is
not a dependency (on this machine its install would downgrade pandas and webdataset), we only read the shards it
writes.

A fetch never raises for a network or server fault: it returns a `FetchResult` with a stable drop reason,
`not_found` (HTTP 404/410), `http_error` (any other non-200), `timeout`, `redirect_loop`, `connection_error`
(refused, reset, not HTTP), `truncated` (fewer bytes than the Content-Length), `unsupported_scheme`, `not_an_image`
(Content-Type not image/*, e.g. an HTML error page), `too_large` (bytes over the bound) or `no_source` (HTTP off and
no local copy).
"""

from __future__ import annotations

import http.client
import json
import socket
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_file
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


def fetch_url(url: str, params: Mapping[str, Any]) -> FetchResult:
    """Fetches `url` over HTTP(S) within the bounds of config section `images` (`timeout_s`, `max_redirects`,
    `max_bytes`, `user_agent`). Output: a `FetchResult` with the body, or with the drop reason; never raises for
    a network or server fault."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return FetchResult(reason="unsupported_scheme", final_url=url)
    timeout = float(params["timeout_s"])
    max_bytes = int(params["max_bytes"])
    redirects = _BoundedRedirects(int(params["max_redirects"]))
    opener = urllib.request.build_opener(redirects)
    request = urllib.request.Request(url, headers={"User-Agent": params["user_agent"], "Accept": "image/*"})
    deadline = time.monotonic() + 3 * timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            result = FetchResult(
                content_type=content_type, final_url=response.geturl(), status=response.status
            )
            if (
                content_type
                and not content_type.startswith("image/")
                and content_type != "application/octet-stream"
            ):
                result.reason = "not_an_image"
                return result
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                result.reason = "too_large"
                return result
            chunks, size = [], 0
            while True:
                # A server that trickles bytes would pass the per-read timeout forever: a total deadline too.
                if time.monotonic() > deadline:
                    result.reason = "timeout"
                    return result
                chunk = response.read(min(65536, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    result.reason = "too_large"
                    return result
            if declared is not None and declared.isdigit() and size < int(declared):
                # The connection closed early: `read(n)` returns what came, without an error.
                result.reason = "truncated"
                return result
            result.data = b"".join(chunks)
            return result
    except _RedirectLoop:
        return FetchResult(reason="redirect_loop", final_url=url)
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            return FetchResult(reason="redirect_loop", final_url=url, status=error.code)
        reason = "not_found" if error.code in (404, 410) else "http_error"
        return FetchResult(reason=reason, final_url=url, status=error.code)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        # HTTPException: a malformed status line, a body cut short (IncompleteRead), oversized headers.
        return FetchResult(reason="timeout" if _is_timeout(error) else "connection_error", final_url=url)


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


def read_warc_image(path: str | Path, offset: int) -> bytes | None:
    """The HTTP body of the response record at `offset` of a WARC / WARC.gz file (None if unreadable)."""
    from warcio.archiveiterator import ArchiveIterator

    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            for record in ArchiveIterator(stream):
                return record.content_stream().read()
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
            data = read_warc_image(self.warc_file, self.warc_index[url])
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
