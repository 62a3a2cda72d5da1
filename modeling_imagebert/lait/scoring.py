"""Stage 4 of LAIT: image-text semantic scoring, a weak model over text-only, image-only and cross-modal features.

`pair_features(pair)` flattens one `PairRecord` into named numbers:

- `text.*`: stage 3's text features (lengths, OOV ratio, casing, digits...), plus `pair.words`, `pair.chars`,
  `pair.digit_ratio`, `pair.upper_ratio` and a one-hot `pair.source_<alt|title|figcaption|nearby|page_title>`;
- `dom.*` and `pair.dominance_score`: stage 1's DOM features and rule score;
- `image.*`: stage 2's image statistics (colour histogram, edges, saturation, unique colours, size, aspect...)
  and `score.<classifier>` probabilities;
- cross-modal: `pair.url_word_overlap` (caption words found in the image URL's file name and path),
  `pair.region_class_overlap` / `pair.region_class_count` (caption words vs the detector's object and attribute
  names of this image, from `scoring.region_classes`; missing when not given), and `pair.itm_score`: the
  ImageBERT ITM probability of the caption with the image's regions (`scoring.itm_checkpoint` with
  `scoring.region_features`; computed by `itm_score.ItmPairScorer` over all the pairs of a scoring call; missing
  for an image without region features, counted as event `scoring.itm_no_region_features`).

A missing feature is NaN; `HistGradientBoostingClassifier` handles NaN natively, so a scorer trained without
DOM features (a labelled CSV of image, text) still scores pipeline pairs. `train_scorer` (`python -m
modeling_imagebert.lait train-scorer`) fits it on a small labelled set, picks the threshold that maximises F1 on
out-of-fold predictions, and saves it with skops (no pickle) plus a JSON sidecar (feature names, threshold,
metrics, training file). Without a model (`scoring.model: null`) the relevance is a documented rule score: a prior
per text source (`RULE_SOURCE_PRIOR`), so aggregation still prefers captions over titles; it is not learned.

The ITM score needs the region features of the images: run the pipeline once, extract features from its shards
(`python -m modeling_imagebert.features pairs/shards/*.tar --source webdataset ...`), then train and run with
`scoring.itm_checkpoint` and `scoring.region_features`. `train_scorer` computes the same feature for the labelled
rows (same checkpoint, same lookup by content hash), and a scorer trained with it refuses to score without an
`itm_checkpoint` instead of feeding it NaN for every pair.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .records import DropCounter, PairRecord

STAGE = "scoring"
SOURCES = ("alt", "title", "figcaption", "nearby", "page_title")
ITM_FEATURE = "pair.itm_score"

# Rule relevance when no trained scorer is configured: how often each source carries a real description (a
# figcaption is written for the reader, alt for accessibility, a title is often a file name or tooltip, the
# nearest text block is about the page, not always the image). Hand-set, not learned.
RULE_SOURCE_PRIOR = {"figcaption": 0.9, "alt": 0.8, "title": 0.6, "nearby": 0.55, "page_title": 0.4}

_WORD = re.compile(r"[a-z]+")
ITM_SETTINGS = ("itm_checkpoint", "region_features", "itm_device", "itm_batch_size", "itm_threads")
_LOADED: dict[str, Any] = {}


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def pair_features(pair: PairRecord, region_classes: Sequence[str] | None = None) -> dict[str, float]:
    """The named features of one pair (see the module docstring); `region_classes` are the detector's object
    and attribute names for this image, when known. Output: `{name: float}` (no NaN: absent means missing)."""
    text = pair.text
    words = _words(text)
    features: dict[str, float] = {f"text.{k}": float(v) for k, v in pair.text_features.items()}
    features.update({f"dom.{k}": float(v) for k, v in pair.dom_features.items()})
    features.update({f"image.{k}": float(v) for k, v in pair.image_features.items()})
    features.update({f"score.{k}": float(v) for k, v in pair.image_scores.items()})
    features["pair.dominance_score"] = float(pair.dominance_score)
    features["pair.words"] = float(len(words))
    features["pair.chars"] = float(len(text))
    features["pair.digit_ratio"] = sum(c.isdigit() for c in text) / max(len(text), 1)
    features["pair.upper_ratio"] = sum(c.isupper() for c in text) / max(sum(c.isalpha() for c in text), 1)
    for source in SOURCES:
        features[f"pair.source_{source}"] = float(pair.text_source == source)
    # Caption words in the image URL ("/photos/red-bicycle-old-town.jpg"): a weak cross-modal signal that needs
    # no detector.
    url_words = set(_words(pair.image_url.rsplit("?", 1)[0]))
    content = [w for w in words if len(w) > 2]
    features["pair.url_word_overlap"] = sum(w in url_words for w in content) / max(len(content), 1)
    if region_classes is not None:
        names = {w for name in region_classes for w in _words(name)}
        features["pair.region_class_overlap"] = sum(w in names for w in content) / max(len(content), 1)
        features["pair.region_class_count"] = float(len(set(region_classes)))
    if pair.itm_score is not None:
        features[ITM_FEATURE] = float(pair.itm_score)
    return features


def feature_matrix(rows: Iterable[Mapping[str, float]], names: Sequence[str]) -> np.ndarray:
    """Rows of named features as a float matrix, shape (n_rows, len(names)); absent names are NaN."""
    return np.array([[row.get(name, math.nan) for name in names] for row in rows], dtype=np.float64).reshape(
        -1, len(names)
    )


class Scorer:
    """The relevance model of config section `scoring`: a trained skops model or the rule score, plus the
    ImageBERT ITM score feature when `itm_checkpoint` is set."""

    def __init__(self, params: Mapping[str, Any]):
        check_scoring_settings(params)
        self.region_classes: dict[str, list[str]] = {}
        if params.get("region_classes"):
            path = Path(params["region_classes"])
            try:
                self.region_classes = json.loads(path.read_text())
            except (OSError, ValueError) as error:
                raise ValueError(f"scoring.region_classes: {path}: unreadable JSON ({error})") from None
        self.model = None
        self.feature_names: list[str] = []
        if params.get("model"):
            from .classifier_io import load_skops

            self.model, sidecar = load_skops(params["model"], "lait-scorer")
            self.feature_names = list(sidecar["feature_names"])
            default_threshold = sidecar.get("threshold")
            if not (
                isinstance(default_threshold, (int, float))
                and not isinstance(default_threshold, bool)
                and 0.0 <= default_threshold <= 1.0  # NaN fails too: a NaN threshold would keep nothing
            ):
                raise ValueError(
                    f"{params['model']}.json: threshold: {default_threshold!r} is not a finite number in [0, 1]"
                )
            default_threshold = float(default_threshold)
        else:
            default_threshold = float(params["rule_threshold"])
        threshold = params.get("threshold")
        self.threshold = float(threshold) if threshold is not None else default_threshold
        self.itm = itm_scorer_for(params)

    def add_itm_scores(self, pairs: Sequence[PairRecord], drops: DropCounter | None = None) -> None:
        """Sets `itm_score` on each of `pairs` (one batched pass over all of them) when an ITM checkpoint is
        configured; pairs whose image has no region features keep None and are counted as event
        `scoring.itm_no_region_features` in `drops`."""
        if self.itm is None or not pairs:
            return
        for pair, probability in zip(pairs, self.itm.itm_probabilities(pairs), strict=True):
            pair.itm_score = probability
            if drops is not None:
                drops.event(STAGE, "itm_scored" if probability is not None else "itm_no_region_features")

    def score(self, pairs: Sequence[PairRecord], drops: DropCounter | None = None) -> list[float]:
        """Relevance probabilities in [0, 1] of `pairs`, in order (their ITM scores are set first, see
        `add_itm_scores`)."""
        if not pairs:
            return []
        self.add_itm_scores(pairs, drops)
        if self.model is None:
            return [RULE_SOURCE_PRIOR.get(p.text_source, 0.5) for p in pairs]
        from threadpoolctl import threadpool_limits

        rows = [pair_features(p, self.region_classes.get(p.image_sha256)) for p in pairs]
        # A few rows per call: OpenMP threads cost more than they give (and fight the engine's processes).
        with threadpool_limits(1):
            return [
                float(x) for x in self.model.predict_proba(feature_matrix(rows, self.feature_names))[:, 1]
            ]


def check_scoring_settings(params: Mapping[str, Any]) -> None:
    """Checks config section `scoring` without loading any model weight (engines call it before the first
    stage, so a bad path stops the run at once): the ITM settings (`itm_score.check_itm_settings`), and that a
    scorer trained with the ITM feature has an `itm_checkpoint` to compute it. Raises ValueError naming the
    field."""
    from .itm_score import check_itm_settings

    if params.get("model") and not params.get("itm_checkpoint"):
        model = Path(params["model"])
        sidecar_path = model.with_suffix(model.suffix + ".json")
        try:
            names = json.loads(sidecar_path.read_text()).get("feature_names", [])
        except (OSError, ValueError, AttributeError):
            names = []  # load_skops reports an unreadable sidecar with its own message
        if ITM_FEATURE in names:
            raise ValueError(
                f"scoring.itm_checkpoint: {model} was trained with the feature {ITM_FEATURE} (ImageBERT ITM score); "
                "set scoring.itm_checkpoint and scoring.region_features to compute it, or use a scorer trained "
                "without it (refusing to give it NaN for every pair)"
            )
    check_itm_settings(params)


def itm_scorer_for(params: Mapping[str, Any]):
    """The `itm_score.ItmPairScorer` of config section `scoring`, or None without `itm_checkpoint`; loaded once
    per process (pool workers, Spark executors) for the same settings."""
    if not params.get("itm_checkpoint"):
        return None
    settings = {k: params.get(k) for k in ITM_SETTINGS}
    key = "itm:" + json.dumps(settings, sort_keys=True, default=str)
    if key not in _LOADED:
        from .itm_score import ItmPairScorer

        _LOADED[key] = ItmPairScorer(
            settings["itm_checkpoint"],
            settings["region_features"],
            device=settings["itm_device"] or "cpu",
            batch_size=settings["itm_batch_size"],
            threads=settings["itm_threads"],
        )
    return _LOADED[key]


def scorer_for(params: Mapping[str, Any]) -> Scorer:
    """The `Scorer` of config section `scoring`, loaded once per process (pool workers, Spark executors)."""
    key = json.dumps(dict(params), sort_keys=True, default=str)
    if key not in _LOADED:
        _LOADED[key] = Scorer(params)
    return _LOADED[key]


def stage4_score(
    pairs: Sequence[PairRecord], scorer: Scorer, drops: DropCounter
) -> list[tuple[PairRecord, bool]]:
    """Stage 4 on a list of pairs (the engines pass a partition's pairs in chunks): sets `relevance_score` on each. Output: `(pair, passed)` for
    every pair, `passed` when the score reaches the threshold; the others counted as `below_threshold`. With an
    ITM checkpoint, every pair's `itm_score` is set first, all pairs in one batched pass."""
    out = []
    for pair, score in zip(pairs, scorer.score(pairs, drops), strict=True):
        pair.relevance_score = score
        passed = score >= scorer.threshold
        if passed:
            drops.keep(STAGE)
        else:
            drops.drop(STAGE, "below_threshold")
        out.append((pair, passed))
    return out


def train_scorer(
    labels: str | Path,
    output: str | Path,
    *,
    text_config: Mapping[str, Any] | None = None,
    scoring_config: Mapping[str, Any] | None = None,
    seed: int = 0,
    folds: int = 5,
) -> dict[str, Any]:
    """Trains the relevance scorer on a labelled file and saves it (skops + `<output>.json` sidecar).

    Input: CSV or JSONL with columns `image` (path, relative to the file's folder), `text`, `relevant` (0/1) and
    optionally `source` (alt|title|figcaption|nearby|page_title, default alt) and `image_url`. The text is cleaned
    and described by stage 3 (`text.clean_text`, `text.text_features`, with config section `text_config`); image
    features are stage 2's statistics. With `itm_checkpoint` and `region_features` in `scoring_config` (config
    section `scoring`), each row also gets `pair.itm_score`, exactly as the pipeline computes it: its image is
    looked up in the features folder by content hash (`sha256` of the image file, first 24 hex digits, as LAIT's
    shard keys), or by the row's optional `image_key` column (e.g. a LAIT image re-encoded to JPEG in the shards,
    whose key is the hash of the bytes first fetched). Output: the sidecar dict: feature names, threshold (max F1
    on out-of-fold predictions), metrics (out-of-fold AUC, precision, recall, F1 at the threshold), rows, the
    training file and, with ITM, the checkpoint and how many rows had region features.
    """

    from PIL import Image
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import precision_recall_fscore_support, roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from .classifier_io import parse_label, read_labelled_rows, save_skops
    from .images import image_statistics

    labels = Path(labels)
    rows = read_labelled_rows(labels, ("image", "text", "relevant"))
    text_features = _text_features_function(text_config)
    stats_cache: dict[str, tuple[dict[str, float], int, int, str]] = {}
    pairs, y = [], []
    for i, row in enumerate(rows, 1):
        source = row.get("source") or "alt"
        if source not in SOURCES:
            raise ValueError(
                f"{labels}: row {i}: source: expected one of {', '.join(SOURCES)}, got {source!r}"
            )
        image_path = labels.parent / row["image"]
        if str(image_path) not in stats_cache:
            try:
                data = image_path.read_bytes()
                with Image.open(io.BytesIO(data)) as opened:
                    image = opened.convert("RGB")
            except Exception as error:
                raise ValueError(f"{labels}: row {i}: image {image_path} unreadable ({error})") from None
            digest = hashlib.sha256(data).hexdigest()
            stats_cache[str(image_path)] = (image_statistics(image), image.width, image.height, digest)
        stats, width, height, digest = stats_cache[str(image_path)]
        image_features = {**stats, "image_width": float(width), "image_height": float(height)}
        cleaned, features = text_features(str(row["text"]), source)
        pair = PairRecord(
            warc_file="",
            warc_offset=0,
            page_url="",
            site="",
            image_url=row.get("image_url") or str(row["image"]),
            text=cleaned,
            text_source=source,
            text_features=features,
            image_features=image_features,
            image_width=width,
            image_height=height,
            image_sha256=digest,
            image_key=str(row.get("image_key") or digest[:24]),
        )
        pairs.append(pair)
        y.append(parse_label(row["relevant"], f"{labels}: row {i}: relevant"))
    itm = itm_scorer_for(scoring_config) if scoring_config else None
    with_itm = 0
    if itm is not None:
        for pair, probability in zip(pairs, itm.itm_probabilities(pairs), strict=True):
            pair.itm_score = probability
        with_itm = sum(p.itm_score is not None for p in pairs)
        if with_itm == 0:
            raise ValueError(
                f"{labels}: scoring.region_features {scoring_config['region_features']} holds none of the labelled "
                "images; expected rows named by the image's content hash (sha256[:24], or the image_key column), "
                "as the features pipeline names LAIT shard images"
            )
    feature_rows = [pair_features(p) for p in pairs]
    y_arr = np.array(y)
    counts = np.bincount(y_arr, minlength=2)
    if counts.min() < 2:
        raise ValueError(f"{labels}: relevant: need at least 2 rows of each label, got {counts.tolist()}")
    names = sorted({name for row in feature_rows for name in row})
    X = feature_matrix(feature_rows, names)
    from threadpoolctl import threadpool_limits

    model = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=seed)
    cv = StratifiedKFold(n_splits=min(folds, int(counts.min())), shuffle=True, random_state=seed)
    # The labelled set is small by design: one thread fits it ~20x faster than OpenMP threads on a busy machine.
    threads = threadpool_limits(1 if len(y_arr) < 20000 else None)
    out_of_fold = cross_val_predict(model, X, y_arr, cv=cv, method="predict_proba")[:, 1]
    best = (-1.0, 0.5)
    for threshold in np.unique(out_of_fold):
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_arr, out_of_fold >= threshold, average="binary", zero_division=0
        )
        if f1 > best[0]:
            best = (float(f1), float(threshold))
    threshold = best[1]
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_arr, out_of_fold >= threshold, average="binary", zero_division=0
    )
    metrics = {
        "out_of_fold_auc": float(roc_auc_score(y_arr, out_of_fold)),
        "out_of_fold_precision": float(precision),
        "out_of_fold_recall": float(recall),
        "out_of_fold_f1": float(f1),
        "folds": int(cv.get_n_splits()),
    }
    model.fit(X, y_arr)
    threads.restore_original_limits()
    sidecar = {
        "kind": "lait-scorer",
        "feature_names": names,
        "threshold": threshold,
        "metrics": metrics,
        "rows": int(len(y_arr)),
        "positives": int(counts[1]),
        "trained_on": str(labels),
    }
    if itm is not None:
        sidecar["itm_checkpoint"] = str(scoring_config["itm_checkpoint"])
        sidecar["rows_with_itm_score"] = int(with_itm)
    save_skops(model, output, sidecar)
    return sidecar


def _text_features_function(text_config: Mapping[str, Any] | None):
    """Stage 3's cleaning and text features as `(raw text, source) -> (cleaned text, {name: float})`, with the
    vocabulary and boilerplate list of config section `text`, so training sees what the pipeline computes."""
    from . import text as text_stage

    settings = text_stage.text_settings({"text": text_config} if text_config is not None else None)
    vocab = text_stage.load_vocab(settings.vocab)

    def features(raw: str, source: str) -> tuple[str, dict[str, float]]:
        cleaned = text_stage.clean_text(raw) or raw
        return cleaned, {
            k: float(v) for k, v in text_stage.text_features(cleaned, raw, source, vocab).items()
        }

    return features


__all__ = [
    "RULE_SOURCE_PRIOR",
    "SOURCES",
    "ITM_FEATURE",
    "Scorer",
    "check_scoring_settings",
    "feature_matrix",
    "itm_scorer_for",
    "pair_features",
    "scorer_for",
    "stage4_score",
    "train_scorer",
]
