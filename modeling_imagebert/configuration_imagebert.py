"""ImageBERT model configuration."""

import dataclasses
import difflib
import re
from collections.abc import Iterable

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

from .tasks_imagebert import PRETRAINING_TASKS

logger = logging.get_logger(__name__)

RETRIEVAL_LOSSES = ("binary", "ce", "triplet", "itc")
# What `logits_per_image` / `logits_per_text` hold (the zero-shot pipeline's scores); see `zero_shot_score`.
ZERO_SHOT_SCORES = ("itm", "itm+itc", "itc")
# How a region token is embedded: the paper's (ImageBERT) or UNITER's (Chen et al., 2020), for converted weights.
REGION_EMBEDDING_TYPES = ("imagebert", "uniter")
_LOSS_TERM = re.compile(
    r"^\s*(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<name>[a-z]+)\s*$"
)


def parse_retrieval_loss(spec: str) -> dict[str, float]:
    """Parse a retrieval loss spec into `{loss_name: weight}`.

    `spec` is one of `binary`, `ce` (multi-class cross-entropy over the P candidates of a positive), `triplet`
    (hinge against the hardest sampled negative) and `itc` (image-text contrastive loss on the groups' positive
    pairs), or a `+`-joined weighted sum of them such as `"binary+0.5*triplet"` or `"binary+itc"`. Raises `ValueError` naming the bad term.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"retrieval_loss must be a non-empty string such as 'binary' or 'binary+0.5*ce', got {spec!r}"
        )
    weights: dict[str, float] = {}
    for term in spec.split("+"):
        match = _LOSS_TERM.match(term)
        if match is None or match["name"] not in RETRIEVAL_LOSSES:
            raise ValueError(
                f"retrieval_loss: cannot read the term {term.strip()!r} of {spec!r}; expected NAME or WEIGHT*NAME "
                f"with NAME in {RETRIEVAL_LOSSES}"
            )
        if match["name"] in weights:
            raise ValueError(f"retrieval_loss: {match['name']!r} appears twice in {spec!r}")
        weight = float(match["weight"]) if match["weight"] else 1.0
        # A zero weight trains nothing of that term and an overflowing one ("1e999") is infinite: both are typos.
        if not 0.0 < weight < float("inf"):
            raise ValueError(
                f"retrieval_loss: the weight of {match['name']!r} in {spec!r} is {weight:g}; expected a positive "
                "finite number (leave the term out to turn it off)"
            )
        weights[match["name"]] = weight
    return weights


@strict(accept_kwargs=True)
class ImageBertConfig(PreTrainedConfig):
    r"""
    Configuration of an ImageBERT model (Qi et al., 2020): a single-stream BERT over `[CLS] text [SEP]` followed by
    detector region tokens. Defaults reproduce the paper: BERT-base (12 layers, hidden 768, 12 heads), 100 regions
    of 2048-d Faster R-CNN features with 1600 Visual Genome object classes, and a total length of 144.

    Text encoder (as `BertConfig`, and initialisable from a BERT checkpoint):
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
        hidden_dropout_prob, attention_probs_dropout_prob, max_position_embeddings, type_vocab_size,
        initializer_range, layer_norm_eps, pad_token_id.

    Regions:
        visual_feature_dim (`int`, 2048): dimension of each region feature (pooled RoI feature).
        num_object_classes (`int`, 1600): detector classes, the targets of masked object classification.
        max_regions (`int`, 100): most region tokens per image.
        max_text_length (`int`, 44): most text tokens including [CLS] and [SEP]; with `max_regions` it makes the
            paper's input length of 144.
        region_position_id (`int`, default `max_position_embeddings - 1`, 511 for BERT's table): the fixed dummy
            sequence position shared by all region tokens (regions have no order); must be below
            `max_position_embeddings`.
        region_segment_id (`int`, 1): segment (token type) id of region tokens; text uses 0.
        use_global_image_feature (`bool`, False): add one global-image token before the regions (paper ablation).
        global_image_feature_dim (`int`, 2048): dimension of that global feature.
        region_embedding_type (`str`, "imagebert"): how a region token is embedded. "imagebert" (the paper's):
            LN'(W_v v + W_c c + segment + position[region_position_id]). "uniter" (UNITER's, for weights converted
            with `modeling_imagebert.pretraining.convert_uniter`): LN'(LN_v(W_v v) + LN_c(W_c c) + segment), two
            more LayerNorms and no position embedding for regions (`region_position_id` is then unused). The
            global-image token, when used, is built like a region either way.

    Pre-training losses (weighted sum; a task whose labels are absent from a batch is skipped): one
    `<task>_loss_weight` per row of the task table (`tasks_imagebert.PRETRAINING_TASKS`):
        mlm_loss_weight, moc_loss_weight, mrfr_loss_weight, itm_loss_weight (`float`, 1.0 each).

    Image-text contrastive embeddings (two-stage retrieval; `get_text_features` / `get_image_features`):
        projection_dim (`int`, 256): size of the L2-normalised text and image embeddings.
        itc_loss_weight (`float`, 0.0): weight of the in-batch image-text contrastive (ITC) loss in pre-training;
            0.0 (the paper's recipe) leaves it off.

    Retrieval fine-tuning:
        retrieval_loss (`str`, "binary"): `binary`, `ce`, `triplet`, `itc`, or a weighted sum such as
            `"binary+0.5*ce"` or `"binary+itc"`.
        triplet_margin (`float`, 0.2): hinge margin of the triplet loss.

    One image against many texts (or one text against many images), as the zero-shot pipeline calls the model:
        zero_shot_score (`str`, "itm"): what `logits_per_image` / `logits_per_text` hold when one side of the call
            has batch size 1 and is broadcast: "itm" (the paper's matching logit, `ImageBertForRetrieval`'s
            score), "itc" (the contrastive logit, `exp(logit_scale)` times the cosine of the
            `get_text_features` / `get_image_features` embeddings) or "itm+itc" (their sum).

    Debugging:
        check_inputs (`bool`, False): also check input and label VALUES in `forward` (NaN/Inf features, locations
            outside [0, 1], token, class and ITM/retrieval label ranges, one positive per candidate group). Each
            check reads tensor values on the host, a device synchronisation per step, so it is off by default: the
            processor and collators check the same values where the data enters.

    Extra attributes (keys of a newer transformers, of a quantisation or PEFT tool) are kept and round-trip, as with
    every `PreTrainedConfig`; one that resembles a field (`num_hiden_layers`) logs a warning naming the field. Where a
    person types field names (recipes, `--set`, flags), `ImageBertConfig.check_field_names` refuses unknown ones.
    Cross-field rules a model needs (hidden_size a multiple of num_attention_heads) are checked by the model.

    Example:

    ```python
    >>> from modeling_imagebert import ImageBertConfig, ImageBertModel
    >>> model = ImageBertModel(ImageBertConfig())
    ```
    """

    model_type = "imagebert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.1
    attention_probs_dropout_prob: float | int = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int | None = 0
    tie_word_embeddings: bool = True

    visual_feature_dim: int = 2048
    num_object_classes: int = 1600
    max_regions: int = 100
    max_text_length: int = 44
    region_position_id: int | None = None
    region_segment_id: int = 1
    use_global_image_feature: bool = False
    global_image_feature_dim: int = 2048
    region_embedding_type: str = "imagebert"

    mlm_loss_weight: float | int = 1.0
    moc_loss_weight: float | int = 1.0
    mrfr_loss_weight: float | int = 1.0
    itm_loss_weight: float | int = 1.0

    projection_dim: int = 256
    itc_loss_weight: float | int = 0.0

    retrieval_loss: str = "binary"
    triplet_margin: float | int = 0.2
    zero_shot_score: str = "itm"

    check_inputs: bool = False

    def __post_init__(self, **kwargs):
        if (
            self.region_position_id is None
        ):  # the last position: 511 for BERT's 512, and follows a smaller table
            self.region_position_id = self.max_position_embeddings - 1
        # Like every `PreTrainedConfig`, extra attributes are kept (a newer transformers, a quantisation or PEFT
        # tool, or transformers' own test tooling adds them); only a likely misspelling of a field is flagged.
        for key in kwargs:
            close = _closest_field(key) if not hasattr(PreTrainedConfig, key) else None
            if close is not None:
                logger.warning(
                    f"ImageBertConfig: unknown attribute {key!r} kept as an extra attribute; did you mean "
                    f"{close!r}?"
                )
        super().__post_init__(**kwargs)

    @classmethod
    def check_field_names(cls, names: Iterable[str], where: str = "ImageBertConfig") -> None:
        """Refuse names that are not fields of the config: for places where a person types field names (a recipe's
        `model:` overrides, `--set`, command-line flags), where a typo must not become a silent extra attribute.

        Inputs: `names`, the field names typed; `where`, the place to name in the error (e.g. `"model.overrides"`).
        Raises `ValueError` naming the first unknown field and the closest known one.
        """
        for name in names:
            if name not in _field_names():
                close = _closest_field(name)
                hint = f"did you mean {close!r}?" if close else f"expected one of {sorted(_field_names())}"
                raise ValueError(f"{where}.{name}: not an ImageBertConfig field; {hint}")

    @property
    def retrieval_loss_weights(self) -> dict[str, float]:
        return parse_retrieval_loss(self.retrieval_loss)

    def validate_imagebert(self):
        """Part of `@strict` validation: value ranges and cross-field rules."""
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "visual_feature_dim",
            "num_object_classes",
            "max_position_embeddings",
            "vocab_size",
            "projection_dim",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ImageBertConfig.{name} must be positive, got {getattr(self, name)}")
        # An image needs at least one region token: with none a batch's region width is 0 and the region heads,
        # which index regions by position // width, divide by zero.
        if self.max_regions < 1 or self.max_text_length < 2:
            raise ValueError(
                f"ImageBertConfig: max_regions must be >= 1 and max_text_length >= 2 ([CLS] and [SEP]), got "
                f"{self.max_regions} and {self.max_text_length}"
            )
        if self.max_text_length > self.max_position_embeddings:
            raise ValueError(
                f"ImageBertConfig.max_text_length ({self.max_text_length}) exceeds max_position_embeddings "
                f"({self.max_position_embeddings})"
            )
        if not 0 <= self.region_position_id < self.max_position_embeddings:
            raise ValueError(
                f"ImageBertConfig.region_position_id must be in [0, max_position_embeddings={self.max_position_embeddings}),"
                f" got {self.region_position_id}"
            )
        if not 0 <= self.region_segment_id < self.type_vocab_size:
            raise ValueError(
                f"ImageBertConfig.region_segment_id must be in [0, type_vocab_size={self.type_vocab_size}), got "
                f"{self.region_segment_id}"
            )
        for name in (*(task.loss_weight_field for task in PRETRAINING_TASKS), "triplet_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"ImageBertConfig.{name} must be >= 0, got {getattr(self, name)}")
        parse_retrieval_loss(self.retrieval_loss)
        if self.region_embedding_type not in REGION_EMBEDDING_TYPES:
            raise ValueError(
                f"ImageBertConfig.region_embedding_type must be one of {REGION_EMBEDDING_TYPES}, got "
                f"{self.region_embedding_type!r}"
            )
        if self.zero_shot_score not in ZERO_SHOT_SCORES:
            raise ValueError(
                f"ImageBertConfig.zero_shot_score must be one of {ZERO_SHOT_SCORES}, got {self.zero_shot_score!r}"
            )

    @property
    def max_sequence_length(self) -> int:
        """Longest joint input: text, the optional global-image token, and regions (144 for the paper)."""
        return self.max_text_length + int(self.use_global_image_feature) + self.max_regions


def _field_names() -> frozenset[str]:
    """The fields a person may set: ImageBERT's own, those every `PreTrainedConfig` declares, and its public
    settable properties (`output_attentions`, `num_labels`)."""
    settable = {
        name
        for name, value in vars(PreTrainedConfig).items()
        if isinstance(value, property) and value.fset is not None and not name.startswith("_")
    }
    return frozenset(field.name for field in dataclasses.fields(ImageBertConfig)) | settable


def _closest_field(name: str) -> str | None:
    """The declared field `name` most likely misspells (`num_hiden_layers` -> `num_hidden_layers`), or None."""
    if (
        name.startswith("_") or name in _field_names()
    ):  # private bookkeeping (`_name_or_path`, ...) is no typo
        return None
    matches = difflib.get_close_matches(name, sorted(_field_names()), n=1, cutoff=0.85)
    return matches[0] if matches else None


__all__ = ["ImageBertConfig"]
