"""Config section `pages` of LAIT's stage 1 (`pages.py`), checked and compiled once: `PagesSettings`.

`pages_settings(config)` accepts the section, a whole config with a `pages` key, a `PagesSettings` or None (the
defaults of configuration/lait/default.yaml, which documents each key). `DOM_FEATURE_NAMES` lives here because
the section's `weights` may only name these features.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

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


@dataclass(frozen=True)
class PagesSettings:
    """Config section `pages`, checked and compiled once (see configuration/lait/default.yaml for each key)."""

    max_page_bytes: int
    max_depth: int
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
    "max_depth": int,
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


__all__ = ["DOM_FEATURE_NAMES", "PagesSettings", "pages_settings"]
