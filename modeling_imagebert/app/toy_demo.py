"""The app's offline demo: the toy world's scenes drawn as pictures, detected by the toy world's own detector.

The demo model (`make demo`) was pre-trained on the toy world, whose regions are simulated detections: feature
vectors built from class and attribute prototypes (`data.toy_world`), not pixels. No detector that reads pixels
could give that model the features it knows, so the demo does the reverse: it draws each scene of the demo's
held-out test split (the split `make demo` scores zero-shot retrieval on) as a PNG, one coloured box per object
labelled with its attribute and class, and `ToyWorldProcessor.detect_regions` recognises a drawn picture by its
pixels and returns that scene's simulated detections. Search then runs the real path: `index_images`, the
retriever's two stages, the cross-encoder, on the records a detector would hand over.

Pictures that are not the demo's drawn scenes are refused in one line; photos need a real detector
(`--model DIR --detector DIR`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..data.toy_world import DEMO_TOY_TEST_SPLIT, DEMO_TOY_WORLD, ToyWorld, make_toy_world
from ..processing_imagebert import ImageBertProcessor

# Fill colours of the attributes that name one; the others ("small", "big", ...) are drawn in a neutral grey.
_COLOURS = {
    "red": (214, 48, 49), "blue": (9, 132, 227), "green": (0, 168, 120), "black": (45, 52, 54),
    "white": (250, 250, 250), "yellow": (253, 203, 110), "brown": (140, 90, 50), "pink": (253, 121, 168),
    "orange": (225, 112, 40), "dark": (60, 60, 70),
}  # fmt: skip
_NEUTRAL = (178, 190, 195)
_BACKGROUND = (244, 241, 234)
MAKE_DEMO_OUTPUT = Path("outputs") / "imagebert-demo" / "final"


def demo_split():
    """The toy split the demo shows: `make demo`'s held-out zero-shot test split (25 images, 5 captions each)."""
    return make_toy_world(
        "retrieval", num_images=1, num_validation_images=1, **DEMO_TOY_TEST_SPLIT, **DEMO_TOY_WORLD
    )["test"]


def pixel_digest(pixels: np.ndarray) -> str:
    """A digest of RGB uint8 pixels (H, W, 3): how `ToyWorldProcessor` recognises a drawn scene."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    return hashlib.sha256(repr(pixels.shape).encode() + pixels.tobytes()).hexdigest()


def scene_objects(
    world: ToyWorld, record: dict, captions: Sequence[str]
) -> list[tuple[str, str | None, list]]:
    """(class word, attribute word or None, pixel box) of each object a scene's captions name; the box is the
    best-scored region the simulated detector gave that class (its tight box)."""
    attributes: dict[int, int | None] = {}
    for caption in captions:
        for class_id, attribute_id in world.mentioned_objects(caption):
            if attributes.get(class_id) is None:
                attributes[class_id] = attribute_id
    classes = np.asarray(record["region_classes"])
    boxes = np.asarray(record["region_boxes"], dtype=np.float32)
    objects = []
    for class_id, attribute_id in attributes.items():
        where = np.flatnonzero(classes == class_id)
        if len(where):
            best = where[np.argmax(np.asarray(record["region_scores"])[where])]
            attribute = None if attribute_id is None else world.attribute_names[attribute_id]
            objects.append((world.class_names[class_id], attribute, boxes[best].tolist()))
    return objects


def draw_scene(width: int, height: int, objects: Sequence[tuple[str, str | None, list]]):
    """A PIL picture of a scene: a filled box per object (the larger ones first), labelled "attribute class"."""
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.new("RGB", (int(width), int(height)), _BACKGROUND)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(14, int(min(width, height)) // 18))
    by_area = sorted(objects, key=lambda o: -(o[2][2] - o[2][0]) * (o[2][3] - o[2][1]))
    for class_word, attribute, box in by_area:
        fill = _COLOURS.get(attribute, _NEUTRAL)
        draw.rounded_rectangle(box, radius=8, fill=fill, outline=(40, 40, 40), width=2)
        ink = (255, 255, 255) if sum(fill) < 380 else (20, 20, 20)
        draw.text((box[0] + 6, box[1] + 4), f"{attribute or ''} {class_word}".strip(), fill=ink, font=font)
    return picture


def render_demo_images(folder: str | os.PathLike) -> tuple[Path, Path, dict[str, dict]]:
    """Draw the demo split into `folder`/images/<image id>.png and its captions into `folder`/captions.txt
    (files already there with the right content are kept). Returns (image folder, captions file, records by
    pixel digest)."""
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    split = demo_split()
    world = ToyWorld.create(**{("seed" if k == "world_seed" else k): v for k, v in DEMO_TOY_WORLD.items()})
    by_image: dict[str, list[dict]] = {}
    for row in split.with_format("numpy", dtype=None):
        by_image.setdefault(str(row["image_id"]), []).append(row)
    records, captions = {}, []
    for image_id, rows in by_image.items():
        record = {key: value for key, value in rows[0].items() if key != "caption"}
        texts = [str(row["caption"]) for row in rows]
        captions += texts
        picture = draw_scene(
            record["image_width"], record["image_height"], scene_objects(world, record, texts)
        )
        pixels = np.asarray(picture)
        records[pixel_digest(pixels)] = record
        path = images / f"{image_id}.png"
        if not (path.is_file() and _digest_of_file(path) == pixel_digest(pixels)):
            picture.save(path, format="PNG")
    caption_file = folder / "captions.txt"
    text = "".join(f"{caption}\n" for caption in captions)
    if not caption_file.is_file() or caption_file.read_text(encoding="utf-8") != text:
        caption_file.write_text(text, encoding="utf-8")
    return images, caption_file, records


def _digest_of_file(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return pixel_digest(np.asarray(opened.convert("RGB")))
    except OSError:
        return None


class ToyWorldProcessor(ImageBertProcessor):
    """`ImageBertProcessor` whose `detect_regions` is the toy world's simulated detector for the demo's drawn
    scenes (`records`: the scene's record by pixel digest). Everything else is the model's processor."""

    toy_records: dict[str, dict] = {}

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike, records: dict[str, dict]) -> ToyWorldProcessor:
        base = ImageBertProcessor.from_pretrained(str(model_dir))
        processor = cls(base.tokenizer, max_regions=base.max_regions, max_text_length=base.max_text_length)
        processor.toy_records = records
        return processor

    def detect_regions(
        self, images: Any, image_ids: Sequence[str] | None = None, batch_size: int = 8, *, exact: bool = True
    ) -> list[dict]:
        """One toy-world record per image (as `ImageBertProcessor.detect_regions` returns a detector's); an image
        that is not one of the demo's drawn scenes is refused in one line."""
        from PIL import Image

        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if image_ids is not None and len(image_ids) != len(images):
            raise ValueError(f"image_ids has {len(image_ids)} items but images has {len(images)}")
        records = []
        for position, image in enumerate(images):
            name = str(image) if isinstance(image, (str, os.PathLike)) else f"image {position}"
            if isinstance(image, (str, os.PathLike)):
                try:
                    with Image.open(image) as opened:
                        pixels = np.asarray(opened.convert("RGB"))
                except OSError as error:
                    raise ValueError(f"{name}: not a readable image ({error})") from None
            elif isinstance(image, Image.Image):
                pixels = np.asarray(image.convert("RGB"))
            else:
                pixels = np.asarray(image)
            record = self.toy_records.get(pixel_digest(pixels))
            if record is None:
                raise ValueError(
                    f"{name}: not one of the demo's drawn toy scenes; the demo detects only those (the toy "
                    "world's simulated detector), start the app with --model DIR --detector DIR for photos"
                )
            if image_ids is not None:
                image_id = str(image_ids[position])
            else:
                image_id = Path(image).stem if isinstance(image, (str, os.PathLike)) else str(position)
            records.append({**record, "image_id": image_id})
        return records


def find_demo_model(cache_dir: str | os.PathLike) -> Path | None:
    """A demo model already there: the one this app trained into `cache_dir`/demo-model, or `make demo`'s."""
    for candidate in (Path(cache_dir) / "demo-model" / "final", MAKE_DEMO_OUTPUT):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def train_demo_model(cache_dir: str | os.PathLike) -> Path:
    """Run the packaged demo recipe (`examples/run_pretrain.py`, as `make demo` does) into `cache_dir`/demo-model
    once; the next start finds it. Needs a checkout (the training script lives in examples/)."""
    script = Path("examples") / "run_pretrain.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"no demo model in {Path(cache_dir) / 'demo-model'} or {MAKE_DEMO_OUTPUT}, and no {script} to train one "
            "; run `make demo` in a checkout of the project, or pass --model DIR"
        )
    output = Path(cache_dir) / "demo-model"
    print(
        f"Training the demo model once into {output} (the packaged demo recipe: 3-5 minutes on 2 CPU cores)"
    )
    finished = subprocess.run([sys.executable, str(script), "--output_dir", str(output)], check=False)
    if finished.returncode != 0:
        raise OSError(
            f"training the demo model into {output} failed (exit status {finished.returncode}); see above"
        )
    return output / "final"


__all__ = [
    "ToyWorldProcessor",
    "demo_split",
    "draw_scene",
    "find_demo_model",
    "pixel_digest",
    "render_demo_images",
    "train_demo_model",
]
