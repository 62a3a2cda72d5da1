"""The one dataset schema for image-text pairs, shared by importers, the toy world, the processor and collators.

One row is one (image, caption) pair. Region arrays are in detector order (the processor keeps the top
`max_regions` by `region_scores`); boxes are in pixels of the original image.

| column            | type                         | meaning                                              |
|-------------------|------------------------------|------------------------------------------------------|
| image_id          | string                       | identifies the image; captions of one image share it |
| caption           | string                       | the text, non-empty UTF-8                            |
| region_features   | Array2D (N, F) float16       | pooled RoI features                                  |
| region_boxes      | Array2D (N, 4) float32       | pixel boxes x1, y1, x2, y2                           |
| image_width       | int32                        | W in pixels                                          |
| image_height      | int32                        | H in pixels                                          |
| region_classes    | Sequence(int32), length N    | detector class ids (targets of MOC)                  |
| region_scores     | Sequence(float32), length N  | detector confidences                                 |
| global_feature    | Sequence(float32), optional  | a whole-image feature (paper ablation)               |
"""

from datasets import Array2D, Features, Sequence, Value


def image_text_features(feature_dim: int = 2048, with_global_feature: bool = False) -> Features:
    """The `datasets.Features` of an image-text dataset with `feature_dim`-d region features."""
    columns = {
        "image_id": Value("string"),
        "caption": Value("string"),
        "region_features": Array2D(shape=(None, feature_dim), dtype="float16"),
        "region_boxes": Array2D(shape=(None, 4), dtype="float32"),
        "image_width": Value("int32"),
        "image_height": Value("int32"),
        "region_classes": Sequence(Value("int32")),
        "region_scores": Sequence(Value("float32")),
    }
    if with_global_feature:
        columns["global_feature"] = Sequence(Value("float32"))
    return Features(columns)


IMAGE_TEXT_FEATURES = image_text_features()
