"""The extraction runner: images -> region (and global) features, in resumable shards, on one or many processes.

The listed images (`sources.list_images`) are cut into shards of `shard_size` images in source order. Shard k
is finished when `shards/shard-0000k.done.json` exists; it is written after the shard's data file was renamed
into place, and records the shard's counts and the images it skipped. A run therefore resumes at the first unfinished shard; the data file of a shard without its done file, and `.tmp-`
files, are leftovers of a killed run, removed (and reported) by the next run. Nothing is written twice: a
finished shard is never recomputed.

The output folder (marker, shard records, manifest, skipped.tsv, summary.json) is described, written and read
back by `feature_formats/features_folder.py`; the shard layouts by `feature_formats/shards.py`.

Within a shard, images are ordered by size (orientation, then area, read from file headers) so batches hold
images of similar size (the detector batches only images of one resized shape). With `exact=True` (the CLI's
default) every image goes through the detector alone, so its features are bit for bit the single-image ones
whatever the batch size; network batches agree with them up to float rounding. Rows are stored in source order.

Several processes (`accelerate launch`): process i takes shards i, i + n, i + 2n, ...; the main process prepares
the folder before the others start and merges the manifest after all have finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_write_text, releasing_locks
from ..detection_imagebert import detection_to_record
from ..feature_formats.features_folder import (
    SHARDS_DIR,
    SKIPPED_NAME,
    SUMMARY_NAME,
    ExtractionError,
    prepare_output,
    read_done,
    write_done,
    write_manifest,
)
from ..feature_formats.shards import OUTPUT_FORMATS, record_problem, shard_name, write_shard
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, DecodedImage, decode_image, read_image_size
from .sources import ImageRef

Detect = Callable[[list[np.ndarray]], list[dict]]


@dataclass
class ExtractionSummary:
    """What one run did. `images_extracted` / `skipped` count this run's shards only; `total_*` the whole
    folder once complete."""

    output: Path
    num_shards: int
    num_processes: int = 1
    shards_done_before: int = 0
    shards_written: int = 0
    images_extracted: int = 0
    skipped: Counter = field(default_factory=Counter)
    removed_leftovers: list[str] = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False
    total_extracted: int = 0
    total_skipped: Counter = field(default_factory=Counter)

    @property
    def images_per_second(self) -> float:
        processed = self.images_extracted + sum(self.skipped.values())
        return processed / self.seconds if self.seconds > 0 else 0.0

    def text(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"output: {self.output}",
            f"shards: {self.shards_written} written now, {self.shards_done_before} done before, "
            f"{self.num_shards} in all ({'complete' if self.complete else 'INCOMPLETE'})",
            f"{'this run' if self.num_processes == 1 else 'this process'}: {self.images_extracted} images extracted, {sum(self.skipped.values())} skipped in "
            f"{self.seconds:.1f} s ({self.images_per_second:.2f} images/s)",
        ]
        if self.complete:
            lines.append(
                f"whole folder: {self.total_extracted} images, {sum(self.total_skipped.values())} skipped"
            )
            for reason, count in sorted(self.total_skipped.items()):
                lines.append(f"  skipped {reason}: {count} (see {SKIPPED_NAME})")
        if self.removed_leftovers:
            lines.append(f"removed {len(self.removed_leftovers)} leftover(s) of an interrupted run")
        return "\n".join(lines)


def _ids_digest(refs: Sequence[ImageRef]) -> str:
    digest = hashlib.sha1()
    for ref in refs:
        digest.update(ref.image_id.encode("utf-8") + b"\n")
    return digest.hexdigest()


def run_settings(
    refs: Sequence[ImageRef],
    *,
    output_format: str,
    shard_size: int,
    detector: dict,
    global_model: str | None,
    max_pixels: int | None,
    min_side: int,
    exact: bool = False,
) -> dict:
    """The settings that fix the content of an output folder (a resumed run must match them): the image list
    (count and a digest of the ids in order), sharding, output format, the detector description (weights, box
    selection, dtype), the global model, the bad-image limits and exact mode. Batch size, device and worker counts
    are not among them: they change the output at most in float rounding (and not at all in exact mode)."""
    return {
        "num_images": len(refs),
        "image_ids_sha1": _ids_digest(refs),
        "shard_size": shard_size,
        "output_format": output_format,
        "detector": detector,
        "global_model": global_model,
        "max_pixels": max_pixels,
        "min_side": min_side,
        "exact": exact,
    }


def _size_key(ref_size: tuple[int, int] | None, index: int) -> tuple:
    """Sort key grouping images of similar size: landscape before portrait, then by area; unreadable headers
    last (they will be skipped when decoded)."""
    if ref_size is None:
        return (2, 0, index)
    width, height = ref_size
    return (int(height > width), width * height, index)


def _try_detect(detect: Detect, images: list[np.ndarray]) -> tuple[list[dict] | None, Exception | None]:
    """(`detect(images)`, None), or (None, the error) when it raises on these images (e.g. a 12 x 2000 panorama
    whose resized short side vanishes in the backbone). Running out of memory, interrupts and a wrong number of
    results are raised: they are not about one image."""
    try:
        detections = detect(images)
    except MemoryError:
        raise
    except Exception as error:
        if "out of memory" in str(error).lower():
            raise
        return None, error
    if len(detections) != len(images):
        raise RuntimeError(f"the detector returned {len(detections)} results for {len(images)} images")
    return detections, None


def _extract_shard(
    refs: Sequence[ImageRef],
    *,
    detect: Detect,
    global_extractor,
    batch_size: int,
    exact: bool,
    max_pixels: int | None,
    min_side: int,
    output_format: str,
    pool: ThreadPoolExecutor,
    progress: tqdm,
) -> tuple[list[dict], list[dict]]:
    """Records (in source order) and skips of one shard's images."""

    def size_of(ref: ImageRef) -> tuple[int, int] | None:
        if ref.problem is not None:
            return None
        try:
            return read_image_size(ref.read())
        except Exception:  # reported by decode below
            return None

    def decode(ref: ImageRef):
        if ref.problem is not None:  # a bad image id or a damaged shard (`sources`): skipped unread
            return DecodedImage(None, *ref.problem)
        try:
            data = ref.read()
        except Exception as error:  # a vanished file, a tar cut short, a dataset row without the column
            return DecodedImage(None, "unreadable", f"cannot read the image: {type(error).__name__}: {error}")
        return decode_image(data, max_pixels=max_pixels, min_side=min_side)

    sizes = list(pool.map(size_of, refs))
    order = sorted(range(len(refs)), key=lambda index: _size_key(sizes[index], index))
    records: dict[int, dict] = {}
    skips: dict[int, dict] = {}

    def skip(index: int, reason: str, message: str) -> None:
        ref = refs[index]
        message = " ".join(str(message).split())  # one line, whatever the decoder or detector said
        skips[index] = {"image_id": ref.image_id, "origin": ref.origin, "reason": reason, "message": message}

    # Decode ahead of the detector, at most two batches in flight, so memory stays bounded.
    pending: deque = deque()
    queue = iter(order)
    for index in queue:
        pending.append((index, pool.submit(decode, refs[index])))
        if len(pending) >= 2 * batch_size:
            break
    batch: list[tuple[int, np.ndarray]] = []
    while pending:
        index, future = pending.popleft()
        following = next(queue, None)
        if following is not None:
            pending.append((following, pool.submit(decode, refs[following])))
        decoded = future.result()
        if not decoded.ok:
            skip(index, decoded.reason, decoded.message)
            progress.update(1)
        else:
            batch.append((index, decoded.image))
        if len(batch) == batch_size or (not pending and batch):
            images = [image for _, image in batch]
            # exact: one image per detector call, so each result is bit for bit the single-image one (a batched
            # convolution or matmul may pick other kernels and round differently in the last bits).
            detections = None if exact else _try_detect(detect, images)[0]
            if detections is None:  # exact mode, or an image of the batch broke the detector: one at a time
                detections = []
                for position, image in batch:
                    result, error = _try_detect(detect, [image])
                    if result is None:
                        skip(position, "detector_error", f"{type(error).__name__}: {error}")
                        progress.update(1)
                    detections.append(None if result is None else result[0])
                kept = [k for k, detection in enumerate(detections) if detection is not None]
                batch = [batch[k] for k in kept]
                images = [images[k] for k in kept]
                detections = [detections[k] for k in kept]
            globals_ = (
                global_extractor.extract(images) if global_extractor is not None else [None] * len(images)
            )
            for (position, _), detection, global_feature in zip(batch, detections, globals_, strict=True):
                record = detection_to_record(refs[position].image_id, detection, global_feature)
                problem = record_problem(record, output_format)
                if problem is not None:
                    skip(position, *problem)
                else:
                    records[position] = record
            progress.update(len(batch))
            batch = []
    return [records[i] for i in sorted(records)], [skips[i] for i in sorted(skips)]


@releasing_locks()  # the output folder is locked (claim_folder) while the extraction runs
def run_extraction(
    refs: Sequence[ImageRef],
    output: str | os.PathLike,
    *,
    detect: Detect,
    feature_dim: int,
    detector_settings: dict,
    output_format: str = "dataset",
    shard_size: int = 500,
    batch_size: int = 4,
    exact: bool = False,
    global_extractor=None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    num_workers: int = 4,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] | None = None,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
) -> ExtractionSummary:
    """Extract features of `refs` into `output`, resuming a killed run of the same settings.

    Args:
        refs: the images, from `sources.list_images` (order and ids fix the shards).
        output: the output folder (created; an existing one must be ours, see `prepare_output`).
        detect: images (list of RGB uint8 (H, W, 3) arrays) -> one detector dict per image with "boxes" (N, 4)
            original-image pixels, "features" (N, F), "classes", "scores", "attributes", "attribute_scores" (N,),
            "image_width", "image_height" (e.g. `partial(detector.detect, processor=processor)`); it must give a
            result per image that does not depend on the other images of the batch.
        feature_dim: F.
        detector_settings: a JSON-able description of the detector (weights, box selection, dtype): part of the
            settings a resumed run must match.
        output_format: "dataset", "butd-tsv" or "npz" (see `feature_formats/shards.py`).
        shard_size: images per shard.
        batch_size: images per detector call (and decoded ahead: twice this many).
        exact: call `detect` on one image at a time, so every feature is bit for bit what the detector gives
            that image alone, whatever the batch size, even with a `detect` whose batched calls round differently
            (`BUTDDetector.detect(..., batch_invariant=False)` is within 1e-4 of single-image results). Recorded
            in the folder's settings.
        global_extractor: a `global_features.GlobalFeatureExtractor` to add `global_feature`, or None.
        max_pixels, min_side: bad-image limits (see `images.decode_image`).
        num_workers: threads reading and decoding images.
        rank, world_size: this process and the number of processes; process `rank` takes shards rank,
            rank + world_size, ...
        barrier: called where all processes must meet (after the main process prepared the folder, and before
            it merges the manifest); required when world_size > 1.
        show_progress: a tqdm bar with images/s and the remaining time (main process only).
        log: where messages go.

    Returns:
        an `ExtractionSummary` of this process's work (and of the whole folder on the main process).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}")
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be >= 1, got {shard_size} and {batch_size}")
    if world_size > 1 and barrier is None:
        raise ValueError(
            "several processes need a barrier (e.g. accelerate's PartialState().wait_for_everyone)"
        )
    if output_format == "butd-tsv" and global_extractor is not None:
        raise ValueError(
            "the BUTD TSV layout has no column for a global feature; use --output-format dataset or npz"
        )
    if output_format == "npz":
        for ref in refs:
            if ref.problem is None and (
                "/" in ref.image_id or ref.image_id.startswith(".") or "\\" in ref.image_id
            ):
                raise ExtractionError(
                    f"{ref.origin}: image_id {ref.image_id!r} cannot be an .npz file name (expected no '/' and no "
                    "leading '.'); use --id-style stem or another output format"
                )
    start = time.perf_counter()
    output = Path(output).absolute()
    num_shards = max(1, -(-len(refs) // shard_size))
    settings = run_settings(
        refs,
        output_format=output_format,
        shard_size=shard_size,
        detector=detector_settings,
        global_model=None if global_extractor is None else global_extractor.name,
        max_pixels=max_pixels,
        min_side=min_side,
        exact=exact,
    )
    summary = ExtractionSummary(output=output, num_shards=num_shards, num_processes=world_size)
    if rank == 0:
        summary.removed_leftovers = prepare_output(output, settings, num_shards, output_format)
        for path in summary.removed_leftovers:
            log(f"removed leftover of an interrupted run: {path}")
    if barrier is not None:
        barrier()
    shards = output / SHARDS_DIR

    mine = list(range(rank, num_shards, world_size))
    todo = [index for index in mine if read_done(shards, index) is None]
    summary.shards_done_before = len(mine) - len(todo)
    if summary.shards_done_before and rank == 0:
        log(f"resuming: {summary.shards_done_before} shard(s) already done, {len(todo)} to go")
    remaining = sum(len(refs[index * shard_size : (index + 1) * shard_size]) for index in todo)
    progress = tqdm(
        total=remaining, desc="extracting", unit="img", disable=not show_progress or rank != 0, smoothing=0.1
    )
    try:
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            for index in todo:
                shard_refs = refs[index * shard_size : (index + 1) * shard_size]
                records, skips = _extract_shard(
                    shard_refs,
                    detect=detect,
                    global_extractor=global_extractor,
                    batch_size=batch_size,
                    exact=exact,
                    max_pixels=max_pixels,
                    min_side=min_side,
                    output_format=output_format,
                    pool=pool,
                    progress=progress,
                )
                write_shard(
                    records,
                    shards / shard_name(index, output_format),
                    output_format,
                    feature_dim=feature_dim,
                    with_global_feature=global_extractor is not None,
                )
                done = {
                    "shard": index,
                    "images": len(shard_refs),
                    "extracted": len(records),
                    "skipped": skips,
                }
                write_done(shards, index, done)
                summary.shards_written += 1
                summary.images_extracted += len(records)
                summary.skipped.update(skip["reason"] for skip in skips)
                for skip in skips:
                    progress.write(f"skipped {skip['origin']}: {skip['reason']}: {skip['message']}")
    finally:
        progress.close()
    summary.seconds = time.perf_counter() - start
    if barrier is not None:
        barrier()
    if rank == 0:
        merge_manifest(output, num_shards, output_format, summary)
    return summary


def merge_manifest(output: Path, num_shards: int, output_format: str, summary: ExtractionSummary) -> None:
    """Write manifest.json (finished shards), and once all are finished skipped.tsv and summary.json."""
    finished, skipped_rows = write_manifest(output, num_shards, output_format)
    summary.complete = len(finished) == num_shards
    if not summary.complete:
        return
    summary.total_extracted = sum(entry["extracted"] for entry in finished)
    summary.total_skipped = Counter(row["reason"] for row in skipped_rows)
    lines = ["image_id\torigin\treason\tmessage"]
    for row in skipped_rows:
        lines.append(
            "\t".join(" ".join(str(row[key]).split()) for key in ("image_id", "origin", "reason", "message"))
        )
    atomic_write_text(output / SKIPPED_NAME, "\n".join(lines) + "\n")
    report = {
        "images": summary.total_extracted + sum(summary.total_skipped.values()),
        "extracted": summary.total_extracted,
        "skipped": dict(sorted(summary.total_skipped.items())),
        "last_run": {
            "seconds": round(summary.seconds, 3),
            "images_per_second": round(summary.images_per_second, 3),
            "shards_written": summary.shards_written,
        },
    }
    atomic_write_text(output / SUMMARY_NAME, json.dumps(report, indent=1) + "\n")


__all__ = ["ExtractionSummary", "run_extraction", "run_settings"]
