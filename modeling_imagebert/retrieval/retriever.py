"""Text-to-image search over a collection with one ImageBERT checkpoint: the images are embedded once (the index),
each query is embedded, its top candidates by cosine similarity are re-ranked by the cross-encoder.

    retriever = ImageBertRetriever(model, processor, candidates=16).index(dataset)  # or .index_images("photos/")
    retriever.search(["a red cube left of a blue ball"], top_k=5)  # [[SearchHit(image_id, score, similarity)]]
    retriever.save_index("index.safetensors")  # later: ImageBertRetriever(model, processor).load_index(...)

The candidates come from `retrieval.vector_index` (faiss when installed: exact `IndexFlatIP` up to `EXACT_LIMIT`
images, IVF or HNSW beyond it or on request; the same exact results through torch without faiss). A saved index is
one safetensors file: the image ids, region tensors and embeddings, faiss's own bytes for an approximate index, and
the settings it was built with (model fingerprint and name, embedding dimension, processor settings, index type and
options) and a digest of its content (image ids in order, region tensors, embeddings) as JSON metadata; loading
checks each of them and refuses a mismatch in one line naming it. Nothing in the file is unpickled.

Values are checked where they enter: `index` refuses a record whose region features are NaN or infinite (the
processor names the record, its image_id and the field) and an image whose embedding comes out non-finite (naming
its image_id), since one NaN embedding would rank first or last for every query; counts (`candidates`,
`batch_size`, `top_k`) must be ints >= 1.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes
from ..safe_loading import check_input_file, load_safetensors_file, open_safetensors
from .evaluation import RetrievalInputs, _hash_tensor, model_fingerprint
from .indexing import (
    IMAGE_TENSORS,
    embed_image_files,
    encode_and_embed,
    list_image_files,
    processor_settings,
)
from .scoring import check_count
from .two_stage import FINAL_SCORES, _check_embedding_model, embed_texts, score_pairs
from .vector_index import INDEX_TYPES, IndexOptions, VectorIndex

INDEX_FORMAT = "imagebert-retriever-index"
INDEX_FORMAT_VERSION = 3  # 3: the settings hold `content_sha256`; version 2 files still load, unchecked by it
_READABLE_VERSIONS = ("2", "3")
_BUILD_OPTIONS = (
    "exact_limit",
    "nlist",
    "train_size",
    "kmeans_iterations",
    "hnsw_m",
    "ef_construction",
    "seed",
)
_SEARCH_OPTIONS = ("nprobe", "ef_search")


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
        processor: the `ImageBertProcessor` the model was trained with (with a detector for `index_images`).
        candidates: images re-ranked per query (K).
        final_score: "itm" (the cross-encoder's logit) or "itm+itc" (plus the scaled cosine similarity, as BLIP).
        batch_size: pairs (and images, queries) per forward pass.
        bf16: bfloat16 autocast.
        device: where to run (default: the model's device).
        index_type: the stage-1 index: "exact", "ivf", "hnsw" or "auto" (exact up to
            `index_options["exact_limit"]` images, 1,000,000 by default, approximate beyond);
            see `modeling_imagebert.retrieval.vector_index`. Approximate indexes need faiss (`pip install faiss-cpu`).
        index_options: the faiss parameters (`vector_index.IndexOptions`: nlist, nprobe, hnsw_m, ef_construction,
            ef_search, exact_limit, train_size, kmeans_iterations, seed, use_gpu), by name.
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
        index_type: str = "auto",
        index_options: dict[str, Any] | None = None,
    ):
        model = getattr(model, "module", model)
        _check_embedding_model(model)
        _check_count("candidates", candidates)
        _check_count("batch_size", batch_size)
        if final_score not in FINAL_SCORES:
            raise ValueError(f"final_score must be one of {FINAL_SCORES}, got {final_score!r}")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"index_type must be one of {INDEX_TYPES}, got {index_type!r}")
        self.model = model.eval()
        self.processor = processor
        self.candidates = candidates
        self.final_score = final_score
        self.batch_size = batch_size
        self.bf16 = bf16
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.index_type = index_type
        self.index_options = IndexOptions.from_mapping(index_options)
        self._given_options = frozenset(index_options or {})
        self.image_ids: list[str] = []
        self.images: dict[str, torch.Tensor] | None = None
        self.image_embeds: torch.Tensor | None = None
        self.vector_index: VectorIndex | None = None
        self._from_image_files = False  # indexed by index_images: the processor's detector found the regions

    # ------------------------------------------------------------------------------------------------ indexing

    def index(self, records) -> ImageBertRetriever:
        """Encode and embed a collection of images once (replacing any previous index).

        Args:
            records: a `datasets.Dataset` or a sequence of rows in the schema of `modeling_imagebert.data.schema`
                (image_id, region_features, region_boxes, image_width, image_height, region_classes,
                region_scores; a caption is not needed). Rows repeating an image_id are skipped.

        Returns:
            self, with `image_ids` (I), `images` (padded region tensors), `image_embeds` [I, projection_dim] and
            `vector_index` (the stage-1 index over them).
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
        images, embeds = encode_and_embed(
            self.model,
            self.processor,
            itertools.chain([first], unique),
            batch_size=self.batch_size,
            bf16=self.bf16,
            device=self.device,
        )
        return self._set_index(list(seen), images, embeds)

    def index_images(
        self,
        paths: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        batch_size: int = 32,
        cache_dir: str | os.PathLike | None = None,
        progress: bool = True,
        image_ids: Sequence[str] | None = None,
    ) -> ImageBertRetriever:
        """Index image files: the processor's detector finds their regions, then as `index` (replacing any
        previous index).

        Args:
            paths: a folder of images (searched recursively, sorted by relative path), an image file, or a sequence
                of files and folders.
            batch_size: images per detection call (and per cache file).
            cache_dir: keep each finished batch there (written atomically), so that a run killed or stopped
                part-way resumes where it was and ends with the same index (`retrieval.indexing`).
            progress: a tqdm bar over the images.
            image_ids: ids of the listed files, in order (default: each file's name without its extension, the
                extraction CLI's default).

        Returns:
            self, indexed.
        """
        files = list_image_files(paths, image_ids)
        images, embeds = embed_image_files(
            self.model,
            self.processor,
            files,
            batch_size=batch_size,
            model_batch_size=self.batch_size,
            bf16=self.bf16,
            device=self.device,
            cache_dir=cache_dir,
            progress=progress,
        )
        return self._set_index([image_id for image_id, _ in files], images, embeds, from_image_files=True)

    def _set_index(
        self,
        image_ids: list[str],
        images: dict[str, torch.Tensor],
        embeds: torch.Tensor,
        *,
        from_image_files: bool = False,
    ):
        # The features were checked finite where they entered (the processor); an embedding can still overflow
        # (huge finite features): one non-finite row would rank first or last for every query.
        finite = torch.isfinite(embeds).all(dim=1)
        if not bool(finite.all()):
            bad = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"ImageBertRetriever.index: image_id {image_ids[bad]!r}: its embedding (image_embeds) is NaN or "
                f"infinite ({int((~finite).sum())} such images); its region_features are too large for the model "
                "(or bf16): rescale them as the model's training data was"
            )
        self.image_ids = image_ids
        self._from_image_files = from_image_files
        self.images = images
        self.image_embeds = embeds
        self.vector_index = VectorIndex.build(embeds, self.index_type, self.index_options, device=self.device)
        return self

    # ------------------------------------------------------------------------------------------------ saving

    def _settings(self) -> dict[str, Any]:
        """What the index depends on, recorded in the saved file and checked when it is loaded."""
        return {
            "model": model_fingerprint(self.model),
            "model_name": str(getattr(self.model, "name_or_path", "") or ""),
            "embedding_dim": int(self.image_embeds.shape[1]),
            "num_images": len(self.image_ids),
            "image_ids_sha256": _ids_digest(self.image_ids),
            "content_sha256": _content_digest(self.image_ids, self.images, self.image_embeds),
            "processor": processor_settings(self.processor, with_detector=self._from_image_files),
            "index": {
                "type": self.index_type,
                "kind": self.vector_index.kind,
                "options": self.vector_index.options.to_dict(),
            },
        }

    def save_index(self, path: str | os.PathLike) -> Path:
        """Write the index (image ids, padded region tensors, embeddings, faiss's bytes of an approximate index, the
        settings it was built with) to one safetensors file, atomically. Returns the path."""
        from safetensors.torch import save

        if self.vector_index is None:
            raise RuntimeError("ImageBertRetriever.save_index: nothing indexed yet; call index(...) first")
        tensors = {f"images.{name}": tensor.contiguous() for name, tensor in self.images.items()}
        tensors["image_embeds"] = self.image_embeds.contiguous()
        tensors["image_ids"] = _bytes_tensor(json.dumps(self.image_ids).encode("utf-8"))
        faiss_bytes = self.vector_index.serialize()
        if faiss_bytes is not None:
            tensors["faiss_index"] = _bytes_tensor(faiss_bytes)
        metadata = {
            "format": INDEX_FORMAT,
            "format_version": str(INDEX_FORMAT_VERSION),
            "settings": json.dumps(self._settings(), sort_keys=True),
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_bytes(path, save(tensors, metadata))

    def load_index(
        self, path: str | os.PathLike, *, image_ids: Sequence[str] | None = None
    ) -> ImageBertRetriever:
        """Load an index written by `save_index`.

        Refused, in one line naming what differs: another embedding dimension, other processor settings
        (max_regions, max_text_length), another index type than this retriever's `index_type` asks for (or other
        build options among those given in `index_options`), other image ids than `image_ids` (when given), other
        model weights or config. This retriever's search options (nprobe, ef_search) apply when given.

        Args:
            path: the file.
            image_ids: when given, the index must hold exactly these images, in this order.

        Returns:
            self.
        """
        path = Path(path)
        check_input_file(path, "an index written by save_index")
        with open(path, "rb") as handle:
            head = handle.read(4)
        if head == b"PK\x03\x04":
            raise ValueError(
                f"{path}: an index written by an earlier version (a torch file without its embedding settings); "
                "rebuild it with index(...) and save_index"
            )
        try:
            with open_safetensors(path, "an index written by save_index") as handle:
                metadata = handle.metadata() or {}
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not an ImageBertRetriever index ({error})") from None
        if metadata.get("format") != INDEX_FORMAT:
            raise ValueError(f"{path}: not an ImageBertRetriever index (expected the file save_index writes)")
        if metadata.get("format_version") not in _READABLE_VERSIONS:
            raise ValueError(
                f"{path}: an ImageBertRetriever index of format version {metadata.get('format_version')!r}, this "
                f"version reads {list(_READABLE_VERSIONS)}; rebuild it with index(...) and save_index"
            )
        try:
            saved = json.loads(metadata["settings"])
            _check_settings_shape(saved)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path}: damaged index: its settings cannot be read ({error}); rebuild it with index(...)"
            ) from None
        self._check_settings(path, saved, image_ids)
        tensors = load_safetensors_file(path, "an index written by save_index")
        ids = json.loads(tensors.pop("image_ids").numpy().tobytes().decode("utf-8"))
        embeds = tensors.pop("image_embeds")
        images = {name: tensors[f"images.{name}"] for name in IMAGE_TENSORS if f"images.{name}" in tensors}
        if (
            len(ids) != saved["num_images"]
            or _ids_digest(ids) != saved["image_ids_sha256"]
            or tuple(embeds.shape) != (len(ids), saved["embedding_dim"])
            or any(tensor.shape[0] != len(ids) for tensor in images.values())
        ):
            raise ValueError(f"{path}: damaged index: its image ids, embeddings and settings disagree")
        if "content_sha256" in saved:
            if _content_digest(ids, images, embeds) != saved["content_sha256"]:
                raise ValueError(
                    f"{path}: damaged or edited index: its image ids, region tensors or embeddings are not those "
                    "it was saved with (content digest differs); rebuild it with index(...)"
                )
        else:
            warnings.warn(
                f"{path}: an index of format version 2, without a digest of its content: its embeddings are not "
                "checked; save_index writes the current format",
                stacklevel=2,
            )
        if not bool(torch.isfinite(embeds).all()):
            raise ValueError(
                f"{path}: damaged index: it holds NaN or infinite embeddings; rebuild it with index(...)"
            )
        options = IndexOptions(
            **{
                **saved["index"]["options"],
                **{
                    name: getattr(self.index_options, name)
                    for name in _SEARCH_OPTIONS
                    if name in self._given_options
                },
                "use_gpu": self.index_options.use_gpu,
            }
        )
        faiss_bytes = tensors.get("faiss_index")
        self.vector_index = VectorIndex.restore(
            saved["index"]["kind"],
            embeds,
            options,
            None if faiss_bytes is None else faiss_bytes.numpy().tobytes(),
            device=self.device,
        )
        self.image_ids, self.images, self.image_embeds = ids, images, embeds
        self._from_image_files = "detector" in saved["processor"]
        return self

    def _check_settings(self, path: Path, saved: dict[str, Any], image_ids: Sequence[str] | None) -> None:
        """Refuse, in one line, an index built with other settings than this retriever's."""
        dim = int(self.model.config.projection_dim)
        if saved["embedding_dim"] != dim:
            raise ValueError(
                f"{path}: embedding dimension differs: the index holds {saved['embedding_dim']}-d embeddings, the "
                f"model's projection_dim is {dim}; rebuild it with index(...)"
            )
        ours = processor_settings(self.processor, with_detector="detector" in saved["processor"])
        for name, value in saved["processor"].items():
            if name == "detector" and ours.get(name) != value:
                raise ValueError(
                    f"{path}: the index was built from image files with another detector (or detector image "
                    "processor) than this retriever's processor has: its regions would differ; rebuild it with "
                    "index_images(...)"
                )
            if ours.get(name) != value:
                raise ValueError(
                    f"{path}: processor setting {name} differs: the index was built with {name}={value}, this "
                    f"retriever's processor has {name}={ours.get(name)}; rebuild it with index(...)"
                )
        kind, size = saved["index"]["kind"], saved["num_images"]
        if self.index_type == "auto":
            wanted = "exact" if size <= self.index_options.exact_limit else None  # None: any kind
        else:
            wanted = self.index_type
        if wanted is not None and kind != wanted:
            raise ValueError(
                f"{path}: index type differs: the index is {kind!r} (built with index_type="
                f"{saved['index']['type']!r}), this retriever's index_type={self.index_type!r} wants {wanted!r} for "
                f"{size} images; pass index_type={kind!r} or rebuild it with index(...)"
            )
        for name in _BUILD_OPTIONS:
            if name in self._given_options and name != "exact_limit":
                value = getattr(self.index_options, name)
                if saved["index"]["options"].get(name) != value:
                    raise ValueError(
                        f"{path}: index option {name} differs: the index was built with {name}="
                        f"{saved['index']['options'].get(name)}, this retriever asks for {name}={value}"
                    )
        if image_ids is not None:
            image_ids = [str(image_id) for image_id in image_ids]
            if _ids_digest(image_ids) != saved["image_ids_sha256"]:
                raise ValueError(
                    f"{path}: image ids differ: the index holds {saved['num_images']} other images (or another "
                    f"order) than the {len(image_ids)} given"
                )
        if saved["model"] != model_fingerprint(self.model):
            name = f" ({saved['model_name']})" if saved.get("model_name") else ""
            raise ValueError(
                f"{path}: the index was built with other model weights or config{name}; rebuild it with index(...)"
            )

    # ------------------------------------------------------------------------------------------------ search

    def search(
        self, queries: str | Sequence[str], top_k: int = 10, *, timings: dict[str, float] | None = None
    ) -> list[list[SearchHit]]:
        """The best `top_k` indexed images for each text query, best first.

        Args:
            queries: one caption or a list of captions.
            top_k: results per query (at most `candidates`: only the candidates are re-ranked).
            timings: when given, filled with the seconds spent embedding the queries ("embed"), in the stage-1
                index ("search") and re-ranking with the cross-encoder ("rerank"); the search app shows them.

        Returns:
            One list of `SearchHit` per query.
        """
        _check_count("top_k", top_k)
        if self.vector_index is None:
            raise RuntimeError("ImageBertRetriever.search: call index(...) with a collection first")
        if isinstance(queries, str):
            queries = [queries]
        if not queries:
            return []
        for position, query in enumerate(queries):
            if not isinstance(query, str) or not query.strip():
                raise ValueError(f"query {position}: expected a non-empty string, got {query!r}")
        clock = {"start": time.perf_counter()}
        text = self.processor(text=list(queries))
        text = {"input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}
        text_embeds = embed_texts(
            self.model, text, batch_size=self.batch_size, bf16=self.bf16, device=self.device
        )
        clock["embed"] = time.perf_counter()
        ids, similarity = self.vector_index.search(text_embeds, self.candidates)  # (Q, k), (Q, k) float64
        clock["search"] = time.perf_counter()
        found = ids >= 0  # an approximate index may find fewer than k
        inputs = RetrievalInputs(
            image_ids=self.image_ids,
            caption_image_index=torch.zeros(len(queries), dtype=torch.long),
            text=text,
            images=self.images,
        )
        caption_index = torch.arange(len(queries))[:, None].expand_as(ids)[found]  # (pairs,) row-major
        scores = torch.full(ids.shape, -torch.inf)
        scores[found] = score_pairs(
            self.model,
            inputs,
            caption_index,
            ids[found],
            batch_size=self.batch_size,
            bf16=self.bf16,
            device=self.device,
        )
        if self.final_score == "itm+itc":
            scores = scores + float(self.model.itc_head.scale().detach()) * similarity.to(scores.dtype)
        order = scores.argsort(dim=1, descending=True, stable=True)[:, :top_k]
        if timings is not None:
            clock["rerank"] = time.perf_counter()
            names = ("start", "embed", "search", "rerank")
            timings.update({name: clock[name] - clock[before] for before, name in itertools.pairwise(names)})
        return [
            [
                SearchHit(
                    image_id=self.image_ids[int(ids[q, j])],
                    score=float(scores[q, j]),
                    similarity=float(similarity[q, j]),
                )
                for j in order[q].tolist()
                if found[q, j]
            ]
            for q in range(len(queries))
        ]


def _check_count(name: str, value: Any) -> None:
    """Refuses, in one line naming the parameter, a count that is not an int >= 1 (a bool, a float, a string, 0 or
    a negative number: `top_k=-1` would otherwise slice off the last hit, `batch_size=0` fail deep in a loop)."""
    check_count(f"ImageBertRetriever: {name}", value)


def _check_settings_shape(saved: Any) -> None:
    """Raises KeyError / TypeError when the saved settings lack what loading reads."""
    if not isinstance(saved, dict):
        raise TypeError("not a JSON object")
    for name in ("model", "embedding_dim", "num_images", "image_ids_sha256", "processor", "index"):
        if name not in saved:
            raise KeyError(name)
    if not isinstance(saved["processor"], dict) or not isinstance(saved["index"], dict):
        raise TypeError("processor and index must be JSON objects")


def _content_digest(image_ids: Sequence[str], images: dict[str, torch.Tensor], embeds: torch.Tensor) -> str:
    """sha256 (hex) of an index's content: the image ids in order, each region tensor and the embeddings (dtypes,
    shapes, bytes). Recorded by `save_index`, checked by `load_index`: ids rotated against their embeddings, or an
    embedding edited, no longer load."""
    digest = hashlib.sha256()
    digest.update(json.dumps(list(image_ids)).encode("utf-8"))
    for name in sorted(images):
        digest.update(name.encode())
        _hash_tensor(digest, images[name])
    digest.update(b"image_embeds")
    _hash_tensor(digest, embeds)
    return digest.hexdigest()


def _ids_digest(image_ids: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(image_ids)).encode("utf-8")).hexdigest()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


__all__ = ["ImageBertRetriever", "SearchHit"]
