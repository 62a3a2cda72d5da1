"""Stage 1: web pages -> the page's dominant images, with DOM features and raw text candidates (ImageBERT §3).

`stage1_pages(page, config, drops)` parses one decoded page with selectolax's Lexbor parser, keeps it when its
visible text is English (`resiliparse.parse.lang.detect_fast`: a linear-time n-gram identifier whose profiles
ship in the wheel), computes DOM features for each `<img>` and keeps the dominant image(s) by a rule score.

The dominant-image rule (weights and thresholds in config section `pages`):

    score(img) = bias + sum_f weights[f] * dom_features[f]

over the features in `DOM_FEATURE_NAMES`: declared or CSS size (log2 of the longer known side over
`reference_side`; `small` when a declared side is under `small_side` px; `extreme_aspect` for banner shapes),
being inside `<main>`/`<article>`/`<figure>`, inside a link, inside page furniture (`<header>`, `<nav>`,
`<footer>`, `<aside>` or an ancestor whose class/id says header, menu, sidebar...), words in the image's own
class/id/alt/src and its near ancestors' class/id (`negative_words`: logo, icon, avatar, banner, ad, sprite,
button...; `positive_words`: photo, hero, featured...), file type, alt/title/figcaption present, same host as the
page, repetition of the URL on the page. A page keeps the best-scoring image when its score reaches `min_score`,
and any other image within `keep_margin` of the best (still >= `min_score`), at most `max_dominant` per page;
ties keep DOM order. The other images are counted as `not_dominant`.

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
    "in_figure",
    "in_link",
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
_BOILERPLATE_TAGS = frozenset({"header", "nav", "footer", "aside"})
_LAZY_ATTRIBUTES = ("data-src", "data-lazy-src", "data-original", "data-lazy", "data-url")
_PX = re.compile(r"^\s*(\d{1,5})(?:\.\d*)?\s*(?:px)?\s*$")
_CSS_SIZE = re.compile(r"(?<![-\w])(width|height)\s*:\s*(\d{1,5})(?:\.\d*)?\s*px", re.IGNORECASE)
_WORDS = re.compile(r"[a-z]+")
_SRCSET_WIDTH = re.compile(r"^(\d{1,5})w$")
_SCRIPTLIKE = ["script", "style", "noscript", "template", "svg"]


@dataclass(frozen=True)
class PagesSettings:
    """Config section `pages`, checked and compiled once (see configuration/lait/default.yaml for each key)."""

    max_page_bytes: int
    max_replacement_ratio: float
    languages: frozenset[str]
    max_language_rank: int
    language_sample_chars: int
    min_text_chars: int
    max_images_per_page: int
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


_REQUIRED = {
    "max_page_bytes": int,
    "max_replacement_ratio": float,
    "languages": list,
    "max_language_rank": int,
    "language_sample_chars": int,
    "min_text_chars": int,
    "max_images_per_page": int,
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


def _srcset_best(srcset: str) -> tuple[str, int]:
    """The widest candidate of a `srcset` ("a.jpg 640w, b.jpg 1280w") as (url, width; 0 when not given)."""
    best_url, best_width = "", -1
    for part in srcset.split(","):
        pieces = part.split()
        if not pieces:
            continue
        width = 0
        if len(pieces) > 1:
            match = _SRCSET_WIDTH.match(pieces[1])
            width = int(match.group(1)) if match else 0
        if width > best_width:
            best_url, best_width = pieces[0], width
    return best_url, max(best_width, 0)


def _image_source(attributes: Mapping[str, str | None]) -> tuple[str, bool, int]:
    """(raw src, lazy?, srcset width) of an <img>: lazy-loading attributes win over placeholder `src`s."""
    src = (attributes.get("src") or "").strip()
    placeholder = (
        not src or src.startswith("data:") or "blank." in src or "placeholder" in src or "spacer" in src
    )
    if placeholder:
        for key in _LAZY_ATTRIBUTES:
            lazy = (attributes.get(key) or "").strip()
            if lazy and not lazy.startswith("data:"):
                return lazy, True, 0
    srcset = attributes.get("srcset") or attributes.get("data-srcset") or ""
    srcset_url, srcset_width = _srcset_best(srcset) if srcset else ("", 0)
    if placeholder and srcset_url:
        return srcset_url, bool(attributes.get("data-srcset")), srcset_width
    return src, False, srcset_width


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


@dataclass
class _Image:
    node: LexborNode
    url: str
    features: dict[str, float]
    figure: LexborNode | None
    link: LexborNode | None
    score: float = 0.0


def _ancestor_features(
    node: LexborNode, settings: PagesSettings
) -> tuple[dict[str, float], Any, Any, list[str]]:
    """One walk up the DOM: depth, containers, link wrapper, furniture and the near ancestors' class/id words."""
    depth = 0
    in_main = in_article = in_boilerplate = 0.0
    figure = link = None
    near_words: list[str] = []
    parent = node.parent
    while parent is not None and depth < 64:
        tag = parent.tag
        if tag in ("#document", "html"):
            break
        depth += 1
        if tag == "main":
            in_main = 1.0
        elif tag == "article":
            in_article = 1.0
        elif tag == "figure" and figure is None:
            figure = parent
        elif tag == "a" and link is None:
            link = parent
        elif tag in _BOILERPLATE_TAGS:
            in_boilerplate = 1.0
        attributes = parent.attributes
        if attributes:
            words = _words(attributes.get("class"), attributes.get("id"), attributes.get("role"))
            if words:
                if depth <= settings.word_levels:
                    near_words.extend(words)
                if not in_boilerplate and not settings.boilerplate_words.isdisjoint(words):
                    in_boilerplate = 1.0
                if "main" in words and attributes.get("role") == "main":
                    in_main = 1.0
        parent = parent.parent
    features = {
        "depth": float(depth),
        "in_main": in_main,
        "in_article": in_article,
        "in_figure": 1.0 if figure is not None else 0.0,
        "in_link": 1.0 if link is not None else 0.0,
        "in_boilerplate": in_boilerplate,
    }
    return features, figure, link, near_words


def _image_features(
    node: LexborNode, url: str, lazy: bool, srcset_width: int, page_site: str, settings: PagesSettings
) -> tuple[dict[str, float], Any, Any]:
    attributes = node.attributes
    width, height = _px(attributes.get("width")), _px(attributes.get("height"))
    style = attributes.get("style")
    if style:
        for name, value in _CSS_SIZE.findall(style):
            if name.lower() == "width":
                width = int(value)
            else:
                height = int(value)
    features, figure, link, near_words = _ancestor_features(node, settings)
    side = max(width, height, srcset_width)
    alt = attributes.get("alt") or ""
    path = _url_path(url)
    own_words = _words(attributes.get("class"), attributes.get("id"), alt, path)
    words = set(own_words)
    words.update(near_words)
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
            "negative_word_hits": float(len(words & settings.negative_words)),
            "positive_word_hits": float(len(words & settings.positive_words)),
            "has_alt": 1.0 if alt.strip() else 0.0,
            "alt_words": float(len(alt.split())),
            "has_title": 1.0 if (attributes.get("title") or "").strip() else 0.0,
            "has_figcaption": 0.0,
            "same_host": 1.0 if _fast_site(url) == page_site else 0.0,
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


def _language(tree: LexborHTMLParser, settings: PagesSettings) -> tuple[str, float, int]:
    """(language, rank, visible characters sampled) of the page's visible text."""
    body = tree.body
    if body is None:
        return "unknown", 0.0, 0
    # Scripts and styles are not language; strip them from the tree (images never live inside them).
    body.strip_tags(_SCRIPTLIKE)
    text = body.text(separator=" ", strip=True)
    sample = text[: settings.language_sample_chars]
    if len(sample) < settings.min_text_chars:
        return "unknown", 0.0, len(sample)
    language, rank = detect_fast(sample, cutoff=settings.max_language_rank)
    return language, float(rank), len(sample)


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
            text = _text_block(candidate)
            if exclude and exclude in text:
                text = " ".join(text.replace(exclude, " ").split())
            if len(text.split()) >= settings.nearby_min_words:
                return _cut(text, settings.nearby_max_chars)
        current = current.parent
        if current is None or current.tag in ("body", "html", "#document"):
            break
    return ""


def _raw_text_candidates(image: _Image, settings: PagesSettings) -> list[TextCandidate]:
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
    nodes = tree.css("img")
    if not nodes:
        drops.drop(STAGE, "no_images")
        return []
    language, rank, _ = _language(tree, settings)
    if language not in settings.languages:
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
    images: list[_Image] = []
    for node in nodes[: settings.max_images_per_page]:
        raw, lazy, srcset_width = _image_source(node.attributes)
        if not raw or raw.startswith(("data:", "javascript:", "about:", "#")):
            continue
        try:
            url = _absolute(base, origin, raw)
            if not url.startswith(("http://", "https://")):
                continue
            features, figure, link = _image_features(node, url, lazy, srcset_width, page_site, settings)
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
    return [
        ImageCandidate(
            warc_file=page.warc_file,
            warc_offset=page.warc_offset,
            page_url=page.page_url,
            site=page_site,
            image_url=image.url,
            dom_features=image.features,
            dominance_score=image.score,
            language=language,
            language_score=rank,
            text_candidates=_raw_text_candidates(image, settings),
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
    "PagesSettings",
    "apply_site_repetition",
    "nearest_text_block",
    "pages_settings",
    "score_features",
    "site_of",
    "stage1_pages",
]
