"""The page as a whole, for stage 1 (`pages.py`): its main content, its language and the pictures it declares
as its own.

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

Declared pictures (`meta_images`): og:image, twitter:image, `link rel=image_src`, itemprop=image and the schema.org
`image` of the page's JSON-LD (leaving out people's and organisations' pictures).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate
from typing import Any
from urllib.parse import urljoin

from resiliparse.parse.lang import detect_fast
from selectolax.lexbor import LexborHTMLParser, LexborNode

from .image_urls import image_keys
from .page_settings import PagesSettings, pages_settings

_CONTENT_REGION_TAGS = frozenset({"article", "main"})
_WORDS = re.compile(r"[a-z]+")
# Elements whose text is not the page's: left out of the visible text and of nearby text blocks
SCRIPTLIKE = ["script", "style", "noscript", "template", "svg"]
_META_IMAGE_KEYS = frozenset(
    {"og:image", "og:image:url", "og:image:secure_url", "twitter:image", "twitter:image:src", "image"}
)
_JSONLD_SKIP_TYPES = frozenset({"Person", "Organization", "Brand", "WebSite", "NewsMediaOrganization"})
_LETTERS = re.compile(r"[^\W\d_]")
_NON_LATIN_LETTERS = re.compile(r"[^\W\d_\u0000-\u024f\u1e00-\u1eff]")
# detect_fast codes of languages written in the Latin script (the mixed-script rule of decide_language)
_LATIN_SCRIPT_LANGUAGES = frozenset(
    "af an ast az br bs ca cs cy da de en eo es et eu fi fo fr fy ga gd gl hr ht hu id is it jv la lb lt lv ms "
    "mt nds nl nn no oc pl pt ro sco sh sk sl sq su sv sw tl tr uz vi wa".split()
)


def lower_words(*texts: str | None) -> list[str]:
    """The lower-case letter runs of the texts: the words of class/id attributes, alt text and URL paths."""
    return [word for text in texts if text for word in _WORDS.findall(text.lower())]


@dataclass
class Content:
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
    words = lower_words(attributes.get("class"), attributes.get("id"))
    if not words:
        return 1.0
    if not settings.boilerplate_words.isdisjoint(words) or not settings.negative_words.isdisjoint(words):
        return 1.0 / 3.0
    return 1.0


def find_content(ordered: list[LexborNode], settings: PagesSettings) -> Content:
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
    empty = Content(0, 0, frozenset(), {}, 0, [], all_text)
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
    return Content(
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


def decide_language(
    tree: LexborHTMLParser, content: Content, settings: PagesSettings, page_text: Any
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


# Nesting depth, estimated before parsing. Lexbor's tree construction is quadratic in the depth of open
# elements (measured: 16,000 nested <div> 0.8 s, 32,000 3.3 s; a 1.9 MB page of 380,000 takes about ten minutes)
# and in the list of open formatting elements (16,000 `<font size=N>` 2.2 s), so a page nested deeper than
# `pages.max_depth` is dropped as `too_deep` before the parser sees it. The estimate counts start tags minus end
# tags (never below zero) of elements that nest: void elements and elements whose end tag is optional (`<p>`,
# `<li>`, `<td>`: the parser closes them itself) never count, comments and the contents of raw-text elements
# (scripts, styles) are cut out first, and inside `<svg>` / `<math>` a self-closed tag (`<path/>`) opens nothing.
# Linear in the page (no regex here can backtrack over it); the 140 labelled real pages nest at most 49 deep.
_SKIPPED_START = re.compile(
    r"<!--|<(script|style|textarea|title|xmp|noembed|noframes|plaintext|iframe|svg|math)\b", re.IGNORECASE
)
_SKIPPED_END = {
    name: re.compile(rf"</{name}\b", re.IGNORECASE)
    for name in ("script", "style", "textarea", "title", "xmp", "noembed", "noframes", "plaintext", "iframe")
}
_FOREIGN_END = {name: re.compile(rf"</{name}\b", re.IGNORECASE) for name in ("svg", "math")}
_TAG_NAME = re.compile(r"<(/?[A-Za-z][A-Za-z0-9:_-]*)")
_FOREIGN_TAG = re.compile(r"<(/?[A-Za-z][A-Za-z0-9:_-]*)(?:[^<>]*[^<>/])?(/?)>")
_NOT_NESTING_NAMES = (
    "area base br col embed hr img input link meta param source track wbr keygen basefont bgsound frame image "
    "p li dt dd option optgroup tr td th tbody thead tfoot colgroup caption rb rt rtc rp html head body"
).split()
# Tag token ("div" or "/div", as written) -> its step; any other token: +1 for a start tag, -1 for an end tag.
_STEP = {
    token: 0
    for name in _NOT_NESTING_NAMES
    for spelled in (name, name.upper())
    for token in (spelled, "/" + spelled)
}


def _tag_tokens(html: str) -> list[str]:
    """The tag tokens of `html` in order, without comments, raw-text contents and self-closed foreign tags."""
    tokens: list[str] = []
    position = 0
    while True:
        match = _SKIPPED_START.search(html, position)
        tokens += _TAG_NAME.findall(html, position, len(html) if match is None else match.start())
        if match is None:
            return tokens
        name = (match.group(1) or "").lower()
        if not name:  # a comment
            end = html.find("-->", match.end())
            position = -1 if end < 0 else end + 3
        elif name in _FOREIGN_END:
            found = _FOREIGN_END[name].search(html, match.end())
            stop = len(html) if found is None else found.start()
            tokens.append(name)
            tokens += [tag for tag, closed in _FOREIGN_TAG.findall(html, match.end(), stop) if not closed]
            position = stop
        else:
            found = _SKIPPED_END[name].search(html, match.end())
            position = -1 if found is None else found.end()
        if position < 0:  # an unclosed comment or script: the rest of the page is in it
            return tokens


def nesting_depth(html: str) -> int:
    """The estimated nesting depth of the elements of `html` (see above; 0 for text without tags)."""
    if "<" not in html:
        return 0
    step = _STEP.get
    deltas = [
        delta if (delta := step(token)) is not None else (-1 if token[0] == "/" else 1)
        for token in _tag_tokens(html)
    ]
    # The depth is the running sum floored at zero: the running sum minus the lowest it has been below zero.
    lowest, deepest = 0, 0
    for total in accumulate(deltas):
        if total < lowest:
            lowest = total
        elif total - lowest > deepest:
            deepest = total - lowest
    return deepest


def nesting_depth_exceeds(html: str, max_depth: int) -> bool:
    """True when the elements of `html` nest deeper than `max_depth` (a page with no more tags than that never
    does, and is not scanned)."""
    return html.count("<") > max_depth and nesting_depth(html) > max_depth


def visible_text(tree: LexborHTMLParser) -> str:
    body = tree.body
    if body is None:
        return ""
    # Scripts and styles are not language; strip them from the tree (after the images were collected).
    body.strip_tags(SCRIPTLIKE)
    return body.text(separator=" ", strip=True)


def page_language(html: str, config: Mapping[str, Any] | PagesSettings | None = None) -> PageLanguage:
    """Stage 1's language decision for a decoded page (the rule of the module docstring); `config` as in
    `stage1_pages`. The same decision `stage1_pages` makes before it drops a page as `not_english`."""
    settings = pages_settings(config)
    tree = LexborHTMLParser(html)
    content = find_content(tree.css("img, p"), settings)
    return decide_language(tree, content, settings, lambda: visible_text(tree))


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


def meta_images(tree: LexborHTMLParser, base: str) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """(absolute URLs, strict names, loose names; see `image_keys`) of the pictures the page declares as its own: og:image, twitter:image,
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
    keys = [image_keys(url) for url in absolute]
    return frozenset(absolute), frozenset(k[0] for k in keys if k[0]), frozenset(k[1] for k in keys if k[1])


__all__ = ["PageLanguage", "nesting_depth", "nesting_depth_exceeds", "page_language"]
