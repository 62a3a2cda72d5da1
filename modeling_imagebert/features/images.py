"""Decoding image files into RGB uint8 arrays for the detector, turning every bad image into a named skip.

`decode_image` never raises on bad image content: it returns a `DecodedImage` that is either ok (an RGB uint8
array of shape (H, W, 3), EXIF orientation applied) or skipped with a short reason key and a one-line message.

What is converted:
    EXIF orientation (`ImageOps.exif_transpose`), CMYK / YCbCr / LAB / HSV -> RGB, grayscale ("L", "1") -> RGB,
    16-bit and 32-bit grayscale ("I;16*", "I") scaled to 8 bits (not clipped), float ("F") in [0, 1] or
    [0, 255], images with transparency ("RGBA", "LA", "PA", "P" with a transparent colour) composited on white.

What is skipped (reason keys):
    "unreadable"          the file cannot be read (missing, permission), is not a regular file (a FIFO, which
                          would block the run; a device such as /dev/zero, which never ends) or is larger than
                          `image_byte_cap(max_pixels)`
    "not_an_image"        PIL does not recognise the bytes (random bytes, HTML error pages, empty files)
    "truncated"           the data ends before the image does
    "decompression_bomb"  more pixels than `max_pixels` (PIL's `MAX_IMAGE_PIXELS` check, made an option here)
    "too_small"           the shorter side is below `min_side` pixels
    "decode_error"        any other decoding failure (corrupt data inside a recognised file)

One decoder for every route: the extraction runner calls `decode_image`, and so does `BUTDImageProcessor.load_image`,
which the ImageBERT processor uses for `images=`. This file is therefore one of the detector's remote-code files
(`save_pretrained` copies it beside `image_processing_butd.py`): it imports only the standard library, numpy and PIL.
"""

from __future__ import annotations

import io
import os
import stat
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# PIL warns above MAX_IMAGE_PIXELS (89,478,485) and refuses above twice that; we refuse above the limit itself, so
# the default accepts what PIL accepts by default.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_MIN_SIDE = 10

SKIP_REASONS = ("unreadable", "not_an_image", "truncated", "decompression_bomb", "too_small", "decode_error")

# PIL's bomb check reads the module-global MAX_IMAGE_PIXELS and we turn its warning into an error with the
# process-wide warning filters: opening images in several threads must not interleave those changes.
_PIL_LIMIT_LOCK = threading.Lock()


@dataclass(frozen=True)
class DecodedImage:
    """The outcome of decoding one image.

    Attributes:
        image: RGB uint8 array of shape (H, W, 3) when decoding succeeded, else None.
        reason: None when ok, else one of `SKIP_REASONS`.
        message: a one-line explanation of a skip ("" when ok).
        original_mode: the PIL mode of the file ("RGB", "CMYK", "I;16", ...), "" when not decoded.
    """

    image: np.ndarray | None
    reason: str | None = None
    message: str = ""
    original_mode: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is None


def _skip(reason: str, message: str, mode: str = "") -> DecodedImage:
    return DecodedImage(image=None, reason=reason, message=" ".join(message.split()), original_mode=mode)


def _open_checked(data: bytes, max_pixels: int | None) -> Image.Image:
    """`Image.open` with PIL's decompression-bomb check at `max_pixels`: above it PIL warns (we make the warning
    an error) and above twice it raises, so every image over the limit is refused before its pixels are
    decoded."""
    with _PIL_LIMIT_LOCK, warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            image = Image.open(io.BytesIO(data))
            # Formats that learn their size only while loading (e.g. some TIFF / ICO) are checked again here.
            Image._decompression_bomb_check(image.size)
        finally:
            Image.MAX_IMAGE_PIXELS = previous
    return image


def _on_white(image: Image.Image) -> Image.Image:
    """Composite an image with an alpha channel on a white background (photos with transparency are usually
    product shots or logos drawn on white)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_depth_to_rgb(image: Image.Image) -> np.ndarray:
    """16-bit / 32-bit integer or float grayscale to RGB uint8 by scaling, not clipping: PIL's own conversion
    clips 16-bit values at 255, which turns most 16-bit photographs white."""
    values = np.asarray(image)
    if image.mode == "F":
        values = values.astype(np.float64)
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if top <= 1.0 else 1.0  # [0, 1] floats or [0, 255] floats
        gray = np.clip(np.nan_to_num(values) * scale, 0, 255)
    else:
        values = values.astype(np.int64)
        top = int(values.max()) if values.size else 0
        # 16-bit data (the usual case, also stored in mode "I" by older PILs) maps 65535 -> 255; wider data by
        # its own maximum.
        divisor = 257.0 if top <= 65535 else top / 255.0
        gray = np.clip(values / divisor, 0, 255)
    gray = np.rint(gray).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to an RGB uint8 array of shape (H, W, 3)."""
    mode = image.mode
    if mode in ("I", "F") or mode.startswith("I;"):
        return _high_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return np.asarray(_on_white(image))
    if mode == "P":
        if "transparency" in image.info:
            return np.asarray(_on_white(image))
        return np.asarray(image.convert("RGB"))
    if mode != "RGB":
        # CMYK (PIL undoes Adobe's inverted CMYK while decoding), YCbCr, LAB, HSV, L, 1
        image = image.convert("RGB")
    return np.asarray(image)


def oriented_rgb_array(image: Image.Image) -> np.ndarray:
    """A PIL image as a viewer shows it, as an RGB uint8 array (H, W, 3): EXIF orientation applied, then
    `to_rgb_array`. What `decode_image` does to every file it decodes, and what the ImageBERT processor does to a
    PIL image it is given, so both hand the detector the same pixels."""
    return to_rgb_array(ImageOps.exif_transpose(image))


# This module is saved beside the detector weights (image_processing_butd.py imports it) and loaded as remote code
# without the package, so it cannot import `safe_loading`; these few lines are its regular-file read
# (`safe_loading.read_input_bytes` is the package's own).
IMAGE_MAX_BYTES = 64 << 20


class _UnreadableImage(OSError):
    """An image path that is not a regular file, or a file over the byte cap."""


def _read_image_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`: opened with O_NONBLOCK (a FIFO opens at once instead of waiting for a
    writer) and checked with `fstat` on the open descriptor; a FIFO, device, socket or folder, or more than
    `max_bytes` bytes, raises `_UnreadableImage` naming the path."""
    handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(handle)
        if not stat.S_ISREG(info.st_mode):
            kind = next((words for test, words in _FILE_TYPES if test(info.st_mode)), "not a regular file")
            raise _UnreadableImage(
                f"{os.fspath(path)}: is {kind}, not a regular file ; expected an image file"
            )
        if info.st_size > max_bytes:
            raise _UnreadableImage(
                f"{os.fspath(path)}: {info.st_size} bytes, more than the {max_bytes} allowed"
            )
        with os.fdopen(handle, "rb", closefd=False) as file:
            data = file.read(max_bytes + 1)
    finally:
        os.close(handle)
    if len(data) > max_bytes:
        raise _UnreadableImage(f"{os.fspath(path)}: more than the {max_bytes} bytes allowed")
    return data


_FILE_TYPES = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def image_byte_cap(max_pixels: int | None) -> int:
    """The most bytes an image file may have: `IMAGE_MAX_BYTES` (64 MiB, far above any photo of the paper's
    datasets); 4 bytes per allowed pixel when `max_pixels` is raised above its default; 1 GiB with the pixel check
    off (None)."""
    if max_pixels is None:
        return 1 << 30
    return IMAGE_MAX_BYTES if max_pixels <= DEFAULT_MAX_PIXELS else max(IMAGE_MAX_BYTES, 4 * max_pixels)


def decode_image(
    data: bytes | str | os.PathLike,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
) -> DecodedImage:
    """Decode an image file (bytes or a path) into an RGB uint8 array, or say why it was skipped.

    Args:
        data: the encoded file as bytes, or its path.
        max_pixels: refuse images with more pixels than this (decompression bombs); None disables the check.
        min_side: refuse images whose shorter side is below this many pixels.

    Returns:
        A `DecodedImage`: `.image` is (H, W, 3) uint8 with EXIF orientation applied, or `.reason` / `.message`
        say why it was skipped (see the module docstring). Never raises for bad image content.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        # A regular file only, read with a cap: a FIFO would block the run, /dev/zero would fill the memory.
        try:
            data = _read_image_file(data, image_byte_cap(max_pixels))
        except _UnreadableImage as error:
            return _skip("unreadable", str(error))
        except OSError as error:
            return _skip("unreadable", f"cannot read the file: {error.strerror or error}")
    data = bytes(data)
    if not data:
        return _skip("not_an_image", "the file is empty")
    try:
        image = _open_checked(data, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return _skip("decompression_bomb", f"{error} (raise --max-pixels to accept it)")
    except UnidentifiedImageError:
        return _skip("not_an_image", f"not a recognised image format ({len(data)} bytes)")
    except Exception as error:  # PIL raises many types for corrupt headers
        return _skip("decode_error", f"cannot open the image: {type(error).__name__}: {error}")
    mode = image.mode
    try:
        # LOAD_TRUNCATED_IMAGES is a global switch; keep PIL's default (False) so truncation is an error.
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            raise RuntimeError(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; truncated images would pass as gray"
            )
        image.load()
        array = oriented_rgb_array(image)
    except OSError as error:
        text = str(error)
        if "truncated" in text or "broken data stream" in text or "premature end" in text.lower():
            return _skip("truncated", f"the image data is truncated: {text}", mode)
        return _skip("decode_error", f"cannot decode the image: {text}", mode)
    except Exception as error:
        return _skip("decode_error", f"cannot decode the image: {type(error).__name__}: {error}", mode)
    height, width = array.shape[:2]
    if min(height, width) < min_side:
        return _skip("too_small", f"{width}x{height} pixels; expected both sides >= {min_side}", mode)
    # A copy: arrays viewing PIL's buffer are read-only, which torch.from_numpy warns about.
    return DecodedImage(image=np.array(array, dtype=np.uint8, order="C"), original_mode=mode)


def read_image_size(data: bytes | str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) from the image header without decoding pixels (EXIF rotation applied), or None when the
    header cannot be read. Used to order images by size before batching."""
    try:
        # Under the lock: warning filters and PIL's pixel limit are process-wide, and decode_image changes both.
        with _PIL_LIMIT_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(data, (bytes, bytearray, memoryview)):
                source = io.BytesIO(bytes(data))
            else:
                if not stat.S_ISREG(os.stat(data).st_mode):  # never open a FIFO: it would block
                    return None
                source = data
            with Image.open(source) as image:
                width, height = image.size
                orientation = image.getexif().get(0x0112, 1)
    except Exception:
        return None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIDE",
    "SKIP_REASONS",
    "DecodedImage",
    "decode_image",
    "image_byte_cap",
    "oriented_rgb_array",
    "read_image_size",
    "to_rgb_array",
]
