"""Writing a LAIT run's output folder: atomically, and only into a folder the pipeline created.

Layout of `--output DIR`:

- `.lait-output` (marker: this folder is ours; holds the config fingerprint), `_work/` (per-input-file parts and
  the done-list of the local engine; kept so a run can resume),
- `pairs.parquet`: every scored pair with all its scores and provenance, `kept` and the drop stage/reason,
- `shards/{00000..}.tar`: webdataset shards of the kept images in img2dataset's layout (`{key}.jpg`,
  `{key}.txt` caption, `{key}.json` metadata), readable by `python -m modeling_imagebert.features`,
- `stats.json` (kept / dropped by stage and reason), `summary.txt`, `contact_sheet.html`.

Every file is written to a temporary sibling and renamed into place (`modeling_imagebert.atomic`), so a killed run
leaves each complete or absent; the marker is claimed with `atomic.claim_folder`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import shutil
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import (
    atomic_file,
    atomic_write_text,
    claim_folder,
    remove_stale_temporaries,
    replace_folder,
    temporary_sibling,
)
from .records import DropCounter

MARKER = ".lait-output"

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


class OutputFolderError(ValueError):
    """The output folder exists and was not created by this pipeline, or by another config."""


def write_json(path: Path, data: Any) -> None:
    """Writes `data` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str))


def prepare_output_folder(folder: Path, fingerprint: str) -> bool:
    """Creates `folder` with our marker, or accepts it when it already carries our marker with the same config
    fingerprint (a resume). Output: True when resuming. Raises `OutputFolderError` for a folder we did not
    create (non-empty without our marker) or one made with another config."""
    recorded = claim_folder(
        folder,
        MARKER,
        {"created_by": "modeling_imagebert.lait", "config_fingerprint": fingerprint},
        owner="the LAIT pipeline",
        error=OutputFolderError,
    )
    if recorded is None:
        return False
    stored = str(recorded.get("config_fingerprint"))
    if stored != fingerprint:
        raise OutputFolderError(
            f"{folder}: made with another LAIT config (fingerprint {stored[:12]} != {fingerprint[:12]}); "
            "give a new --output path or the same config to resume"
        )
    return True


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


def output_order(row: Mapping[str, Any]) -> tuple:
    """The sort key of a pairs.parquet row (`OUTPUT_ORDER`): the same order from both engines."""
    return tuple(row[name] for name in OUTPUT_ORDER)


def write_pairs_parquet(path: Path, rows: Iterable[Mapping[str, Any]], batch: int = 5000) -> int:
    """Streams rows into one parquet file, atomically. Output: the row count."""
    count = 0
    with atomic_file(path) as temp:
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


def write_shards(
    folder: Path, samples: Iterable[tuple[Mapping[str, Any], bytes]], shard_size: int
) -> list[str]:
    """Writes `(pair, jpeg bytes)` samples as webdataset shards `folder/shards/{n:05d}.tar` in img2dataset's
    layout: `{key}.jpg`, `{key}.txt` (the caption) and `{key}.json` (url, caption, key, status, width, height,
    provenance and scores), with `key = pair["image_key"]`. The shards folder is built beside and renamed into
    place, replacing the one of an earlier run. Output: shard names."""
    final = Path(folder) / "shards"
    remove_stale_temporaries(final)
    temp = temporary_sibling(final)
    names: list[str] = []
    tar: tarfile.TarFile | None = None
    try:
        for i, (pair, jpeg) in enumerate(samples):
            if i % shard_size == 0:
                if tar is not None:
                    tar.close()
                names.append(f"{len(names):05d}.tar")
                tar = tarfile.open(temp / names[-1], "w")
            # The key is the image's content hash prefix: stable across engines and runs, unique after
            # aggregation (one pair per image).
            key = pair["image_key"]
            meta = {
                "key": key,
                "url": pair["image_url"],
                "caption": pair["text"],
                "status": "success",
                "width": pair["image_width"],
                "height": pair["image_height"],
                "sha256": pair["image_sha256"],
                "page_url": pair["page_url"],
                "warc_file": pair["warc_file"],
                "warc_offset": pair["warc_offset"],
                "text_source": pair["text_source"],
                "relevance_score": pair["relevance_score"],
                "itm_score": pair.get("itm_score"),
                "dominance_score": pair["dominance_score"],
            }
            for suffix, data in (
                ("jpg", jpeg),
                ("txt", pair["text"].encode()),
                ("json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(data))
        if tar is not None:
            tar.close()
        replace_folder(temp, final)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return names


def format_summary(stats: Mapping[str, Any]) -> str:
    """`stats.json` as a human-readable table: per stage kept, dropped by reason, events."""
    lines = ["LAIT run summary", "================", ""]
    for key in ("input_files", "pairs_kept", "images_kept", "engine", "seconds"):
        if key in stats:
            lines.append(f"{key:>14}: {stats[key]}")
    counts = stats["counts"]
    lines.append("")
    for stage in ("warc", "pages", "images", "text", "scoring", "aggregation"):
        kept = counts["kept"].get(stage)
        dropped = counts["dropped"].get(stage, {})
        events = counts["events"].get(stage, {})
        if kept is None and not dropped and not events:
            continue
        lines.append(f"[{stage}] kept {kept or 0}, dropped {sum(dropped.values())}")
        for reason, n in sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"    drop  {reason:<28} {n}")
        for name, n in sorted(events.items()):
            lines.append(f"    event {name:<28} {n}")
    return "\n".join(lines) + "\n"


def _thumbnail_uri(jpeg: bytes | None) -> str:
    if not jpeg:
        return ""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as image:
            image = image.convert("RGB")
            image.thumbnail((160, 160))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=80)
    except Exception:
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def write_contact_sheet(
    path: Path, groups: Mapping[str, list[tuple[Mapping[str, Any], bytes | None]]]
) -> None:
    """A self-contained HTML page of example thumbnails per group ("kept", then one group per drop reason),
    each with its text, source, scores and page; written atomically."""
    parts = [
        "<!doctype html><meta charset='utf-8'><title>LAIT contact sheet</title>",
        "<style>body{font:13px sans-serif}.g{display:flex;flex-wrap:wrap}.c{width:180px;margin:4px;"
        "border:1px solid #ccc;padding:4px}.c img{max-width:170px}.n{color:#777}</style>",
        "<h1>LAIT contact sheet</h1>",
    ]
    for group, examples in groups.items():
        parts.append(f"<h2>{html.escape(group)} ({len(examples)} shown)</h2><div class='g'>")
        for pair, jpeg in examples:
            uri = _thumbnail_uri(jpeg)
            image = f"<img src='{uri}' alt=''>" if uri else "<div class='n'>(no image bytes)</div>"
            score = pair.get("relevance_score")
            score_text = f"{score:.3f}" if isinstance(score, float) else "-"
            parts.append(
                f"<div class='c'>{image}<div>{html.escape(str(pair.get('text', '')))}</div>"
                f"<div class='n'>{html.escape(str(pair.get('text_source', '')))} · relevance {score_text}</div>"
                f"<div class='n'>{html.escape(str(pair.get('image_url', '')))}</div></div>"
            )
        parts.append("</div>")
    atomic_write_text(path, "\n".join(parts))


def write_reports(
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
    """Writes `stats.json`, `summary.txt` and `contact_sheet.html` (from `examples`, see `contact_sheet_groups`).
    Output: the stats dict."""
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
    atomic_write_text(output / "summary.txt", format_summary(stats))
    write_contact_sheet(output / "contact_sheet.html", examples)
    return stats


def contact_sheet_groups(
    kept: Sequence[tuple[Mapping[str, Any], bytes | None]],
    dropped_pairs: Mapping[str, Sequence[tuple[Mapping[str, Any], bytes | None]]],
    stage2_examples: Mapping[str, Sequence[Mapping[str, Any]]],
) -> dict[str, list[tuple[Mapping[str, Any], bytes | None]]]:
    """The contact sheet's groups: "kept", then "dropped: <reason>" per pair-level drop, then "dropped at stage 2:
    <reason>" (stage-2 examples carry a base64 thumbnail, decoded here)."""
    groups: dict[str, list[tuple[Mapping[str, Any], bytes | None]]] = {"kept": list(kept)}
    for reason, items in sorted(dropped_pairs.items()):
        groups[f"dropped: {reason}"] = list(items)
    for reason, items in sorted(stage2_examples.items()):
        groups[f"dropped at stage 2: {reason}"] = [
            (item, base64.b64decode(item["thumb"]) if item.get("thumb") else None) for item in items
        ]
    return groups


__all__ = [
    "MARKER",
    "OUTPUT_COLUMNS",
    "OUTPUT_ORDER",
    "OUTPUT_SCHEMA",
    "OutputFolderError",
    "contact_sheet_groups",
    "format_summary",
    "output_order",
    "output_row",
    "prepare_output_folder",
    "write_contact_sheet",
    "write_json",
    "write_pairs_parquet",
    "write_reports",
    "write_shards",
]
