"""ImageBERT (Qi et al., 2020): a single-stream BERT over `[CLS] text [SEP]` followed by detector region tokens.

Read top to bottom in build order: embeddings -> attention -> layer -> encoder -> pooler -> heads -> pre-trained base
-> `ImageBertModel`, `ImageBertForPreTraining`, `ImageBertForRetrieval`.

This file imports only torch, transformers and its siblings of the remote-code unit (`.configuration_imagebert`, the
CPU kernels `.kernels_imagebert`, the losses `.losses_imagebert` and the task table `.tasks_imagebert`), so that
`save_pretrained` can copy them next to the weights and a Hub user can load the model with `trust_remote_code=True`
without installing our package.
"""

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_imagebert import ImageBertConfig, parse_retrieval_loss
from .kernels_imagebert import _cpu_training_attention, _fast_dropout, _fast_dropout_add, _use_fast_dropout
from .losses_imagebert import (
    candidate_group_size,
    image_text_contrastive_loss,
    image_text_matching_loss,
    keep_in_graph,
    masked_cross_entropy,
    masked_feature_regression,
    retrieval_losses,
    weighted_loss,
)
from .tasks_imagebert import PRETRAINING_TASKS

logger = logging.get_logger(__name__)


# ----------------------------------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------------------------------


class ImageBertEmbeddings(nn.Module):
    """Text and region embeddings of the joint sequence (paper §4.1).

    Text token: LN(word + segment + position), exactly BERT's embedding (same parameter names, so BERT checkpoints load).
    Region token: LN'(W_v v + segment + W_c c + position[region_position_id]) with c the 5-D location; the segment and
    sequence-position tables are shared with the text, every region gets the same dummy position (regions have no
    order). The optional global-image token is built like a region with the whole-image location (0, 0, 1, 1, 1).

    With `config.region_embedding_type == "uniter"` (weights converted from UNITER), a region token is UNITER's:
    LN'(LN_v(W_v v) + LN_c(W_c c) + segment), without a position embedding; the two extra LayerNorms exist only then.
    """

    fast_dropout = True

    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

        self.region_feature_projection = nn.Linear(config.visual_feature_dim, config.hidden_size)
        self.region_location_projection = nn.Linear(5, config.hidden_size)
        self.region_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.uniter_regions = config.region_embedding_type == "uniter"
        if self.uniter_regions:
            self.region_feature_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.region_location_LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.use_global_image_feature:
            self.global_feature_projection = nn.Linear(config.global_image_feature_dim, config.hidden_size)

        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.region_position_id = config.region_position_id
        self.region_segment_id = config.region_segment_id
        self.position_ids = nn.Buffer(
            torch.arange(config.max_position_embeddings).expand((1, -1)), persistent=False
        )
        self.whole_image_location = nn.Buffer(torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]), persistent=False)

    def embed_text(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None, sparse_word_gradient: bool = False
    ) -> torch.Tensor:
        seq_length = input_ids.shape[1]
        position_ids = self.position_ids[:, :seq_length]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = (
            self._embed_words(input_ids, sparse_word_gradient)
            + self.token_type_embeddings(token_type_ids)
            + self.position_embeddings(position_ids)
        )  # (B, T, H)
        return self.LayerNorm(embeddings)

    def _embed_words(self, input_ids: torch.Tensor, sparse_gradient: bool) -> torch.Tensor:
        """The word embeddings of `input_ids` (B, T) -> (B, T, H). With `sparse_gradient` the lookup returns its
        gradient as sparse rows; only `ImageBertForPreTraining` asks for it, and only when a dense gradient (the tied
        MLM decoder's) reaches the same weight in the same backward pass, so that `.grad` stays dense."""
        weight = self.word_embeddings.weight
        sparse = (
            sparse_gradient
            # Only a plain leaf parameter: FSDP and DTensor parameters take dense gradients only.
            and weight.is_leaf
            and type(weight.data) is torch.Tensor
        )
        if not sparse:
            return self.word_embeddings(input_ids)
        padding_idx = self.word_embeddings.padding_idx
        embedded = F.embedding(input_ids, weight, sparse=True)  # (B, T, H)
        if padding_idx is None:
            return embedded
        # The padding row gets no gradient, as with `padding_idx`, but without the boolean-mask gather the sparse
        # backward uses to drop padding entries (a host synchronisation on a GPU): padding positions take the
        # detached row, so their gradient entries are zeros.
        return torch.where((input_ids == padding_idx)[..., None], weight[padding_idx].detach(), embedded)

    def _region_constant(self) -> torch.Tensor:
        """Segment + dummy position embedding shared by every image token, (H,); the segment alone for UNITER's."""
        segment = self.token_type_embeddings.weight[self.region_segment_id]
        if self.uniter_regions:
            return segment
        return segment + self.position_embeddings.weight[self.region_position_id]

    def _image_token(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        """An image token from its projected feature and location, (..., H) each -> (..., H)."""
        if self.uniter_regions:
            features = self.region_feature_LayerNorm(features)
            locations = self.region_location_LayerNorm(locations)
        return self.region_LayerNorm(features + locations + self._region_constant())

    def embed_regions(self, region_features: torch.Tensor, region_locations: torch.Tensor) -> torch.Tensor:
        weight = self.region_feature_projection.weight
        return self._image_token(
            self.region_feature_projection(region_features.to(weight.dtype)),
            self.region_location_projection(region_locations.to(weight.dtype)),
        )  # (B, R, H)

    def embed_global_image(self, global_image_features: torch.Tensor) -> torch.Tensor:
        weight = self.global_feature_projection.weight
        embeddings = self._image_token(
            self.global_feature_projection(global_image_features.to(weight.dtype)),
            self.region_location_projection(self.whole_image_location.to(weight.dtype)),
        )  # (B, H)
        return embeddings.unsqueeze(1)  # (B, 1, H)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        region_features: torch.Tensor | None,
        region_locations: torch.Tensor | None,
        global_image_features: torch.Tensor | None = None,
        sparse_word_gradient: bool = False,
    ) -> torch.Tensor:
        parts = []
        if input_ids is not None:
            parts.append(self.embed_text(input_ids, token_type_ids, sparse_word_gradient))
        if global_image_features is not None:
            parts.append(self.embed_global_image(global_image_features))
        if region_features is not None:
            parts.append(self.embed_regions(region_features, region_locations))
        embeddings = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, T [+1] + R, H)
        if _use_fast_dropout(self, embeddings, self.dropout.p):
            return _fast_dropout(embeddings, self.dropout.p)
        return self.dropout(embeddings)


# ----------------------------------------------------------------------------------------------------------------------
# Attention, layer, encoder, pooler (BERT's, with BERT's parameter names)
# ----------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
):
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, L, L)
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()  # (B, L, nh, hs)
    return attn_output, attn_weights


class ImageBertSelfAttention(nn.Module):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        # Checked here, not in the config, as BERT does: transformers' config tooling builds configs (e.g.
        # hidden_size=37 with the default 12 heads) that only a model would refuse.
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"ImageBertConfig.hidden_size ({config.hidden_size}) must be a multiple of num_attention_heads "
                f"({config.num_attention_heads})"
            )
        self.config = config
        self.attention_head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.attention_head_size**-0.5
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    # Fast paths (see `ImageBertPreTrainedModel.set_fast_paths`).
    fused_qkv = True
    fast_dropout = True

    def _project(self, layers: list[nn.Linear], hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`hidden_states` (B, L, H) through each of `layers`, split into heads: one (B, nh, L, hs) per layer. With
        `fused_qkv`, one product of the concatenated weights: one read (and, under autocast, one cast) of the input."""
        input_shape = hidden_states.shape[:-1]
        if not self.fused_qkv or len(layers) == 1:
            hidden_shape = (*input_shape, -1, self.attention_head_size)
            return tuple(layer(hidden_states).view(hidden_shape).transpose(1, 2) for layer in layers)
        weight = torch.cat([layer.weight for layer in layers])  # (nH, H)
        bias = torch.cat([layer.bias for layer in layers])  # (nH,)
        projected = F.linear(hidden_states, weight, bias).view(
            *input_shape, len(layers), -1, self.attention_head_size
        )
        return projected.permute(2, 0, 3, 1, 4).unbind(0)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        **kwargs,
    ):
        """Self-attention over `hidden_states` (B, L, H). With `key_value_states` (B, L, H) and `query_index` (B, Q),
        `hidden_states` holds only the rows `query_index` of `key_value_states` (B, Q, H): those rows attend to every
        position (what the full self-attention gives at those rows, without computing the others)."""
        input_shape = hidden_states.shape[:-1]
        if key_value_states is None:
            # 3 x (B, nh, L, hs)
            query, key, value = self._project([self.query, self.key, self.value], hidden_states)
        else:
            (query,) = self._project([self.query], hidden_states)  # (B, nh, Q, hs)
            key, value = self._project([self.key, self.value], key_value_states)  # (B, nh, L, hs)
            # The mask rows of the queries: (B|1, 1|nh, L, L) -> (B, 1|nh, Q, L).
            if attention_mask is not None and attention_mask.shape[2] > 1:
                heads, length = attention_mask.shape[1], attention_mask.shape[3]
                attention_mask = attention_mask.expand(query_index.shape[0], -1, -1, -1)
                rows = query_index[:, None, :, None].expand(-1, heads, -1, length)
                attention_mask = attention_mask.gather(2, rows)

        dropout = self.dropout.p if self.training else 0.0
        if (
            # SDPA returns no attention weights either; "eager" (chosen to get them) keeps its own path.
            self.config._attn_implementation == "sdpa" and _use_fast_dropout(self, hidden_states, dropout)
        ):
            attn_output = _cpu_training_attention(query, key, value, attention_mask, self.scaling, dropout)
            return attn_output.reshape(*input_shape, -1).contiguous(), None  # (B, L, H)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.dropout.p if self.training else 0.0,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, L, H)
        return attn_output, attn_weights


class ImageBertResidualOutput(nn.Module):
    """dense -> dropout -> + residual -> LayerNorm, closing both the attention block (input: hidden) and the
    feed-forward block (input: intermediate). One class for BERT's SelfOutput and Output: same parameter names."""

    fast_dropout = True

    def __init__(self, config: ImageBertConfig, input_size: int):
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dense(hidden_states)
        if _use_fast_dropout(self, hidden_states, self.dropout.p):
            return self.LayerNorm(_fast_dropout_add(hidden_states, input_tensor, self.dropout.p))
        return self.LayerNorm(self.dropout(hidden_states) + input_tensor)


class ImageBertAttention(nn.Module):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.self = ImageBertSelfAttention(config)
        self.output = ImageBertResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        # With `key_value_states` (see ImageBertSelfAttention.forward), `hidden_states` are the query rows, which are
        # also the residual of those rows.
        attention_output, attn_weights = self.self(hidden_states, attention_mask, **kwargs)
        return self.output(attention_output, hidden_states), attn_weights


class ImageBertIntermediate(nn.Module):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class ImageBertLayer(GradientCheckpointingLayer):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.attention = ImageBertAttention(config)
        self.intermediate = ImageBertIntermediate(config)
        self.output = ImageBertResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
        query_valid: torch.Tensor | None = None,
        **kwargs,
    ):
        """The layer on `hidden_states` (B, L, H). With `query_index` (B, Q) (a distinct position per entry), only
        the output rows at those positions are computed (every position still serves as key and value); the other
        rows are zero, and so are the rows of entries whose `query_valid` (B, Q) bool is False, when given."""
        if query_index is None:
            attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
            return self.output(self.intermediate(attention_output), attention_output)
        gather_index = query_index[..., None].expand(-1, -1, hidden_states.shape[-1])  # (B, Q, H)
        if self.attention.self.config._attn_implementation in ("sdpa", "eager") and (
            attention_mask is None or attention_mask.dim() == 4
        ):
            queries = hidden_states.gather(1, gather_index)  # (B, Q, H)
            attention_output, _ = self.attention(
                queries, attention_mask, key_value_states=hidden_states, query_index=query_index, **kwargs
            )
            rows = self.output(self.intermediate(attention_output), attention_output)  # (B, Q, H)
        else:
            # Implementations with their own mask formats (flash, flex) compute every row.
            attention_output, _ = self.attention(hidden_states, attention_mask, **kwargs)
            rows = self.output(self.intermediate(attention_output), attention_output).gather(1, gather_index)
        if query_valid is not None:
            rows = rows.masked_fill(~query_valid[..., None], 0.0)
        return rows.new_zeros(hidden_states.shape).scatter(1, gather_index, rows)


def _query_index(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) bool -> the selected positions of each row in ascending order, padded to the longest row with distinct
    unselected positions: (B, Q) indices, and (B, Q) bool saying which entries are selected. Reads the longest
    row's count on the host (a synchronisation): the collators compute the index form instead."""
    counts = positions.sum(1)
    num_queries = max(int(counts.max()), 1)
    index = torch.argsort((~positions).to(torch.int8), dim=1, stable=True)[:, :num_queries]
    valid = torch.arange(num_queries, device=positions.device) < counts[:, None]
    return index, valid


def _last_layer_query(
    positions: torch.Tensor, batch: int, length: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`last_layer_positions` (bool (B, L) or long (B, Q)) -> (query_index (B, Q), query_valid (B, Q) or None)."""
    if positions.dtype == torch.bool:
        if positions.shape != (batch, length):
            raise ValueError(
                f"last_layer_positions must have shape {(batch, length)} (batch, joint sequence length) as a bool "
                f"mask, or (batch, Q) as indices; got {tuple(positions.shape)}"
            )
        positions = positions.to(device).clone()
        positions[:, 0] = True  # the pooler reads the first position
        return _query_index(positions)
    if positions.dim() != 2 or positions.shape[0] != batch or positions.dtype.is_floating_point:
        raise ValueError(
            f"last_layer_positions must have shape {(batch, length)} (batch, joint sequence length) as a bool mask, "
            f"or (batch, Q) as integer indices; got {tuple(positions.shape)} {positions.dtype}"
        )
    return positions.to(device=device, dtype=torch.long), None


class ImageBertEncoder(nn.Module):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([ImageBertLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        last_layer_query: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        **kwargs,
    ):
        """`last_layer_query`: `(query_index (B, Q), query_valid (B, Q) bool or None)`, the rows the last layer
        computes (see `ImageBertLayer.forward`); None computes every row."""
        last = len(self.layer) - 1
        for index, layer_module in enumerate(self.layer):
            if index == last and last_layer_query is not None:
                query_index, query_valid = last_layer_query
                kwargs = {**kwargs, "query_index": query_index, "query_valid": query_valid}
            hidden_states = layer_module(hidden_states, attention_mask, **kwargs)
        return hidden_states


class ImageBertPooler(nn.Module):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states[:, 0]))  # [CLS] (or the first token): (B, H)


# ----------------------------------------------------------------------------------------------------------------------
# Heads
# ----------------------------------------------------------------------------------------------------------------------


class ImageBertPredictionHeadTransform(nn.Module):
    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.transform_act_fn = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class ImageBertPredictionHead(nn.Module):
    """transform (dense, activation, LN) then a linear decoder: used for MLM (decoder tied to the word embeddings),
    masked object classification (decoder to the detector classes) and masked region feature regression (decoder
    to the feature dimension)."""

    def __init__(self, config: ImageBertConfig, output_size: int):
        super().__init__()
        self.transform = ImageBertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, output_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden_states))


# CLIP's initial temperature 0.07, and its cap: the logit scale exp(logit_scale) never exceeds 100.
ITC_INITIAL_LOGIT_SCALE = math.log(1 / 0.07)
ITC_MAX_LOGIT_SCALE = math.log(100.0)


class ImageBertContrastiveHead(nn.Module):
    """Image-text contrastive (ITC) head: linear projections (no bias, as CLIP) of the pooled unimodal text and image
    outputs of the shared encoder to `config.projection_dim`, and the learnable log temperature `logit_scale`
    (initialised to log(1 / 0.07), as CLIP)."""

    def __init__(self, config: ImageBertConfig):
        super().__init__()
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.image_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(ITC_INITIAL_LOGIT_SCALE))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale), capped at 100 (as CLIP), `()`: the factor of the cosine similarities in the ITC loss."""
        return self.logit_scale.clamp(max=ITC_MAX_LOGIT_SCALE).exp()


# ----------------------------------------------------------------------------------------------------------------------
# Input checks: shapes in every forward (free: no tensor value is read); values only with the opt-in
# `config.check_inputs` (each reads tensor values on the host, a device synchronisation on a GPU), since in training
# the processor and the collators check the same values where the data enters, once per example.
# ----------------------------------------------------------------------------------------------------------------------


def _check_input_shapes(
    config: ImageBertConfig,
    input_ids,
    attention_mask,
    token_type_ids,
    region_features,
    region_locations,
    region_attention_mask,
    global_image_features,
) -> None:
    """Raise a ValueError naming the argument for inputs whose shapes the model cannot use."""
    if input_ids is None and region_features is None and global_image_features is None:
        raise ValueError(
            "ImageBERT needs input_ids, region_features or global_image_features; got none of them"
        )
    batch_sizes = {}
    for name, tensor, ndim in (
        ("input_ids", input_ids, 2),
        ("attention_mask", attention_mask, 2),
        ("token_type_ids", token_type_ids, 2),
        ("region_features", region_features, 3),
        ("region_locations", region_locations, 3),
        ("region_attention_mask", region_attention_mask, 2),
        ("global_image_features", global_image_features, 2),
    ):
        if tensor is None:
            continue
        if tensor.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
        batch_sizes[name] = tensor.shape[0]
    if len(set(batch_sizes.values())) > 1:
        raise ValueError(f"all inputs must share the batch size; got {batch_sizes}")
    if input_ids is not None:
        for name, tensor in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if tensor is not None and tensor.shape != input_ids.shape:
                raise ValueError(
                    f"{name} must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(tensor.shape)}"
                )
        if input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than max_position_embeddings "
                f"({config.max_position_embeddings})"
            )
    if region_features is not None:
        batch, num_regions, feature_dim = region_features.shape
        if feature_dim != config.visual_feature_dim:
            raise ValueError(
                f"region_features has feature dimension {feature_dim}, but config.visual_feature_dim is "
                f"{config.visual_feature_dim}"
            )
        if num_regions > config.max_regions:
            raise ValueError(
                f"region_features has {num_regions} regions, more than config.max_regions ({config.max_regions})"
            )
        if region_locations is None:
            raise ValueError("region_locations (B, R, 5) is required with region_features")
        if region_locations.shape != (batch, num_regions, 5):
            raise ValueError(
                f"region_locations must have shape (batch, regions, 5) = {(batch, num_regions, 5)}, got "
                f"{tuple(region_locations.shape)}"
            )
        if region_attention_mask is not None and region_attention_mask.shape != (batch, num_regions):
            raise ValueError(
                f"region_attention_mask must have shape {(batch, num_regions)}, got {tuple(region_attention_mask.shape)}"
            )
    elif region_locations is not None or region_attention_mask is not None:
        raise ValueError("region_locations / region_attention_mask were given without region_features")
    if global_image_features is not None:
        if not config.use_global_image_feature:
            raise ValueError("global_image_features were given but config.use_global_image_feature is False")
        if global_image_features.shape[1] != config.global_image_feature_dim:
            raise ValueError(
                f"global_image_features has dimension {global_image_features.shape[1]}, but "
                f"config.global_image_feature_dim is {config.global_image_feature_dim}"
            )


def _check_input_values(
    config: ImageBertConfig,
    input_ids,
    token_type_ids,
    region_features,
    region_locations,
    global_image_features,
) -> None:
    """Value checks, run only with `config.check_inputs` (for debugging): each reads tensor values on the host, a
    device synchronisation on a GPU. In training, the processor and collators check the same values where the data
    enters, once per example."""
    if input_ids is not None and input_ids.numel():
        if input_ids.min() < 0 or input_ids.max() >= config.vocab_size:
            raise ValueError(
                f"input_ids must be in [0, vocab_size={config.vocab_size}), got values in "
                f"[{input_ids.min().item()}, {input_ids.max().item()}]"
            )
    if token_type_ids is not None and token_type_ids.numel():
        if token_type_ids.min() < 0 or token_type_ids.max() >= config.type_vocab_size:
            raise ValueError(
                f"token_type_ids must be in [0, type_vocab_size={config.type_vocab_size}), got values in "
                f"[{token_type_ids.min().item()}, {token_type_ids.max().item()}]"
            )
    for name, tensor in (
        ("region_features", region_features),
        ("region_locations", region_locations),
        ("global_image_features", global_image_features),
    ):
        if tensor is not None and not torch.isfinite(tensor).all():
            raise ValueError(f"{name} contains NaN or Inf")
    if region_locations is not None and region_locations.numel():
        if region_locations.min() < 0 or region_locations.max() > 1:
            raise ValueError(
                "region_locations must be normalised to [0, 1] (x1/W, y1/H, x2/W, y2/H, area/(W*H)); got values in "
                f"[{region_locations.min().item():.4g}, {region_locations.max().item():.4g}]"
            )


def _check_binary_labels(name: str, values: torch.Tensor) -> None:
    """With `config.check_inputs`: ITM and retrieval labels are exactly 0 or 1 (0.5 or 2 would give a finite,
    meaningless loss)."""
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise ValueError(f"{name} must be 0 or 1, got {values[bad][0].item()!r}")


def _check_label_values(config: ImageBertConfig, labels: Mapping[str, torch.Tensor | None]) -> None:
    """With `config.check_inputs`: each pre-training task's label in `labels` (by batch key) holds the values its
    row of the task table names (`label_values`): 0 or 1, or class ids in [0, config.<field>) and -100."""
    for task in PRETRAINING_TASKS:
        name = task.label_keys[0]
        values = labels.get(name)
        if values is None or task.label_values is None:
            continue
        if task.label_values == "binary":
            _check_binary_labels(name, values)
            continue
        high = getattr(config, task.label_values)
        labelled = values[values != -100]
        if labelled.numel() and (labelled.min() < 0 or labelled.max() >= high):
            raise ValueError(
                f"{name} must be in [0, {high}) or -100, got values in [{labelled.min().item()}, "
                f"{labelled.max().item()}]"
            )


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class ImageBertModelOutput(ModelOutput):
    r"""
    last_hidden_state (`(batch, text_length [+ 1] + num_regions, hidden)`): the joint sequence output.
    pooler_output (`(batch, hidden)`): tanh(dense([CLS])), the input of the ITM and retrieval heads.
    text_hidden_state (`(batch, text_length, hidden)`): the text part of `last_hidden_state`.
    region_hidden_state (`(batch, num_regions, hidden)`): the region part of `last_hidden_state`.
    global_image_hidden_state (`(batch, hidden)`): the global-image token, when the config uses one.
    hidden_states (tuple of `(batch, length, hidden)`): embeddings and each layer's output, when asked for.
    attentions (tuple of `(batch, heads, length, length)`): each layer's attention weights, when asked for.
    """

    last_hidden_state: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    text_hidden_state: torch.FloatTensor | None = None
    region_hidden_state: torch.FloatTensor | None = None
    global_image_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ImageBertForPreTrainingOutput(ModelOutput):
    r"""
    loss (`()`): weighted sum of the task losses present in the batch.
    mlm_loss, moc_loss, mrfr_loss, itm_loss (`()`): each task's unweighted loss, None when its labels were not given.
    itc_loss (`()`): the image-text contrastive loss, when `config.itc_loss_weight` > 0 and the batch has text and
        regions.
    itm_logits (`(batch,)`): image-text matching score (logit of "matched").
    mlm_logits (`(M, vocab_size)`): vocabulary logits at the `mlm_positions` only (padding and mismatched-pair
        entries included, they do not count in the loss).
    moc_logits (`(K, num_object_classes)`): class logits at the `moc_positions` only.
    mrfr_predictions (`(K, visual_feature_dim)`): regressed features at the `mrfr_positions` only.
    hidden_states, attentions: as in `ImageBertModelOutput`.
    """

    loss: torch.FloatTensor | None = None
    mlm_loss: torch.FloatTensor | None = None
    moc_loss: torch.FloatTensor | None = None
    mrfr_loss: torch.FloatTensor | None = None
    itm_loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    itm_logits: torch.FloatTensor | None = None
    mlm_logits: torch.FloatTensor | None = None
    moc_logits: torch.FloatTensor | None = None
    mrfr_predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class ImageBertForRetrievalOutput(ModelOutput):
    r"""
    loss (`()`): the configured retrieval loss (weighted sum of binary / ce / triplet), when `labels` are given.
    logits (`(batch,)`): matching score of each (text, image) pair; higher means a better match.
    binary_loss, ce_loss, triplet_loss, itc_loss (`()`): each term, None when not configured.
    hidden_states, attentions: as in `ImageBertModelOutput`.
    logits_per_image (`(n_images, n_texts)`), logits_per_text (`(n_texts, n_images)`, its transpose): when one side
        of the call has batch size 1 and was broadcast against the other (one image and n texts, or one text and n
        images; see `ImageBertForRetrieval.forward`), the scores of the grid as `config.zero_shot_score` defines
        them (ITM logit by default); None for paired batches. CLIP's names, read by the zero-shot pipeline.
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    binary_loss: torch.FloatTensor | None = None
    ce_loss: torch.FloatTensor | None = None
    triplet_loss: torch.FloatTensor | None = None
    itc_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Pre-trained base: initialisation, BERT loading
# ----------------------------------------------------------------------------------------------------------------------

_BERT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "initializer_range",
    "layer_norm_eps",
    "pad_token_id",
)


def _read_bert_config(name_or_path: str, **hub_kwargs) -> dict:
    """The config.json of a BERT checkpoint in a folder or on the Hub, as a dict."""
    from transformers.utils import cached_file

    with open(cached_file(name_or_path, "config.json", **hub_kwargs), encoding="utf-8") as f:
        return json.load(f)


def _bert_key_mapping(base_prefix: str) -> dict[str, str]:
    """`from_pretrained(key_mapping=...)` from BERT checkpoint names to ImageBERT's: `bert.` (BertForPreTraining and
    friends) becomes the base-model prefix, the MLM head `cls.predictions.*` becomes `mlm_head.*`, and the legacy
    LayerNorm `gamma`/`beta` become `weight`/`bias`. A bare BertModel's keys need no prefix: `from_pretrained` adds
    the base-model prefix itself."""
    return {
        r"^bert\.": base_prefix,
        r"^cls\.predictions\.bias$": "mlm_head.decoder.bias",
        r"^cls\.predictions\.(transform|decoder)\.": r"mlm_head.\1.",
        r"LayerNorm\.gamma$": "LayerNorm.weight",
        r"LayerNorm\.beta$": "LayerNorm.bias",
    }


class ImageBertPreTrainedModel(PreTrainedModel):
    config_class = ImageBertConfig
    config: ImageBertConfig
    base_model_prefix = "imagebert"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["ImageBertEmbeddings", "ImageBertLayer"]
    _can_record_outputs = {"hidden_states": ImageBertLayer, "attentions": ImageBertSelfAttention}
    # A `forward(**kwargs)` would make Trainer skip dividing the loss by the accumulation steps.
    accepts_loss_kwargs = False

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, ImageBertEmbeddings):
            # Non-persistent buffers hold garbage after a meta-device load unless re-initialised here.
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.copy_(module.whole_image_location, torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
        if isinstance(module, ImageBertContrastiveHead):
            # Also what an older checkpoint without the ITC head gets when loaded.
            init.constant_(module.logit_scale, ITC_INITIAL_LOGIT_SCALE)

    def set_fast_paths(
        self,
        enabled: bool = True,
        *,
        fused_qkv: bool | None = None,
        fast_dropout: bool | None = None,
        fp32_mlm_decoder: bool | None = None,
        sparse_last_layer: bool | None = None,
        sparse_word_gradient: bool | None = None,
    ):
        """Switch the fast paths on or off (all on by default; they change the cost, not what is computed).

        Args:
            enabled: default for every flag left as None.
            fused_qkv: compute query/key/value as one `(3H, H)` product of the concatenated weights (the checkpoint
                keeps the three `query`/`key`/`value` Linear layers).
            fast_dropout: on CPU in training, draw dropout masks from 32-bit random words (two masks per 64-bit
                draw, same keep probability; backward keeps a bool mask instead of a float one), and run attention
                with dropout without SDPA's math fallback. CUDA keeps `F.dropout`'s fused kernel.
            fp32_mlm_decoder: under autocast, run the MLM decoder (tied to the word embeddings) in fp32 on the
                labelled positions instead of casting the (vocab, hidden) weight and its gradient every step. Without
                autocast it changes nothing.
            sparse_last_layer: the pre-training and retrieval models run the last encoder layer only at the positions
                their heads read ([CLS] and the labelled tokens and regions; [CLS] alone for retrieval), with every
                position still as key and value (see `last_layer_positions` of `ImageBertModel.forward`). Off when
                hidden states or attentions are requested.
            sparse_word_gradient: in pre-training with MLM labels, the word-embedding lookup returns its gradient as
                sparse rows, which autograd adds into the tied MLM decoder's dense gradient, instead of a dense
                (vocab, hidden) tensor of zeros plus those rows. The parameter's `.grad` stays dense.

        Returns:
            self.
        """
        flags = {
            "fused_qkv": enabled if fused_qkv is None else fused_qkv,
            "fast_dropout": enabled if fast_dropout is None else fast_dropout,
            "fp32_mlm_decoder": enabled if fp32_mlm_decoder is None else fp32_mlm_decoder,
            "sparse_last_layer": enabled if sparse_last_layer is None else sparse_last_layer,
            "sparse_word_gradient": enabled if sparse_word_gradient is None else sparse_word_gradient,
        }
        for module in self.modules():
            for name, value in flags.items():
                if hasattr(type(module), name):
                    setattr(module, name, bool(value))
        return self

    def compile_layers(self, **compile_kwargs):
        """Opt-in `torch.compile` of each encoder layer in place (off by default: compiling costs minutes on CPU and
        needs a C++ compiler). `compile_kwargs` go to `nn.Module.compile` (e.g. `backend="inductor"`,
        `dynamic=True` for batches padded to their longest example). Returns self."""
        for module in self.modules():
            if isinstance(module, ImageBertLayer):
                module.compile(**compile_kwargs)
        return self

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `PreTrainedModel.save_pretrained`, writing an `auto_map` for all three classes so that one folder serves
        `AutoModel`, `AutoModelForPreTraining` and (as `AutoModelForSequenceClassification`) the retrieval model
        with `trust_remote_code=True`, without our package installed."""
        module = "modeling_imagebert"
        self.config.auto_map = {
            "AutoConfig": "configuration_imagebert.ImageBertConfig",
            "AutoModel": f"{module}.ImageBertModel",
            "AutoModelForPreTraining": f"{module}.ImageBertForPreTraining",
            "AutoModelForSequenceClassification": f"{module}.ImageBertForRetrieval",
            # One image against candidate labels (`logits_per_image`, see `ImageBertForRetrieval.forward`).
            "AutoModelForZeroShotImageClassification": f"{module}.ImageBertForRetrieval",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_bert_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        output_loading_info: bool = False,
        cache_dir: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        **config_overrides,
    ):
        """Build this ImageBERT class from a BERT checkpoint (a folder or a Hub id), as the paper initialises it: a
        thin wrapper over `from_pretrained(..., config=ImageBertConfig(BERT's fields + overrides), key_mapping=...)`.

        Copies the word, position and segment embeddings with their LayerNorm, every encoder layer, the pooler and,
        when the checkpoint has one, the MLM head (`cls.predictions.*`). The region embeddings and the MOC, MRFR and
        ITM heads are newly initialised; the list is logged, and returned when `output_loading_info=True`.

        Args:
            name_or_path: folder with `config.json` and `model.safetensors` (or `pytorch_model.bin`), or a Hub id.
            config_overrides: `ImageBertConfig` fields to set beside the BERT ones (e.g. `visual_feature_dim`,
                `num_object_classes`, `max_regions`). BERT's architecture fields cannot be overridden, except
                `num_hidden_layers` at most the checkpoint's (keeps its first layers: a cheaper model for demos)
                and the dropout rates.

        Returns:
            The model, or `(model, {"copied": [...], "newly_initialized": [...], "unused": [...]})`.
        """
        hub_kwargs = {
            "cache_dir": cache_dir,
            "revision": revision,
            "token": token,
            "local_files_only": local_files_only,
        }
        # Typed by a person: a misspelt field must not become a silent extra attribute.
        ImageBertConfig.check_field_names(config_overrides, where="from_bert_pretrained")
        bert_config = _read_bert_config(str(name_or_path), **hub_kwargs)
        overridable = {"hidden_dropout_prob", "attention_probs_dropout_prob", "num_hidden_layers"}
        clash = sorted(set(config_overrides) & set(_BERT_FIELDS) - overridable)
        if clash:
            raise ValueError(
                f"from_bert_pretrained: {clash} are fixed by the BERT checkpoint {name_or_path!s} and cannot be overridden"
            )
        fields = {name: bert_config[name] for name in _BERT_FIELDS if name in bert_config}
        num_layers = config_overrides.get("num_hidden_layers", fields.get("num_hidden_layers"))
        if num_layers is not None and num_layers > fields.get("num_hidden_layers", num_layers):
            raise ValueError(
                f"from_bert_pretrained: num_hidden_layers={num_layers} exceeds the {fields['num_hidden_layers']} layers "
                f"of {name_or_path!s}"
            )
        config = ImageBertConfig(**{**fields, **config_overrides})
        base_prefix = f"{cls.base_model_prefix}." if cls is not ImageBertModel else ""
        model, loading = cls.from_pretrained(
            name_or_path,
            config=config,
            key_mapping=_bert_key_mapping(base_prefix),
            output_loading_info=True,
            **hub_kwargs,
        )
        own = set(model.state_dict())
        # The MLM decoder weight is tied to the word embeddings: never "new", whatever the checkpoint stores.
        tied = {"mlm_head.decoder.weight"} & own
        newly_initialized = sorted(set(loading["missing_keys"]) - tied)
        copied = sorted(own - set(newly_initialized) - tied)
        logger.warning(
            f"{cls.__name__} initialised from BERT checkpoint {name_or_path!s}: copied {len(copied)} tensors; newly "
            f"initialised: {newly_initialized}"
        )
        if output_loading_info:
            return model, {
                "copied": copied,
                "newly_initialized": newly_initialized,
                "unused": sorted(loading["unexpected_keys"]),
            }
        return model


# ----------------------------------------------------------------------------------------------------------------------
# Public models
# ----------------------------------------------------------------------------------------------------------------------


class ImageBertModel(ImageBertPreTrainedModel):
    """The ImageBERT encoder: embeddings of `[CLS] text [SEP]` and regions, a BERT encoder over the joint sequence,
    and BERT's pooler on the first token. Callable on text alone (as BERT) or on regions alone."""

    def __init__(self, config: ImageBertConfig):
        super().__init__(config)
        self.embeddings = ImageBertEmbeddings(config)
        self.encoder = ImageBertEncoder(config)
        self.pooler = ImageBertPooler(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.LongTensor | None = None,
        global_image_features: torch.FloatTensor | None = None,
        last_layer_positions: torch.BoolTensor | None = None,
        sparse_word_gradient: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageBertModelOutput:
        r"""
        input_ids (`(B, T)`): WordPiece ids of `[CLS] text [SEP]`, padded.
        attention_mask (`(B, T)`): 1 for real tokens, 0 for padding (default: all ones).
        token_type_ids (`(B, T)`): segment ids of the text (default: zeros).
        region_features (`(B, R, F)`): pooled RoI features, R <= max_regions (0 allowed).
        region_locations (`(B, R, 5)`): (x1/W, y1/H, x2/W, y2/H, area/(W*H)) in [0, 1].
        region_attention_mask (`(B, R)`): 1 for real regions, 0 for padding (default: all ones).
        global_image_features (`(B, G)`): whole-image feature, only with `config.use_global_image_feature`.
        last_layer_positions (`(B, L)` bool, L the joint length T [+ 1] + R, or `(B, Q)` long): compute the last
            layer's output only at these positions; the other rows of `last_hidden_state` are zero. Every position
            still feeds the last layer as key and value, so the computed rows equal the full computation's. The
            pre-training and retrieval models pass the positions their heads read (like `logits_to_keep` in
            Transformers' language models). Default: all positions.
            - bool `(B, L)`: the selected positions, plus the first (the pooler's). Turning a mask into indices
              reads its counts on the host (a device synchronisation).
            - long `(B, Q)`: the positions of each row, distinct within a row and including 0 (the pooler's), e.g.
              padded with other unselected positions; every listed row is computed. No synchronisation: the
              collators of `modeling_imagebert.data` compute them (`last_layer_positions` in their batches).
        sparse_word_gradient (`bool`, False): the word-embedding lookup returns its gradient as sparse rows. Only safe
            when a dense gradient reaches the same weight in the same backward pass (the tied MLM decoder's):
            `ImageBertForPreTraining` decides it per call (see `set_fast_paths`).
        """
        _check_input_shapes(
            self.config,
            input_ids,
            attention_mask,
            token_type_ids,
            region_features,
            region_locations,
            region_attention_mask,
            global_image_features,
        )
        if self.config.check_inputs:
            _check_input_values(
                self.config,
                input_ids,
                token_type_ids,
                region_features,
                region_locations,
                global_image_features,
            )
        embedding_output = self.embeddings(
            input_ids,
            token_type_ids,
            region_features,
            region_locations,
            global_image_features,
            sparse_word_gradient=sparse_word_gradient,
        )  # (B, L, H)
        batch, length = embedding_output.shape[:2]
        device = embedding_output.device

        # One padding mask for the joint sequence: text, optional global token, regions.
        masks = []
        text_length = 0 if input_ids is None else input_ids.shape[1]
        if input_ids is not None:
            masks.append(attention_mask if attention_mask is not None else torch.ones_like(input_ids))
        num_global = int(global_image_features is not None)
        if num_global:
            masks.append(torch.ones(batch, 1, dtype=torch.long, device=device))
        if region_features is not None:
            masks.append(
                region_attention_mask
                if region_attention_mask is not None
                else torch.ones(region_features.shape[:2], dtype=torch.long, device=device)
            )
        joint_mask = torch.cat([m.to(torch.long) for m in masks], dim=1)  # (B, L)
        # Always a materialised mask: skipping it when nothing is padded would test `mask.all()` on the host (a
        # device synchronisation every step).
        encoder_mask = create_bidirectional_mask(
            config=self.config,
            inputs_embeds=embedding_output,
            attention_mask=joint_mask,
            allow_is_bidirectional_skip=False,
        )

        last_layer_query = None
        if last_layer_positions is not None:
            last_layer_query = _last_layer_query(last_layer_positions, batch, length, device)
        sequence_output = self.encoder(
            embedding_output, encoder_mask, last_layer_query=last_layer_query, **kwargs
        )  # (B, L, H)
        pooled_output = self.pooler(sequence_output)
        image_start = text_length + num_global
        return ImageBertModelOutput(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            text_hidden_state=sequence_output[:, :text_length],
            region_hidden_state=sequence_output[:, image_start:],
            global_image_hidden_state=sequence_output[:, text_length] if num_global else None,
        )


def _flat_positions(selected: torch.Tensor) -> torch.Tensor:
    """(B, N) bool -> (M,) flat indices of the selected entries, or `[-100]` when none is (so a head still runs on
    one ignored row and every parameter gets a gradient under DDP). Reads the count on the host: the collators
    compute these indices instead (the `*_positions` entries of their batches)."""
    index = selected.reshape(-1).nonzero().squeeze(1)
    return index if index.numel() else torch.full((1,), -100, dtype=torch.long, device=selected.device)


class _JointLayout(NamedTuple):
    """Where the parts of a batch's joint sequence sit: `[text (T), global-image token (0 or 1), regions (R)]`,
    L = T [+ 1] + R positions per row, B rows."""

    batch: int
    num_text: int
    num_global: int
    num_regions: int
    device: torch.device

    @classmethod
    def of(cls, input_ids, region_features, global_image_features) -> "_JointLayout":
        reference = next(t for t in (input_ids, region_features, global_image_features) if t is not None)
        return cls(
            batch=reference.shape[0],
            num_text=0 if input_ids is None else input_ids.shape[1],
            num_global=int(global_image_features is not None),
            num_regions=0 if region_features is None else region_features.shape[1],
            device=reference.device,
        )

    @property
    def length(self) -> int:
        return self.num_text + self.num_global + self.num_regions

    def _locate(self, positions: torch.Tensor, over: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat positions (M,) into the (B, T) text or the (B, R) regions (`over`: "text" or "regions"; -100
        entries are padding) -> their clamped indices (M,), batch rows (M,) and rows in the flattened (B * L) joint
        sequence (M,)."""
        width, offset = (
            (self.num_text, 0) if over == "text" else (self.num_regions, self.num_text + self.num_global)
        )
        index = positions.clamp(min=0)
        row = index // width
        return index, row, row * self.length + offset + index % width

    def rows(
        self, hidden: torch.Tensor, positions: torch.Tensor, over: str, matched: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The hidden rows a head reads: `hidden` (B * L, H), flat `positions` (M,) over the text or the regions
        -> the rows (M, H), the clamped indices (M,) into the labels, and which entries count (M,) bool: not
        padding and, with `matched` (B,) bool, of a matched pair (conditional masking)."""
        index, row, joint = self._locate(positions, over)
        valid = positions >= 0
        if matched is not None:
            valid = valid & matched[row]
        return hidden.index_select(0, joint), index, valid

    def last_layer_mask(self, positions: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
        """(B, L) bool: the rows whose last hidden state a head reads, from each task's flat `positions` (None
        where the task has none); the first row, for the pooler, is added by the model."""
        counts = torch.zeros(self.batch * self.length, device=self.device)
        for task in PRETRAINING_TASKS:
            task_positions = positions.get(task.name)
            if task_positions is None:
                continue
            _, _, joint = self._locate(task_positions, task.positions_over)
            counts = counts.index_add(0, joint, (task_positions >= 0).to(counts.dtype))
        return (counts > 0).view(self.batch, self.length)


def _outputs_requested(config: ImageBertConfig, kwargs: dict) -> bool:
    """Whether the caller asked for every layer's hidden states or attentions (then every position of the last
    layer is computed)."""
    return any(
        kwargs.get(name) if kwargs.get(name) is not None else getattr(config, name, False)
        for name in ("output_hidden_states", "output_attentions")
    )


_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_IMAGE_INPUTS = ("region_features", "region_locations", "region_attention_mask", "global_image_features")


def _broadcast_one_to_many(
    inputs: Mapping[str, torch.Tensor | None],
) -> tuple[dict[str, torch.Tensor | None], tuple[int, int] | None]:
    """The rule for one image against n texts (or one text against n images), as the zero-shot pipeline calls the
    model: when the text side (`input_ids` (Bt, T)) and the image side (`region_features` or
    `global_image_features`, (Bi, ...)) differ in batch size and one of them is 1, or both are 1, the single side
    is expanded (a view) to the other's batch, so the model scores n pairs. Returns the inputs to run and the grid
    `(n_images, n_texts)`; equal batch sizes above 1 (paired rows, the usual call) and unimodal calls return the
    inputs unchanged and None, and other mismatches are left to the shape check."""
    text = inputs["input_ids"]
    image = next(
        (inputs[name] for name in ("region_features", "global_image_features") if inputs[name] is not None),
        None,
    )
    if text is None or image is None:
        return dict(inputs), None
    n_texts, n_images = text.shape[0], image.shape[0]
    if min(n_texts, n_images) != 1 or (n_texts == n_images and n_texts != 1):
        return dict(inputs), None
    pairs = max(n_texts, n_images)
    single = _TEXT_INPUTS if n_texts == 1 else _IMAGE_INPUTS
    broadcast = {
        name: tensor.expand(pairs, *tensor.shape[1:]) if name in single and tensor is not None else tensor
        for name, tensor in inputs.items()
    }
    return broadcast, (n_images, n_texts)


class ImageBertContrastiveFeaturesMixin:
    """`get_text_features` / `get_image_features` (CLIP's names) for the head models: a unimodal pass through the
    shared encoder, pooled, projected by `itc_head` and L2-normalised. One set of weights serves the cheap first
    stage of two-stage retrieval (cosine similarity of embeddings) and the cross-encoder that re-ranks.

    Pooling: the text takes the last hidden state at its first position ([CLS], the row the pooler reads); the image
    takes the mean of the last hidden states of its real tokens (regions, and the global-image token when given): an
    image sequence has no [CLS], and no single region stands for the whole image.
    """

    def _text_pass(
        self, input_ids, attention_mask=None, token_type_ids=None, **kwargs
    ) -> ImageBertModelOutput:
        """A text-only pass (B, T) -> the encoder outputs; the pooled row is `last_hidden_state[:, 0]` ([CLS])."""
        last_layer_positions = None
        if self.sparse_last_layer and not _outputs_requested(self.config, kwargs):
            # Only [CLS] is read: the last layer runs at that row alone (the other rows of last_hidden_state are 0).
            last_layer_positions = torch.zeros(
                input_ids.shape[0], 1, dtype=torch.long, device=input_ids.device
            )
        return self.imagebert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            last_layer_positions=last_layer_positions,
            **{**kwargs, "return_dict": True},
        )

    def _image_pass(
        self,
        region_features,
        region_locations,
        region_attention_mask=None,
        global_image_features=None,
        **kwargs,
    ) -> tuple[ImageBertModelOutput, torch.Tensor]:
        """An image-only pass -> (the encoder outputs, (B, H) mean last hidden state over the real tokens)."""
        outputs = self.imagebert(
            region_features=region_features,
            region_locations=region_locations,
            region_attention_mask=region_attention_mask,
            global_image_features=global_image_features,
            **{**kwargs, "return_dict": True},
        )
        hidden = outputs.last_hidden_state  # (B, [1 +] R, H)
        batch, num_regions = region_features.shape[:2]
        if region_attention_mask is None:
            real = torch.ones(batch, num_regions, dtype=hidden.dtype, device=hidden.device)
        else:
            real = region_attention_mask.to(device=hidden.device, dtype=hidden.dtype)
        if global_image_features is not None:
            real = torch.cat([real.new_ones(batch, 1), real], dim=1)  # the global token comes first
        return outputs, (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)

    def text_embeddings(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.FloatTensor:
        """L2-normalised text embeddings, `(B, projection_dim)`: `get_text_features(...).pooler_output`."""
        pooled = self._text_pass(input_ids, attention_mask, token_type_ids).last_hidden_state[:, 0]
        return F.normalize(self.itc_head.text_projection(pooled), dim=-1)

    def image_embeddings(
        self, region_features, region_locations, region_attention_mask=None, global_image_features=None
    ) -> torch.FloatTensor:
        """L2-normalised image embeddings, `(B, projection_dim)`: `get_image_features(...).pooler_output`."""
        _, pooled = self._image_pass(
            region_features, region_locations, region_attention_mask, global_image_features
        )
        return F.normalize(self.itc_head.image_projection(pooled), dim=-1)

    def _grid_logits(
        self, itm_logits: torch.Tensor, grid: tuple[int, int], inputs: Mapping[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(logits_per_image (n_images, n_texts), logits_per_text)` of a broadcast call (`_broadcast_one_to_many`)
        from the pairs' ITM logits `(n,)` and the unbroadcast `inputs`, as `config.zero_shot_score` says: the ITM
        logit, the ITC logit (exp(logit_scale) x cosine of the unimodal embeddings), or their sum."""
        n_images, n_texts = grid
        parts = self.config.zero_shot_score.split("+")
        logits_per_image = itm_logits.view(n_images, n_texts) if "itm" in parts else 0
        if "itc" in parts:
            text = self.text_embeddings(*(inputs[name] for name in _TEXT_INPUTS))  # (n_texts, D)
            image = self.image_embeddings(*(inputs[name] for name in _IMAGE_INPUTS))  # (n_images, D)
            logits_per_image = logits_per_image + self.itc_head.scale() * image @ text.T
        return logits_per_image, logits_per_image.T

    @can_return_tuple
    def get_text_features(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Text embeddings from `[CLS] text [SEP]` ids `(B, T)` (masks as in `ImageBertModel.forward`), encoded alone
        (no image token takes part), in transformers' convention: `pooler_output` holds the L2-normalised
        `(B, projection_dim)` embeddings, `last_hidden_state` the text-only encoder output (only its [CLS] row with
        the sparse last layer, unless hidden states or attentions are requested)."""
        outputs = self._text_pass(input_ids, attention_mask, token_type_ids, **kwargs)
        embeds = F.normalize(self.itc_head.text_projection(outputs.last_hidden_state[:, 0]), dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=embeds,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @can_return_tuple
    def get_image_features(
        self,
        region_features: torch.FloatTensor,
        region_locations: torch.FloatTensor,
        region_attention_mask: torch.LongTensor | None = None,
        global_image_features: torch.FloatTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """Image embeddings from region features `(B, R, F)`, locations `(B, R, 5)`, the region mask `(B, R)` and,
        with `config.use_global_image_feature`, the global feature `(B, G)`, encoded alone (no text token takes part),
        in transformers' convention: `pooler_output` holds the L2-normalised `(B, projection_dim)` embeddings,
        `last_hidden_state` the image-only encoder output."""
        outputs, pooled = self._image_pass(
            region_features, region_locations, region_attention_mask, global_image_features, **kwargs
        )
        embeds = F.normalize(self.itc_head.image_projection(pooled), dim=-1)
        return BaseModelOutputWithPooling(
            last_hidden_state=outputs.last_hidden_state,
            pooler_output=embeds,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class ImageBertForPreTraining(ImageBertContrastiveFeaturesMixin, ImageBertPreTrainedModel):
    """ImageBERT with the four pre-training heads of §4.3: masked language modelling (MLM, tied to the word
    embeddings), masked object classification (MOC), masked region feature regression (MRFR) and image-text matching
    (ITM). Each head runs only on the positions that carry a label. Conditional masking: the masked losses ignore
    rows whose `itm_labels` is 0 (mismatched pairs)."""

    _tied_weights_keys = {"mlm_head.decoder.weight": "imagebert.embeddings.word_embeddings.weight"}

    def __init__(self, config: ImageBertConfig):
        super().__init__(config)
        self.imagebert = ImageBertModel(config)
        self.mlm_head = ImageBertPredictionHead(config, config.vocab_size)
        self.moc_head = ImageBertPredictionHead(config, config.num_object_classes)
        self.mrfr_head = ImageBertPredictionHead(config, config.visual_feature_dim)
        self.itm_head = nn.Linear(config.hidden_size, 1)
        self.itc_head = ImageBertContrastiveHead(config)
        self.post_init()

    # Fast paths (see `set_fast_paths`).
    fp32_mlm_decoder = True
    sparse_last_layer = True
    sparse_word_gradient = True

    def get_output_embeddings(self):
        return self.mlm_head.decoder

    def _mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MLM head on the labelled positions, (M, H) -> (M, V). Under autocast the decoder runs in fp32: casting its
        (V, H) tied weight to bf16 and its (V, H) gradient back at every step costs far more than the (M, H) x (H, V)
        product over the few masked positions."""
        device_type = hidden.device.type
        if not (self.fp32_mlm_decoder and torch.is_autocast_enabled(device_type)):
            return self.mlm_head(hidden)
        transformed = self.mlm_head.transform(hidden)
        with torch.autocast(device_type, enabled=False):
            return self.mlm_head.decoder(transformed.float())

    def set_output_embeddings(self, new_embeddings):
        self.mlm_head.decoder = new_embeddings

    def _check_label_shapes(
        self, input_ids, region_features, task_labels: Mapping[str, torch.Tensor | None]
    ) -> None:
        """Shape checks of the labels (free: no value is read); `task_labels` holds the label entries by batch key."""
        labels = task_labels["labels"]
        masked_regions = task_labels["masked_regions"]
        region_class_labels = task_labels["region_class_labels"]
        region_feature_targets = task_labels["region_feature_targets"]
        itm_labels = task_labels["itm_labels"]
        if itm_labels is not None:
            reference = next(
                (t for t in (input_ids, region_features) if t is not None), itm_labels.reshape(-1)
            )
            batch = reference.shape[0]
            if itm_labels.numel() != batch:
                raise ValueError(
                    f"itm_labels must have one label per pair, shape ({batch},); got {tuple(itm_labels.shape)}"
                )
        if labels is not None and (input_ids is None or labels.shape != input_ids.shape):
            raise ValueError(f"labels must have the shape of input_ids, got {tuple(labels.shape)}")
        if masked_regions is not None or region_class_labels is not None:
            if region_features is None:
                raise ValueError("masked_regions / region_class_labels were given without region_features")
            region_shape = region_features.shape[:2]
            for name, tensor in (
                ("masked_regions", masked_regions),
                ("region_class_labels", region_class_labels),
            ):
                if tensor is not None and tensor.shape != region_shape:
                    raise ValueError(
                        f"{name} must have shape {tuple(region_shape)}, got {tuple(tensor.shape)}"
                    )
        if region_feature_targets is not None:
            if masked_regions is None:
                raise ValueError("region_feature_targets need masked_regions to say which regions to regress")
            if region_feature_targets.shape != region_features.shape:
                raise ValueError(
                    f"region_feature_targets must have the shape of region_features {tuple(region_features.shape)}, "
                    f"got {tuple(region_feature_targets.shape)}"
                )

    def _head_positions(
        self,
        given: Mapping[str, torch.Tensor | None],
        task_labels: Mapping[str, torch.Tensor | None],
        matched: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        """Where each masked task's head reads the encoder: `{task: flat positions (M,)}` (see `forward`), None for a
        task whose labels are absent. `given` holds the collators' positions (computed on the CPU); a task without
        them gets them from its labels here, a host read of their count (a device synchronisation per task).
        Entries of mismatched pairs (`matched` False) are left out (conditional masking). `task_labels` holds the
        label entries by batch key."""
        for task in PRETRAINING_TASKS:
            positions = given.get(task.name)
            if positions is not None and (positions.dim() != 1 or positions.dtype.is_floating_point):
                raise ValueError(
                    f"{task.position_key} must be a 1-D integer tensor of flat indices (-100 = ignored), got shape "
                    f"{tuple(positions.shape)} {positions.dtype}"
                )

        def labelled(selected: torch.Tensor) -> torch.Tensor:
            return _flat_positions(selected if matched is None else selected & matched[:, None])

        positions = dict(given)
        if task_labels["labels"] is not None and positions["mlm"] is None:
            positions["mlm"] = labelled(task_labels["labels"] != -100)
        if task_labels["region_class_labels"] is not None and positions["moc"] is None:
            positions["moc"] = labelled(task_labels["region_class_labels"] != -100)
        if task_labels["region_feature_targets"] is not None and positions["mrfr"] is None:
            positions["mrfr"] = labelled(task_labels["masked_regions"].bool())
        for task in PRETRAINING_TASKS:  # a task without labels reads nothing
            if task.position_key is None:
                continue
            task_label = task_labels[task.label_keys[0]]
            # Labels of no element (a batch whose images have no region, which the schema allows) hold nothing
            # to read either: the head's placeholder row would index an empty label tensor. A shape, no sync.
            if task_label is None or task_label.numel() == 0:
                positions[task.name] = None
        return positions

    def _last_layer_positions(
        self,
        layout: _JointLayout,
        positions: Mapping[str, torch.Tensor | None],
        given: torch.Tensor | None,
        kwargs: dict,
    ) -> torch.Tensor | None:
        """The rows the last encoder layer computes (`last_layer_positions` of `ImageBertModel.forward`): the given
        ones (the collators'), else the heads' rows; the pooler's row alone when no masked task has positions (ITM
        or scoring); None (every row) with the fast path off or when hidden states or attentions are requested."""
        if not self.sparse_last_layer or _outputs_requested(self.config, kwargs):
            return None
        if given is not None:
            return given
        if all(task_positions is None for task_positions in positions.values()):
            return torch.zeros(layout.batch, 1, dtype=torch.long, device=layout.device)
        return layout.last_layer_mask(positions)

    def _word_gradient_can_be_sparse(self, labels) -> bool:
        """The word embeddings may return a sparse gradient only when the tied MLM decoder adds its dense one in the
        same backward pass (always so when MLM labels are given), so that the parameter's `.grad` stays dense."""
        weight = self.imagebert.embeddings.word_embeddings.weight
        return (
            self.sparse_word_gradient
            # Inductor cannot compile a sparse gradient; a compiled step fuses the dense one instead.
            and not torch.compiler.is_compiling()
            and labels is not None
            and torch.is_grad_enabled()
            and weight.requires_grad
            and self.mlm_head.decoder.weight is weight
        )

    def _masked_task_losses(
        self,
        last_hidden_state: torch.Tensor,
        layout: _JointLayout,
        positions: Mapping[str, torch.Tensor | None],
        matched: torch.Tensor | None,
        task_labels: Mapping[str, torch.Tensor | None],
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """MLM, MOC and MRFR, each head on its positions only -> (`{task: loss}`, `{task: head output}`) for the
        tasks with positions. Entries that are padding, unlabelled or of a mismatched pair do not count."""
        hidden = last_hidden_state.reshape(layout.batch * layout.length, -1)  # (B * L, H)
        losses, outputs = {}, {}
        if positions["mlm"] is not None:
            selected, index, valid = layout.rows(hidden, positions["mlm"], "text", matched)
            targets = task_labels["labels"].reshape(-1).index_select(0, index)
            outputs["mlm"] = self._mlm_logits(selected)  # (M, V)
            losses["mlm"] = masked_cross_entropy(outputs["mlm"], targets, valid & (targets != -100))
        if positions["moc"] is not None:
            selected, index, valid = layout.rows(hidden, positions["moc"], "regions", matched)
            targets = task_labels["region_class_labels"].reshape(-1).index_select(0, index)
            outputs["moc"] = self.moc_head(selected)  # (M, K)
            losses["moc"] = masked_cross_entropy(outputs["moc"], targets, valid & (targets != -100))
        if positions["mrfr"] is not None:
            selected, index, valid = layout.rows(hidden, positions["mrfr"], "regions", matched)
            targets = task_labels["region_feature_targets"].reshape(layout.batch * layout.num_regions, -1)
            targets = targets.index_select(0, index)  # (M, F)
            outputs["mrfr"] = self.mrfr_head(selected)  # (M, F)
            losses["mrfr"] = masked_feature_regression(outputs["mrfr"], targets, valid)
        return losses, outputs

    def _itc_loss(
        self,
        inputs: Mapping[str, torch.Tensor | None],
        task_labels: Mapping[str, torch.Tensor | None],
        itc_text_groups: torch.Tensor | None,
        itc_image_groups: torch.Tensor | None,
        matched: torch.Tensor | None,
    ) -> torch.Tensor:
        """The image-text contrastive loss of the batch's pairs, each text and image encoded alone and unmasked: MLM
        labels hold the original id at each selected token, the MRFR targets the original features (no host read:
        `where` keeps the shapes). Matched rows only count as positives."""
        input_ids, labels = inputs["input_ids"], task_labels["labels"]
        targets = task_labels["region_feature_targets"]
        text_ids = input_ids if labels is None else torch.where(labels != -100, labels, input_ids)
        features = inputs["region_features"] if targets is None else targets
        text_embeds = self.text_embeddings(text_ids, inputs["attention_mask"], inputs["token_type_ids"])
        image_embeds = self.image_embeddings(
            features,
            inputs["region_locations"],
            inputs["region_attention_mask"],
            inputs["global_image_features"],
        )
        return image_text_contrastive_loss(
            text_embeds, image_embeds, self.itc_head.scale(), itc_text_groups, itc_image_groups, matched
        )

    def _total_loss(self, losses: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The weighted sum of the task losses (weights from the config's `<task>_loss_weight`), None without any;
        the ITC head stays in the graph when its loss is absent."""
        if not losses:
            return None
        weights = {task.name: getattr(self.config, task.loss_weight_field) for task in PRETRAINING_TASKS}
        loss = weighted_loss(losses, weights)
        return loss if "itc" in losses else keep_in_graph(loss, self.itc_head)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.LongTensor | None = None,
        global_image_features: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        masked_regions: torch.BoolTensor | None = None,
        region_class_labels: torch.LongTensor | None = None,
        region_feature_targets: torch.FloatTensor | None = None,
        itm_labels: torch.LongTensor | None = None,
        mlm_positions: torch.LongTensor | None = None,
        moc_positions: torch.LongTensor | None = None,
        mrfr_positions: torch.LongTensor | None = None,
        last_layer_positions: torch.Tensor | None = None,
        itc_text_groups: torch.LongTensor | None = None,
        itc_image_groups: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageBertForPreTrainingOutput:
        r"""
        Inputs as `ImageBertModel.forward`, plus the labels (any subset; a task without labels is skipped):
        labels (`(B, T)`): MLM targets, -100 where not masked.
        masked_regions (`(B, R)` bool): regions masked by the collator (MRFR positions; MOC too if
            `region_class_labels` is absent).
        region_class_labels (`(B, R)`): MOC targets (detector class ids), -100 where not masked.
        region_feature_targets (`(B, R, F)`): MRFR targets, the original region features.
        itm_labels (`(B,)`): 1 for a matched pair, 0 for a mismatched one.
        mlm_positions (`(M,)`), moc_positions, mrfr_positions (`(K,)`): where each masked task reads the encoder, as
            flat indices into `labels.view(-1)` (B * T) and into the regions (B * R), -100 for padding entries.
            The collators compute them, so the step reads nothing back from the device; without them they are
            derived from the labels (a host synchronisation per task). Entries of mismatched pairs
            (`itm_labels` 0) never count (conditional masking).
        last_layer_positions: as `ImageBertModel.forward`; the collators pass the rows the heads read. Without it,
            the model derives them from the positions above. Ignored when the fast path is off or hidden states
            or attentions are requested.
        itc_text_groups, itc_image_groups (`(B,)` long): for the image-text contrastive task (on when
            `config.itc_loss_weight` > 0 and the batch has text and regions): the image group of each row's caption
            and of each row's image (rows showing or describing the same image share a group; see
            `image_text_contrastive_loss`). The pre-training collator computes them on the CPU; default: every row
            its own image. ITC encodes each row's text and image alone, unmasked (the MLM `labels` and
            `region_feature_targets` restore the masked tokens and regions), and counts matched rows only.
        """
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "region_features": region_features,
            "region_locations": region_locations,
            "region_attention_mask": region_attention_mask,
            "global_image_features": global_image_features,
        }
        task_labels = {
            "labels": labels,
            "masked_regions": masked_regions,
            "region_class_labels": region_class_labels,
            "region_feature_targets": region_feature_targets,
            "itm_labels": itm_labels,
        }
        self._check_label_shapes(input_ids, region_features, task_labels)
        if self.config.check_inputs:
            _check_label_values(self.config, task_labels)
        matched = None if itm_labels is None else itm_labels.reshape(-1) == 1  # (B,) conditional masking
        given = {"mlm": mlm_positions, "moc": moc_positions, "mrfr": mrfr_positions}
        positions = self._head_positions(given, task_labels, matched)
        layout = _JointLayout.of(input_ids, region_features, global_image_features)
        outputs = self.imagebert(
            **inputs,
            last_layer_positions=self._last_layer_positions(layout, positions, last_layer_positions, kwargs),
            sparse_word_gradient=self._word_gradient_can_be_sparse(labels),
            **kwargs,
        )
        itm_logits = self.itm_head(outputs.pooler_output).squeeze(-1)  # (B,)
        losses, heads = self._masked_task_losses(
            outputs.last_hidden_state, layout, positions, matched, task_labels
        )
        if itm_labels is not None:
            losses["itm"] = image_text_matching_loss(itm_logits, itm_labels)
        if self.config.itc_loss_weight > 0 and input_ids is not None and region_features is not None:
            losses["itc"] = self._itc_loss(inputs, task_labels, itc_text_groups, itc_image_groups, matched)
        return ImageBertForPreTrainingOutput(
            loss=self._total_loss(losses),
            **{task.loss_output: losses.get(task.name) for task in PRETRAINING_TASKS},
            itm_logits=itm_logits,
            mlm_logits=heads.get("mlm"),
            moc_logits=heads.get("moc"),
            mrfr_predictions=heads.get("mrfr"),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    def score(self, **inputs) -> torch.Tensor:
        """Zero-shot image-text matching score (the ITM logit) of each pair, `(B,)`. Takes the model inputs only."""
        return self(**inputs).itm_logits


class ImageBertForRetrieval(ImageBertContrastiveFeaturesMixin, ImageBertPreTrainedModel):
    """ImageBERT with a matching-score head on the pooled [CLS] for image-text retrieval (§4.4). The head is named
    like the pre-training ITM head (`itm_head`), so loading a pre-training checkpoint initialises it from ITM."""

    # The masked tasks' heads (`<task>_head`) of a pre-training checkpoint are expected to be left behind.
    _keys_to_ignore_on_load_unexpected = [
        rf"^({'|'.join(task.name for task in PRETRAINING_TASKS if task.masked)})_head\."
    ]

    # Fast path (see `set_fast_paths`).
    sparse_last_layer = True

    def __init__(self, config: ImageBertConfig):
        super().__init__(config)
        self.imagebert = ImageBertModel(config)
        self.itm_head = nn.Linear(config.hidden_size, 1)
        self.itc_head = ImageBertContrastiveHead(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        region_features: torch.FloatTensor | None = None,
        region_locations: torch.FloatTensor | None = None,
        region_attention_mask: torch.LongTensor | None = None,
        global_image_features: torch.FloatTensor | None = None,
        labels: torch.Tensor | None = None,
        num_candidates: int | None = None,
        itc_image_groups: torch.LongTensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> ImageBertForRetrievalOutput:
        r"""
        Inputs as `ImageBertModel.forward`, plus:
        labels (`(B,)`): 1 for matched pairs, 0 for negatives; laid out as contiguous groups of P candidates with one
            positive each when the configured loss includes `ce`, `triplet` or `itc`.
        num_candidates (`int`): P; inferred as B / number of positives when omitted.
        itc_image_groups (`(B / P,)` long): for the `itc` loss, the image group of each group's positive pair
            (rows 0, P, 2P, ...): positives showing the same image are not each other's negatives. Default: all
            distinct. The retrieval collator computes them.

        One side against many: text inputs of batch 1 with image inputs of batch n (or the reverse, or 1 and 1)
        score the single side against each row of the other (it is broadcast); `logits` is then `(n,)` and the
        output also carries `logits_per_image` `(n_images, n_texts)` and `logits_per_text`, scored as
        `config.zero_shot_score` says. This is how the zero-shot image classification pipeline calls the model.
        """
        given = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "token_type_ids": token_type_ids,
            "region_features": region_features,
            "region_locations": region_locations,
            "region_attention_mask": region_attention_mask,
            "global_image_features": global_image_features,
        }
        inputs, grid = _broadcast_one_to_many(given)
        input_ids, attention_mask, token_type_ids = (inputs[name] for name in _TEXT_INPUTS)
        region_features, region_locations, region_attention_mask, global_image_features = (
            inputs[name] for name in _IMAGE_INPUTS
        )
        last_layer_positions = None
        if self.sparse_last_layer and not _outputs_requested(self.config, kwargs):
            # The score reads the pooler only: the last layer runs at the first position.
            reference = next(t for t in (input_ids, region_features, global_image_features) if t is not None)
            last_layer_positions = torch.zeros(
                reference.shape[0], 1, dtype=torch.long, device=reference.device
            )
        outputs = self.imagebert(**inputs, last_layer_positions=last_layer_positions, **kwargs)
        logits = self.itm_head(outputs.pooler_output).squeeze(-1)  # (B,)
        logits_per_image, logits_per_text = (
            (None, None) if grid is None else self._grid_logits(logits, grid, given)
        )
        loss, terms = None, {}
        if labels is not None:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"labels must have shape {tuple(logits.shape)} (one per pair), got {tuple(labels.shape)}"
                )
            if self.config.check_inputs:
                _check_binary_labels("labels", labels)
            weights = parse_retrieval_loss(self.config.retrieval_loss)
            terms = retrieval_losses(
                logits,
                labels,
                weights,
                float(self.config.triplet_margin),
                num_candidates,
                check_groups=num_candidates is None or self.config.check_inputs,
            )
            if "itc" in weights:
                terms["itc"] = self._positives_itc_loss(
                    input_ids,
                    attention_mask,
                    token_type_ids,
                    region_features,
                    region_locations,
                    region_attention_mask,
                    global_image_features,
                    labels,
                    num_candidates,
                    itc_image_groups,
                )
            loss = weighted_loss(terms, weights)
            if "itc" not in terms:
                loss = keep_in_graph(loss, self.itc_head)
        return ImageBertForRetrievalOutput(
            loss=loss,
            logits=logits,
            binary_loss=terms.get("binary"),
            ce_loss=terms.get("ce"),
            triplet_loss=terms.get("triplet"),
            itc_loss=terms.get("itc"),
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
        )

    def _positives_itc_loss(
        self,
        input_ids,
        attention_mask,
        token_type_ids,
        region_features,
        region_locations,
        region_attention_mask,
        global_image_features,
        labels,
        num_candidates,
        itc_image_groups,
    ) -> torch.Tensor:
        """ITC over the positive pairs of the candidate groups (rows 0, P, 2P, ...), each encoded unimodally."""
        if input_ids is None or region_features is None:
            raise ValueError("the itc retrieval loss needs both input_ids and region_features")
        group = candidate_group_size(
            labels,
            num_candidates,
            "the itc retrieval loss needs contiguous groups of P candidates, the positive first",
        )

        def first_rows(tensor):
            return None if tensor is None else tensor[::group]  # (G, ...) each group's positive

        text_embeds = self.text_embeddings(
            first_rows(input_ids), first_rows(attention_mask), first_rows(token_type_ids)
        )
        image_embeds = self.image_embeddings(
            first_rows(region_features),
            first_rows(region_locations),
            first_rows(region_attention_mask),
            first_rows(global_image_features),
        )
        return image_text_contrastive_loss(text_embeds, image_embeds, self.itc_head.scale(), itc_image_groups)

    def score(self, **inputs) -> torch.Tensor:
        """Matching score of each (text, image) pair, `(B,)`. Takes the model inputs only."""
        return self(**inputs).logits


# Each class saves its code beside its weights; `save_pretrained` writes the auto_map of all three (see
# `ImageBertPreTrainedModel.save_pretrained`). transformers has no retrieval Auto class: the retrieval model, a
# one-logit pair classifier, is served as AutoModelForSequenceClassification.
ImageBertConfig.register_for_auto_class()
ImageBertModel.register_for_auto_class("AutoModel")
ImageBertForPreTraining.register_for_auto_class("AutoModelForPreTraining")
ImageBertForRetrieval.register_for_auto_class("AutoModelForSequenceClassification")

__all__ = [
    "ImageBertContrastiveHead",
    "ImageBertForPreTraining",
    "ImageBertForRetrieval",
    "ImageBertModel",
    "ImageBertPreTrainedModel",
]
