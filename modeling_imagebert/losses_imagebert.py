"""The losses of the ImageBERT models, together: the pre-training tasks' (§4.3: MLM, MOC, MRFR, ITM; and the optional
image-text contrastive loss), the retrieval fine-tuning losses (§4.4) and the helpers they share.

Part of the remote-code unit: `modeling_imagebert.py` imports it relatively, so `save_pretrained` copies it next to
the weights and `trust_remote_code=True` loads it without our package. It imports only torch.

Every loss is computed in float32 (the logits are upcast), whatever the autocast dtype of the model.
"""

import torch
from torch import nn
from torch.nn import functional as F


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (M,) over the `valid` (M,) entries; 0 (still connected to the graph) when none is."""
    return (values * valid).sum() / valid.sum().clamp(min=1)


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """MLM and MOC: cross-entropy of `logits` (M, C) against class ids `targets` (M,), averaged over the `valid`
    (M,) bool entries (the heads also run on padding and mismatched-pair rows, which must not count); `()`."""
    per_entry = F.cross_entropy(logits.float(), targets.masked_fill(~valid, -100), reduction="none")
    return masked_mean(per_entry, valid)


def masked_feature_regression(
    predictions: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """MRFR: squared error of regressed region features `predictions` (M, F) against the original `targets` (M, F),
    averaged over the feature dimension, then over the `valid` (M,) bool entries; `()`."""
    per_region = (predictions.float() - targets.float()).pow(2).mean(-1)
    return masked_mean(per_region, valid)


def image_text_matching_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ITM: binary cross-entropy of the matching logits (B,) against `labels` (B,) (1 matched, 0 mismatched); `()`."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def image_text_contrastive_loss(
    text_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    text_groups: torch.Tensor | None = None,
    image_groups: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (CLIP's loss), where pairs that show the same image are never negatives.

    Args:
        text_embeds: `(B, D)` L2-normalised text embeddings; row i is paired with `image_embeds[i]`.
        image_embeds: `(B, D)` L2-normalised image embeddings.
        logit_scale: `()` the factor of the cosine similarities (exp of the learnable log temperature).
        text_groups: `(B,)` long, the image group of each row's caption (the image it describes); default: every
            row its own group (CLIP's assumption).
        image_groups: `(B,)` long, the group of each row's image, in the same id space; default: `text_groups`.
            Text i and image j (j != i) with `text_groups[i] == image_groups[j]` are left out of each other's
            softmax (a caption of the same image is no negative).
        valid: `(B,)` bool, the rows whose pair counts as a positive (e.g. matched ITM pairs); every row still
            serves as a negative for the others. Default: all.

    Returns:
        `()` the mean over valid rows of (text-to-image + image-to-text cross-entropy) / 2; 0 when no row is valid.
    """
    batch = text_embeds.shape[0]
    device = text_embeds.device
    logits = logit_scale.float() * text_embeds.float() @ image_embeds.float().t()  # (B, B) texts x images
    if text_groups is None:
        text_groups = torch.arange(batch, device=device)
    if image_groups is None:
        image_groups = text_groups
    same = (
        text_groups.to(device)[:, None] == image_groups.to(device)[None, :]
    )  # (B, B) text i describes image j
    other_positive = same & ~torch.eye(batch, dtype=torch.bool, device=device)
    target = torch.arange(batch, device=device)
    text_to_image = F.cross_entropy(
        logits.masked_fill(other_positive, float("-inf")), target, reduction="none"
    )
    image_to_text = F.cross_entropy(
        logits.t().masked_fill(other_positive.t(), float("-inf")), target, reduction="none"
    )
    per_pair = (text_to_image + image_to_text) / 2  # (B,)
    if valid is None:
        return per_pair.mean()
    return masked_mean(per_pair, valid.to(device))


def candidate_group_size(labels: torch.Tensor, num_candidates: int | None, requirement: str) -> int:
    """P, the rows of each candidate group of a retrieval batch (contiguous groups, one positive each): the given
    `num_candidates`, or B / the number of positives (a host read: the retrieval collators pass P). Raises a
    ValueError starting with `requirement` (which loss needs what) when the B rows do not split into such groups."""
    batch = labels.shape[0]
    positives = None
    if num_candidates is None:
        positives = int((labels == 1).sum())
        group = batch // positives if positives else 0
    else:
        group = int(num_candidates)
    if not group or batch % group:
        raise ValueError(
            f"{requirement}; got {batch} rows with {positives if positives is not None else 'unchecked'} positives "
            f"(num_candidates={num_candidates})"
        )
    return group


def retrieval_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: dict[str, float],
    margin: float,
    num_candidates: int | None = None,
    check_groups: bool = True,
) -> dict[str, torch.Tensor]:
    """The fine-tuning losses of §4.4 on a batch of candidate groups.

    Args:
        logits: `(B,)` matching scores.
        labels: `(B,)` 1 for matched pairs, 0 for sampled negatives. For `ce` and `triplet` the batch is read as
            contiguous groups of P rows (P = `num_candidates`, or B / number of positives) with exactly one positive
            each, as `DataCollatorForImageTextRetrieval` lays it out.
        weights: `{name: weight}` for `binary` (BCE on every row), `ce` (cross-entropy picking the positive among the
            P candidates) and `triplet` (hinge `max(0, margin - s_pos + max s_neg)` with the hardest negative).
        num_candidates: P. When None it is inferred from the number of positives, and the groups are checked:
            both read values on the host (a device synchronisation); the retrieval collators pass P.
        check_groups: check that each group holds exactly one positive (reads values on the host).

    Returns:
        `{name: loss}` for each configured name.
    """
    labels = labels.to(logits.device)
    losses = {}
    if "binary" in weights:
        losses["binary"] = F.binary_cross_entropy_with_logits(logits.float(), labels.float())
    if "ce" in weights or "triplet" in weights:
        group = candidate_group_size(
            labels,
            num_candidates,
            "the ce/triplet retrieval losses need contiguous groups of P candidates with one positive each",
        )
        grouped_labels = labels.view(-1, group)  # (G, P)
        if check_groups and not torch.equal(
            (grouped_labels == 1).sum(1), torch.ones_like(grouped_labels[:, 0], dtype=torch.long)
        ):
            raise ValueError(f"each group of {group} candidates must hold exactly one positive (labels == 1)")
        grouped = logits.float().view(-1, group)  # (G, P)
        positive_index = grouped_labels.argmax(1)  # (G,)
        if "ce" in weights:
            losses["ce"] = F.cross_entropy(grouped, positive_index)
        if "triplet" in weights:
            positive = grouped.gather(1, positive_index[:, None]).squeeze(1)  # (G,)
            hardest = grouped.masked_fill(grouped_labels == 1, float("-inf")).max(1).values  # (G,)
            losses["triplet"] = F.relu(margin - positive + hardest).mean()
    return losses


def weighted_loss(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """`sum(weights[name] * loss)` over `losses`, in their order (the order fixes the float rounding)."""
    return sum(weights[name] * value for name, value in losses.items())


def keep_in_graph(loss: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """`loss` plus 0 x the parameters of an unused `module`: they get zero gradients instead of none, so DDP finds
    every parameter in the graph (as the heads' ignored rows do) without a search for unused parameters; Adam's update
    of a zero gradient is zero."""
    return loss + 0.0 * sum(parameter.sum() for parameter in module.parameters())


__all__ = [
    "candidate_group_size",
    "image_text_contrastive_loss",
    "image_text_matching_loss",
    "keep_in_graph",
    "masked_cross_entropy",
    "masked_feature_regression",
    "masked_mean",
    "retrieval_losses",
    "weighted_loss",
]
