"""ImageBERT as a native Hugging Face Transformers model.

Importing the package registers the model with `AutoConfig`, `AutoModel`, `AutoModelForPreTraining` and, for the
retrieval model (a one-logit pair classifier), `AutoModelForSequenceClassification`; the processor with
`AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining, AutoModelForSequenceClassification

from .configuration_imagebert import ImageBertConfig
from .modeling_imagebert import (
    ImageBertForPreTraining,
    ImageBertForRetrieval,
    ImageBertModel,
    ImageBertPreTrainedModel,
)
from .processing_imagebert import ImageBertProcessor  # registers AutoProcessor

AutoConfig.register(ImageBertConfig.model_type, ImageBertConfig, exist_ok=True)
AutoModel.register(ImageBertConfig, ImageBertModel, exist_ok=True)
AutoModelForPreTraining.register(ImageBertConfig, ImageBertForPreTraining, exist_ok=True)
AutoModelForSequenceClassification.register(ImageBertConfig, ImageBertForRetrieval, exist_ok=True)


__version__ = "0.1.0"
__all__ = [
    "ImageBertConfig",
    "ImageBertForPreTraining",
    "ImageBertForRetrieval",
    "ImageBertModel",
    "ImageBertPreTrainedModel",
    "ImageBertProcessor",
]
