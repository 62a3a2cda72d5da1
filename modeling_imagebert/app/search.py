"""The search app's engine, without a UI: index a folder of images once, then answer queries.

    app = SearchApp.build("model-dir", "photos/", captions="captions.txt", detector="butd-vg", cache_dir="cache/")
    app.search_text("a dog on a sofa")            # QueryResult: ImageHit(image_id, path, ITM, ITC), timings
    app.search_captions("photos/dog.jpg")         # or an indexed image id: the captions that match it best
    app.similar_images("dog")                     # images whose embeddings are nearest
    app.draw_regions("dog")                       # (PIL image with the detector's boxes, [(label, score)])

Everything runs through the one-call API: `ImageBertProcessor` with a detector turns image files into regions,
`ImageBertRetriever.index_images` builds the index (resumably into `cache_dir`), `ImageBertRetriever.search` answers
text queries in two stages (ITC shortlist of `candidates` images, ITM re-rank). The image folder is only read:
the index cache goes to `cache_dir`, which must lie outside it (`check_cache_dir`).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..processing_imagebert import ImageBertProcessor, top_region_indices
from ..retrieval.evaluation import RetrievalInputs
from ..retrieval.indexing import encode_and_embed, list_image_files
from ..retrieval.retriever import ImageBertRetriever
from ..retrieval.two_stage import embed_texts, score_pairs
from ..retrieval.vector_index import VectorIndex

CANDIDATES = 16
SCORE_EXPLANATION = (
    "Stage 1 shortlists the {k} images whose ITC embedding is nearest the query (cosine, -1..1); stage 2 re-ranks "
    "them by ITM, the cross-encoder's probability that query and image match (0..1), which sets the order."
)
CAPTION_EXPLANATION = (
    "Stage 1 shortlists the {k} captions whose ITC embedding is nearest the image's (cosine); stage 2 re-ranks "
    "them by ITM, the cross-encoder's match probability, which sets the order."
)
SIMILAR_EXPLANATION = (
    "Images ranked by the cosine of their ITC embeddings to the query image's (stage 1 only)."
)


@dataclass
class ImageHit:
    """One image found: its id, file, ITM logit and probability (None for image-to-image search) and ITC cosine."""

    image_id: str
    path: str
    similarity: float
    itm_logit: float | None = None

    @property
    def itm_probability(self) -> float | None:
        return None if self.itm_logit is None else 1.0 / (1.0 + math.exp(-self.itm_logit))


@dataclass
class CaptionHit:
    """One caption found for an image: the caption, its ITM logit and ITC cosine."""

    caption: str
    itm_logit: float
    similarity: float

    @property
    def itm_probability(self) -> float:
        return 1.0 / (1.0 + math.exp(-self.itm_logit))


@dataclass
class QueryResult:
    """Hits best first, and the seconds the query spent: "embed" (query embedding, with detection for an image
    file), "search" (stage 1) and "rerank" (stage 2; 0 when there is none)."""

    hits: list
    timings: dict[str, float] = field(default_factory=dict)

    def timing_line(self) -> str:
        total = sum(self.timings.values())
        parts = ", ".join(
            f"{name} {1000 * self.timings.get(name, 0.0):.0f} ms" for name in ("embed", "search", "rerank")
        )
        return f"{1000 * total:.0f} ms: {parts}"


def check_image_folder(folder: str | os.PathLike) -> Path:
    """The image folder, checked readable; refused in one line (FileNotFoundError, NotADirectoryError,
    PermissionError) naming the folder otherwise."""
    path = Path(folder)
    if not path.exists():
        raise FileNotFoundError(f"--images {folder}: no such folder")
    if not path.is_dir():
        raise NotADirectoryError(f"--images {folder}: not a folder; expected a folder of image files")
    try:
        with os.scandir(path) as entries:
            next(entries, None)
    except PermissionError:
        raise PermissionError(f"--images {folder}: cannot read this folder (permission denied)") from None
    if not os.access(path, os.R_OK | os.X_OK):
        raise PermissionError(f"--images {folder}: cannot read this folder (permission denied)")
    return path


def default_cache_dir(images: str | os.PathLike) -> Path:
    """`$XDG_CACHE_HOME/modeling_imagebert/app/<folder name>-<digest of its absolute path>` (never inside it)."""
    folder = Path(images).resolve()
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modeling_imagebert" / "app"
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return root / f"{folder.name or 'root'}-{digest}"


def check_cache_dir(cache_dir: str | os.PathLike, images: str | os.PathLike) -> Path:
    """The cache folder, refused in one line when it lies inside the image folder (the app never writes there)."""
    cache, folder = Path(cache_dir).resolve(), Path(images).resolve()
    if cache == folder or folder in cache.parents:
        raise ValueError(
            f"--cache {cache_dir}: inside the image folder {images}; the app never writes there, choose a "
            "folder outside it"
        )
    return Path(cache_dir)


def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions, one a line (blank lines skipped); refused in one line when the file has none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(
            f"--captions {path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    captions = [line.strip() for line in lines if line.strip()]
    if not captions:
        raise ValueError(f"--captions {path}: no captions; expected one caption a line")
    return captions


def load_model(model_dir: str | os.PathLike):
    """The checkpoint's `ImageBertForRetrieval` when it was fine-tuned for retrieval, else its
    `ImageBertForPreTraining` (zero-shot ITM and ITC), in eval mode."""
    from transformers import AutoConfig

    from ..modeling_imagebert import ImageBertForPreTraining, ImageBertForRetrieval

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"--model {model_dir}: no config.json; expected a folder written by save_pretrained"
        )
    architectures = AutoConfig.from_pretrained(str(path)).architectures or []
    cls = ImageBertForRetrieval if "ImageBertForRetrieval" in architectures else ImageBertForPreTraining
    return cls.from_pretrained(str(path)).eval()


def detector_class_names(processor) -> list[str] | None:
    """Names of the detector's classes from its config's `id2label`, when it has real ones."""
    detector = getattr(processor, "detector", None)
    labels = getattr(getattr(detector, "config", None), "id2label", None) or {}
    names = [str(labels[key]) for key in sorted(labels)]
    if not names or all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None
    return names


class SearchApp:
    """An indexed folder and the queries on it.

    Args:
        retriever: an indexed `ImageBertRetriever` (its `image_ids` are the files' ids).
        files: (image_id, path) of the indexed files, in index order (`list_image_files`).
        captions: the captions an image query ranks (None: image queries find similar images only).
        class_names: the detector's class names, by class id (None: "class <id>").
    """

    def __init__(
        self,
        retriever: ImageBertRetriever,
        files: Sequence[tuple[str, str]],
        *,
        captions: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
    ):
        self.retriever = retriever
        self.paths = dict(files)
        self.row = {image_id: row for row, image_id in enumerate(retriever.image_ids)}
        self.class_names = list(class_names) if class_names is not None else None
        self.captions = list(captions or [])
        self.caption_text = None
        self.caption_index = None
        if self.captions:
            text = retriever.processor(text=self.captions)
            self.caption_text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
            embeds = embed_texts(retriever.model, self.caption_text, batch_size=retriever.batch_size)
            self.caption_index = VectorIndex.build(embeds, "exact")

    @classmethod
    def build(
        cls,
        model: str | os.PathLike | torch.nn.Module,
        images: str | os.PathLike,
        *,
        processor: ImageBertProcessor | None = None,
        captions: str | os.PathLike | Sequence[str] | None = None,
        detector: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
        candidates: int = CANDIDATES,
        class_names: Sequence[str] | None = None,
        progress: bool = True,
    ) -> SearchApp:
        """Load the model and its processor (with `detector`, or the detector saved beside it), index `images`
        (resumably, in `cache_dir`: default `default_cache_dir(images)`), read the captions.

        Args:
            model: a checkpoint folder (or a loaded model, with `processor`).
            images: the folder of images (read only).
            processor: the processor with a detector (default: the checkpoint's, with `detector`).
            captions: a file of captions, one a line, or the captions.
            detector: a BUTD detector folder (default: the one saved in the checkpoint's processor).
            cache_dir: where the index's batches go; must lie outside `images`.
            candidates: K, the images stage 2 re-ranks per query.
            class_names: the detector's class names (default: from its config).
            progress: a progress bar while indexing.
        """
        folder = check_image_folder(images)
        cache = check_cache_dir(cache_dir if cache_dir is not None else default_cache_dir(folder), folder)
        files = list_image_files(folder)
        for _, path in files:
            if not os.access(path, os.R_OK):
                raise PermissionError(f"--images {images}: cannot read {path} (permission denied)")
        if isinstance(captions, (str, os.PathLike)):
            captions = read_captions(captions)
        model = load_model(model) if isinstance(model, (str, os.PathLike)) else model.eval()
        if processor is None:
            processor = ImageBertProcessor.from_pretrained(str(model.name_or_path), detector=detector)
        if getattr(processor, "detector", None) is None and type(processor).detect_regions is (
            ImageBertProcessor.detect_regions
        ):
            raise ValueError(
                f"--model {model.name_or_path}: its processor has no detector; pass --detector DIR (a BUTD detector "
                "folder written by save_pretrained)"
            )
        retriever = ImageBertRetriever(model, processor, candidates=candidates, index_type="exact")
        retriever.index_images(
            files_paths(files), image_ids=[i for i, _ in files], cache_dir=cache, progress=progress
        )
        if class_names is None:
            class_names = detector_class_names(processor)
        return cls(retriever, files, captions=captions, class_names=class_names)

    # ------------------------------------------------------------------------------------------------ queries

    def search_text(self, query: str, top_k: int = 8) -> QueryResult:
        """The best `top_k` (at most K) images for a text query: stage 1 by ITC, stage 2 by ITM."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query: type a few words")
        timings: dict[str, float] = {}
        hits = self.retriever.search([query], top_k=min(top_k, self.retriever.candidates), timings=timings)[0]
        return QueryResult(
            [ImageHit(hit.image_id, self.paths[hit.image_id], hit.similarity, hit.score) for hit in hits],
            timings,
        )

    def _image_inputs(
        self, image: str | os.PathLike
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, str | None]:
        """Region tensors [1, R, ...] and embedding [1, D] of an indexed image id (looked up) or an image file
        (detected and embedded now); and the indexed id, if any."""
        key = str(image)
        if key in self.row:
            row = self.row[key]
            images = {name: tensor[row : row + 1] for name, tensor in self.retriever.images.items()}
            return images, self.retriever.image_embeds[row : row + 1], key
        if not Path(key).is_file():
            raise FileNotFoundError(f"image {key}: no such file or indexed image id")
        records = self.retriever.processor.detect_regions([key], image_ids=["query"])
        images, embeds = encode_and_embed(
            self.retriever.model, self.retriever.processor, enumerate(records), device=self.retriever.device
        )
        return images, embeds, None

    def search_captions(self, image: str | os.PathLike, top_k: int = 5) -> QueryResult:
        """The captions that best describe an image (an indexed id or an image file): ITC shortlist of K, ITM."""
        if self.caption_index is None:
            raise ValueError("no captions: start the app with --captions FILE to search captions by image")
        start = time.perf_counter()
        images, embeds, _ = self._image_inputs(image)
        embedded = time.perf_counter()
        ids, similarity = self.caption_index.search(
            embeds, min(self.retriever.candidates, len(self.captions))
        )
        searched = time.perf_counter()
        inputs = RetrievalInputs(
            image_ids=["query"], caption_image_index=torch.zeros(0, dtype=torch.long), text=self.caption_text,
            images=images,
        )  # fmt: skip
        logits = score_pairs(
            self.retriever.model,
            inputs,
            ids[0],
            torch.zeros_like(ids[0]),
            batch_size=self.retriever.batch_size,
        )
        order = logits.argsort(descending=True, stable=True)[:top_k].tolist()
        hits = [
            CaptionHit(self.captions[int(ids[0, j])], float(logits[j]), float(similarity[0, j]))
            for j in order
        ]
        timings = {
            "embed": embedded - start,
            "search": searched - embedded,
            "rerank": time.perf_counter() - searched,
        }
        return QueryResult(hits, timings)

    def similar_images(self, image: str | os.PathLike, top_k: int = 8) -> QueryResult:
        """The indexed images nearest an image (an indexed id, left out of its own results, or an image file) by
        the cosine of their ITC embeddings."""
        start = time.perf_counter()
        _, embeds, own_id = self._image_inputs(image)
        embedded = time.perf_counter()
        ids, similarity = self.retriever.vector_index.search(embeds, top_k + 1)
        hits = []
        for j, index in enumerate(ids[0].tolist()):
            image_id = self.retriever.image_ids[index] if index >= 0 else None
            if image_id is not None and image_id != own_id and len(hits) < top_k:
                hits.append(ImageHit(image_id, self.paths[image_id], float(similarity[0, j])))
        timings = {"embed": embedded - start, "search": time.perf_counter() - embedded, "rerank": 0.0}
        return QueryResult(hits, timings)

    # ------------------------------------------------------------------------------------------------ regions

    def path_of(self, image: str | os.PathLike) -> str:
        """The file of an indexed image id, or `image` itself when it is a file."""
        key = str(image)
        if key in self.paths:
            return self.paths[key]
        if Path(key).is_file():
            return key
        raise FileNotFoundError(f"image {key}: no such file or indexed image id")

    def detect(self, image: str | os.PathLike) -> dict:
        """The detector's record of one image (boxes in pixels, classes, scores), the regions the model sees: the
        top `max_regions` by score."""
        record = self.retriever.processor.detect_regions([self.path_of(image)], image_ids=["query"])[0]
        keep = top_region_indices(record["region_scores"], self.retriever.processor.max_regions)
        return {**record, "region_boxes": record["region_boxes"][keep], "region_classes": record["region_classes"][keep],
                "region_scores": record["region_scores"][keep]}  # fmt: skip

    def class_name(self, class_id: int) -> str:
        if self.class_names is not None and 0 <= class_id < len(self.class_names):
            return self.class_names[class_id]
        return f"class {class_id}"

    def draw_regions(self, image: str | os.PathLike):
        """The image with the detector's boxes and class labels drawn (PIL ImageDraw), and the (label, score) of
        each region drawn, best first."""
        from PIL import Image, ImageDraw

        record = self.detect(image)
        with Image.open(self.path_of(image)) as opened:
            picture = opened.convert("RGB")
        # Boxes are in the detector's pixels of the image as decoded (EXIF-rotated): scale to this picture.
        sx = picture.width / max(1, int(record["image_width"]))
        sy = picture.height / max(1, int(record["image_height"]))
        draw = ImageDraw.Draw(picture)
        palette = (
            (230, 25, 75),
            (60, 180, 75),
            (0, 130, 200),
            (245, 130, 48),
            (145, 30, 180),
            (70, 240, 240),
        )
        labels = []
        for n, (box, class_id, score) in enumerate(
            zip(record["region_boxes"], record["region_classes"], record["region_scores"], strict=True)
        ):
            x1, y1, x2, y2 = (float(box[0]) * sx, float(box[1]) * sy, float(box[2]) * sx, float(box[3]) * sy)
            color = palette[n % len(palette)]
            label = self.class_name(int(class_id))
            draw.rectangle((x1, y1, x2, y2), outline=color, width=3)
            text = f"{label} {float(score):.2f}"
            left, top, right, bottom = draw.textbbox((x1 + 2, y1 + 2), text)
            draw.rectangle((left - 2, top - 1, right + 2, bottom + 1), fill=color)
            draw.text((x1 + 2, y1 + 2), text, fill=(255, 255, 255))
            labels.append((label, float(score)))
        return picture, labels


def files_paths(files: Sequence[tuple[str, str]]) -> list[str]:
    return [path for _, path in files]


__all__ = [
    "CANDIDATES",
    "CaptionHit",
    "ImageHit",
    "QueryResult",
    "SearchApp",
    "check_cache_dir",
    "check_image_folder",
    "default_cache_dir",
    "read_captions",
]
