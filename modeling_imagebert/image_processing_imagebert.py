"""ImageBertImageProcessor: the image half of a detector-backed `ImageBertProcessor`, as transformers' pipelines
want it (`image_processor(images=[...], return_tensors="pt")` -> region inputs).

The zero-shot image classification pipeline loads an image processor and a tokenizer, never a processor. This
class gives it one: it holds the `ImageBertProcessor` saved in the same folder (tokenizer, region rules and the
detector in `detector/`) and turns images into `region_features`, `region_locations` and `region_attention_mask`
exactly as `processor(images=...)` does. `ImageBertProcessor.save_pretrained` writes its `preprocessor_config.json`
beside `processor_config.json` when the processor has a detector.

Part of the remote-code unit: it imports only transformers and its siblings, so `AutoImageProcessor` loads it with
`trust_remote_code=True` without our package.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from transformers import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .processing_imagebert import ImageBertProcessor

# Loaded as remote code (`transformers_modules.<folder>.image_processing_imagebert`), the detector's code is remote
# code of the same folder: it is trusted as this file was.
_LOADED_AS_REMOTE_CODE = __name__.startswith("transformers_modules")


class ImageBertImageProcessor(BaseImageProcessor):
    r"""
    Images -> ImageBERT region inputs, through the detector of the `ImageBertProcessor` saved in the same folder.

    Args:
        processor: the detector-backed `ImageBertProcessor` to use (`from_pretrained` loads the folder's).

    `preprocessor_config.json` holds no setting of its own (the region rules and the detector are the processor's);
    it names this class for `AutoImageProcessor`.

    Example:

    ```python
    >>> image_processor = ImageBertImageProcessor.from_pretrained("imagebert-base-with-detector")
    >>> inputs = image_processor(images=["cat.jpg"], return_tensors="pt")  # region_features (1, R, F), ...
    ```
    """

    model_input_names = ["region_features", "region_locations", "region_attention_mask"]

    def __init__(self, processor: ImageBertProcessor | None = None, **kwargs):
        super().__init__(**kwargs)
        self._processor = processor

    @property
    def processor(self) -> ImageBertProcessor:
        if self._processor is None:
            raise ValueError(
                "ImageBertImageProcessor has no processor: load it with from_pretrained(FOLDER) from a folder where "
                "a detector-backed ImageBertProcessor was saved"
            )
        return self._processor

    def to_dict(self) -> dict[str, Any]:
        """`preprocessor_config.json`'s content: the class name (and `auto_map` when saved as remote code); never
        the processor, which is saved by itself."""
        output = {key: value for key, value in super().to_dict().items() if key != "_processor"}
        output["image_processor_type"] = type(self).__name__
        return output

    def save_pretrained(self, save_directory, push_to_hub: bool = False, **kwargs):
        """Save the whole processor (tokenizer, settings, detector) into `save_directory`, this file's
        `preprocessor_config.json` included: a pipeline saves its image processor, and this one is nothing without
        the processor."""
        return self.processor.save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)

    def save_config(self, save_directory) -> None:
        """Write `preprocessor_config.json` (and, with `auto_map`, copy this file and its siblings) only; what
        `ImageBertProcessor.save_pretrained` calls."""
        super().save_pretrained(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Load the `ImageBertProcessor` of a folder or Hub id (with its detector) and wrap it. `kwargs` as
        `ImageBertProcessor.from_pretrained`."""
        if _LOADED_AS_REMOTE_CODE:
            kwargs.setdefault("trust_remote_code", True)
        return cls(ImageBertProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs))

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs):
        """What `AutoImageProcessor.from_pretrained` calls, with the file's content but not the folder it read.
        The folder is taken from that caller's frame (`_calling_folder`) so that `pipeline(task, model=FOLDER)`
        finds the processor saved beside the model."""
        folder = _calling_folder()
        if folder is None:
            raise ValueError(
                "ImageBertImageProcessor: load it with ImageBertImageProcessor.from_pretrained(FOLDER) or "
                "AutoImageProcessor.from_pretrained(FOLDER)"
            )
        options = {
            name: kwargs[name]
            for name in ("cache_dir", "revision", "token", "local_files_only")
            if name in kwargs
        }
        return cls.from_pretrained(folder, **options)

    def __call__(self, images: Any, return_tensors: str | None = "pt", **kwargs) -> BatchFeature:
        """Region inputs of one image or a list (paths, `file://` URLs of local files, PIL images, RGB arrays):
        `BatchFeature` with region_features (B, R, F) float32, region_locations (B, R, 5) and region_attention_mask
        (B, R), and the kept boxes in its `detections` attribute, as `ImageBertProcessor(images=...)`."""
        return self.processor(images=images, return_tensors=return_tensors)


def _calling_folder() -> str | os.PathLike | None:
    """The `pretrained_model_name_or_path` of the nearest `from_pretrained` on the call stack (transformers'
    `AutoImageProcessor.from_pretrained`, which hands `from_dict` the file's content only), or None."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "from_pretrained":
                folder = frame.f_locals.get("pretrained_model_name_or_path")
                if isinstance(folder, (str, os.PathLike)):
                    return folder
            frame = frame.f_back
        return None
    finally:
        del frame


# `save_pretrained` writes the AutoImageProcessor entry of `auto_map` and copies this file and its siblings.
ImageBertImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["ImageBertImageProcessor"]
