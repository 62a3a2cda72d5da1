"""UNITER's forward pass on its own state dict: the reference a converted ImageBERT is checked against.

UNITER (Chen et al., 2020, "UNITER: UNiversal Image-TExt Representation Learning"; code ChenRocks/UNITER, MIT
licence) and VILLA (Gan et al., 2020, same architecture) are single-stream BERTs over the same bottom-up-attention
region features as ImageBERT. This module restates, in plain torch functions over the checkpoint's tensors, what
UNITER's `model/model.py` (UniterTextEmbeddings, UniterImageEmbeddings, UniterModel), `model/layer.py` (BERT's
layers) and `model/pretrain.py` (the MLM, MRFR, MRC and ITM heads) compute, and how its `data/data.py` lays out a
batch (the 7-D box location; real text tokens, then real regions, then padding: its `gather_index`). Nothing is
imported from UNITER: it needs apex and horovod, and the point is an independent restatement.

It serves `tests/test_convert_uniter.py` and `tools/check_uniter_parity.py` (a real checkpoint against its
converted folder). Inference only: no dropout, and no masked-region embedding (UNITER adds its learned
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


__all__ = [
    "UniterBatch",
    "uniter_batch",
    "uniter_box_location",
    "uniter_encode",
    "uniter_itm_scores",
    "uniter_mlm_logits",
    "uniter_rank_scores",
    "uniter_region_class_logits",
    "uniter_region_feature_predictions",
]
