"""Images for the feature-extraction tests: real photographs from scikit-image and every kind of bad file,
written with PIL exactly as cameras, editors and broken downloads produce them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "stereo_motorcycle",
    "cat",
    "immunohistochemistry",
    "camera",
)


def photo(name: str) -> np.ndarray:
    """A scikit-image photograph as an array (RGB (H, W, 3) or grayscale (H, W) uint8)."""
    image = getattr(skimage_data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle is (left, right, disparity)


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format, **options)
    return buffer.getvalue()


def write_photos(folder: Path, names=PHOTOS, size: int = 160) -> Path:
    """The photographs as JPEG files `<name>.jpg`, shrunk so the longer side is `size` (keeps tests fast)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        image = Image.fromarray(photo(name))
        image.thumbnail((size, size))
        (folder / f"{name}.jpg").write_bytes(encode(image, "JPEG", quality=90))
    return folder


def bad_image_files(size: int = 96) -> dict[str, bytes]:
    """name -> file bytes for every bad-image case (plus the matching good photo, "good.jpg").

    Converted: CMYK JPEG, 16-bit grayscale PNG, grayscale JPEG, RGBA PNG, LA PNG, palette PNG (with and without
    a transparent colour), a JPEG with EXIF orientation 6 (stored 2:1 landscape, shown portrait).
    Skipped: a truncated JPEG, random bytes, an empty file, a 5x5 image, and a "bomb" (bigger than the pixel
    limit the tests set, `BOMB_LIMIT`); a 2000 x 12 panorama decodes but is too thin for the detector.
    """
    rgb = Image.fromarray(photo("astronaut")).resize((size, size))
    gray16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    landscape = Image.fromarray(photo("coffee")).resize((2 * size, size))
    exif = landscape.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    good_jpeg = encode(rgb, "JPEG", quality=90)
    palette = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return {
        "good.jpg": good_jpeg,
        "cmyk.jpg": encode(rgb.convert("CMYK"), "JPEG", quality=90),
        "sixteen_bit.png": encode(Image.fromarray(gray16), "PNG"),
        "grayscale.jpg": encode(rgb.convert("L"), "JPEG", quality=90),
        "rgba.png": encode(rgb.convert("RGBA"), "PNG"),
        "la.png": encode(rgb.convert("LA"), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette_transparent.png": encode(palette, "PNG", transparency=0),
        "exif_rotated.jpg": encode(landscape, "JPEG", quality=90, exif=exif.tobytes()),
        "truncated.jpg": good_jpeg[: len(good_jpeg) // 2],
        "random_bytes.jpg": np.random.default_rng(0).bytes(2000),
        "empty.png": b"",
        "tiny.png": encode(rgb.resize((5, 5)), "PNG"),
        "bomb.png": encode(Image.new("RGB", (BOMB_SIDE, BOMB_SIDE), (90, 120, 30)), "PNG"),
        # decodes fine, but resized to at most 160 (tests) or 1000 pixels long its short side vanishes
        "panorama.png": encode(Image.new("RGB", (2000, 12), (20, 80, 160)), "PNG"),
    }


BOMB_SIDE = 400
BOMB_LIMIT = 100_000  # pixels: every other test image is below it, the 400 x 400 "bomb" is above

DETECTOR_SKIPS = {"panorama": "detector_error"}
EXPECTED_SKIPS = {
    "truncated": "truncated",
    "random_bytes": "not_an_image",
    "empty": "not_an_image",
    "tiny": "too_small",
    "bomb": "decompression_bomb",
}


def write_files(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return folder


# A BUTD detector small enough for tests (64-d features, 20 object classes, 5 attributes), random weights, and a
# processor that resizes to 96..160 pixels.
TINY_BUTD = {
    "stem_out_channels": 8,
    "stage_depths": [1, 1, 1],
    "res5_depth": 1,
    "res2_bottleneck_channels": 4,
    "res2_out_channels": 8,
    "rpn_hidden_channels": 16,
    "rpn_pre_nms_top_n": 200,
    "rpn_post_nms_top_n": 40,
    "roi_pool_size": 4,
    "num_classes": 21,
    "num_attributes": 6,
    "attribute_embedding_dim": 8,
    "attribute_hidden_dim": 16,
}
TINY_PROCESSOR = {"min_size": 96, "max_size": 160}


def save_tiny_detector(folder: Path, seed: int = 0) -> Path:
    """A tiny random BUTD detector and its processor saved with save_pretrained into `folder`."""
    import torch

    from modeling_imagebert.features import BUTDConfig, BUTDDetector, BUTDImageProcessor

    torch.manual_seed(seed)
    BUTDDetector(BUTDConfig(**TINY_BUTD)).eval().save_pretrained(folder)
    BUTDImageProcessor(**TINY_PROCESSOR).save_pretrained(folder)
    return folder
