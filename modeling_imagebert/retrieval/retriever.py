"""Text-to-image search over a collection with one ImageBERT checkpoint: the images are embedded once (the index),
each query is embedded, its top candidates by cosine similarity are re-ranked by the cross-encoder.

    retriever = ImageBertRetriever(model, processor, candidates=16).index(dataset)
    retriever.search(["a red cube left of a blue ball"], top_k=5)  # [[SearchHit(image_id, score, similarity)]]
    retriever.save_index("index.pt")  # later: ImageBertRetriever(model, processor).load_index("index.pt")
"""

from __future__ import annotations

import io
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import atomic_write_bytes
from .evaluation import RetrievalInputs, encode_images, model_fingerprint
from .two_stage import FINAL_SCORES, _check_embedding_model, embed_images, embed_texts, score_pairs


@dataclass
class SearchHit:
    """One result: the image id, its final score and its cosine similarity to the query."""

    image_id: str
    score: float
    similarity: float


class ImageBertRetriever:
    """Two-stage search: embeddings from the model's shared encoder pick `candidates` images per query, the model's
    cross-encoder score (`model.score`) re-ranks them.

    Args:
        model: `ImageBertForRetrieval` (fine-tuned) or `ImageBertForPreTraining` (zero-shot ITM); put in eval mode.
        processor: the `ImageBertProcessor` the model was trained with.
        candidates: images re-ranked per query (K).
        final_score: "itm" (the cross-encoder's logit) or "itm+itc" (plus the scaled cosine similarity, as BLIP).
        batch_size: pairs (and images, queries) per forward pass.
        bf16: bfloat16 autocast.
        device: where to run (default: the model's device).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        processor,
        *,
        candidates: int = 16,
        final_score: str = "itm",
        batch_size: int = 256,
        bf16: bool = False,
        device: torch.device | str | None = None,
    ):
        model = getattr(model, "module", model)
        _check_embedding_model(model)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
        if final_score not in FINAL_SCORES:
            raise ValueError(f"final_score must be one of {FINAL_SCORES}, got {final_score!r}")
        self.model = model.eval()
        self.processor = processor
        self.candidates = candidates
        self.final_score = final_score
        self.batch_size = batch_size
        self.bf16 = bf16
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.image_ids: list[str] = []
        self.images: dict[str, torch.Tensor] | None = None
        self.image_embeds: torch.Tensor | None = None

    def index(self, records) -> ImageBertRetriever:
        """Encode and embed a collection of images once (replacing any previous index).

        Args:
            records: a `datasets.Dataset` or a sequence of rows in the schema of `modeling_imagebert.data.schema`
                (image_id, region_features, region_boxes, image_width, image_height, region_classes,
                region_scores; a caption is not needed). Rows repeating an image_id are skipped.

        Returns:
            self, with `image_ids` (I), `images` (padded region tensors) and `image_embeds` [I, projection_dim].
        """
        rows = records.with_format("numpy", dtype=None) if hasattr(records, "with_format") else records
        seen: dict[str, None] = {}  # image ids in order of their first row (a dict: ordered, fast lookup)

        def first_rows():  # each image's first (row index, record), read while encoding: nothing is copied first
            for row_index, record in enumerate(rows):
                image_id = str(record.get("image_id"))
                if image_id not in seen:
                    seen[image_id] = None
                    yield row_index, record

        unique = first_rows()
        first = next(unique, None)
        if first is None:
            raise ValueError("ImageBertRetriever.index: the collection has no images")
        self.images = encode_images(
            itertools.chain([first], unique),
            self.processor,
            use_global_image_feature=bool(getattr(self.model.config, "use_global_image_feature", False)),
            feature_dtype=torch.float32,
        )
        self.image_ids = list(seen)
        self.image_embeds = embed_images(
            self.model, self.images, batch_size=self.batch_size, bf16=self.bf16, device=self.device
        )
        return self

    def save_index(self, path: str | os.PathLike) -> Path:
        """Write the index (image ids, padded region tensors, embeddings, the model's fingerprint) to one file,
        atomically. Returns the path."""
        if self.image_embeds is None:
            raise RuntimeError("ImageBertRetriever.save_index: nothing indexed yet; call index(...) first")
        buffer = io.BytesIO()
        torch.save(
            {
                "format": 1,
                "model": model_fingerprint(self.model),
                "image_ids": self.image_ids,
                "images": self.images,
                "image_embeds": self.image_embeds,
            },
            buffer,
        )
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, buffer.getvalue())

    def load_index(self, path: str | os.PathLike) -> ImageBertRetriever:
        """Load an index written by `save_index` with the same model weights (checked by fingerprint). Returns self."""
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != 1:
            raise ValueError(f"{path}: not an ImageBertRetriever index (expected the file save_index writes)")
        if payload["model"] != model_fingerprint(self.model):
            raise ValueError(
                f"{path}: the index was built with other model weights or config; rebuild it with index(...)"
            )
        self.image_ids = list(payload["image_ids"])
        self.images = payload["images"]
        self.image_embeds = payload["image_embeds"]
        return self

    def search(self, queries: str | Sequence[str], top_k: int = 10) -> list[list[SearchHit]]:
        """The best `top_k` indexed images for each text query, best first.

        Args:
            queries: one caption or a list of captions.
            top_k: results per query (at most `candidates`: only the candidates are re-ranked).

        Returns:
            One list of `SearchHit` per query.
        """
        if self.image_embeds is None:
            raise RuntimeError("ImageBertRetriever.search: call index(...) with a collection first")
        if isinstance(queries, str):
            queries = [queries]
        if not queries:
            return []
        for position, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"query {position}: expected a non-empty string, got {query!r}")
        text = self.processor(text=list(queries))
        text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        text_embeds = embed_texts(
            self.model, text, batch_size=self.batch_size, bf16=self.bf16, device=self.device
        )
        similarity = text_embeds @ self.image_embeds.t()  # (Q, I)
        k = min(self.candidates, similarity.shape[1])
        top = similarity.topk(k, dim=1)  # (Q, k)
        inputs = RetrievalInputs(
            image_ids=self.image_ids,
            caption_image_index=torch.zeros(len(queries), dtype=torch.long),
            text=text,
            images=self.images,
        )
        caption_index = torch.arange(len(queries)).repeat_interleave(k)  # (Q * k,)
        scores = score_pairs(
            self.model,
            inputs,
            caption_index,
            top.indices.reshape(-1),
            batch_size=self.batch_size,
            bf16=self.bf16,
            device=self.device,
        ).view(len(queries), k)
        if self.final_score == "itm+itc":
            scores = scores + float(self.model.itc_head.scale().detach()) * top.values
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :top_k]
        return [
            [
                SearchHit(
                    image_id=self.image_ids[int(top.indices[q, j])],
                    score=float(scores[q, j]),
                    similarity=float(top.values[q, j]),
                )
                for j in order[q].tolist()
            ]
            for q in range(len(queries))
        ]


__all__ = ["ImageBertRetriever", "SearchHit"]
