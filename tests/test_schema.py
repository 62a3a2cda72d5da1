import math

import datasets
import numpy as np
import pytest
import torch

from modeling_imagebert.data.schema import (
    DataValidationError,
    image_text_features,
    validate_dataset,
    validate_features,
    validate_record,
)

F = 4  # feature_dim
INDEX = 7


def good_record(num_regions: int = 3, image_id: str = "img-7") -> dict:
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 10, 10], [5, 5, 640, 480], [100, 50, 100, 60]], np.float32)[:num_regions]
    return {
        "image_id": image_id,
        "caption": "A dog runs on the grass.",
        "region_features": rng.standard_normal((num_regions, F)).astype(np.float16),
        "region_boxes": boxes,
        "image_width": 640,
        "image_height": 480,
        "region_classes": np.arange(num_regions, dtype=np.int32),
        "region_scores": np.linspace(0.9, 0.1, num_regions).astype(np.float32),
    }


def assert_rejected(record, field, found, **kwargs):
    with pytest.raises(DataValidationError) as info:
        validate_record(record, INDEX, **kwargs)
    message = str(info.value)
    assert f"record {INDEX}" in message
    if record.get("image_id") and str(record["image_id"]).strip():
        assert f"image_id={record['image_id']!r}" in message
    assert f"field {field!r}" in message
    assert found in message, message
    return message


def test_valid_record_passes_in_numpy_lists_and_torch():
    validate_record(good_record(), INDEX, feature_dim=F, num_classes=3)
    as_lists = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in good_record().items()}
    validate_record(as_lists, INDEX, feature_dim=F, num_classes=3)
    as_torch = {
        k: (torch.from_numpy(v) if isinstance(v, np.ndarray) else v) for k, v in good_record().items()
    }
    as_torch["image_width"] = torch.tensor(640, dtype=torch.int32)
    validate_record(as_torch, INDEX, feature_dim=F, num_classes=3)


def test_record_without_regions_is_valid():
    validate_record(good_record(num_regions=0), INDEX, feature_dim=F)
    empty_lists = {
        **good_record(),
        "region_features": [],
        "region_boxes": [],
        "region_classes": [],
        "region_scores": [],
    }
    validate_record(empty_lists, INDEX, feature_dim=F)


def test_zero_area_box_on_image_border_and_utf8_bytes_caption_are_valid():
    record = good_record()
    record["region_boxes"][2] = [640, 480, 640, 480]
    record["caption"] = "un café".encode()
    validate_record(record, INDEX, feature_dim=F)


def test_missing_column_is_named():
    record = good_record()
    del record["caption"]
    assert_rejected(record, "caption", "no such column")


def test_unexpected_column_is_named():
    assert_rejected({**good_record(), "url": "http://x"}, "url", "unexpected column")


def test_missing_global_feature_when_required():
    assert_rejected(good_record(), "global_feature", "no such column", require_global_feature=True)


def test_region_features_must_be_two_dimensional():
    record = {**good_record(), "region_features": np.zeros((3, F, 2), np.float16)}
    assert_rejected(record, "region_features", "found shape (3, 4, 2); expected a 2-D array")


def test_region_features_must_have_feature_dim_columns():
    record = {**good_record(), "region_features": np.zeros((3, F + 1), np.float16)}
    assert_rejected(record, "region_features", "expected [N, 4]", feature_dim=F)


def test_empty_region_features_with_wrong_width_are_rejected():
    record = {**good_record(num_regions=0), "region_features": np.zeros((0, F + 1), np.float16)}
    assert_rejected(record, "region_features", "found shape (0, 5)", feature_dim=F)


def test_boxes_must_be_n_by_4():
    assert_rejected({**good_record(), "region_boxes": np.zeros((3, 3))}, "region_boxes", "expected [3, 4]")
    assert_rejected({**good_record(), "region_boxes": np.zeros((2, 4))}, "region_boxes", "found shape (2, 4)")


def test_classes_and_scores_must_have_one_entry_per_region():
    assert_rejected(
        {**good_record(), "region_classes": [1, 2]}, "region_classes", "expected a 1-D array of length 3"
    )
    assert_rejected({**good_record(), "region_scores": [0.1] * 4}, "region_scores", "found shape (4,)")


def test_non_numeric_boxes_and_scores_are_rejected():
    assert_rejected(
        {**good_record(), "region_boxes": [["a", "b", "c", "d"]] * 3}, "region_boxes", "found dtype <U1"
    )
    assert_rejected({**good_record(), "region_scores": ["high"] * 3}, "region_scores", "found dtype <U4")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_region_features_are_rejected(bad):
    record = good_record()
    record["region_features"][1, 2] = bad
    assert_rejected(record, "region_features", "region 1")


def test_non_finite_boxes_are_rejected():
    record = good_record()
    record["region_boxes"][2, 0] = np.nan
    assert_rejected(record, "region_boxes", "NaN or Inf in region 2")


def test_non_finite_scores_are_rejected():
    record = good_record()
    record["region_scores"][0] = np.inf
    assert_rejected(record, "region_scores", "found inf in region 0")


def test_non_finite_global_feature_is_rejected():
    record = {**good_record(), "global_feature": np.array([0.0, np.nan, 1.0], np.float32)}
    assert_rejected(record, "global_feature", "found nan at position 1")


@pytest.mark.parametrize(
    "box",
    [[-1, 0, 10, 10], [0, -0.5, 10, 10], [0, 0, 641, 10], [0, 0, 10, 480.5]],
    ids=["x1", "y1", "x2", "y2"],
)
def test_boxes_outside_the_image_are_rejected(box):
    record = good_record()
    record["region_boxes"][1] = box
    assert_rejected(record, "region_boxes", "region 1")
    assert "expected inside [0, 640] x [0, 480]" in assert_rejected(
        record, "region_boxes", "outside the image"
    )


@pytest.mark.parametrize("box", [[20, 0, 10, 10], [0, 20, 10, 10]], ids=["x2<x1", "y2<y1"])
def test_inverted_boxes_are_rejected(box):
    record = good_record()
    record["region_boxes"][0] = box
    assert_rejected(record, "region_boxes", "inverted box in region 0")


@pytest.mark.parametrize("field,value", [("image_width", 0), ("image_height", -5)])
def test_image_size_must_be_positive(field, value):
    assert_rejected({**good_record(), field: value}, field, f"found {value}; expected a positive integer")


def test_image_size_must_be_an_integer():
    assert_rejected({**good_record(), "image_width": 640.0}, "image_width", "float")


@pytest.mark.parametrize("caption", ["", "   \n\t"])
def test_empty_or_whitespace_caption_is_rejected(caption):
    assert_rejected({**good_record(), "caption": caption}, "caption", "expected non-empty text")


def test_caption_bytes_that_are_not_utf8_are_rejected():
    assert_rejected({**good_record(), "caption": b"caf\xe9"}, "caption", "not valid UTF-8")


def test_caption_with_lone_surrogate_is_rejected():
    assert_rejected({**good_record(), "caption": "bad \udc80 text"}, "caption", "lone surrogate")


def test_image_id_with_lone_surrogate_is_rejected():
    record = good_record(image_id="img-\ud800")
    message = assert_rejected(record, "image_id", "lone surrogate")
    message.encode("utf-8")  # the message itself can be printed and logged: the id is escaped


def test_class_ids_out_of_range_are_rejected():
    record = good_record()
    record["region_classes"][2] = 3
    assert_rejected(record, "region_classes", "found class id 3 in region 2", num_classes=3)
    record["region_classes"][2] = -1
    assert_rejected(record, "region_classes", "found class id -1 in region 2")


@pytest.mark.parametrize("score", [1.5, -0.25])
def test_scores_outside_unit_interval_are_rejected(score):
    record = good_record()
    record["region_scores"][1] = score
    assert_rejected(record, "region_scores", f"found {score} in region 1")


@pytest.mark.parametrize("image_id", ["", "  "])
def test_empty_image_id_is_rejected(image_id):
    message = assert_rejected(good_record(image_id=image_id), "image_id", "expected a non-empty identifier")
    assert message.startswith(f"record {INDEX},")


def test_every_problem_of_a_record_is_reported_at_once():
    record = {**good_record(), "caption": "", "image_height": 0}
    record["region_scores"][0] = 2.0
    with pytest.raises(DataValidationError) as info:
        validate_record(record, INDEX)
    lines = str(info.value).splitlines()
    assert [line.split("field ")[1].split(":")[0] for line in lines] == [
        "'caption'",
        "'image_height'",
        "'region_scores'",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Datasets


def make_dataset(records, with_global_feature=False):
    return datasets.Dataset.from_list(records, features=image_text_features(F, with_global_feature))


def test_validate_dataset_counts_rows_of_a_valid_dataset():
    records = [good_record(num_regions=n, image_id=f"img-{i}") for i, n in enumerate([3, 0, 2, 1, 3])]
    assert validate_dataset(make_dataset(records), num_classes=3, batch_size=2, show_progress=False) == 5


def test_validate_dataset_names_bad_rows_by_global_index_across_batches():
    records = [good_record(image_id=f"img-{i}") for i in range(7)]
    records[3]["caption"] = " "
    records[6]["region_boxes"] = records[6]["region_boxes"] + np.float32(1000)
    with pytest.raises(DataValidationError) as info:
        validate_dataset(make_dataset(records), batch_size=2, show_progress=False)
    message = str(info.value)
    assert message.startswith("2 of 7 records are invalid")
    assert "record 3 (image_id='img-3'), field 'caption'" in message
    assert "record 6 (image_id='img-6'), field 'region_boxes'" in message


def test_validate_dataset_keeps_at_most_max_errors_messages_and_the_total():
    records = [good_record(image_id=f"img-{i}") for i in range(6)]
    for record in records:
        record["region_scores"] = record["region_scores"] + np.float32(5)
    with pytest.raises(DataValidationError) as info:
        validate_dataset(make_dataset(records), max_errors=2, batch_size=4, show_progress=False)
    message = str(info.value)
    assert message.startswith("6 of 6 records are invalid (the first 2 listed)")
    assert message.count("field 'region_scores'") == 2


def test_validate_dataset_checks_global_feature_when_the_column_exists():
    records = [{**good_record(image_id=f"img-{i}"), "global_feature": [1.0, 2.0]} for i in range(3)]
    records[1]["global_feature"] = [1.0, float("inf")]
    with pytest.raises(DataValidationError, match=r"record 1 \(image_id='img-1'\), field 'global_feature'"):
        validate_dataset(make_dataset(records, with_global_feature=True), show_progress=False)


def test_validate_features_names_wrongly_typed_missing_and_extra_columns():
    features = image_text_features(F)
    features["region_features"] = datasets.Array2D(shape=(None, F), dtype="float32")
    del features["caption"]
    features["url"] = datasets.Value("string")
    with pytest.raises(DataValidationError) as info:
        validate_features(features)
    message = str(info.value)
    assert "column 'region_features' has type" in message and "dtype='float16'" in message
    assert "column 'caption' is missing" in message
    assert "column 'url' is unexpected" in message


def test_validate_features_checks_feature_dim():
    with pytest.raises(DataValidationError, match="column 'region_features'"):
        validate_features(image_text_features(F), feature_dim=F + 1)
    assert validate_features(image_text_features(F)) == F
