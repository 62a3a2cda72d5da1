"""Image URLs of stage 1 (`pages.py`): which URL an `<img>` shows, what its URL says (size, file type, the
picture's name without size variants) and the page's site.

`image_source`: `src`, or when `src` is missing or a placeholder (a `data:` URL, a lazy-load stub, or one URL
behind three or more pictures of the page), the first URL-like `data-*` attribute (`data-src`, `data-lazy-src`,
`data-original`, any `data-*-src`), else the widest `srcset` / `data-srcset` candidate, else the widest candidate
of the parent `<picture>`'s `<source srcset>`. `srcset` is split as the HTML standard does (a URL may contain
commas; `parse_srcset`). Without a declared size, `url_size_hint` reads the URL's (`?w=105&h=105`,
`resize=865,452`, `/300x200/`, `-1200x630.jpg`). `image_keys` / `same_picture` match one picture in two sizes by
file name without size suffixes.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborNode

_EXTENSIONS = {
    "jpg": "ext_jpg",
    "jpeg": "ext_jpg",
    "jfif": "ext_jpg",
    "png": "ext_png",
    "gif": "ext_gif",
    "webp": "ext_webp",
    "avif": "ext_webp",
    "svg": "ext_svg",
    "ico": "ext_ico",
    "cur": "ext_ico",
}
# File types a link may point to without leaving the picture (a link to one of them is no teaser)
MEDIA_EXTENSIONS = frozenset((*_EXTENSIONS, "bmp", "tif", "tiff", "mp4", "webm", "mov"))
_PX = re.compile(r"^\s*(\d{1,5})(?:\.\d*)?\s*(?:px)?\s*$")
# Sizes a URL names when the markup declares none: ?w=105&h=105, resize=W,H, fit=W,H, /300x200/, -1200x630.jpg
_URL_SIZE_QUERY = re.compile(
    r"[?&](?:w|width|h|height|resize|fit)=(\d{2,4})(?:(?:%2C|,|x)(\d{2,4}))?", re.IGNORECASE
)
_URL_SIZE_PATH = re.compile(r"(?<![\d.])(\d{2,4})x(\d{2,4})(?![\d])")
_SRCSET_WIDTH = re.compile(r"^(\d{1,5})w$")
_PLACEHOLDER = re.compile(
    r"placeholder|holder\.|lazy[-_]?load|lazy_place|blank\.|spacer|missing-image|transparent\.|pixel\.gif|grey\.gif"
)
# Picture names without size variants, in two steps: dimension suffixes (-1200x630, -800w, w640, -320-80), then
# also bare trailing numbers and size words (_303 vs _304, -large): the looser name is only used when the first
# does not match.
_DIMENSION_SUFFIX = re.compile(r"(?:[-_.@](?:\d{2,4}x\d{2,4}|\d{2,4}w|w\d{2,4}|[a-z]?\d{2,4}-\d{2,4}))+$")
_LOOSE_SUFFIX = re.compile(r"(?:[-_.@](?:\d{1,4}|large|medium|small|big|thumb|thumbnail))+$")


def site_of(url: str) -> str:
    """The site key of a URL: its lowercase host without a leading "www." ("" when there is none)."""
    host = (urlsplit(url).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def fast_site(url: str) -> str:
    """`site_of` for an absolute http(s) URL by string slicing (urlsplit is the slowest call per image)."""
    start = url.find("://") + 3
    end = len(url)
    for mark in "/?#":
        found = url.find(mark, start)
        if 0 <= found < end:
            end = found
    host = url[start:end]
    if "@" in host or ":" in host or "[" in host:
        return site_of(url)
    host = host.lower()
    return host[4:] if host.startswith("www.") else host


def absolute(base: str, origin: str, raw: str) -> str:
    """`urljoin(base, raw)` with shortcuts for the common absolute, protocol-relative and root-relative forms."""
    if raw.startswith(("http://", "https://")) and " " not in raw and "/." not in raw:
        return raw
    if raw.startswith("//"):
        return urljoin(base, raw)
    if raw.startswith("/") and "/." not in raw and " " not in raw:
        return origin + raw
    return urljoin(base, raw)


def parse_px(value: str | None) -> int:
    """A `width` / `height` attribute in px (`"300"`, `"300px"`, `"300.5"`); 0 when absent or not in px."""
    if not value:
        return 0
    match = _PX.match(value)
    return int(match.group(1)) if match else 0


def parse_srcset(srcset: str) -> list[tuple[str, int]]:
    """The candidates of a `srcset` as (url, width in px; 0 when not given), split as the HTML standard does: a URL
    runs to the next whitespace (it may contain commas, as in `data:` URLs or `crop=...,...` queries) and a comma
    right after it ends the candidate; otherwise descriptors follow up to the next comma outside parentheses."""
    out = []
    i, n = 0, len(srcset)
    while i < n:
        while i < n and (srcset[i].isspace() or srcset[i] == ","):
            i += 1
        j = i
        while j < n and not srcset[j].isspace():
            j += 1
        url = srcset[i:j]
        descriptors = ""
        if url.endswith(","):
            url = url.rstrip(",")
        else:
            start, depth = j, 0
            while j < n and (srcset[j] != "," or depth):
                depth += (srcset[j] == "(") - (srcset[j] == ")")
                j += 1
            descriptors = srcset[start:j]
        if url:
            width = 0
            for descriptor in descriptors.split():
                match = _SRCSET_WIDTH.match(descriptor)
                if match:
                    width = int(match.group(1))
            out.append((url, width))
        i = j + 1
    return out


def _srcset_best(srcset: str) -> tuple[str, int]:
    """The widest non-`data:` candidate of a `srcset` as (url, width; 0 when not given), ("", 0) when none."""
    best_url, best_width = "", -1
    for url, width in parse_srcset(srcset):
        if not url.startswith("data:") and width > best_width:
            best_url, best_width = url, width
    return best_url, max(best_width, 0)


def _is_placeholder(src: str, shared: frozenset[str]) -> bool:
    return not src or src.startswith("data:") or src in shared or bool(_PLACEHOLDER.search(src.lower()))


def image_source(node: LexborNode, shared: frozenset[str]) -> tuple[str, bool, int]:
    """(raw URL, lazy?, srcset width) of an <img>: a lazy-loading `data-*` URL or a srcset wins over a placeholder
    `src`; an <img> with nothing takes its parent <picture>'s widest <source srcset>."""
    attributes = node.attributes
    src = (attributes.get("src") or "").strip()
    placeholder = _is_placeholder(src, shared)
    if placeholder:
        for key, value in attributes.items():
            if key.startswith("data-") and value and "srcset" not in key and key != "data-sizes":
                value = value.strip()
                if (
                    value
                    and not value.startswith("data:")
                    and " " not in value
                    and ("/" in value or "." in value)
                    and not _PLACEHOLDER.search(value.lower())
                    and ("src" in key or "original" in key or "url" in key or "lazy" in key)
                ):
                    return value, True, 0
    srcset = attributes.get("srcset") or attributes.get("data-srcset") or ""
    srcset_url, srcset_width = _srcset_best(srcset) if srcset else ("", 0)
    if placeholder and srcset_url:
        return srcset_url, bool(attributes.get("data-srcset")), srcset_width
    if not src or src.startswith("data:"):
        parent = node.parent
        if parent is not None and parent.tag == "picture":
            best_url, best_width = "", -1
            for source in parent.css("source"):
                candidate = source.attributes.get("srcset") or source.attributes.get("data-srcset") or ""
                url, width = _srcset_best(candidate)
                if url and width > best_width:
                    best_url, best_width = url, width
            if best_url:
                return best_url, False, max(best_width, 0)
    return src, False, srcset_width


def url_size_hint(url: str) -> tuple[int, int]:
    """(width, height) a URL names (0 when unknown): query parameters w/h/width/height/resize/fit, or a
    `WIDTHxHEIGHT` token in the path (thumbnail services and CMS size variants name their sizes)."""
    width = height = 0
    for match in _URL_SIZE_QUERY.finditer(url):
        key = url[match.start() + 1 : url.index("=", match.start())].lower()
        first, second = int(match.group(1)), int(match.group(2) or 0)
        if key in ("h", "height"):
            height = height or first
        else:
            width = width or first
            height = height or second
    if width or height:
        return width, height
    match = _URL_SIZE_PATH.search(url_path(url))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def url_path(url: str) -> str:
    """The path of an absolute URL (no query or fragment), by string slicing."""
    start = url.find("/", url.find("://") + 3)
    if start < 0:
        return ""
    end = len(url)
    for mark in "?#":
        found = url.find(mark, start)
        if 0 <= found < end:
            end = found
    return url[start:end]


def extension_feature(path: str) -> str:
    path = path.lower()
    dot = path.rfind(".")
    if dot < 0 or "/" in path[dot:]:
        return "ext_other"
    return _EXTENSIONS.get(path[dot + 1 :], "ext_other")


@lru_cache(maxsize=16384)
def image_keys(url: str) -> tuple[str, str]:
    """A picture's names without its size variant: the file name of the URL's path, lower case, without extension
    and dimension suffixes (`-1200x630`, `-320-80`); then also without trailing numbers and size words (`_800`,
    `-large`). "" for a name too short to identify anything."""
    path = url_path(url).lower()
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    if dot > 0:
        name = name[:dot]
    strict = _DIMENSION_SUFFIX.sub("", name)
    loose = _LOOSE_SUFFIX.sub("", strict)
    return (strict if len(strict) >= 5 else "", loose if len(loose) >= 5 else "")


def same_picture(first: str, second: str) -> bool:
    """True when two URLs name one picture in two sizes (same file name up to size suffixes)."""
    if first == second:
        return True
    a, b = image_keys(first), image_keys(second)
    return bool(a[0] and a[0] == b[0]) or bool(a[1] and a[1] == b[1])


__all__ = ["parse_srcset", "site_of"]
