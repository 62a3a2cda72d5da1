"""Scoring (caption, image) pairs with the cross-encoder: one batched loop and one sharded, resumable driver.

Full ranking (`retrieval.evaluation`) scores every pair of a split; two-stage retrieval (`retrieval.two_stage`)
and `ImageBertRetriever` score candidate pairs only. All of them go through `score_pair_batches`: a batch of pairs
is built by indexing the split's text and image tensors (encoded once, kept on the device), trimmed to its longest
caption and most regions, and scored under `torch.inference_mode()` (optionally bf16 autocast). The callers differ
only in which pairs they visit and in what order (the order decides how little padding a batch carries).

Both evaluations go through `score_in_shards`: the pairs are cut into shards, shard s belongs to process
s % num_processes, each finished shard is written atomically to a `ShardCache` (so an interrupted run resumes with
the shards it lacks), a non-finite score stops the run, and the processes' parts are summed so that every process
ends with all the scores.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import numbers
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes, remove_stale_temporaries_in
from ..safe_loading import load_torch_file

# Aim for shards of about this many pairs when a shard size is not given (a few seconds of GPU work each).
PAIRS_PER_SHARD = 1 << 16
_CACHE_PREFIX = "scores-"


# ----------------------------------------------------------------------------------------------------------------------
# Batches of pairs
# ----------------------------------------------------------------------------------------------------------------------


def pair_batch(
    text: Mapping[str, torch.Tensor],
    images: Mapping[str, torch.Tensor],
    caption_index: torch.Tensor,
    image_index: torch.Tensor,
    compute_dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Model inputs for the pairs (caption_index[k], image_index[k]), trimmed to the batch's longest caption and
    most regions (text and regions are left-aligned, so trimming drops padding only)."""
    attention_mask = text["attention_mask"].index_select(0, caption_index)  # (b, T)
    region_mask = images["region_attention_mask"].index_select(0, image_index)  # (b, R)
    width = int(attention_mask.sum(1).max())
    regions = int(region_mask.sum(1).max()) if region_mask.shape[1] else 0
    input_ids = text["input_ids"].index_select(0, caption_index)[:, :width]  # (b, T')
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask[:, :width],
        "token_type_ids": torch.zeros_like(input_ids),
        # (b, R', F): float16 storage cast to the compute dtype only for the rows this batch needs
        "region_features": images["region_features"][:, :regions]
        .index_select(0, image_index)
        .to(compute_dtype),
        "region_locations": images["region_locations"][:, :regions].index_select(0, image_index),
        "region_attention_mask": region_mask[:, :regions],
    }
    if "global_image_features" in images:
        batch["global_image_features"] = (
            images["global_image_features"].index_select(0, image_index).to(compute_dtype)
        )
    return batch


def split_to_device(
    text: Mapping[str, torch.Tensor], images: Mapping[str, torch.Tensor], device: torch.device
) -> tuple[dict, dict]:
    """The split's text and image tensors on `device` (moved once, then indexed by every batch)."""
    return (
        {name: tensor.to(device) for name, tensor in text.items()},
        {name: tensor.to(device) for name, tensor in images.items()},
    )


def check_count(name: str, value: Any, unit: str = "") -> int:
    """`value` when it is an int >= 1 (numpy ints too); otherwise a ValueError in one line naming `name` (a bool, a
    float, a string, 0 or a negative number would fail deep in a loop, or silently drop results, further on).
    `unit` says what is counted ("pairs", "caption rows"), for the message."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        counted = f" ({unit})" if unit else ""
        raise ValueError(f"{name} must be an int >= 1{counted}, got {value!r}")
    return int(value)


def scoring_setup(
    model: torch.nn.Module,
    text: Mapping[str, torch.Tensor],
    images: Mapping[str, torch.Tensor],
    batch_size: int,
    device: torch.device | str | None,
    device_tensors: tuple[dict, dict] | None,
) -> tuple[torch.device, dict, dict, torch.dtype]:
    """What every pair scorer needs first: the batch size checked, the device (default: the model's), the split's
    text and image tensors on it (moved once, unless given), and the model's dtype for the region features."""
    check_count("batch_size", batch_size, "pairs per forward pass")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    text, images = device_tensors if device_tensors is not None else split_to_device(text, images, device)
    return device, text, images, next(model.parameters()).dtype


def score_pair_batches(
    model: torch.nn.Module,
    text: Mapping[str, torch.Tensor],
    images: Mapping[str, torch.Tensor],
    num_pairs: int,
    pairs_at: Callable[[int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    *,
    batch_size: int,
    bf16: bool,
    device: torch.device,
    compute_dtype: torch.dtype,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The cross-encoder's scores of `num_pairs` pairs, `batch_size` pairs per forward pass.

    Args:
        model: anything with `score(**inputs) -> [B]`, in eval mode.
        text, images: the split's tensors on `device` (see `scoring_setup`).
        num_pairs: N, the pairs visited.
        pairs_at: (start, stop) -> (caption_index, image_index, slots), each LongTensor [stop - start] on `device`:
            the pairs visited at positions [start, stop) and where their scores go in the output. The visiting
            order is the caller's: it decides which pairs share a batch, hence its padding.
        bf16: bfloat16 autocast.
        compute_dtype: the model's dtype (region features are cast to it per batch).
        on_batch: called with the number of pairs after each forward pass (progress).

    Returns:
        float32 [N] on the CPU, the score of each pair at its slot.
    """
    out = torch.empty(num_pairs, dtype=torch.float32, device=device)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, num_pairs, batch_size):
            caption_index, image_index, slots = pairs_at(start, min(start + batch_size, num_pairs))
            batch = pair_batch(text, images, caption_index, image_index, compute_dtype)
            out[slots] = model.score(**batch).float().view(-1)
            if on_batch is not None:
                on_batch(int(slots.shape[0]))
    return out.cpu()


# ----------------------------------------------------------------------------------------------------------------------
# Shard cache
# ----------------------------------------------------------------------------------------------------------------------


class ShardCache:
    """One folder per (model, data, settings) key under cache_dir; one `.pt` file per shard of scores."""

    def __init__(self, cache_dir: str | os.PathLike, meta: dict[str, Any], is_main_process: bool):
        self.root = Path(cache_dir)
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        self.folder = self.root / f"{_CACHE_PREFIX}{key[:24]}"
        self.meta = meta
        if is_main_process:
            self._warn_about_stale(meta)
        self.folder.mkdir(parents=True, exist_ok=True)
        # A run killed while writing a shard leaves its temporary file; processes of this host that still run
        # keep theirs (see modeling_imagebert.atomic).
        for stale in remove_stale_temporaries_in(self.folder):
            warnings.warn(f"removed {stale}, left by an interrupted evaluation", stacklevel=3)
        atomic_write_bytes(self.folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    def _warn_about_stale(self, meta: dict[str, Any]) -> None:
        if not self.root.is_dir():
            return
        for other in sorted(self.root.glob(f"{_CACHE_PREFIX}*")):
            if other == self.folder or not (other / "meta.json").is_file():
                continue
            try:
                old = json.loads((other / "meta.json").read_text())
            except (OSError, ValueError):
                continue
            differs = [name for name in sorted(set(meta) | set(old)) if meta.get(name) != old.get(name)]
            if not differs:
                continue
            reasons = {
                "model": "different model weights, config or class",
                "data": "a different test split or processor settings",
            }
            why = "; ".join(reasons.get(name, f"a different {name}") for name in differs)
            warnings.warn(
                f"ignoring cached scores in {other}: they were computed with {why} "
                f"(differing fields: {differs}); scores are recomputed into {self.folder}",
                stacklevel=4,
            )

    def path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.pt"

    def manifest_path(self, shard: int) -> Path:
        """The shard's manifest entry: {"file", "size", "sha256", "rows"}, written after the shard itself. One
        small file per shard (not one shared manifest) so processes saving their own shards never race."""
        return self.folder / f"shard-{shard:06d}.json"

    def load(self, shard: int, rows: tuple[int, int], width: int) -> torch.Tensor | None:
        """The cached scores [rows[1] - rows[0], width] of `shard`, or None (after a warning naming the file) when
        it is absent, has no manifest entry, differs from it in size or sha256, holds other rows, or holds
        non-finite scores."""
        path = self.path(shard)
        if not path.is_file():
            return None
        try:
            data = path.read_bytes()
            try:
                entry = json.loads(self.manifest_path(shard).read_text())
            except (OSError, ValueError):
                raise ValueError(f"no readable manifest entry {self.manifest_path(shard).name}") from None
            if entry.get("size") != len(data):
                raise ValueError(f"size {len(data)} bytes differs from the manifest's {entry.get('size')}")
            digest = hashlib.sha256(data).hexdigest()
            if entry.get("sha256") != digest:
                raise ValueError(
                    f"sha256 {digest[:12]}... differs from the manifest's {str(entry.get('sha256'))[:12]}..."
                )
            payload = load_torch_file(io.BytesIO(data), "a cached score shard", name=path)
            scores = payload["scores"]
            if tuple(payload["rows"]) != rows or tuple(scores.shape) != (rows[1] - rows[0], width):
                raise ValueError(f"holds rows {tuple(payload['rows'])} of shape {tuple(scores.shape)}")
            if not torch.isfinite(scores).all():
                raise ValueError("holds non-finite scores")
        except Exception as error:  # a damaged file is recomputed, never trusted
            # stacklevel 4: past score_in_shards and the evaluation, to the code that asked for it
            warnings.warn(f"ignoring cached shard {path} ({error}); recomputing it", stacklevel=4)
            return None
        return scores

    def save(self, shard: int, rows: tuple[int, int], scores: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save({"rows": list(rows), "scores": scores.contiguous()}, buffer)
        data = buffer.getvalue()
        atomic_write_bytes(self.path(shard), data)
        entry = {
            "file": self.path(shard).name,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "rows": list(rows),
        }
        atomic_write_bytes(self.manifest_path(shard), json.dumps(entry, indent=2).encode())


# ----------------------------------------------------------------------------------------------------------------------
# Shards across processes
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ShardedScores:
    """Result of `score_in_shards`.

    Attributes:
        scores: float32 [num_rows, width], every shard's scores (on every process).
        computed_shards: shards this process scored in this call (the rest came from the cache or other processes).
        num_shards: shards in all.
        seconds: wall time of this process's scoring; pairs: the pairs it scored.
    """

    scores: torch.Tensor
    computed_shards: list[int] = field(default_factory=list)
    num_shards: int = 0
    seconds: float = 0.0
    pairs: int = 0


def score_in_shards(
    score_rows: Callable[[int, int, tuple[dict, dict], Callable[[int], None] | None], torch.Tensor],
    text: Mapping[str, torch.Tensor],
    images: Mapping[str, torch.Tensor],
    *,
    num_rows: int,
    width: int,
    shard_size: int,
    rank: int,
    world: int,
    is_main: bool,
    device: torch.device,
    cache: ShardCache | None,
    progress: bool,
    description: str,
    describe_pair: Callable[[int, int], str],
    shard_callback: Callable[[int], None] | None = None,
) -> ShardedScores:
    """Scores rows [0, num_rows) of a [num_rows, width] table of pairs in shards of `shard_size` rows.

    Shard s belongs to process s % world; a shard found in `cache` is read, the others are scored and then cached.

    Args:
        score_rows: (start, end, device_tensors, on_batch) -> float32 [end - start, width] on the CPU, the scores
            of rows [start, end); device_tensors are the split's (text, images) on `device`, moved once.
        text, images: the split's tensors (any device).
        width: pairs per row (the images of a caption row in full ranking; 1 for a list of pairs).
        rank, world, is_main, device: this process (index, number of processes, main or not, its device).
        cache: where finished shards are kept (None: no cache).
        progress: a tqdm bar over the pairs (main process only), labelled `description`.
        describe_pair: (row, column) -> "caption row c against image 'id'", for the error on a non-finite score.
        shard_callback: called with the shard index after each shard this process scores (and caches).

    Returns:
        `ShardedScores`; with several processes the scores are summed across them (each entry was filled by
        exactly one process, zeros elsewhere, so the sum gathers it exactly).
    """
    num_shards = math.ceil(num_rows / shard_size)
    shard_rows = [(s * shard_size, min((s + 1) * shard_size, num_rows)) for s in range(num_shards)]
    scores = torch.zeros(num_rows, width, dtype=torch.float32)
    todo = []
    for shard in range(rank, num_shards, world):  # shard s belongs to process s % world
        start, end = shard_rows[shard]
        cached = cache.load(shard, (start, end), width) if cache is not None else None
        if cached is None:
            todo.append(shard)
        else:
            scores[start:end] = cached

    bar = None
    pairs = sum((shard_rows[s][1] - shard_rows[s][0]) * width for s in todo)
    if progress and is_main and pairs:
        from tqdm.auto import tqdm

        bar = tqdm(total=pairs, unit="pair", unit_scale=True, desc=description, dynamic_ncols=True)
    began = time.perf_counter()
    try:
        device_tensors = split_to_device(text, images, device)
        for shard in todo:
            start, end = shard_rows[shard]
            block = score_rows(start, end, device_tensors, bar.update if bar is not None else None)
            if not torch.isfinite(block).all():
                row, column = (int(v) for v in (~torch.isfinite(block)).nonzero()[0])
                raise FloatingPointError(
                    f"the model scored {describe_pair(start + row, column)} as {block[row, column].item()}; "
                    "refusing to rank non-finite scores"
                )
            scores[start:end] = block
            if cache is not None:
                cache.save(shard, (start, end), block)
            if shard_callback is not None:
                shard_callback(shard)
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - began

    if world > 1:
        from accelerate.utils import reduce

        scores = reduce(scores.to(device), reduction="sum").cpu()
    return ShardedScores(
        scores=scores, computed_shards=todo, num_shards=num_shards, seconds=seconds, pairs=pairs
    )


__all__ = [
    "PAIRS_PER_SHARD",
    "ShardCache",
    "ShardedScores",
    "check_count",
    "pair_batch",
    "score_in_shards",
    "score_pair_batches",
    "scoring_setup",
    "split_to_device",
]
