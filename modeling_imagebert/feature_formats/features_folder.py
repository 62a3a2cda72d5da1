"""The folder an extraction run writes (`python -m modeling_imagebert.features`): its marker, its shard records and
manifest, written and read here, side by side.

    imagebert_features.json   marker: what wrote this folder and the settings that fix its content; a folder
                              without it is never written into, and a resumed run must use the same settings
    shards/shard-00000.arrow  the features (or .tsv / an npz folder, see `shards.py`)
    shards/shard-00000.done.json
    manifest.json             the finished shards, merged by the main process (complete: true at the end)
    skipped.tsv               image_id, origin, reason, message of every image that was skipped
    summary.json              counts by reason, images/s

Shard k is finished when `shards/shard-0000k.done.json` exists; it is written after the shard's data file was
renamed into place. The data file of a shard without its done file, and `.tmp-` files, are leftovers of a killed
run, removed (and reported) by `prepare_output`. Every file is written through `atomic.py` (a temporary sibling
and a rename). `iter_extracted_records` and `load_features` read a finished folder: what `data/convert.py` joins
with captions, and what `lait/` scores.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from ..atomic import TEMP_PREFIX, atomic_write_text, claim_folder
from .shards import read_shard_records, shard_name

MARKER_NAME = "imagebert_features.json"
MARKER_KIND = "modeling_imagebert features extraction"
MARKER_VERSION = 1
MANIFEST_NAME = "manifest.json"
SKIPPED_NAME = "skipped.tsv"
SUMMARY_NAME = "summary.json"
SHARDS_DIR = "shards"


class ExtractionError(ValueError):
    """The output folder cannot be used: not ours, written with other settings, or the images changed. The
    message names the folder and the differing setting."""


def done_path(shards: Path, index: int) -> Path:
    """Where shard `index`'s done record lives in the `shards` folder."""
    return shards / f"shard-{index:05d}.done.json"


def read_done(shards: Path, index: int) -> dict | None:
    """Shard `index`'s done record, or None while the shard is unfinished."""
    path = done_path(shards, index)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExtractionError(
            f"{path}: unreadable shard record ({error}); delete it to redo the shard"
        ) from None


def write_done(shards: Path, index: int, done: dict) -> None:
    """Writes shard `index`'s record (its counts and skipped images) once its data file is in place: from then on
    the shard is finished."""
    atomic_write_text(done_path(shards, index), json.dumps(done, indent=1) + "\n")


def prepare_output(output: Path, settings: dict, num_shards: int, output_format: str) -> list[str]:
    """Create `output` (or check that it is ours with the same settings) and remove leftovers of a killed run.

    Returns:
        the paths removed (temporary files, and data of shards that have no done file).

    Raises:
        ExtractionError: `output` exists, is not empty and has no marker (not written by us), or its marker
            records other settings (the message names each differing setting).
    """
    # A folder holding only the temporary of its marker (a run killed while writing it) is ours: claimed again.
    recorded = claim_folder(
        output,
        MARKER_NAME,
        {"kind": MARKER_KIND, "version": MARKER_VERSION, "settings": settings},
        owner="this extractor",
        error=ExtractionError,
    )
    if recorded is not None:
        if recorded.get("kind") != MARKER_KIND:
            raise ExtractionError(
                f"{output / MARKER_NAME}: not a marker of this extractor (kind {recorded.get('kind')!r})"
            )
        previous = recorded.get("settings", {})
        differing = [
            key for key in sorted(set(previous) | set(settings)) if previous.get(key) != settings.get(key)
        ]
        if differing:
            details = "; ".join(
                f"{key}: {previous.get(key)!r} then, {settings.get(key)!r} now" for key in differing
            )
            raise ExtractionError(
                f"{output} was started with other settings ({details}); resume with the same images and settings, "
                "or write to a new folder"
            )
    shards = output / SHARDS_DIR
    shards.mkdir(exist_ok=True)

    removed = []
    for folder in (output, shards):
        for path in sorted(folder.iterdir()):
            if path.name.startswith(TEMP_PREFIX):
                removed.append(str(path))
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    for index in range(num_shards):
        data = shards / shard_name(index, output_format)
        if data.exists() and not done_path(shards, index).is_file():
            removed.append(str(data))  # renamed into place, but killed before its done record: redo it
            shutil.rmtree(data) if data.is_dir() else data.unlink()
    return removed


def write_manifest(output: Path, num_shards: int, output_format: str) -> tuple[list[dict], list[dict]]:
    """Writes manifest.json from the done records of the shards finished so far ("complete" once all are).

    Returns:
        (the manifest's shard entries {"shard", "path", "images", "extracted", "skipped"}, the skipped-image rows
        of those shards {"image_id", "origin", "reason", "message"}).
    """
    shards = output / SHARDS_DIR
    finished = []
    skipped_rows = []
    for index in range(num_shards):
        done = read_done(shards, index)
        if done is None:
            continue
        finished.append(
            {
                "shard": index,
                "path": f"{SHARDS_DIR}/{shard_name(index, output_format)}",
                "images": done["images"],
                "extracted": done["extracted"],
                "skipped": len(done["skipped"]),
            }
        )
        skipped_rows.extend(done["skipped"])
    manifest = {
        "output_format": output_format,
        "num_shards": num_shards,
        "complete": len(finished) == num_shards,
    }
    manifest["shards"] = finished
    atomic_write_text(output / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    return finished, skipped_rows


def finished_manifest(folder: Path) -> dict:
    """The manifest of a finished extraction folder; raises ExtractionError for a folder that is not one, or whose
    extraction is unfinished (its manifest is trusted only while every shard it lists is still finished)."""
    manifest_path = folder / MANIFEST_NAME
    if not (folder / MARKER_NAME).is_file():
        raise ExtractionError(
            f"{folder}: no {MARKER_NAME}; expected a folder written by python -m modeling_imagebert.features"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {"complete": False, "shards": [], "num_shards": "?"}
    shards = folder / SHARDS_DIR
    if manifest.get("complete"):
        # the manifest is merged at the end of a run: trust it only while every shard it lists is still finished
        for entry in manifest["shards"]:
            if not (done_path(shards, entry["shard"]).is_file() and (folder / entry["path"]).exists()):
                manifest["complete"] = False
                manifest["shards"] = [
                    e for e in manifest["shards"] if done_path(shards, e["shard"]).is_file()
                ]
                break
    if not manifest.get("complete"):
        raise ExtractionError(
            f"{folder}: the extraction is unfinished ({len(manifest.get('shards', []))} of "
            f"{manifest.get('num_shards')} shards done); run the same extraction command again to finish it"
        )
    return manifest


def iter_extracted_records(folder: str | os.PathLike) -> Iterator[dict]:
    """Image records of a finished extraction folder, in shard order, in the importers' layout (region_features
    float16 (N, F), region_boxes float32 (N, 4), region_classes int32, region_scores float32, image_width /
    image_height, and global_feature when computed): what `data.convert` joins with captions.

    Raises:
        ExtractionError: not an extraction folder, or an unfinished one.
    """
    folder = Path(folder)
    manifest = finished_manifest(folder)
    for entry in manifest["shards"]:
        yield from read_shard_records(folder / entry["path"], manifest["output_format"])


def load_features(folder: str | os.PathLike):
    """A finished `dataset`-format extraction folder as one memory-mapped `datasets.Dataset` (columns: see
    `shards.py`). Read region features with `.with_format("numpy", dtype=None)` to keep float16."""
    import datasets

    folder = Path(folder)
    manifest = finished_manifest(folder)
    if manifest["output_format"] != "dataset":
        raise ExtractionError(
            f"{folder}: written as {manifest['output_format']!r}; load_features reads 'dataset'"
        )
    parts = [datasets.Dataset.from_file(str(folder / entry["path"])) for entry in manifest["shards"]]
    return datasets.concatenate_datasets(parts)


__all__ = [
    "MANIFEST_NAME",
    "MARKER_NAME",
    "SHARDS_DIR",
    "SKIPPED_NAME",
    "SUMMARY_NAME",
    "ExtractionError",
    "done_path",
    "finished_manifest",
    "iter_extracted_records",
    "load_features",
    "prepare_output",
    "read_done",
    "write_done",
    "write_manifest",
]
