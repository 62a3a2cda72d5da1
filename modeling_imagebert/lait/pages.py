"""Stage 1: web pages -> the page's dominant images, with DOM features and raw text candidates (ImageBERT §3).

`stage1_pages(page, config, drops)` parses one decoded page with selectolax's Lexbor parser, finds the page's main
content, keeps the page when that content is English, computes DOM features for each `<img>` and keeps the
dominant image(s) by a rule score. Weights, thresholds and word lists are in config section `pages`
(configuration/lait/default.yaml); docs/lait.md measures each signal on a labelled set of real pages.

The stage is four modules: this one (DOM features, the rule score, raw text candidates, `stage1_pages` and the
site-level group step), `page_settings` (the config section), `page_content` (the page's main content, its
language and the pictures it declares; its docstring holds the rules) and `image_urls` (which URL an `<img>`
shows and what the URL says).

Dominant images:

    score(img) = bias + sum_f weights[f] * dom_features[f]

over the features in `page_settings.DOM_FEATURE_NAMES`: inside the content root / region, how early in the content
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

Image URLs come from `image_urls.image_source` (lazy-load attributes, srcset, <picture>); a URL whose path is
empty or `/` (a script fills the real one in) is no image.

Raw text candidates of each kept image: its alt, its title (or its link's), its figure's figcaption, and the
nearest text block (`nearest_text_block`); with `nearby_title_overlap`, the block is kept only when it shares a
content word with the page's headline (`<h1>`, `<title>`, og:title), and a block with a script in it is skipped.

Site-level repetition (an image URL that appears on many pages of one site is a logo or a template image) needs
the pages of a site together: `apply_site_repetition(candidates_of_one_site, config, drops)` is the group step the
engines run per `ImageCandidate.site`; it adds `site_repeat_log2` to the score and drops candidates whose URL is
the dominant image of more than `max_site_repeat` distinct pages.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from .image_urls import (
    MEDIA_EXTENSIONS,
    absolute,
    extension_feature,
    fast_site,
    image_keys,
    image_source,
    parse_px,
    same_picture,
    site_of,
    url_path,
    url_size_hint,
)
from .page_content import (
    SCRIPTLIKE,
    Content,
    decide_language,
    find_content,
    lower_words,
    meta_images,
    nesting_depth_exceeds,
    visible_text,
)
from .page_settings import PagesSettings, pages_settings
from .records import DropCounter, ImageCandidate, PageRecord, TextCandidate

STAGE = "pages"

_FURNITURE_TAGS = frozenset({"nav", "aside"})  # page furniture wherever they are
_EDGE_TAGS = frozenset(
    {"header", "footer"}
)  # furniture only outside the content region (an article has its own)
_CSS_SIZE = re.compile(r"(?<![-\w])(width|height)\s*:\s*(\d{1,5}(?:\.\d*)?)\s*(px|em|rem|ex)", re.IGNORECASE)
_CSS_UNIT_PX = {"px": 1.0, "em": 16.0, "rem": 16.0, "ex": 8.0}
# A link to a viewer of the picture (a lightbox, a zoom or photo page) is not a teaser of another article.
_VIEWER_WORDS = re.compile(r"photo|image|img|gallery|zoom|enlarge|lightbox|attachment|slide", re.IGNORECASE)
_TITLE_WORD = re.compile(r"[^\W\d_]{3,}")
# English function words: they say nothing about what a headline and a paragraph share
_FUNCTION_WORDS = frozenset(
    "the and for with from this that these those are was were been has have had its his her their our your you "
    "not but all any can will would could should about into over under after before than then there here what "
    "when where which who whom why how out off our also just more most some such only very".split()
)


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
    content: Content
    meta_urls: frozenset[str]
    meta_strict: frozenset[str]  # `image_keys` names of the page's declared pictures
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
        target = absolute(context.base, context.origin, href)
    except ValueError:
        return False
    target = target.split("#", 1)[0]
    if target == context.page_url.split("#", 1)[0] or target == image_url:
        return False
    if not target.startswith(("http://", "https://")):
        return False
    if _VIEWER_WORDS.search(target[target.find("/", target.find("://") + 3) :]):
        return False
    path = url_path(target).lower()
    dot = path.rfind(".")
    if dot >= 0 and "/" not in path[dot:] and path[dot + 1 :] in MEDIA_EXTENSIONS:
        return False
    return not same_picture(target, image_url)


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
            words = lower_words(attributes.get("class"), attributes.get("id"), attributes.get("role"))
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
    width, height = parse_px(attributes.get("width")), parse_px(attributes.get("height"))
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
        width, height = url_size_hint(url)
    features, figure, link, near_words = _ancestor_features(node, url, settings, context)
    side = max(width, height, srcset_width)
    alt = attributes.get("alt") or ""
    path = url_path(url)
    own_words = lower_words(attributes.get("class"), attributes.get("id"), alt, path)
    words = set(own_words)
    words.update(near_words)
    content = context.content
    position = 0.0
    if features["in_content"] or features["in_content_region"]:
        before = content.paragraphs_before.get(node.mem_id, 0)
        position = 1.0 - before / content.content_paragraphs if content.content_paragraphs else 1.0
    strict, loose = image_keys(url)
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
            "same_host": 1.0 if fast_site(url) == context.page_site else 0.0,
            "lazy": 1.0 if lazy else 0.0,
        }
    )
    for name in ("ext_jpg", "ext_png", "ext_gif", "ext_webp", "ext_svg", "ext_ico", "ext_other"):
        features[name] = 0.0
    features[extension_feature(path)] = 1.0
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
            if candidate is None or candidate.tag in SCRIPTLIKE:
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
    `drops` receives page-level drops (`too_deep`, `not_english`, `unparsable_html`, `no_images`, `no_dominant_image`) and
    one `not_dominant` per losing image; `drops.keep("pages", n)` counts the candidates returned. Output:
    `ImageCandidate`s with absolute `image_url`, `dom_features` (`DOM_FEATURE_NAMES`), `dominance_score`,
    page language and the raw text candidates (alt, title, figcaption, nearby; cleaned by stage 3).
    """
    settings = pages_settings(config)
    if nesting_depth_exceeds(page.html, settings.max_depth):
        # Before the parser: its time grows with the square of the depth (page_content.nesting_depth).
        drops.drop(STAGE, "too_deep")
        return []
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
    content = find_content(ordered, settings)
    # The visible-text fallback strips scripts from a tree: a second parse, so this one keeps its <noscript> copies.
    language = decide_language(tree, content, settings, lambda: visible_text(LexborHTMLParser(page.html)))
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
    meta_urls, meta_strict, meta_loose = meta_images(tree, base)
    nodes = nodes[: settings.max_images_per_page]
    src_counts: dict[str, int] = {}
    for node in nodes:
        src = (node.attributes.get("src") or "").strip()
        if src:
            src_counts[src] = src_counts.get(src, 0) + 1
    shared = frozenset(src for src, count in src_counts.items() if count >= 3)
    sources = []
    for node in nodes:
        raw, lazy, srcset_width = image_source(node, shared)
        if not raw or raw.startswith(("data:", "javascript:", "about:", "#")):
            continue
        try:
            url = absolute(base, origin, raw)
        except ValueError:  # an unparsable image URL is not a candidate
            drops.event(STAGE, "invalid_image_url")
            continue
        # No path, or the site's root: a script fills the real picture in; this URL is a page, not an image.
        if not url.startswith(("http://", "https://")) or len(url_path(url)) <= 1:
            continue
        sources.append((node, url, lazy, srcset_width))
    key_urls: dict[str, set[str]] = {}
    for _, url, _, _ in sources:
        for key in image_keys(url):
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


__all__ = ["apply_site_repetition", "nearest_text_block", "score_features", "stage1_pages"]
