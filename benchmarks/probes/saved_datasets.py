"""Probes of saved datasets (`load_dataset_from_disk` / `validate_dataset`): rows that break the schema's value
rules and damaged Arrow shards."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .harness import F, Probes, good_row


def probe_saved_datasets(p: Probes, work: Path) -> None:
    import datasets

    from modeling_imagebert.data.schema import image_text_features, validate_dataset
    from modeling_imagebert.data.storage import load_dataset_from_disk, save_dataset

    p.entry = "saved datasets"
    base = work / "saved"
    base.mkdir()

    def dataset(change: Callable[[dict], None] | None = None) -> datasets.Dataset:
        rows = [good_row(i) for i in range(3)]
        if change is not None:
            change(rows[1])
        return datasets.Dataset.from_list(rows, features=image_text_features(F))

    good = save_dataset(dataset(), base / "good")
    p.error("path missing", lambda: load_dataset_from_disk(base / "missing"), "missing", "does not exist")
    (base / "file").write_text("x")
    p.error("path is a file", lambda: load_dataset_from_disk(base / "file"), "file")
    (base / "empty").mkdir()
    p.error("folder without state.json", lambda: load_dataset_from_disk(base / "empty"), "state.json")
    datasets.DatasetDict({"test": dataset()}).save_to_disk(str(base / "dict"))
    p.error("a DatasetDict", lambda: load_dataset_from_disk(base / "dict"), "test")
    p.error("feature dim differs", lambda: load_dataset_from_disk(good, feature_dim=16), "16")
    datasets.Dataset.from_dict({"image_id": ["a"], "caption": [1]}).save_to_disk(str(base / "types"))
    p.error("wrong column types", lambda: load_dataset_from_disk(base / "types"), "caption")
    checks = {
        "NaN region feature": (lambda r: r["region_features"].__setitem__((0, 0), np.nan), "region_features"),
        "box outside its image": (
            lambda r: r.update(region_boxes=np.tile([[1, 2, 300, 40]], (3, 1)).astype(np.float32)),
            "region_boxes",
        ),
        "box with x2 < x1": (
            lambda r: r.update(region_boxes=np.tile([[30, 2, 1, 40]], (3, 1)).astype(np.float32)),
            "region_boxes",
        ),
        "negative class id": (lambda r: r.update(region_classes=[-1, 0, 1]), "region_classes"),
        "empty caption": (lambda r: r.update(caption="   "), "caption"),
        "zero image width": (lambda r: r.update(image_width=0), "image_width"),
        "scores and regions differ in count": (lambda r: r.update(region_scores=[0.5]), "region_scores"),
        "NaN score": (lambda r: r.update(region_scores=[0.5, np.nan, 0.5]), "region_scores"),
        "empty image id": (lambda r: r.update(image_id=""), "image_id"),
    }
    for name, (change, field) in checks.items():
        p.error(
            f"validate_dataset: {name}",
            lambda change=change: validate_dataset(dataset(change), show_progress=False),
            "img1" if field != "image_id" else "1",
            field,
        )
    p.error(
        "validate_dataset: class id >= num_classes",
        lambda: validate_dataset(dataset(), num_classes=2, show_progress=False),
        "region_classes",
    )
    p.error(
        "save_dataset refuses an invalid row before writing",
        lambda: save_dataset(dataset(checks["NaN region feature"][0]), base / "never"),
        "region_features",
    )
    arrow = next(good.glob("data-*.arrow"))
    truncated = base / "truncated"
    save_dataset(dataset(), truncated)
    shard = next(truncated.glob("data-*.arrow"))
    shard.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    p.error("truncated Arrow shard", lambda: load_dataset_from_disk(truncated)[:], "arrow")
