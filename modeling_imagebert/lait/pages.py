"""Stage 1: web pages -> the page's dominant images, with DOM features and raw text candidates (ImageBERT §3).

`stage1_pages(page, config, drops)` parses one decoded page with selectolax's Lexbor parser, finds the page's main
content, keeps the page when that content is English, computes DOM features for each `<img>` and keeps the
dominant image(s) by a rule score. Weights, thresholds and word lists are in config section `pages`
(configuration/lait/default.yaml); docs/lait.md measures each signal on a labelled set of real pages.

Main content (one pass over the page's `<p>` and `<img>` elements, in document order). Every paragraph of at least
`content_min_chars` characters whose text is less than half link text scores `1 + commas + one per 100
characters (at most 3)` for its parent and half that for its grandparent; a container whose class/id words are
page furniture (`boilerplate_words`, `negative_words`) keeps a third of its score. The best container scoring at
least `content_min_score` is the content root; the content region is its outermost `<article>`, `<main>`,
`role=main` or `itemprop=articleBody` ancestor within `content_region_levels` levels, else its ancestor
`content_region_fallback` levels up (a lead picture often sits in the article's header, beside the text's own
container). A page without such a container has no content root, and every image falls back on the plain
`<main>`/`<article>` features.

Language (`page_language`): `detect_fast` (resiliparse, a linear-time n-gram identifier whose profiles ship in the
wheel) on the text of the main content's paragraphs, filled up to `language_fill_chars` with the page's other
paragraphs and then its visible text when the content is shorter, cut at `language_sample_chars`; under
`min_text_chars` there is no evidence. Menus, sidebars, comment threads and cookie banners are not the page's
language. `<html lang>` (its primary subtag) decides only when the text gives no answer (too short, or no profile
within `max_language_rank`); when the text answers, it wins over `<html lang>` (pages say `lang="en"` in their
templates whatever the article's language). A mixed page (English navigation around a German forum thread) is in
the language of its main content; a sample detected as a Latin-script language whose letters are more than
`max_non_latin_share` in other scripts (Chinese lyrics with pinyin lines in an English blog template) is
"mixed", not that language.

Dominant images:

    score(img) = bias + sum_f weights[f] * dom_features[f]

over the features in `DOM_FEATURE_NAMES`: inside the content root / region, how early in the content
(`content_position`: 1 before the first content paragraph, 0 after the last), the page's own declared picture
(`meta_image`: og:image, twitter:image, `link rel=image_src`, schema.org `image` of the page's JSON-LD, matched by
URL or by file name without size suffixes), `<figure>`/`<figcaption>`, inside a link to another page (`in_teaser`:
related-article rails and "next story" cards link their pictures to other articles; a lightbox links to the image
itself), inside page furniture (`<nav>`, `<aside>`, or an ancestor whose class/id says menu, sidebar, related,
teaser...; an ancestor that contains the content root is never furniture, and `<header>`/`<footer>` inside the
content region are the article's own, not the page's),
declared or CSS size (log2 of the longer known side over `reference_side`; `small`, `extreme_aspect`), words in the
image's own class/id/alt/src and its near ancestors' class/id (`negative_words`, `positive_words`), file type,
alt/title/figcaption present, same host as the page, repetition of the URL on the page. Without a declared size,
the URL's (`?w=105&h=105`, `resize=865,452`, `/300x200/`, `-1200x630.jpg`); a CSS size in `em`/`ex` units is a
glyph's (a rendered formula). A link to a viewer of the picture (a path saying photo, image, gallery, zoom...) or
to the same picture in another size is no teaser. A page keeps the
best-scoring image when its score reaches `min_score`, and any other image within `keep_margin` of the best (still
>= `min_score`), at most `max_dominant` per page; ties keep DOM order. The other images are counted as
`not_dominant`.

Image URLs: `src`, or when `src` is missing or a placeholder (a `data:` URL, a lazy-load stub, or one URL behind
three or more pictures of the page), the first URL-like `data-*` attribute (`data-src`, `data-lazy-src`,
`data-original`, any `data-*-src`), else the widest `srcset` / `data-srcset` candidate, else the widest candidate
of the parent `<picture>`'s `<source srcset>`. `srcset` is split as the HTML standard does (a URL may contain
commas). A URL whose path is empty or `/` (a script fills the real one in) is no image.

Raw text candidates of each kept image: its alt, its title (or its link's), its figure's figcaption, and the
nearest text block (`nearest_text_block`); with `nearby_title_overlap`, the block is kept only when it shares a
content word with the page's headline (`<h1>`, `<title>`, og:title), and a block with a script in it is skipped.

Site-level repetition (an image URL that appears on many pages of one site is a logo or a template image) needs
the pages of a site together: `apply_site_repetition(candidates_of_one_site, config, drops)` is the group step the
engines run per `ImageCandidate.site`; it adds `site_repeat_log2` to the score and drops candidates whose URL is
the dominant image of more than `max_site_repeat` distinct pages.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import urljoin, urlsplit

from resiliparse.parse.lang import detect_fast
from selectolax.lexbor import LexborHTMLParser, LexborNode

from .records import DropCounter, ImageCandidate, PageRecord, TextCandidate

STAGE = "pages"

DOM_FEATURE_NAMES = (
    "declared_width",
    "declared_height",
    "has_size",
    "log_side_ratio",
    "small",
    "extreme_aspect",
    "depth",
    "order_index",
    "order_fraction",
    "page_image_count",
    "in_main",
    "in_article",
    "in_content",
    "in_content_region",
    "content_position",
    "meta_image",
    "in_figure",
    "in_link",
    "in_teaser",
    "in_boilerplate",
    "negative_word_hits",
    "positive_word_hits",
    "ext_jpg",
    "ext_png",
    "ext_gif",
    "ext_webp",
    "ext_svg",
    "ext_ico",
    "ext_other",
    "has_alt",
    "alt_words",
    "has_title",
    "has_figcaption",
    "same_host",
    "lazy",
    "page_repeat_extra",
    "site_repeat_log2",
)

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
_MEDIA_EXTENSIONS = frozenset((*_EXTENSIONS, "bmp", "tif", "tiff", "mp4", "webm", "mov"))
_FURNITURE_TAGS = frozenset({"nav", "aside"})  # page furniture wherever they are
_EDGE_TAGS = frozenset(
    {"header", "footer"}
)  # furniture only outside the content region (an article has its own)
_CONTENT_REGION_TAGS = frozenset({"article", "main"})
_PX = re.compile(r"^\s*(\d{1,5})(?:\.\d*)?\s*(?:px)?\s*$")
_CSS_SIZE = re.compile(r"(?<![-\w])(width|height)\s*:\s*(\d{1,5}(?:\.\d*)?)\s*(px|em|rem|ex)", re.IGNORECASE)
_CSS_UNIT_PX = {"px": 1.0, "em": 16.0, "rem": 16.0, "ex": 8.0}
# Sizes a URL names when the markup declares none: ?w=105&h=105, resize=W,H, fit=W,H, /300x200/, -1200x630.jpg
_URL_SIZE_QUERY = re.compile(
    r"[?&](?:w|width|h|height|resize|fit)=(\d{2,4})(?:(?:%2C|,|x)(\d{2,4}))?", re.IGNORECASE
)
_URL_SIZE_PATH = re.compile(r"(?<![\d.])(\d{2,4})x(\d{2,4})(?![\d])")
_WORDS = re.compile(r"[a-z]+")
_SRCSET_WIDTH = re.compile(r"^(\d{1,5})w$")
_PLACEHOLDER = re.compile(
    r"placeholder|holder\.|lazy[-_]?load|lazy_place|blank\.|spacer|missing-image|transparent\.|pixel\.gif|grey\.gif"
)
# Picture names without size variants, in two steps: dimension suffixes (-1200x630, -800w, w640, -320-80), then
# also bare trailing numbers and size words (_303 vs _304, -large): the looser name is only used when the first
# does not match.
_DIMENSION_SUFFIX = re.compile(r"(?:[-_.@](?:\d{2,4}x\d{2,4}|\d{2,4}w|w\d{2,4}|[a-z]?\d{2,4}-\d{2,4}))+$")
_LOOSE_SUFFIX = re.compile(r"(?:[-_.@](?:\d{1,4}|large|medium|small|big|thumb|thumbnail))+$")
# A link to a viewer of the picture (a lightbox, a zoom or photo page) is not a teaser of another article.
_VIEWER_WORDS = re.compile(r"photo|image|img|gallery|zoom|enlarge|lightbox|attachment|slide", re.IGNORECASE)
_SCRIPTLIKE = ["script", "style", "noscript", "template", "svg"]
_META_IMAGE_KEYS = frozenset(
    {"og:image", "og:image:url", "og:image:secure_url", "twitter:image", "twitter:image:src", "image"}
)
_JSONLD_SKIP_TYPES = frozenset({"Person", "Organization", "Brand", "WebSite", "NewsMediaOrganization"})
_LETTERS = re.compile(r"[^\W\d_]")
_TITLE_WORD = re.compile(r"[^\W\d_]{3,}")
# English function words: they say nothing about what a headline and a paragraph share
_FUNCTION_WORDS = frozenset(
    "the and for with from this that these those are was were been has have had its his her their our your you "
    "not but all any can will would could should about into over under after before than then there here what "
    "when where which who whom why how out off our also just more most some such only very".split()
)
_NON_LATIN_LETTERS = re.compile(r"[^\W\d_\u0000-\u024f\u1e00-\u1eff]")
# detect_fast codes of languages written in the Latin script (the mixed-script rule of _decide_language)
_LATIN_SCRIPT_LANGUAGES = frozenset(
    "af an ast az br bs ca cs cy da de en eo es et eu fi fo fr fy ga gd gl hr ht hu id is it jv la lb lt lv ms "
    "mt nds nl nn no oc pl pt ro sco sh sk sl sq su sv sw tl tr uz vi wa".split()
)


@dataclass(frozen=True)
class PagesSettings:
    """Config section `pages`, checked and compiled once (see configuration/lait/default.yaml for each key)."""

    max_page_bytes: int
    max_replacement_ratio: float
    languages: frozenset[str]
    max_language_rank: int
    language_sample_chars: int
    min_text_chars: int
    language_fill_chars: int
    max_non_latin_share: float
    use_html_lang: bool
    max_images_per_page: int
    main_content: bool
    content_min_chars: int
    content_min_score: float
    content_region_levels: int
    content_region_fallback: int
    reference_side: float
    small_side: int
    extreme_aspect: float
    word_levels: int
    negative_words: frozenset[str]
    positive_words: frozenset[str]
    boilerplate_words: frozenset[str]
    weights: tuple[tuple[str, float], ...]  # (feature, weight) pairs: hashable and picklable
    bias: float
    min_score: float
    keep_margin: float
    max_dominant: int
    max_site_repeat: int
    nearby_max_levels: int
    nearby_min_words: int
    nearby_max_chars: int
    nearby_title_overlap: bool


_REQUIRED = {
    "max_page_bytes": int,
    "max_replacement_ratio": float,
    "languages": list,
    "max_language_rank": int,
    "language_sample_chars": int,
    "min_text_chars": int,
    "language_fill_chars": int,
    "max_non_latin_share": float,
    "use_html_lang": bool,
    "max_images_per_page": int,
    "main_content": bool,
    "content_min_chars": int,
    "content_min_score": float,
    "content_region_levels": int,
    "content_region_fallback": int,
    "reference_side": float,
    "small_side": int,
    "extreme_aspect": float,
    "word_levels": int,
    "negative_words": list,
    "positive_words": list,
    "boilerplate_words": list,
    "weights": dict,
    "bias": float,
    "min_score": float,
    "keep_margin": float,
    "max_dominant": int,
    "max_site_repeat": int,
    "nearby_max_levels": int,
    "nearby_min_words": int,
    "nearby_max_chars": int,
    "nearby_title_overlap": bool,
}


def _checked_section(section: Mapping[str, Any], name: str, required: Mapping[str, type]) -> dict[str, Any]:
    """Checks a config section's keys and value types; raises ValueError naming the key."""
    unknown = sorted(set(section) - set(required))
    if unknown:
        raise ValueError(
            f"config section {name}: unknown key {name}.{unknown[0]}; known: {', '.join(required)}"
        )
    missing = [key for key in required if key not in section]
    if missing:
        raise ValueError(f"config section {name}: missing key {name}.{missing[0]}")
    values = {}
    for key, kind in required.items():
        value = section[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or isinstance(value, bool) and kind is not bool:
            raise ValueError(f"config {name}.{key}: expected {kind.__name__}, got {value!r}")
        values[key] = float(value) if kind is float else value
    return values


@lru_cache(maxsize=16)
def _settings_from_json(text: str) -> PagesSettings:
    values = _checked_section(json.loads(text), "pages", _REQUIRED)
    unknown = sorted(set(values["weights"]) - set(DOM_FEATURE_NAMES))
    if unknown:
        raise ValueError(
            f"config pages.weights.{unknown[0]}: unknown DOM feature; known: {', '.join(DOM_FEATURE_NAMES)}"
        )
    for key in ("max_images_per_page", "max_dominant", "max_site_repeat", "reference_side", "small_side"):
        if values[key] <= 0:
            raise ValueError(f"config pages.{key}: expected a positive number, got {values[key]!r}")
    for key in ("languages", "negative_words", "positive_words", "boilerplate_words"):
        values[key] = frozenset(str(word).lower() for word in values[key])
    # Immutable: one cached settings object is shared by every call with the same section.
    values["weights"] = tuple(sorted((k, float(v)) for k, v in values["weights"].items()))
    return PagesSettings(**values)


def pages_settings(config: Mapping[str, Any] | PagesSettings | None = None) -> PagesSettings:
    """`PagesSettings` from the `pages` section (or a whole config with a `pages` key; None = the defaults)."""
    if isinstance(config, PagesSettings):
        return config
    if config is None:
        from .config import default_config

        config = default_config()
    section = config["pages"] if "pages" in config else config
    return _settings_from_json(json.dumps(section, sort_keys=True))


def site_of(url: str) -> str:
    """The site key of a URL: its lowercase host without a leading "www." ("" when there is none)."""
    host = (urlsplit(url).hostname or "").lower()
    return host[4:] if host.startswith("www.") else host


def _fast_site(url: str) -> str:
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


def _absolute(base: str, origin: str, raw: str) -> str:
    """`urljoin(base, raw)` with shortcuts for the common absolute, protocol-relative and root-relative forms."""
    if raw.startswith(("http://", "https://")) and " " not in raw and "/." not in raw:
        return raw
    if raw.startswith("//"):
        return urljoin(base, raw)
    if raw.startswith("/") and "/." not in raw and " " not in raw:
        return origin + raw
    return urljoin(base, raw)


def _px(value: str | None) -> int:
    if not value:
        return 0
    match = _PX.match(value)
    return int(match.group(1)) if match else 0


def _words(*texts: str | None) -> list[str]:
    return [word for text in texts if text for word in _WORDS.findall(text.lower())]


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


def _image_source(node: LexborNode, shared: frozenset[str]) -> tuple[str, bool, int]:
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


def _url_size_hint(url: str) -> tuple[int, int]:
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
    match = _URL_SIZE_PATH.search(_url_path(url))
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _url_path(url: str) -> str:
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


def _extension_feature(path: str) -> str:
    path = path.lower()
    dot = path.rfind(".")
    if dot < 0 or "/" in path[dot:]:
        return "ext_other"
    return _EXTENSIONS.get(path[dot + 1 :], "ext_other")


@lru_cache(maxsize=16384)
def _image_keys(url: str) -> tuple[str, str]:
    """A picture's names without its size variant: the file name of the URL's path, lower case, without extension
    and dimension suffixes (`-1200x630`, `-320-80`); then also without trailing numbers and size words (`_800`,
    `-large`). "" for a name too short to identify anything."""
    path = _url_path(url).lower()
    name = path.rsplit("/", 1)[-1]
    dot = name.rfind(".")
    if dot > 0:
        name = name[:dot]
    strict = _DIMENSION_SUFFIX.sub("", name)
    loose = _LOOSE_SUFFIX.sub("", strict)
    return (strict if len(strict) >= 5 else "", loose if len(loose) >= 5 else "")


def _same_picture(first: str, second: str) -> bool:
    """True when two URLs name one picture in two sizes (same file name up to size suffixes)."""
    if first == second:
        return True
    a, b = _image_keys(first), _image_keys(second)
    return bool(a[0] and a[0] == b[0]) or bool(a[1] and a[1] == b[1])


# ---------------------------------------------------------------------------------------------------------------
# the page: main content, language, declared pictures


@dataclass
class _Content:
    """What one pass over a page's paragraphs and images finds."""

    root: int  # mem_id of the content root, 0 when none
    region: int  # mem_id of the content region, 0 when none
    root_ancestors: frozenset[int]  # mem_ids of the content root's ancestors
    paragraphs_before: dict[int, int]  # image mem_id -> content paragraphs before it in document order
    content_paragraphs: int
    content_text: list[str]  # the content root's paragraph texts, in order
    all_text: list[str]  # every counted paragraph's text, in order


def _container_weight(node: LexborNode, settings: PagesSettings) -> float:
    attributes = node.attributes
    words = _words(attributes.get("class"), attributes.get("id"))
    if not words:
        return 1.0
    if not settings.boilerplate_words.isdisjoint(words) or not settings.negative_words.isdisjoint(words):
        return 1.0 / 3.0
    return 1.0


def _find_content(ordered: list[LexborNode], settings: PagesSettings) -> _Content:
    """The content root and region of a page from its <p> and <img> elements in document order (module docstring)."""
    scores: dict[int, list] = {}
    paragraphs: list[tuple[LexborNode, str, int, int]] = []  # (node, text, parent id, grandparent id)
    for node in ordered:
        if node.tag != "p":
            continue
        text = node.text(separator=" ")  # whitespace as in the page; collapsed only in the language sample
        length = len(text.strip())
        if length < settings.content_min_chars:
            continue
        link_chars = sum(len(a.text()) for a in node.css("a")) if node.css_first("a") is not None else 0
        if link_chars * 2 > length:
            continue
        parent = node.parent
        if parent is None:
            continue
        score = 1.0 + text.count(",") + min(length // 100, 3)
        entry = scores.get(parent.mem_id)
        if entry is None:
            scores[parent.mem_id] = entry = [0.0, parent]
        entry[0] += score
        grandparent = parent.parent
        grandparent_id = 0
        if grandparent is not None and grandparent.tag not in ("body", "html", "#document"):
            grandparent_id = grandparent.mem_id
            entry = scores.get(grandparent_id)
            if entry is None:
                scores[grandparent_id] = entry = [0.0, grandparent]
            entry[0] += score / 2
        paragraphs.append((node, text, parent.mem_id, grandparent_id))
    all_text = [text for _, text, _, _ in paragraphs]
    empty = _Content(0, 0, frozenset(), {}, 0, [], all_text)
    if not settings.main_content or not scores:
        return empty
    best_score, best = 0.0, None
    for score, node in scores.values():
        score *= _container_weight(node, settings)
        if score > best_score:
            best_score, best = score, node
    if best is None or best_score < settings.content_min_score:
        return empty
    root = best.mem_id
    # The region: the outermost <article>/<main>/role=main/itemprop=articleBody within content_region_levels (a
    # lead picture often sits in the article's header, beside the text's own container), else the ancestor
    # content_region_fallback levels up.
    root_ancestors, ancestor = set(), best.parent
    while ancestor is not None and ancestor.tag not in ("html", "#document"):
        root_ancestors.add(ancestor.mem_id)
        ancestor = ancestor.parent
    region_node, fallback, ancestor = None, best, best.parent
    for level in range(1, settings.content_region_levels + 1):
        if ancestor is None or ancestor.tag in ("body", "html", "#document"):
            break
        attributes = ancestor.attributes
        if (
            ancestor.tag in _CONTENT_REGION_TAGS
            or attributes.get("role") == "main"
            or attributes.get("itemprop") == "articleBody"
        ):
            region_node = ancestor
        if level <= settings.content_region_fallback:
            fallback = ancestor
        ancestor = ancestor.parent
    if region_node is None:
        region_node = fallback
    # Content paragraphs: the counted paragraphs whose parent or grandparent is the root (the two levels that
    # scored it); each image learns how many of them come before it in the document.
    content = [(node, text) for node, text, parent_id, gp_id in paragraphs if root in (parent_id, gp_id)]
    content_ids = {id(node) for node, _ in content}
    content_text = [text for _, text in content]
    paragraphs_before: dict[int, int] = {}
    seen = 0
    for node in ordered:
        if node.tag != "p":
            paragraphs_before[node.mem_id] = seen
        elif id(node) in content_ids:
            seen += 1
    return _Content(
        root,
        region_node.mem_id,
        frozenset(root_ancestors),
        paragraphs_before,
        len(content_ids),
        content_text,
        all_text,
    )


@dataclass(frozen=True)
class PageLanguage:
    """Stage 1's language decision for one page: `language` (a detect_fast code, "unknown" when no text gives an
    answer), `rank` (detect_fast's out-of-place rank; 0 when not from text), `evidence` ("content", "paragraphs",
    "page", "html_lang" or "none": where the answer came from) and `kept` (the language is in `pages.languages`)."""

    language: str
    rank: float
    evidence: str
    kept: bool


def _html_lang(tree: LexborHTMLParser) -> str:
    node = tree.css_first("html")
    value = (node.attributes.get("lang") or node.attributes.get("xml:lang") or "") if node is not None else ""
    return value.strip().lower().replace("_", "-").split("-", 1)[0]


def _sample(texts: list[str], limit: int) -> str:
    """The texts joined, whitespace collapsed, cut at `limit` characters (only about that much is ever joined)."""
    parts, size = [], 0
    for text in texts:
        parts.append(text)
        size += len(text)
        if size > 2 * limit:
            break
    return " ".join(" ".join(parts).split())[:limit]


def _decide_language(
    tree: LexborHTMLParser, content: _Content, settings: PagesSettings, page_text: Any
) -> PageLanguage:
    """The language rule of the module docstring; `page_text()` gives the page's visible text, computed only when
    the paragraphs are too short."""
    limit, enough = settings.language_sample_chars, settings.language_fill_chars
    evidence, sample = "content", _sample(content.content_text, limit)
    if len(sample) < enough:
        # Short content (a product's two lines): the page's other paragraphs, then all its text, fill it up.
        taken = set(map(id, content.content_text))
        others = [text for text in content.all_text if id(text) not in taken]
        if others:
            evidence = "paragraphs" if not sample else evidence
            sample = _sample([sample, *others], limit)
    if len(sample) < enough:
        evidence = "page" if len(sample) < settings.min_text_chars else evidence
        sample = _sample([sample, page_text()], limit)
    language, rank = "unknown", 0.0
    if len(sample) >= settings.min_text_chars:
        language, rank = detect_fast(sample, cutoff=settings.max_language_rank)
        rank = float(rank)
        if language in _LATIN_SCRIPT_LANGUAGES and not sample.isascii():
            # Chinese lyrics with pinyin lines, or a Russian article in an English shell: n-gram profiles of the
            # mixture can land on a Latin-script language; the letters themselves say it is not one.
            letters = len(_LETTERS.findall(sample))
            if letters and len(_NON_LATIN_LETTERS.findall(sample)) > settings.max_non_latin_share * letters:
                return PageLanguage("mixed", rank, evidence, "*" in settings.languages)
    if language == "unknown":
        declared = _html_lang(tree) if settings.use_html_lang else ""
        if declared:
            return PageLanguage(
                declared, 0.0, "html_lang", declared in settings.languages or "*" in settings.languages
            )
        evidence = "none" if len(sample) < settings.min_text_chars else evidence
    return PageLanguage(language, rank, evidence, language in settings.languages or "*" in settings.languages)


def _visible_text(tree: LexborHTMLParser) -> str:
    body = tree.body
    if body is None:
        return ""
    # Scripts and styles are not language; strip them from the tree (after the images were collected).
    body.strip_tags(_SCRIPTLIKE)
    return body.text(separator=" ", strip=True)


def page_language(html: str, config: Mapping[str, Any] | PagesSettings | None = None) -> PageLanguage:
    """Stage 1's language decision for a decoded page (the rule of the module docstring); `config` as in
    `stage1_pages`. The same decision `stage1_pages` makes before it drops a page as `not_english`."""
    settings = pages_settings(config)
    tree = LexborHTMLParser(html)
    content = _find_content(tree.css("img, p"), settings)
    return _decide_language(tree, content, settings, lambda: _visible_text(tree))


def _jsonld_images(value: Any, out: list[str], depth: int = 0) -> None:
    """URLs under `image` keys of a JSON-LD value, leaving out people's and organisations' pictures."""
    if depth > 8:
        return
    if isinstance(value, dict):
        kind = value.get("@type")
        kinds = kind if isinstance(kind, list) else [kind]
        if any(k in _JSONLD_SKIP_TYPES for k in kinds if isinstance(k, str)):
            return
        for key, item in value.items():
            if key == "image" or key == "thumbnailUrl":
                for url in item if isinstance(item, list) else [item]:
                    if isinstance(url, str):
                        out.append(url)
                    elif isinstance(url, dict) and isinstance(url.get("url") or url.get("contentUrl"), str):
                        out.append(url.get("url") or url.get("contentUrl"))
            elif isinstance(item, (dict, list)):
                _jsonld_images(item, out, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _jsonld_images(item, out, depth + 1)


def _meta_images(tree: LexborHTMLParser, base: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(absolute URLs, strict names, loose names; see `_image_keys`) of the pictures the page declares as its own: og:image, twitter:image,
    `link rel=image_src`, itemprop=image and the schema.org `image` of its JSON-LD."""
    urls: list[str] = []
    head = tree.head
    scope = head if head is not None else tree.root
    if scope is None:
        return frozenset(), frozenset(), frozenset()
    for node in tree.css("meta[property], meta[name], meta[itemprop]"):
        attributes = node.attributes
        key = (
            attributes.get("property") or attributes.get("name") or attributes.get("itemprop") or ""
        ).lower()
        if key in _META_IMAGE_KEYS:
            urls.append((attributes.get("content") or "").strip())
    for node in tree.css("link[rel=image_src]"):
        urls.append((node.attributes.get("href") or "").strip())
    for node in tree.css('script[type="application/ld+json"]'):
        text = node.text()
        if not text or len(text) > 200_000:
            continue
        try:
            _jsonld_images(json.loads(text), urls)
        except ValueError:
            continue
    absolute = set()
    for url in urls:
        if not url or url.startswith("data:"):
            continue
        try:
            absolute.add(urljoin(base, url))
        except ValueError:
            continue
    keys = [_image_keys(url) for url in absolute]
    return frozenset(absolute), frozenset(k[0] for k in keys if k[0]), frozenset(k[1] for k in keys if k[1])


# ---------------------------------------------------------------------------------------------------------------
# images


@dataclass
class _Image:
    node: LexborNode
    url: str
    features: dict[str, float]
    figure: LexborNode | None
    link: LexborNode | None
    score: float = 0.0


@dataclass(frozen=True)
class _PageContext:
    """What every image of one page is judged against."""

    base: str
    origin: str
    page_url: str
    page_site: str
    content: _Content
    meta_urls: frozenset[str]
    meta_strict: frozenset[str]  # `_image_keys` names of the page's declared pictures
    meta_loose: frozenset[str]
    ambiguous: frozenset[
        str
    ]  # names of three or more different <img> URLs of the page: they identify nothing


def _links_to_other_page(href: str, image_url: str, context: _PageContext) -> bool:
    """True when a link goes to another page (a teaser), not to the image itself (a lightbox, a larger size), this
    page, or nowhere."""
    href = href.strip()
    if not href or href.startswith(("#", "javascript:", "mailto:", "data:")):
        return False
    try:
        target = _absolute(context.base, context.origin, href)
    except ValueError:
        return False
    target = target.split("#", 1)[0]
    if target == context.page_url.split("#", 1)[0] or target == image_url:
        return False
    if not target.startswith(("http://", "https://")):
        return False
    if _VIEWER_WORDS.search(target[target.find("/", target.find("://") + 3) :]):
        return False
    path = _url_path(target).lower()
    dot = path.rfind(".")
    if dot >= 0 and "/" not in path[dot:] and path[dot + 1 :] in _MEDIA_EXTENSIONS:
        return False
    return not _same_picture(target, image_url)


def _ancestor_features(
    node: LexborNode, url: str, settings: PagesSettings, context: _PageContext
) -> tuple[dict[str, float], Any, Any, list[str]]:
    """One walk up the DOM: depth, containers, content root/region, link wrapper, furniture and the near ancestors'
    class/id words. An ancestor that contains the content root is not furniture (a wrapper saying "with-sidebar"
    contains the article too), nor a <header>/<footer> inside the content region (the article's own)."""
    depth = 0
    in_main = in_article = in_content = in_region = 0.0
    furniture = edge = False
    holds_content = False  # this ancestor contains the content root: it and those above are not furniture
    figure = link = None
    near_words: list[str] = []
    root, region = context.content.root, context.content.region
    root_ancestors = context.content.root_ancestors
    parent = node.parent
    while parent is not None and depth < 64:
        tag = parent.tag
        if tag in ("#document", "html"):
            break
        depth += 1
        mem_id = parent.mem_id
        if root and mem_id == root:
            in_content = 1.0
        if region and mem_id == region:
            in_region = 1.0
        if not holds_content and (mem_id == root or mem_id in root_ancestors):
            holds_content = True
        if tag == "main":
            in_main = 1.0
        elif tag == "article":
            in_article = 1.0
        elif tag == "figure" and figure is None:
            figure = parent
        elif tag == "a" and link is None:
            link = parent
        elif tag in _FURNITURE_TAGS and not holds_content:
            furniture = True
        elif tag in _EDGE_TAGS and not in_region and not holds_content:
            edge = True
        attributes = parent.attributes
        if attributes:
            words = _words(attributes.get("class"), attributes.get("id"), attributes.get("role"))
            if words:
                if depth <= settings.word_levels:
                    near_words.extend(words)
                if not holds_content and not furniture and not settings.boilerplate_words.isdisjoint(words):
                    furniture = True
                if "main" in words and attributes.get("role") == "main":
                    in_main = 1.0
        parent = parent.parent
    in_boilerplate = furniture or (edge and not in_region)
    features = {
        "depth": float(depth),
        "in_main": in_main,
        "in_article": in_article,
        "in_content": in_content,
        "in_content_region": 1.0 if in_region and not in_content else 0.0,
        "in_figure": 1.0 if figure is not None else 0.0,
        "in_link": 1.0 if link is not None else 0.0,
        "in_teaser": 1.0
        if link is not None and _links_to_other_page(link.attributes.get("href") or "", url, context)
        else 0.0,
        "in_boilerplate": 1.0 if in_boilerplate else 0.0,
    }
    return features, figure, link, near_words


def _image_features(
    node: LexborNode, url: str, lazy: bool, srcset_width: int, settings: PagesSettings, context: _PageContext
) -> tuple[dict[str, float], Any, Any]:
    attributes = node.attributes
    width, height = _px(attributes.get("width")), _px(attributes.get("height"))
    style = attributes.get("style")
    if style:
        for name, value, unit in _CSS_SIZE.findall(style):
            # em/rem/ex: an image sized in text units is a glyph (a rendered formula, an emoji)
            px = int(float(value) * _CSS_UNIT_PX[unit.lower()])
            if name.lower() == "width":
                width = px
            else:
                height = px
    if not width and not height and not srcset_width:
        width, height = _url_size_hint(url)
    features, figure, link, near_words = _ancestor_features(node, url, settings, context)
    side = max(width, height, srcset_width)
    alt = attributes.get("alt") or ""
    path = _url_path(url)
    own_words = _words(attributes.get("class"), attributes.get("id"), alt, path)
    words = set(own_words)
    words.update(near_words)
    content = context.content
    position = 0.0
    if features["in_content"] or features["in_content_region"]:
        before = content.paragraphs_before.get(node.mem_id, 0)
        position = 1.0 - before / content.content_paragraphs if content.content_paragraphs else 1.0
    strict, loose = _image_keys(url)
    features.update(
        {
            "declared_width": float(width),
            "declared_height": float(height),
            "has_size": 1.0 if side else 0.0,
            "log_side_ratio": max(-6.0, min(4.0, math.log2(side / settings.reference_side))) if side else 0.0,
            "small": 1.0
            if (width and width < settings.small_side) or (height and height < settings.small_side)
            else 0.0,
            "extreme_aspect": 1.0
            if width and height and max(width / height, height / width) >= settings.extreme_aspect
            else 0.0,
            "content_position": max(0.0, min(1.0, position)),
            "meta_image": 1.0
            if url in context.meta_urls
            or (strict and strict in context.meta_strict and strict not in context.ambiguous)
            or (loose and loose in context.meta_loose and loose not in context.ambiguous)
            else 0.0,
            "negative_word_hits": float(len(words & settings.negative_words)),
            "positive_word_hits": float(len(words & settings.positive_words)),
            "has_alt": 1.0 if alt.strip() else 0.0,
            "alt_words": float(len(alt.split())),
            "has_title": 1.0 if (attributes.get("title") or "").strip() else 0.0,
            "has_figcaption": 0.0,
            "same_host": 1.0 if _fast_site(url) == context.page_site else 0.0,
            "lazy": 1.0 if lazy else 0.0,
        }
    )
    for name in ("ext_jpg", "ext_png", "ext_gif", "ext_webp", "ext_svg", "ext_ico", "ext_other"):
        features[name] = 0.0
    features[_extension_feature(path)] = 1.0
    if figure is not None and figure.css_first("figcaption") is not None:
        features["has_figcaption"] = 1.0
    return features, figure, link


def score_features(features: Mapping[str, float], settings: PagesSettings) -> float:
    """The rule score: `bias + sum(weights[f] * features[f])` over the weighted features."""
    score = settings.bias
    for name, weight in settings.weights:
        value = features.get(name)
        if value:
            score += weight * value
    return score


def _text_block(node: LexborNode) -> str:
    return " ".join(node.text(separator=" ", strip=True).split())


def _cut(text: str, max_chars: int) -> str:
    """`text` cut to at most `max_chars`: after the last sentence end that fits, else at a word boundary."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    end = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if end >= max_chars // 4:
        return head[: end + 1]
    return head.rsplit(" ", 1)[0]


def _sibling(node: LexborNode, forward: bool) -> LexborNode | None:
    """The next (or previous) sibling that is an element or a non-blank text node."""
    sibling = node.next if forward else node.prev
    while (
        sibling is not None
        and not sibling.is_element_node
        and not (sibling.is_text_node and (sibling.text_content or "").strip())
    ):
        sibling = sibling.next if forward else sibling.prev
    return sibling


def nearest_text_block(node: LexborNode, settings: PagesSettings, exclude: str = "") -> str:
    """The text block nearest to `node`: going up from the image (at most `nearby_max_levels` ancestors), the
    first next-or-previous sibling whose text has at least `nearby_min_words` words; "" when there is none.

    Text longer than `nearby_max_chars` is cut after its last whole sentence that fits, else at a word boundary
    (a whole article is not one description);
    `exclude` (e.g. the figcaption already taken) is removed from the block.
    """
    current = node
    for _ in range(settings.nearby_max_levels):
        for forward in (True, False):
            candidate = _sibling(current, forward)
            if candidate is None or candidate.tag in _SCRIPTLIKE:
                continue
            # A block with a script in it is an ad or a widget (and its text would be the script's code).
            if candidate.is_element_node and candidate.css_first("script, style") is not None:
                continue
            text = _text_block(candidate)
            if exclude and exclude in text:
                text = " ".join(text.replace(exclude, " ").split())
            if len(text.split()) >= settings.nearby_min_words:
                return _cut(text, settings.nearby_max_chars)
        current = current.parent
        if current is None or current.tag in ("body", "html", "#document"):
            break
    return ""


def _title_words(tree: LexborHTMLParser) -> frozenset[str]:
    """Content words (three letters or more, not function words) of the page's headline: its first <h1>, its
    <title> and og:title."""
    texts = []
    for selector in ("h1", "title"):
        node = tree.css_first(selector)
        if node is not None:
            texts.append(node.text(separator=" "))
    node = tree.css_first('meta[property="og:title"]')
    if node is not None:
        texts.append(node.attributes.get("content") or "")
    return frozenset(w for w in _TITLE_WORD.findall(" ".join(texts).lower()) if w not in _FUNCTION_WORDS)


def _raw_text_candidates(
    image: _Image, settings: PagesSettings, title_words: frozenset[str]
) -> list[TextCandidate]:
    """The image's alt, title (its own or its link's), figcaption and nearby text block. The nearby block is
    surrounding text, not a caption: with `nearby_title_overlap` it is kept only when it shares a content word with
    the page's headline (a paragraph that does not mention what the page is about rarely describes its picture)."""
    attributes = image.node.attributes
    candidates = []
    alt = " ".join((attributes.get("alt") or "").split())
    if alt:
        candidates.append(TextCandidate(source="alt", raw=alt))
    title = attributes.get("title") or (
        image.link.attributes.get("title") if image.link is not None else None
    )
    title = " ".join((title or "").split())
    if title:
        candidates.append(TextCandidate(source="title", raw=title))
    caption = ""
    if image.figure is not None:
        node = image.figure.css_first("figcaption")
        caption = _text_block(node) if node is not None else ""
        if caption:
            candidates.append(TextCandidate(source="figcaption", raw=caption))
    nearby = nearest_text_block(image.node, settings, exclude=caption)
    if nearby and settings.nearby_title_overlap and title_words:
        if title_words.isdisjoint(_TITLE_WORD.findall(nearby.lower())):
            nearby = ""
    if nearby:
        candidates.append(TextCandidate(source="nearby", raw=nearby))
    return candidates


def stage1_pages(
    page: PageRecord, config: Mapping[str, Any] | PagesSettings | None, drops: DropCounter
) -> list[ImageCandidate]:
    """Stage 1: one page -> its dominant image candidates (at most `max_dominant`), best first.

    Inputs: a decoded `PageRecord`; `config` the `pages` section (or the whole config, or a `PagesSettings`);
    `drops` receives page-level drops (`not_english`, `unparsable_html`, `no_images`, `no_dominant_image`) and
    one `not_dominant` per losing image; `drops.keep("pages", n)` counts the candidates returned. Output:
    `ImageCandidate`s with absolute `image_url`, `dom_features` (`DOM_FEATURE_NAMES`), `dominance_score`,
    page language and the raw text candidates (alt, title, figcaption, nearby; cleaned by stage 3).
    """
    settings = pages_settings(config)
    try:
        tree = LexborHTMLParser(page.html)
    except Exception:  # selectolax raises its own error types for inputs Lexbor refuses; one reason for all
        drops.drop(STAGE, "unparsable_html")
        return []
    ordered = tree.css("img, p")
    nodes = [node for node in ordered if node.tag == "img"]
    if not nodes:
        drops.drop(STAGE, "no_images")
        return []
    content = _find_content(ordered, settings)
    # The visible-text fallback strips scripts from a tree: a second parse, so this one keeps its <noscript> copies.
    language = _decide_language(tree, content, settings, lambda: _visible_text(LexborHTMLParser(page.html)))
    if not language.kept:
        drops.drop(STAGE, "not_english")
        return []
    base = page.page_url
    base_node = tree.css_first("base[href]")
    try:
        if base_node is not None:
            base = urljoin(base, (base_node.attributes.get("href") or "").strip())
        page_site = site_of(page.page_url)
        parts = urlsplit(base)
    except ValueError:  # urllib refuses e.g. a broken IPv6 host
        drops.drop(STAGE, "invalid_page_url")
        return []
    origin = f"{parts.scheme}://{parts.netloc}"
    meta_urls, meta_strict, meta_loose = _meta_images(tree, base)
    nodes = nodes[: settings.max_images_per_page]
    src_counts: dict[str, int] = {}
    for node in nodes:
        src = (node.attributes.get("src") or "").strip()
        if src:
            src_counts[src] = src_counts.get(src, 0) + 1
    shared = frozenset(src for src, count in src_counts.items() if count >= 3)
    sources = []
    for node in nodes:
        raw, lazy, srcset_width = _image_source(node, shared)
        if not raw or raw.startswith(("data:", "javascript:", "about:", "#")):
            continue
        try:
            url = _absolute(base, origin, raw)
        except ValueError:  # an unparsable image URL is not a candidate
            drops.event(STAGE, "invalid_image_url")
            continue
        # No path, or the site's root: a script fills the real picture in; this URL is a page, not an image.
        if not url.startswith(("http://", "https://")) or len(_url_path(url)) <= 1:
            continue
        sources.append((node, url, lazy, srcset_width))
    key_urls: dict[str, set[str]] = {}
    for _, url, _, _ in sources:
        for key in _image_keys(url):
            if key:
                key_urls.setdefault(key, set()).add(url)
    context = _PageContext(
        base=base,
        origin=origin,
        page_url=page.page_url,
        page_site=page_site,
        content=content,
        meta_urls=meta_urls,
        meta_strict=meta_strict,
        meta_loose=meta_loose,
        ambiguous=frozenset(key for key, urls in key_urls.items() if len(urls) >= 3),
    )
    images: list[_Image] = []
    for node, url, lazy, srcset_width in sources:
        try:
            features, figure, link = _image_features(node, url, lazy, srcset_width, settings, context)
        except ValueError:  # an unparsable image URL is not a candidate
            drops.event(STAGE, "invalid_image_url")
            continue
        images.append(_Image(node=node, url=url, features=features, figure=figure, link=link))
    if not images:
        drops.drop(STAGE, "no_images")
        return []
    repeats: dict[str, int] = {}
    for image in images:
        repeats[image.url] = repeats.get(image.url, 0) + 1
    count = len(images)
    for index, image in enumerate(images):
        image.features["order_index"] = float(index)
        image.features["order_fraction"] = index / (count - 1) if count > 1 else 0.0
        image.features["page_image_count"] = float(count)
        image.features["page_repeat_extra"] = float(repeats[image.url] - 1)
        image.features["site_repeat_log2"] = 0.0
        image.score = score_features(image.features, settings)
    # One candidate per distinct URL (its best occurrence); ranking keeps DOM order among equal scores.
    best: dict[str, _Image] = {}
    for image in images:
        if image.url not in best or image.score > best[image.url].score:
            best[image.url] = image
    ranked = sorted(best.values(), key=lambda image: -image.score)
    top = ranked[0].score
    if top < settings.min_score:
        drops.drop(STAGE, "no_dominant_image")
        drops.drop(STAGE, "not_dominant", len(ranked))
        return []
    kept = [
        image
        for image in ranked
        if image.score >= settings.min_score and image.score >= top - settings.keep_margin
    ][: settings.max_dominant]
    if len(ranked) > len(kept):
        drops.drop(STAGE, "not_dominant", len(ranked) - len(kept))
    drops.keep(STAGE, len(kept))
    title_words = _title_words(tree) if settings.nearby_title_overlap else frozenset()
    return [
        ImageCandidate(
            warc_file=page.warc_file,
            warc_offset=page.warc_offset,
            page_url=page.page_url,
            site=page_site,
            image_url=image.url,
            dom_features=image.features,
            dominance_score=image.score,
            language=language.language,
            language_score=language.rank,
            text_candidates=_raw_text_candidates(image, settings, title_words),
        )
        for image in kept
    ]


def apply_site_repetition(
    candidates: Iterable[ImageCandidate], config: Mapping[str, Any] | PagesSettings | None, drops: DropCounter
) -> list[ImageCandidate]:
    """Group step of stage 1 over the candidates of ONE site (same `ImageCandidate.site`).

    Counts on how many distinct pages each image URL was a dominant candidate, stores `site_repeat_log2`
    (log2 of that count) in `dom_features`, adds its weighted value to `dominance_score`, and drops (reason
    `site_repeated_image`) candidates whose URL repeats on more than `max_site_repeat` pages, or whose new score
    falls under `min_score`. Output: the kept candidates, in input order (the input is not modified).
    """
    settings = pages_settings(config)
    candidates = list(candidates)
    pages_per_url: dict[str, set[str]] = {}
    for candidate in candidates:
        pages_per_url.setdefault(candidate.image_url, set()).add(candidate.page_url)
    kept = []
    weight = dict(settings.weights).get("site_repeat_log2", 0.0)
    for candidate in candidates:
        repeat = len(pages_per_url[candidate.image_url])
        log_repeat = math.log2(repeat)
        score = candidate.dominance_score + weight * (
            log_repeat - candidate.dom_features.get("site_repeat_log2", 0.0)
        )
        if repeat > settings.max_site_repeat or score < settings.min_score:
            drops.drop(STAGE, "site_repeated_image")
            continue
        features = dict(candidate.dom_features)
        features["site_repeat_log2"] = log_repeat
        kept.append(
            ImageCandidate.from_dict(
                {**candidate.to_dict(), "dom_features": features, "dominance_score": score}
            )
        )
    return kept


__all__ = [
    "DOM_FEATURE_NAMES",
    "PageLanguage",
    "PagesSettings",
    "apply_site_repetition",
    "nearest_text_block",
    "page_language",
    "pages_settings",
    "parse_srcset",
    "score_features",
    "site_of",
    "stage1_pages",
]
