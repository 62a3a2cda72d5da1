"""ImageBERT as a native Hugging Face Transformers model.

Importing the package registers the model with `AutoConfig`, `AutoModel`, `AutoModelForPreTraining` and, for the
retrieval model (a one-logit pair classifier), `AutoModelForSequenceClassification` and
`AutoModelForZeroShotImageClassification` (one image against candidate labels: `logits_per_image`); the processor
with `AutoProcessor` and its image half (`ImageBertImageProcessor`, for pipelines) with `AutoImageProcessor`; and the
BUTD region detector (`features/`) with `AutoConfig`, `AutoModel` and `AutoImageProcessor`, so a processor folder's
`detector/` subfolder loads with our classes, no remote code needed. It also registers the `image-text-retrieval`
pipeline (`ImageTextRetrievalPipeline`) with transformers' `PIPELINE_REGISTRY`.
"""

from importlib.util import find_spec

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForZeroShotImageClassification,
)

from .configuration_imagebert import ImageBertConfig
from .image_processing_imagebert import ImageBertImageProcessor
from .modeling_imagebert import (
    ImageBertForPreTraining,
    ImageBertForRetrieval,
    ImageBertModel,
    ImageBertPreTrainedModel,
)
from .pipeline_imagebert import ImageTextRetrievalPipeline  # registers the image-text-retrieval pipeline
from .processing_imagebert import ImageBertProcessor  # registers AutoProcessor

AutoConfig.register(ImageBertConfig.model_type, ImageBertConfig, exist_ok=True)
AutoModel.register(ImageBertConfig, ImageBertModel, exist_ok=True)
AutoModelForPreTraining.register(ImageBertConfig, ImageBertForPreTraining, exist_ok=True)
AutoModelForSequenceClassification.register(ImageBertConfig, ImageBertForRetrieval, exist_ok=True)
AutoModelForZeroShotImageClassification.register(ImageBertConfig, ImageBertForRetrieval, exist_ok=True)


def _register_detector() -> None:
    """The BUTD classes (and `ImageBertImageProcessor`) with the Auto classes. The detector needs torchvision and the
    image processors PIL (the `features` extra): a base install without them still imports the package and
    registers only the config."""
    from .features.configuration_butd import BUTDConfig

    AutoConfig.register(BUTDConfig.model_type, BUTDConfig, exist_ok=True)
    if find_spec("PIL") is not None:
        from .features.image_processing_butd import BUTDImageProcessor

        # One class for both backends transformers picks between (its own preprocessing is torch + PIL decoding).
        backends = {"pil": BUTDImageProcessor, "torchvision": BUTDImageProcessor}
        AutoImageProcessor.register(BUTDConfig, image_processor_classes=backends, exist_ok=True)
        # The image half of a detector-backed ImageBertProcessor, for pipelines (AutoImageProcessor needs PIL).
        ours = {"pil": ImageBertImageProcessor, "torchvision": ImageBertImageProcessor}
        AutoImageProcessor.register(ImageBertConfig, image_processor_classes=ours, exist_ok=True)
    if find_spec("torchvision") is not None:
        from .features.modeling_butd import BUTDDetector

        AutoModel.register(BUTDConfig, BUTDDetector, exist_ok=True)


_register_detector()


__version__ = "0.1.0"
__all__ = [
    "ImageBertConfig",
    "ImageBertForPreTraining",
    "ImageBertForRetrieval",
    "ImageBertImageProcessor",
    "ImageBertModel",
    "ImageBertPreTrainedModel",
    "ImageBertProcessor",
    "ImageTextRetrievalPipeline",
]
