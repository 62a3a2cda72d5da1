"""Every stage's data, checked once before the first stage trains.

A bad row or a data/model mismatch in stage 2 used to surface when stage 2 started (or a few steps into it), as a
traceback naming no row. `check_stage_data` loads every source of every remaining stage up front and:

- validates each image-text source with the schema's vectorised validator (`schema.validate_dataset`, a batch's
  columns at once: finite features, boxes inside their image, class ids >= 0, scores in [0, 1], non-empty text,
  ...), with a progress bar;
- checks it against the model: region feature dimension vs `visual_feature_dim`, class ids vs `num_object_classes`
  (the first row beyond it named), and, in a stage that trains ITM, that the source has at least two image_ids
  (negatives are partners with another image_id: with one, ITM would see positives only);
- checks the tokenizer against the model's `vocab_size` (token ids beyond it would index past the embedding);
- checks the evaluation split the same way (it is read only after the last stage).

Each error names `stages[i].datasets[j]`, the source, the row and the field. The row validation of a saved dataset
is cached by the dataset's content (its `_fingerprint`, row count and the SHA-256 of the bytes of each of its Arrow
files) in a small JSON file under the datasets cache (`$IMAGEBERT_VALIDATION_CACHE`, default
`<HF_DATASETS_CACHE>/modeling_imagebert_validated/`), together with the statistics the model checks need, so a
re-run skips the row scan. Content, not file names, sizes and modification times: a file rewritten in place (one
feature set to NaN, the size kept, the modification time put back with `os.utime`) is validated again, and a moved
or copied dataset still finds its entry.

Hashing streams each file once (about 0.45 GB/s on one core of the shared 2-core test machine: 2.3 s per GiB,
about as long as the row scan itself), so each file's digest is remembered too (`digests/` in the same folder), under the file's
identity: path, device, inode, size, modification time and change time (`st_ctime`). The change time is what a
rewrite in place cannot hide: every write and every `os.utime` sets it to the present, and no call sets it back. A
re-run of unchanged files therefore reads no data; a file whose change time is within `RACY_SECONDS` of the hashing
is not remembered (a write in the same clock tick would leave its times unchanged, git's "racy" case).
In-memory sources (the toy world) are small and validated every time. Region counts
beyond `max_regions` are fine: the processor keeps the top `max_regions` by score.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..data.schema import DataValidationError, validate_dataset
from .data_sources import load_source
from .recipes import Recipe, RecipeError

CACHE_ENV = "IMAGEBERT_VALIDATION_CACHE"
# Bump when `validate_record` starts refusing something new: older cache entries are then ignored.
VALIDATION_VERSION = 1
# A file changed this recently may change again within its file system's timestamp tick: its digest is not
# remembered (see the module docstring).
RACY_SECONDS = 2.0


@dataclass
class SourceSummary:
    """What the model checks need to know of a validated image-text source.

    Attributes:
        rows: number of rows; max_class_id: the largest region class id (-1 without regions);
        num_image_ids: distinct image_ids; first_image_id: one of them (for messages); cached: whether the row
        validation came from the cache.
    """

    rows: int
    max_class_id: int
    num_image_ids: int
    first_image_id: str
    cached: bool = False


def validation_cache_dir() -> Path:
    """The folder of the cached validation results: `$IMAGEBERT_VALIDATION_CACHE`, else a folder in the datasets
    cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "modeling_imagebert_validated"


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 (hex) of a file's bytes, streamed (`hashlib.file_digest`, OpenSSL: hardware SHA where the CPU
    has it, twice BLAKE2b's speed on the test machine)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def remembered_file_digest(path: str | os.PathLike) -> str:
    """`file_digest(path)`, read from the digest memo when the file's identity (path, device, inode, size,
    modification and change times) is the one it was hashed under, else computed and remembered (see the module
    docstring)."""
    info = os.stat(path)
    identity = [
        os.path.abspath(path),
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,
    ]
    memo = (
        validation_cache_dir()
        / "digests"
        / (hashlib.sha256(json.dumps(identity).encode()).hexdigest() + ".json")
    )
    try:
        record = json.loads(memo.read_text())
        if record["identity"] == identity:
            return str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        pass  # not hashed under this identity yet
    started = time.time_ns()
    digest = file_digest(path)
    if started - max(info.st_mtime_ns, info.st_ctime_ns) > RACY_SECONDS * 1e9:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps({"identity": identity, "sha256": digest}) + "\n")
        except OSError:
            pass  # a read-only cache only costs the next run the hashing
    return digest


def dataset_cache_key(dataset: Any) -> str | None:
    """A key for the validation result of a saved (memory-mapped) `datasets.Dataset`: its `_fingerprint`, its row
    count and the SHA-256 of the bytes of each Arrow file in the dataset's order, so any change to the data (even in
    place, with the size and modification time kept) gives a new key. None for an in-memory dataset (nothing on
    disk to recognise it by)."""
    files = [entry["filename"] for entry in getattr(dataset, "cache_files", None) or []]
    if not files:
        return None
    digests = [remembered_file_digest(name) for name in files]
    identity = [VALIDATION_VERSION, dataset._fingerprint, len(dataset), digests]
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]


def _read_cached(key: str | None) -> SourceSummary | None:
    if key is None:
        return None
    path = validation_cache_dir() / f"{key}.json"
    try:
        record = json.loads(path.read_text())
        return SourceSummary(**{**record["summary"], "cached": True})
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None  # absent or unreadable: validate again


def _write_cached(key: str | None, summary: SourceSummary, source: str) -> None:
    if key is None:
        return
    folder = validation_cache_dir()
    record = {"version": VALIDATION_VERSION, "source": source, "validated_at": time.time()}
    record["summary"] = {k: v for k, v in asdict(summary).items() if k != "cached"}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / f"{key}.json", json.dumps(record, indent=1) + "\n")
    except OSError:
        pass  # a read-only cache only costs the next run a re-validation


def _columns(dataset: Any, names: list[str]):
    """The `names` columns of `dataset` (its selected rows) as one pyarrow Table, read without Python rows."""
    return dataset.select_columns(names).with_format("arrow")[:]


def summarize_image_text(dataset: Any) -> SourceSummary:
    """Row count, largest class id, distinct image_ids of an image-text `datasets.Dataset`, computed with pyarrow
    over whole columns."""
    import pyarrow.compute as pc

    table = _columns(dataset, ["image_id", "region_classes"])
    largest = pc.max(pc.list_flatten(table.column("region_classes"))).as_py()
    image_ids = table.column("image_id")
    return SourceSummary(
        rows=table.num_rows,
        max_class_id=-1 if largest is None else int(largest),
        num_image_ids=int(pc.count_distinct(image_ids).as_py()),
        first_image_id=str(image_ids[0].as_py()) if table.num_rows else "",
    )


def first_class_beyond(dataset: Any, num_classes: int) -> tuple[int, str, int, int]:
    """The first region class id >= `num_classes` of an image-text dataset, as (row, image_id, region, id)."""
    import pyarrow.compute as pc

    table = _columns(dataset, ["image_id", "region_classes"])
    classes = table.column("region_classes").combine_chunks()
    flat_bad = pc.greater_equal(pc.list_flatten(classes), num_classes)
    position = pc.index(flat_bad, True).as_py()
    row = pc.list_parent_indices(classes)[position].as_py()
    ids = classes[row].as_py()
    region = next(k for k, value in enumerate(ids) if value >= num_classes)
    return row, str(table.column("image_id")[row].as_py()), region, int(ids[region])


def check_feature_dim(features: Any, config: Any, where: str) -> None:
    """Raises RecipeError naming `where` when the `region_features` column of `features` (a `datasets.Features`)
    is not `config.visual_feature_dim` wide. A dataset without that column passes."""
    region_type = features.get("region_features")
    shape = getattr(region_type, "shape", None)
    dim = shape[1] if shape is not None and len(shape) == 2 else None
    if dim is not None and dim != config.visual_feature_dim:
        raise RecipeError(
            f"{where}: region features have dimension {dim}, the model expects "
            f"visual_feature_dim={config.visual_feature_dim} ; set model.overrides.visual_feature_dim or use "
            f"features of that dimension"
        )


def _one_line(message: str) -> str:
    """`validate_dataset`'s "N of M records are invalid (...):" header and its listed record, as one line that
    starts with the record: `record 5 (image_id=...), field ...: found ...; expected ... (N of M records are
    invalid)`."""
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and " records are invalid" in lines[0]:
        return f"{'; '.join(lines[1:])} ({lines[0].split(' (')[0]})"
    return "; ".join(lines)


def _source_name(spec: Any) -> str:
    return str(spec.path) if spec.path is not None else "toy_world"


def check_source(
    dataset: Any,
    spec: Any,
    where: str,
    config: Any,
    *,
    itm_weight: float = 0.0,
    show_progress: bool = True,
    log: Callable[[str], Any] = print,
) -> SourceSummary | None:
    """Checks one loaded source of a stage (see the module docstring). Returns its summary (None for a text-only
    source).

    Args:
        dataset: the raw `datasets.Dataset` (`load_source`); spec: its `DatasetSpec`; where: `stages[i].datasets[j]`.
        config: the model's `ImageBertConfig` (visual_feature_dim, num_object_classes).
        itm_weight: the stage's ITM loss weight (> 0: the source must allow negatives).
        show_progress, log: the validation's progress bar, and where the one-line status goes.

    Raises:
        RecipeError: the feature dimension differs from the model's, or a text source lacks its text column.
        DataValidationError: a bad row (named with its field), a class id beyond the model, no ITM negatives.
    """
    source = f"{where} ({_source_name(spec)})"
    columns = dataset.column_names
    if spec.modality == "text":
        if "caption" not in columns and "text" not in columns:
            raise RecipeError(f"{source}: a text-only source needs a caption or text column, got {columns}")
        return None
    check_feature_dim(dataset.features, config, source)
    key = dataset_cache_key(dataset)
    summary = _read_cached(key)
    if summary is None:
        log(f"validating {source}: {len(dataset)} rows")
        try:
            validate_dataset(dataset, max_errors=1, show_progress=show_progress)
        except DataValidationError as error:
            raise DataValidationError(f"{source}: {_one_line(str(error))}") from None
        summary = summarize_image_text(dataset)
        _write_cached(key, summary, _source_name(spec))
    else:
        log(f"{source}: {summary.rows} rows, validated before (cache {validation_cache_dir()})")
    num_classes = int(config.num_object_classes)
    if summary.max_class_id >= num_classes:
        row, image_id, region, value = first_class_beyond(dataset, num_classes)
        raise DataValidationError(
            f"{source}: record {row} (image_id={image_id!r}), field 'region_classes': found class id {value} in "
            f"region {region}; the model has num_object_classes={num_classes} (ids in [0, {num_classes})) ; set "
            f"model.overrides.num_object_classes to at least {summary.max_class_id + 1} (the largest id + 1) or "
            f"use features of the model's detector"
        )
    if itm_weight > 0 and summary.num_image_ids < 2:
        raise DataValidationError(
            f"{source}: every one of its {summary.rows} rows has image_id {summary.first_image_id!r}, so ITM "
            f"(tasks.itm={itm_weight:g}) can draw no negative pair (a partner needs another image_id) ; give "
            f"each image its own image_id, add images, or set the stage's tasks.itm to 0"
        )
    return summary


def check_stage_data(
    recipe: Recipe,
    processor: Any,
    config: Any,
    *,
    first_stage: int = 0,
    base: str | Path | None = None,
    show_progress: bool = True,
    log: Callable[[str], Any] = print,
) -> dict[str, SourceSummary | None]:
    """Checks the data of stages `first_stage`.. (0-based) of `recipe`, and its evaluation split, against the
    schema and the model, before any stage trains (see the module docstring).

    Args:
        recipe: the run's `Recipe`; processor: its `ImageBertProcessor`; config: the model's `ImageBertConfig`.
        first_stage: the first stage this run trains (> 0 when resuming after finished stages).
        base: the folder relative dataset paths are read from (default: the current folder).
        show_progress: progress bars of the row validation; log: where one status line per source goes.

    Returns:
        `{"stages[i].datasets[j]" or "evaluation.dataset": SourceSummary or None (text-only)}`.

    Raises:
        RecipeError, DataValidationError: naming the stage, dataset, row and field (see `check_source`).
    """
    vocabulary = len(processor.tokenizer)
    if vocabulary > config.vocab_size:
        raise RecipeError(
            f"model: the tokenizer has {vocabulary} tokens but the model's vocab_size is {config.vocab_size}: token "
            f"ids would fall outside the word embeddings ; use the tokenizer of the model's checkpoint "
            f"(model.tokenizer) or set model.overrides.vocab_size"
        )
    sources = [
        (f"stages[{i}].datasets[{j}]", spec, float(recipe.stages[i].tasks.get("itm", 0.0)))
        for i in range(first_stage, len(recipe.stages))
        for j, spec in enumerate(recipe.stages[i].datasets)
    ]
    if recipe.evaluation is not None and recipe.evaluation.dataset is not None:
        # Read only after training, so checked now too: a bad test split must not cost a finished run its results.
        sources.append(("evaluation.dataset", recipe.evaluation.dataset, 0.0))
    summaries: dict[str, SourceSummary | None] = {}
    for where, spec, itm_weight in sources:
        try:
            dataset = load_source(spec, base)
        except (RecipeError, DataValidationError, FileNotFoundError) as error:
            raise type(error)(f"{where}: {error}") from None
        summaries[where] = check_source(
            dataset, spec, where, config, itm_weight=itm_weight, show_progress=show_progress, log=log
        )
    return summaries


__all__ = [
    "CACHE_ENV",
    "RACY_SECONDS",
    "SourceSummary",
    "check_feature_dim",
    "check_source",
    "check_stage_data",
    "dataset_cache_key",
    "file_digest",
    "first_class_beyond",
    "remembered_file_digest",
    "summarize_image_text",
    "validation_cache_dir",
]
