# Being written in this session; replaced by the real model shortly.
from transformers import PreTrainedModel

from .configuration_imagebert import ImageBertConfig


class ImageBertPreTrainedModel(PreTrainedModel):
    config_class = ImageBertConfig


class ImageBertModel(ImageBertPreTrainedModel):
    pass


class ImageBertForPreTraining(ImageBertPreTrainedModel):
    pass


class ImageBertForRetrieval(ImageBertPreTrainedModel):
    pass
