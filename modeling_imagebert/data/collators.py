"""Collators: batches of encoded examples (see `ImageBertProcessor.encode_record`) -> padded, masked model inputs.

- `DataCollatorForImageBertPretraining`: ITM negatives (negative captions for images and negative images for
  captions), then conditional masking of the matched pairs only: MLM (15%; 80/10/10) and masked regions
  (15%; 90% zeroed / 10% kept) with MOC class targets and MRFR feature targets.
- `DataCollatorForImageTextRetrieval`: groups of P rows per positive (positive first, then P-1 negatives).

Randomness. Every random draw is a counter-based hash (splitmix64) of (seed, epoch, example_index, stream,
position), turned into a uniform float: the same example gets the same masks in a given epoch whatever the
DataLoader worker count, the batch it lands in or a resume from a checkpoint. Only the choice of a negative
partner depends on the batch (partners are drawn from the batch), which the sampler fixes.

Call `collator.set_epoch(epoch)` BEFORE creating the DataLoader iterator of that epoch (before `iter(loader)`,
i.e. before the `for` loop): worker processes take a copy of the collator when the iterator starts, so a later
call does not reach them. With `persistent_workers=True` the workers keep their first copy: don't combine it with
`set_epoch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..processing_imagebert import IGNORE_INDEX, ImageBertProcessor
from ..tasks_imagebert import PRETRAINING_TASKS

_MASK64 = (1 << 64) - 1

# Independent random streams (one per kind of decision).
_STREAM_ITM_NEGATIVE = 1
_STREAM_ITM_DIRECTION = 2
_STREAM_ITM_PARTNER = 3
_STREAM_MLM_SELECT = 4
_STREAM_MLM_ACTION = 5
_STREAM_MLM_TOKEN = 6
_STREAM_REGION_SELECT = 7
_STREAM_REGION_ACTION = 8
_STREAM_RETRIEVAL_ORDER = 9
_STREAM_RETRIEVAL_ROW = 10
_STREAM_RETRIEVAL_DIRECTION = 11


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_uniform(
    seed: int, epoch: int, example_index: np.ndarray, stream: int, positions: int
) -> np.ndarray:
    """Uniform floats in [0, 1) that depend only on (seed, epoch, example_index, stream, position).

    Args:
        seed, epoch, stream: ints.
        example_index: int [B], the dataset row of each example.
        positions: P, the number of positions drawn per example.

    Returns:
        float64 [B, P].
    """
    with np.errstate(over="ignore"):
        key = np.uint64(seed & _MASK64) ^ np.uint64(0x243F6A8885A308D3)
        key = _splitmix64(np.array([key], dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(epoch & _MASK64))
        key = _splitmix64(key ^ np.uint64(stream))
        index = np.asarray(example_index, dtype=np.int64).astype(np.uint64)
        per_example = _splitmix64(key ^ index)  # [B]
        counter = np.arange(positions, dtype=np.uint64)
        bits = _splitmix64(per_example[:, None] ^ _splitmix64(counter)[None, :])  # [B, P]
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _as_processor(processor_or_tokenizer: Any) -> ImageBertProcessor:
    if isinstance(processor_or_tokenizer, ImageBertProcessor):
        return processor_or_tokenizer
    if hasattr(processor_or_tokenizer, "convert_tokens_to_ids") and hasattr(
        processor_or_tokenizer, "pad_token_id"
    ):
        return ImageBertProcessor(processor_or_tokenizer)
    raise TypeError(
        f"processor_or_tokenizer: expected an ImageBertProcessor or a BERT tokenizer, got "
        f"{type(processor_or_tokenizer).__name__}"
    )


def _example_indices(examples: Sequence[Mapping[str, Any]]) -> np.ndarray:
    indices = []
    for i, example in enumerate(examples):
        value = example.get("example_index")
        if value is None:
            raise ValueError(
                f"example {i} (image_id {example.get('image_id')!r}) has no example_index; encode the dataset with "
                f"processor.prepare_dataset(...) or dataset.map(processor.encode_record, with_indices=True)"
            )
        indices.append(int(value.item() if hasattr(value, "item") else value))
    return np.asarray(indices, dtype=np.int64)


def _image_ids(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    ids = []
    for i, example in enumerate(examples):
        value = example.get("image_id")
        if value is None:
            raise ValueError(f"example {i} has no image_id; the collators need it to draw negatives")
        ids.append(str(value))
    return ids


_TEXT_KEYS = ("input_ids",)
_IMAGE_KEYS = ("region_features", "region_locations", "region_classes", "global_feature")


def _pair(text_example: Mapping[str, Any], image_example: Mapping[str, Any]) -> dict[str, Any]:
    """The caption of one example with the image of another."""
    pair = {key: image_example[key] for key in _IMAGE_KEYS if key in image_example}
    for key in _TEXT_KEYS:
        pair[key] = text_example[key]
    pair["image_id"] = image_example.get("image_id")
    pair["caption_image_id"] = text_example.get("image_id")
    return pair


def contrastive_groups(*image_id_lists: Sequence[str]) -> list[torch.Tensor]:
    """Group ids for the image-text contrastive loss: equal image ids get equal ids, in one id space across all the
    lists (e.g. the image each row's caption describes, and the image each row shows).

    Args:
        image_id_lists: sequences of image ids, one per role.

    Returns:
        One LongTensor `(len(list),)` per list.
    """
    ids: dict[str, int] = {}
    return [
        torch.tensor([ids.setdefault(str(i), len(ids)) for i in image_ids], dtype=torch.long)
        for image_ids in image_id_lists
    ]


class _SeededCollator:
    def __init__(self, seed: int):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the masks and negatives of `epoch`. Call before creating the DataLoader iterator (workers copy the
        collator when the iterator starts)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def _uniform(self, indices: np.ndarray, stream: int, positions: int) -> np.ndarray:
        return hashed_uniform(self.seed, self.epoch, indices, stream, positions)


def _check_probability(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


# The batch entries `add_labelled_positions` writes: each masked task's positions (the task table's), and the rows of
# the last layer.
POSITION_KEYS = (
    *(task.position_key for task in PRETRAINING_TASKS if task.position_key is not None),
    "last_layer_positions",
)


def _flat_positions(selected: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (M,) flat indices of the selected entries; `[-100]` (one ignored entry) when none is, so the
    head still runs on one row and every parameter gets a gradient under DDP."""
    index = torch.from_numpy(np.flatnonzero(selected.reshape(-1).numpy()))
    return index if index.numel() else torch.full((1,), IGNORE_INDEX, dtype=torch.long)


def _check_label_ranges(batch: Mapping[str, Any]) -> None:
    """Labels of a hand-made or modified batch, as the task table's `label_values` says: binary labels (itm_labels)
    in {0, 1}; class-id labels (labels, region_class_labels) whole numbers >= 0 or -100 (ignored). Checked on the
    CPU, where the collators run, so the model never has to."""
    for name in (task.label_keys[0] for task in PRETRAINING_TASKS if task.label_values == "binary"):
        value = batch.get(name)
        if value is None:
            continue
        value = torch.as_tensor(value)
        bad = ~((value == 0) | (value == 1))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"{name} of batch row {row}: {value[row].item()!r} is not 0 (mismatched) or 1 (matched)"
            )
    class_labels = [
        task.label_keys[0] for task in PRETRAINING_TASKS if task.label_values not in (None, "binary")
    ]
    for name in class_labels:
        value = batch.get(name)
        if value is None:
            continue
        value = torch.as_tensor(value)
        if value.is_floating_point():
            raise ValueError(f"{name}: expected integer ids (or -100), got dtype {value.dtype}")
        bad = (value < 0) & (value != IGNORE_INDEX)
        if bad.any():
            row, column = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"{name} of batch row {row}, position {column}: {value[row, column].item()} is neither an id >= 0 nor "
                f"{IGNORE_INDEX} (ignored)"
            )


def bucket_size(size: int, limit: int, smallest: int = 8) -> int:
    """The size a dimension of `size` entries is padded to with shape buckets: the smallest power of two >= `size`
    (and >= `smallest`), but at most `limit` (a dimension already longer than `limit` keeps its size). A stage then
    sees a few distinct shapes per dimension, so a compiled step is compiled a few times, not once per batch."""
    bucket = max(int(smallest), 1 << max(int(size) - 1, 0).bit_length())
    return max(int(size), min(bucket, int(limit)))


# The [B, T] text and [B, R, ...] region entries of a batch, with the value their padding holds.
_TEXT_PADDING = {"attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}
_REGION_PADDING = {
    "region_features": 0.0,
    "region_locations": 0.0,
    "region_attention_mask": 0,
    "region_feature_targets": 0.0,
    "masked_regions": False,
    "region_class_labels": IGNORE_INDEX,
}


def _pad_dim1(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    """`tensor` [B, N, ...] padded with `value` to [B, width, ...]."""
    if tensor.shape[1] >= width:
        return tensor
    padding = tensor.new_full((tensor.shape[0], width - tensor.shape[1], *tensor.shape[2:]), value)
    return torch.cat([tensor, padding], dim=1)


def pad_to_buckets(
    batch: dict[str, Any], *, pad_token_id: int, max_text_length: int, max_regions: int
) -> dict[str, Any]:
    """Pads a collated batch, in place, to shape buckets (see `bucket_size`): the text to a bucket of at most
    `max_text_length` tokens (padding ids `pad_token_id`, masked out, labels -100), the regions to one of at most
    `max_regions` (zero features, masked out, no labels), and, for a pre-training batch, each head's positions and
    the last layer's rows to buckets too (`add_labelled_positions(..., bucketed=True)`; padding entries -100). The
    model computes the same losses: padding is masked out of attention and out of every loss. Returns `batch`."""
    had_positions = any(key in batch for key in POSITION_KEYS)
    for reference, limit, padding in (
        ("input_ids", max_text_length, {"input_ids": pad_token_id, **_TEXT_PADDING}),
        ("region_features", max_regions, _REGION_PADDING),
    ):
        if batch.get(reference) is None:
            continue
        shape = batch[reference].shape[:2]  # (B, T) or (B, R)
        width = bucket_size(shape[1], limit)
        for name, value in padding.items():
            # Only entries laid out like the reference (a retrieval batch's `labels` are (B,), not (B, T)).
            if isinstance(batch.get(name), torch.Tensor) and batch[name].shape[:2] == shape:
                batch[name] = _pad_dim1(batch[name], width, value)
    return add_labelled_positions(batch, bucketed=True) if had_positions else batch


def _pad_positions(positions: torch.Tensor, limit: int) -> torch.Tensor:
    """Flat positions (M,) padded with -100 (ignored) to `bucket_size(M, limit)` entries."""
    width = bucket_size(positions.shape[0], limit)
    return torch.cat([positions, positions.new_full((width - positions.shape[0],), IGNORE_INDEX)])


def add_labelled_positions(batch: dict[str, Any], bucketed: bool = False) -> dict[str, Any]:
    """Adds to a pre-training batch, in place, the positions each head reads, computed here on the CPU so that the
    model's training step never reads a value back from the device:

    - `mlm_positions` (M,): flat indices into `labels.view(-1)` of the labelled tokens of matched pairs;
    - `moc_positions`, `mrfr_positions` (K,): flat indices into the (B * R) regions of the labelled (MOC) and
      masked (MRFR) regions of matched pairs;
    - `last_layer_positions` (B, Q): for each row, the joint-sequence positions the heads read ([CLS] first, then
      the labelled tokens and regions, ascending), padded with other positions of the row so every row has Q
      distinct entries.

    A task whose labels are absent gets no positions; call again after removing labels (old positions are
    replaced). Conditional masking: entries of mismatched pairs (`itm_labels` 0) are left out. With `bucketed`, each
    count is padded to its shape bucket (`bucket_size`): the positions with -100 entries, Q with more rows.
    """
    _check_label_ranges(batch)
    for key in POSITION_KEYS:
        batch.pop(key, None)
    input_ids, regions = batch.get("input_ids"), batch.get("region_features")
    reference = input_ids if input_ids is not None else regions
    if reference is None:
        return batch
    size = reference.shape[0]
    num_text = 0 if input_ids is None else input_ids.shape[1]
    num_global = int(batch.get("global_image_features") is not None)
    num_regions = 0 if regions is None else regions.shape[1]
    matched = batch["itm_labels"] == 1 if "itm_labels" in batch else torch.ones(size, dtype=torch.bool)
    joint = torch.zeros(size, num_text + num_global + num_regions, dtype=torch.bool)
    joint[:, 0] = True  # the pooler's row, read by ITM
    if "labels" in batch and input_ids is not None:
        selected = (batch["labels"] != IGNORE_INDEX) & matched[:, None]
        batch["mlm_positions"] = _flat_positions(selected)
        if bucketed:
            batch["mlm_positions"] = _pad_positions(batch["mlm_positions"], selected.numel())
        joint[:, :num_text] |= selected
    region_part = joint[:, num_text + num_global :]
    if "region_class_labels" in batch and regions is not None:
        selected = (batch["region_class_labels"] != IGNORE_INDEX) & matched[:, None]
        batch["moc_positions"] = _flat_positions(selected)
        if bucketed:
            batch["moc_positions"] = _pad_positions(batch["moc_positions"], selected.numel())
        region_part |= selected
    if "region_feature_targets" in batch and "masked_regions" in batch and regions is not None:
        selected = batch["masked_regions"].bool() & matched[:, None]
        batch["mrfr_positions"] = _flat_positions(selected)
        if bucketed:
            batch["mrfr_positions"] = _pad_positions(batch["mrfr_positions"], selected.numel())
        region_part |= selected
    num_queries = max(int(joint.sum(1).max()), 1)
    if bucketed:  # at least 16: per-row counts straddle 8 in a typical batch, and the extra rows are cheap
        num_queries = bucket_size(num_queries, joint.shape[1], smallest=16)
    # Selected positions first (ascending), then the others: a stable sort of "not selected".
    batch["last_layer_positions"] = torch.argsort((~joint).to(torch.int8), dim=1, stable=True)[
        :, :num_queries
    ]
    return batch


def mask_tokens(
    input_ids: torch.Tensor,
    eligible: torch.Tensor,
    select_draw: np.ndarray,
    action_draw: np.ndarray,
    token_draw: np.ndarray,
    *,
    mlm_probability: float,
    mask_replace_prob: float,
    random_replace_prob: float,
    mask_token_id: int,
    random_token_ids: np.ndarray,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking, the one implementation of the package: of the `eligible` tokens, those whose `select_draw` is
    below `mlm_probability` are selected; a selected token becomes [MASK] when its `action_draw` is below
    `mask_replace_prob`, a random non-special token (picked by `token_draw`) when it is below
    `mask_replace_prob + random_replace_prob`, and stays unchanged otherwise.

    Args: `input_ids`, `eligible` [B, T]; the three draws [B, T] uniform in [0, 1) (see `hashed_uniform`).
    Returns: the masked input ids [B, T] and the MLM labels [B, T] (the original id at selected tokens, else -100).
    """
    selected = eligible & torch.from_numpy(select_draw < mlm_probability)
    action = torch.from_numpy(action_draw)
    to_mask = selected & (action < mask_replace_prob)
    to_random = selected & (action >= mask_replace_prob) & (action < mask_replace_prob + random_replace_prob)
    random_tokens = torch.from_numpy(random_token_ids[(token_draw * len(random_token_ids)).astype(np.int64)])
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    masked_ids = torch.where(to_mask, torch.full_like(input_ids, mask_token_id), input_ids)
    return torch.where(to_random, random_tokens, masked_ids), labels


class DataCollatorForImageBertPretraining(_SeededCollator):
    r"""
    Collator for the four ImageBERT pre-training tasks (MLM, MOC, MRFR, ITM) with conditional masking.

    Args:
        processor_or_tokenizer: an `ImageBertProcessor` (or a BERT tokenizer, wrapped in a default processor).
        mlm_probability (0.15): share of real text tokens ([CLS]/[SEP]/[PAD] and other special tokens excluded)
            selected for MLM; of those `mask_replace_prob` (0.8) become [MASK], `random_replace_prob` (0.1) a random
            non-special token, and the rest stay unchanged.
        region_mask_probability (0.15): share of real regions selected; of those `region_zero_prob` (0.9) get a
            zeroed feature, the rest keep theirs.
        itm_negative_rate (0.5): share of examples turned into ITM negatives; of those `negative_caption_share`
            (0.5) get the caption of another image (negative sentence for the image), the others the image of
            another caption (negative image for the sentence). Partners come from the batch, with a different
            image_id; an example with no such partner stays positive (counted in `stats["no_partner"]`).
        seed (0): randomness derives only from (seed, epoch, example_index); see `set_epoch`.
        feature_dtype (torch.float32): dtype of region_features and region_feature_targets.
        num_object_classes (None): when given (the model's `config.num_object_classes`), every region class id
            must lie in [0, num_object_classes): MOC targets out of range are refused naming the example.

    Input: a list of B encoded examples (`ImageBertProcessor.encode_record`, with `example_index`).

    Output (dict of tensors): input_ids, attention_mask, token_type_ids [B, T]; region_features [B, R, F] (masked),
    region_locations [B, R, 5], region_attention_mask [B, R]; labels [B, T] (original ids at masked tokens, else
    -100); masked_regions [B, R] bool; region_class_labels [B, R] (detector class at masked regions, else -100);
    region_feature_targets [B, R, F] (unmasked features); itm_labels [B] (1 matched, 0 negative); the heads'
    positions (`add_labelled_positions`: mlm_positions, moc_positions, mrfr_positions, last_layer_positions);
    itc_text_groups, itc_image_groups [B] (the image each row's caption describes and the image it shows, as
    group ids: for the optional contrastive task); and global_image_features [B, G] when the examples have a global
    feature. Negatives carry no masks.

    `stats` counts, in this process, examples, negatives, negative_captions, negative_images and no_partner
    (DataLoader workers each count on their own copy).
    """

    def __init__(
        self,
        processor_or_tokenizer: Any,
        *,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
        region_mask_probability: float = 0.15,
        region_zero_prob: float = 0.9,
        itm_negative_rate: float = 0.5,
        negative_caption_share: float = 0.5,
        seed: int = 0,
        feature_dtype: torch.dtype = torch.float32,
        num_object_classes: int | None = None,
    ):
        super().__init__(seed)
        self.processor = _as_processor(processor_or_tokenizer)
        if num_object_classes is not None and (
            isinstance(num_object_classes, bool)
            or not isinstance(num_object_classes, int)
            or num_object_classes < 1
        ):
            raise ValueError(f"num_object_classes must be an int >= 1 or None, got {num_object_classes!r}")
        self.num_object_classes = num_object_classes
        self.mlm_probability = _check_probability("mlm_probability", mlm_probability)
        self.mask_replace_prob = _check_probability("mask_replace_prob", mask_replace_prob)
        self.random_replace_prob = _check_probability("random_replace_prob", random_replace_prob)
        if self.mask_replace_prob + self.random_replace_prob > 1.0 + 1e-9:
            raise ValueError(
                f"mask_replace_prob + random_replace_prob must be <= 1, got {mask_replace_prob} + {random_replace_prob}"
            )
        self.region_mask_probability = _check_probability("region_mask_probability", region_mask_probability)
        self.region_zero_prob = _check_probability("region_zero_prob", region_zero_prob)
        self.itm_negative_rate = _check_probability("itm_negative_rate", itm_negative_rate)
        self.negative_caption_share = _check_probability("negative_caption_share", negative_caption_share)
        if not isinstance(feature_dtype, torch.dtype) or not feature_dtype.is_floating_point:
            raise ValueError(f"feature_dtype must be a floating torch.dtype, got {feature_dtype!r}")
        self.feature_dtype = feature_dtype
        tokenizer = self.processor.tokenizer
        if tokenizer.mask_token_id is None:
            raise ValueError("the tokenizer has no [MASK] token; MLM needs one")
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.random_token_ids = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), self.special_ids)
        self.stats = {
            "examples": 0,
            "negatives": 0,
            "negative_captions": 0,
            "negative_images": 0,
            "no_partner": 0,
        }

    def _make_pairs(
        self, examples: Sequence[Mapping[str, Any]], indices: np.ndarray
    ) -> tuple[list, np.ndarray]:
        """ITM: returns the (caption, image) pairs and itm_labels [B]."""
        size = len(examples)
        image_ids = np.asarray(_image_ids(examples), dtype=object)
        negative = self._uniform(indices, _STREAM_ITM_NEGATIVE, 1)[:, 0] < self.itm_negative_rate
        caption_side = self._uniform(indices, _STREAM_ITM_DIRECTION, 1)[:, 0] < self.negative_caption_share
        partner_draw = self._uniform(indices, _STREAM_ITM_PARTNER, 1)[:, 0]
        different = image_ids[:, None] != image_ids[None, :]  # [B, B]
        pairs: list[dict[str, Any]] = []
        itm_labels = np.ones(size, dtype=np.int64)
        for i, example in enumerate(examples):
            if not negative[i]:
                pairs.append(dict(example))
                continue
            candidates = np.flatnonzero(different[i])
            if candidates.size == 0:
                self.stats["no_partner"] += 1
                pairs.append(dict(example))
                continue
            partner = examples[int(candidates[int(partner_draw[i] * candidates.size)])]
            itm_labels[i] = 0
            self.stats["negatives"] += 1
            if caption_side[i]:  # negative sentence for the image
                self.stats["negative_captions"] += 1
                pairs.append(_pair(partner, example))
            else:  # negative image for the sentence
                self.stats["negative_images"] += 1
                pairs.append(_pair(example, partner))
        self.stats["examples"] += size
        return pairs, itm_labels

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) == 0:
            raise ValueError("DataCollatorForImageBertPretraining: got an empty batch")
        indices = _example_indices(examples)
        pairs, itm_labels = self._make_pairs(examples, indices)
        text_groups, image_groups = contrastive_groups(
            [pair.get("caption_image_id", pair.get("image_id")) for pair in pairs],
            [pair.get("image_id") for pair in pairs],
        )
        batch = self.processor.pad(
            pairs,
            feature_dtype=self.feature_dtype,
            return_region_classes=True,
            num_object_classes=self.num_object_classes,
        )
        matched = torch.from_numpy(itm_labels == 1)  # [B]

        # MLM over real, non-special tokens of matched pairs.
        input_ids = batch["input_ids"]  # [B, T]
        size, length = input_ids.shape
        eligible = (batch["attention_mask"] == 1) & ~torch.from_numpy(
            np.isin(input_ids.numpy(), self.special_ids)
        )
        eligible &= matched[:, None]
        batch["input_ids"], batch["labels"] = mask_tokens(
            input_ids,
            eligible,
            self._uniform(indices, _STREAM_MLM_SELECT, length),
            self._uniform(indices, _STREAM_MLM_ACTION, length),
            self._uniform(indices, _STREAM_MLM_TOKEN, length),
            mlm_probability=self.mlm_probability,
            mask_replace_prob=self.mask_replace_prob,
            random_replace_prob=self.random_replace_prob,
            mask_token_id=self.mask_token_id,
            random_token_ids=self.random_token_ids,
        )

        # Masked regions (MOC + MRFR) over real regions of matched pairs.
        features = batch["region_features"]  # [B, R, F]
        regions = features.shape[1]
        real = (batch["region_attention_mask"] == 1) & matched[:, None]
        region_select = torch.from_numpy(
            self._uniform(indices, _STREAM_REGION_SELECT, regions) < self.region_mask_probability
        )
        masked_regions = real & region_select
        zero = masked_regions & torch.from_numpy(
            self._uniform(indices, _STREAM_REGION_ACTION, regions) < self.region_zero_prob
        )
        batch["region_feature_targets"] = features
        features = features.clone()
        features[zero] = 0.0  # in place on the ~13% zeroed rows: cheaper than a masked_fill over [B, R, F]
        batch["region_features"] = features
        classes = batch.pop("region_classes")
        batch["masked_regions"] = masked_regions
        batch["region_class_labels"] = torch.where(
            masked_regions, classes, torch.full_like(classes, IGNORE_INDEX)
        )
        batch["itm_labels"] = torch.from_numpy(itm_labels)
        batch["itc_text_groups"], batch["itc_image_groups"] = text_groups, image_groups
        return add_labelled_positions(batch)


class DataCollatorForImageTextRetrieval(_SeededCollator):
    r"""
    Collator for retrieval fine-tuning: every example is a positive and brings a group of P rows.

    Args:
        processor_or_tokenizer: an `ImageBertProcessor` (or a BERT tokenizer, wrapped in a default processor).
        num_candidates (P, 4): rows per group: the positive first, then P-1 negatives.
        negative_direction: "text" (negative captions for the image: image-to-text), "image" (negative images for
            the caption: text-to-image) or "both" (the negatives of a group alternate between the two, starting
            with a direction drawn per example).
        seed (0): randomness derives from (seed, epoch, example_index); see `set_epoch`.
        shape_buckets (False): pad the text and the regions to shape buckets (`pad_to_buckets`, up to the
            processor's `max_text_length` and `max_regions`) instead of the batch's longest: a compiled step
            (`--torch_compile`) then sees a few shapes. The losses are the same.

    Negatives come from other examples of the batch with a different image_id, P-1 distinct images per group
    (a caption of the chosen image is drawn when it has several). A batch needs at least P distinct images.

    Output (dict of tensors): the padded model inputs of B*P rows (input_ids, attention_mask, token_type_ids,
    region_features, region_locations, region_attention_mask, and global_image_features when present), laid out
    as B contiguous groups of P rows, labels [B*P] float (1.0 for each group's first row, 0.0 otherwise),
    num_candidates (the int P) and itc_image_groups [B] (group ids of the examples' images, for the `itc` loss).
    """

    DIRECTIONS = ("both", "text", "image")

    def __init__(
        self,
        processor_or_tokenizer: Any,
        *,
        num_candidates: int = 4,
        negative_direction: str = "both",
        seed: int = 0,
        feature_dtype: torch.dtype = torch.float32,
        shape_buckets: bool = False,
    ):
        super().__init__(seed)
        self.processor = _as_processor(processor_or_tokenizer)
        self.shape_buckets = bool(shape_buckets)
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
            raise ValueError(
                f"num_candidates must be an int >= 1 (the positive plus negatives), got {num_candidates!r}"
            )
        if negative_direction not in self.DIRECTIONS:
            raise ValueError(
                f"negative_direction must be one of {self.DIRECTIONS}, got {negative_direction!r}"
            )
        self.num_candidates = num_candidates
        self.negative_direction = negative_direction
        self.feature_dtype = feature_dtype

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        size = len(examples)
        if size == 0:
            raise ValueError("DataCollatorForImageTextRetrieval: got an empty batch")
        count = self.num_candidates
        indices = _example_indices(examples)
        image_ids = _image_ids(examples)
        distinct, image_of_row = np.unique(np.asarray(image_ids, dtype=object), return_inverse=True)
        if len(distinct) < count:
            raise ValueError(
                f"DataCollatorForImageTextRetrieval: a batch of {size} examples has {len(distinct)} distinct images, "
                f"but num_candidates={count} needs at least {count} (each positive needs {count - 1} negatives with "
                f"other images); use a larger batch or a smaller num_candidates"
            )
        rows_of_image = [np.flatnonzero(image_of_row == k) for k in range(len(distinct))]
        order_draw = self._uniform(indices, _STREAM_RETRIEVAL_ORDER, len(distinct))  # [B, D]
        row_draw = self._uniform(indices, _STREAM_RETRIEVAL_ROW, count)  # [B, P]
        start_draw = self._uniform(indices, _STREAM_RETRIEVAL_DIRECTION, 1)[:, 0] < 0.5
        rows: list[dict[str, Any]] = []
        for i, example in enumerate(examples):
            rows.append(example)
            order = order_draw[i].copy()
            order[image_of_row[i]] = np.inf  # never the example's own image
            chosen = np.argsort(order, kind="stable")[: count - 1]
            for k, image in enumerate(chosen):
                candidates = rows_of_image[image]
                partner = examples[int(candidates[int(row_draw[i, k + 1] * len(candidates))])]
                if self.negative_direction == "text":
                    caption_side = True
                elif self.negative_direction == "image":
                    caption_side = False
                else:
                    caption_side = bool((k % 2 == 0) == start_draw[i])
                rows.append(_pair(partner, example) if caption_side else _pair(example, partner))
        batch = self.processor.pad(rows, feature_dtype=self.feature_dtype)
        labels = torch.zeros(size * count, dtype=torch.float32)
        labels[::count] = 1.0
        batch["labels"] = labels
        # P, so the ce/triplet losses need not count positives on the device (a host synchronisation).
        batch["num_candidates"] = count
        (batch["itc_image_groups"],) = contrastive_groups(image_ids)
        if self.shape_buckets:
            pad_id = self.processor.tokenizer.pad_token_id
            pad_to_buckets(
                batch,
                pad_token_id=0 if pad_id is None else int(pad_id),
                max_text_length=self.processor.max_text_length,
                max_regions=self.processor.max_regions,
            )
        return batch


# Collator random streams of the text-only MLM collator (distinct from the pre-training collator's).
_STREAM_TEXT_SELECT = 21
_STREAM_TEXT_ACTION = 22
_STREAM_TEXT_TOKEN = 23


class DataCollatorForTextMLM(_SeededCollator):
    """Text-only MLM batches (no regions): BERT masking (select `mlm_probability` of the real, non-special tokens;
    80% [MASK], 10% random token, 10% kept, by `mask_tokens`) keyed on (seed, epoch, example_index) like the
    image-text collator.

    Input: examples with input_ids and example_index. Output: input_ids, attention_mask, token_type_ids, labels
    [B, T] long, and mlm_positions / last_layer_positions (`add_labelled_positions`).
    """

    def __init__(self, processor: ImageBertProcessor, *, mlm_probability: float = 0.15, seed: int = 0):
        super().__init__(seed)
        self.processor = processor
        self.mlm_probability = _check_probability("mlm_probability", mlm_probability)
        tokenizer = processor.tokenizer
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.random_token_ids = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), self.special_ids)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        indices = _example_indices(examples)
        batch = self.processor.pad([{"input_ids": e["input_ids"]} for e in examples])
        input_ids = batch["input_ids"]  # [B, T]
        length = input_ids.shape[1]
        eligible = (batch["attention_mask"] == 1) & ~torch.from_numpy(
            np.isin(input_ids.numpy(), self.special_ids)
        )
        batch["input_ids"], batch["labels"] = mask_tokens(
            input_ids,
            eligible,
            self._uniform(indices, _STREAM_TEXT_SELECT, length),
            self._uniform(indices, _STREAM_TEXT_ACTION, length),
            self._uniform(indices, _STREAM_TEXT_TOKEN, length),
            mlm_probability=self.mlm_probability,
            mask_replace_prob=0.8,
            random_replace_prob=0.1,
            mask_token_id=self.mask_token_id,
            random_token_ids=self.random_token_ids,
        )
        return add_labelled_positions(batch)


class DataCollatorForCandidateGroups:
    r"""
    Evaluation collator for a `CandidateLayout`: builds the P pairs of each group from an encoded dataset.

    Args:
        encoded_dataset: the evaluation split encoded by `ImageBertProcessor.prepare_dataset` (row i of it is row i
            of the split the layout was made from); rows are read on demand, so features are not copied P times.
        processor: the `ImageBertProcessor` whose `pad` builds the model inputs.
        feature_dtype: dtype of `region_features`.

    Input: a list of B layout items (`CandidateLayout.__getitem__`).
    Output: the padded model inputs of B*P rows (B contiguous groups of P, ground truth first), num_candidates
    (the int P) and labels [B*P]
    float (1.0 at each group's first row).
    """

    def __init__(self, encoded_dataset, processor, feature_dtype: torch.dtype = torch.float32):
        self.encoded_dataset = encoded_dataset
        self.processor = processor
        self.feature_dtype = feature_dtype

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if len(items) == 0:
            raise ValueError("DataCollatorForCandidateGroups: got an empty batch")
        sizes = {len(item["text_rows"]) for item in items}
        if len(sizes) != 1:
            raise ValueError(
                f"DataCollatorForCandidateGroups: groups of different sizes {sorted(sizes)} in one batch"
            )
        count = sizes.pop()
        cache: dict[int, Mapping[str, Any]] = {}

        def row(index) -> Mapping[str, Any]:
            index = int(index)
            if index not in cache:
                if not 0 <= index < len(self.encoded_dataset):
                    raise IndexError(
                        f"candidate layout row {index} is outside the evaluation dataset ({len(self.encoded_dataset)} "
                        "rows); was the layout made from another split?"
                    )
                cache[index] = self.encoded_dataset[index]
            return cache[index]

        pairs = []
        for item in items:
            for text_row, image_row in zip(item["text_rows"], item["image_rows"], strict=True):
                text, image = row(text_row), row(image_row)
                pair = {key: image[key] for key in _IMAGE_KEYS if key in image}
                pair.update({key: text[key] for key in _TEXT_KEYS})
                pairs.append(pair)
        batch = self.processor.pad(pairs, feature_dtype=self.feature_dtype)
        labels = torch.zeros(len(items) * count, dtype=torch.float32)
        labels[::count] = 1.0
        batch["labels"] = labels
        # P, so the ce/triplet losses need not count positives on the device (a host synchronisation).
        batch["num_candidates"] = count
        return batch


__all__ = [
    "DataCollatorForCandidateGroups",
    "DataCollatorForImageBertPretraining",
    "DataCollatorForImageTextRetrieval",
    "DataCollatorForTextMLM",
    "POSITION_KEYS",
    "add_labelled_positions",
    "bucket_size",
    "hashed_uniform",
    "mask_tokens",
    "pad_to_buckets",
]
