"""The `image-text-retrieval` pipeline: images against texts, both ImageBERT scores per pair.

For each image and each text it returns the ITM probability (the cross-encoder: sigmoid of
`ImageBertForRetrieval`'s matching logit, the paper's score) and the ITC cosine (the contrastive embeddings of
`get_image_features` / `get_text_features`, the cheap first stage of two-stage retrieval).

Registered with `transformers.pipelines.PIPELINE_REGISTRY` when this module is imported (the package imports it).
Saved as remote code: `pipeline.save_pretrained(folder)` copies this file beside the model and writes
`custom_pipelines` into its config.json, so `pipeline("image-text-retrieval", model=folder, trust_remote_code=True)`
loads it without our package. Part of the remote-code unit: imports only torch and transformers.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "image-text-retrieval"


class ImageTextRetrievalPipeline(Pipeline):
    r"""
    Scores images against texts with an ImageBERT retrieval model and a detector-backed processor.

    Call: `retriever(images, texts=[...], pair_batch_size=32)`: `images` one image or a list (paths, `file://` URLs
    of local files, PIL images, RGB arrays), `texts` a list of captions; `pair_batch_size` is the most (image, text)
    pairs (and texts) per forward pass. (`batch_size` is the Pipeline's own, over images; leave it at 1.)

    Returns, per image (a list of lists for a list of images), one dict per text in the order given:
    `{"text", "itm_score" (ITM probability in [0, 1]), "itc_score" (cosine in [-1, 1])}`.

    The texts are encoded once per call (their ITC embeddings are reused for every image); each image is detected
    once and its region inputs broadcast against `pair_batch_size` texts at a time (see
    `ImageBertForRetrieval.forward`).

    Saving: `retriever.save_pretrained(folder)` writes the model, the processor with its detector (through
    `ImageBertImageProcessor`), this file and the config's `custom_pipelines`.

    Example:

    ```python
    >>> from transformers import pipeline
    >>> retriever = pipeline("image-text-retrieval", model="imagebert-retrieval", trust_remote_code=True)
    >>> retriever(["cat.jpg", "dog.jpg"], texts=["a cat on a sofa", "a dog in the snow"])
    ```
    """

    _load_processor = False
    _load_image_processor = True
    _load_feature_extractor = False
    _load_tokenizer = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._text_cache: tuple[tuple[str, ...], int, torch.Tensor] | None = None

    def __call__(self, images: Any, texts: list[str] | str | None = None, **kwargs):
        if texts is None:
            raise ValueError(f"{TASK}: pass texts=[...] to score the images against")
        texts = [texts] if isinstance(texts, str) else list(texts)
        self._text_cache = None  # text embeddings live for one call (the weights may change between calls)
        try:
            return super().__call__(images, texts=texts, **kwargs)
        finally:
            self._text_cache = None

    def _sanitize_parameters(self, texts=None, pair_batch_size=None, **kwargs):
        preprocess, forward = {}, {}
        if texts is not None:
            preprocess["texts"] = texts
        if pair_batch_size is not None:
            if (
                isinstance(pair_batch_size, bool)
                or not isinstance(pair_batch_size, int)
                or pair_batch_size < 1
            ):
                raise ValueError(f"{TASK}: pair_batch_size must be an int >= 1, got {pair_batch_size!r}")
            forward["pair_batch_size"] = pair_batch_size
        return preprocess, forward, {}

    @property
    def _processor(self):
        """The `ImageBertProcessor` behind the image processor: texts are tokenised exactly as
        `processor(text=...)` does (truncation to `max_text_length`, special tokens in captions split)."""
        return self.image_processor.processor

    def preprocess(self, image, texts: list[str]) -> dict[str, Any]:
        return {"image_inputs": self.image_processor(images=[image], return_tensors="pt"), "texts": texts}

    def _forward(self, model_inputs: dict[str, Any], pair_batch_size: int = 32) -> dict[str, Any]:
        texts = model_inputs["texts"]
        image_inputs = {key: value.to(self.device) for key, value in model_inputs["image_inputs"].items()}
        image_embeds = self.model.get_image_features(**image_inputs).pooler_output  # (1, D)
        text_embeds = self._text_embeddings(texts, pair_batch_size)  # (n, D)
        itm_logits = []
        for start in range(0, len(texts), pair_batch_size):
            text_inputs = self._text_inputs(texts[start : start + pair_batch_size])
            # One image against the chunk: the model broadcasts the image (logits (chunk,)).
            itm_logits.append(self.model(**text_inputs, **image_inputs).logits)
        return {
            "texts": texts,
            "itm_scores": torch.cat(itm_logits).sigmoid(),  # (n,)
            "itc_scores": (image_embeds @ text_embeds.T)[0],  # (n,) cosines (both sides L2-normalised)
        }

    def postprocess(self, model_outputs: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {"text": text, "itm_score": itm, "itc_score": itc}
            for text, itm, itc in zip(
                model_outputs["texts"],
                model_outputs["itm_scores"].float().tolist(),
                model_outputs["itc_scores"].float().tolist(),
                strict=True,
            )
        ]

    def _text_inputs(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return {key: value.to(self.device) for key, value in self._processor(text=texts).items()}

    def _text_embeddings(self, texts: list[str], pair_batch_size: int) -> torch.Tensor:
        """The L2-normalised ITC embeddings of `texts`, (n, D), computed once per call."""
        key = tuple(texts)
        if self._text_cache is None or self._text_cache[:2] != (key, pair_batch_size):
            embeds = [
                self.model.get_text_features(
                    **self._text_inputs(texts[start : start + pair_batch_size])
                ).pooler_output
                for start in range(0, len(texts), pair_batch_size)
            ]
            self._text_cache = (key, pair_batch_size, torch.cat(embeds))
        return self._text_cache[2]


PIPELINE_REGISTRY.register_pipeline(
    TASK,
    pipeline_class=ImageTextRetrievalPipeline,
    pt_model=AutoModelForSequenceClassification,
    type="multimodal",
)

__all__ = ["ImageTextRetrievalPipeline"]
