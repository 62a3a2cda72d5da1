"""The detector half of `ImageBertProcessor`: images -> image records (`detect_regions`) -> model inputs
(`encode_image_records`), and the detector's place in the processor's folder (save, load).

`ImageBertProcessor` inherits `ImageBertDetectionMixin`; the record helpers (`detection_to_record`,
`round_features_as_stored`) are also what the extraction runner and the feature shards use, so a model fed straight
from a detector sees the inputs of the extraction CLI + `convert features` + `encode_record` route, bit for bit.

The detector is saved inside the processor's folder, in the subfolder `detector/` (its config, weights,
`preprocessor_config.json` and, as remote code, its source files); `processor_config.json` names the subfolder
(`"detector_subfolder"`) and `from_pretrained` loads it back through `AutoModel` / `AutoImageProcessor`. Beside
them, `preprocessor_config.json` names `ImageBertImageProcessor` (`image_processing_imagebert.py`), the processor's
image half, which transformers' pipelines load (see docs/pipelines.md).

Part of the remote-code unit: it imports only torch, transformers, huggingface_hub, numpy and its siblings;
`processing_imagebert.py` imports it, so `save_pretrained` copies it beside the processor's file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel, BatchFeature

# Where `save_pretrained` puts the detector inside the processor's folder.
DETECTOR_SUBFOLDER = "detector"
# The datasets store region features as float16 (`Array2D(..., "float16")`); see `round_features_as_stored`.
STORED_FEATURE_DTYPE = np.float16


def round_features_as_stored(features: np.ndarray) -> np.ndarray:
    """Region features as a features folder and an image-text dataset store them: float16, rounded to nearest by
    numpy's cast. The extraction runner writes its shards with this function and the processor rounds detections
    with it, so a model fed straight from a detector sees the values it was trained on."""
    with np.errstate(over="ignore"):
        return np.asarray(features).astype(STORED_FEATURE_DTYPE)


def detection_to_record(image_id: str, detection: Mapping, global_feature: np.ndarray | None = None) -> dict:
    """One image's detector output (a `BUTDDetector.detect` dict) -> an image record with float32 features: what
    the extraction runner stores (features rounded to float16 on write) and what `detect_regions` returns.

    Returns:
        {"image_id", "image_width", "image_height", "region_features" float32 (N, F), "region_boxes" float32
        (N, 4), "region_classes" int32 (N,), "region_scores" float32 (N,), "region_attributes" int32 (N,),
        "region_attribute_scores" float32 (N,)[, "global_feature" float32 (G,)]}.
    """
    record = {
        "image_id": image_id,
        "image_width": int(detection["image_width"]),
        "image_height": int(detection["image_height"]),
        "region_features": np.asarray(detection["features"], dtype=np.float32),
        "region_boxes": np.asarray(detection["boxes"], dtype=np.float32).reshape(-1, 4),
        "region_classes": np.asarray(detection["classes"]).astype(np.int32),
        "region_scores": np.asarray(detection["scores"], dtype=np.float32),
        "region_attributes": np.asarray(detection["attributes"]).astype(np.int32),
        "region_attribute_scores": np.asarray(detection["attribute_scores"], dtype=np.float32),
    }
    if global_feature is not None:
        record["global_feature"] = np.asarray(global_feature, dtype=np.float32)
    return record


class _DetectorPair:
    """The detector and its image processor, kept out of `ProcessorMixin.to_dict`, which deep-copies every
    attribute in `__dict__` before it picks the ones to write: a deep copy of this object is the object itself, so
    saving or printing a processor never copies the detector's weights. (A copied processor shares its detector.)"""

    __slots__ = ("detector", "image_processor")

    def __init__(self, detector, image_processor):
        self.detector = detector
        self.image_processor = image_processor

    def __deepcopy__(self, memo):
        return self


class ImageBertDetectionMixin:
    """The detector methods of `ImageBertProcessor` (a `ProcessorMixin`, which comes after this class in its
    bases, so `super()` here is `ProcessorMixin`): the `detector` / `detector_processor` properties,
    `detect_regions`, `encode_image_records`, `__call__(images=...)`, and the detector's part of `to_dict`,
    `save_pretrained`, `from_dict` and `from_pretrained`. The host class sets `self._detection` (a `_DetectorPair`
    or None) and provides `max_regions`, `_encode_regions`, `_tokenize` and `pad`."""

    _detection: _DetectorPair | None

    @property
    def detector(self):
        """The region detector (`BUTDDetector`), or None when the processor takes region features only."""
        return None if self._detection is None else self._detection.detector

    @property
    def detector_processor(self):
        """The detector's image processor (`BUTDImageProcessor`), or None."""
        return None if self._detection is None else self._detection.image_processor

    def to_dict(self) -> dict[str, Any]:
        """`processor_config.json`'s content: the settings, and `detector_subfolder` when there is a detector
        (never the detector itself)."""
        output = super().to_dict()
        if self._detection is not None:
            output["detector_subfolder"] = DETECTOR_SUBFOLDER
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the tokenizer and `processor_config.json` into `save_directory`, and the detector with its image
        processor into `save_directory/detector/` (first, so a processor config that names the subfolder always
        finds it), then the `preprocessor_config.json` of `ImageBertImageProcessor` (this processor's image half,
        what transformers' pipelines load with `AutoImageProcessor`)."""
        if self._detection is None:
            return super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        if push_to_hub:
            # ProcessorMixin uploads only the files its own save wrote; `push_to_hub` saves everything (the
            # detector subfolder included) into a temporary folder and uploads all of it.
            self.save_pretrained(save_directory)
            repo_id = kwargs.pop("repo_id", os.path.basename(os.path.normpath(str(save_directory))))
            return self.push_to_hub(repo_id, **kwargs)
        # Imported here: the image processor wraps the processor, which imports this module (circular otherwise).
        from .image_processing_imagebert import ImageBertImageProcessor

        folder = os.path.join(save_directory, DETECTOR_SUBFOLDER)
        self.detector.save_pretrained(folder)
        self.detector_processor.save_pretrained(folder)
        saved = super().save_pretrained(save_directory, **kwargs)
        # The image half for transformers' pipelines, which load an image processor and a tokenizer, not this.
        ImageBertImageProcessor(self).save_config(save_directory)
        return saved

    @classmethod
    def from_dict(cls, processor_dict: dict[str, Any], **kwargs):
        """As `ProcessorMixin.from_dict`; `detector_subfolder` is not a setting but where `from_pretrained` finds
        the detector, so it is kept aside for it."""
        processor_dict = dict(processor_dict)
        subfolder = processor_dict.pop("detector_subfolder", None)
        loaded = super().from_dict(processor_dict, **kwargs)
        processor = loaded[0] if isinstance(loaded, tuple) else loaded
        processor._saved_detector_subfolder = subfolder
        return loaded

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, detector=None, detector_processor=None, **kwargs):
        """Load a saved processor (a folder or a Hub id), with its saved detector when it has one.

        Args:
            pretrained_model_name_or_path: the folder or Hub id.
            detector: None (the saved detector, if any), or a `BUTDDetector` or the folder / Hub id of one, used
                instead.
            detector_processor: the detector's `BUTDImageProcessor`, instead of the saved one.
            kwargs: as `ProcessorMixin.from_pretrained` (cache_dir, revision, token, local_files_only,
                subfolder, trust_remote_code: the detector is loaded with the caller's `trust_remote_code`).
        """
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        saved = processor.__dict__.pop("_saved_detector_subfolder", None)
        trust_remote_code = kwargs.get("trust_remote_code")
        if detector is None and detector_processor is None and saved is not None:
            detector = _saved_detector_folder(pretrained_model_name_or_path, saved, kwargs)
        if detector is not None or detector_processor is not None:
            processor._detection = _load_detector(detector, detector_processor, trust_remote_code)
        return processor

    def _require_detector(self, what: str) -> _DetectorPair:
        if self._detection is None:
            raise ValueError(
                f"{what}: this processor has no detector; build it with ImageBertProcessor(tokenizer, "
                "detector=..., detector_processor=...) or from_pretrained(..., detector=FOLDER), or pass "
                "region_features"
            )
        return self._detection

    def detect_regions(
        self, images: Any, image_ids: Sequence[str] | None = None, batch_size: int = 8, *, exact: bool = True
    ) -> list[dict]:
        """Detect the regions of images: one image record per image, as the extraction CLI writes them.

        Images are read `batch_size` at a time with the CLI's decoder (`BUTDImageProcessor.load_image`: EXIF
        orientation, alpha on white, 16-bit scaling, the pixel limit) and detected together on the detector's
        device under `torch.no_grad()`.

        Args:
            images: one image or a list: paths, `file://` URLs of local files, PIL images, RGB uint8 arrays
                (H, W, 3) or encoded bytes. Other URLs are refused (no network access).
            image_ids: one id per image; default: the file name without extension for paths (the CLI's
                `--id-style stem`), the position in `images` ("0", "1", ...) otherwise.
            batch_size: images decoded and handed to the detector at once.
            exact: each image goes through the detector's network alone (its default, and the CLI's), so its
                record is bit for bit the CLI's whatever the batch; False lets same-size images share the
                network's batches (faster on a GPU, features within 1e-4).

        Returns:
            list of records (`detection_to_record`): image_id, image_width, image_height, region_features float32
            [N, F], region_boxes float32 [N, 4] (pixels x1, y1, x2, y2), region_classes int32 [N],
            region_scores float32 [N], region_attributes int32 [N], region_attribute_scores float32 [N].

        Raises:
            ValueError (one line naming the image) for an image the CLI would skip: unreadable, not an image,
            truncated, too small, too many pixels, or a URL other than `file://`.
        """
        pair = self._require_detector("detect_regions")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not images:
            raise ValueError("images: got an empty list")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        paths = [pair.image_processor.local_image_path(image) for image in images]  # refuses URLs up front
        if image_ids is None:
            image_ids = [str(i) if path is None else path.stem for i, path in enumerate(paths)]
        else:
            image_ids = [str(image_id) for image_id in image_ids]
            if len(image_ids) != len(images):
                raise ValueError(f"image_ids has {len(image_ids)} items but images has {len(images)}")
        records = []
        for start in range(0, len(images), batch_size):
            positions = range(start, min(start + batch_size, len(images)))
            names = [str(paths[i]) if paths[i] is not None else f"image {i}" for i in positions]
            pixels = [
                pair.image_processor.load_image(images[i], name)
                for i, name in zip(positions, names, strict=True)
            ]
            with torch.no_grad():
                detections = pair.detector.detect(
                    pixels,
                    processor=pair.image_processor,
                    batch_size=batch_size,
                    names=names,
                    batch_invariant=exact,
                )
            records += [
                detection_to_record(image_ids[i], d) for i, d in zip(positions, detections, strict=True)
            ]
        return records

    def encode_image_records(self, records: Sequence[Mapping[str, Any]], text: str | list[str] | None = None):
        """Padded model inputs from image records (`detect_regions`' output, or rows of a features folder) and
        optionally one caption per image: exactly what `encode_record` and padding make of the dataset rows of
        those images.

        Region features are first rounded to float16 as the features folder and the datasets store them
        (`round_features_as_stored`), then given to the model as float32, so a model sees the values it was
        trained on; the top `max_regions` regions by score are kept, score-descending (ties in detector order).

        Returns:
            `BatchFeature` with region_features [B, R, F] float32, region_locations [B, R, 5], region_attention_mask
            [B, R] (and input_ids, attention_mask, token_type_ids [B, T] with text), as `__call__`. The regions
            used are in its `detections` attribute, not among its keys, so `model(**inputs)` still works: one dict
            per image with image_id, image_width, image_height, and the kept regions' boxes float32 [n, 4] (pixels
            x1, y1, x2, y2), classes int32 [n] and scores float32 [n], row i being region token i.
        """
        # Imported here: `processing_imagebert` imports this module (its processor inherits the mixin), so a
        # module-level import would be circular. The region rules (locations, top regions) stay in one place.
        from .processing_imagebert import _as_texts, _scalar, to_numpy, top_region_indices

        texts = _as_texts(text)
        if texts is not None and len(texts) != len(records):
            raise ValueError(f"text has {len(texts)} items but images has {len(records)}")
        examples: list[dict[str, Any]] = []
        detections = []
        for i, record in enumerate(records):
            where = f"image {i} (image_id {record.get('image_id')!r})"
            features = round_features_as_stored(
                to_numpy(record.get("region_features"), "region_features", where)
            )
            if features.size and not np.isfinite(features).all():
                raise ValueError(
                    f"region_features of {where}: NaN, infinity or values beyond the float16 range "
                    "(the datasets could not store them)"
                )
            scores = record.get("region_scores")
            examples.append(
                self._encode_regions(
                    where,
                    features,
                    record.get("region_boxes"),
                    _scalar(record.get("image_width")),
                    _scalar(record.get("image_height")),
                    scores,
                    record.get("region_classes"),
                    keep_dtype=False,
                )
            )
            # The same rule `_encode_regions` applied, for the boxes, classes and scores of the kept regions.
            keep = top_region_indices(scores, self.max_regions) if scores is not None else slice(None)
            detection = {
                "image_id": record.get("image_id"),
                "image_width": int(_scalar(record["image_width"])),
                "image_height": int(_scalar(record["image_height"])),
                "boxes": np.asarray(record["region_boxes"], dtype=np.float32).reshape(-1, 4)[keep],
            }
            for name, column in (("classes", "region_classes"), ("scores", "region_scores")):
                if record.get(column) is not None:
                    detection[name] = np.asarray(record[column]).reshape(-1)[keep]
            detections.append(detection)
        if texts is not None:
            for example, ids in zip(
                examples, self._tokenize(texts, [f"item {i}" for i in range(len(texts))]), strict=True
            ):
                example["input_ids"] = ids
        inputs = BatchFeature(data=self.pad(examples))
        inputs.detections = detections
        return inputs

    def _encode_images(self, text: Any, images: Any, region_inputs: Mapping[str, Any]) -> BatchFeature:
        """`__call__(text, images=...)`: refuses region inputs beside images, checks the captions, then detects
        and encodes (`detect_regions`, `encode_image_records`)."""
        from .processing_imagebert import _as_texts, _check_captions  # circular at module level, as above

        given = [name for name, value in region_inputs.items() if value is not None]
        if given:
            raise ValueError(f"pass images or region inputs, not both (got images and {', '.join(given)})")
        texts = _as_texts(text)
        self._require_detector("images")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if texts is not None:  # checked before any detection
            if len(texts) != len(images):
                raise ValueError(f"text has {len(texts)} items but images has {len(images)}")
            _check_captions(texts, [f"item {i}" for i in range(len(texts))])
        return self.encode_image_records(self.detect_regions(images), texts)


def _load_detector(
    detector: Any, image_processor: Any, trust_remote_code: bool | None = None
) -> _DetectorPair:
    """The (detector, image processor) pair from instances or a folder / Hub id (`AutoModel` and
    `AutoImageProcessor`, with the caller's `trust_remote_code`). One-line `ValueError`s for what is missing."""
    if detector is None:
        raise ValueError("detector_processor given without a detector")
    if isinstance(detector, (str, os.PathLike)):
        source = os.fspath(detector)
        if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(
                f"detector {source}: no config.json; expected a folder written by save_pretrained"
            )
        options = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
        detector = AutoModel.from_pretrained(source, **options).eval()
        if image_processor is None:
            if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "preprocessor_config.json")):
                raise ValueError(
                    f"detector {source}: no preprocessor_config.json; pass detector_processor=BUTDImageProcessor()"
                )
            image_processor = AutoImageProcessor.from_pretrained(source, **options)
    if image_processor is None:
        raise ValueError(
            "detector_processor: required with a detector instance (e.g. BUTDImageProcessor() for the original "
            "resizing), or pass the detector as a folder"
        )
    if not callable(getattr(detector, "detect", None)):
        raise ValueError(f"detector: expected a BUTDDetector (with .detect), got {type(detector).__name__}")
    for method in ("load_image", "local_image_path"):
        if not callable(getattr(image_processor, method, None)):
            raise ValueError(
                f"detector_processor: expected a BUTDImageProcessor (with .{method}), got "
                f"{type(image_processor).__name__}"
            )
    return _DetectorPair(detector, image_processor)


_SUBFOLDER_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def _saved_detector_folder(root: str | os.PathLike, name: Any, kwargs: Mapping[str, Any]) -> str:
    """The local folder of a saved processor's detector: `root/[subfolder/]name`, downloaded first (that subfolder
    only) when `root` is a Hub id. Remote code does not load from a `subfolder=` (transformers looks for the code
    files at the repository's root), so the detector is always loaded from a local folder."""
    if not isinstance(name, str) or not _SUBFOLDER_NAME.match(name):
        raise ValueError(f"processor_config.json: detector_subfolder must be a folder name, got {name!r}")
    prefix = kwargs.get("subfolder") or ""
    relative = f"{prefix.strip('/')}/{name}" if prefix else name
    if os.path.isdir(root):
        return os.path.join(root, relative)
    from huggingface_hub import snapshot_download

    snapshot = snapshot_download(
        str(root),
        allow_patterns=[f"{relative}/*"],
        revision=kwargs.get("revision"),
        cache_dir=kwargs.get("cache_dir"),
        token=kwargs.get("token"),
        local_files_only=bool(kwargs.get("local_files_only", False)),
        force_download=bool(kwargs.get("force_download", False)),
    )
    return os.path.join(snapshot, relative)
