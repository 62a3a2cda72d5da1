"""The records that flow between LAIT stages, and the drop counter every stage reports to.

Shared contract between the stage modules (`warc`, `pages`, `text`: helper 13a) and the images, scoring,
aggregation stages and the engines (helper 13b). Every field holds a JSON-able value (str, int, float, bool,
None, lists and str-keyed dicts of those), so the local engine and PySpark carry exactly the same thing:
`record.to_dict()` is a plain dict (a Spark row / a JSON line) and `Record.from_dict(d)` rebuilds it.

Flow of one page (each arrow is a pure function of one record; group steps are marked):

    warc.iter_pages(path)           -> PageRecord                 (stage "warc": reading, decoding)
    pages.stage1_pages(page)        -> list[ImageCandidate]       (stage "pages": English, dominant images,
                                                                   raw text candidates taken from the DOM)
    pages.apply_site_repetition(candidates of one site)          (group by `site`: repeated image URLs)
    images stage (13b)              -> image bytes, size, classifier scores
    text.stage3_text(candidate)     -> candidate with cleaned, filtered `text_candidates`
    scoring stage (13b)             -> PairRecord per (image, text) with `relevance_score`
    aggregation stage (13b)         -> PairRecords grouped by image hash / by text

Stage functions take a `drops: DropCounter` argument and add to it (one counter per partition or per input
file; counters merge with `+` / `merge`), so a stage never returns a half record: a record is either returned
whole or counted under one stable reason name.

Changing this contract: add fields with defaults only; renaming or removing a field or a reason needs both
helpers' agreement, noted here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Stage names in pipeline order; "warc" is reading and decoding the input, before stage 1 proper.
STAGES = ("warc", "pages", "images", "text", "scoring", "aggregation")

# Stable reason names. A counter accepts any snake_case reason for a known stage (so a stage can grow a new
# reason without touching this file), but the names below are the ones reports and tests rely on.
DROP_REASONS: dict[str, tuple[str, ...]] = {
    "warc": (
        "truncated_archive",  # a gzip member or WARC record cut short: reading stops for that file
        "broken_warc_record",  # an unparsable record header (ARC: no numeric length); reading resumes at the next
        "broken_http_headers",  # the HTTP status line or headers of a response cannot be parsed
        "http_status",  # status other than 200
        "not_html",  # Content-Type is not text/html or application/xhtml+xml
        "page_too_large",  # body over `pages.max_page_bytes`
        "empty_body",
        "undecodable",  # no declared or detected charset decodes the body without loss
        "unreadable_file",  # the engines: a WARC file that cannot be opened at all
    ),
    "pages": (
        "too_deep",  # elements nested deeper than pages.max_depth (dropped before parsing)
        "not_english",
        "unparsable_html",
        "no_images",  # the page has no <img> with a usable src
        "no_dominant_image",  # images exist, none scores above `pages.min_score`
        "not_dominant",  # one image that lost to the page's dominant image(s) (counted per image)
        "site_repeated_image",  # a candidate whose URL repeats on too many pages of its site
        "invalid_page_url",  # urllib cannot parse the page's WARC-Target-URI
    ),
    "images": (
        "not_found",  # HTTP 404 / 410
        "http_error",  # any other non-200 status
        "timeout",  # no byte for images.timeout_s (connecting, or one read)
        "too_slow",  # the whole fetch over images.total_timeout_s, or under images.min_bytes_per_s
        "redirect_loop",  # a URL seen twice in one redirect chain, or more than images.max_redirects
        "connection_error",  # refused, reset, not an HTTP reply
        "truncated",  # fewer body bytes than the Content-Length announced
        "unsupported_scheme",  # not http(s)
        "not_an_image",  # Content-Type not image/* (e.g. an HTML error page), or HTML bytes
        "too_large",  # over images.max_bytes (decoded, when gzipped), or over images.max_pixels (decompression bombs)
        "undecodable",  # PIL cannot decode the bytes
        "too_small",  # not wider AND taller than images.min_width / min_height (300 px)
        "no_source",  # images.fetch_http is false and no WARC / img2dataset copy exists
        # plus "classifier_<name>" per configured content classifier (images.classifiers)
    ),
    "text": (
        "no_text_candidates",  # an image without any text candidate left after cleaning
        "empty_after_cleaning",  # per text candidate
        "too_short",
        "too_long",
        "spam_words",
        "porn_words",
        "high_oov_ratio",
        "duplicate_text",  # the same cleaned text from a second source of the same image
    ),
    "scoring": ("below_threshold",),  # relevance under the scorer's threshold
    "aggregation": (
        "shared_description",  # a description on more than aggregation.max_images_per_text distinct images
        "not_best_for_image",  # the same image (content hash) has a better-scored pair
    ),
}

# Counted events that are not drops (the record goes on), e.g. a charset that was declared wrongly.
EVENTS: dict[str, tuple[str, ...]] = {
    "warc": ("charset_misdeclared", "charset_detected"),
    "pages": ("invalid_image_url",),  # an <img> whose URL urllib cannot parse: skipped, the page goes on
    # with scoring.itm_checkpoint: pairs given an ITM score, and pairs whose image has no region features (their
    # pair.itm_score feature is missing, NaN to the scorer)
    "scoring": ("itm_scored", "itm_no_region_features"),
}

_REASON_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")


def _check(stage: str, name: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"DropCounter: unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    if not _REASON_PATTERN.match(name):
        raise ValueError(f"DropCounter: reason/event {name!r} of stage {stage!r} must be snake_case")


@dataclass
class DropCounter:
    """Per-stage counts of kept records, dropped records by reason and non-drop events; mergeable.

    `dropped[stage][reason]`, `kept[stage]`, `events[stage][name]` are plain dicts of ints, so a counter is
    JSON-able (`to_dict` / `from_dict`) and picklable (Spark ships one per partition back to the driver).
    """

    dropped: dict[str, dict[str, int]] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)
    events: dict[str, dict[str, int]] = field(default_factory=dict)

    def drop(self, stage: str, reason: str, n: int = 1) -> None:
        """Counts `n` records dropped by `stage` for `reason` (a stable snake_case name)."""
        _check(stage, reason)
        per_stage = self.dropped.setdefault(stage, {})
        per_stage[reason] = per_stage.get(reason, 0) + n

    def keep(self, stage: str, n: int = 1) -> None:
        """Counts `n` records that `stage` passed on."""
        _check(stage, "kept")
        self.kept[stage] = self.kept.get(stage, 0) + n

    def event(self, stage: str, name: str, n: int = 1) -> None:
        """Counts `n` occurrences of a non-drop event (e.g. a mis-declared charset that was repaired)."""
        _check(stage, name)
        per_stage = self.events.setdefault(stage, {})
        per_stage[name] = per_stage.get(name, 0) + n

    def merge(self, other: DropCounter) -> DropCounter:
        """Adds `other`'s counts into this counter in place; returns self."""
        for stage, reasons in other.dropped.items():
            for reason, n in reasons.items():
                self.drop(stage, reason, n)
        for stage, n in other.kept.items():
            self.keep(stage, n)
        for stage, names in other.events.items():
            for name, n in names.items():
                self.event(stage, name, n)
        return self

    def __add__(self, other: DropCounter) -> DropCounter:
        return DropCounter().merge(self).merge(other)

    def total_dropped(self, stage: str | None = None) -> int:
        """Sum of drops of one stage, or of all stages when `stage` is None."""
        stages = [stage] if stage is not None else list(self.dropped)
        return sum(sum(self.dropped.get(s, {}).values()) for s in stages)

    def to_dict(self) -> dict[str, Any]:
        """`{"kept": {stage: n}, "dropped": {stage: {reason: n}}, "events": {...}}`, stages in pipeline order."""

        def ordered(d: Mapping[str, Any]) -> dict[str, Any]:
            return {s: d[s] for s in STAGES if s in d}

        return {
            "kept": ordered(self.kept),
            "dropped": ordered({s: dict(sorted(r.items())) for s, r in self.dropped.items()}),
            "events": ordered({s: dict(sorted(r.items())) for s, r in self.events.items()}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DropCounter:
        """Inverse of `to_dict`."""
        counter = cls()
        for stage, reasons in data.get("dropped", {}).items():
            for reason, n in reasons.items():
                counter.drop(stage, reason, int(n))
        for stage, n in data.get("kept", {}).items():
            counter.keep(stage, int(n))
        for stage, names in data.get("events", {}).items():
            for name, n in names.items():
                counter.event(stage, name, int(n))
        return counter


class _Record:
    """JSON-able dataclass mixin: `to_dict` and `from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown field(s) {', '.join(unknown)}")
        return cls(**dict(data))


@dataclass
class PageRecord(_Record):
    """One decoded HTML page read from a WARC response record (output of `warc.iter_pages`).

    Provenance: `warc_file` (the path as given), `warc_offset` (byte offset of the WARC record in the file,
    compressed offset for .gz), `page_url` (WARC-Target-URI). `html` is the decoded body; `charset` the codec
    that decoded it and `charset_source` where it came from: "http" (Content-Type header), "meta", "detected".
    """

    warc_file: str
    warc_offset: int
    page_url: str
    html: str
    status: int = 200
    content_type: str = "text/html"
    charset: str = "utf-8"
    charset_source: str = "http"
    warc_date: str = ""
    content_length: int = 0


@dataclass
class TextCandidate(_Record):
    """One description of an image, from one source.

    `source` is one of "alt", "title", "figcaption", "nearby" (the nearest text block), "page_title".
    `raw` is the text as found in the DOM (entities already decoded by the HTML parser); `text` is the cleaned
    text ("" until stage 3 ran); `features` are stage 3's text features for the scorer (lengths, OOV ratio,
    casing, digits, source one-hot...): str -> float.
    """

    source: str
    raw: str
    text: str = ""
    features: dict[str, float] = field(default_factory=dict)


@dataclass
class ImageCandidate(_Record):
    """One dominant-image candidate of one page (output of stage 1; stage 3 cleans its `text_candidates`).

    `image_url` is absolute (resolved against the page URL / <base href>). `site` is the page's host without
    "www." (the key of the site-level repetition group). `dom_features` maps feature name -> number (see
    `page_settings.DOM_FEATURE_NAMES`); `dominance_score` is the rule score of stage 1 (weights in config `pages`).
    `language` / `language_score` come from the page-level language identifier.
    """

    warc_file: str
    warc_offset: int
    page_url: str
    site: str
    image_url: str
    dom_features: dict[str, float] = field(default_factory=dict)
    dominance_score: float = 0.0
    language: str = "en"
    language_score: float = 0.0
    text_candidates: list[TextCandidate] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageCandidate:
        data = dict(data)
        data["text_candidates"] = [
            t if isinstance(t, TextCandidate) else TextCandidate.from_dict(t)
            for t in data.get("text_candidates", [])
        ]
        return super().from_dict(data)


@dataclass
class PairRecord(_Record):
    """One image-text pair with its scores and provenance (a row of the output parquet).

    Image side (stage 2, 13b): `image_sha256` (content hash, the aggregation key), `image_width`/`image_height`
    in pixels, `image_scores` (classifier name -> score), `image_features` (image-only features for the scorer),
    `image_key` (the webdataset key of the stored image bytes). Text side (stage 3): `text`, `text_source`,
    `text_features`. `relevance_score` is stage 4's probability of relevance (None before scoring); `itm_score`
    the ImageBERT ITM probability of the pair (stage 4 with `scoring.itm_checkpoint`; None when not computed or
    when the image has no region features).
    """

    warc_file: str
    warc_offset: int
    page_url: str
    site: str
    image_url: str
    text: str
    text_source: str
    dominance_score: float = 0.0
    dom_features: dict[str, float] = field(default_factory=dict)
    text_features: dict[str, float] = field(default_factory=dict)
    image_sha256: str = ""
    image_width: int = 0
    image_height: int = 0
    image_key: str = ""
    image_features: dict[str, float] = field(default_factory=dict)
    image_scores: dict[str, float] = field(default_factory=dict)
    relevance_score: float | None = None
    itm_score: float | None = None

    @classmethod
    def from_candidate(cls, candidate: ImageCandidate, text: TextCandidate, **image_side: Any) -> PairRecord:
        """Builds the pair of `candidate`'s image with one of its cleaned `text` candidates; `image_side` sets
        the image fields (image_sha256, image_width, ...)."""
        return cls(
            warc_file=candidate.warc_file,
            warc_offset=candidate.warc_offset,
            page_url=candidate.page_url,
            site=candidate.site,
            image_url=candidate.image_url,
            text=text.text,
            text_source=text.source,
            dominance_score=candidate.dominance_score,
            dom_features=dict(candidate.dom_features),
            text_features=dict(text.features),
            **image_side,
        )


def merge_counters(counters: Iterable[DropCounter]) -> DropCounter:
    """Sums counters (e.g. one per Spark partition or per input file) into a new one."""
    total = DropCounter()
    for counter in counters:
        total.merge(counter)
    return total


__all__ = [
    "DROP_REASONS",
    "EVENTS",
    "STAGES",
    "DropCounter",
    "ImageCandidate",
    "PageRecord",
    "PairRecord",
    "TextCandidate",
    "merge_counters",
]
