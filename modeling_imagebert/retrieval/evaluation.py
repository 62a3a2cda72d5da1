"""Full-ranking image-text retrieval evaluation: score every (caption, image) pair of a test split, then rank.

ImageBERT is a cross-encoder: a pair's score needs one forward pass over the joint text + region sequence, so a
test split of C captions and I images costs C x I passes (25,000 x 5,000 for MSCOCO 5k). This module makes that
affordable and safe:

* every image's regions are encoded and padded ONCE into tensors kept on the device, every caption is tokenised
  ONCE; a batch of pairs is built by indexing those tensors (no re-encoding per pair), trimmed to the longest
  caption and the most regions it holds, and scored under `torch.inference_mode()` (optionally bf16 autocast);
* the score matrix is computed in shards of caption rows. Under `accelerate launch` the shards are split across
  processes and the matrix is summed across them (each entry is computed by exactly one process), so every
  process ends with the full matrix;
* with a `cache_dir`, each finished shard is written atomically (temp file, then `os.replace`) into a folder
  keyed by a fingerprint of the model (class, config, weights), of the encoded inputs (image ids, token ids,
  region tensors) and of the scoring settings. An interrupted run resumes with the shards it lacks; a cache made
  by other weights or data lives under another key and is never reused (a warning says which cache was ignored
  and why);
* a tqdm bar shows pairs/s and the ETA.

Ranking and the tie rule live in `modeling_imagebert.retrieval.metrics`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_bytes, remove_stale_temporaries_in
from . import metrics as retrieval_metrics

# Protocol name -> (function, label used in the paper-style table).
PROTOCOLS: dict[str | None, tuple[Callable[..., dict[str, float]] | None, str]] = {
    None: (None, "Test split"),
    "flickr30k_1k": (retrieval_metrics.flickr30k_1k, "Flickr30k 1k"),
    "coco_1k": (retrieval_metrics.coco_1k, "MSCOCO 1k"),
    "coco_5k": (retrieval_metrics.coco_5k, "MSCOCO 5k"),
}

# Aim for shards of about this many pairs when `shard_size` is not given (a few seconds of GPU work each).
_PAIRS_PER_SHARD = 1 << 16
_CACHE_FORMAT = 1
_CACHE_PREFIX = "scores-"


# ----------------------------------------------------------------------------------------------------------------------
# Inputs: unique images and captions, encoded once
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RetrievalInputs:
    """A test split encoded once for full ranking.

    Attributes:
        image_ids: the I unique image ids, in order of first occurrence in the split (the score matrix's columns).
        caption_image_index: LongTensor [C], column of each caption's image; captions are the split's rows, in order.
        text: input_ids, attention_mask [C, T] long (T = longest caption).
        images: region_features [I, R, F] (float16 when the data is float16), region_locations [I, R, 5] float32,
            region_attention_mask [I, R] long (R = most regions of any image); global_image_features [I, G] when
            the model uses a global image token.
        caption_rows: LongTensor [C], the dataset row of each caption (identity unless a subset was taken).
    """

    image_ids: list[str]
    caption_image_index: torch.Tensor
    text: dict[str, torch.Tensor]
    images: dict[str, torch.Tensor]
    caption_rows: torch.Tensor | None = None

    @property
    def num_captions(self) -> int:
        return int(self.text["input_ids"].shape[0])

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def fingerprint(self) -> str:
        """sha256 (hex) of everything that decides the scores on the data side: image ids, caption -> image map,
        token ids and masks, region tensors. Two encodings with equal fingerprints give equal score matrices."""
        digest = hashlib.sha256()
        digest.update(json.dumps(self.image_ids).encode())
        _hash_tensor(digest, self.caption_image_index)
        for group in (self.text, self.images):
            for name in sorted(group):
                digest.update(name.encode())
                _hash_tensor(digest, group[name])
        return digest.hexdigest()


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    if tensor.numel():
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (hex) of the model class, its config and every parameter and buffer (names, dtypes, values)."""
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        _hash_tensor(digest, tensor)
    return digest.hexdigest()


def _column(dataset, name: str) -> list:
    if hasattr(dataset, "column_names"):
        if name not in dataset.column_names:
            raise ValueError(
                f"the retrieval test split has no {name!r} column (columns: {dataset.column_names}); expected the "
                "schema of modeling_imagebert.data.schema"
            )
        return list(dataset.with_format(None)[name])
    values = []
    for row_index, row in enumerate(dataset):
        if name not in row:
            raise ValueError(f"{name} of record {row_index}: missing (see modeling_imagebert.data.schema)")
        values.append(row[name])
    return values


def encode_retrieval_split(dataset, processor, *, use_global_image_feature: bool = False) -> RetrievalInputs:
    """Encode a test split once: the unique images (first occurrence order) and all captions.

    Args:
        dataset: a `datasets.Dataset` in the schema of `modeling_imagebert.data.schema` (one row per (image,
            caption); rows of one image share image_id and regions, as Karpathy-split data does), or a sequence
            of such rows (dicts).
        processor: an `ImageBertProcessor` (its `encode_record` keeps the top `max_regions` regions and builds the
            5-D locations; `pad` pads; its call tokenises captions with truncation to `max_text_length`).
        use_global_image_feature: also return each image's `global_image_features` (every row needs one).

    Returns:
        `RetrievalInputs` with C = number of rows captions and I = number of distinct image_id values.
    """
    if (
        hasattr(dataset, "keys")
        and hasattr(dataset, "column_names")
        and isinstance(dataset.column_names, dict)
    ):
        raise ValueError(
            f"evaluate_retrieval needs one split (a datasets.Dataset); got a DatasetDict with splits "
            f"{list(dataset.keys())}: pass e.g. dataset['test']"
        )
    if len(dataset) == 0:
        raise ValueError("the retrieval test split is empty")
    image_ids = _column(dataset, "image_id")
    captions = _column(dataset, "caption")
    column: dict[str, int] = {}  # image_id -> column, in order of first occurrence
    image_rows: list[int] = []  # the first row of each image: its regions are encoded from that row
    caption_image_index = np.empty(len(image_ids), dtype=np.int64)
    for row, image_id in enumerate(image_ids):
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"image_id of record {row}: expected a non-empty string, got {image_id!r}")
        if image_id not in column:
            column[image_id] = len(column)
            image_rows.append(row)
        caption_image_index[row] = column[image_id]
    for row, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"caption of record {row} (image_id {image_ids[row]!r}): expected a non-empty string, got {caption!r}"
            )

    text = processor(text=captions)  # input_ids, attention_mask, token_type_ids [C, T]
    text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    if hasattr(dataset, "select"):
        records = dataset.select(image_rows).with_format("numpy", dtype=None)
    else:
        records = [dataset[row] for row in image_rows]
    encoded = []
    for row, record in zip(image_rows, records, strict=True):
        example = processor.encode_record(record, index=row)
        example.pop("input_ids", None)  # captions are tokenised above; only the regions are kept here
        if use_global_image_feature and example.get("global_feature") is None:
            raise ValueError(
                f"global_feature of record {row} (image_id {example['image_id']!r}): missing, but the model uses "
                "a global image token (config.use_global_image_feature)"
            )
        if not use_global_image_feature:
            example.pop("global_feature", None)
        encoded.append(example)
    feature_dtype = (
        torch.float16
        if all(np.asarray(e["region_features"]).dtype == np.float16 for e in encoded)
        else torch.float32
    )
    padded = processor.pad(encoded, feature_dtype=feature_dtype)
    images = {
        name: padded[name]
        for name in ("region_features", "region_locations", "region_attention_mask", "global_image_features")
        if name in padded
    }
    return RetrievalInputs(
        image_ids=list(column),
        caption_image_index=torch.from_numpy(caption_image_index),
        text=text,
        images=images,
        caption_rows=torch.arange(len(image_ids)),
    )


def _check_against_model(inputs: RetrievalInputs, config) -> None:
    if config is None:
        return
    features = inputs.images["region_features"]
    if features.shape[-1] != config.visual_feature_dim:
        raise ValueError(
            f"region_features of the test split have dimension {features.shape[-1]}, but the model's "
            f"config.visual_feature_dim is {config.visual_feature_dim}"
        )
    counts = inputs.images["region_attention_mask"].sum(1)
    if counts.numel() and int(counts.max()) > config.max_regions:
        column = int(counts.argmax())
        raise ValueError(
            f"image {inputs.image_ids[column]!r} keeps {int(counts[column])} regions but the model takes at most "
            f"config.max_regions={config.max_regions}; use a processor with max_regions <= {config.max_regions}"
        )
    width = inputs.text["input_ids"].shape[1]
    if width > config.max_position_embeddings:
        raise ValueError(
            f"captions of up to {width} tokens exceed the model's max_position_embeddings "
            f"({config.max_position_embeddings}); use a processor with a smaller max_text_length"
        )


# ----------------------------------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------------------------------


def _pair_batch(
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


def score_caption_rows(
    model: torch.nn.Module,
    inputs: RetrievalInputs,
    caption_start: int,
    caption_end: int,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
    _device_tensors: tuple[dict, dict] | None = None,
) -> torch.Tensor:
    """Scores of captions [caption_start, caption_end) against every image.

    Args:
        model: anything with `score(**inputs) -> [B]` logits (ImageBertForPreTraining: ITM head, zero-shot;
            ImageBertForRetrieval: the fine-tuned head). Put in eval mode by the caller.
        inputs: the encoded split (`encode_retrieval_split`).
        caption_start, caption_end: the caption rows to score.
        batch_size: pairs per forward pass.
        bf16: run under bfloat16 autocast.
        device: where to run (default: the model's device).
        on_batch: called with the number of pairs after each forward pass (progress).

    Returns:
        float32 tensor [caption_end - caption_start, num_images] on the CPU.
    """
    device, text, images, compute_dtype = _scoring_setup(model, inputs, batch_size, device, _device_tensors)
    num_images = inputs.num_images
    rows = caption_end - caption_start
    total = rows * num_images
    # Visit images in order of region count, so a batch (consecutive images of one caption) holds images of similar
    # sizes and is trimmed to few padded regions; scores are written back to each image's own column.
    image_order = torch.sort(images["region_attention_mask"].sum(1), stable=True).indices  # (I,)
    out = torch.empty(rows, num_images, dtype=torch.float32, device=device)
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, total, batch_size):
            pair = torch.arange(
                start, min(start + batch_size, total), device=device
            )  # flat (caption, image) ids
            row = pair // num_images
            caption_index = caption_start + row
            image_index = image_order[pair % num_images]
            batch = _pair_batch(text, images, caption_index, image_index, compute_dtype)
            out[row, image_index] = model.score(**batch).float().view(-1)
            if on_batch is not None:
                on_batch(int(pair.shape[0]))
    return out.cpu()


def _scoring_setup(
    model: torch.nn.Module, inputs: RetrievalInputs, batch_size: int, device, device_tensors
) -> tuple[torch.device, dict, dict, torch.dtype]:
    """What every pair scorer needs first: the batch size checked, the device (default: the model's), the split's
    text and image tensors on it (moved once, unless given), and the model's dtype for the region features."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of pairs, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    text, images = device_tensors if device_tensors is not None else _to_device(inputs, device)
    return device, text, images, next(model.parameters()).dtype


def _to_device(inputs: RetrievalInputs, device: torch.device) -> tuple[dict, dict]:
    return (
        {name: tensor.to(device) for name, tensor in inputs.text.items()},
        {name: tensor.to(device) for name, tensor in inputs.images.items()},
    )


# ----------------------------------------------------------------------------------------------------------------------
# Shard cache
# ----------------------------------------------------------------------------------------------------------------------


class _ShardCache:
    """One folder per (model, data, settings) key under cache_dir; one `.pt` file per shard of caption rows."""

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

    def load(self, shard: int, rows: tuple[int, int], num_images: int) -> torch.Tensor | None:
        """The cached scores of `shard`, or None (after a warning naming the file) when it is absent, has no
        manifest entry, differs from it in size or sha256, holds other rows, or holds non-finite scores."""
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
            payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            scores = payload["scores"]
            if tuple(payload["rows"]) != rows or tuple(scores.shape) != (rows[1] - rows[0], num_images):
                raise ValueError(f"holds rows {tuple(payload['rows'])} of shape {tuple(scores.shape)}")
            if not torch.isfinite(scores).all():
                raise ValueError("holds non-finite scores")
        except Exception as error:  # a damaged file is recomputed, never trusted
            warnings.warn(f"ignoring cached shard {path} ({error}); recomputing it", stacklevel=3)
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
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class RetrievalEvaluation:
    """Result of `evaluate_retrieval`.

    Attributes:
        metrics: percent; `image_retrieval/R@K`, `text_retrieval/R@K` (K = 1, 5, 10) and `rsum`.
        scores: float32 [num_captions, num_images], score of caption row c (dataset order) against image column i.
        caption_image_index: LongTensor [num_captions], the column of each caption's own image.
        image_ids: the image id of each column.
        table: markdown laid out like Table 2 of the paper.
        protocol: the protocol name (None: the whole split).
        computed_shards: shards this process scored in this call (the rest came from the cache).
        num_shards: shards of caption rows in all.
        seconds: wall time of the scoring, pairs_per_second: pairs this process scored per second.
    """

    metrics: dict[str, float]
    scores: torch.Tensor
    caption_image_index: torch.Tensor
    image_ids: list[str]
    table: str
    protocol: str | None = None
    computed_shards: list[int] = field(default_factory=list)
    num_shards: int = 0
    seconds: float = 0.0
    pairs_per_second: float = 0.0

    def to_json_dict(self) -> dict[str, Any]:
        """The metrics and run facts as a JSON-serialisable dict (no score matrix)."""
        return {
            "protocol": self.protocol,
            "metrics": self.metrics,
            "num_captions": int(self.scores.shape[0]),
            "num_images": int(self.scores.shape[1]),
            "num_shards": self.num_shards,
            "computed_shards": len(self.computed_shards),
            "seconds": self.seconds,
            "pairs_per_second": self.pairs_per_second,
            "table": self.table,
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Write `to_json_dict()` to `path` (indented JSON)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_json_dict(), indent=2) + "\n")


def compute_metrics(
    scores: torch.Tensor, caption_image_index: torch.Tensor, protocol: str | None, strict: bool = True
) -> tuple[dict[str, float], str]:
    """Metrics (percent) and the paper-style markdown table for a score matrix under a protocol.

    Args:
        scores: [num_captions, num_images] float.
        caption_image_index: [num_captions] long.
        protocol: None (whole split, `recall_summary`), "flickr30k_1k", "coco_1k" or "coco_5k".
        strict: for the named protocols, check the official sizes (1000 / 5000 images, 5 captions each).

    Returns:
        (metrics dict, markdown table).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    function, label = PROTOCOLS[protocol]
    if function is None:
        metrics = retrieval_metrics.recall_summary(scores, caption_image_index)
        label = f"{label} ({scores.shape[1]} images, {scores.shape[0]} captions)"
    else:
        metrics = function(scores, caption_image_index, strict=strict)
    return metrics, retrieval_metrics.format_paper_table({label: metrics}, with_rsum=True)


def _check_protocol_sizes(protocol: str, inputs: RetrievalInputs) -> None:
    images = (
        retrieval_metrics.FLICKR30K_TEST_IMAGES
        if protocol == "flickr30k_1k"
        else retrieval_metrics.COCO_TEST_IMAGES
    )
    per_image = retrieval_metrics.CAPTIONS_PER_IMAGE
    counts = torch.bincount(inputs.caption_image_index, minlength=inputs.num_images)
    off = (counts != per_image).nonzero().flatten()
    if inputs.num_images != images or off.numel():
        detail = (
            f"image {inputs.image_ids[int(off[0])]!r} has {int(counts[off[0]])} captions"
            if off.numel()
            else "every image has 5 captions"
        )
        raise ValueError(
            f"protocol {protocol!r} needs the Karpathy test split: exactly {images} images with {per_image} captions "
            f"each; the split has {inputs.num_images} images and {inputs.num_captions} captions ({detail}). Pass "
            "strict=False (--no_strict) to run it on another size."
        )


def _process_state(accelerator) -> tuple[int, int, bool, torch.device | None]:
    if accelerator is None:
        return 0, 1, True, None
    return (
        int(accelerator.process_index),
        int(accelerator.num_processes),
        bool(accelerator.is_main_process),
        torch.device(accelerator.device),
    )


def _prepare_split(model, dataset, processor, protocol, strict: bool, accelerator):
    """What full-ranking and two-stage evaluation share before scoring: the protocol name checked, the model on this
    process's device, the split encoded once and checked against the model (and the protocol's sizes with
    `strict`, before hours of scoring, not after). Returns (rank, world, is_main, device, inputs)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {[p for p in PROTOCOLS if p]} or None, got {protocol!r}")
    config = getattr(model, "config", None)
    rank, world, is_main, device = _process_state(accelerator)
    if device is None:
        device = next(model.parameters()).device
    model.to(device)
    inputs = encode_retrieval_split(
        dataset, processor, use_global_image_feature=bool(getattr(config, "use_global_image_feature", False))
    )
    _check_against_model(inputs, config)
    if strict and protocol is not None:
        _check_protocol_sizes(protocol, inputs)
    return rank, world, is_main, device, inputs


def evaluate_retrieval(
    model: torch.nn.Module,
    dataset,
    processor,
    *,
    protocol: str | None = None,
    batch_size: int = 256,
    cache_dir: str | os.PathLike | None = None,
    bf16: bool = False,
    accelerator=None,
    progress: bool = True,
    shard_size: int | None = None,
    strict: bool = True,
    shard_callback: Callable[[int], None] | None = None,
) -> RetrievalEvaluation:
    """Full-ranking retrieval evaluation of a checkpoint on a test split, both directions.

    Image retrieval ranks every image for each caption; text retrieval ranks every caption for each image, any of
    its ground-truth captions counting (tie rule: see `retrieval_metrics`).

    Args:
        model: `ImageBertForPreTraining` (zero-shot: the ITM head) or `ImageBertForRetrieval` (fine-tuned head);
            anything with `score(**inputs) -> [B]`. A DDP-wrapped model is unwrapped. Run in eval mode (restored
            afterwards).
        dataset: the test split, a `datasets.Dataset` in the schema of `modeling_imagebert.data.schema` (one row per
            (image, caption); Karpathy style, 5 captions per image sharing image_id). Columns of the score matrix
            are the distinct images in order of first occurrence (the order the MSCOCO 1k folds use).
        processor: `ImageBertProcessor` (tokenisation, top regions, 5-D locations).
        protocol: None (the whole split, `recall_summary`), "flickr30k_1k", "coco_1k" (mean of 5 folds) or "coco_5k".
        batch_size: pairs per forward pass.
        cache_dir: where to keep score shards so an interrupted run resumes (None: no cache).
        bf16: bfloat16 autocast.
        accelerator: an `accelerate.Accelerator` (or `PartialState`) when launched with `accelerate launch`: shards
            are split across processes and every process receives the full matrix. None: one process, the model's
            device.
        progress: show a tqdm bar (pairs/s, ETA) on the main process.
        shard_size: caption rows per shard (default: about 65k pairs per shard).
        strict: check the official sizes of the named protocols.
        shard_callback: called with the shard index after each shard this process computes (and caches).

    Returns:
        `RetrievalEvaluation` (metrics, scores [C, I], caption_image_index [C], image_ids, markdown table).
    """
    model = getattr(model, "module", model)  # DDP / accelerate wrappers
    if not callable(getattr(model, "score", None)):
        raise TypeError(
            f"model must have a score(**inputs) method (ImageBERT heads); got {type(model).__name__}"
        )
    rank, world, is_main, device, inputs = _prepare_split(
        model, dataset, processor, protocol, strict, accelerator
    )
    num_captions, num_images = inputs.num_captions, inputs.num_images
    if shard_size is None:
        shard_size = max(1, math.ceil(_PAIRS_PER_SHARD / num_images))
    if shard_size < 1:
        raise ValueError(f"shard_size must be a positive number of caption rows, got {shard_size}")
    num_shards = math.ceil(num_captions / shard_size)
    shard_rows = [(s * shard_size, min((s + 1) * shard_size, num_captions)) for s in range(num_shards)]
    mine = list(range(rank, num_shards, world))  # shard s belongs to process s % world

    cache = None
    if cache_dir is not None:
        meta = {
            "format": _CACHE_FORMAT,
            "model": model_fingerprint(model),
            "data": inputs.fingerprint(),
            "bf16": bool(bf16),
            "shard_size": int(shard_size),
        }
        cache = _ShardCache(cache_dir, meta, is_main)

    matrix = torch.zeros(num_captions, num_images, dtype=torch.float32)
    todo = []
    for shard in mine:
        cached = cache.load(shard, shard_rows[shard], num_images) if cache is not None else None
        if cached is None:
            todo.append(shard)
        else:
            start, end = shard_rows[shard]
            matrix[start:end] = cached

    was_training = model.training
    model.eval()
    bar = None
    pairs = sum((shard_rows[s][1] - shard_rows[s][0]) * num_images for s in todo)
    if progress and is_main and pairs:
        from tqdm.auto import tqdm

        bar = tqdm(total=pairs, unit="pair", unit_scale=True, desc="scoring pairs", dynamic_ncols=True)
    began = time.perf_counter()
    try:
        device_tensors = _to_device(inputs, device)
        for shard in todo:
            start, end = shard_rows[shard]
            block = score_caption_rows(
                model,
                inputs,
                start,
                end,
                batch_size=batch_size,
                bf16=bf16,
                device=device,
                on_batch=bar.update if bar is not None else None,
                _device_tensors=device_tensors,
            )
            if not torch.isfinite(block).all():
                row, column = (int(v) for v in (~torch.isfinite(block)).nonzero()[0])
                raise FloatingPointError(
                    f"the model scored caption row {start + row} against image {inputs.image_ids[column]!r} as "
                    f"{block[row, column].item()}; refusing to rank non-finite scores"
                )
            matrix[start:end] = block
            if cache is not None:
                cache.save(shard, (start, end), block)
            if shard_callback is not None:
                shard_callback(shard)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - began

    if world > 1:
        # Each entry was filled by exactly one process (zeros elsewhere), so a sum gathers the matrix exactly.
        from accelerate.utils import reduce

        matrix = reduce(matrix.to(device), reduction="sum").cpu()

    metrics, table = compute_metrics(matrix, inputs.caption_image_index, protocol, strict=strict)
    return RetrievalEvaluation(
        metrics=metrics,
        scores=matrix,
        caption_image_index=inputs.caption_image_index,
        image_ids=inputs.image_ids,
        table=table,
        protocol=protocol,
        computed_shards=todo,
        num_shards=num_shards,
        seconds=seconds,
        pairs_per_second=pairs / seconds if seconds > 0 and pairs else 0.0,
    )


__all__ = [
    "PROTOCOLS",
    "RetrievalEvaluation",
    "RetrievalInputs",
    "compute_metrics",
    "encode_retrieval_split",
    "evaluate_retrieval",
    "model_fingerprint",
    "score_caption_rows",
]
