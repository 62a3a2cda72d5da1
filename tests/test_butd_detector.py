"""The BUTD detector: building blocks against torchvision / hand-computed values, preprocessing, selection, and the
whole detector on real photographs (scikit-image's), batched == single image."""

import math

import numpy as np
import pytest
import torch
from torchvision import ops

from modeling_imagebert.features import BUTDConfig, BUTDDetector, BUTDImageProcessor
from modeling_imagebert.features.modeling_butd import (
    _nms_from_iou,
    batched_max_confidence,
    box_iou,
    caffe_cell_anchors,
    clip_boxes,
    decode_boxes,
    detectron2_cell_anchors,
    nms,
    per_class_max_confidence,
    select_regions,
)

skimage_data = pytest.importorskip("skimage.data")

TINY = dict(
    stem_out_channels=8,
    stage_depths=[1, 1, 1],
    res5_depth=1,
    res2_bottleneck_channels=4,
    res2_out_channels=16,
    rpn_hidden_channels=16,
    num_classes=11,
    num_attributes=6,
    attribute_embedding_dim=8,
    attribute_hidden_dim=8,
    rpn_pre_nms_top_n=300,
    rpn_post_nms_top_n=60,
)
OUTPUT_KEYS = {
    "boxes",
    "features",
    "classes",
    "scores",
    "attributes",
    "attribute_scores",
    "image_width",
    "image_height",
}


def tiny_detector(seed: int = 0, **overrides) -> BUTDDetector:
    torch.manual_seed(seed)
    return BUTDDetector(BUTDConfig(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    # coffee (400x600) and rocket (427x640) resize to the same shape, so a batch holds a real same-shape group.
    return [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(), skimage_data.rocket()]


@pytest.fixture(scope="module")
def small_processor() -> BUTDImageProcessor:
    return BUTDImageProcessor(min_size=200, max_size=333)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


def test_caffe_anchors_equal_py_faster_rcnn_generate_anchors_output():
    # The 9 anchors py-faster-rcnn prints for base 16, scales (8, 16, 32), ratios (0.5, 1, 2).
    expected = torch.tensor(
        [
            [-84, -40, 99, 55],
            [-176, -88, 191, 103],
            [-360, -184, 375, 199],
            [-56, -56, 71, 71],
            [-120, -120, 135, 135],
            [-248, -248, 263, 263],
            [-36, -80, 51, 95],
            [-80, -168, 95, 183],
            [-168, -344, 183, 359],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(caffe_cell_anchors([128, 256, 512], [0.5, 1.0, 2.0]), expected)


def test_detectron2_anchors_keep_area_and_ratio():
    anchors = detectron2_cell_anchors([64, 128], [0.5, 1.0, 2.0])
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    torch.testing.assert_close(widths * heights, torch.tensor([64.0**2] * 3 + [128.0**2] * 3))
    torch.testing.assert_close(heights / widths, torch.tensor([0.5, 1.0, 2.0] * 2))
    torch.testing.assert_close(anchors[:, :2] + anchors[:, 2:], torch.zeros(6, 2))  # centred on (0, 0)


def test_box_decoding_matches_hand_computed_values():
    box = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[0.1, 0.2, math.log(2.0), 0.0]])
    # Detectron2: w 10, h 20, centre (5, 10) -> centre (6, 14), w 20, h 20.
    torch.testing.assert_close(
        decode_boxes(deltas, box, (1, 1, 1, 1)), torch.tensor([[-4.0, 4.0, 16.0, 24.0]])
    )
    # Caffe: w 11, h 21, centre (5.5, 10.5) -> centre (6.6, 14.7), w 22, h 21; x2 = ctr + w / 2 - 1.
    torch.testing.assert_close(
        decode_boxes(deltas, box, (1, 1, 1, 1), offset=1.0), torch.tensor([[-4.4, 4.2, 16.6, 24.2]])
    )
    # Weights divide the deltas; two class-specific boxes decode independently.
    two = decode_boxes(
        torch.cat([deltas * torch.tensor([10, 10, 5, 5]), torch.zeros(1, 4)], 1), box, (10, 10, 5, 5)
    )
    torch.testing.assert_close(two, torch.tensor([[-4.0, 4.0, 16.0, 24.0, 0.0, 0.0, 10.0, 20.0]]))


def test_clip_boxes_caps_at_the_image_with_caffe_inclusive_bounds():
    boxes = torch.tensor([[-5.0, -1.0, 700.0, 300.0]])
    assert clip_boxes(boxes, 200, 640).tolist() == [[0.0, 0.0, 640.0, 200.0]]
    assert clip_boxes(boxes, 200, 640, offset=1.0).tolist() == [[0.0, 0.0, 639.0, 199.0]]


def test_roi_pooling_at_known_boxes_matches_hand_computed_maxima():
    detector = tiny_detector(roi_pool_size=2)
    channels = detector.config.res2_out_channels * 4
    # One feature map (stride 16) whose value at (y, x) is 10 * y + x in every channel.
    grid = (
        (10 * torch.arange(6.0)[:, None] + torch.arange(8.0)[None, :]).expand(1, channels, 6, 8).contiguous()
    )
    # Box (16, 32, 64, 80) px -> feature cells x 1..4, y 2..5 (rounded, inclusive as Caffe): 2x2 bins of 2x2 cells.
    pooled = detector.roi_heads.pool(grid, [torch.tensor([[16.0, 32.0, 64.0, 80.0]])])
    expected = torch.tensor([[32.0, 34.0], [52.0, 54.0]])
    assert pooled.shape == (1, channels, 2, 2)
    assert torch.equal(pooled[0, 0], expected) and torch.equal(pooled[0, -1], expected)
    torch.testing.assert_close(
        pooled, ops.roi_pool(grid, torch.tensor([[0.0, 16.0, 32.0, 64.0, 80.0]]), 2, spatial_scale=1 / 16)
    )


def test_nms_equals_torchvision_and_runs_many_score_rows_at_once():
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(60, 2, generator=generator) * 100
    boxes = torch.cat([corners, corners + 10 + torch.rand(60, 2, generator=generator) * 40], dim=1)
    scores = torch.rand(5, 60, generator=generator)
    for row in range(5):
        assert torch.equal(nms(boxes, scores[row], 0.3), ops.nms(boxes, scores[row], 0.3))
    rows = _nms_from_iou(box_iou(boxes, boxes), scores, 0.3)
    for row in range(5):
        assert torch.equal(rows[row], ops.nms(boxes, scores[row], 0.3))
    # Caffe's inclusive-pixel IoU: integer boxes shifted by one pixel gain one pixel of width and height.
    assert box_iou(torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([[0.0, 0, 9, 9]]), offset=1.0).item() == 1.0
    torch.testing.assert_close(
        box_iou(torch.tensor([[0.0, 0, 9, 9]]), torch.tensor([[5.0, 0, 14, 9]]), offset=1.0),
        torch.tensor([[1 / 3]]),
    )


def test_per_class_nms_confidence_on_hand_made_scores():
    # Boxes 0 and 1 overlap (IoU 100 / 110); box 2 is apart.
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 11], [50.0, 50, 60, 60]])
    scores = torch.tensor(
        [
            [0.9, 0.05],  # box 0: best for class 0
            [0.6, 0.30],  # box 1: suppressed by box 0 in class 0, but best of class 1 -> 0.30
            [0.1, 0.02],  # box 2: survives everywhere -> 0.1
        ]
    )
    torch.testing.assert_close(per_class_max_confidence(boxes, scores, 0.3), torch.tensor([0.9, 0.3, 0.1]))
    # With a loose threshold nothing is suppressed: each box keeps its best class score.
    torch.testing.assert_close(per_class_max_confidence(boxes, scores, 0.95), torch.tensor([0.9, 0.6, 0.1]))


def test_batched_confidence_equals_one_image_at_a_time():
    generator = torch.Generator().manual_seed(4)
    boxes, scores = [], []
    for count in (7, 0, 12):  # different counts: padding must not change any image's result
        corners = torch.rand(count, 2, generator=generator) * 50
        boxes.append(
            torch.cat([corners, corners + 5 + torch.rand(count, 2, generator=generator) * 30], dim=1)
        )
        scores.append(torch.rand(count, 6, generator=generator).softmax(dim=-1))
    together = batched_max_confidence(boxes, scores, 0.3)
    for image_boxes, image_scores, confidence in zip(boxes, scores, together, strict=True):
        alone = per_class_max_confidence(image_boxes, image_scores, 0.3)
        assert confidence.shape == (len(image_boxes),) and torch.equal(confidence, alone)
    # And equal to running torchvision's NMS class by class.
    expected = torch.zeros(12)
    for k in range(6):
        keep = ops.nms(boxes[2], scores[2][:, k], 0.3)
        expected[keep] = torch.maximum(expected[keep], scores[2][keep, k])
    torch.testing.assert_close(together[2], expected)


def test_selection_honours_threshold_and_min_max_bounds():
    confidence = torch.linspace(0.0, 1.0, 200)
    assert select_regions(confidence, 0.2, 10, 100).tolist() == list(
        range(199, 99, -1)
    )  # 160 pass -> best 100
    assert len(select_regions(confidence, 0.99, 10, 100)) == 10  # 2 pass -> topped up to 10
    assert len(select_regions(confidence, 0.5, 10, 100)) == 100
    assert len(select_regions(confidence, 0.9, 10, 100)) == 20  # 20 pass, within bounds
    assert len(select_regions(confidence[:5], 0.0, 10, 100)) == 5  # fewer candidates than min_boxes
    assert len(select_regions(confidence, 0.2, 36, 36)) == 36  # fixed count


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing
# ----------------------------------------------------------------------------------------------------------------------


def test_processor_resizes_as_caffe_and_subtracts_bgr_means():
    processor = BUTDImageProcessor()
    image = np.zeros((100, 300, 3), dtype=np.uint8)
    image[...] = (10, 20, 30)  # RGB
    item = processor.preprocess_one(image)
    # 600 / 100 would make the long side 1800 > 1000, so the long side is capped: scale 1000 / 300.
    assert item["scale"] == pytest.approx(1000 / 300)
    assert item["image_size"] == (333, 1000) and item["original_size"] == (100, 300)
    expected = torch.tensor([30 - 102.9801, 20 - 115.9465, 10 - 122.7717])  # B, G, R
    torch.testing.assert_close(item["pixel_values"][:, 5, 5], expected)
    assert processor.preprocess_one(np.zeros((480, 640, 3), np.uint8))["image_size"] == (600, 800)


def test_processor_rejects_non_rgb_input_naming_the_image():
    with pytest.raises(ValueError, match=r"cat\.png: expected shape \(H, W, 3\)"):
        BUTDImageProcessor().preprocess_one(np.zeros((10, 10), np.uint8), name="cat.png")


def test_processor_settings_round_trip(tmp_path):
    BUTDImageProcessor(min_size=400, max_size=700).save_pretrained(tmp_path)
    loaded = BUTDImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_size, loaded.max_size) == (400, 700)


# ----------------------------------------------------------------------------------------------------------------------
# The whole detector
# ----------------------------------------------------------------------------------------------------------------------


def test_detector_runs_end_to_end_on_real_photographs(photos, small_processor):
    detector = tiny_detector(min_boxes=5, max_boxes=20)
    images = photos + [skimage_data.stereo_motorcycle()[0]]
    results = detector.detect(images, processor=small_processor)
    assert len(results) == len(images)
    for image, result in zip(images, results, strict=True):
        assert set(result) == OUTPUT_KEYS
        assert (result["image_height"], result["image_width"]) == image.shape[:2]
        count = len(result["boxes"])
        assert 5 <= count <= 20
        assert result["boxes"].dtype == np.float32 and result["boxes"].shape == (count, 4)
        assert result["features"].dtype == np.float32 and result["features"].shape == (count, 128)
        assert np.isfinite(result["features"]).all()
        boxes = result["boxes"]
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= image.shape[1] + 1e-3).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 3] <= image.shape[0] + 1e-3).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert (
            result["classes"].dtype == np.int64
            and ((0 <= result["classes"]) & (result["classes"] < 10)).all()
        )
        assert ((0 <= result["attributes"]) & (result["attributes"] < 5)).all()
        assert ((0 < result["scores"]) & (result["scores"] <= 1)).all()


@pytest.mark.parametrize("final_boxes", ["proposals", "regressed"])
def test_features_are_pooled_at_the_returned_boxes(photos, small_processor, final_boxes):
    detector = tiny_detector(final_boxes=final_boxes, fixed_boxes=12)
    result = detector.detect(photos[:1], processor=small_processor)[0]
    assert len(result["boxes"]) == 12
    item = small_processor.preprocess_one(photos[0])
    with torch.no_grad():
        res4 = detector.backbone(item["pixel_values"][None])
        boxes = torch.from_numpy(result["boxes"]) * item["scale"]
        again = detector.roi_heads(detector.roi_heads.pool(res4, [boxes]))["features"]
    np.testing.assert_allclose(again.numpy(), result["features"], atol=1e-4)


def test_detections_in_a_call_are_bit_identical_to_single_image_ones(photos, small_processor):
    detector = tiny_detector()
    together = detector.detect(photos, processor=small_processor)
    for image, result in zip(photos, together, strict=True):
        alone = detector.detect([image], processor=small_processor)[0]
        for key in OUTPUT_KEYS:
            assert np.array_equal(alone[key], result[key]), key


def test_batched_detections_equal_single_image_ones(photos, small_processor):
    detector = tiny_detector()
    batched = detector.detect(photos, processor=small_processor, batch_invariant=False)
    for image, together in zip(photos, batched, strict=True):
        alone = detector.detect([image], processor=small_processor)[0]
        assert len(alone["boxes"]) == len(together["boxes"])
        # Boxes decode random deltas through exp: compare relatively.
        np.testing.assert_allclose(alone["boxes"], together["boxes"], rtol=1e-4, atol=1e-3)
        assert np.abs(alone["features"] - together["features"]).max() <= 1e-4
        assert np.array_equal(alone["classes"], together["classes"])


def test_full_size_batched_features_equal_single_image_ones(photos, small_processor):
    # The whole ResNet-101 BUTD architecture (2048-d features, 1601 classes, 401 attributes) on small images and
    # few proposals to stay fast on a CPU.
    torch.manual_seed(0)
    detector = BUTDDetector(BUTDConfig(rpn_pre_nms_top_n=200, rpn_post_nms_top_n=8, fixed_boxes=5)).eval()
    images = [photos[1], photos[3]]  # coffee and rocket share a resized shape: one backbone batch of two
    batched = detector.detect(images, processor=small_processor, batch_invariant=False)
    for image, together in zip(images, batched, strict=True):
        alone = detector.detect([image], processor=small_processor)[0]
        assert together["features"].shape == (5, 2048)
        assert np.abs(alone["features"] - together["features"]).max() <= 1e-4


def test_detector_save_and_load_is_bit_exact(tmp_path, photos, small_processor):
    detector = tiny_detector(seed=3, anchor_style="caffe", box_size_offset=1.0)
    detector.save_pretrained(tmp_path)
    loaded = BUTDDetector.from_pretrained(tmp_path).eval()
    for key, value in detector.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    first = detector.detect(photos[:1], processor=small_processor)[0]
    second = loaded.detect(photos[:1], processor=small_processor)[0]
    assert np.array_equal(first["features"], second["features"])


# ----------------------------------------------------------------------------------------------------------------------
# Parity check (what a user with the real weights runs)
# ----------------------------------------------------------------------------------------------------------------------


def _write_reference(tmp_path, photos, detections) -> tuple:
    """Photos as PNG files and `detections` as a BUTD TSV, in the layout of the community's releases."""
    from fixtures_formats import write_butd_tsv
    from PIL import Image

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    rows = []
    for index, (photo, found) in enumerate(zip(photos, detections, strict=True)):
        Image.fromarray(photo).save(image_dir / f"img{index}.png")
        rows.append(
            {
                "img_id": f"img{index}",
                "img_h": photo.shape[0],
                "img_w": photo.shape[1],
                "objects_id": found["classes"],
                "objects_conf": found["scores"],
                "attrs_id": found["attributes"],
                "attrs_conf": found["attribute_scores"],
                "num_boxes": len(found["boxes"]),
                "boxes": found["boxes"],
                "features": found["features"],
            }
        )
    return image_dir, write_butd_tsv(tmp_path / "reference.tsv", rows)


def test_parity_check_passes_on_its_own_features_and_flags_other_weights(tmp_path, photos, small_processor):
    from modeling_imagebert.features.parity import index_images, reference_records, run_parity

    detector = tiny_detector(seed=0, fixed_boxes=8)
    images = photos[:2]
    image_dir, tsv = _write_reference(tmp_path, images, detector.detect(images, processor=small_processor))
    same = run_parity(detector, small_processor, reference_records(str(tsv), None), index_images(image_dir))
    figures = same.figures()
    assert len(same.images) == 2 and same.verdict() == (True, [])
    assert (
        figures["cosine_at_reference"] > 0.999 and figures["mean_best_iou"] > 0.999
    )  # float16 features only
    assert figures["class_agreement_at_reference"] == 1.0

    other = run_parity(
        tiny_detector(seed=1, fixed_boxes=8),
        small_processor,
        reference_records(str(tsv), None),
        index_images(image_dir),
    )
    passed, failures = other.verdict()
    assert not passed and any(failure.startswith("cosine_at_reference") for failure in failures)


def test_parity_command_reports_a_verdict(tmp_path, photos, small_processor, capsys):
    from modeling_imagebert.features.parity import main

    detector = tiny_detector(seed=0, fixed_boxes=8)
    image_dir, tsv = _write_reference(
        tmp_path, photos[:1], detector.detect(photos[:1], processor=small_processor)
    )
    detector.save_pretrained(tmp_path / "butd")
    small_processor.save_pretrained(tmp_path / "butd")
    args = ["--detector", str(tmp_path / "butd"), "--images", str(image_dir), "--reference-tsv", str(tsv)]
    assert main(args + ["--fixed-boxes", "8"]) == 0
    out = capsys.readouterr().out
    assert "images compared: 1" in out and "verdict: PASS" in out


def test_bf16_loading_keeps_the_rpn_and_its_anchors_in_float32(tmp_path, photos, small_processor):
    detector = tiny_detector(seed=5, fixed_boxes=6)
    detector.save_pretrained(tmp_path)
    half = BUTDDetector.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert half.backbone.stem.conv1.weight.dtype == torch.bfloat16
    assert half.proposal_generator.cell_anchors.dtype == torch.float32
    assert torch.equal(half.proposal_generator.cell_anchors, detector.proposal_generator.cell_anchors)
    result = half.detect(photos[:1], processor=small_processor)[0]
    assert result["features"].dtype == np.float32 and result["features"].shape == (6, 128)


def test_parity_reads_uniter_npz_references_sizing_boxes_from_the_images(tmp_path, photos, small_processor):
    from fixtures_formats import write_uniter_npz

    from modeling_imagebert.features.parity import index_images, reference_records, run_parity

    detector = tiny_detector(seed=0, fixed_boxes=8)
    image_dir, _ = _write_reference(
        tmp_path, photos[:1], detector.detect(photos[:1], processor=small_processor)
    )
    found = detector.detect(photos[:1], processor=small_processor)[0]
    height, width = photos[0].shape[:2]
    write_uniter_npz(
        tmp_path / "npz",
        {
            "img_id": "img0",
            "img_w": width,
            "img_h": height,
            "num_boxes": len(found["boxes"]),
            "boxes": found["boxes"],
            "features": found["features"],
            "objects_id": found["classes"],
            "objects_conf": found["scores"],
        },
        num_classes=10,
    )  # no image size inside, as UNITER's dumps
    images = index_images(image_dir)
    summary = run_parity(
        detector, small_processor, reference_records(None, str(tmp_path / "npz"), images), images
    )
    assert len(summary.images) == 1 and summary.verdict() == (True, [])
    assert summary.figures()["mean_best_iou"] > 0.99
