"""Training the stage-2 "unnatural / non-learnable" image filter of LAIT (`python -m modeling_imagebert.lait
train-filter`): gradient boosting on cheap image statistics (`images.image_statistics`) of a labelled file, saved
with skops (`classifier_io`) for `images.classifiers` entries of type `sklearn`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..safe_loading import IMAGE_MAX_BYTES, read_input_bytes
from .classifier_io import parse_label, read_labelled_rows, save_skops
from .images import IMAGE_STAT_NAMES, image_statistics, stats_vector


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
            # a regular file read with a cap: a FIFO would block, /dev/zero would fill the memory
            with Image.open(
                io.BytesIO(read_input_bytes(image_path, "a label image", IMAGE_MAX_BYTES))
            ) as opened:
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


__all__ = ["train_image_filter"]
