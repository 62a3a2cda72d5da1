"""From image records or image files to what the retriever's index holds: padded region tensors and embeddings.

`encode_and_embed` is the one path: records (the dataset schema, or a detector's output) -> `encode_images` (the
processor keeps the top regions and builds the locations) -> `embed_images` (one unimodal pass per image).
`ImageBertRetriever.index` runs it once over a collection; `embed_image_files` runs it over image files in batches,
after the processor's detector (`processor.detect_regions`) has turned each batch into records:

    files -> detect_regions (batch) -> records -> encode_and_embed -> (region tensors, embeddings) -> cache file

With a cache folder each batch is written atomically as one safetensors file as soon as it is embedded, in a
subfolder keyed by everything the result depends on (the model's fingerprint, the processor's settings and its
detector's fingerprint, the files and their ids, the batch size, bf16). A run killed at any moment leaves only whole
batch files (and temporaries of a dead process, removed by the next run); the next run with the same arguments loads
them, computes the rest, and ends with the same tensors as an uninterrupted run, bit for bit: every batch is computed
from the same inputs in the same grouping. A damaged batch file is reported and recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes, remove_stale_temporaries_in
from ..features.sources import list_folder
from ..processing_imagebert import ImageBertProcessor
from ..safe_loading import load_safetensors_file, open_safetensors
from .evaluation import encode_images, model_fingerprint
from .two_stage import embed_images

_CACHE_FORMAT = 1
_CACHE_PREFIX = "index-images-"
IMAGE_TENSORS = ("region_features", "region_locations", "region_attention_mask", "global_image_features")


def detector_fingerprint(processor) -> str | None:
    """sha256 (hex) of the processor's detector (class, config, weights: `model_fingerprint`) and of its image
    processor's settings (resizing), or None when the processor has no detector. Images indexed from files depend on
    them: another detector finds other regions."""
    detector = getattr(processor, "detector", None)
    if detector is None:
        return None
    digest = hashlib.sha256(model_fingerprint(detector).encode())
    image_processor = getattr(processor, "detector_processor", None)
    if image_processor is not None and hasattr(image_processor, "to_json_string"):
        digest.update(image_processor.to_json_string().encode())
    return digest.hexdigest()


def processor_settings(processor, *, with_detector: bool = False) -> dict[str, Any]:
    """The processor settings an embedding depends on (recorded beside saved indexes and cached batches);
    `with_detector`: also its detector's fingerprint (`detector_fingerprint`), for images indexed from files."""
    settings: dict[str, Any] = {
        "max_regions": int(getattr(processor, "max_regions", 0)),
        "max_text_length": int(getattr(processor, "max_text_length", 0)),
    }
    if with_detector:
        settings["detector"] = detector_fingerprint(processor)
    return settings


def encode_and_embed(
    model: torch.nn.Module,
    processor,
    records: Iterable[tuple[int, Mapping[str, Any]]],
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Region tensors and embeddings of images given as records.

    Args:
        model: `ImageBertForRetrieval` or `ImageBertForPreTraining`, in eval mode.
        processor: its `ImageBertProcessor`.
        records: (row index, record) pairs, one per image, in the schema of `modeling_imagebert.data.schema`.
        batch_size, bf16, device: of `embed_images`.

    Returns:
        (images, embeddings): region_features [I, R, F] float32, region_locations [I, R, 5], region_attention_mask
        [I, R] (and global_image_features [I, G] when the model uses them); embeddings float32 [I, projection_dim].
    """
    images = encode_images(
        records,
        processor,
        use_global_image_feature=bool(getattr(model.config, "use_global_image_feature", False)),
        feature_dtype=torch.float32,
    )
    return images, embed_images(model, images, batch_size=batch_size, bf16=bf16, device=device)


def concatenate_images(parts: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Padded region tensors of several batches as one, padded with zeros to the most regions of any batch (the
    processor pads with zeros too, so this equals encoding every record at once)."""
    regions = max(part["region_attention_mask"].shape[1] for part in parts)
    out = {}
    for name in IMAGE_TENSORS:
        if name not in parts[0]:
            continue
        tensors = []
        for part in parts:
            tensor = part[name]
            if name != "global_image_features" and tensor.shape[1] < regions:
                padding = [0, 0] * (tensor.ndim - 2) + [0, regions - tensor.shape[1]]
                tensor = torch.nn.functional.pad(tensor, padding)
            tensors.append(tensor)
        out[name] = torch.cat(tensors)
    return out


def list_image_files(
    paths: str | os.PathLike | Sequence[str | os.PathLike], image_ids: Sequence[str] | None = None
) -> list[tuple[str, str]]:
    """(image id, path) of every image to index, in order.

    Args:
        paths: a folder (its image files, recursively, sorted by relative path, as the extraction CLI lists them),
            one image file, or a sequence of files and folders.
        image_ids: ids for the listed files, in order (default: a file's name without extension, as the
            extraction CLI's default id style).

    Returns:
        (image_id, path) pairs; ids are unique (a duplicate is refused, naming both files).
    """
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"index_images: expected image file or folder paths, got {type(item).__name__}")
        if Path(item).is_dir():
            files.extend((ref.image_id, str(ref.path)) for ref in list_folder(item))
        elif Path(item).is_file():
            files.append((Path(item).stem, str(item)))
        else:
            raise FileNotFoundError(f"index_images: {item}: no such image file or folder")
    if image_ids is not None:
        image_ids = [str(image_id) for image_id in image_ids]
        if len(image_ids) != len(files):
            raise ValueError(f"index_images: {len(image_ids)} image_ids for {len(files)} image files")
        files = [(image_id, path) for image_id, (_, path) in zip(image_ids, files, strict=True)]
    if not files:
        raise ValueError(f"index_images: no image files in {paths}")
    seen: dict[str, str] = {}
    for image_id, path in files:
        if image_id in seen:
            raise ValueError(
                f"index_images: duplicate image_id {image_id!r}: {seen[image_id]} and {path}; pass image_ids=... "
                "or give the files distinct names"
            )
        seen[image_id] = path
    return files


class BatchCache:
    """One folder per (model, processor, files, settings) key under `cache_dir`; one safetensors file per batch
    holding its image ids, region tensors and embeddings."""

    def __init__(self, cache_dir: str | os.PathLike, meta: dict[str, Any]):
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        self.folder = Path(cache_dir) / f"{_CACHE_PREFIX}{key[:24]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        # A run killed while writing a batch leaves its temporary file (see modeling_imagebert.atomic).
        for stale in remove_stale_temporaries_in(self.folder):
            warnings.warn(f"removed {stale}, left by an interrupted index_images run", stacklevel=3)
        atomic_write_bytes(self.folder / "meta.json", json.dumps(meta, indent=2, sort_keys=True).encode())

    def path(self, batch: int) -> Path:
        return self.folder / f"batch-{batch:06d}.safetensors"

    def load(self, batch: int, image_ids: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor] | None:
        """The cached (images, embeddings) of `batch`, or None when absent or damaged (after a warning)."""
        path = self.path(batch)
        if not path.is_file():
            return None
        try:
            with open_safetensors(path, "a cached batch of image embeddings") as handle:
                stored_ids = json.loads((handle.metadata() or {}).get("image_ids", "null"))
            if stored_ids != image_ids:
                raise ValueError("holds other images")
            tensors = load_safetensors_file(path, "a cached batch of image embeddings")
            embeds = tensors.pop("image_embeds")
            images = {name: tensors[name] for name in IMAGE_TENSORS if name in tensors}
            if embeds.shape[0] != len(image_ids) or any(
                t.shape[0] != len(image_ids) for t in images.values()
            ):
                raise ValueError("holds tensors of the wrong length")
            if not torch.isfinite(embeds).all():
                raise ValueError("holds non-finite embeddings")
        except Exception as error:  # a damaged file is recomputed, never trusted
            warnings.warn(f"ignoring cached batch {path} ({error}); recomputing it", stacklevel=3)
            return None
        return images, embeds

    def save(
        self, batch: int, image_ids: list[str], images: Mapping[str, torch.Tensor], embeds: torch.Tensor
    ):
        from safetensors.torch import save

        tensors = {name: tensor.contiguous() for name, tensor in images.items()}
        tensors["image_embeds"] = embeds.contiguous()
        atomic_write_bytes(self.path(batch), save(tensors, {"image_ids": json.dumps(image_ids)}))


def embed_image_files(
    model: torch.nn.Module,
    processor,
    files: Sequence[tuple[str, str]],
    *,
    batch_size: int = 32,
    model_batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Region tensors and embeddings of image files, through the processor's detector, in batches.

    Args:
        model: the retriever's model, in eval mode.
        processor: an `ImageBertProcessor` with a detector: `processor.detect_regions(images, image_ids=...)`
            returns one image record per image (the keys of `features.runner.detection_to_record`).
        files: (image_id, path) pairs (`list_image_files`).
        batch_size: images per detection call and per cache file.
        model_batch_size, bf16, device: of `embed_images`.
        cache_dir: write each batch there as it is done, and reuse the batches a previous run wrote.
        progress: a tqdm bar over the images.

    Returns:
        (images, embeddings) as `encode_and_embed`, rows in the order of `files`.
    """
    detect = getattr(processor, "detect_regions", None)
    # An ImageBertProcessor always has the method; built without a detector (and not overriding it), it has none.
    without_detector = (
        isinstance(processor, ImageBertProcessor)
        and type(processor).detect_regions is ImageBertProcessor.detect_regions
        and processor.detector is None
    )
    if not callable(detect) or without_detector:
        raise TypeError(
            f"index_images needs a processor with a detector (detect_regions turns image files into regions); "
            f"{type(processor).__name__} has none: build the processor with one, or extract features first and "
            "call index(records)"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    cache = None
    if cache_dir is not None:
        digest = hashlib.sha256()
        for image_id, path in files:
            digest.update(f"{image_id}\t{os.path.abspath(path)}\n".encode())
        meta = {
            "format": _CACHE_FORMAT,
            "model": model_fingerprint(model),
            "processor": processor_settings(processor, with_detector=True),
            "files": digest.hexdigest(),
            "count": len(files),
            "batch_size": batch_size,
            "bf16": bool(bf16),
        }
        cache = BatchCache(cache_dir, meta)
    from tqdm.auto import tqdm

    parts, embeddings = [], []
    with tqdm(total=len(files), unit="image", desc="index_images", disable=not progress) as bar:
        for batch, start in enumerate(range(0, len(files), batch_size)):
            chunk = files[start : start + batch_size]
            image_ids = [image_id for image_id, _ in chunk]
            done = cache.load(batch, image_ids) if cache is not None else None
            if done is None:
                records = detect([path for _, path in chunk], image_ids=image_ids)
                records = list(records)
                got = [str(record.get("image_id")) for record in records]
                if got != image_ids:
                    raise ValueError(
                        f"detect_regions returned records for {got[:3]}... instead of the {len(image_ids)} images "
                        f"{image_ids[:3]}... asked for, in that order"
                    )
                done = encode_and_embed(
                    model,
                    processor,
                    enumerate(records, start),
                    batch_size=model_batch_size,
                    bf16=bf16,
                    device=device,
                )
                if cache is not None:
                    cache.save(batch, image_ids, *done)
            parts.append(done[0])
            embeddings.append(done[1])
            bar.update(len(chunk))
    return concatenate_images(parts), torch.cat(embeddings)


__all__ = [
    "BatchCache",
    "concatenate_images",
    "embed_image_files",
    "encode_and_embed",
    "detector_fingerprint",
    "list_image_files",
    "processor_settings",
]
