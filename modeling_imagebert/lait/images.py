"""Stage 2 of LAIT: fetch each dominant-image candidate, keep images wider and taller than 300 px, run the
content classifiers.

The bytes come from `fetch.ImageSources` (a copy in the WARC file or an img2dataset folder, else a bounded HTTP
fetch). Drop reasons (stage "images"): the fetch's (`not_found`, `http_error`, `timeout`, `redirect_loop`,
`connection_error`, `truncated`, `unsupported_scheme`, `not_an_image`, `too_large`, `no_source`), then
`too_large` (pixels over the bound), `undecodable` (PIL cannot decode it), `too_small` (not wider AND taller than
the minimum), `classifier_<name>` (a content classifier said drop).

Classifiers are pluggable: any `transformers` image-classification model (a local folder or a Hub id) with the
labels that mean drop, and a scikit-learn model on cheap image statistics (`image_statistics`) trained by
`filter_training.train_image_filter` (`python -m modeling_imagebert.lait train-filter`) and saved with skops, never
pickle (`classifier_io`).
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from .classifier_io import load_skops
from .fetch import ImageSources
from .records import DropCounter, ImageCandidate

STAGE = "images"

# Image-only features handed to the scorer and to the trainable filter, in this order.
IMAGE_STAT_NAMES: tuple[str, ...] = (
    *(f"hist_{c}{b}" for c in "rgb" for b in range(8)),
    "brightness_mean",
    "brightness_std",
    "saturation_mean",
    "saturation_std",
    "edge_density",
    "unique_colour_ratio",
    "top_colour_fraction",
    "aspect_ratio",
    "log_pixels",
)


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Decodes image bytes to an RGB PIL image. Output: `(image, None)` or `(None, reason)` with reason
    `too_large` (more than `max_pixels`, checked from the header before decoding) or `undecodable`."""
    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > max_pixels:
            return None, "too_large"
        image.load()
        return image.convert("RGB"), None
    except Image.DecompressionBombError:
        return None, "too_large"
    except Exception:
        return None, "undecodable"


def image_statistics(image: Image.Image) -> dict[str, float]:
    """Cheap statistics of an RGB image, named as `IMAGE_STAT_NAMES`: an 8-bin histogram per channel,
    brightness and saturation mean/std, edge density, unique-colour ratio, the most frequent colour's share,
    aspect ratio (w/h) and log pixel count. Computed on a 128 px thumbnail, so the cost is fixed."""
    width, height = image.size
    thumb = image.copy()
    thumb.thumbnail((128, 128))
    rgb = np.asarray(thumb, dtype=np.float32) / 255.0  # (h, w, 3)
    stats: dict[str, float] = {}
    for c, name in enumerate("rgb"):
        hist, _ = np.histogram(rgb[..., c], bins=8, range=(0.0, 1.0))
        for b in range(8):
            stats[f"hist_{name}{b}"] = float(hist[b] / hist.sum())
    brightness = rgb.mean(axis=2)
    high, low = rgb.max(axis=2), rgb.min(axis=2)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    stats["brightness_mean"] = float(brightness.mean())
    stats["brightness_std"] = float(brightness.std())
    stats["saturation_mean"] = float(saturation.mean())
    stats["saturation_std"] = float(saturation.std())
    # Edges: share of pixels whose gradient magnitude passes a fixed threshold (flat graphics score low).
    gy, gx = np.gradient(brightness)
    stats["edge_density"] = float((np.hypot(gx, gy) > 0.1).mean())
    # Colours quantised to 5 bits per channel: drawings and logos use few, photographs many.
    quantised = (np.asarray(thumb, dtype=np.uint32) >> 3).reshape(-1, 3)
    codes = (quantised[:, 0] << 10) | (quantised[:, 1] << 5) | quantised[:, 2]
    _, counts = np.unique(codes, return_counts=True)
    stats["unique_colour_ratio"] = float(len(counts) / len(codes))
    stats["top_colour_fraction"] = float(counts.max() / len(codes))
    stats["aspect_ratio"] = float(width / max(height, 1))
    stats["log_pixels"] = float(np.log1p(width * height))
    return stats


def stats_vector(stats: Mapping[str, float]) -> np.ndarray:
    """The statistics in `IMAGE_STAT_NAMES` order, shape (len(IMAGE_STAT_NAMES),)."""
    return np.array([stats[name] for name in IMAGE_STAT_NAMES], dtype=np.float64)


def to_jpeg(data: bytes, image: Image.Image, quality: int) -> bytes:
    """The bytes stored in the output shards: the original when it is a JPEG, else `image` encoded as JPEG."""
    if data[:3] == b"\xff\xd8\xff":
        return data
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def check_classifier_specs(specs: Sequence[Mapping[str, Any]]) -> None:
    """Validates config `images.classifiers`; raises ValueError naming the entry and the field."""
    allowed = {
        "transformers": {"name", "type", "model", "drop_labels", "threshold"},
        "sklearn": {"name", "type", "model", "threshold"},
    }
    names = set()
    for i, spec in enumerate(specs):
        where = f"images.classifiers[{i}]"
        if not isinstance(spec, Mapping):
            raise ValueError(f"{where}: expected a mapping with name, type, model, threshold")
        kind = spec.get("type")
        if kind not in allowed:
            raise ValueError(f"{where}.type: expected 'transformers' or 'sklearn', got {kind!r}")
        unknown = sorted(set(spec) - allowed[kind])
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)} for type {kind}")
        for key in ("name", "model"):
            if not isinstance(spec.get(key), str) or not spec.get(key):
                raise ValueError(f"{where}.{key}: expected a non-empty string")
        if not str(spec["name"]).replace("_", "").isalnum() or not spec["name"].islower():
            raise ValueError(f"{where}.name: expected a snake_case name, got {spec['name']!r}")
        if spec["name"] in names:
            raise ValueError(f"{where}.name: {spec['name']!r} used twice")
        names.add(spec["name"])
        threshold = spec.get("threshold", 0.5)
        if not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
            raise ValueError(f"{where}.threshold: expected a probability in [0, 1], got {threshold!r}")
        if kind == "transformers":
            labels = spec.get("drop_labels")
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
                raise ValueError(f"{where}.drop_labels: expected a non-empty list of label names")


_LOADED: dict[str, Any] = {}
_LOADING = threading.Lock()


def _classifier(spec: Mapping[str, Any]):
    """The loaded model of one classifier spec, once per process (pool workers and Spark executors reuse it;
    the engines' download threads share it)."""
    key = json.dumps(dict(spec), sort_keys=True)
    with _LOADING:
        return _load_classifier(key, spec)


def _load_classifier(key: str, spec: Mapping[str, Any]):
    if key not in _LOADED:
        if spec["type"] == "transformers":
            from transformers import pipeline

            classifier = pipeline("image-classification", model=spec["model"], device="cpu")
            known = {label.lower() for label in classifier.model.config.id2label.values()}
            missing = [x for x in spec["drop_labels"] if x.lower() not in known]
            if missing:
                raise ValueError(
                    f"images.classifiers {spec['name']}: drop_labels {missing} not among the model's labels "
                    f"{sorted(known)}"
                )
            _LOADED[key] = classifier
        else:
            _LOADED[key] = load_skops(spec["model"], "lait-image-filter")
    return _LOADED[key]


def classifier_drop_probability(
    spec: Mapping[str, Any], image: Image.Image, stats: Mapping[str, float]
) -> float:
    """Probability that `image` should be dropped according to one classifier spec (config
    `images.classifiers[i]`): the summed probability of the drop labels (transformers) or of class 1 (sklearn)."""
    model = _classifier(spec)
    if spec["type"] == "transformers":
        drop = {x.lower() for x in spec["drop_labels"]}
        scores = model(image, top_k=None)
        return float(sum(s["score"] for s in scores if s["label"].lower() in drop))
    from threadpoolctl import threadpool_limits

    estimator, sidecar = model
    if list(sidecar["feature_names"]) != list(IMAGE_STAT_NAMES):
        raise ValueError(f"{spec['model']}: trained on other image statistics than this version computes")
    with threadpool_limits(1):
        return float(estimator.predict_proba(stats_vector(stats)[None, :])[0, 1])


@dataclass
class ImageResult:
    """What stage 2 knows about one kept image: its stored bytes (JPEG), content hash, size, features, scores."""

    jpeg: bytes
    sha256: str
    width: int
    height: int
    features: dict[str, float]
    scores: dict[str, float]

    def pair_fields(self) -> dict[str, Any]:
        """The `PairRecord` image-side fields."""
        return {
            "image_sha256": self.sha256,
            "image_width": self.width,
            "image_height": self.height,
            "image_key": self.sha256[:24],
            "image_features": dict(self.features),
            "image_scores": dict(self.scores),
        }


def _thumbnail_into(store: dict[str, bytes] | None, url: str, image: Image.Image) -> None:
    if store is None:
        return
    thumb = image.copy()
    thumb.thumbnail((160, 160))
    out = io.BytesIO()
    thumb.save(out, format="JPEG", quality=75)
    store[url] = out.getvalue()


def stage2_image(
    candidate: ImageCandidate,
    params: Mapping[str, Any],
    drops: DropCounter,
    sources: ImageSources | None = None,
    dropped_thumbnails: dict[str, bytes] | None = None,
) -> ImageResult | None:
    """Stage 2 for one candidate under config section `images`: fetch (local copy first), decode, size rule,
    classifiers. Output: an `ImageResult`, or None with the reason counted in `drops`. When
    `dropped_thumbnails` is given, an image that decoded but was dropped (too small, a classifier) leaves a
    160 px JPEG thumbnail there under its URL, for the contact sheet."""
    fetched = (sources or ImageSources()).get(candidate.image_url, params)
    if fetched.data is None:
        drops.drop(STAGE, fetched.reason or "connection_error")
        return None
    if not fetched.data:
        drops.drop(STAGE, "undecodable")
        return None
    image, reason = decode_image(fetched.data, int(params["max_pixels"]))
    if image is None:
        # An HTML page served without a Content-Type header lands here: count it as what it is.
        looks_html = fetched.data.lstrip()[:15].lower().startswith((b"<!doctype html", b"<html"))
        drops.drop(STAGE, "not_an_image" if looks_html else reason or "undecodable")
        return None
    if not (image.width > params["min_width"] and image.height > params["min_height"]):
        drops.drop(STAGE, "too_small")
        _thumbnail_into(dropped_thumbnails, candidate.image_url, image)
        return None
    stats = image_statistics(image)
    scores: dict[str, float] = {}
    for spec in params["classifiers"]:
        probability = classifier_drop_probability(spec, image, stats)
        scores[spec["name"]] = probability
        if probability >= spec.get("threshold", 0.5):
            drops.drop(STAGE, f"classifier_{spec['name']}")
            _thumbnail_into(dropped_thumbnails, candidate.image_url, image)
            return None
    drops.keep(STAGE)
    features = {**stats, "image_width": float(image.width), "image_height": float(image.height)}
    features["image_bytes_log"] = float(np.log1p(len(fetched.data)))
    return ImageResult(
        jpeg=to_jpeg(fetched.data, image, int(params["jpeg_quality"])),
        sha256=hashlib.sha256(fetched.data).hexdigest(),
        width=image.width,
        height=image.height,
        features=features,
        scores=scores,
    )


__all__ = [
    "IMAGE_STAT_NAMES",
    "ImageResult",
    "check_classifier_specs",
    "classifier_drop_probability",
    "decode_image",
    "image_statistics",
    "stage2_image",
    "stats_vector",
    "to_jpeg",
]
