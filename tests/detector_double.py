"""TEST DOUBLE: a stand-in for the detector-backed `ImageBertProcessor` (issue 26), for the retriever's
`index_images` tests.

`StandInDetectorProcessor.detect_regions(images, image_ids=...)` has the real one's contract (one image record per
image, the keys of `features.runner.detection_to_record`) but runs no detector: each record is random, seeded by
the file's bytes, so the same file always gives the same regions. The real method (a BUTD detector behind the
processor) lands with the processor; these tests only need its contract.

Run as a script, it is the process the kill-and-resume test kills:
    python tests/detector_double.py TOKENIZER_DIR IMAGE_FOLDER CACHE_DIR SECONDS_PER_IMAGE
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from modeling_imagebert.processing_imagebert import ImageBertProcessor

MODEL_SEED = 5


class StandInDetectorProcessor(ImageBertProcessor):
    """An `ImageBertProcessor` whose `detect_regions` returns deterministic random records (a test double).

    Attributes set after construction (`stand_in_processor`): feature_dim, num_classes, seconds_per_image (a pause
    per image, so a kill lands mid-run), calls (the image ids of every detect_regions call, in order).
    """

    feature_dim = 64
    num_classes = 23
    seconds_per_image = 0.0

    def detect_regions(self, images, image_ids=None):
        image_ids = list(image_ids) if image_ids is not None else [Path(str(image)).stem for image in images]
        self.calls = [*getattr(self, "calls", []), image_ids]
        records = []
        for image, image_id in zip(images, image_ids, strict=True):
            time.sleep(self.seconds_per_image)
            data = Path(image).read_bytes()
            with Image.open(Path(image)) as decoded:
                width, height = decoded.size
            rng = np.random.default_rng(int.from_bytes(hashlib.sha256(data).digest()[:8], "little"))
            count = int(
                rng.integers(1, 2 * self.max_regions)
            )  # sometimes more than max_regions: the top are kept
            corners = rng.uniform(0, 1, (count, 2, 2)) * [width, height]
            boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1).astype(
                np.float32
            )  # (N, 4) x1y1x2y2
            records.append(
                {
                    "image_id": image_id,
                    "image_width": width,
                    "image_height": height,
                    "region_features": rng.standard_normal((count, self.feature_dim)).astype(np.float32),
                    "region_boxes": boxes,
                    "region_classes": rng.integers(0, self.num_classes, count).astype(np.int32),
                    "region_scores": rng.uniform(0.2, 1.0, count).astype(np.float32),
                    "region_attributes": rng.integers(0, 10, count).astype(np.int32),
                    "region_attribute_scores": rng.uniform(0, 1, count).astype(np.float32),
                }
            )
        return records


def stand_in_processor(
    tokenizer_dir: str, config, seconds_per_image: float = 0.0
) -> StandInDetectorProcessor:
    """The test double for a model of `config` (feature size, classes and region / text limits taken from it)."""
    from transformers import BertTokenizerFast

    processor = StandInDetectorProcessor(
        BertTokenizerFast.from_pretrained(tokenizer_dir),
        max_regions=config.max_regions,
        max_text_length=config.max_text_length,
    )
    processor.feature_dim = config.visual_feature_dim
    processor.num_classes = config.num_object_classes - 1
    processor.seconds_per_image = seconds_per_image
    return processor


def main(argv: list[str]) -> None:
    import torch
    from test_retrieval_evaluation import tiny_model

    from modeling_imagebert import ImageBertForRetrieval
    from modeling_imagebert.retrieval.retriever import ImageBertRetriever

    tokenizer_dir, folder, cache_dir, seconds = argv
    torch.set_num_threads(1)
    model = tiny_model(ImageBertForRetrieval, seed=MODEL_SEED).eval()
    processor = stand_in_processor(tokenizer_dir, model.config, float(seconds))
    ImageBertRetriever(model, processor).index_images(
        folder, batch_size=1, cache_dir=cache_dir, progress=False
    )


if __name__ == "__main__":
    main(sys.argv[1:])
