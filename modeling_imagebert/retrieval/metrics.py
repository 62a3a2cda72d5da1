"""Recall@K for image-text retrieval, and the Flickr30k / MSCOCO test protocols the ImageBERT paper reports.

Everything starts from one score matrix ``scores [num_captions, num_images]`` (higher = better match) and
``caption_image_index [num_captions]``, the index of each caption's own image (its column in ``scores``).

* Image retrieval (caption -> images): each caption ranks all images; a hit at K if its image is in the top K.
* Text (sentence) retrieval (image -> captions): each image ranks all captions; a hit at K if ANY of its
  ground-truth captions (5 per image in Flickr30k / MSCOCO) is in the top K, i.e. the rank of its best-ranked
  ground-truth caption is below K.

Tie rule (pessimistic, deterministic, independent of the order of candidates): the 0-based rank of a ground
truth is the number of *competitors* whose score is greater than OR EQUAL to the ground truth's score. The
competitors of caption c in image retrieval are all images except c's own; the competitors of image i in
text retrieval are all captions that are not i's ground truth, compared against i's best ground-truth score
(other ground-truth captions never push it down). So a tie with a competitor always costs the ground truth
a place, and constant scores give R@K = 0 unless K exceeds the number of competitors: a model cannot earn
recall by emitting constant scores, and shuffling the candidate order never changes a result.

Recall functions return fractions in [0, 1]; ``recall_summary`` and the protocols return percent, as papers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

# Largest temporary boolean block (elements) built at once: bounds memory for 25k x 5k matrices.
_MAX_BLOCK_ELEMENTS = 1 << 24

DEFAULT_KS = (1, 5, 10)

FLICKR30K_TEST_IMAGES = 1000
COCO_TEST_IMAGES = 5000
CAPTIONS_PER_IMAGE = 5


def _as_scores(scores) -> torch.Tensor:
    s = scores if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    if s.dim() != 2:
        raise ValueError(
            f"scores must be a 2-D matrix [num_captions, num_images]; got shape {tuple(s.shape)}"
        )
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"scores must have at least one caption and one image; got shape {tuple(s.shape)}")
    if not s.is_floating_point():
        if s.dtype == torch.bool or s.is_complex():
            raise TypeError(f"scores must be real numbers; got dtype {s.dtype}")
        s = s.to(torch.float64)  # exact for the integer ranges anyone scores with
    s = s.detach().cpu()
    nan = torch.isnan(s)
    if nan.any():
        row, col = (int(v) for v in nan.nonzero()[0])
        raise ValueError(
            f"scores contain NaN (first at caption row {row}, image column {col}); "
            "a NaN has no rank, fix the model output before computing recall"
        )
    return s


def _as_index(caption_image_index, num_captions: int, num_images: int) -> torch.Tensor:
    idx = (
        caption_image_index
        if isinstance(caption_image_index, torch.Tensor)
        else torch.as_tensor(np.asarray(caption_image_index))
    )
    idx = idx.detach().cpu()
    if idx.dim() != 1 or idx.shape[0] != num_captions:
        raise ValueError(
            f"caption_image_index must be 1-D with one entry per caption row of scores ({num_captions}); "
            f"got shape {tuple(idx.shape)}"
        )
    if idx.is_floating_point() or idx.dtype == torch.bool or idx.is_complex():
        if idx.is_floating_point() and bool((idx == idx.round()).all()):
            idx = idx.to(torch.long)
        else:
            raise TypeError(f"caption_image_index must hold integer image indices; got dtype {idx.dtype}")
    idx = idx.to(torch.long)
    bad = (idx < 0) | (idx >= num_images)
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"caption_image_index[{row}] = {int(idx[row])} is not an image column of scores "
            f"(expected 0 <= index < {num_images})"
        )
    return idx


def _as_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must name at least one cut-off K")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every K in ks must be a positive integer; got {k!r} in {ks}")
    return tuple(int(k) for k in ks)


def _chunk_rows(num_rows: int, num_cols: int) -> int:
    return max(1, _MAX_BLOCK_ELEMENTS // max(1, num_cols))


def image_retrieval_ranks(scores, caption_image_index) -> torch.Tensor:
    """0-based rank of each caption's own image among all images (pessimistic tie rule, see module doc).

    Args:
        scores: [num_captions, num_images] float (tensor, array or nested lists); higher = better match.
        caption_image_index: [num_captions] int, column of each caption's image.

    Returns:
        LongTensor [num_captions]: number of other images scoring >= the caption's own image.
    """
    s = _as_scores(scores)
    num_captions, num_images = s.shape
    idx = _as_index(caption_image_index, num_captions, num_images)
    ranks = torch.empty(num_captions, dtype=torch.long)
    step = _chunk_rows(num_captions, num_images)
    for start in range(0, num_captions, step):
        block = s[start : start + step]  # (b, I)
        own = block.gather(1, idx[start : start + step, None])  # (b, 1)
        # The own image always satisfies >=, so subtract it.
        ranks[start : start + step] = (block >= own).sum(1) - 1
    return ranks


def text_retrieval_ranks(scores, caption_image_index) -> torch.Tensor:
    """0-based rank of each image's best-ranked ground-truth caption among all captions.

    Args:
        scores: [num_captions, num_images] float; higher = better match.
        caption_image_index: [num_captions] int, column of each caption's image. Every image needs at
            least one caption (otherwise sentence retrieval has no answer for it: error).

    Returns:
        LongTensor [num_images]: number of non-ground-truth captions scoring >= the image's best
        ground-truth caption (pessimistic tie rule, see module doc).
    """
    s = _as_scores(scores)
    num_captions, num_images = s.shape
    idx = _as_index(caption_image_index, num_captions, num_images)
    counts = torch.bincount(idx, minlength=num_images)
    if (counts == 0).any():
        missing = (counts == 0).nonzero().flatten()
        raise ValueError(
            f"text retrieval needs at least one ground-truth caption per image; image column(s) "
            f"{missing[:10].tolist()}{' ...' if len(missing) > 10 else ''} ({len(missing)} in all) have none "
            "in caption_image_index"
        )
    own = s[torch.arange(num_captions), idx]  # (C,) score of each caption with its own image
    best = torch.full((num_images,), float("-inf"), dtype=s.dtype).scatter_reduce(
        0, idx, own, reduce="amax", include_self=True
    )  # (I,) best ground-truth score per image
    ranks = torch.zeros(num_images, dtype=torch.long)
    step = _chunk_rows(num_captions, num_images)
    for start in range(0, num_captions, step):
        block = s[start : start + step] >= best  # (b, I)
        rows = torch.arange(block.shape[0])
        block[rows, idx[start : start + step]] = False  # ground-truth captions are not competitors
        ranks += block.sum(0)
    return ranks


def _recall_from_ranks(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    return {f"R@{k}": float((ranks < k).double().mean()) for k in ks}


def image_retrieval_recall(scores, caption_image_index, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Image retrieval (caption -> images) recall: fraction of captions whose image ranks in the top K.

    Args:
        scores: [num_captions, num_images] float; higher = better match.
        caption_image_index: [num_captions] int, column of each caption's image.
        ks: cut-offs K.

    Returns:
        ``{"R@K": fraction in [0, 1]}`` for each K (pessimistic tie rule, see module doc).
    """
    ks = _as_ks(ks)
    return _recall_from_ranks(image_retrieval_ranks(scores, caption_image_index), ks)


def text_retrieval_recall(scores, caption_image_index, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Text (sentence) retrieval (image -> captions) recall: fraction of images with ANY ground-truth
    caption in the top K.

    Args:
        scores: [num_captions, num_images] float; higher = better match.
        caption_image_index: [num_captions] int, column of each caption's image; every image needs one.
        ks: cut-offs K.

    Returns:
        ``{"R@K": fraction in [0, 1]}`` for each K (pessimistic tie rule, see module doc).
    """
    ks = _as_ks(ks)
    return _recall_from_ranks(text_retrieval_ranks(scores, caption_image_index), ks)


def recall_summary(scores, caption_image_index, ks: Iterable[int] = DEFAULT_KS) -> dict[str, float]:
    """Both directions in percent, as papers report them.

    Args:
        scores: [num_captions, num_images] float; higher = better match.
        caption_image_index: [num_captions] int, column of each caption's image; every image needs one.
        ks: cut-offs K.

    Returns:
        ``{"image_retrieval/R@K": %, ..., "text_retrieval/R@K": %, ..., "rsum": sum of all of them}``.
    """
    ks = _as_ks(ks)
    out: dict[str, float] = {}
    for k, v in image_retrieval_recall(scores, caption_image_index, ks).items():
        out[f"image_retrieval/{k}"] = 100.0 * v
    for k, v in text_retrieval_recall(scores, caption_image_index, ks).items():
        out[f"text_retrieval/{k}"] = 100.0 * v
    out["rsum"] = sum(out.values())
    return out


def fold_mean_recall(
    scores, caption_image_index, num_folds: int, ks: Iterable[int] = DEFAULT_KS
) -> dict[str, float]:
    """``recall_summary`` averaged over ``num_folds`` folds of consecutive images.

    Fold f holds image columns ``[f * n, (f + 1) * n)`` with ``n = num_images / num_folds`` and exactly the
    captions of those images (chosen by ``caption_image_index``, so caption order does not matter); each
    fold is scored on its own sub-matrix, and every metric (rsum included) is the mean over folds.

    Args:
        scores: [num_captions, num_images] float; num_images must be divisible by num_folds.
        caption_image_index: [num_captions] int; every fold needs at least one caption per image.
        num_folds: number of folds (5 for the MSCOCO 1k protocol).
        ks: cut-offs K.

    Returns:
        Same keys as ``recall_summary``, values in percent.
    """
    ks = _as_ks(ks)
    s = _as_scores(scores)
    num_captions, num_images = s.shape
    idx = _as_index(caption_image_index, num_captions, num_images)
    if isinstance(num_folds, bool) or not isinstance(num_folds, (int, np.integer)) or num_folds < 1:
        raise ValueError(f"num_folds must be a positive integer; got {num_folds!r}")
    if num_images % num_folds:
        raise ValueError(
            f"{num_images} images cannot be split into {num_folds} equal folds of consecutive images "
            f"(scores has shape {tuple(s.shape)})"
        )
    fold_size = num_images // num_folds
    per_fold = []
    for f in range(num_folds):
        lo, hi = f * fold_size, (f + 1) * fold_size
        rows = ((idx >= lo) & (idx < hi)).nonzero().flatten()
        if rows.numel() == 0:
            raise ValueError(f"fold {f} (image columns {lo}..{hi - 1}) has no captions")
        per_fold.append(recall_summary(s[rows, lo:hi], idx[rows] - lo, ks))
    return {key: sum(r[key] for r in per_fold) / num_folds for key in per_fold[0]}


def _check_protocol(name: str, scores: torch.Tensor, idx: torch.Tensor, num_images: int) -> None:
    got_captions, got_images = scores.shape
    if got_images != num_images:
        raise ValueError(
            f"{name} needs scores for exactly {num_images} test images (Karpathy test split); got {got_images} "
            f"image columns (scores shape {tuple(scores.shape)}). Pass strict=False to run the protocol on "
            "another size."
        )
    counts = torch.bincount(idx, minlength=num_images)
    off = (counts != CAPTIONS_PER_IMAGE).nonzero().flatten()
    if off.numel():
        i = int(off[0])
        raise ValueError(
            f"{name} needs exactly {CAPTIONS_PER_IMAGE} captions per image ({CAPTIONS_PER_IMAGE * num_images} "
            f"caption rows); got {got_captions} rows and image column {i} has {int(counts[i])} captions "
            f"({off.numel()} images differ). Pass strict=False to run the protocol on another size."
        )


def flickr30k_1k(
    scores, caption_image_index, ks: Iterable[int] = DEFAULT_KS, strict: bool = True
) -> dict[str, float]:
    """Flickr30k 1k test protocol: the whole 1000-image x 5000-caption matrix.

    Args:
        scores: [5000, 1000] float (any size with ``strict=False``).
        caption_image_index: [5000] int, 5 captions per image.
        ks: cut-offs K.
        strict: check the official sizes (1000 images, 5 captions each).

    Returns:
        ``recall_summary`` dict, in percent.
    """
    s = _as_scores(scores)
    idx = _as_index(caption_image_index, *s.shape)
    if strict:
        _check_protocol("Flickr30k 1k", s, idx, FLICKR30K_TEST_IMAGES)
    return recall_summary(s, idx, ks)


def coco_1k(
    scores, caption_image_index, ks: Iterable[int] = DEFAULT_KS, num_folds: int = 5, strict: bool = True
) -> dict[str, float]:
    """MSCOCO 1k test protocol: the MEAN over 5 folds of 1000 consecutive images (and their captions) of
    the 5k test set (see ``fold_mean_recall``).

    Args:
        scores: [25000, 5000] float (any size divisible into ``num_folds`` with ``strict=False``).
        caption_image_index: [25000] int, 5 captions per image.
        ks: cut-offs K.
        num_folds: folds of consecutive images (5 officially).
        strict: check the official sizes (5000 images, 5 captions each, 5 folds).

    Returns:
        ``recall_summary`` keys, each the mean over folds, in percent.
    """
    s = _as_scores(scores)
    idx = _as_index(caption_image_index, *s.shape)
    if strict:
        if num_folds != 5:
            raise ValueError(
                f"MSCOCO 1k averages exactly 5 folds; got num_folds={num_folds} (use strict=False)"
            )
        _check_protocol("MSCOCO 1k", s, idx, COCO_TEST_IMAGES)
    return fold_mean_recall(s, idx, num_folds, ks)


def coco_5k(
    scores, caption_image_index, ks: Iterable[int] = DEFAULT_KS, strict: bool = True
) -> dict[str, float]:
    """MSCOCO 5k test protocol: the whole 5000-image x 25000-caption matrix.

    Args:
        scores: [25000, 5000] float (any size with ``strict=False``).
        caption_image_index: [25000] int, 5 captions per image.
        ks: cut-offs K.
        strict: check the official sizes (5000 images, 5 captions each).

    Returns:
        ``recall_summary`` dict, in percent.
    """
    s = _as_scores(scores)
    idx = _as_index(caption_image_index, *s.shape)
    if strict:
        _check_protocol("MSCOCO 5k", s, idx, COCO_TEST_IMAGES)
    return recall_summary(s, idx, ks)


def format_paper_table(
    results: Mapping[str, Mapping[str, float]], ks: Sequence[int] = DEFAULT_KS, with_rsum: bool = False
) -> str:
    """A markdown table laid out like Table 2 of the ImageBERT paper.

    Args:
        results: row label (dataset & protocol, e.g. ``"Flickr30k 1k"``) -> a ``recall_summary`` dict
            (percent). Rows keep the mapping's order; a missing metric prints as ``-``, as in the paper.
        ks: the cut-offs to show.
        with_rsum: add an ``RSUM`` column.

    Returns:
        Markdown: ``| Test set | Image Retrieval R@1 | R@5 | R@10 | Sentence Retrieval R@1 | R@5 | R@10 |``
        then one row per entry, numbers with one decimal.
    """
    ks = _as_ks(ks)
    keys = [f"image_retrieval/R@{k}" for k in ks] + [f"text_retrieval/R@{k}" for k in ks]
    header = ["Test set"]
    for group in ("Image Retrieval", "Sentence Retrieval"):
        header += [f"{group} R@{ks[0]}"] + [f"R@{k}" for k in ks[1:]]
    if with_rsum:
        keys.append("rsum")
        header.append("RSUM")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    if not results:
        raise ValueError("format_paper_table needs at least one row of results")
    for label, row in results.items():
        if not isinstance(row, Mapping):
            raise TypeError(
                f"results[{label!r}] must be a recall_summary dict (metric -> percent); got {type(row).__name__}"
            )
        if not any(k in row for k in keys):
            raise ValueError(f"results[{label!r}] has none of the metrics {keys}; got keys {sorted(row)}")
        cells = [str(label)]
        for k in keys:
            cells.append("-" if row.get(k) is None else f"{float(row[k]):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


__all__ = [
    "coco_1k",
    "coco_5k",
    "flickr30k_1k",
    "fold_mean_recall",
    "format_paper_table",
    "image_retrieval_ranks",
    "image_retrieval_recall",
    "recall_summary",
    "text_retrieval_ranks",
    "text_retrieval_recall",
]
