"""Image preprocessing of the bottom-up-attention detector, as its original Caffe extraction did it.

RGB uint8 image -> float -> resize (bilinear) so the shorter side is `min_size` unless the longer side would exceed
`max_size` -> RGB to BGR -> subtract the Caffe pixel means (BGR order, no division by a std).

`BUTDImageProcessor.load_image` reads what a user hands over (a path, a `file://` URL, bytes, a PIL image, an
array) into that RGB uint8 image with the extraction CLI's own decoder (`images.decode_image`), so an image gets
the same pixels whichever route it takes. This file is remote code (`save_pretrained` copies it and `images.py`
beside the detector): it imports only torch, numpy, transformers, PIL (through `images.py`) and its siblings.
"""

import os
import re
from pathlib import Path
from typing import TypedDict
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from torch.nn import functional as F
from transformers.image_processing_utils import BaseImageProcessor

from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, decode_image, oriented_rgb_array

# BGR means of the Caffe ImageNet models the detector was trained from (py-faster-rcnn's PIXEL_MEANS).
CAFFE_BGR_MEANS = (102.9801, 115.9465, 122.7717)


def resize_scale(height: int, width: int, min_size: int, max_size: int) -> float:
    """Scale that makes the shorter side `min_size` without the longer side exceeding `max_size`.

    As py-faster-rcnn: the longer side is checked after rounding the scaled size.
    """
    short_side, long_side = min(height, width), max(height, width)
    scale = min_size / short_side
    if round(scale * long_side) > max_size:
        scale = max_size / long_side
    return scale


class BUTDImageProcessorKwargs(TypedDict, total=False):
    """The settings `from_pretrained(..., **kwargs)` may override. transformers >= 5.25 reads this TypedDict
    (`valid_kwargs`) in `ImageProcessingMixin.from_dict` to pick the keyword arguments that are settings."""

    min_size: int
    max_size: int
    image_mean: list[float]


class BUTDImageProcessor(BaseImageProcessor):
    r"""
    Turns RGB images into the detector's input: BGR, Caffe-mean-subtracted, float32 tensors resized as the original
    extraction (shorter side 600, longer side at most 1000, bilinear without antialiasing like OpenCV's
    `INTER_LINEAR`). Settings are saved and loaded with `save_pretrained` / `from_pretrained`
    (`preprocessor_config.json`). A `BaseImageProcessor` only because `AutoImageProcessor.register` accepts
    nothing else; the preprocessing is this class's own (`preprocess_one`), none of the base class's.

    Args:
        min_size (`int`, 600): target length of the shorter side.
        max_size (`int`, 1000): most length of the longer side.
        image_mean (`list[float]`): per-channel means subtracted, in BGR order (Caffe's).
    """

    model_input_names = ["pixel_values"]
    valid_kwargs = BUTDImageProcessorKwargs

    def __init__(
        self,
        min_size: int = 600,
        max_size: int = 1000,
        image_mean: list[float] | tuple[float, ...] = CAFFE_BGR_MEANS,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0 < min_size <= max_size:
            raise ValueError(
                f"BUTDImageProcessor: need 0 < min_size <= max_size, got {min_size} and {max_size}"
            )
        if len(image_mean) != 3:
            raise ValueError(f"BUTDImageProcessor.image_mean must hold 3 BGR values, got {image_mean}")
        self.min_size = int(min_size)
        self.max_size = int(max_size)
        self.image_mean = [float(m) for m in image_mean]

    def preprocess_one(self, image, name: str = "image") -> dict:
        """Preprocess one image.

        Args:
            image: RGB `np.ndarray` of shape (H, W, 3) (uint8, or float in [0, 255]) or a `PIL.Image` (converted
                to RGB).
            name: how errors refer to this image (a file name or record id).

        Returns:
            dict with "pixel_values" float32 tensor (3, h, w) BGR mean-subtracted at the resized size, "scale"
            (resized / original), "original_size" (H, W) and "image_size" (h, w).
        """
        array = _as_rgb_array(image, name)
        height, width = array.shape[:2]
        scale = resize_scale(height, width, self.min_size, self.max_size)
        new_size = (max(1, round(height * scale)), max(1, round(width * scale)))
        # (H, W, 3) RGB -> (1, 3, H, W) BGR; the mean is subtracted after resizing (bilinear weights sum to one,
        # so this equals Caffe's subtract-then-resize).
        pixels = torch.from_numpy(np.ascontiguousarray(array[:, :, ::-1])).permute(2, 0, 1)[None].float()
        if new_size != (height, width):
            pixels = F.interpolate(
                pixels, size=new_size, mode="bilinear", align_corners=False, antialias=False
            )
        pixels = pixels[0] - torch.tensor(self.image_mean).view(3, 1, 1)
        return {
            "pixel_values": pixels.contiguous(),
            "scale": scale,
            "original_size": (height, width),
            "image_size": new_size,
        }

    def load_image(
        self,
        image,
        name: str | None = None,
        *,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_side: int = DEFAULT_MIN_SIDE,
    ) -> np.ndarray:
        """One image as the RGB uint8 array (H, W, 3) that `preprocess_one` takes, decoded as the extraction CLI
        decodes files.

        Args:
            image: a path (`str` or `os.PathLike`) or a `file://` URL of a local file, the encoded file as
                `bytes`, a PIL image, or an RGB array (H, W, 3). Files and bytes go through `images.decode_image`
                (EXIF orientation, CMYK / 16-bit / palette conversions, alpha composited on white, the
                decompression-bomb limit); a PIL image gets the same orientation and conversions; an array is
                taken as RGB pixels.
            name: how errors refer to the image (default: the path, or "image").
            max_pixels, min_side: the CLI's bad-image limits (`--max-pixels`, `--min-side`), same defaults.

        Returns:
            np.ndarray (H, W, 3), uint8 (or the float array given).

        Raises:
            ValueError, one line naming the image: a URL other than `file://` (nothing is downloaded), and every
            image the CLI would skip (unreadable, not an image, truncated, too small, too many pixels).
        """
        path = local_image_path(image)
        name = name or (str(path) if path is not None else "image")
        if path is not None or isinstance(image, (bytes, bytearray, memoryview)):
            decoded = decode_image(
                path if path is not None else image, max_pixels=max_pixels, min_side=min_side
            )
            if not decoded.ok:
                raise ValueError(f"{name}: {decoded.reason}: {decoded.message}")
            return decoded.image
        if hasattr(image, "convert") and hasattr(image, "size"):  # a PIL image
            array = oriented_rgb_array(image)
        else:
            array = _as_rgb_array(image, name)
        if min(array.shape[:2]) < min_side:
            raise ValueError(
                f"{name}: too_small: {array.shape[1]}x{array.shape[0]} pixels; expected both sides >= {min_side}"
            )
        return array

    @staticmethod
    def local_image_path(image) -> Path | None:
        """The local file `image` names, None when it is not a name; other URLs raise (see the module function
        `local_image_path`). A method so that a caller holding only the processor, such as the ImageBERT
        processor, reads image names by the same rule as `load_image`."""
        return local_image_path(image)

    def __call__(self, images, names: list[str] | None = None) -> list[dict]:
        """Preprocess a list of images (see `preprocess_one`); returns one dict per image."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        names = names or [f"image {i}" for i in range(len(images))]
        return [self.preprocess_one(image, name) for image, name in zip(images, names, strict=True)]


_URL_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def local_image_path(image) -> Path | None:
    """The local file that `image` names: a path (`str` or `os.PathLike`) or a `file://` URL; None when `image`
    is not a name (bytes, a PIL image, an array).

    Raises:
        ValueError (one line) for any other URL (http, https, s3, ...) and for a `file://` URL of another host:
        images are read from local files only, never fetched over the network.
    """
    if isinstance(image, os.PathLike):
        return Path(image)
    if not isinstance(image, str):
        return None
    scheme = _URL_SCHEME.match(image)
    if scheme is None:
        return Path(image)
    shown = image if len(image) <= 120 else image[:117] + "..."
    if scheme.group(1).lower() != "file":
        raise ValueError(
            f"{shown}: only local files are read (no network access); download the image and pass its path"
        )
    parsed = urlparse(image)
    if parsed.netloc not in ("", "localhost"):
        raise ValueError(
            f"{shown}: a file:// URL of another host ({parsed.netloc}); only local files are read"
        )
    return Path(unquote(parsed.path))


def _as_rgb_array(image, name: str) -> np.ndarray:
    """RGB (H, W, 3) array of `image`, or a one-line `ValueError` naming `name`."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL image
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{name}: expected an RGB np.ndarray (H, W, 3) or a PIL image, got {type(image).__name__}"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{name}: expected shape (H, W, 3) RGB, got {tuple(image.shape)}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"{name}: empty image of shape {tuple(image.shape)}")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating) or not np.isfinite(image).all():
            raise ValueError(
                f"{name}: expected uint8 pixels (or finite floats in [0, 255]), got {image.dtype}"
            )
    return image


# `save_pretrained` writes `auto_map` and copies this file (and `images.py`) into the folder, so
# `AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)` loads it without this package.
BUTDImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "BUTDImageProcessor",
    "BUTDImageProcessorKwargs",
    "CAFFE_BGR_MEANS",
    "local_image_path",
    "resize_scale",
]
