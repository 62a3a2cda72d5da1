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

The batched scoring loop, the shards and their cache are `modeling_imagebert.retrieval.scoring` (two-stage
retrieval and search use them too); ranking and the tie rule live in `modeling_imagebert.retrieval.metrics`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_write_text
from . import metrics as retrieval_metrics
from .scoring import (
    PAIRS_PER_SHARD,
    ShardCache,
    check_count,
    score_in_shards,
    score_pair_batches,
    scoring_setup,
)

# Protocol name -> (function, label used in the paper-style table).
PROTOCOLS: dict[str | None, tuple[Callable[..., dict[str, float]] | None, str]] = {
    None: (None, "Test split"),
    "flickr30k_1k": (retrieval_metrics.flickr30k_1k, "Flickr30k 1k"),
    "coco_1k": (retrieval_metrics.coco_1k, "MSCOCO 1k"),
    "coco_5k": (retrieval_metrics.coco_5k, "MSCOCO 5k"),
}

_CACHE_FORMAT = 1


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


def encode_images(
    records: Iterable[tuple[int, Mapping[str, Any]]],
    processor,
    *,
    use_global_image_feature: bool = False,
    feature_dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Encode the regions of each image once into padded tensors (one row per record, in order; no captions).

    Args:
        records: (row index, record) pairs, one per image, in the schema of `modeling_imagebert.data.schema`; the
            row index names the record in errors.
        processor: an `ImageBertProcessor` (`encode_record` keeps the top `max_regions` regions and builds the 5-D
            locations; `pad` pads).
        use_global_image_feature: keep each record's `global_feature` (the model uses a global image token, so
            every record needs one); otherwise it is dropped.
        feature_dtype: dtype of region_features (and global_image_features); None: float16 when every record's
            features are float16 (kept compact for a large split), else float32.

    Returns:
        region_features [I, R, F], region_locations [I, R, 5] float32, region_attention_mask [I, R] long (R = most
        regions of any image), and global_image_features [I, G] with `use_global_image_feature`.
    """
    encoded = []
    for row, record in records:
        example = processor.encode_record(record, index=row, _input_ids=[])
        example.pop("input_ids")  # regions only: captions are tokenised on their own
        if use_global_image_feature and example.get("global_feature") is None:
            raise ValueError(
                f"global_feature of record {row} (image_id {example['image_id']!r}): missing, but the model uses "
                "a global image token (config.use_global_image_feature)"
            )
        if not use_global_image_feature:
            example.pop("global_feature", None)
        encoded.append(example)
    if feature_dtype is None:
        feature_dtype = (
            torch.float16
            if all(np.asarray(e["region_features"]).dtype == np.float16 for e in encoded)
            else torch.float32
        )
    padded = processor.pad(encoded, feature_dtype=feature_dtype)
    return {
        name: padded[name]
        for name in ("region_features", "region_locations", "region_attention_mask", "global_image_features")
        if name in padded
    }


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
    images = encode_images(
        zip(image_rows, records, strict=True), processor, use_global_image_feature=use_global_image_feature
    )
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
    device, text, images, compute_dtype = scoring_setup(
        model, inputs.text, inputs.images, batch_size, device, _device_tensors
    )
    num_images = inputs.num_images
    rows = caption_end - caption_start
    # Visit images in order of region count, so a batch (consecutive images of one caption) holds images of similar
    # sizes and is trimmed to few padded regions; scores are written back to each image's own column.
    image_order = torch.sort(images["region_attention_mask"].sum(1), stable=True).indices  # (I,)

    def pairs_at(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair = torch.arange(start, stop, device=device)  # flat (caption, image) ids
        row = pair // num_images
        image_index = image_order[pair % num_images]
        return caption_start + row, image_index, row * num_images + image_index

    scores = score_pair_batches(
        model, text, images, rows * num_images, pairs_at, batch_size=batch_size, bf16=bf16, device=device,
        compute_dtype=compute_dtype, on_batch=on_batch,
    )  # fmt: skip
    return scores.view(rows, num_images)


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
        atomic_write_text(path, json.dumps(self.to_json_dict(), indent=2) + "\n")


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
    # Counts first, before the split is encoded.
    check_count("batch_size", batch_size, "pairs per forward pass")
    if shard_size is not None:
        check_count("shard_size", shard_size, "caption rows per shard")
    rank, world, is_main, device, inputs = _prepare_split(
        model, dataset, processor, protocol, strict, accelerator
    )
    num_captions, num_images = inputs.num_captions, inputs.num_images
    if shard_size is None:
        shard_size = max(1, math.ceil(PAIRS_PER_SHARD / num_images))

    cache = None
    if cache_dir is not None:
        meta = {
            "format": _CACHE_FORMAT,
            "model": model_fingerprint(model),
            "data": inputs.fingerprint(),
            "bf16": bool(bf16),
            "shard_size": int(shard_size),
        }
        cache = ShardCache(cache_dir, meta, is_main)

    # Captions [start, end) against every image: (end - start, I).
    def score_rows(start, end, device_tensors, on_batch):
        return score_caption_rows(
            model, inputs, start, end, batch_size=batch_size, bf16=bf16, device=device, on_batch=on_batch,
            _device_tensors=device_tensors,
        )  # fmt: skip

    was_training = model.training
    model.eval()
    try:
        # Shards of caption rows, each row holding that caption's pairs with every image.
        scored = score_in_shards(
            score_rows, inputs.text, inputs.images, num_rows=num_captions, width=num_images, shard_size=shard_size,
            rank=rank, world=world, is_main=is_main, device=device, cache=cache, progress=progress,
            description="scoring pairs", shard_callback=shard_callback,
            describe_pair=lambda row, column: f"caption row {row} against image {inputs.image_ids[column]!r}",
        )  # fmt: skip
    finally:
        model.train(was_training)

    metrics, table = compute_metrics(scored.scores, inputs.caption_image_index, protocol, strict=strict)
    return RetrievalEvaluation(
        metrics=metrics,
        scores=scored.scores,
        caption_image_index=inputs.caption_image_index,
        image_ids=inputs.image_ids,
        table=table,
        protocol=protocol,
        computed_shards=scored.computed_shards,
        num_shards=scored.num_shards,
        seconds=scored.seconds,
        pairs_per_second=scored.pairs / scored.seconds if scored.seconds > 0 and scored.pairs else 0.0,
    )


__all__ = [
    "PROTOCOLS",
    "RetrievalEvaluation",
    "RetrievalInputs",
    "compute_metrics",
    "encode_images",
    "encode_retrieval_split",
    "evaluate_retrieval",
    "model_fingerprint",
    "score_caption_rows",
]
