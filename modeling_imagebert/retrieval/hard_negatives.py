"""Retrieval fine-tuning negatives mined from the batch's ITC similarities (ALBEF's hard negatives; not the paper's).

`DataCollatorForImageTextRetrieval` gives every positive P-1 negatives drawn uniformly from the other images of the
batch: on data where most wrong partners share nothing with the positive, the cross-encoder never learns to order
near matches, the pairs a retrieval ranking has to get right. `mine_retrieval_negatives` re-draws those negatives
with probability softmax(ITC logit) over the batch's positives, so similar but wrong partners come up most:

- a negative that kept the positive's caption (an image-side negative) gets another image, drawn by its similarity
  to that caption;
- a negative that kept the positive's image (a caption-side negative) gets another caption, drawn by its
  similarity to that image.

A group's P-1 draws are without replacement, and never from the positive's own image group (`itc_image_groups`),
so a negative stays a negative. The embeddings are computed without gradients, in eval mode. `fraction` < 1 keeps
the collator's random negative in each slot with probability 1 - fraction.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..pretraining.hard_negatives import batch_itc_logits, pair_rows


def _draw_distinct(
    logits: torch.Tensor, allowed: torch.Tensor, count: int, generator: torch.Generator | None
) -> torch.Tensor:
    """`count` distinct column indices per row, drawn with probability softmax(logits) over the allowed columns."""
    weights = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=1)
    return torch.multinomial(weights, count, replacement=False, generator=generator)


@torch.no_grad()
def mine_retrieval_negatives(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    fraction: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Returns the retrieval training `batch` with its negatives re-drawn as hard negatives.

    Args:
        model: an (unwrapped) `ImageBertForRetrieval` (or any model with `text_embeddings`, `image_embeddings` and
            `itc_head`).
        batch: `DataCollatorForImageTextRetrieval`'s output: B groups of P rows, each group's positive first, with
            `labels`, `num_candidates` (P) and `itc_image_groups` [B].
        generator: on the batch's device, for reproducible draws.
        fraction: the chance that a negative is re-drawn (1.0: all of them).

    A batch without those keys, or with P = 1, is returned unchanged.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    labels, count, groups = batch.get("labels"), batch.get("num_candidates"), batch.get("itc_image_groups")
    if labels is None or count is None or groups is None or int(count) < 2:
        return dict(batch)
    count = int(count)
    rows_total = labels.shape[0]
    if rows_total % count or groups.shape[0] != rows_total // count:
        raise ValueError(
            f"mine_retrieval_negatives: expected B groups of num_candidates={count} rows and B itc_image_groups, got "
            f"{rows_total} rows and {groups.shape[0]} groups"
        )
    size = rows_total // count
    device = labels.device
    positives = torch.arange(size, device=device) * count
    allowed = groups[None, :] != groups[:, None]  # (B, B): a partner from another image group
    # The collator's batches always have enough (>= P distinct images); a hand-made batch is checked where that
    # costs no device synchronisation (groups on the CPU) or when the config asks for input checks.
    check = groups.device.type == "cpu" or bool(
        getattr(getattr(model, "config", None), "check_inputs", False)
    )
    fewest = int(allowed.sum(dim=1).min()) if check and size else count - 1
    if fewest < count - 1:
        raise ValueError(
            f"mine_retrieval_negatives: a positive has {fewest} partners from other images in its batch, fewer than "
            f"the {count - 1} negatives of a group; use a larger batch or a smaller num_candidates"
        )

    logits = batch_itc_logits(model, batch, positives)  # (B captions, B images)
    images_for = _draw_distinct(logits, allowed, count - 1, generator)  # caption b -> P-1 other images
    captions_for = _draw_distinct(logits.t(), allowed, count - 1, generator)  # image b -> P-1 other captions

    negatives = torch.arange(rows_total, device=device).view(size, count)[:, 1:]  # (B, P-1)
    input_ids = batch["input_ids"]
    # An image-side negative kept the positive's caption; any other kept its image (the collator's `_pair`).
    kept_caption = (
        input_ids.index_select(0, negatives.reshape(-1)).view(size, count - 1, -1)
        == input_ids[positives][:, None, :]
    ).all(dim=-1)
    own = positives[:, None].expand_as(negatives)
    new_text = torch.where(kept_caption, own, positives[captions_for])
    new_image = torch.where(kept_caption, positives[images_for], own)
    if fraction < 1.0:
        redraw = torch.rand(kept_caption.shape, device=device, generator=generator) < fraction
        new_text = torch.where(redraw, new_text, negatives)
        new_image = torch.where(redraw, new_image, negatives)
    # Row indices with the positives kept in place; no boolean indexing, so no device synchronisation.
    text_rows = torch.cat([positives[:, None], new_text], dim=1).reshape(-1)
    image_rows = torch.cat([positives[:, None], new_image], dim=1).reshape(-1)
    return pair_rows(batch, text_rows, image_rows)


__all__ = ["mine_retrieval_negatives"]
