"""Region and image features: the bottom-up-attention (BUTD) Faster R-CNN detector and its extraction tools.

Names are loaded lazily so that `import modeling_imagebert.features` stays cheap (no torchvision import until a
detector is built).
"""

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "BUTDConfig": "configuration_butd",
    "BUTDDetector": "modeling_butd",
    "BUTDImageProcessor": "image_processing_butd",
    "convert_checkpoint": "convert_checkpoints",
    # extraction (images -> features folder)
    "GlobalFeatureExtractor": "global_features",
    "decode_image": "images",
    # reading a finished features folder: its format lives in modeling_imagebert/feature_formats (".feature_formats"
    # is relative to the package above this one)
    "iter_extracted_records": ".feature_formats",
    "list_images": "sources",
    "load_features": ".feature_formats",
    "run_extraction": "runner",
}

__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = sorted(_EXPORTS)
