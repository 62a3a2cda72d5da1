"""Stage 2 of LAIT: fetch each dominant-image candidate, keep images wider and taller than 300 px, run the
content classifiers.

Where the bytes come from, in order (config `images`): image responses stored in the same WARC file
(`warc_images`), an img2dataset output folder (`img2dataset_output`: its webdataset shards, read back by URL),
then HTTP(S) with a bounded fetcher (`fetch_http`): a timeout per socket operation and a total deadline, at most
`max_redirects` redirects (a URL seen twice in one chain is a loop), at most `max_bytes`, a Content-Type that
must be an image. At scale, write the URL list with `write_img2dataset_input` and let img2dataset download
(see docs/lait.md for the command); img2dataset is not a dependency (on this machine its install would
downgrade pandas and webdataset), we only read the shards it writes.

Drop reasons (stage "images"): `not_found` (HTTP 404/410), `http_error` (any other non-200), `timeout`,
`redirect_loop`, `connection_error` (refused, reset, not HTTP), `truncated` (fewer bytes than the Content-Length),
`unsupported_scheme`, `not_an_image` (Content-Type not image/*, e.g. an HTML error page), `too_large` (bytes or pixels over the bounds), `undecodable` (PIL cannot decode it),
`too_small` (not wider AND taller than the minimum), `no_source` (HTTP off and no local copy),
`classifier_<name>` (a content classifier said drop).

Classifiers are pluggable: any `transformers` image-classification model (a local folder or a Hub id) with the
labels that mean drop, and a scikit-learn model on cheap image statistics (`image_statistics`) trained by
`train_image_filter` (`python -m modeling_imagebert.lait train-filter`) and saved with skops, never pickle.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import socket
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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

# The only types a skops file of ours may contain beyond skops' own defaults (numpy, sklearn estimators).
TRUSTED_SKOPS_TYPES: tuple[str, ...] = ("sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",)


# ---------------------------------------------------------------------------------------------------------------
# fetching


@dataclass
class FetchResult:
    """Outcome of one fetch: `data` (bytes) or `reason` (a stable drop reason), and what the server said."""

    data: bytes | None = None
    reason: str | None = None
    content_type: str = ""
    final_url: str = ""
    status: int = 0


class _BoundedRedirects(urllib.request.HTTPRedirectHandler):
    """Follows at most `max_redirects` redirects and refuses a URL seen twice in one chain (a loop)."""

    def __init__(self, max_redirects: int):
        super().__init__()
        self.max_redirects = max_redirects
        self.chain: list[str] = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        newurl = urllib.parse.urljoin(req.full_url, newurl)
        if not self.chain:
            self.chain.append(req.full_url)
        if newurl in self.chain or len(self.chain) > self.max_redirects:
            raise _RedirectLoop(newurl)
        self.chain.append(newurl)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _RedirectLoop(Exception):
    pass


def _is_timeout(error: BaseException) -> bool:
    if isinstance(error, (TimeoutError, socket.timeout)):
        return True
    reason = getattr(error, "reason", None)
    return isinstance(reason, (TimeoutError, socket.timeout)) or "timed out" in str(reason or error)


def fetch_url(url: str, params: Mapping[str, Any]) -> FetchResult:
    """Fetches `url` over HTTP(S) within the bounds of config section `images` (`timeout_s`, `max_redirects`,
    `max_bytes`, `user_agent`). Output: a `FetchResult` with the body, or with the drop reason; never raises for
    a network or server fault."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        return FetchResult(reason="unsupported_scheme", final_url=url)
    timeout = float(params["timeout_s"])
    max_bytes = int(params["max_bytes"])
    redirects = _BoundedRedirects(int(params["max_redirects"]))
    opener = urllib.request.build_opener(redirects)
    request = urllib.request.Request(url, headers={"User-Agent": params["user_agent"], "Accept": "image/*"})
    deadline = time.monotonic() + 3 * timeout
    try:
        with opener.open(request, timeout=timeout) as response:
            content_type = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
            result = FetchResult(
                content_type=content_type, final_url=response.geturl(), status=response.status
            )
            if (
                content_type
                and not content_type.startswith("image/")
                and content_type != "application/octet-stream"
            ):
                result.reason = "not_an_image"
                return result
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                result.reason = "too_large"
                return result
            chunks, size = [], 0
            while True:
                # A server that trickles bytes would pass the per-read timeout forever: a total deadline too.
                if time.monotonic() > deadline:
                    result.reason = "timeout"
                    return result
                chunk = response.read(min(65536, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    result.reason = "too_large"
                    return result
            if declared is not None and declared.isdigit() and size < int(declared):
                # The connection closed early: `read(n)` returns what came, without an error.
                result.reason = "truncated"
                return result
            result.data = b"".join(chunks)
            return result
    except _RedirectLoop:
        return FetchResult(reason="redirect_loop", final_url=url)
    except urllib.error.HTTPError as error:
        if 300 <= error.code < 400:
            return FetchResult(reason="redirect_loop", final_url=url, status=error.code)
        reason = "not_found" if error.code in (404, 410) else "http_error"
        return FetchResult(reason=reason, final_url=url, status=error.code)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as error:
        # HTTPException: a malformed status line, a body cut short (IncompleteRead), oversized headers.
        return FetchResult(reason="timeout" if _is_timeout(error) else "connection_error", final_url=url)


# ---------------------------------------------------------------------------------------------------------------
# local copies: images stored in the WARC, img2dataset shards


def index_warc_images(path: str | Path) -> dict[str, int]:
    """Image responses stored in one WARC / WARC.gz file: `{target URL: record offset}`; a damaged file
    yields the records read before the damage."""
    from warcio.archiveiterator import ArchiveIterator

    index: dict[str, int] = {}
    try:
        with open(path, "rb") as stream:
            records = ArchiveIterator(stream)
            for record in records:
                if record.rec_type != "response" or record.http_headers is None:
                    continue
                content_type = (record.http_headers.get_header("Content-Type") or "").lower()
                if content_type.startswith("image/"):
                    index[record.rec_headers.get_header("WARC-Target-URI")] = records.get_record_offset()
    except Exception:
        # Truncated or broken archives are counted by stage 1's reader; here only what was readable counts.
        pass
    return index


def read_warc_image(path: str | Path, offset: int) -> bytes | None:
    """The HTTP body of the response record at `offset` of a WARC / WARC.gz file (None if unreadable)."""
    from warcio.archiveiterator import ArchiveIterator

    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            for record in ArchiveIterator(stream):
                return record.content_stream().read()
    except Exception:
        return None
    return None


def index_img2dataset_output(folder: str | Path) -> dict[str, tuple[str, str]]:
    """Reads an img2dataset webdataset output folder: `{url: (tar path, image member name)}` for every sample
    whose `{key}.json` says status "success"."""
    index: dict[str, tuple[str, str]] = {}
    for tar_path in sorted(Path(folder).glob("*.tar")):
        try:
            with tarfile.open(tar_path) as tar:
                names = set(tar.getnames())
                for name in sorted(n for n in names if n.endswith(".json")):
                    meta = json.loads(tar.extractfile(name).read())
                    key = name[: -len(".json")]
                    image = next(
                        (f"{key}.{e}" for e in ("jpg", "png", "webp") if f"{key}.{e}" in names), None
                    )
                    if image and meta.get("url") and meta.get("status", "success") == "success":
                        index[meta["url"]] = (str(tar_path), image)
        except (tarfile.TarError, OSError, ValueError) as error:
            raise ValueError(f"{tar_path}: not a readable img2dataset webdataset shard ({error})") from None
    return index


def read_img2dataset_image(location: tuple[str, str]) -> bytes | None:
    """The image bytes of one img2dataset sample, `location` as returned by `index_img2dataset_output`."""
    tar_path, member = location
    try:
        with tarfile.open(tar_path) as tar:
            return tar.extractfile(member).read()
    except (tarfile.TarError, OSError, AttributeError):
        return None


def write_img2dataset_input(candidates: Iterable[ImageCandidate], path: str | Path) -> int:
    """Writes the unique image URLs of `candidates` as an img2dataset URL list (parquet with columns `url`,
    `caption` (the first text candidate's raw text) and `page_url`), atomically. Output: the number of URLs.

    Then: `img2dataset --url_list PATH --input_format parquet --url_col url --caption_col caption
    --save_additional_columns '["page_url"]' --output_format webdataset --output_folder images/ --resize_mode no`
    and `images.img2dataset_output: images/` in the LAIT config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .outputs import atomic_path

    rows: dict[str, dict[str, str]] = {}
    for candidate in candidates:
        if candidate.image_url not in rows:
            caption = candidate.text_candidates[0].raw if candidate.text_candidates else ""
            rows[candidate.image_url] = {
                "url": candidate.image_url,
                "caption": caption,
                "page_url": candidate.page_url,
            }
    table = pa.Table.from_pylist(
        list(rows.values()), schema=pa.schema([(n, pa.string()) for n in ("url", "caption", "page_url")])
    )
    with atomic_path(Path(path)) as temp:
        pq.write_table(table, temp)
    return len(rows)


@dataclass
class ImageSources:
    """Where stage 2 looks for an image's bytes before fetching it: one WARC file's stored images and an
    img2dataset output folder."""

    warc_file: str | None = None
    warc_index: dict[str, int] = field(default_factory=dict)
    img2dataset_index: dict[str, tuple[str, str]] = field(default_factory=dict)

    @classmethod
    def for_warc_file(cls, warc_file: str, params: Mapping[str, Any], img2dataset_index=None) -> ImageSources:
        """The sources for the pages of `warc_file` under config section `images`."""
        warc_index = index_warc_images(warc_file) if params["warc_images"] else {}
        if img2dataset_index is None and params["img2dataset_output"]:
            img2dataset_index = index_img2dataset_output(params["img2dataset_output"])
        return cls(warc_file, warc_index, img2dataset_index or {})

    def get(self, url: str, params: Mapping[str, Any]) -> FetchResult:
        """The bytes of `url`: a local copy when there is one, else HTTP when allowed."""
        if url in self.warc_index and self.warc_file is not None:
            data = read_warc_image(self.warc_file, self.warc_index[url])
            if data is not None:
                return FetchResult(data=data, final_url=url, status=200)
        if url in self.img2dataset_index:
            data = read_img2dataset_image(self.img2dataset_index[url])
            if data is not None:
                return FetchResult(data=data, final_url=url, status=200)
        if not params["fetch_http"]:
            return FetchResult(reason="no_source", final_url=url)
        return fetch_url(url, params)


# ---------------------------------------------------------------------------------------------------------------
# decoding and statistics


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


# ---------------------------------------------------------------------------------------------------------------
# skops files


def load_skops(path: str | Path, expected_kind: str) -> tuple[Any, dict[str, Any]]:
    """Loads a model saved by `save_skops`, refusing any type outside skops' defaults and `TRUSTED_SKOPS_TYPES`.
    Output: `(estimator, sidecar)`; the JSON sidecar (`<path>.json`) must say `kind == expected_kind`."""
    import skops.io as sio

    path = Path(path)
    sidecar_path = path.with_suffix(path.suffix + ".json")
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{sidecar_path}: missing or unreadable sidecar of {path.name} ({error})") from None
    if sidecar.get("kind") != expected_kind:
        raise ValueError(f"{sidecar_path}: kind {sidecar.get('kind')!r}, expected {expected_kind!r}")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as error:
        raise ValueError(f"{path}: not a skops file ({error})") from None
    unknown = sorted(set(untrusted) - set(TRUSTED_SKOPS_TYPES))
    if unknown:
        raise ValueError(f"{path}: refusing to load untrusted type(s) {', '.join(unknown)}")
    return sio.load(path, trusted=list(untrusted)), sidecar


def save_skops(model: Any, path: str | Path, sidecar: Mapping[str, Any]) -> None:
    """Saves `model` with skops and `sidecar` as `<path>.json`, both atomically."""
    import skops.io as sio

    from .outputs import atomic_path

    path = Path(path)
    with atomic_path(path) as temp:
        sio.dump(model, temp)
    with atomic_path(path.with_suffix(path.suffix + ".json")) as temp:
        temp.write_text(json.dumps(dict(sidecar), indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------------------------
# classifiers


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


# ---------------------------------------------------------------------------------------------------------------
# the stage


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


# ---------------------------------------------------------------------------------------------------------------
# train-filter


def read_labelled_rows(path: str | Path, required: Sequence[str]) -> list[dict[str, Any]]:
    """Rows of a labelled CSV or JSONL file, each checked to have the `required` columns; a bad row raises
    ValueError naming the file, the line and the field."""
    import csv

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror or error})") from None
    rows: list[dict[str, Any]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise ValueError(f"{path}:{line_no}: not a JSON object") from None
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    for line_no, row in enumerate(rows, 1):
        for key in required:
            if not isinstance(row, dict) or row.get(key) in (None, ""):
                raise ValueError(
                    f"{path}: row {line_no}: missing field {key!r} (expected columns {', '.join(required)})"
                )
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def parse_label(value: Any, where: str) -> int:
    """A 0/1 label from 0, 1, true, false, yes, no; ValueError naming `where` otherwise."""
    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return 1
    if text in ("0", "false", "no"):
        return 0
    raise ValueError(f"{where}: expected a 0/1 label, got {value!r}")


def train_image_filter(labels: str | Path, output: str | Path, *, seed: int = 0) -> dict[str, Any]:
    """Trains the "unnatural / non-learnable" image filter on a labelled file (CSV or JSONL with columns `image`
    (a path, relative to the file's folder) and `drop` (1 = drop, 0 = keep)); saves it with skops at `output`
    plus a JSON sidecar (feature names, metrics, training file). Output: the sidecar dict."""
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import accuracy_score, roc_auc_score
    from sklearn.model_selection import train_test_split

    labels = Path(labels)
    rows = read_labelled_rows(labels, ("image", "drop"))
    X, y = [], []
    for i, row in enumerate(rows, 1):
        image_path = labels.parent / row["image"]
        try:
            with Image.open(image_path) as opened:
                image = opened.convert("RGB")
        except Exception as error:
            raise ValueError(f"{labels}: row {i}: image {image_path} unreadable ({error})") from None
        X.append(stats_vector(image_statistics(image)))
        y.append(parse_label(row["drop"], f"{labels}: row {i}: drop"))
    X_arr, y_arr = np.stack(X), np.array(y)
    if len(set(y)) < 2:
        raise ValueError(f"{labels}: drop: both labels 0 and 1 are needed to train a filter")
    stratify = y_arr if min(np.bincount(y_arr)) >= 2 else None
    from threadpoolctl import threadpool_limits

    # The labelled set is small by design: one thread fits it ~20x faster than OpenMP threads on a busy machine.
    threads = threadpool_limits(1 if len(y_arr) < 20000 else None)
    X_train, X_test, y_train, y_test = train_test_split(
        X_arr, y_arr, test_size=0.25, random_state=seed, stratify=stratify
    )
    model = HistGradientBoostingClassifier(max_iter=100, random_state=seed).fit(X_train, y_train)
    probability = model.predict_proba(X_test)[:, 1]
    metrics = {
        "held_out_accuracy": float(accuracy_score(y_test, probability >= 0.5)),
        "held_out_rows": int(len(y_test)),
    }
    if len(set(y_test)) == 2:
        metrics["held_out_auc"] = float(roc_auc_score(y_test, probability))
    # The saved model is refit on all rows; the metrics above are from the held-out quarter.
    model = HistGradientBoostingClassifier(max_iter=100, random_state=seed).fit(X_arr, y_arr)
    threads.restore_original_limits()
    sidecar = {
        "kind": "lait-image-filter",
        "feature_names": list(IMAGE_STAT_NAMES),
        "positive_class": "drop",
        "trained_on": str(labels),
        "rows": int(len(y_arr)),
        "metrics": metrics,
    }
    save_skops(model, output, sidecar)
    return sidecar


__all__ = [
    "IMAGE_STAT_NAMES",
    "FetchResult",
    "ImageResult",
    "ImageSources",
    "check_classifier_specs",
    "classifier_drop_probability",
    "decode_image",
    "fetch_url",
    "image_statistics",
    "index_img2dataset_output",
    "index_warc_images",
    "load_skops",
    "save_skops",
    "stage2_image",
    "train_image_filter",
    "write_img2dataset_input",
]
