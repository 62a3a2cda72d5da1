"""Stage 5 of LAIT: aggregation over the whole collection (two group steps).

1. Shared descriptions: a description (by `text_key`: case-folded, whitespace collapsed) attached to more than
   `aggregation.max_images_per_text` distinct images (by content hash) is boilerplate ("product image", a site
   template), and is dropped with all its pairs (reason `shared_description`).
2. Best pair per image: an image (by sha256 of its bytes) found on several pages, or with several surviving
   descriptions, keeps only its best-scored pair (reason `not_best_for_image` for the others).

Rule 1 runs first, over every pair that passed scoring, so that an image whose best-scored text is a template
keeps its next best real description instead of disappearing. "Best" is a total order (`PAIR_ORDER`): highest
relevance score, then highest dominance score, then the smallest (page_url, warc_file, warc_offset, text_source,
text), so the local engine and Spark pick the same pair on ties.

The functions here take and return plain dicts (a pair's `to_dict()` plus `text_key`); the Spark engine does the
same two steps as DataFrame group-bys over the same columns.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from .records import DropCounter

STAGE = "aggregation"

# (column, descending?) in priority order: the definition of "best pair" shared with the Spark engine.
PAIR_ORDER: tuple[tuple[str, bool], ...] = (
    ("relevance_score", True),
    ("dominance_score", True),
    ("page_url", False),
    ("warc_file", False),
    ("warc_offset", False),
    ("text_source", False),
    ("text", False),
)


def text_key(text: str) -> str:
    """The identity of a description for rule 1: case-folded, runs of whitespace collapsed to one space."""
    return " ".join(text.casefold().split())


def _order_key(pair: Mapping[str, Any]) -> tuple:
    key = []
    for column, descending in PAIR_ORDER:
        value = pair[column]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            key.append(-value if descending else value)
        else:
            # Only numeric columns are descending in PAIR_ORDER; strings sort ascending.
            key.append(value)
    return tuple(key)


def shared_descriptions(pairs: Iterable[Mapping[str, Any]], max_images_per_text: int) -> set[str]:
    """Rule 1's group step: the `text_key`s attached to more than `max_images_per_text` distinct
    `image_sha256`s among `pairs`."""
    images: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        images[pair["text_key"]].add(pair["image_sha256"])
    return {key for key, hashes in images.items() if len(hashes) > max_images_per_text}


def aggregate_pairs(
    pairs: list[dict[str, Any]], params: Mapping[str, Any], drops: DropCounter
) -> list[dict[str, Any]]:
    """Stage 5 on all scored pairs (config section `aggregation`). Input: dicts with at least `image_sha256`,
    `text_key`, `passed_scoring` and the `PAIR_ORDER` columns. Output: the same dicts, each with `kept` (bool),
    `drop_stage` and `drop_reason` set for the pairs that reached this stage; drops counted in `drops`.
    Pairs that failed scoring pass through unchanged (they are already marked)."""
    candidates = [p for p in pairs if p["passed_scoring"]]
    shared = shared_descriptions(candidates, int(params["max_images_per_text"]))
    best: dict[str, dict[str, Any]] = {}
    for pair in candidates:
        if pair["text_key"] in shared:
            pair.update(kept=False, drop_stage=STAGE, drop_reason="shared_description")
            drops.drop(STAGE, "shared_description")
            continue
        current = best.get(pair["image_sha256"])
        if current is None or _order_key(pair) < _order_key(current):
            best[pair["image_sha256"]] = pair
    for pair in candidates:
        if pair.get("drop_reason") == "shared_description":
            continue
        if best[pair["image_sha256"]] is pair:
            pair.update(kept=True, drop_stage=None, drop_reason=None)
            drops.keep(STAGE)
        else:
            pair.update(kept=False, drop_stage=STAGE, drop_reason="not_best_for_image")
            drops.drop(STAGE, "not_best_for_image")
    return pairs


__all__ = ["PAIR_ORDER", "STAGE", "aggregate_pairs", "shared_descriptions", "text_key"]
