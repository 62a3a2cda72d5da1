"""UNITER's forward pass on its own state dict: the reference a converted ImageBERT is checked against.

UNITER (Chen et al., 2020, "UNITER: UNiversal Image-TExt Representation Learning"; code ChenRocks/UNITER, MIT
licence) and VILLA (Gan et al., 2020, same architecture) are single-stream BERTs over the same bottom-up-attention
region features as ImageBERT. This module restates, in plain torch functions over the checkpoint's tensors, what
UNITER's `model/model.py` (UniterTextEmbeddings, UniterImageEmbeddings, UniterModel), `model/layer.py` (BERT's
layers) and `model/pretrain.py` (the MLM, MRFR, MRC and ITM heads) compute, and how its `data/data.py` lays out a
batch (the 7-D box location; real text tokens, then real regions, then padding: its `gather_index`). Nothing is
imported from UNITER: it needs apex and horovod, and the point is an independent restatement.

`check_parity` runs a converted ImageBERT and this reference on the same random inputs (real-looking boxes in
images of varied sizes, padded text and regions) and returns the largest differences of their outputs; it serves
`tests/test_convert_uniter.py` and `tools/check_uniter_parity.py` (a real checkpoint against its converted
folder). Inference only: no dropout, and no masked-region embedding (UNITER adds its learned
`mask_embedding` to masked regions during pre-training; see `convert_uniter`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch.nn import functional as F

Tensors = Mapping[str, torch.Tensor]
# UNITER's FusedLayerNorm epsilon, everywhere.
LAYER_NORM_EPS = 1e-12


def uniter_box_location(boxes: torch.Tensor, width: float, height: float) -> torch.Tensor:
    """UNITER's 7-D location of pixel boxes: BUTD-UNITER's `norm_bb` (x1/W, y1/H, x2/W, y2/H, w/W, h/H) with
    w = x2 - x1, h = y2 - y1, and the product (w/W)(h/H) that `data/data.py` appends. (..., 4) -> (..., 7)."""
    x1, y1, x2, y2 = (boxes[..., i] / size for i, size in enumerate((width, height, width, height)))
    w, h = (boxes[..., 2] - boxes[..., 0]) / width, (boxes[..., 3] - boxes[..., 1]) / height
    return torch.stack([x1, y1, x2, y2, w, h, w * h], dim=-1)


class UniterBatch(NamedTuple):
    """A batch as UNITER's collate functions make it (`data/itm.py`, `data/mlm.py`)."""

    input_ids: torch.Tensor  # (B, T) [CLS] text [SEP], padded with 0
    position_ids: torch.Tensor  # (1, T)
    img_feat: torch.Tensor  # (B, R, F), padded
    img_pos_feat: torch.Tensor  # (B, R, 7), padded
    attn_masks: torch.Tensor  # (B, L) 1 on the first txt_len + num_bb positions
    gather_index: torch.Tensor  # (B, L) into cat([text (T), image (R)])
    txt_lens: torch.Tensor  # (B,)
    num_bbs: torch.Tensor  # (B,)


def uniter_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    img_feat: torch.Tensor,
    img_pos_feat: torch.Tensor,
    region_attention_mask: torch.Tensor,
) -> UniterBatch:
    """UNITER's packed batch from padded text (B, T) and regions (B, R, F), (B, R, 7), each with its real entries
    first (masks (B, T), (B, R) of ones then zeros): every row holds its real tokens, then its real regions, then
    padding, as `data/data.py`'s `get_gather_index` arranges it."""
    txt_lens = attention_mask.long().sum(1)
    num_bbs = region_attention_mask.long().sum(1)
    batch, text_length = input_ids.shape
    out_size = int((txt_lens + num_bbs).max())
    gather_index = torch.arange(out_size).repeat(batch, 1)
    attn_masks = torch.zeros(batch, out_size, dtype=torch.long)
    for row, (tl, nbb) in enumerate(zip(txt_lens.tolist(), num_bbs.tolist(), strict=True)):
        gather_index[row, tl : tl + nbb] = torch.arange(text_length, text_length + nbb)
        attn_masks[row, : tl + nbb] = 1
    return UniterBatch(
        input_ids=input_ids,
        position_ids=torch.arange(text_length).unsqueeze(0),
        img_feat=img_feat,
        img_pos_feat=img_pos_feat,
        attn_masks=attn_masks,
        gather_index=gather_index,
        txt_lens=txt_lens,
        num_bbs=num_bbs,
    )


def _linear(x: torch.Tensor, state: Tensors, name: str) -> torch.Tensor:
    return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))


def _layer_norm(x: torch.Tensor, state: Tensors, name: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps=LAYER_NORM_EPS)


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """UNITER's `gelu`: x * Phi(x) with the exact error function."""
    return x * 0.5 * (1.0 + torch.erf(x / 2.0**0.5))


def _bert_layer(hidden: torch.Tensor, additive_mask: torch.Tensor, state: Tensors, name: str, heads: int):
    """One post-LN BERT layer (`model/layer.py` BertLayer), (B, L, H) -> (B, L, H)."""
    batch, length, size = hidden.shape

    def split(x):  # (B, L, H) -> (B, nh, L, hs)
        return x.view(batch, length, heads, size // heads).permute(0, 2, 1, 3)

    query, key, value = (
        split(_linear(hidden, state, f"{name}.attention.self.{p}")) for p in ("query", "key", "value")
    )
    scores = query @ key.transpose(-1, -2) / (size // heads) ** 0.5 + additive_mask  # (B, nh, L, L)
    context = (scores.softmax(-1) @ value).permute(0, 2, 1, 3).reshape(batch, length, size)
    attended = _layer_norm(
        _linear(context, state, f"{name}.attention.output.dense") + hidden,
        state,
        f"{name}.attention.output.LayerNorm",
    )
    inner = _gelu(_linear(attended, state, f"{name}.intermediate.dense"))
    return _layer_norm(
        _linear(inner, state, f"{name}.output.dense") + attended, state, f"{name}.output.LayerNorm"
    )


def uniter_encode(state: Tensors, batch: UniterBatch, num_attention_heads: int) -> torch.Tensor:
    """UniterModel's last hidden states on `batch`, (B, L, H) in UNITER's packed layout.

    Text: LN(word + position + token_type[0]) (BERT's). Regions: LN(LN(img_linear(f)) + LN(pos_linear(p7)) +
    token_type[1]), no position embedding. The two parts are concatenated, gathered into the packed layout, and
    run through BERT's layers with UNITER's additive mask ((1 - mask) * -10000)."""
    words = state["uniter.embeddings.word_embeddings.weight"]
    token_type = state["uniter.embeddings.token_type_embeddings.weight"]
    text = (
        words[batch.input_ids]
        + state["uniter.embeddings.position_embeddings.weight"][batch.position_ids]
        + token_type[0]
    )
    text = _layer_norm(text, state, "uniter.embeddings.LayerNorm")  # (B, T, H)
    image = _layer_norm(
        _layer_norm(
            _linear(batch.img_feat, state, "uniter.img_embeddings.img_linear"),
            state,
            "uniter.img_embeddings.img_layer_norm",
        )
        + _layer_norm(
            _linear(batch.img_pos_feat, state, "uniter.img_embeddings.pos_linear"),
            state,
            "uniter.img_embeddings.pos_layer_norm",
        )
        + token_type[1],
        state,
        "uniter.img_embeddings.LayerNorm",
    )  # (B, R, H)
    joint = torch.cat([text, image], dim=1)
    hidden = joint.gather(1, batch.gather_index.unsqueeze(-1).expand(-1, -1, joint.shape[-1]))  # (B, L, H)
    additive_mask = (1.0 - batch.attn_masks[:, None, None, :].to(hidden.dtype)) * -10000.0
    layers = {int(key.split(".")[3]) for key in state if key.startswith("uniter.encoder.layer.")}
    for index in range(len(layers)):
        hidden = _bert_layer(
            hidden, additive_mask, state, f"uniter.encoder.layer.{index}", num_attention_heads
        )
    return hidden


def uniter_itm_scores(state: Tensors, hidden: torch.Tensor) -> torch.Tensor:
    """The ITM head on BERT's pooler: `itm_output(tanh(pooler([CLS])))`, (B, L, H) -> (B, 2) logits of
    (mismatched, matched); its softmax is UNITER's matching probability."""
    pooled = torch.tanh(_linear(hidden[:, 0], state, "uniter.pooler.dense"))
    return _linear(pooled, state, "itm_output")


def uniter_rank_scores(state: Tensors, hidden: torch.Tensor) -> torch.Tensor:
    """UNITER's retrieval score (`model/itm.py`): `rank_output` when fine-tuned, else the matched row of
    `itm_output` (`init_output`, inf_itm.py's zero-shot setting), (B, L, H) -> (B,)."""
    pooled = torch.tanh(_linear(hidden[:, 0], state, "uniter.pooler.dense"))
    if "rank_output.weight" in state:
        return _linear(pooled, state, "rank_output").squeeze(-1)
    return pooled @ state["itm_output.weight"][1] + state["itm_output.bias"][1]


def uniter_mlm_logits(state: Tensors, hidden: torch.Tensor, text_positions: torch.Tensor) -> torch.Tensor:
    """The MLM head (`BertOnlyMLMHead`, decoder tied to the word embeddings) at the text positions selected by
    `text_positions` (B, T) bool, in row-major order: (M, vocab)."""
    selected = hidden[:, : text_positions.shape[1]][text_positions]  # (M, H)
    transformed = _layer_norm(
        _gelu(_linear(selected, state, "cls.predictions.transform.dense")),
        state,
        "cls.predictions.transform.LayerNorm",
    )
    return transformed @ state["uniter.embeddings.word_embeddings.weight"].T + state["cls.predictions.bias"]


def _region_rows(hidden: torch.Tensor, batch: UniterBatch, region_positions: torch.Tensor) -> torch.Tensor:
    """The hidden rows of the regions selected by `region_positions` (B, R) bool, in row-major order: (M, H). In
    the packed layout region r of row b sits at txt_lens[b] + r (UNITER's `img_mask_tgt`)."""
    rows, regions = region_positions.nonzero(as_tuple=True)
    return hidden[rows, batch.txt_lens[rows] + regions]


def uniter_region_class_logits(
    state: Tensors, hidden: torch.Tensor, batch: UniterBatch, region_positions: torch.Tensor
) -> torch.Tensor:
    """The MRC head (`RegionClassification`: Linear, GELU, LN, Linear) at the selected regions: (M, 1 + classes),
    column 0 the background."""
    x = _layer_norm(
        _gelu(_linear(_region_rows(hidden, batch, region_positions), state, "region_classifier.net.0")),
        state,
        "region_classifier.net.2",
    )
    return _linear(x, state, "region_classifier.net.3")


def uniter_region_feature_predictions(
    state: Tensors, hidden: torch.Tensor, batch: UniterBatch, region_positions: torch.Tensor
) -> torch.Tensor:
    """The MRFR head (`RegionFeatureRegression`: Linear, GELU, LN, then the transpose of `img_linear`'s weight) at
    the selected regions: (M, F)."""
    x = _layer_norm(
        _gelu(_linear(_region_rows(hidden, batch, region_positions), state, "feat_regress.net.0")),
        state,
        "feat_regress.net.2",
    )
    return F.linear(x, state["uniter.img_embeddings.img_linear.weight"].T, state["feat_regress.bias"])


# ----------------------------------------------------------------------------------------------------------------------
# Parity: a converted ImageBERT against this reference
# ----------------------------------------------------------------------------------------------------------------------


class ParityInputs(NamedTuple):
    """Random inputs in both layouts: ours (5-D locations) and the boxes UNITER's 7-D location is computed from."""

    input_ids: torch.Tensor  # (B, T), real tokens first, 0-padded
    attention_mask: torch.Tensor  # (B, T)
    region_features: torch.Tensor  # (B, R, F)
    region_boxes: torch.Tensor  # (B, R, 4) pixel x1, y1, x2, y2
    image_sizes: torch.Tensor  # (B, 2) width, height
    region_attention_mask: torch.Tensor  # (B, R), real regions first
    text_positions: torch.Tensor  # (B, T) bool: the tokens whose MLM logits are compared
    region_positions: torch.Tensor  # (B, R) bool: the regions whose class logits and features are compared


def parity_inputs(
    vocab_size: int,
    feature_dim: int,
    *,
    batch_size: int = 4,
    max_text: int = 12,
    max_regions: int = 10,
    seed: int = 0,
) -> ParityInputs:
    """Random inputs with real-looking regions: images of 300-800 x 200-640 pixels, boxes drawn inside them at
    arbitrary (not grid-aligned) coordinates and at least 8 pixels wide and high, non-negative features (BUTD's
    are means of ReLU outputs); text and region counts vary per row (padding on both sides)."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)

    text_lengths = torch.randint(3, max_text + 1, (batch_size,), generator=g)
    text_lengths[0] = max_text
    region_counts = torch.randint(1, max_regions + 1, (batch_size,), generator=g)
    region_counts[-1] = max_regions
    attention_mask = (torch.arange(max_text) < text_lengths[:, None]).long()
    input_ids = torch.randint(1, vocab_size, (batch_size, max_text), generator=g) * attention_mask
    region_attention_mask = (torch.arange(max_regions) < region_counts[:, None]).long()
    sizes = torch.stack(
        [uniform(batch_size, low=300, high=800), uniform(batch_size, low=200, high=640)], 1
    ).round()
    width, height = sizes[:, 0, None], sizes[:, 1, None]
    x1, y1 = uniform(batch_size, max_regions) * (width - 8), uniform(batch_size, max_regions) * (height - 8)
    x2 = x1 + 8 + uniform(batch_size, max_regions) * (width - x1 - 8)
    y2 = y1 + 8 + uniform(batch_size, max_regions) * (height - y1 - 8)
    boxes = torch.stack([x1, y1, x2, y2], dim=-1).float()
    features = torch.relu(torch.randn(batch_size, max_regions, feature_dim, generator=g)) * 2.0
    text_positions = (torch.rand(batch_size, max_text, generator=g) < 0.3) & attention_mask.bool()
    text_positions[:, 1] = True  # at least one per row (position 1 is real: every text has 3 tokens or more)
    region_positions = (torch.rand(batch_size, max_regions, generator=g) < 0.3) & region_attention_mask.bool()
    region_positions[:, 0] = True
    return ParityInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        region_features=features * region_attention_mask[..., None],
        region_boxes=boxes,
        image_sizes=sizes.float(),
        region_attention_mask=region_attention_mask,
        text_positions=text_positions,
        region_positions=region_positions,
    )


@torch.no_grad()
def check_parity(
    state: Tensors, model, inputs: ParityInputs, itm_logit: str = "probability"
) -> dict[str, float]:
    """The largest absolute differences between a converted `ImageBertForPreTraining` (`model`, in eval mode) and
    UNITER's forward on `state`, on the same `inputs`: `itm` (sigmoid of our ITM logit against UNITER's softmax
    P(matched) for `itm_logit` "probability"; our logit against UNITER's retrieval score for "rank"), `mlm`
    (vocabulary logits at `text_positions`), `region_class` (logits of the object classes, UNITER's background
    column left out, at `region_positions`) and `mrfr` (regressed features there)."""
    from ..processing_imagebert import region_locations

    locations = torch.stack(
        [
            torch.from_numpy(region_locations(boxes.numpy(), float(size[0]), float(size[1])))
            for boxes, size in zip(inputs.region_boxes, inputs.image_sizes, strict=True)
        ]
    )  # (B, R, 5)
    outputs = model(
        input_ids=inputs.input_ids,
        attention_mask=inputs.attention_mask,
        token_type_ids=torch.zeros_like(inputs.input_ids),
        region_features=inputs.region_features,
        region_locations=locations,
        region_attention_mask=inputs.region_attention_mask,
        labels=torch.where(inputs.text_positions, inputs.input_ids, -100),
        masked_regions=inputs.region_positions,
        region_class_labels=torch.where(inputs.region_positions, 0, -100),
        region_feature_targets=inputs.region_features,
    )
    p7 = torch.stack(
        [
            uniter_box_location(boxes, float(size[0]), float(size[1]))
            for boxes, size in zip(inputs.region_boxes, inputs.image_sizes, strict=True)
        ]
    )  # (B, R, 7)
    batch = uniter_batch(
        inputs.input_ids, inputs.attention_mask, inputs.region_features, p7, inputs.region_attention_mask
    )
    hidden = uniter_encode(state, batch, model.config.num_attention_heads)
    if itm_logit == "probability":
        itm = (outputs.itm_logits.sigmoid() - uniter_itm_scores(state, hidden).softmax(-1)[:, 1]).abs().max()
    else:
        itm = (outputs.itm_logits - uniter_rank_scores(state, hidden)).abs().max()
    differences = {"itm": itm}
    if "cls.predictions.bias" in state:  # a fine-tuned retrieval checkpoint has no pre-training heads
        reference = uniter_mlm_logits(state, hidden, inputs.text_positions)
        differences["mlm"] = (outputs.mlm_logits - reference).abs().max()
    if "region_classifier.net.3.weight" in state:
        reference = uniter_region_class_logits(state, hidden, batch, inputs.region_positions)[:, 1:]
        differences["region_class"] = (outputs.moc_logits - reference).abs().max()
    if "feat_regress.bias" in state:
        reference = uniter_region_feature_predictions(state, hidden, batch, inputs.region_positions)
        differences["mrfr"] = (outputs.mrfr_predictions - reference).abs().max()
    return {name: float(value) for name, value in differences.items()}


__all__ = [
    "ParityInputs",
    "UniterBatch",
    "check_parity",
    "parity_inputs",
    "uniter_batch",
    "uniter_box_location",
    "uniter_encode",
    "uniter_itm_scores",
    "uniter_mlm_logits",
    "uniter_rank_scores",
    "uniter_region_class_logits",
    "uniter_region_feature_predictions",
]
