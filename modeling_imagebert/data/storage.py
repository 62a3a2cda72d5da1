"""Saving and loading image-text datasets: sharded Arrow on disk, memory-mapped or streamed.

`save_dataset` writes atomically (a temporary sibling folder renamed into place), `load_dataset_from_disk`
memory-maps the Arrow shards so region features are paged in on demand, and `load_streaming_dataset` streams
them, one disjoint part per process.

Streaming under Accelerate (checked against accelerate 1.15, `accelerate/data_loader.py::prepare_data_loader`):
`accelerator.prepare(DataLoader(iterable_dataset))` ALWAYS splits an iterable dataset itself when there is more
than one process:

- `dispatch_batches=None` (the default) becomes True for an `IterableDataset`: only the main process iterates the
  loader and slices each batch across the processes (`DataLoaderDispatcher`);
- `dispatch_batches=False`: a `datasets.IterableDataset` with `n_shards >= num_processes` is re-sharded with
  `dataset.shard(num_processes, process_index)`, any other iterable is wrapped in `IterableDatasetShard`.

A dataset that `load_streaming_dataset` already split per process would therefore be split a second time (each
process would see about 1/world_size^2 of the data, or with dispatching only rank 0's part would ever be read).
Two correct ways, never both:

1. ours splits: `load_streaming_dataset(path)` (split per process) and a plain `DataLoader` that is NOT passed to
   `accelerator.prepare`; move batches with `batch.to(accelerator.device)`. `check_not_double_sharded(loader)`
   raises if such a loader went through `prepare` anyway.
2. Accelerate splits: `load_streaming_dataset(path, rank=0, world_size=1)` (no split) and
   `Accelerator(dataloader_config=DataLoaderConfiguration(**dataloader_kwargs_for_accelerate()))`, so each process
   reads its own shards instead of receiving slices from rank 0. Accelerate then hands out whole Arrow shards,
   which can leave processes with unequal row counts (13 rows in 3 shards over 2 processes: 9 and 4); way 1
   balances to within one row.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path

import datasets
import pyarrow as pa
from datasets.distributed import split_dataset_by_node

from ..atomic import atomic_folder, check_removable
from .schema import DataValidationError, validate_dataset, validate_features

_SPLIT_MARK = "modeling_imagebert: streamed part for rank "


def save_dataset(
    dataset: datasets.Dataset,
    path: str | os.PathLike,
    *,
    max_shard_size: str | int | None = "500MB",
    num_shards: int | None = None,
    validate: bool = True,
    feature_dim: int | None = None,
    num_classes: int | None = None,
    overwrite: bool = False,
    written_by: str = "modeling_imagebert.data.storage.save_dataset",
    inputs: tuple[str | os.PathLike, ...] | list = (),
) -> Path:
    """Saves an image-text dataset to `path` as sharded Arrow files (`Dataset.save_to_disk`), atomically.

    The dataset is written to a temporary sibling folder and renamed onto `path` only once complete, so an
    interrupted save leaves neither a half-written `path` nor a temporary folder (on an exception), and an existing
    `path` is replaced only when `overwrite=True`.

    Args:
        dataset: a `datasets.Dataset` with the schema of `schema.image_text_features`.
        path: the target folder.
        max_shard_size: the largest Arrow shard (ignored when `num_shards` is given).
        num_shards: write exactly this many shards.
        validate: check column types and every record first (`schema.validate_dataset`).
        feature_dim: the expected region feature dimension F (read from the column type when None).
        num_classes: when given, detector class ids must lie in [0, num_classes).
        overwrite: replace an existing `path`, only when it is a folder this package wrote (it carries the
            marker of `modeling_imagebert.atomic`) that is not the current folder and holds none of `inputs`.
        written_by: what wrote the dataset, recorded in the folder's ownership marker.
        inputs: the files the dataset was made from; `path` may not be or hold any of them.

    Returns:
        The target path.

    Raises:
        FileExistsError: `path` exists and `overwrite` is False.
        UnsafeRemovalError: `path` exists but is not ours to replace (a FileExistsError).
        DataValidationError: the dataset does not follow the schema.
    """
    target = Path(path).absolute()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
    if target.exists():
        check_removable(target, inputs=inputs)  # refuse before the (long) validation and write
    if num_shards is not None and (
        isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1
    ):
        raise ValueError(f"num_shards must be an int >= 1 or None, got {num_shards!r}")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(f"save_dataset needs a datasets.Dataset, got {type(dataset).__name__}")
    if validate:
        validate_dataset(dataset, feature_dim=feature_dim, num_classes=num_classes)
    else:
        validate_features(dataset.features, feature_dim=feature_dim)

    with atomic_folder(target, overwrite=overwrite, written_by=written_by, inputs=inputs) as temp:
        if num_shards is not None:
            dataset.save_to_disk(str(temp), num_shards=num_shards)
        else:
            dataset.save_to_disk(str(temp), max_shard_size=max_shard_size)
    return target


def _check_saved_dataset_folder(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no dataset at {path}: the path does not exist")
    if not path.is_dir():
        raise NotADirectoryError(
            f"no dataset at {path}: expected a folder written by save_dataset, found a file"
        )
    if (path / "dataset_dict.json").is_file():
        raise DataValidationError(
            f"{path} holds a DatasetDict (splits {_splits(path)}); expected a single dataset: pass one split folder"
        )
    if not (path / "state.json").is_file() or not (path / "dataset_info.json").is_file():
        raise DataValidationError(
            f"{path} is not a saved dataset: state.json or dataset_info.json is missing "
            "(expected a folder written by save_dataset / Dataset.save_to_disk)"
        )


def _splits(path: Path) -> list[str]:
    try:
        return json.loads((path / "dataset_dict.json").read_text())["splits"]
    except (OSError, ValueError, KeyError):
        return []


def load_dataset_from_disk(path: str | os.PathLike, *, feature_dim: int | None = None) -> datasets.Dataset:
    """Loads a dataset written by `save_dataset`, memory-mapped: rows are read from the Arrow files on demand, so
    opening a large dataset costs almost no RAM.

    Args:
        path: the folder given to `save_dataset`.
        feature_dim: the expected region feature dimension F (any when None).

    Returns:
        A `datasets.Dataset` with the image-text schema. Read features with `with_format("numpy", dtype=None)`
        to keep float16.

    Raises:
        FileNotFoundError: `path` does not exist.
        DataValidationError: `path` is not a saved dataset, or its columns do not match the schema (the message
            names each missing or wrongly typed column).
    """
    folder = Path(path).absolute()
    _check_saved_dataset_folder(folder)
    try:
        dataset = datasets.load_from_disk(str(folder))
    except (pa.ArrowException, OSError, ValueError, KeyError) as error:
        # A truncated or corrupt shard, or damaged metadata: name the folder instead of Arrow's internals.
        message = " ".join(str(error).split())
        raise DataValidationError(
            f"dataset at {folder}: cannot be read ({type(error).__name__}: {message}) ; a data-*.arrow shard or "
            "state.json is truncated or corrupt: write the dataset again"
        ) from None
    try:
        validate_features(dataset.features, feature_dim=feature_dim)
    except DataValidationError as error:
        raise DataValidationError(f"dataset at {folder}: {error}") from None
    return dataset


def _current_process() -> tuple[int, int]:
    """(rank, world_size) from an initialised `accelerate.PartialState`, else (0, 1)."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return 0, 1
    if not PartialState._shared_state:  # not initialised: do not initialise it as a side effect
        return 0, 1
    state = PartialState()
    return state.process_index, state.num_processes


def load_streaming_dataset(
    path: str | os.PathLike,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int | None = None,
    seed: int = 0,
    format: str | None = "numpy",
) -> datasets.IterableDataset:
    """Streams a dataset written by `save_dataset`, this process's part only.

    The memory-mapped dataset is split with `datasets.distributed.split_dataset_by_node` into one contiguous
    chunk per process (sizes differ by at most one row), then streamed in as many shards as there are Arrow
    files. The parts of all processes are disjoint and cover every row exactly once. Splitting happens before
    the stream is made and shuffled, so disjointness holds whatever seeds the processes use. Do not hand a
    DataLoader over the result to `accelerator.prepare`: it would be split a second time (see the module
    docstring; `check_not_double_sharded` detects it).

    Args:
        path: the folder given to `save_dataset`.
        rank, world_size: this process and the number of processes. When both are None they are read from an
            initialised `accelerate.PartialState`; with none initialised nothing is split. `rank=0, world_size=1`
            turns splitting off.
        shuffle_buffer: when given, shuffle this process's shard order and rows within a buffer of this size
            (call `set_epoch(epoch)` on the result for a new order each epoch).
        seed: the shuffle seed.
        format: "numpy" (default; note that datasets' iterable formatter upcasts the stored float16 features to
            float32, which is exact: `.astype(np.float16)` recovers them bit for bit), "torch", or None for
            Python objects.

    Returns:
        A `datasets.IterableDataset` of image-text rows.
    """
    if (rank is None) != (world_size is None):
        raise ValueError(
            f"pass both rank and world_size or neither; got rank={rank}, world_size={world_size}"
        )
    if rank is None:
        rank, world_size = _current_process()
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"expected 0 <= rank < world_size and world_size >= 1; got rank={rank}, world_size={world_size}"
        )

    dataset = load_dataset_from_disk(path)
    if len(dataset) < world_size:
        raise ValueError(
            f"dataset at {path} has {len(dataset)} rows, fewer than world_size={world_size}: every process needs at "
            "least one row"
        )
    if world_size > 1:
        # Split the map-style dataset (a contiguous, balanced chunk per process) BEFORE making it iterable: an
        # iterable dataset split by node assigns shards after shuffling them, so ranks shuffled with different
        # seeds would overlap. This way the parts are disjoint whatever the seeds.
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    num_files = len(glob.glob(str(Path(path) / "data-*.arrow")))
    num_shards = max(1, min(num_files, len(dataset)))
    stream = dataset.to_iterable_dataset(num_shards=num_shards)
    if shuffle_buffer is not None:
        stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer)
    if format is not None:
        stream = stream.with_format(format)
    if world_size > 1:
        # A mark that survives shuffle / with_format / shard, read by check_not_double_sharded.
        stream.info.description = (
            f"{stream.info.description or ''}\n{_SPLIT_MARK}{rank} of {world_size}".strip()
        )
    return stream


def dataloader_kwargs_for_accelerate() -> dict:
    """Keyword arguments of `accelerate.DataLoaderConfiguration` for letting Accelerate split an UNSPLIT stream
    (`load_streaming_dataset(path, rank=0, world_size=1)`): every process reads its own shards
    (`dispatch_batches=False`) and batches are not cut (`split_batches=False`). Do not use it with a stream that
    `load_streaming_dataset` already split per process: that one must not go through `accelerator.prepare`."""
    return {"dispatch_batches": False, "split_batches": False}


def check_not_double_sharded(dataloader, *, num_processes: int | None = None) -> None:
    """Raises ValueError if `dataloader` was prepared by Accelerate for several processes although its dataset
    was already split per process (by `load_streaming_dataset` / `split_dataset_by_node`): each process would
    then see only part of its share (or, with dispatched batches, only rank 0's share would ever be read).

    Args:
        dataloader: any `torch.utils.data.DataLoader`, prepared or not.
        num_processes: the number of processes Accelerate prepared it for; read from an initialised
            `accelerate.PartialState` when None.
    """
    from accelerate.data_loader import DataLoaderDispatcher, DataLoaderShard, IterableDatasetShard

    prepared = getattr(dataloader, "_is_accelerate_prepared", False) or isinstance(
        dataloader, (DataLoaderShard, DataLoaderDispatcher)
    )
    if not prepared:
        return
    if num_processes is None:
        num_processes = _current_process()[1]
    dataset = getattr(dataloader, "dataset", None)
    if isinstance(dataset, IterableDatasetShard):
        num_processes = max(num_processes, dataset.num_processes)
        dataset = dataset.dataset
    info = getattr(dataset, "info", None)
    mark = re.search(re.escape(_SPLIT_MARK) + r"(\d+) of (\d+)", (getattr(info, "description", None) or ""))
    split_rank, split_world_size = (int(mark.group(1)), int(mark.group(2))) if mark else (0, 1)
    if num_processes > 1 and split_world_size > 1:
        raise ValueError(
            f"this DataLoader streams a dataset already split per process (rank {split_rank} of "
            f"{split_world_size}) and was also prepared by Accelerate for {num_processes} processes, which "
            "splits it again: each process would miss data. Either do not pass it to accelerator.prepare (move "
            "batches to accelerator.device yourself), or load it unsplit with load_streaming_dataset(path, "
            "rank=0, world_size=1) and DataLoaderConfiguration(**dataloader_kwargs_for_accelerate())."
        )
