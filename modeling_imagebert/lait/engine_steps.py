"""The steps both LAIT engines run, so the local engine and PySpark produce the same pairs on the same input.

The pipeline runs in three steps:

1. per input WARC file (`extract_candidates`): `warc.iter_pages` -> `pages.stage1_pages` -> dominant-image
   candidates;
2. per site (a group: the candidates of one site from all files): `pages.apply_site_repetition`, then per
   candidate `text.stage3_text` (before fetching, so images without any usable text are never downloaded),
   `images.stage2_image`, and `scoring.stage4_score` on the pairs of (image, each cleaned text), in chunks of
   whole ITM batches across the sites of a bucket or partition (`SiteProcessor.process_sites`); each scored pair
   becomes a `PART_SCHEMA` row (`pair_row`);
3. over everything: `aggregate` (shared descriptions, best pair per image), then the output folder (`outputs`).

`engine_local.run_local` runs them in a process pool with resumable parts on disk, `engine_spark.run_spark` as
Spark transformations and group-bys.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import pyarrow as pa

from .aggregate import text_key
from .fetch import ImageSources, index_img2dataset_output
from .images import ImageResult, stage2_image
from .records import DropCounter, ImageCandidate, PairRecord
from .scoring import scorer_for, stage4_score

# Columns of a step-2 part (and of the Spark pairs DataFrame): the pair as JSON, its image bytes, and the
# columns aggregation groups and orders by.
PART_SCHEMA = pa.schema(
    [
        ("pair_json", pa.string()),
        ("image_jpeg", pa.binary()),
        ("image_sha256", pa.string()),
        ("text_key", pa.string()),
        ("passed_scoring", pa.bool_()),
        ("relevance_score", pa.float64()),
        ("dominance_score", pa.float64()),
        ("page_url", pa.string()),
        ("warc_file", pa.string()),
        ("warc_offset", pa.int64()),
        ("text_source", pa.string()),
        ("text", pa.string()),
    ]
)
# Pairs buffered per stage-4 call (rounded to whole ITM batches): large enough that the ITM forward passes and the
# gradient-boosting predictions run on full batches, small enough that their image bytes (~100 KB each) stay a few
# tens of MB per worker.
SCORING_CHUNK_PAIRS = 256


def list_inputs(patterns: str | Sequence[str]) -> list[str]:
    """The input WARC files: each pattern expanded with glob (sorted, duplicates removed). Raises
    FileNotFoundError naming a pattern that matches nothing."""
    if isinstance(patterns, str):
        patterns = [patterns]
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise FileNotFoundError(f"--input {pattern}: no file matches")
        files.extend(m for m in matches if m not in files)
    return files


def site_bucket(site: str, buckets: int) -> int:
    """The step-2 bucket of a site: a stable hash (the same in every process and run), modulo `buckets`."""
    return int(hashlib.sha1(site.encode()).hexdigest()[:8], 16) % buckets


def extract_candidates(warc_file: str, config: Mapping[str, Any]) -> tuple[list[ImageCandidate], DropCounter]:
    """Step 1 on one WARC file: pages read and decoded, stage 1 run on each. Output: the dominant-image
    candidates (in file order) and the drops of stages "warc" and "pages"."""
    from .pages import stage1_pages
    from .warc import iter_pages

    pages = config["pages"]
    drops = DropCounter()
    candidates: list[ImageCandidate] = []
    try:
        for page in iter_pages(
            warc_file,
            drops,
            max_page_bytes=int(pages["max_page_bytes"]),
            max_replacement_ratio=float(pages["max_replacement_ratio"]),
        ):
            candidates.extend(stage1_pages(page, pages, drops))
    except OSError:
        drops.drop("warc", "unreadable_file")
    return candidates, drops


class SiteProcessor:
    """Step 2 for the sites of one bucket or one Spark partition: caches what repeats within it (the image of a
    URL, the image sources of a WARC file) and collects a few dropped examples per reason."""

    def __init__(self, config: Mapping[str, Any], drops: DropCounter, examples_per_reason: int):
        self.config = config
        self.drops = drops
        self.scorer = scorer_for(config["scoring"])
        # Pairs per scorer call: a whole number of ITM batches, about SCORING_CHUNK_PAIRS pairs.
        batch = int(config["scoring"]["itm_batch_size"])
        self.scorer_chunk = batch * max(1, SCORING_CHUNK_PAIRS // batch)
        self.images: dict[str, ImageResult | str] = {}
        self.sources: dict[str, ImageSources] = {}
        self.examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.examples_per_reason = examples_per_reason
        # Thumbnails of images that decoded but were dropped (too small, a classifier), for the contact sheet.
        self.thumbnails: dict[str, bytes] = {}
        images = config["images"]
        self.img2dataset_index = (
            index_img2dataset_output(images["img2dataset_output"]) if images["img2dataset_output"] else {}
        )

    def _sources(self, warc_file: str) -> ImageSources:
        if warc_file not in self.sources:
            self.sources[warc_file] = ImageSources.for_warc_file(
                warc_file, self.config["images"], self.img2dataset_index
            )
        return self.sources[warc_file]

    def _fetch(self, candidate: ImageCandidate) -> ImageResult | str:
        """Stage 2 for one candidate: its `ImageResult`, or its drop reason (counted later, in `_image`)."""
        local = DropCounter()
        result = stage2_image(
            candidate, self.config["images"], local, self._sources(candidate.warc_file), self.thumbnails
        )
        return result if result is not None else next(iter(local.dropped["images"]))

    def _prefetch(self, candidates: Sequence[ImageCandidate]) -> None:
        """Fetches the not yet seen image URLs of `candidates` with `engine.fetch_threads` threads (downloads
        wait on the network, not the CPU); results land in the cache that `_image` reads in order, so the
        outcome does not depend on which download finishes first."""
        first: dict[str, ImageCandidate] = {}
        for candidate in candidates:
            if candidate.image_url not in self.images:
                first.setdefault(candidate.image_url, candidate)
        threads = int(self.config["engine"]["fetch_threads"])
        if threads <= 1 or len(first) <= 1:
            return
        for candidate in first.values():
            self._sources(candidate.warc_file)
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(threads, len(first))) as pool:
            for url, result in zip(first, pool.map(self._fetch, first.values()), strict=True):
                self.images[url] = result

    def _image(self, candidate: ImageCandidate) -> ImageResult | None:
        cached = self.images.get(candidate.image_url)
        if cached is None:
            cached = self.images[candidate.image_url] = self._fetch(candidate)
        if isinstance(cached, str):
            self.drops.drop("images", cached)
            # Thumbnails are popped as they are used, so the store never outgrows one site group.
            thumb = self.thumbnails.pop(candidate.image_url, None)
            if len(self.examples[cached]) < self.examples_per_reason:
                self.examples[cached].append(
                    {
                        "thumb": base64.b64encode(thumb).decode() if thumb else "",
                        "image_url": candidate.image_url,
                        "page_url": candidate.page_url,
                        "text": candidate.text_candidates[0].text if candidate.text_candidates else "",
                        "reason": cached,
                    }
                )
            return None
        self.drops.keep("images")
        return cached

    def site_pairs(self, candidates: Sequence[ImageCandidate]) -> list[tuple[PairRecord, bytes]]:
        """Stages 3 and 2 on one site's candidates: its unscored pairs, each with its image bytes, in a fixed
        order (candidates sorted by file, offset, URL; texts in candidate order)."""
        from .pages import apply_site_repetition
        from .text import stage3_text

        ordered = sorted(candidates, key=lambda c: (c.warc_file, c.warc_offset, c.image_url))
        with_text = []
        for candidate in apply_site_repetition(ordered, self.config["pages"], self.drops):
            # Text first: an image without any usable description is never downloaded.
            cleaned = stage3_text(candidate, self.config["text"], self.drops)
            if cleaned is not None:
                with_text.append(cleaned)
        self._prefetch(with_text)
        pairs = []
        for candidate in with_text:
            image = self._image(candidate)
            if image is None:
                continue
            pairs.extend(
                (PairRecord.from_candidate(candidate, t, **image.pair_fields()), image.jpeg)
                for t in candidate.text_candidates
            )
        return pairs

    def process_sites(self, sites: Iterable[Sequence[ImageCandidate]]) -> Iterator[dict[str, Any]]:
        """The scored pairs of the sites of one bucket or partition, as `PART_SCHEMA` rows in site order. Pairs
        are scored in chunks of a whole number of ITM batches across sites (one pair-list call to the scorer per
        chunk, not one per image), so memory holds at most one chunk of pairs and their image bytes."""
        chunk = self.scorer_chunk
        pending: list[tuple[PairRecord, bytes]] = []
        for candidates in sites:
            pending.extend(self.site_pairs(candidates))
            while len(pending) >= chunk:
                yield from self._score(pending[:chunk])
                pending = pending[chunk:]
        yield from self._score(pending)

    def _score(self, pairs: Sequence[tuple[PairRecord, bytes]]) -> Iterator[dict[str, Any]]:
        if not pairs:
            return
        scored = stage4_score([pair for pair, _ in pairs], self.scorer, self.drops)
        for (pair, passed), (_, jpeg) in zip(scored, pairs, strict=True):
            yield pair_row(pair, passed, jpeg)


def pair_row(pair: PairRecord, passed: bool, jpeg: bytes) -> dict[str, Any]:
    """A scored pair as a `PART_SCHEMA` row."""
    return {
        "pair_json": json.dumps(pair.to_dict(), sort_keys=True),
        "image_jpeg": jpeg,
        "image_sha256": pair.image_sha256,
        "text_key": text_key(pair.text),
        "passed_scoring": bool(passed),
        "relevance_score": float(pair.relevance_score),
        "dominance_score": float(pair.dominance_score),
        "page_url": pair.page_url,
        "warc_file": pair.warc_file,
        "warc_offset": int(pair.warc_offset),
        "text_source": pair.text_source,
        "text": pair.text,
    }


__all__ = [
    "PART_SCHEMA",
    "SCORING_CHUNK_PAIRS",
    "SiteProcessor",
    "extract_candidates",
    "list_inputs",
    "pair_row",
    "site_bucket",
]
