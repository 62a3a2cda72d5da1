"""ITM hard negatives mined from the ITC similarities of the batch (ALBEF, Li et al. 2021; not in ImageBERT).

With random negatives the ITM head mostly compares a caption with an image that shares none of its objects, and
never learns to order near matches: the ones retrieval has to rank. `mine_itm_negatives` re-draws the mismatched
rows of an ITM batch: even rows keep their image and take a caption of another image, odd rows keep their caption
and take another image, each drawn with probability softmax(ITC logit) over the batch, so similar but wrong
partners come up most. Rows that describe or show the same image (the ITC groups) are never drawn, so a negative
stays a negative. The embeddings are computed without gradients; the model's own ITC loss runs on the mined batch.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..tasks_imagebert import MASKED_BATCH_KEYS

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_IMAGE_KEYS = ("region_features", "region_locations", "region_attention_mask", "global_image_features")


def _draw(
    logits: torch.Tensor, allowed: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One column index per row, drawn with probability softmax(logits) over the allowed columns; returns the
    indices and which rows had any allowed column."""
    possible = allowed.any(dim=1)
    weights = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=1)
    # A row with no allowed column gets a uniform (unused) draw: multinomial refuses all-zero weights.
    weights = torch.where(possible[:, None], weights, torch.ones_like(weights))
    return torch.multinomial(weights, 1, generator=generator).squeeze(1), possible


@torch.no_grad()
def batch_itc_logits(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], rows: torch.Tensor | None = None
) -> torch.Tensor:
    """ITC logits (texts x images, float32: scale x cosine) of the batch's rows (`rows`, default all), computed in
    eval mode (no dropout in the picking passes; the mode is restored) and without gradients."""

    def take(key):
        value = batch.get(key)
        return value if value is None or rows is None else value.index_select(0, rows)

    was_training = model.training
    model.eval()
    try:
        text = model.text_embeddings(take("input_ids"), take("attention_mask"), take("token_type_ids"))
        image = model.image_embeddings(
            take("region_features"),
            take("region_locations"),
            take("region_attention_mask"),
            take("global_image_features"),
        )
        return model.itc_head.scale().float() * text.float() @ image.float().t()
    finally:
        model.train(was_training)


def pair_rows(
    batch: Mapping[str, torch.Tensor], text_rows: torch.Tensor, image_rows: torch.Tensor
) -> dict[str, torch.Tensor]:
    """`batch` with each row's text inputs taken from row `text_rows[i]` and image inputs from `image_rows[i]`."""
    paired = dict(batch)
    for key in _TEXT_KEYS:
        if batch.get(key) is not None:
            paired[key] = batch[key].index_select(0, text_rows)
    for key in _IMAGE_KEYS:
        if batch.get(key) is not None:
            paired[key] = batch[key].index_select(0, image_rows)
    return paired


@torch.no_grad()
def mine_itm_negatives(
    model: torch.nn.Module,
    batch: Mapping[str, torch.Tensor],
    generator: torch.Generator | None = None,
    fraction: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Returns `batch` with its mismatched ITM rows (`itm_labels` 0) re-drawn as hard negatives.

    `fraction` is the chance that a mismatched row is re-drawn (1.0, ALBEF: all of them); the others keep the
    collator's random negative, so the head still sees easy negatives while it learns the hard ones.

    `model` is an (unwrapped) `ImageBertForPreTraining`: its `text_embeddings` / `image_embeddings` and
    `itc_head.scale()` give the similarities. A batch without `itm_labels` or ITC groups, or with masked-task
    entries (`MASKED_BATCH_KEYS`: mining runs only on ITM batches of unmasked pairs), is returned unchanged. `generator` (on the batch's device) makes the draws reproducible.
    """
    labels = batch.get("itm_labels")
    if labels is None or "itc_text_groups" not in batch or any(key in batch for key in MASKED_BATCH_KEYS):
        return dict(batch)
    logits = batch_itc_logits(model, batch)  # (B texts, B images)
    text_groups, image_groups = batch["itc_text_groups"], batch["itc_image_groups"]
    size = labels.shape[0]
    rows = torch.arange(size, device=labels.device)
    negative = labels.reshape(-1) == 0
    # Even negative rows: keep the image, draw a caption j that does not describe it (logits[j, i]).
    caption_for, caption_possible = _draw(
        logits.t(), text_groups[None, :] != image_groups[:, None], generator
    )
    # Odd negative rows: keep the caption, draw an image k it does not describe (logits[i, k]).
    image_for, image_possible = _draw(logits, image_groups[None, :] != text_groups[:, None], generator)
    if fraction < 1.0:
        chosen = torch.rand(size, device=labels.device, generator=generator) < fraction
        negative = negative & chosen
    swap_caption = negative & (rows % 2 == 0) & caption_possible
    swap_image = negative & (rows % 2 == 1) & image_possible
    text_rows = torch.where(swap_caption, caption_for, rows)
    image_rows = torch.where(swap_image, image_for, rows)
    mined = pair_rows(batch, text_rows, image_rows)
    mined["itc_text_groups"] = text_groups.index_select(0, text_rows)
    mined["itc_image_groups"] = image_groups.index_select(0, image_rows)
    return mined


__all__ = ["batch_itc_logits", "mine_itm_negatives", "pair_rows"]
