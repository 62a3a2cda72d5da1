"""Parity check of a converted BUTD detector against reference features of the same images.

What cannot be checked without the real weights is whether our detector, loaded from a converted checkpoint,
reproduces the features the community extracted with the original Caffe model. A user who has the weights, some
images and the reference features for them (an LXMERT / Oscar BUTD `.tsv`, or a folder of UNITER /
bottom-up-attention.pytorch `.npz`) runs:

    python -m modeling_imagebert.features.parity --detector butd-vg/ --images val2014/ \
        --reference-tsv coco_val2014_36.tsv --limit 50 --fixed-boxes 36

Two comparisons per image:

- at the reference boxes: our features, classes and attributes pooled at exactly the reference boxes. This isolates
  the network and preprocessing (weights, BGR order, pixel means, resizing, RoI pooling) from region selection;
  with the right weights the cosine is close to 1 (Caffe and PyTorch convolutions differ in the last bits).
- end to end: our own regions. Each reference box is matched to our box of highest IoU; reported are the mean best
  IoU, the share of reference boxes matched at IoU >= 0.5, the feature cosine and class agreement of matched
  pairs, and the region counts.

The verdict is PASS when, over all images, the median cosine at the reference boxes is >= 0.98, their class
agreement >= 0.9, and end to end the mean best IoU >= 0.7 with matched cosine >= 0.9; these are heuristics, and the
summary prints every figure so they can be judged. A low cosine at the reference boxes points at the weights or
the preprocessing (the LXMERT demo's RGB / BGR mix-up gives a visibly lower cosine); good reference-box figures
with poor end-to-end ones point at proposals and selection (anchors, NMS, thresholds, box conventions).
"""

import argparse
import statistics
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
THRESHOLDS = {
    "cosine_at_reference": 0.98,
    "class_agreement_at_reference": 0.9,
    "mean_best_iou": 0.7,
    "matched_cosine": 0.9,
}


@dataclass
class ImageParity:
    """Figures for one image."""

    image_id: str
    cosine_at_reference: float
    class_agreement_at_reference: float | None
    mean_best_iou: float
    recall_at_05: float
    matched_cosine: float | None
    matched_class_agreement: float | None
    our_count: int
    reference_count: int


@dataclass
class ParitySummary:
    images: list[ImageParity] = field(default_factory=list)
    missing_images: list[str] = field(default_factory=list)

    def figures(self) -> dict[str, float | None]:
        """Medians / means over the images (None when no image has the figure)."""

        def median(values: Iterable[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return statistics.median(present) if present else None

        def mean(values: Iterable[float | None]) -> float | None:
            present = [v for v in values if v is not None]
            return float(np.mean(present)) if present else None

        rows = self.images
        return {
            "cosine_at_reference": median(r.cosine_at_reference for r in rows),
            "class_agreement_at_reference": mean(r.class_agreement_at_reference for r in rows),
            "mean_best_iou": mean(r.mean_best_iou for r in rows),
            "recall_at_05": mean(r.recall_at_05 for r in rows),
            "matched_cosine": median(r.matched_cosine for r in rows),
            "matched_class_agreement": mean(r.matched_class_agreement for r in rows),
            "mean_count_difference": mean(abs(r.our_count - r.reference_count) for r in rows),
        }

    def verdict(self) -> tuple[bool, list[str]]:
        """(passed, the failed checks as 'name value < threshold')."""
        if not self.images:
            return False, ["no image compared"]
        figures = self.figures()
        failures = []
        for name, threshold in THRESHOLDS.items():
            value = figures[name]
            if value is not None and value < threshold:
                failures.append(f"{name} {value:.3f} < {threshold}")
        return not failures, failures

    def report(self) -> str:
        figures = self.figures()
        lines = [
            f"images compared: {len(self.images)}, reference images without a file: {len(self.missing_images)}"
        ]
        for name, value in figures.items():
            lines.append(f"  {name:<30} {'n/a' if value is None else f'{value:.4f}'}")
        passed, failures = self.verdict()
        lines.append("verdict: PASS" if passed else "verdict: DIFFERENT (" + "; ".join(failures) + ")")
        return "\n".join(lines)


def box_iou_matrix(boxes1: np.ndarray, boxes2: np.ndarray) -> np.ndarray:
    """Pairwise IoU (N, M) of x1, y1, x2, y2 pixel boxes."""
    area1 = np.clip(boxes1[:, 2] - boxes1[:, 0], 0, None) * np.clip(boxes1[:, 3] - boxes1[:, 1], 0, None)
    area2 = np.clip(boxes2[:, 2] - boxes2[:, 0], 0, None) * np.clip(boxes2[:, 3] - boxes2[:, 1], 0, None)
    top_left = np.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = np.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = np.clip(bottom_right - top_left, 0, None).prod(axis=-1)
    return inter / np.maximum(area1[:, None] + area2[None, :] - inter, 1e-9)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of two (N, F) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)


def compare_image(
    detector, processor, image: np.ndarray, reference: dict, ours: dict | None = None
) -> ImageParity:
    """Figures for one image.

    Args:
        detector: a `BUTDDetector`.
        processor: its `BUTDImageProcessor`.
        image: RGB uint8 (H, W, 3).
        reference: an image record as `modeling_imagebert.feature_formats` reads it ("image_id", "region_boxes"
            (N, 4) pixels, "region_features" (N, F), optionally "region_classes" (N,) 0-based object ids).
        ours: our detections of the image (`detector.detect` output); computed when None.
    """
    ref_boxes = np.asarray(reference["region_boxes"], dtype=np.float32)
    ref_features = np.asarray(reference["region_features"], dtype=np.float32)
    ref_classes = reference.get("region_classes")
    at_boxes = detector.features_at_boxes(image, ref_boxes, processor=processor)
    cosine_at_reference = float(np.median(row_cosine(at_boxes["features"], ref_features)))
    class_at_reference = None
    if ref_classes is not None and len(ref_classes):
        class_at_reference = float(np.mean(at_boxes["classes"] == np.asarray(ref_classes)))

    if ours is None:
        ours = detector.detect([image], processor=processor)[0]
    iou = box_iou_matrix(ref_boxes, ours["boxes"]) if len(ours["boxes"]) else np.zeros((len(ref_boxes), 0))
    best = iou.argmax(axis=1) if iou.shape[1] else np.zeros(len(ref_boxes), dtype=np.int64)
    best_iou = iou.max(axis=1) if iou.shape[1] else np.zeros(len(ref_boxes))
    matched = best_iou >= 0.5
    matched_cosine = matched_classes = None
    if matched.any():
        matched_cosine = float(np.median(row_cosine(ours["features"][best[matched]], ref_features[matched])))
        if ref_classes is not None:
            matched_classes = float(
                np.mean(ours["classes"][best[matched]] == np.asarray(ref_classes)[matched])
            )
    return ImageParity(
        image_id=str(reference["image_id"]),
        cosine_at_reference=cosine_at_reference,
        class_agreement_at_reference=class_at_reference,
        mean_best_iou=float(best_iou.mean()) if len(best_iou) else 0.0,
        recall_at_05=float(matched.mean()) if len(matched) else 0.0,
        matched_cosine=matched_cosine,
        matched_class_agreement=matched_classes,
        our_count=len(ours["boxes"]),
        reference_count=len(ref_boxes),
    )


def index_images(folder: str | Path) -> dict[str, Path]:
    """Image files under `folder` (recursively) by file stem."""
    return {
        path.stem: path
        for path in sorted(Path(folder).rglob("*"))
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    }


class _ImageSizes(Mapping):
    """(width, height) of each image, read from its header when first asked (UNITER's `.npz` store boxes
    normalised by a size they do not record)."""

    def __init__(self, images: dict[str, Path]):
        self._images = images

    def __getitem__(self, image_id: str) -> tuple[int, int]:
        from .images import read_image_size

        size = read_image_size(self._images[image_id])
        if size is None:
            raise KeyError(image_id)
        return size

    def __iter__(self):
        return iter(self._images)

    def __len__(self) -> int:
        return len(self._images)


def reference_records(
    tsv: str | None, npz_dir: str | None, images: dict[str, Path] | None = None
) -> Iterator[dict]:
    """Reference image records from a BUTD TSV or a folder of per-image `.npz` (our importers read both);
    `images` (id -> file) gives the image sizes `.npz` files without one need."""
    from ..feature_formats import read_butd_tsv, read_npz_dir

    if tsv:
        yield from read_butd_tsv(tsv, show_progress=False)
    if npz_dir:
        sizes = _ImageSizes(images) if images is not None else None
        yield from read_npz_dir(npz_dir, image_sizes=sizes, show_progress=False)


def run_parity(
    detector, processor, records: Iterable[dict], images: dict[str, Path], limit: int | None = None
) -> ParitySummary:
    """Compare `detector` with the reference `records` on the images found in `images` (stem -> path)."""
    from .images import decode_image

    summary = ParitySummary()
    for record in records:
        if limit is not None and len(summary.images) >= limit:
            break
        path = images.get(str(record["image_id"]))
        if path is None:
            summary.missing_images.append(str(record["image_id"]))
            continue
        decoded = decode_image(path)
        if not decoded.ok:
            raise ValueError(f"{path}: cannot decode ({decoded.message})")
        summary.images.append(compare_image(detector, processor, decoded.image, record))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--detector", required=True, help="folder written by convert_checkpoints")
    parser.add_argument(
        "--images", required=True, help="folder of the images (matched by file stem = image id)"
    )
    parser.add_argument("--reference-tsv", help="BUTD TSV of reference features (LXMERT / Oscar layout)")
    parser.add_argument(
        "--reference-npz", help="folder of per-image .npz reference features (UNITER / MILVLG)"
    )
    parser.add_argument("--limit", type=int, default=50, help="most images compared")
    parser.add_argument("--fixed-boxes", type=int, help="regions per image, as the reference (e.g. 36)")
    parser.add_argument("--min-boxes", type=int, help="least regions per image (adaptive references: 10)")
    parser.add_argument("--max-boxes", type=int, help="most regions per image (adaptive references: 100)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    if not (args.reference_tsv or args.reference_npz):
        parser.error("give --reference-tsv or --reference-npz")

    from .image_processing_butd import BUTDImageProcessor
    from .modeling_butd import BUTDDetector

    overrides = {
        key: value
        for key, value in (
            ("fixed_boxes", args.fixed_boxes),
            ("min_boxes", args.min_boxes),
            ("max_boxes", args.max_boxes),
        )
        if value is not None
    }
    from ..safe_loading import loading_weights

    with loading_weights(
        args.detector, "a detector folder written by convert_checkpoints or save_pretrained"
    ):
        detector = BUTDDetector.from_pretrained(args.detector, **overrides).to(args.device).eval()
    try:
        processor = BUTDImageProcessor.from_pretrained(args.detector)
    except OSError:
        processor = BUTDImageProcessor()
    images = index_images(args.images)
    summary = run_parity(
        detector,
        processor,
        reference_records(args.reference_tsv, args.reference_npz, images),
        images,
        args.limit,
    )
    print(summary.report())
    return 0 if summary.verdict()[0] else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ImageParity", "ParitySummary", "compare_image", "run_parity"]
