"""Two-stage image-text retrieval: embeddings from the same encoder pick candidates, the cross-encoder re-ranks them.

Full ranking scores every (caption, image) pair with the cross-encoder (C x I forward passes). Here:

1. every caption and every image is embedded ONCE by a unimodal pass through the same encoder
   (`get_text_features` / `get_image_features`: C + I passes), and the cosine similarity matrix [C, I] is formed;
2. each caption keeps its top-K images and each image its top-K captions (both directions, as ALBEF and BLIP do);
3. the union of those pairs is scored by the cross-encoder with full ranking's loop and shards
   (`retrieval.scoring`: batched by indexing the split's tensors, cached in shards of pairs with the same
   resumable cache, keyed by the model, the encoded split, the candidate pairs and the settings);
4. each direction ranks its own K candidates by the final score (the ITM / retrieval logit, or BLIP's ITM + ITC:
   the logit plus the scaled cosine similarity); a query's non-candidates rank last, so a ground truth outside the
   top-K is a miss.

Scoring K also gives every K' <= K for free (the top-K' are a prefix of the top-K), hence the recall-vs-K curve.
For the MSCOCO 1k protocol the candidates are picked over the whole split, then the five folds are read from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_bytes, atomic_write_text
from . import metrics as retrieval_metrics
from .evaluation import (
    PROTOCOLS,
    RetrievalInputs,
    _prepare_split,
    compute_metrics,
    evaluate_retrieval,
    model_fingerprint,
)
from .scoring import (
    PAIRS_PER_SHARD,
    ShardCache,
    check_count,
    score_in_shards,
    score_pair_batches,
    scoring_setup,
)

FINAL_SCORES = ("itm", "itm+itc")
_CACHE_FORMAT = 1
_CACHE_SUBFOLDER = "two-stage"


# ----------------------------------------------------------------------------------------------------------------------
# Stage 1: embeddings and candidates
# ----------------------------------------------------------------------------------------------------------------------


def _check_embedding_model(model: torch.nn.Module) -> None:
    for name in ("get_text_features", "get_image_features", "score"):
        if not callable(getattr(model, name, None)):
            raise TypeError(
                f"two-stage retrieval needs a model with {name}() (ImageBertForPreTraining or ImageBertForRetrieval); "
                f"got {type(model).__name__}"
            )


def embed_texts(
    model: torch.nn.Module,
    text: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """L2-normalised text embeddings of every caption, one unimodal pass each.

    Args:
        model: anything with `get_text_features(input_ids, attention_mask)`, in eval mode.
        text: input_ids, attention_mask [C, T] long (left-aligned, padded).
        batch_size: captions per forward pass; each batch is trimmed to its longest caption.
        bf16: bfloat16 autocast.
        device: where to run (default: the model's device).

    Returns:
        float32 [C, projection_dim] on the CPU.
    """
    check_count("batch_size", batch_size, "captions per forward pass")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    input_ids, attention_mask = text["input_ids"].to(device), text["attention_mask"].to(device)
    out = []
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, input_ids.shape[0], batch_size):
            mask = attention_mask[start : start + batch_size]  # (b, T)
            width = max(int(mask.sum(1).max()), 1)
            ids = input_ids[start : start + batch_size, :width]  # (b, T')
            out.append(
                model.get_text_features(input_ids=ids, attention_mask=mask[:, :width])
                .pooler_output.float()
                .cpu()
            )
    return torch.cat(out)


def embed_images(
    model: torch.nn.Module,
    images: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """L2-normalised image embeddings of every image, one unimodal pass each.

    Args:
        model: anything with `get_image_features(region_features, region_locations, region_attention_mask,
            global_image_features)`, in eval mode.
        images: region_features [I, R, F], region_locations [I, R, 5], region_attention_mask [I, R] (left-aligned),
            optionally global_image_features [I, G].
        batch_size: images per forward pass; images are visited in order of region count, and each batch is trimmed
            to its most regions.
        bf16: bfloat16 autocast.
        device: where to run (default: the model's device).

    Returns:
        float32 [I, projection_dim] on the CPU, in the input order.
    """
    check_count("batch_size", batch_size, "images per forward pass")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    images = {name: tensor.to(device) for name, tensor in images.items()}
    compute_dtype = next(model.parameters()).dtype
    counts = images["region_attention_mask"].sum(1)  # (I,)
    order = torch.sort(counts, stable=True).indices
    out: torch.Tensor | None = None
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, order.shape[0], batch_size):
            index = order[start : start + batch_size]  # (b,)
            regions = int(counts.index_select(0, index).max())
            inputs = {
                "region_features": images["region_features"][:, :regions]
                .index_select(0, index)
                .to(compute_dtype),
                "region_locations": images["region_locations"][:, :regions].index_select(0, index),
                "region_attention_mask": images["region_attention_mask"][:, :regions].index_select(0, index),
            }
            if "global_image_features" in images:
                inputs["global_image_features"] = (
                    images["global_image_features"].index_select(0, index).to(compute_dtype)
                )
            embeds = model.get_image_features(**inputs).pooler_output.float()  # (b, D)
            if out is None:
                out = torch.empty(order.shape[0], embeds.shape[1], dtype=torch.float32, device=device)
            out[index] = embeds
    return out.cpu()


@dataclass
class CandidatePairs:
    """The first stage's choice: each caption's top-K images and each image's top-K captions, and their union.

    Attributes:
        image_topk: LongTensor [C, min(K, I)], image columns of each caption, most similar first.
        text_topk: LongTensor [I, min(K, C)], caption rows of each image, most similar first.
        caption_index, image_index: LongTensor [N], the union of those pairs, in row-major (caption, image) order.
        num_captions, num_images: C and I.
    """

    image_topk: torch.Tensor
    text_topk: torch.Tensor
    caption_index: torch.Tensor
    image_index: torch.Tensor
    num_captions: int
    num_images: int

    @property
    def num_pairs(self) -> int:
        return int(self.caption_index.shape[0])

    def union_mask(self, k: int) -> torch.Tensor:
        """[C, I] bool: the pairs in some caption's top-k images or some image's top-k captions (k <= K)."""
        mask = torch.zeros(self.num_captions, self.num_images, dtype=torch.bool)
        mask.scatter_(1, self.image_topk[:, :k], True)
        mask.scatter_(0, self.text_topk[:, :k].t(), True)
        return mask

    def union_size(self, k: int) -> int:
        """Pairs the cross-encoder scores for K' = `k` (<= the K these candidates were picked with)."""
        return int(self.union_mask(k).sum())

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for tensor in (self.caption_index, self.image_index):
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()


def select_candidates(similarity: torch.Tensor, k: int) -> CandidatePairs:
    """Top-K of the similarity matrix in both directions and the union of those pairs.

    Args:
        similarity: [C, I] float (caption rows, image columns).
        k: candidates per query (clipped to the number of images / captions).

    Returns:
        `CandidatePairs`. With K >= max(C, I) every pair is a candidate.
    """
    check_count("candidates (K)", k)
    num_captions, num_images = similarity.shape
    image_topk = similarity.topk(min(k, num_images), dim=1).indices  # (C, K)
    text_topk = similarity.t().topk(min(k, num_captions), dim=1).indices  # (I, K)
    empty = torch.empty(0, dtype=torch.long)
    candidates = CandidatePairs(image_topk, text_topk, empty, empty, num_captions, num_images)
    flat = candidates.union_mask(k).view(-1).nonzero().squeeze(1)  # (N,) row-major pair ids
    candidates.caption_index = flat // num_images
    candidates.image_index = flat % num_images
    return candidates


# ----------------------------------------------------------------------------------------------------------------------
# Stage 2: the cross-encoder on the candidate pairs
# ----------------------------------------------------------------------------------------------------------------------


def score_pairs(
    model: torch.nn.Module,
    inputs: RetrievalInputs,
    caption_index: torch.Tensor,
    image_index: torch.Tensor,
    *,
    batch_size: int = 256,
    bf16: bool = False,
    device: torch.device | str | None = None,
    on_batch: Callable[[int], None] | None = None,
    _device_tensors: tuple[dict, dict] | None = None,
) -> torch.Tensor:
    """Cross-encoder scores of the pairs (caption_index[n], image_index[n]).

    Args:
        model: anything with `score(**inputs) -> [B]`, in eval mode.
        inputs: the encoded split (`encode_retrieval_split`).
        caption_index, image_index: LongTensor [N].
        batch_size: pairs per forward pass; pairs are visited in order of (image region count, caption length) so a
            batch is trimmed to little padding, and written back to their own positions.
        bf16: bfloat16 autocast.
        device: where to run (default: the model's device).
        on_batch: called with the number of pairs after each forward pass (progress).

    Returns:
        float32 [N] on the CPU.
    """
    device, text, images, compute_dtype = scoring_setup(
        model, inputs.text, inputs.images, batch_size, device, _device_tensors
    )
    caption_index, image_index = caption_index.to(device), image_index.to(device)
    width = text["attention_mask"].shape[1] + 1
    key = (
        images["region_attention_mask"].sum(1)[image_index] * width
        + text["attention_mask"].sum(1)[caption_index]
    )
    order = torch.sort(key, stable=True).indices  # (N,)

    def pairs_at(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pair = order[start:stop]
        return caption_index[pair], image_index[pair], pair

    return score_pair_batches(
        model, text, images, order.shape[0], pairs_at, batch_size=batch_size, bf16=bf16, device=device,
        compute_dtype=compute_dtype, on_batch=on_batch,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Ranking
# ----------------------------------------------------------------------------------------------------------------------


def two_stage_matrices(
    pair_scores: torch.Tensor, candidates: CandidatePairs, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The score matrices each direction ranks, for K' = `k`.

    Args:
        pair_scores: [C, I] float holding the final score at every candidate pair (other entries unused).
        candidates: the first stage's `CandidatePairs` (picked with some K >= k).
        k: candidates per query.

    Returns:
        (image retrieval matrix, text retrieval matrix), both [C, I]: the final score at a caption's top-k images
        (resp. an image's top-k captions), -inf elsewhere, so that a ground truth outside the top-k ranks behind
        every candidate (a miss under the pessimistic tie rule of `retrieval.metrics`).
    """
    image_topk = candidates.image_topk[:, :k]  # (C, k)
    text_topk = candidates.text_topk[:, :k].t()  # (k, I)
    ninf = torch.full_like(pair_scores, float("-inf"))
    image_matrix = ninf.scatter(1, image_topk, pair_scores.gather(1, image_topk))
    text_matrix = ninf.scatter(0, text_topk, pair_scores.gather(0, text_topk))
    return image_matrix, text_matrix


def two_stage_metrics(
    image_matrix: torch.Tensor,
    text_matrix: torch.Tensor,
    caption_image_index: torch.Tensor,
    protocol: str | None,
    strict: bool = True,
) -> dict[str, float]:
    """Percent recall: image retrieval read from `image_matrix`, text retrieval from `text_matrix` (both [C, I]),
    under `protocol` (see `evaluation.compute_metrics`); `rsum` sums both directions."""
    image_side, _ = compute_metrics(image_matrix, caption_image_index, protocol, strict=strict)
    text_side, _ = compute_metrics(text_matrix, caption_image_index, protocol, strict=strict)
    metrics = {key: value for key, value in image_side.items() if key.startswith("image_retrieval/")}
    metrics.update({key: value for key, value in text_side.items() if key.startswith("text_retrieval/")})
    metrics["rsum"] = sum(metrics.values())
    return metrics


def default_ks(k: int) -> list[int]:
    """1, 2, 4, ... below `k`, then `k`: the points of the recall-vs-K curve."""
    ks, value = [], 1
    while value < k:
        ks.append(value)
        value *= 2
    return [*ks, k]


# ----------------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class TwoStageEvaluation:
    """Result of `evaluate_two_stage`.

    Attributes:
        k: candidates per query (K).
        metrics: two-stage recall (percent): `image_retrieval/R@K`, `text_retrieval/R@K`, `rsum`.
        stage1_metrics: recall of the embeddings' similarity alone.
        full_metrics: recall of full ranking, when asked for (else None).
        tables: markdown tables (paper layout) keyed "stage 1", "two-stage", "full ranking".
        text_embeds [C, D], image_embeds [I, D], similarity [C, I]: the first stage.
        candidates: `CandidatePairs`; pair_scores [N]: the cross-encoder's score of each candidate pair.
        image_matrix, text_matrix [C, I]: what each direction ranked (-inf outside its top-K).
        caption_image_index [C], image_ids: as in `RetrievalEvaluation`.
        passes: forward passes: `embedding` (C + I), `cross_encoder` (N), `full` (C x I).
        seconds: wall time of `stage1` (embeddings, similarity, top-K), `stage2` (pair scoring) and `full`.
        recall_vs_k: one entry per K' <= K: {"k", "pairs", "metrics"}.
        final_score: "itm" or "itm+itc"; computed_shards / num_shards: pair shards scored now / in all.
    """

    k: int
    metrics: dict[str, float]
    stage1_metrics: dict[str, float]
    full_metrics: dict[str, float] | None
    tables: dict[str, str]
    text_embeds: torch.Tensor
    image_embeds: torch.Tensor
    similarity: torch.Tensor
    candidates: CandidatePairs
    pair_scores: torch.Tensor
    image_matrix: torch.Tensor
    text_matrix: torch.Tensor
    caption_image_index: torch.Tensor
    image_ids: list[str]
    protocol: str | None
    final_score: str
    passes: dict[str, int]
    seconds: dict[str, float]
    recall_vs_k: list[dict[str, Any]] = field(default_factory=list)
    computed_shards: list[int] = field(default_factory=list)
    num_shards: int = 0

    @property
    def table(self) -> str:
        """One markdown table with a row per evaluated method."""
        rows = {"Stage 1 (embeddings)": self.stage1_metrics, f"Two-stage (K={self.k})": self.metrics}
        if self.full_metrics is not None:
            rows["Full ranking"] = self.full_metrics
        return retrieval_metrics.format_paper_table(rows, with_rsum=True)

    def to_json_dict(self) -> dict[str, Any]:
        """Metrics, costs and the recall-vs-K curve as a JSON-serialisable dict (no matrices)."""
        full_passes = self.passes["full"]
        return {
            "protocol": self.protocol,
            "k": self.k,
            "final_score": self.final_score,
            "num_captions": int(self.similarity.shape[0]),
            "num_images": int(self.similarity.shape[1]),
            "metrics": {
                "stage1": self.stage1_metrics,
                "two_stage": self.metrics,
                "full": self.full_metrics,
            },
            "passes": self.passes,
            "pair_reduction": full_passes / max(self.passes["cross_encoder"], 1),
            "seconds": self.seconds,
            "recall_vs_k": self.recall_vs_k,
            "num_shards": self.num_shards,
            "computed_shards": len(self.computed_shards),
            "table": self.table,
        }

    def save_json(self, path: str | os.PathLike) -> None:
        """Write `to_json_dict()` to `path` (indented JSON, atomically)."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_json_dict(), indent=2) + "\n")

    def plot_recall_vs_k(self, path: str | os.PathLike) -> bool:
        """Write a PNG of R@1 (both directions) against K, with stage 1 and full ranking as reference lines.

        Returns False (with a warning) when matplotlib is not installed; the JSON holds the same numbers."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            from matplotlib import pyplot as plt
        except ImportError:
            warnings.warn(
                "matplotlib is not installed: no recall-vs-K plot (the JSON has the numbers)", stacklevel=2
            )
            return False
        ks = [entry["k"] for entry in self.recall_vs_k]
        figure, axis = plt.subplots(figsize=(6, 4))
        for key, label, colour in (
            ("image_retrieval/R@1", "image retrieval R@1", "tab:blue"),
            ("text_retrieval/R@1", "sentence retrieval R@1", "tab:orange"),
        ):
            axis.plot(
                ks, [entry["metrics"][key] for entry in self.recall_vs_k], "o-", color=colour, label=label
            )
            axis.axhline(self.stage1_metrics[key], color=colour, linestyle=":", linewidth=1)
            if self.full_metrics is not None:
                axis.axhline(self.full_metrics[key], color=colour, linestyle="--", linewidth=1)
        axis.set_xscale("log", base=2)
        axis.set_xlabel("K (candidates per query)")
        axis.set_ylabel("R@1 (%)")
        axis.set_title("Two-stage retrieval (dotted: stage 1 alone; dashed: full ranking)", fontsize=9)
        axis.legend(fontsize=8)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
        plt.close(figure)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buffer.getvalue())
        return True


def final_scores(
    model: torch.nn.Module, itm_scores: torch.Tensor, similarity: torch.Tensor, final_score: str = "itm"
) -> torch.Tensor:
    """The ranking score of caption-image pairs: the cross-encoder's ITM logits [C, I] ("itm", the paper's) or those
    plus the ITC logits, cosine `similarity` [C, I] x the model's learnt ITC scale ("itm+itc", as BLIP ranks)."""
    if final_score not in FINAL_SCORES:
        raise ValueError(f"final_score must be one of {FINAL_SCORES}, got {final_score!r}")
    if final_score == "itm":
        return itm_scores
    itc_head = getattr(getattr(model, "module", model), "itc_head", None)
    scale = float(itc_head.scale().detach()) if itc_head is not None else 1.0
    return itm_scores + scale * similarity.to(itm_scores.device, itm_scores.dtype)


def evaluate_two_stage(
    model: torch.nn.Module,
    dataset,
    processor,
    *,
    candidates: int = 16,
    protocol: str | None = None,
    final_score: str = "itm",
    full_ranking: bool = False,
    ks: Sequence[int] | None = None,
    batch_size: int = 256,
    embedding_batch_size: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    bf16: bool = False,
    accelerator=None,
    progress: bool = True,
    shard_size: int | None = None,
    strict: bool = True,
    shard_callback: Callable[[int], None] | None = None,
    full_scores: torch.Tensor | None = None,
) -> TwoStageEvaluation:
    """Two-stage retrieval evaluation of a checkpoint on a test split, both directions.

    Args:
        model: `ImageBertForPreTraining` or `ImageBertForRetrieval` (a DDP wrapper is unwrapped): its
            `get_text_features` / `get_image_features` pick the candidates, its `score` re-ranks them. Run in eval
            mode (restored afterwards).
        dataset, processor, protocol, batch_size, bf16, strict: as `evaluate_retrieval`.
        candidates: K, candidates per query in each direction. K >= the number of images and of captions scores
            every pair (full ranking).
        final_score: "itm" (the cross-encoder's logit) or "itm+itc" (plus the ITC logit: cosine x exp(logit_scale),
            as BLIP adds the similarity).
        full_ranking: also run full ranking (`evaluate_retrieval`, with the same cache_dir) and report it, ranked
            by the same `final_score`.
        ks: the K' <= K of the recall-vs-K curve (default 1, 2, 4, ..., K).
        embedding_batch_size: captions / images per unimodal pass (default: batch_size).
        cache_dir: where the pair-score shards live (under `two-stage/`), so an interrupted run resumes; keyed by
            the model, the encoded split, the candidate pairs and the settings.
        accelerator: an `accelerate.Accelerator` (or `PartialState`): pair shards are split across processes and
            every process receives all the scores.
        progress: tqdm bar over the pairs on the main process.
        shard_size: pairs per cached shard (default 65,536).
        shard_callback: called with the shard index after each shard this process scores (and caches).
        full_scores: the ITM scores of every pair [C, I] from a full ranking already run on this split
            (`RetrievalEvaluation.scores`): full ranking is reported from them, ranked by `final_score`, without
            scoring the pairs again.

    Returns:
        `TwoStageEvaluation`.
    """
    if final_score not in FINAL_SCORES:
        raise ValueError(f"final_score must be one of {FINAL_SCORES}, got {final_score!r}")
    check_count("candidates (K)", candidates)
    # Every count before any work: a bad one would otherwise surface after stage 1.
    check_count("batch_size", batch_size, "pairs per forward pass")
    if embedding_batch_size is not None:
        check_count("embedding_batch_size", embedding_batch_size, "captions or images per forward pass")
    if shard_size is not None:
        check_count("shard_size", shard_size, "pairs per shard")
    model = getattr(model, "module", model)
    _check_embedding_model(model)
    rank, world, is_main, device, inputs = _prepare_split(
        model, dataset, processor, protocol, strict, accelerator
    )
    num_captions, num_images = inputs.num_captions, inputs.num_images
    ks = sorted({min(int(k), candidates) for k in (ks or default_ks(candidates))} | {candidates})
    if ks[0] < 1:
        raise ValueError(f"ks must be positive, got {ks}")

    was_training = model.training
    model.eval()
    try:
        # Stage 1.
        began = time.perf_counter()
        embed_batch = embedding_batch_size or batch_size
        text_embeds = embed_texts(model, inputs.text, batch_size=embed_batch, bf16=bf16, device=device)
        image_embeds = embed_images(model, inputs.images, batch_size=embed_batch, bf16=bf16, device=device)
        similarity = text_embeds @ image_embeds.t()  # (C, I) cosine
        chosen = select_candidates(similarity, candidates)
        stage1_seconds = time.perf_counter() - began

        # Stage 2, in cached shards of the candidate pairs.
        num_pairs = chosen.num_pairs
        if shard_size is None:
            shard_size = PAIRS_PER_SHARD
        cache = None
        if cache_dir is not None:
            meta = {
                "format": _CACHE_FORMAT,
                "stage": "two-stage pairs",
                "model": model_fingerprint(model),
                "data": inputs.fingerprint(),
                "candidates": chosen.fingerprint(),
                "bf16": bool(bf16),
                "shard_size": int(shard_size),
            }
            cache = ShardCache(Path(cache_dir) / _CACHE_SUBFOLDER, meta, is_main)

        # Candidate pairs [start, end), one per row: (end - start, 1).
        def score_rows(start, end, device_tensors, on_batch):
            return score_pairs(
                model, inputs, chosen.caption_index[start:end], chosen.image_index[start:end],
                batch_size=batch_size, bf16=bf16, device=device, on_batch=on_batch, _device_tensors=device_tensors,
            )[:, None]  # fmt: skip

        def describe_pair(row: int, column: int) -> str:
            caption, image = int(chosen.caption_index[row]), int(chosen.image_index[row])
            return f"caption row {caption} against image {inputs.image_ids[image]!r}"

        scored = score_in_shards(
            score_rows, inputs.text, inputs.images, num_rows=num_pairs, width=1, shard_size=shard_size, rank=rank,
            world=world, is_main=is_main, device=device, cache=cache, progress=progress,
            description="re-ranking pairs", describe_pair=describe_pair, shard_callback=shard_callback,
        )  # fmt: skip
        scores = scored.scores[:, 0]  # (N,)
    finally:
        model.train(was_training)

    pair_matrix = torch.zeros(num_captions, num_images, dtype=torch.float32)
    pair_matrix[chosen.caption_index, chosen.image_index] = scores
    pair_matrix = final_scores(model, pair_matrix, similarity, final_score)
    image_matrix, text_matrix = two_stage_matrices(pair_matrix, chosen, candidates)
    metrics = two_stage_metrics(image_matrix, text_matrix, inputs.caption_image_index, protocol, strict)
    stage1_metrics, _ = compute_metrics(similarity, inputs.caption_image_index, protocol, strict=strict)
    recall_vs_k = []
    for k in ks:
        matrices = two_stage_matrices(pair_matrix, chosen, k)
        recall_vs_k.append(
            {
                "k": k,
                "pairs": chosen.union_size(k),
                "metrics": two_stage_metrics(*matrices, inputs.caption_image_index, protocol, strict),
            }
        )

    full_metrics, full_seconds = None, None
    if full_scores is not None:
        if tuple(full_scores.shape) != (num_captions, num_images):
            raise ValueError(
                f"full_scores: expected the full-ranking ITM scores of this split, shape ({num_captions}, "
                f"{num_images}), got {tuple(full_scores.shape)}"
            )
        full_metrics, _ = compute_metrics(
            final_scores(model, full_scores.float().cpu(), similarity, final_score),
            inputs.caption_image_index,
            protocol,
            strict=strict,
        )
    elif full_ranking:
        full = evaluate_retrieval(
            model,
            dataset,
            processor,
            protocol=protocol,
            batch_size=batch_size,
            cache_dir=cache_dir,
            bf16=bf16,
            accelerator=accelerator,
            progress=progress,
            strict=strict,
        )
        full_seconds = full.seconds
        full_metrics, _ = compute_metrics(
            final_scores(model, full.scores, similarity, final_score),
            inputs.caption_image_index,
            protocol,
            strict=strict,
        )

    result = TwoStageEvaluation(
        k=candidates,
        metrics=metrics,
        stage1_metrics=stage1_metrics,
        full_metrics=full_metrics,
        tables={},
        text_embeds=text_embeds,
        image_embeds=image_embeds,
        similarity=similarity,
        candidates=chosen,
        pair_scores=scores,
        image_matrix=image_matrix,
        text_matrix=text_matrix,
        caption_image_index=inputs.caption_image_index,
        image_ids=inputs.image_ids,
        protocol=protocol,
        final_score=final_score,
        passes={
            "embedding": num_captions + num_images,
            "cross_encoder": num_pairs,
            "full": num_captions * num_images,
        },
        seconds={"stage1": stage1_seconds, "stage2": scored.seconds, "full": full_seconds},
        recall_vs_k=recall_vs_k,
        computed_shards=scored.computed_shards,
        num_shards=scored.num_shards,
    )
    label = PROTOCOLS[protocol][1]
    result.tables = {
        name: retrieval_metrics.format_paper_table({label: values}, with_rsum=True)
        for name, values in (
            ("stage 1", stage1_metrics),
            ("two-stage", metrics),
            ("full ranking", full_metrics),
        )
        if values is not None
    }
    return result


__all__ = [
    "FINAL_SCORES",
    "CandidatePairs",
    "TwoStageEvaluation",
    "default_ks",
    "embed_images",
    "embed_texts",
    "evaluate_two_stage",
    "final_scores",
    "score_pairs",
    "select_candidates",
    "two_stage_matrices",
    "two_stage_metrics",
]
