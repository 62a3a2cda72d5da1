"""The ImageBERT ITM score of LAIT pairs: a stage-4 scoring feature, `pair.itm_score`.

An `ItmPairScorer` holds one ImageBERT checkpoint (`scoring.itm_checkpoint`: a `save_pretrained` folder with its
`ImageBertProcessor` beside it) and the region features of the collection's images (`scoring.region_features`: the
`--output` folder of `python -m modeling_imagebert.features`, `--output-format dataset`, memory-mapped). Its
pair-list API, `itm_probabilities(pairs)`, scores all the pairs it is given in batches: each distinct image's regions
are encoded once and each caption tokenised once (`retrieval.evaluation.encode_retrieval_split`), then the pairs
go through `model.score` `scoring.itm_batch_size` at a time. The result is sigmoid(ITM logit), the model's
probability that the caption matches the image; None for a pair whose image has no region features.

Matching an image to its features: the features pipeline names an image of a webdataset shard by its sample key,
and LAIT writes each kept image under `key = image_key = image_sha256[:24]` (the content hash prefix, see
`images.ImageResult.pair_fields`). So a pair's features are the row whose `image_id` is its `image_key`; a row
named by the full `image_sha256` (a features folder made from a list file `path<TAB>sha256`) is accepted too.

Every batch has the same shape, [itm_batch_size, processor.max_text_length + processor.max_regions] (text and
regions padded to the processor's limits, the last batch filled with copies of its first pair), so a pair's score
does not depend on which pairs share its batch: the local engine (pairs of a site bucket) and Spark (pairs of a
partition) give bit-identical scores. (The retrieval pair scorer trims each batch to its longest caption and most
regions, which moves scores by ~1e-9 with the batch's other members: fine for ranking, not for an engine-invariant
feature.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..safe_loading import loading_weights
from .records import PairRecord

HEAD_CLASSES = {"ImageBertForRetrieval": "retrieval", "ImageBertForPreTraining": "itm"}


def _field_error(field: str, message: str) -> ValueError:
    return ValueError(f"scoring.{field}: {message}")


def read_checkpoint_config(checkpoint: str | Path):
    """The `ImageBertConfig` of an ImageBERT checkpoint folder, checked without loading any weight. Raises
    ValueError naming `scoring.itm_checkpoint` when the folder is not an ImageBERT model."""
    from ..configuration_imagebert import ImageBertConfig

    folder = Path(checkpoint)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise _field_error(
            "itm_checkpoint",
            f"{folder}: no config.json; expected an ImageBERT model folder written by save_pretrained",
        )
    try:
        model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise _field_error("itm_checkpoint", f"{config_file}: unreadable JSON ({error})") from None
    if model_type != ImageBertConfig.model_type:
        raise _field_error(
            "itm_checkpoint",
            f"{folder}: config.json has model_type {model_type!r}; expected {ImageBertConfig.model_type!r} "
            "(an ImageBERT model folder written by save_pretrained)",
        )
    return ImageBertConfig.from_pretrained(folder)


def load_checkpoint_processor(checkpoint: str | Path, config) -> Any:
    """The `ImageBertProcessor` saved beside the model, checked against the model's limits (regions, positions)."""
    from ..processing_imagebert import ImageBertProcessor

    folder = Path(checkpoint)
    try:
        processor = ImageBertProcessor.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as error:
        reason = " ".join(str(error).split())[:200]
        raise _field_error(
            "itm_checkpoint",
            f"{folder}: no ImageBertProcessor saved beside the model ({reason}); save the one the model was "
            "trained with there (processor.save_pretrained(folder))",
        ) from None
    if processor.max_regions > config.max_regions:
        raise _field_error(
            "itm_checkpoint",
            f"{folder}: the processor keeps up to {processor.max_regions} regions but the model takes at most "
            f"config.max_regions={config.max_regions}",
        )
    if processor.max_text_length > config.max_position_embeddings:
        raise _field_error(
            "itm_checkpoint",
            f"{folder}: the processor's max_text_length {processor.max_text_length} exceeds the model's "
            f"max_position_embeddings {config.max_position_embeddings}",
        )
    return processor


def load_region_features(folder: str | Path, config):
    """The features folder as a memory-mapped `datasets.Dataset`, checked against the model: feature dimension
    equal to `config.visual_feature_dim`, and a `global_feature` column when the model uses a global image token.
    Raises ValueError naming `scoring.region_features`."""
    from ..feature_formats import ExtractionError, load_features

    folder = Path(folder)
    if not folder.is_dir():
        raise _field_error(
            "region_features",
            f"{folder}: no such folder; expected the --output folder of python -m modeling_imagebert.features",
        )
    try:
        dataset = load_features(folder)
    except ExtractionError as error:
        raise _field_error("region_features", str(error)) from None
    shape = getattr(dataset.features.get("region_features"), "shape", None)
    dim = shape[-1] if shape else None
    if dim != config.visual_feature_dim:
        raise _field_error(
            "region_features",
            f"{folder}: region features of dimension {dim}, but the ImageBERT model's visual_feature_dim is "
            f"{config.visual_feature_dim}; extract them with the detector the model was trained on",
        )
    if getattr(config, "use_global_image_feature", False) and "global_feature" not in dataset.column_names:
        raise _field_error(
            "region_features",
            f"{folder}: no global_feature column, but the ImageBERT model uses a global image token; extract "
            "with --global-model",
        )
    return dataset


def _load_parts(params: Mapping[str, Any]):
    """Checks config section `scoring`'s ITM settings and loads what needs no weights: `(model config, processor,
    features dataset)`. Raises ValueError naming the field."""
    if not params.get("region_features"):
        raise _field_error(
            "region_features",
            "required with scoring.itm_checkpoint: the features folder of the images (python -m "
            "modeling_imagebert.features on the LAIT shards)",
        )
    batch_size = params.get("itm_batch_size")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise _field_error("itm_batch_size", f"expected an integer >= 1, got {batch_size!r}")
    threads = params.get("itm_threads")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise _field_error("itm_threads", f"expected an integer >= 0 (0 = torch's default), got {threads!r}")
    import torch

    try:
        device = torch.device(params.get("itm_device") or "cpu")
    except (RuntimeError, TypeError) as error:
        raise _field_error("itm_device", f"not a torch device ({error})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _field_error("itm_device", f"{device}: no CUDA device on this machine; use cpu")
    config = read_checkpoint_config(params["itm_checkpoint"])
    processor = load_checkpoint_processor(params["itm_checkpoint"], config)
    return config, processor, load_region_features(params["region_features"], config)


def check_itm_settings(params: Mapping[str, Any]) -> None:
    """Checks config section `scoring`'s ITM settings without loading any weight (cheap: the driver of a run calls
    it before any stage starts). Nothing to check when `itm_checkpoint` is null. Raises ValueError naming the
    field."""
    if params.get("itm_checkpoint"):
        _load_parts(params)


def region_feature_keys(pair: PairRecord) -> tuple[str, ...]:
    """The features `image_id`s that name `pair`'s image, in lookup order: the LAIT shard key (`image_key`, the
    content hash prefix `image_sha256[:24]`), then the full content hash."""
    keys = [pair.image_key or pair.image_sha256[:24], pair.image_sha256]
    return tuple(dict.fromkeys(k for k in keys if k))


class ItmPairScorer:
    """ITM probabilities of LAIT pairs from one ImageBERT checkpoint and one features folder.

    Args:
        checkpoint: an ImageBERT `save_pretrained` folder (ImageBertForPreTraining: the ITM head;
            ImageBertForRetrieval: its fine-tuned matching head), with its `ImageBertProcessor` saved beside.
        region_features: the features folder of the images (`python -m modeling_imagebert.features`).
        device: torch device for the forward passes ("cpu" by default).
        batch_size: pairs per forward pass.
        threads: torch CPU threads during the forward passes (0 = leave torch's setting); 1 by default because
            the engines already run one process per core.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        region_features: str | Path,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        threads: int = 1,
    ):
        import torch

        from .. import ImageBertForPreTraining, ImageBertForRetrieval

        config, self.processor, features = _load_parts(
            {
                "itm_checkpoint": str(checkpoint),
                "region_features": str(region_features),
                "itm_device": device,
                "itm_batch_size": batch_size,
                "itm_threads": threads,
            }
        )
        architectures = list(getattr(config, "architectures", None) or [])
        head = ImageBertForRetrieval if "ImageBertForRetrieval" in architectures else ImageBertForPreTraining
        try:
            with loading_weights(checkpoint, "a model folder written by save_pretrained"):
                model = head.from_pretrained(checkpoint)
        except (OSError, ValueError, RuntimeError) as error:
            reason = " ".join(str(error).split())[:200]
            raise _field_error("itm_checkpoint", f"{checkpoint}: cannot load the model ({reason})") from None
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.batch_size = int(batch_size)
        self.threads = int(threads)
        self.features = features.with_format("numpy", dtype=None)
        # image_id -> row; the column is read once (strings only, the feature arrays stay memory-mapped).
        self.rows = {
            str(image_id): row for row, image_id in enumerate(self.features.with_format(None)["image_id"])
        }
        self.use_global = bool(getattr(config, "use_global_image_feature", False))

    def feature_row(self, pair: PairRecord) -> int | None:
        """The features row of `pair`'s image, or None when the folder has none."""
        for key in region_feature_keys(pair):
            if key in self.rows:
                return self.rows[key]
        return None

    def itm_probabilities(self, pairs: Sequence[PairRecord]) -> list[float | None]:
        """The ITM probability (sigmoid of the ITM logit) of each pair's caption with its image's regions, in
        order; None where the image has no region features. All pairs are scored together: distinct images
        encoded once, `batch_size` pairs per forward pass, every batch of the same shape."""
        out: list[float | None] = [None] * len(pairs)
        found = [(i, row) for i, pair in enumerate(pairs) if (row := self.feature_row(pair)) is not None]
        if not found:
            return out
        from ..retrieval.evaluation import encode_retrieval_split

        cache: dict[int, dict[str, Any]] = {}
        records = []
        for i, row in found:
            if row not in cache:
                cache[row] = self.features[row]
            records.append({**cache[row], "image_id": str(row), "caption": pairs[i].text})
        inputs = encode_retrieval_split(records, self.processor, use_global_image_feature=self.use_global)
        probabilities = self._score(inputs)
        for (i, _), probability in zip(found, probabilities, strict=True):
            out[i] = probability
        return out

    def _score(self, inputs) -> list[float]:
        """sigmoid(model.score) of caption n with image `caption_image_index[n]`, for every caption of `inputs`."""
        import torch
        import torch.nn.functional as F

        text, images = inputs.text, inputs.images
        width, regions = self.processor.max_text_length, self.processor.max_regions
        # Pad text to (C, width) and regions to (I, regions, ·) so that every batch has the same shape.
        input_ids = F.pad(text["input_ids"], (0, width - text["input_ids"].shape[1]))
        attention_mask = F.pad(text["attention_mask"], (0, width - text["attention_mask"].shape[1]))
        extra = regions - images["region_attention_mask"].shape[1]
        dtype = next(self.model.parameters()).dtype
        # (I, regions, F), (I, regions, 5), (I, regions)
        region_features = F.pad(images["region_features"], (0, 0, 0, extra)).to(self.device)
        region_locations = F.pad(images["region_locations"], (0, 0, 0, extra)).to(self.device)
        region_mask = F.pad(images["region_attention_mask"], (0, extra)).to(self.device)
        global_features = images.get("global_image_features")
        total = input_ids.shape[0]
        scores = []
        previous_threads = torch.get_num_threads()
        if self.threads and self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                for start in range(0, total, self.batch_size):
                    index = torch.arange(start, min(start + self.batch_size, total))
                    n = index.shape[0]
                    # The last batch is filled with copies of its first pair, then cut back to n scores.
                    index = torch.cat([index, index[:1].repeat(self.batch_size - n)])  # (batch_size,)
                    image = inputs.caption_image_index[index].to(self.device)
                    ids = input_ids[index].to(self.device)
                    batch = {
                        "input_ids": ids,
                        "attention_mask": attention_mask[index].to(self.device),
                        "token_type_ids": torch.zeros_like(ids),
                        "region_features": region_features.index_select(0, image).to(dtype),
                        "region_locations": region_locations.index_select(0, image),
                        "region_attention_mask": region_mask.index_select(0, image),
                    }
                    if global_features is not None:
                        batch["global_image_features"] = (
                            global_features.to(self.device).index_select(0, image).to(dtype)
                        )
                    logits = self.model.score(**batch).float().view(-1)[:n]  # (n,)
                    scores.extend(torch.sigmoid(logits).cpu().tolist())
        finally:
            torch.set_num_threads(previous_threads)
        return [float(s) for s in scores]


__all__ = [
    "ItmPairScorer",
    "check_itm_settings",
    "load_checkpoint_processor",
    "load_region_features",
    "read_checkpoint_config",
    "region_feature_keys",
]
