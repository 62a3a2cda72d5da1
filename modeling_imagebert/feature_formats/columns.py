"""The image columns, defined once: the part of a row that describes one image's regions.

The image-text schema (`data/schema.py`: these columns plus `caption`) and the `dataset`-format feature shards
(`shards.py`: these columns plus the detector's attributes) are both built from `image_columns`, so the two
cannot drift apart. `datasets` is imported only when the columns are built.
"""

from __future__ import annotations

# In stored order. Boxes are pixel x1, y1, x2, y2 of the original image; classes and scores come from the detector.
IMAGE_COLUMNS = (
    "image_id",
    "region_features",
    "region_boxes",
    "image_width",
    "image_height",
    "region_classes",
    "region_scores",
)
GLOBAL_FEATURE_COLUMN = "global_feature"


def image_columns(feature_dim: int) -> dict:
    """The `datasets` types of `IMAGE_COLUMNS`, in order: image_id string, region_features Array2D (N, F) float16,
    region_boxes Array2D (N, 4) float32, image_width / image_height int32, region_classes Sequence(int32),
    region_scores Sequence(float32)."""
    from datasets import Array2D, Sequence, Value

    return {
        "image_id": Value("string"),
        "region_features": Array2D(shape=(None, feature_dim), dtype="float16"),
        "region_boxes": Array2D(shape=(None, 4), dtype="float32"),
        "image_width": Value("int32"),
        "image_height": Value("int32"),
        "region_classes": Sequence(Value("int32")),
        "region_scores": Sequence(Value("float32")),
    }


def global_feature_column():
    """The `datasets` type of the optional whole-image feature: Sequence(float32), length G."""
    from datasets import Sequence, Value

    return Sequence(Value("float32"))


__all__ = ["GLOBAL_FEATURE_COLUMN", "IMAGE_COLUMNS", "global_feature_column", "image_columns"]
