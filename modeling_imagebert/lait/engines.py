"""The LAIT engines: the same stage functions run by a local multi-process engine or by PySpark.

Both run the pipeline in the same three steps, so they produce the same pairs on the same input:

1. per input WARC file: `warc.iter_pages` -> `pages.stage1_pages` -> dominant-image candidates;
2. per site (a group: the candidates of one site from all files): `pages.apply_site_repetition`, then per
   candidate `text.stage3_text` (before fetching, so images without any usable text are never downloaded),
   `images.stage2_image`, and `scoring.stage4_score` on the pairs of (image, each cleaned text), in chunks of
   whole ITM batches across the sites of a bucket or partition (`_SiteProcessor.process_sites`);
3. over everything: `aggregate` (shared descriptions, best pair per image), then the outputs (`outputs.py`).

Local engine (`run_local`): step 1 in a process pool over files, each file's candidates written atomically to
`_work/candidates/` and the file added to a done-list; step 2 over `engine.site_buckets` site buckets (a site's
bucket is a hash of its name), each bucket's pairs written atomically to `_work/pairs/` with its own done-list.
Memory is bounded by one file (step 1) or one bucket (step 2) per worker. A killed run started again with the
same `--output` skips what its done-lists hold, so it never duplicates pairs. Step 3 reads only the pairs'
metadata columns, then the image bytes part by part for the shards.

Spark engine (`run_spark`): step 1 in `mapPartitions` over the input files, step 2 after a `groupByKey(site)`,
step 3 as DataFrame group-bys (`countDistinct` of images per description, `row_number` over a window per image
hash ordered by `aggregate.PAIR_ORDER`). On a cluster the input and output paths must be on a filesystem every
executor and the driver see (NFS, a FUSE-mounted bucket); see docs/lait.md for the spark-submit line.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .aggregate import PAIR_ORDER, aggregate_pairs, text_key
from .config import config_fingerprint
from .images import ImageResult, ImageSources, index_img2dataset_output, stage2_image
from .outputs import (
    OutputFolderError,
    atomic_path,
    format_summary,
    prepare_output_folder,
    write_contact_sheet,
    write_json,
    write_shards,
)
from .records import DropCounter, ImageCandidate, PairRecord
from .scoring import check_scoring_settings, scorer_for, stage4_score

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
CANDIDATE_SCHEMA = pa.schema([("bucket", pa.int32()), ("site", pa.string()), ("candidate_json", pa.string())])

# Columns of pairs.parquet, in order; the feature dicts are JSON strings so the schema does not depend on which
# features a run computed.
OUTPUT_COLUMNS = (
    ("warc_file", pa.string()),
    ("warc_offset", pa.int64()),
    ("page_url", pa.string()),
    ("site", pa.string()),
    ("image_url", pa.string()),
    ("image_sha256", pa.string()),
    ("image_key", pa.string()),
    ("image_width", pa.int64()),
    ("image_height", pa.int64()),
    ("text", pa.string()),
    ("text_source", pa.string()),
    ("dominance_score", pa.float64()),
    ("relevance_score", pa.float64()),
    ("itm_score", pa.float64()),
    ("kept", pa.bool_()),
    ("drop_stage", pa.string()),
    ("drop_reason", pa.string()),
    ("dom_features", pa.string()),
    ("text_features", pa.string()),
    ("image_features", pa.string()),
    ("image_scores", pa.string()),
)
OUTPUT_SCHEMA = pa.schema(list(OUTPUT_COLUMNS))
OUTPUT_ORDER = ("image_sha256", "page_url", "warc_offset", "text_source", "text")


# ---------------------------------------------------------------------------------------------------------------
# inputs and the per-record steps shared by both engines


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


class _SiteProcessor:
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


def output_row(
    part_row: Mapping[str, Any], kept: bool, drop_stage: str | None, drop_reason: str | None
) -> dict:
    """A pairs.parquet row (`OUTPUT_SCHEMA`) from a part row and its final status."""
    pair = json.loads(part_row["pair_json"])
    row = {name: pair.get(name) for name, _ in OUTPUT_COLUMNS}
    for name in ("dom_features", "text_features", "image_features", "image_scores"):
        row[name] = json.dumps(pair[name], sort_keys=True)
    row.update(kept=kept, drop_stage=drop_stage, drop_reason=drop_reason)
    return row


def _order(row: Mapping[str, Any]) -> tuple:
    return tuple(row[name] for name in OUTPUT_ORDER)


# ---------------------------------------------------------------------------------------------------------------
# the final step, shared


def _write_pairs_parquet(path: Path, rows: Iterable[Mapping[str, Any]], batch: int = 5000) -> int:
    """Streams rows into one parquet file, atomically. Output: the row count."""
    count = 0
    with atomic_path(path) as temp:
        with pq.ParquetWriter(temp, OUTPUT_SCHEMA) as writer:
            buffer: list[Mapping[str, Any]] = []
            for row in rows:
                buffer.append(row)
                if len(buffer) >= batch:
                    writer.write_table(pa.Table.from_pylist(buffer, schema=OUTPUT_SCHEMA))
                    count += len(buffer)
                    buffer = []
            if buffer:
                writer.write_table(pa.Table.from_pylist(buffer, schema=OUTPUT_SCHEMA))
                count += len(buffer)
    return count


def _finish(
    output: Path,
    *,
    engine: str,
    inputs: Sequence[str],
    counts: DropCounter,
    pairs_written: int,
    kept: int,
    shard_names: list[str],
    examples: Mapping[str, list[tuple[Mapping[str, Any], bytes | None]]],
    seconds: float,
) -> dict[str, Any]:
    stats = {
        "engine": engine,
        "input_files": len(inputs),
        "pairs_scored": pairs_written,
        "pairs_kept": kept,
        "images_kept": kept,
        "shards": shard_names,
        "seconds": round(seconds, 2),
        "counts": counts.to_dict(),
    }
    write_json(output / "stats.json", stats)
    with atomic_path(output / "summary.txt") as temp:
        temp.write_text(format_summary(stats), encoding="utf-8")
    write_contact_sheet(output / "contact_sheet.html", examples)
    return stats


def _example_groups(
    kept: Sequence[tuple[Mapping[str, Any], bytes | None]],
    dropped_pairs: Mapping[str, Sequence[tuple[Mapping[str, Any], bytes | None]]],
    stage2_examples: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, list[tuple[Mapping[str, Any], bytes | None]]]:
    groups: dict[str, list[tuple[Mapping[str, Any], bytes | None]]] = {"kept": list(kept)}
    for reason, items in sorted(dropped_pairs.items()):
        groups[f"dropped: {reason}"] = list(items)
    for reason, items in sorted(stage2_examples.items()):
        groups[f"dropped at stage 2: {reason}"] = [
            (item, base64.b64decode(item["thumb"]) if item.get("thumb") else None) for item in items
        ]
    return groups


# ---------------------------------------------------------------------------------------------------------------
# local engine


def _safe_name(path: str) -> str:
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    return f"{digest}-{re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(path))[:80]}"


def _read_done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    # A line cut by a kill has no newline yet: only complete lines count.
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return {line for line in lines[:-1] if line}


def _append_done(path: Path, name: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _step1_task(args: tuple[str, str, dict, int]) -> str:
    warc_file, part, config, buckets = args
    candidates, drops = extract_candidates(warc_file, config)
    rows = [
        {"bucket": site_bucket(c.site, buckets), "site": c.site, "candidate_json": json.dumps(c.to_dict())}
        for c in candidates
    ]
    rows.sort(key=lambda r: r["bucket"])
    part_path = Path(part)
    write_json(part_path.with_suffix(".stats.json"), drops.to_dict())
    with atomic_path(part_path) as temp:
        pq.write_table(pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA), temp)
    return warc_file


def _step2_task(args: tuple[int, list[str], str, dict]) -> int:
    bucket, candidate_parts, part, config = args
    drops = DropCounter()
    by_site: dict[str, list[ImageCandidate]] = defaultdict(list)
    for path in candidate_parts:
        table = pq.read_table(path, filters=[("bucket", "=", bucket)], columns=["site", "candidate_json"])
        for site, text in zip(
            table.column("site").to_pylist(), table.column("candidate_json").to_pylist(), strict=True
        ):
            by_site[site].append(ImageCandidate.from_dict(json.loads(text)))
    processor = _SiteProcessor(config, drops, int(config["engine"]["contact_sheet_examples"]))
    rows = list(processor.process_sites(by_site[site] for site in sorted(by_site)))
    part_path = Path(part)
    write_json(
        part_path.with_suffix(".stats.json"), {"counts": drops.to_dict(), "examples": processor.examples}
    )
    with atomic_path(part_path) as temp:
        pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), temp)
    return bucket


def _pool_map(function, tasks: list, processes: int) -> Iterator:
    if processes <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    # fork: workers inherit the imported stage modules instead of importing them again.
    with get_context("fork").Pool(min(processes, len(tasks))) as pool:
        yield from pool.imap_unordered(function, tasks)


def run_local(
    inputs: str | Sequence[str],
    output: str | Path,
    config: Mapping[str, Any],
    *,
    processes: int | None = None,
) -> dict[str, Any]:
    """Runs the pipeline on this machine: `inputs` (glob patterns or paths of WARC / WARC.gz files) ->
    `output` folder (created, or resumed when it is ours with the same config). `processes` overrides
    `engine.processes` (0 = one per core). Output: the stats dict also written to `stats.json`."""
    start = time.monotonic()
    files = list_inputs(inputs)
    output = Path(output)
    config = json.loads(json.dumps(config))
    # Before anything is written: a bad scorer or ITM path stops the run now, not in every worker after step 1.
    check_scoring_settings(config["scoring"])
    prepare_output_folder(output, config_fingerprint(config))
    engine = config["engine"]
    processes = engine["processes"] if processes is None else processes
    processes = processes or os.cpu_count() or 1
    buckets = int(engine["site_buckets"])
    work = output / "_work"
    candidates_dir, pairs_dir = work / "candidates", work / "pairs"
    candidates_dir.mkdir(parents=True, exist_ok=True)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    # The done-lists only mean something for the same inputs: a resume with other files would mix two runs.
    inputs_record = work / "inputs.json"
    if inputs_record.exists():
        previous = json.loads(inputs_record.read_text())
        if previous != {"files": files, "site_buckets": buckets}:
            raise OutputFolderError(
                f"{output}: started with other --input files or engine.site_buckets; give a new --output path "
                "or the same inputs to resume"
            )
    else:
        write_json(inputs_record, {"files": files, "site_buckets": buckets})
    # Temporary siblings a killed run left behind (ours: they live under our marked folder).
    for leftover in [*work.rglob(".*.tmp"), *output.glob(".*.tmp")]:
        leftover.unlink(missing_ok=True)
    for leftover in output.glob(".shards.*"):
        shutil.rmtree(leftover, ignore_errors=True)

    # Step 1, resumable by input file.
    done_files = _read_done(work / "done-files.txt")
    parts = {f: str(candidates_dir / f"{_safe_name(f)}.parquet") for f in files}
    tasks = [(f, parts[f], config, buckets) for f in files if f not in done_files]
    for finished in _pool_map(_step1_task, tasks, processes):
        _append_done(work / "done-files.txt", finished)

    # Step 2, resumable by site bucket; it needs every file's candidates, so it starts after step 1.
    done_buckets = _read_done(work / "done-buckets.txt")
    candidate_parts = [parts[f] for f in files]
    pair_parts = {b: str(pairs_dir / f"bucket-{b:05d}.parquet") for b in range(buckets)}
    tasks2 = [
        (b, candidate_parts, pair_parts[b], config) for b in range(buckets) if str(b) not in done_buckets
    ]
    for finished in _pool_map(_step2_task, tasks2, processes):
        _append_done(work / "done-buckets.txt", str(finished))

    # Step 3: aggregation over the metadata columns of all parts.
    counts = DropCounter()
    for f in files:
        counts.merge(DropCounter.from_dict(json.loads(Path(parts[f]).with_suffix(".stats.json").read_text())))
    stage2_examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    metadata: list[dict[str, Any]] = []
    meta_columns = [name for name in PART_SCHEMA.names if name != "image_jpeg"]
    for b in range(buckets):
        info = json.loads(Path(pair_parts[b]).with_suffix(".stats.json").read_text())
        counts.merge(DropCounter.from_dict(info["counts"]))
        for reason, items in info["examples"].items():
            stage2_examples[reason].extend(items)
        table = pq.read_table(pair_parts[b], columns=meta_columns)
        for i, row in enumerate(table.to_pylist()):
            row.update(part=b, row_index=i)
            metadata.append(row)
    for reason in stage2_examples:
        stage2_examples[reason] = sorted(stage2_examples[reason], key=lambda e: e["image_url"])[
            : int(engine["contact_sheet_examples"])
        ]
    for row in metadata:
        if not row["passed_scoring"]:
            row.update(kept=False, drop_stage="scoring", drop_reason="below_threshold")
    aggregate_pairs(metadata, config["aggregation"], counts)
    metadata.sort(key=_order)
    written = _write_pairs_parquet(
        output / "pairs.parquet",
        (output_row(r, r["kept"], r["drop_stage"], r["drop_reason"]) for r in metadata),
    )

    # Shards and examples: image bytes read part by part (one bucket's bytes in memory at a time).
    n_examples = int(engine["contact_sheet_examples"])
    wanted: dict[int, dict[int, str]] = defaultdict(dict)
    group_count: dict[str, int] = defaultdict(int)
    for row in metadata:
        group = "kept" if row["kept"] else row["drop_reason"]
        if row["kept"]:
            wanted[row["part"]][row["row_index"]] = "kept"
        elif group_count[group] < n_examples:
            wanted[row["part"]][row["row_index"]] = group
        group_count[group] += 1
    kept_total = sum(1 for r in metadata if r["kept"])
    examples_kept: list[tuple[Mapping[str, Any], bytes | None]] = []
    dropped_examples: dict[str, list[tuple[Mapping[str, Any], bytes | None]]] = defaultdict(list)
    by_part_row = {(r["part"], r["row_index"]): r for r in metadata}

    def samples() -> Iterator[tuple[Mapping[str, Any], bytes]]:
        for b in sorted(wanted):
            images = pq.read_table(pair_parts[b], columns=["image_jpeg"]).column("image_jpeg")
            for index in sorted(wanted[b]):
                row = by_part_row[(b, index)]
                jpeg = images[index].as_py()
                group = wanted[b][index]
                out = output_row(row, row["kept"], row["drop_stage"], row["drop_reason"])
                if group == "kept":
                    if len(examples_kept) < n_examples:
                        examples_kept.append((out, jpeg))
                    yield out, jpeg
                else:
                    dropped_examples[group].append((out, jpeg))

    shard_names = write_shards(output, samples(), int(engine["shard_size"]))
    return _finish(
        output,
        engine="local",
        inputs=files,
        counts=counts,
        pairs_written=written,
        kept=kept_total,
        shard_names=shard_names,
        examples=_example_groups(examples_kept, dropped_examples, stage2_examples),
        seconds=time.monotonic() - start,
    )


# ---------------------------------------------------------------------------------------------------------------
# Spark engine


def _spark_step1(config: dict):
    def run(files: Iterable[str]) -> Iterator[tuple]:
        for warc_file in files:
            candidates, drops = extract_candidates(warc_file, config)
            yield ("drops", json.dumps(drops.to_dict()), "")
            for candidate in candidates:
                yield ("candidate", candidate.site, json.dumps(candidate.to_dict()))

    return run


def _spark_step2(config: dict):
    def run(groups: Iterable[tuple[str, Iterable[str]]]) -> Iterator[tuple]:
        drops = DropCounter()
        processor = _SiteProcessor(config, drops, int(config["engine"]["contact_sheet_examples"]))
        sites = ([ImageCandidate.from_dict(json.loads(t)) for t in texts] for _site, texts in groups)
        for row in processor.process_sites(sites):
            yield ("pair", row)
        yield ("drops", {"counts": drops.to_dict(), "examples": dict(processor.examples)})

    return run


def spark_session(master: str | None = None, app_name: str = "lait"):
    """The active SparkSession, or a new one on `master`; None = the master spark-submit set (`--master`), or
    `local[*]` when run outside spark-submit."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if master:
        builder = builder.master(master)
    elif not SparkConf().contains("spark.master"):
        # Under spark-submit the JVM already carries --master in its system properties: never override it.
        builder = builder.master("local[*]")
    return builder.getOrCreate()


def run_spark(
    inputs: str | Sequence[str], output: str | Path, config: Mapping[str, Any], *, spark=None
) -> dict[str, Any]:
    """Runs the pipeline on Spark: the same stage functions in `mapPartitions`, the group steps as Spark
    group-bys. `spark` is a SparkSession (None = `spark_session(engine.spark_master)`). Output folder and stats as
    `run_local`; a Spark run is not resumable (Spark retries failed tasks itself), but its outputs are still
    written atomically."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    start = time.monotonic()
    files = list_inputs(inputs)
    output = Path(output)
    config = json.loads(json.dumps(config))
    check_scoring_settings(config["scoring"])
    prepare_output_folder(output, config_fingerprint(config))
    engine = config["engine"]
    spark = spark or spark_session(engine["spark_master"])
    sc = spark.sparkContext
    partitions = int(engine["spark_partitions"] or len(files))
    # The group-bys of step 3 shuffle into spark.sql.shuffle.partitions (200 by default): far too many tasks for
    # a few files; match the input parallelism instead.
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))

    step1 = sc.parallelize(files, min(partitions, len(files))).mapPartitions(_spark_step1(config)).cache()
    counts = DropCounter()
    for text in step1.filter(lambda t: t[0] == "drops").map(lambda t: t[1]).collect():
        counts.merge(DropCounter.from_dict(json.loads(text)))
    by_site = step1.filter(lambda t: t[0] == "candidate").map(lambda t: (t[1], t[2])).groupByKey(partitions)
    step2 = by_site.mapPartitions(_spark_step2(config)).cache()
    stage2_examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for info in step2.filter(lambda t: t[0] == "drops").map(lambda t: t[1]).collect():
        counts.merge(DropCounter.from_dict(info["counts"]))
        for reason, items in info["examples"].items():
            stage2_examples[reason].extend(items)
    n_examples = int(engine["contact_sheet_examples"])
    for reason in stage2_examples:
        stage2_examples[reason] = sorted(stage2_examples[reason], key=lambda e: e["image_url"])[:n_examples]

    schema = T.StructType(
        [
            T.StructField(
                f.name,
                {
                    pa.string(): T.StringType(),
                    pa.binary(): T.BinaryType(),
                    pa.bool_(): T.BooleanType(),
                    pa.float64(): T.DoubleType(),
                    pa.int64(): T.LongType(),
                }[f.type],
                True,
            )
            for f in PART_SCHEMA
        ]
    )
    pairs = spark.createDataFrame(step2.filter(lambda t: t[0] == "pair").map(lambda t: t[1]), schema).cache()

    # Step 3 as group-bys: descriptions on too many distinct images, then the best pair per image hash.
    passed = pairs.filter(F.col("passed_scoring"))
    limit = int(config["aggregation"]["max_images_per_text"])
    shared = (
        passed.groupBy("text_key")
        .agg(F.countDistinct("image_sha256").alias("n_images"))
        .filter(F.col("n_images") > limit)
        .select("text_key", F.lit(True).alias("shared"))
    )
    order = [F.col(c).desc() if descending else F.col(c).asc() for c, descending in PAIR_ORDER]
    window = Window.partitionBy("image_sha256").orderBy(*order)
    marked = passed.join(shared, "text_key", "left")
    eligible = marked.filter(F.col("shared").isNull()).withColumn("rank", F.row_number().over(window))
    status = (
        eligible.select(
            "*",
            (F.col("rank") == 1).alias("kept"),
            F.when(F.col("rank") == 1, F.lit(None)).otherwise(F.lit("aggregation")).alias("drop_stage"),
            F.when(F.col("rank") == 1, F.lit(None))
            .otherwise(F.lit("not_best_for_image"))
            .alias("drop_reason"),
        )
        .drop("rank", "shared")
        .unionByName(
            marked.filter(F.col("shared").isNotNull())
            .drop("shared")
            .select(
                "*",
                F.lit(False).alias("kept"),
                F.lit("aggregation").alias("drop_stage"),
                F.lit("shared_description").alias("drop_reason"),
            )
        )
        .unionByName(
            pairs.filter(~F.col("passed_scoring")).select(
                "*",
                F.lit(False).alias("kept"),
                F.lit("scoring").alias("drop_stage"),
                F.lit("below_threshold").alias("drop_reason"),
            )
        )
    ).cache()
    for row in status.filter(~F.col("kept")).groupBy("drop_stage", "drop_reason").count().collect():
        if row["drop_stage"] == "aggregation":
            counts.drop("aggregation", row["drop_reason"], int(row["count"]))
    kept_total = status.filter(F.col("kept")).count()
    if kept_total:
        counts.keep("aggregation", kept_total)

    sorted_status = status.orderBy(*[F.col(c).asc() for c in OUTPUT_ORDER])
    meta = sorted_status.drop("image_jpeg")
    written = _write_pairs_parquet(
        output / "pairs.parquet",
        (
            output_row(r.asDict(), r["kept"], r["drop_stage"], r["drop_reason"])
            for r in meta.toLocalIterator()
        ),
    )
    examples_kept: list[tuple[Mapping[str, Any], bytes | None]] = []

    def samples() -> Iterator[tuple[Mapping[str, Any], bytes]]:
        for r in sorted_status.filter(F.col("kept")).toLocalIterator():
            out = output_row(r.asDict(), True, None, None)
            jpeg = bytes(r["image_jpeg"])
            if len(examples_kept) < n_examples:
                examples_kept.append((out, jpeg))
            yield out, jpeg

    shard_names = write_shards(output, samples(), int(engine["shard_size"]))
    dropped_examples: dict[str, list[tuple[Mapping[str, Any], bytes | None]]] = defaultdict(list)
    window_reason = Window.partitionBy("drop_reason").orderBy(*[F.col(c).asc() for c in OUTPUT_ORDER])
    for r in (
        status.filter(~F.col("kept"))
        .withColumn("n", F.row_number().over(window_reason))
        .filter(F.col("n") <= n_examples)
        .orderBy("drop_reason", *OUTPUT_ORDER)
        .collect()
    ):
        dropped_examples[r["drop_reason"]].append(
            (output_row(r.asDict(), False, r["drop_stage"], r["drop_reason"]), bytes(r["image_jpeg"]))
        )
    for frame in (status, pairs):
        frame.unpersist()
    step1.unpersist()
    step2.unpersist()
    return _finish(
        output,
        engine="spark",
        inputs=files,
        counts=counts,
        pairs_written=written,
        kept=kept_total,
        shard_names=shard_names,
        examples=_example_groups(examples_kept, dropped_examples, stage2_examples),
        seconds=time.monotonic() - start,
    )


__all__ = [
    "OUTPUT_SCHEMA",
    "PART_SCHEMA",
    "extract_candidates",
    "list_inputs",
    "run_local",
    "run_spark",
    "site_bucket",
    "spark_session",
]
