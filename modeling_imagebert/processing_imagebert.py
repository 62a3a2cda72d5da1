"""ImageBertProcessor: turns (caption, detector regions) into ImageBERT inputs, and with a detector (caption,
image) too.

Three paths share one padding routine:

- `encode_record` / `prepare_dataset`: one dataset row (the schema of `modeling_imagebert.data.schema`) becomes an
  unpadded *encoded example* (WordPiece ids, top-`max_regions` regions by detector score, 5-D locations, float16
  features kept as float16); the collators pad and mask batches of these.
- `__call__(text=..., region_features=...)`: ad-hoc inference on one pair or a list of pairs, straight to padded
  model inputs.
- `__call__(text=..., images=...)`, with a detector (`BUTDDetector` + `BUTDImageProcessor`): images are decoded and
  detected (`detect_regions`, one image record per image, the extraction CLI's records), rounded to float16 as
  the datasets store them, and encoded as the dataset rows of those images would be (`encode_image_records`):
  the same model inputs, bit for bit, as the extraction CLI + `convert features` + `encode_record` + padding.

The 5-D location of a pixel box (x1, y1, x2, y2) in a W x H image is
`(x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H))` (ImageBERT, section 4.1).

Region inputs are checked where they enter (every path above): features must be finite; a box reaching at most
`BOX_TOLERANCE` (1 pixel, rounding) beyond its image is clamped to it, one farther out (locations outside [0, 1]) is
refused in one line naming the image, the box and the image size.

The detector half (`detect_regions`, `encode_image_records`, `images=`, and the detector's subfolder `detector/`
in `save_pretrained` / `from_pretrained`) is `ImageBertDetectionMixin` in `detection_imagebert.py`, a sibling file of
the remote-code unit that this class inherits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, BatchFeature, ProcessorMixin

from .configuration_imagebert import ImageBertConfig
from .detection_imagebert import ImageBertDetectionMixin, _DetectorPair, _load_detector

IGNORE_INDEX = -100


def to_numpy(value: Any, name: str, where: str, dtype: Any = None) -> np.ndarray:
    """Convert a list / numpy array / torch tensor to a numpy array (no copy when possible).

    `name` and `where` only serve the error message. Raises `ValueError` on ragged or non-numeric input.
    """
    if isinstance(value, torch.Tensor):
        array = value.detach().cpu().numpy()
    else:
        try:
            array = np.asarray(value)
        except ValueError as error:  # ragged nested lists
            raise ValueError(f"{name} of {where}: cannot be read as an array ({error})") from None
    if array.dtype == object:
        raise ValueError(f"{name} of {where}: expected numbers, got a ragged or non-numeric array")
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return array


def region_locations(boxes: np.ndarray, width: float, height: float) -> np.ndarray:
    """5-D locations of pixel boxes.

    Args:
        boxes: float [N, 4], pixel x1, y1, x2, y2.
        width, height: image size in pixels (> 0).

    Returns:
        float32 [N, 5]: (x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H)).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width, height = float(width), float(height)
    locations = np.empty((boxes.shape[0], 5), dtype=np.float64)
    locations[:, 0] = boxes[:, 0] / width
    locations[:, 1] = boxes[:, 1] / height
    locations[:, 2] = boxes[:, 2] / width
    locations[:, 3] = boxes[:, 3] / height
    locations[:, 4] = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (width * height)
    return locations.astype(np.float32)


# Pixels a box may overshoot its image and be clamped (boxes mapped back from a resized image, sizes rounded to
# whole pixels); farther out it belongs to another image size (a resized image, normalised boxes): refused.
BOX_TOLERANCE = 1.0


def _first_non_finite_row(features: np.ndarray) -> int | None:
    """The first row of `features` [N, F] holding a NaN or an infinity, or None. float16 is checked on its bits
    (all-ones exponent), about ten times faster than `np.isfinite`, which converts it first."""
    if features.size == 0:
        return None
    if features.dtype == np.float16:
        bad = (np.ascontiguousarray(features).view(np.uint16) & 0x7C00) == 0x7C00
    else:
        bad = ~np.isfinite(features)
    if not bad.any():
        return None
    return int(np.flatnonzero(bad.any(axis=1))[0])


def _boxes_inside_image(boxes: np.ndarray, width: float, height: float, where: str) -> np.ndarray:
    """`boxes` [N, 4] (pixel x1, y1, x2, y2) clamped to the W x H image when they reach at most `BOX_TOLERANCE`
    pixels beyond it; a box farther out is refused in one line naming it and the image size."""
    high = np.array([width, height, width, height])
    outside = ((boxes < -BOX_TOLERANCE) | (boxes > high + BOX_TOLERANCE)).any(axis=1)
    if outside.any():
        bad = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"region_boxes of {where}: box {bad} = {boxes[bad].tolist()} lies outside the {width:g} x {height:g} "
            f"image ({int(outside.sum())} such boxes); expected pixel coordinates within [0, {width:g}] x "
            f"[0, {height:g}] (boxes of a resized image or normalised ones need the matching image_width and "
            "image_height)"
        )
    return np.clip(boxes, 0.0, high)  # the identity for boxes inside


def top_region_indices(scores: np.ndarray, max_regions: int) -> np.ndarray:
    """Indices of the `max_regions` highest scores, score-descending; ties keep detector order (stable sort)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    return order[:max_regions]


class ImageBertProcessor(ImageBertDetectionMixin, ProcessorMixin):
    r"""
    Processor for ImageBERT: a WordPiece tokenizer (`BertTokenizerFast`) plus the region rules, and optionally a
    region detector so that it takes images.

    Args:
        tokenizer: a BERT WordPiece tokenizer.
        max_regions (`int`, 100): most regions kept per image (the top ones by detector score).
        max_text_length (`int`, 44): most text tokens, including [CLS] and [SEP]; longer captions are truncated.
        detector: None (inputs are region features), a `BUTDDetector`, or the folder / Hub id of one (loaded with
            `AutoModel`, its `preprocessor_config.json` with `AutoImageProcessor`).
        detector_processor: the detector's `BUTDImageProcessor` (resizing, and reading image files); required
            with a detector instance, read from the folder otherwise.

    `save_pretrained(dir)` writes the tokenizer files and `processor_config.json`, and the detector (config,
    weights, preprocessor_config.json, source files) into `dir/detector/`; `from_pretrained(dir)` and
    `AutoProcessor.from_pretrained(dir)` (once this module is imported, or with `trust_remote_code=True` without
    it) read them back.

    Example (one photograph, then the model):

    ```python
    >>> processor = ImageBertProcessor.from_pretrained("imagebert-base", detector="checkpoints/butd-vg")
    >>> inputs = processor(text=["a cat on a sofa"], images=["cat.jpg"])
    >>> score = model(**inputs).logits  # ImageBertForRetrieval; inputs.detections holds the boxes used
    ```
    """

    def __init__(
        self,
        tokenizer=None,
        max_regions: int = 100,
        max_text_length: int = 44,
        detector=None,
        detector_processor=None,
        **kwargs,
    ):
        if isinstance(max_regions, bool) or not isinstance(max_regions, int) or max_regions < 1:
            raise ValueError(f"max_regions must be an int >= 1 (regions kept per image), got {max_regions!r}")
        if isinstance(max_text_length, bool) or not isinstance(max_text_length, int) or max_text_length < 2:
            raise ValueError(
                f"max_text_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_text_length!r}"
            )
        self.max_regions = max_regions
        self.max_text_length = max_text_length
        self._detection: _DetectorPair | None = None
        super().__init__(tokenizer, **kwargs)
        if detector is not None or detector_processor is not None:
            self._detection = _load_detector(detector, detector_processor)

    # ------------------------------------------------------------------ one pair -> unpadded example

    def _tokenize(self, captions: Sequence[Any], wheres: Sequence[str]) -> list[list[int]]:
        """Token ids of each caption ([CLS] ... [SEP], truncated), in one batched call of the fast tokenizer."""
        _check_captions(captions, wheres)
        # split_special_tokens: a caption is text, so "[SEP]" or "[MASK]" in it becomes the word pieces of that
        # string, never the special id (data could otherwise inject separators, padding or masks).
        return self.tokenizer(
            list(captions), truncation=True, max_length=self.max_text_length, split_special_tokens=True
        )["input_ids"]

    def _encode_regions(
        self,
        where: str,
        features: Any,
        boxes: Any,
        width: Any,
        height: Any,
        scores: Any = None,
        classes: Any = None,
        keep_dtype: bool = True,
    ) -> dict[str, np.ndarray]:
        features = to_numpy(features, "region_features", where)
        if features.size == 0:
            features = features.reshape(0, features.shape[-1] if features.ndim == 2 else 0)
        if features.ndim != 2:
            raise ValueError(
                f"region_features of {where}: expected shape [N, F], got {tuple(features.shape)}"
            )
        if not keep_dtype or not np.issubdtype(features.dtype, np.floating):
            features = features.astype(np.float32)
        bad = _first_non_finite_row(features)
        if bad is not None:
            raise ValueError(
                f"region_features of {where}: NaN or infinity in region {bad}; expected finite values (one such "
                "region makes the image's embedding, and every score with it, NaN)"
            )
        n = features.shape[0]
        if boxes is None:
            raise ValueError(f"region_boxes of {where}: required with region_features")
        boxes = to_numpy(boxes, "region_boxes", where, np.float64)
        if boxes.size == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(
                f"region_boxes of {where}: expected shape [N, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}"
            )
        if boxes.shape[0] != n:
            raise ValueError(f"region_boxes of {where}: {boxes.shape[0]} boxes for {n} region_features")
        if not np.isfinite(boxes).all():
            raise ValueError(f"region_boxes of {where}: non-finite coordinates")
        if (boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any():
            bad = int(np.flatnonzero((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1]))[0])
            raise ValueError(
                f"region_boxes of {where}: box {bad} = {boxes[bad].tolist()} has x2 < x1 or y2 < y1"
            )
        for name, size in (("image_width", width), ("image_height", height)):
            if (
                isinstance(size, bool)
                or not isinstance(size, (int, float, np.number))
                or not 0 < size < np.inf
            ):
                raise ValueError(f"{name} of {where}: expected a positive number of pixels, got {size!r}")
        boxes = _boxes_inside_image(boxes, float(width), float(height), where)
        if classes is not None:
            classes = to_numpy(classes, "region_classes", where).reshape(-1)
            if classes.shape[0] != n:
                raise ValueError(
                    f"region_classes of {where}: {classes.shape[0]} classes for {n} region_features"
                )
            if classes.size and not np.issubdtype(classes.dtype, np.integer):
                raise ValueError(
                    f"region_classes of {where}: expected integer class ids, got {classes.dtype}"
                )
            classes = classes.astype(np.int64)
        if scores is not None:
            scores = to_numpy(scores, "region_scores", where, np.float64).reshape(-1)
            if scores.shape[0] != n:
                raise ValueError(
                    f"region_scores of {where}: {scores.shape[0]} scores for {n} region_features"
                )
            if not np.isfinite(scores).all():
                raise ValueError(f"region_scores of {where}: non-finite scores")
            keep = top_region_indices(scores, self.max_regions)
        elif n > self.max_regions:
            raise ValueError(
                f"region_scores of {where}: {n} regions exceed max_regions={self.max_regions}; pass region_scores so "
                f"the top {self.max_regions} by detector score can be kept"
            )
        else:
            keep = np.arange(n)
        encoded = {
            "region_features": features[keep],
            "region_locations": region_locations(boxes[keep], width, height),
        }
        if classes is not None:
            encoded["region_classes"] = classes[keep]
        return encoded

    def encode_record(
        self, record: Mapping[str, Any], index: int | None = None, *, _input_ids: list[int] | None = None
    ) -> dict[str, Any]:
        """Encode one dataset row (schema of `modeling_imagebert.data.schema`) into an unpadded example.

        Args:
            record: a row with image_id, caption, region_features [N, F], region_boxes [N, 4] (pixels),
                image_width, image_height, region_classes [N], region_scores [N], optional global_feature [G].
            index: the row index (with `dataset.map(processor.encode_record, with_indices=True)`); written as
                `example_index`, from which the collators derive their randomness. When None, the record's own
                `example_index` is kept if it has one.

        Returns:
            dict: image_id (str), input_ids (list[int], [CLS] ... [SEP], length <= max_text_length),
            region_features ([n, F], dtype kept, n = min(N, max_regions), score-descending),
            region_locations (float32 [n, 5]), region_classes (int64 [n]), example_index (int, when known),
            global_feature (float32 [G], when the record has one).
        """
        image_id = record.get("image_id")
        where = (
            f"record {index} (image_id {image_id!r})"
            if index is not None
            else f"record (image_id {image_id!r})"
        )
        if not isinstance(image_id, str) or not image_id:
            raise ValueError(f"image_id of {where}: expected a non-empty string")
        for column in ("region_features", "region_boxes", "image_width", "image_height", "region_classes"):
            if record.get(column) is None:
                raise ValueError(f"{column} of {where}: missing (see modeling_imagebert.data.schema)")
        if record.get("region_scores") is None:
            raise ValueError(f"region_scores of {where}: missing; needed to keep the top max_regions regions")
        input_ids = (
            _input_ids if _input_ids is not None else self._tokenize([record.get("caption")], [where])[0]
        )
        encoded: dict[str, Any] = {"image_id": image_id, "input_ids": input_ids}
        encoded.update(
            self._encode_regions(
                where,
                record["region_features"],
                record["region_boxes"],
                _scalar(record["image_width"]),
                _scalar(record["image_height"]),
                record["region_scores"],
                record["region_classes"],
            )
        )
        if record.get("global_feature") is not None:
            encoded["global_feature"] = to_numpy(
                record["global_feature"], "global_feature", where, np.float32
            ).reshape(-1)
        if index is not None:
            encoded["example_index"] = int(index)
        elif record.get("example_index") is not None:
            encoded["example_index"] = int(_scalar(record["example_index"]))
        return encoded

    def prepare_dataset(
        self, dataset, num_proc: int | None = None, remove_columns: bool = True, numpy_format: bool = True
    ):
        """Encode every row of a `datasets.Dataset` with `encode_record` (with a progress bar).

        Args:
            dataset: a dataset in the image-text schema.
            num_proc: worker processes for `Dataset.map`.
            remove_columns: drop the raw columns (caption, region_boxes, ...), keeping only the encoded example.
            numpy_format: return the dataset formatted as numpy with `dtype=None`, so the collators get float16
                region features as arrays (no per-row Python lists).

        Returns:
            `datasets.Dataset` of encoded examples, with `example_index` = row index; region_features stay float16.
        """
        from datasets import Array2D, Features, Sequence, Value

        source = dataset.features
        if "region_features" not in source:
            raise ValueError(
                f"prepare_dataset: the dataset has no region_features column (columns: {dataset.column_names})"
            )
        feature_type = source["region_features"]
        feature_dim = feature_type.shape[1] if isinstance(feature_type, Array2D) else None
        if feature_dim is None:
            raise ValueError(
                f"prepare_dataset: region_features must be Array2D((None, F), 'float16') (schema.image_text_features), "
                f"got {feature_type}"
            )
        columns = {
            "image_id": Value("string"),
            "input_ids": Sequence(Value("int32")),
            "region_features": Array2D(shape=(None, feature_dim), dtype=feature_type.dtype),
            "region_locations": Array2D(shape=(None, 5), dtype="float32"),
            "region_classes": Sequence(Value("int64")),
        }
        if "global_feature" in source:
            columns["global_feature"] = Sequence(Value("float32"))
        columns["example_index"] = Value("int64")
        if not remove_columns:
            columns = {**{k: v for k, v in source.items() if k not in columns}, **columns}
        encoded = dataset.map(
            self._encode_records,
            with_indices=True,
            batched=True,
            num_proc=num_proc,
            remove_columns=dataset.column_names if remove_columns else None,
            features=Features(columns),
            desc="ImageBERT encode",
        )
        return encoded.with_format("numpy", dtype=None) if numpy_format else encoded

    def _encode_records(self, batch: Mapping[str, list], indices: list[int]) -> dict[str, list]:
        """`encode_record` over a batch of rows (`Dataset.map(batched=True)`): the captions are tokenised in one
        batched call, then each row's regions are encoded."""
        size = len(indices)
        rows = [{name: values[i] for name, values in batch.items()} for i in range(size)]
        wheres = [
            f"record {index} (image_id {row.get('image_id')!r})"
            for index, row in zip(indices, rows, strict=True)
        ]
        token_ids = self._tokenize([row.get("caption") for row in rows], wheres)
        encoded = [
            self.encode_record(row, index, _input_ids=ids)
            for row, index, ids in zip(rows, indices, token_ids, strict=True)
        ]
        return {name: [example[name] for example in encoded] for name in encoded[0]} if encoded else {}

    # ------------------------------------------------------------------ padding

    def pad(
        self,
        examples: Sequence[Mapping[str, Any]],
        feature_dtype: torch.dtype = torch.float32,
        return_region_classes: bool = False,
        num_object_classes: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Pad encoded examples into model inputs: text to the longest caption, regions to the most regions.

        Values are checked where they enter: token ids must be integers in [0, len(tokenizer)) (examples may come
        pre-tokenised), region class ids integers >= 0 and, with `num_object_classes`, below it; an error names
        the example (position in the batch, image_id, example_index) and the field.

        Args:
            examples: B encoded examples (see `encode_record`); a modality is padded when every example has it
                (input_ids for text, region_features + region_locations for regions). Zero regions are allowed.
            feature_dtype: dtype of `region_features` (and `global_image_features`).
            return_region_classes: also return `region_classes` [B, R] long (-100 at padding).
            num_object_classes: when given, region class ids must lie in [0, num_object_classes).

        Returns:
            dict of tensors: input_ids, attention_mask, token_type_ids [B, T] long (T = longest caption);
            region_features [B, R, F] feature_dtype, region_locations [B, R, 5] float32, region_attention_mask
            [B, R] long (R = most regions in the batch); global_image_features [B, G] when every example has one.
        """
        if len(examples) == 0:
            raise ValueError("pad: got an empty list of examples")
        batch: dict[str, torch.Tensor] = {}
        size = len(examples)
        has_text = ["input_ids" in example for example in examples]
        has_regions = ["region_features" in example for example in examples]
        for name, flags in (("input_ids", has_text), ("region_features", has_regions)):
            if any(flags) and not all(flags):
                raise ValueError(f"pad: example {flags.index(False)} has no {name} while others have it")
        if all(has_text):
            ids = [
                to_numpy(example["input_ids"], "input_ids", f"example {i}").reshape(-1)
                for i, example in enumerate(examples)
            ]
            lengths = np.array([len(x) for x in ids])
            width = int(lengths.max())
            pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = np.full((size, width), pad_id, dtype=np.int64)
            vocabulary = len(self.tokenizer)
            for i, x in enumerate(ids):
                if x.size and not (
                    np.issubdtype(x.dtype, np.integer) and 0 <= x.min() and x.max() < vocabulary
                ):  # one vectorised test per example; the slow path only names the culprit
                    _check_ids(
                        x, "input_ids", _where(examples[i], i), vocabulary, "the tokenizer's vocabulary"
                    )
                input_ids[i, : len(x)] = x
            batch["input_ids"] = torch.from_numpy(input_ids)
            batch["attention_mask"] = (
                torch.arange(width)[None, :] < torch.from_numpy(lengths)[:, None]
            ).long()
            batch["token_type_ids"] = torch.zeros((size, width), dtype=torch.long)
        if all(has_regions):
            features = []
            locations = []
            for i, example in enumerate(examples):
                where = f"example {i} (image_id {example.get('image_id')!r})"
                feature = to_numpy(example["region_features"], "region_features", where)
                if feature.size == 0:
                    feature = feature.reshape(0, feature.shape[-1] if feature.ndim == 2 else 0)
                if feature.ndim != 2:
                    raise ValueError(
                        f"region_features of {where}: expected shape [N, F], got {tuple(feature.shape)}"
                    )
                location = to_numpy(
                    example.get("region_locations", np.zeros((0, 5))), "region_locations", where
                )
                location = location.reshape(-1, 5) if location.size == 0 else location
                if location.shape != (feature.shape[0], 5):
                    raise ValueError(
                        f"region_locations of {where}: expected shape ({feature.shape[0]}, 5), got {tuple(location.shape)}"
                    )
                features.append(feature)
                locations.append(location)
            counts = np.array([f.shape[0] for f in features])
            dims = {f.shape[1] for f in features if f.shape[0] > 0}
            if len(dims) > 1:
                raise ValueError(f"pad: examples have different region feature dimensions {sorted(dims)}")
            feature_dim = dims.pop() if dims else max(f.shape[1] for f in features)
            regions = int(counts.max())
            region_features = torch.zeros((size, regions, feature_dim), dtype=feature_dtype)
            region_locations = torch.zeros((size, regions, 5), dtype=torch.float32)
            for i, (feature, location) in enumerate(zip(features, locations, strict=True)):
                if feature.shape[0]:
                    region_features[i, : feature.shape[0]] = torch.from_numpy(np.ascontiguousarray(feature))
                    region_locations[i, : feature.shape[0]] = torch.from_numpy(
                        location.astype(np.float32, copy=False)
                    )
            batch["region_features"] = region_features
            batch["region_locations"] = region_locations
            batch["region_attention_mask"] = (
                torch.arange(regions)[None, :] < torch.from_numpy(counts)[:, None]
            ).long()
            if return_region_classes:
                classes = np.full((size, regions), IGNORE_INDEX, dtype=np.int64)
                for i, example in enumerate(examples):
                    if example.get("region_classes") is None:
                        raise ValueError(
                            f"region_classes of example {i} (image_id {example.get('image_id')!r}): missing"
                        )
                    value = to_numpy(example["region_classes"], "region_classes", f"example {i}").reshape(-1)
                    _check_ids(
                        value, "region_classes", _where(example, i), num_object_classes, "num_object_classes"
                    )
                    if value.shape[0] != counts[i]:
                        raise ValueError(
                            f"region_classes of example {i} (image_id {example.get('image_id')!r}): "
                            f"{value.shape[0]} classes for {counts[i]} regions"
                        )
                    classes[i, : counts[i]] = value
                batch["region_classes"] = torch.from_numpy(classes)
        globals_ = [example.get("global_feature") for example in examples]
        if all(g is not None for g in globals_):
            stacked = [
                to_numpy(g, "global_feature", f"example {i}", np.float32).reshape(-1)
                for i, g in enumerate(globals_)
            ]
            if len({g.shape[0] for g in stacked}) > 1:
                raise ValueError("pad: examples have global_feature of different sizes")
            batch["global_image_features"] = torch.from_numpy(np.stack(stacked)).to(feature_dtype)
        return batch

    # ------------------------------------------------------------------ ad-hoc inference

    def __call__(
        self,
        text: str | list[str] | None = None,
        region_features: Any = None,
        region_boxes: Any = None,
        image_width: int | list[int] | None = None,
        image_height: int | list[int] | None = None,
        region_scores: Any = None,
        region_classes: Any = None,
        return_tensors: str | None = "pt",
        *,
        images: Any = None,
    ) -> BatchFeature:
        """Padded model inputs for one (caption, image) pair or a list of pairs.

        Args:
            text: a caption or a list of B captions (None for regions only).
            region_features: [N, F] for one image, or a list of B arrays [N_i, F] (or a [B, N, F] array);
                None for text only.
            region_boxes: pixel boxes, [N, 4] or a list of B arrays [N_i, 4].
            image_width, image_height: pixels; one number, or a list of B numbers.
            region_scores: optional detector scores [N] (or a list); needed when an image has more than
                `max_regions` regions, to keep the top ones.
            region_classes: optional detector classes [N] (or a list); only checked against N.
            return_tensors: "pt" (the only supported value).
            images: instead of the region arguments, with a detector: one image or a list of B images (paths,
                `file://` URLs of local files, PIL images, RGB arrays; see `detect_regions`), detected and encoded
                by `encode_image_records`: region features rounded to float16 as the datasets store them, so the
                inputs equal those of the extraction CLI + `convert features` route bit for bit.

        Returns:
            `BatchFeature` (a dict with `.to(device)`) of torch tensors: input_ids, attention_mask, token_type_ids
            [B, T] when text is given;
            region_features [B, R, F] float32, region_locations [B, R, 5], region_attention_mask [B, R] when
            regions are given. A single pair gives B = 1. With `images=`, its `detections` attribute (not a key,
            so `model(**inputs)` works) holds each image's kept boxes, classes and scores (see
            `encode_image_records`).
        """
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors: only 'pt' is supported, got {return_tensors!r}")
        if images is not None:
            region_inputs = {
                "region_features": region_features,
                "region_boxes": region_boxes,
                "image_width": image_width,
                "image_height": image_height,
                "region_scores": region_scores,
                "region_classes": region_classes,
            }
            return self._encode_images(text, images, region_inputs)
        if text is None and region_features is None:
            raise ValueError("ImageBertProcessor: pass text, region_features (or images), or both")
        texts = _as_texts(text)
        regions = None
        if region_features is not None:
            regions = _split_batch(region_features, item_ndim=2, name="region_features")
            size = len(regions)
            boxes = _split_batch(region_boxes, item_ndim=2, name="region_boxes", size=size)
            widths = _split_scalars(image_width, "image_width", size)
            heights = _split_scalars(image_height, "image_height", size)
            scores = _split_batch(region_scores, item_ndim=1, name="region_scores", size=size, optional=True)
            classes = _split_batch(
                region_classes, item_ndim=1, name="region_classes", size=size, optional=True
            )
            if texts is not None and len(texts) != size:
                raise ValueError(f"text has {len(texts)} items but region_features has {size}")
            regions = [
                self._encode_regions(
                    f"item {i}",
                    regions[i],
                    boxes[i],
                    widths[i],
                    heights[i],
                    scores[i],
                    classes[i],
                    keep_dtype=False,
                )
                for i in range(size)
            ]
        else:
            for name, value in (("region_boxes", region_boxes), ("region_scores", region_scores)):
                if value is not None:
                    raise ValueError(f"{name} given without region_features")
        size = len(texts) if texts is not None else len(regions)
        examples: list[dict[str, Any]] = [{} for _ in range(size)]
        if texts is not None:
            for example, ids in zip(
                examples, self._tokenize(texts, [f"item {i}" for i in range(size)]), strict=True
            ):
                example["input_ids"] = ids
        for i in range(size):
            if regions is not None:
                examples[i].update(regions[i])
        return BatchFeature(data=self.pad(examples))

    def batch_decode(self, *args, **kwargs):
        """Forwarded to the tokenizer's `batch_decode`."""
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args, **kwargs):
        """Forwarded to the tokenizer's `decode`."""
        return self.tokenizer.decode(*args, **kwargs)


def _as_texts(text: Any) -> list[str] | None:
    """`text` as a list of captions (None stays None); the captions themselves are checked when tokenised."""
    if text is None:
        return None
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)):
        if not text:
            raise ValueError("text: got an empty list")
        return list(text)
    raise ValueError(f"text: expected a string or a list of strings, got {type(text).__name__}")


def _check_captions(captions: Sequence[Any], wheres: Sequence[str]) -> None:
    """Raises ValueError unless every caption is a non-empty string."""
    for caption, where in zip(captions, wheres, strict=True):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption of {where}: expected a non-empty string, got {caption!r}")


def _where(example: Mapping[str, Any], position: int) -> str:
    """How an error names an example: its position in the batch, image_id and example_index when known."""
    parts = [f"image_id {example.get('image_id')!r}"] if example.get("image_id") is not None else []
    if example.get("example_index") is not None:
        parts.append(f"example_index {_scalar(example['example_index'])}")
    return f"example {position}" + (f" ({', '.join(parts)})" if parts else "")


def _check_ids(values: np.ndarray, name: str, where: str, limit: int | None, limit_name: str) -> None:
    """Raises ValueError unless `values` are whole numbers in [0, limit) (limit None: >= 0 only)."""
    if values.size == 0:
        return
    if not np.issubdtype(values.dtype, np.integer):
        whole = (
            np.issubdtype(values.dtype, np.number)
            and np.isfinite(values).all()
            and (np.mod(values, 1) == 0).all()
        )
        if not whole:
            bad = (
                values[~np.isfinite(values) | (np.mod(values, 1) != 0)][0]
                if np.issubdtype(values.dtype, np.number)
                else values[0]
            )
            raise ValueError(
                f"{name} of {where}: expected integer ids, got {_scalar(bad)!r} ({values.dtype})"
            )
    out = (values < 0) if limit is None else (values < 0) | (values >= limit)
    if out.any():
        position = int(np.flatnonzero(out)[0])
        bound = ">= 0" if limit is None else f"in [0, {limit}) ({limit_name})"
        raise ValueError(
            f"{name} of {where}: id {_scalar(values[position])!r} at position {position} is not {bound}"
        )


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return value.item()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _split_batch(
    value: Any, item_ndim: int, name: str, size: int | None = None, optional: bool = False
) -> list:
    """Split a per-image argument into a list of per-image values (one image -> list of one)."""
    if value is None:
        if optional:
            return [None] * (size if size is not None else 1)
        raise ValueError(f"{name}: required with region_features")
    if isinstance(value, (np.ndarray, torch.Tensor)):
        items = [value] if value.ndim == item_ndim else list(value)
    elif isinstance(value, (list, tuple)):
        if len(value) == 0:
            items = [value] if size == 1 else []
        else:
            first = (
                to_numpy(value[0], name, "item 0")
                if not isinstance(value[0], (int, float))
                else np.asarray(0.0)
            )
            items = [value] if first.ndim == item_ndim - 1 else list(value)
    else:
        raise ValueError(f"{name}: expected an array or a list of arrays, got {type(value).__name__}")
    if size is not None and len(items) != size:
        raise ValueError(f"{name} has {len(items)} items but region_features has {size}")
    return items


def _split_scalars(value: Any, name: str, size: int) -> list:
    if value is None:
        raise ValueError(f"{name}: required with region_features")
    if isinstance(value, (np.ndarray, torch.Tensor)) and value.ndim > 0:
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != size:
            raise ValueError(f"{name} has {len(value)} items but region_features has {size}")
        return [_scalar(v) for v in value]
    if size != 1:
        raise ValueError(f"{name}: one number given for {size} images; pass a list of {size}")
    return [_scalar(value)]


AutoProcessor.register(ImageBertConfig, ImageBertProcessor, exist_ok=True)
# `save_pretrained` writes the AutoProcessor entry of `auto_map` and copies this file (and its relative imports:
# the config's, detection_imagebert.py) beside the tokenizer, so `AutoProcessor.from_pretrained(folder,
# trust_remote_code=True)` works without this package.
ImageBertProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "ImageBertProcessor",
    "region_locations",
    "top_region_indices",
]
