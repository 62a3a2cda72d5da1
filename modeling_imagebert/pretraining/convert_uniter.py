"""Convert a UNITER or VILLA checkpoint (`uniter-base.pt`, `villa-large.pt`, ...) into an `ImageBertForPreTraining`
folder, exactly: the converted model computes what UNITER computes on the same regions and text.

    python -m modeling_imagebert.pretraining.convert_uniter uniter-base.pt imagebert-uniter-base \\
        --tokenizer bert-base-cased/

UNITER (ChenRocks/UNITER) and VILLA (zhegan27/VILLA) are single-stream BERTs over the same bottom-up-attention region
features; they differ from ImageBERT where each is converted exactly:

- Region embedding: UNITER's `LN(LN(img_linear(f)) + LN(pos_linear(p7)) + token_type[1])`, no position embedding:
  the config's `region_embedding_type="uniter"` (two more LayerNorms, no dummy position).
- Location: UNITER's 7-D `[x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)(h/H)]` is linear in our 5-D
  `(x1/W, y1/H, x2/W, y2/H, (x2-x1)(y2-y1)/(W*H))` (w = x2 - x1, h = y2 - y1), so `pos_linear`'s (H, 7) weight
  folds into a (H, 5) one: `[W0 - W4, W1 - W5, W2 + W4, W3 + W5, W6]`, bias unchanged.
- ITM: a 2-way softmax there, one logit here: `--itm-logit probability` (default) writes `w1 - w0, b1 - b0`, so
  sigmoid(logit) is UNITER's softmax P(matched); `--itm-logit rank` writes UNITER's retrieval score
  (`rank_output`, or `itm_output`'s matched row as its inf_itm.py does zero-shot), the one its tables rank by.
- Region classifier: 1601 classes with background at 0 -> our 1600 object classes (row 0 dropped: our class k is
  its k + 1, as our importers read `soft_labels[:, 1:]`).
- MRFR: UNITER ties its output weight to `img_linear`'s; ours is a Linear of its own, set to the transpose.
- MLM: BERT's head, the decoder tied to the word embeddings as ours.

Every source key is mapped (copied, or transformed and named with what was done), dropped with the reason
(`mask_embedding`: UNITER's learned vector for masked regions in its pre-training; our collator zeroes masked
regions), or reported as unmapped; every weight of ours the source lacks is reported missing, except the ITC
head's, which UNITER never had (newly initialised; unused unless ITC is trained). Nothing is written unless both
lists are empty (`--allow-partial` writes anyway).

The checkpoint is read with `torch.load(weights_only=True)`: a pickle that would run code is refused, and nothing is
written. The output folder (model, processor with the cased tokenizer `--tokenizer`, model card naming the source
and licence, `conversion_report.json`) is built beside its target and renamed into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_folder
from ..cli import run_cli
from ..cli_arguments import DefaultsHelpFormatter
from ..configuration_imagebert import ImageBertConfig
from ..safe_loading import NotRegularFileError, WeightsFileError, load_torch_file
from .model_card import architecture_section

REPORT_NAME = "conversion_report.json"
ITM_LOGITS = ("probability", "rank")
# UNITER's two released sizes (config/uniter-base.json, uniter-large.json); VILLA uses the same.
UNITER_SIZES = {
    "base": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
    },
    "large": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
    },
}
UNITER_VOCAB_SIZE = 28996  # bert-base-cased
# UNITER's fine-tuning text limit (max_txt_len 60 word pieces) plus [CLS] and [SEP]; its evaluation keeps every
# caption, and Flickr30k / COCO captions fit.
DEFAULT_MAX_TEXT_LENGTH = 62
DEFAULT_MAX_REGIONS = 100  # UNITER's max_bb
# The weights ImageBERT has and UNITER never had: the image-text contrastive head (initialised as ImageBERT's).
NEW_IN_IMAGEBERT = (
    "itc_head.text_projection.weight",
    "itc_head.image_projection.weight",
    "itc_head.logit_scale",
)
_PREFIX = "uniter."
_IMG = f"{_PREFIX}img_embeddings."
_DROPPED = {
    f"{_IMG}mask_embedding.weight": "UNITER's learned vector added to masked regions in its pre-training "
    "(our collator zeroes masked regions instead); unused in inference",
}


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message is one line naming the file and what is wrong."""


@dataclass
class ConversionReport:
    """What the conversion did with every key. `ok` when nothing is unmapped or missing."""

    source: str = ""
    size: str = ""
    itm_logit: str = "probability"
    copied: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)
    transformed: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    source_dtypes: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unmapped and not self.missing

    def summary(self) -> str:
        lines = [
            f"{self.source} (UNITER {self.size}): {len(self.copied)} copied, {len(self.transformed)} transformed, "
            f"{len(self.dropped)} dropped, {len(self.unmapped)} unmapped, {len(self.missing)} missing, "
            f"{len(self.new)} new (not in UNITER)"
        ]
        lines += [f"  transformed {key}: {note}" for key, note in self.transformed.items()]
        lines += [f"  dropped {key}: {note}" for key, note in self.dropped.items()]
        lines += [f"  UNMAPPED {key}" for key in self.unmapped]
        lines += [f"  MISSING {key}" for key in self.missing]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def read_uniter_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a UNITER / VILLA checkpoint by name, read with `torch.load(weights_only=True)`.

    A `{"model": ...}` / `{"state_dict": ...}` wrapper and a `module.` prefix are unwrapped; legacy LayerNorm
    `gamma` / `beta` names become `weight` / `bias` (as UNITER's own `from_pretrained` does). Raises
    `ConversionError` (one line) for a missing file, a pickle that names anything but tensors and plain containers
    (it would run code when fully unpickled: refused), or a file that holds no mapping of tensors."""
    path = str(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file")
    try:
        # The project's one weights-only loader: a pickle naming anything but tensors and plain containers, a
        # truncated or foreign file, a FIFO: one line naming the file.
        raw = load_torch_file(path, "a UNITER / VILLA checkpoint (a weights-only torch state dict)")
    except (WeightsFileError, NotRegularFileError) as error:
        raise ConversionError(str(error)) from None
    for wrapper in ("model", "state_dict"):
        if isinstance(raw, dict) and isinstance(raw.get(wrapper), dict):
            raw = raw[wrapper]
    if not isinstance(raw, dict) or not raw:
        raise ConversionError(f"{path}: expected a state dict (names -> tensors), got {type(raw).__name__}")
    tensors = {}
    for key, value in raw.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: key {key!r} holds {type(value).__name__}, expected a tensor")
        key = str(key).removeprefix("module.")
        key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
        key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
        tensors[key] = value
    return tensors


def _shape(tensors: dict[str, torch.Tensor], key: str, path: str) -> tuple[int, ...]:
    if key not in tensors:
        raise ConversionError(f"{path}: the UNITER checkpoint lacks {key!r}, needed to read its architecture")
    return tuple(tensors[key].shape)


def check_is_uniter(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Raises `ConversionError` (one line) unless `tensors` look like UNITER's: its `uniter.` encoder with an image
    embedding whose location projection takes 7 inputs."""
    needed = (
        f"{_PREFIX}embeddings.word_embeddings.weight",
        f"{_IMG}img_linear.weight",
        f"{_IMG}pos_linear.weight",
    )
    if not all(key in tensors for key in needed):
        prefixes = sorted({key.split(".")[0] for key in tensors})
        raise ConversionError(
            f"{path}: not a UNITER or VILLA checkpoint: it lacks {[k for k in needed if k not in tensors][0]!r} "
            f"(its keys start with {prefixes[:6]}); expected the state dict of UNITER's UniterForPretraining or "
            "UniterForImageTextRetrieval"
        )
    location = tuple(tensors[f"{_IMG}pos_linear.weight"].shape)
    if len(location) != 2 or location[1] != 7:
        raise ConversionError(
            f"{path}: {_IMG}pos_linear.weight has shape {location}, expected (hidden, 7): UNITER's 7-D box location"
        )


def infer_config(
    tensors: dict[str, torch.Tensor],
    path: str,
    *,
    size: str | None = None,
    num_attention_heads: int | None = None,
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
    max_regions: int = DEFAULT_MAX_REGIONS,
) -> tuple[ImageBertConfig, str]:
    """The `ImageBertConfig` a UNITER checkpoint implies, and the size's name ("base", "large" or "custom").

    The sizes are read off the tensors (hidden size, layers, intermediate size, vocabulary, positions, feature
    dimension, object classes); the number of attention heads, which no shape shows, is the released size's
    (base 12, large 16), or `num_attention_heads` for any other. `size` ("base" / "large"), when given, must
    match the checkpoint: a large checkpoint passed as base is refused."""
    vocab_size, hidden = _shape(tensors, f"{_PREFIX}embeddings.word_embeddings.weight", path)
    layers = {
        int(m.group(1)) for key in tensors if (m := re.match(rf"{_PREFIX}encoder\.layer\.(\d+)\.", key))
    }
    intermediate = _shape(tensors, f"{_PREFIX}encoder.layer.0.intermediate.dense.weight", path)[0]
    read = {"hidden_size": hidden, "num_hidden_layers": len(layers), "intermediate_size": intermediate}
    found = next(
        (name for name, spec in UNITER_SIZES.items() if all(spec[k] == v for k, v in read.items())), "custom"
    )

    def describe(spec: dict) -> str:
        return f"hidden {spec['hidden_size']}, {spec['num_hidden_layers']} layers"

    if size is not None:
        if size not in UNITER_SIZES:
            raise ConversionError(f"--size {size!r}: expected one of {sorted(UNITER_SIZES)}")
        if found != size:
            raise ConversionError(
                f"{path}: a UNITER-{found} checkpoint ({describe(read)}), not {size} ({describe(UNITER_SIZES[size])}) "
                f"as --size {size} says"
            )
    if num_attention_heads is None:
        if found == "custom":
            raise ConversionError(
                f"{path}: {describe(read)} is neither UNITER-base nor -large, and no shape tells the number of "
                "attention heads: pass --num-attention-heads"
            )
        num_attention_heads = UNITER_SIZES[found]["num_attention_heads"]
    max_positions, _ = _shape(tensors, f"{_PREFIX}embeddings.position_embeddings.weight", path)
    type_vocab, _ = _shape(tensors, f"{_PREFIX}embeddings.token_type_embeddings.weight", path)
    _, feature_dim = _shape(tensors, f"{_IMG}img_linear.weight", path)
    classifier = tensors.get("region_classifier.net.3.weight")
    config = ImageBertConfig(
        vocab_size=vocab_size,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=max_positions,
        type_vocab_size=type_vocab,
        visual_feature_dim=feature_dim,
        # Background (row 0 of UNITER's classifier) is no class of ours.
        num_object_classes=classifier.shape[0] - 1 if classifier is not None else 1600,
        max_regions=max_regions,
        max_text_length=max_text_length,
        region_embedding_type="uniter",
        region_segment_id=1,  # UNITER's img_type_ids are ones
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        pad_token_id=0,
        **read,
    )
    return config, found


# ----------------------------------------------------------------------------------------------------------------------
# Mapping
# ----------------------------------------------------------------------------------------------------------------------


def fold_location_weight(weight: torch.Tensor) -> torch.Tensor:
    """UNITER's (H, 7) location weight as the (H, 5) weight over our 5-D location that gives the same product.

    With w = x2 - x1 and h = y2 - y1 (normalised), W.p7 = W0 x1 + W1 y1 + W2 x2 + W3 y2 + W4 (x2 - x1) +
    W5 (y2 - y1) + W6 a = (W0 - W4) x1 + (W1 - W5) y1 + (W2 + W4) x2 + (W3 + W5) y2 + W6 a, where our fifth
    component a = (x2 - x1)(y2 - y1) / (W H) is UNITER's seventh, (w/W)(h/H). Computed in float64."""
    w = weight.double()
    return torch.stack(
        [w[:, 0] - w[:, 4], w[:, 1] - w[:, 5], w[:, 2] + w[:, 4], w[:, 3] + w[:, 5], w[:, 6]], dim=1
    )


_RENAMES = (
    (rf"^{_PREFIX}embeddings\.", "imagebert.embeddings."),
    (rf"^{_PREFIX}encoder\.", "imagebert.encoder."),
    (rf"^{_PREFIX}pooler\.", "imagebert.pooler."),
    (rf"^{_IMG}img_linear\.", "imagebert.embeddings.region_feature_projection."),
    (rf"^{_IMG}img_layer_norm\.", "imagebert.embeddings.region_feature_LayerNorm."),
    (rf"^{_IMG}pos_layer_norm\.", "imagebert.embeddings.region_location_LayerNorm."),
    (rf"^{_IMG}pos_linear\.bias$", "imagebert.embeddings.region_location_projection.bias"),
    (rf"^{_IMG}LayerNorm\.", "imagebert.embeddings.region_LayerNorm."),
    (r"^cls\.predictions\.transform\.", "mlm_head.transform."),
    (r"^cls\.predictions\.bias$", "mlm_head.decoder.bias"),
    (r"^feat_regress\.net\.0\.", "mrfr_head.transform.dense."),
    (r"^feat_regress\.net\.2\.", "mrfr_head.transform.LayerNorm."),
    (r"^feat_regress\.bias$", "mrfr_head.decoder.bias"),
    (r"^region_classifier\.net\.0\.", "moc_head.transform.dense."),
    (r"^region_classifier\.net\.2\.", "moc_head.transform.LayerNorm."),
)


def map_uniter_state_dict(
    tensors: dict[str, torch.Tensor], itm_logit: str = "probability"
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """UNITER's tensors as `ImageBertForPreTraining`'s (region_embedding_type "uniter"), float32.

    Args:
        tensors: UNITER's state dict (see `read_uniter_checkpoint`).
        itm_logit: "probability" (sigmoid of the ITM logit is UNITER's softmax P(matched)) or "rank" (UNITER's
            retrieval score: `rank_output`, else `itm_output`'s matched row).

    Returns:
        (our state dict without the tied MLM decoder weight, the report with `copied`, `transformed`, `dropped`,
        `unmapped`; `missing` and `new` are filled by `convert_uniter` against the model).
    """
    if itm_logit not in ITM_LOGITS:
        raise ConversionError(f"--itm-logit {itm_logit!r}: expected one of {ITM_LOGITS}")
    report = ConversionReport(itm_logit=itm_logit)
    out: dict[str, torch.Tensor] = {}

    def put(target: str, value: torch.Tensor, source: str, note: str | None = None) -> None:
        out[target] = value.to(torch.float32).contiguous()
        if note is None:
            report.copied.append(source)
        else:
            report.transformed[source] = note

    words_key = f"{_PREFIX}embeddings.word_embeddings.weight"
    for key, value in tensors.items():
        if key in _DROPPED:
            report.dropped[key] = _DROPPED[key]
        elif key == f"{_IMG}pos_linear.weight":
            put(
                "imagebert.embeddings.region_location_projection.weight",
                fold_location_weight(value),
                key,
                "7-D location folded into 5-D: [W0-W4, W1-W5, W2+W4, W3+W5, W6]",
            )
        elif key == "cls.predictions.decoder.weight":
            if value.device.type != "meta" and not torch.equal(value, tensors[words_key]):
                raise ConversionError(
                    "cls.predictions.decoder.weight differs from the word embeddings: UNITER ties them, and so does "
                    "ImageBERT; this checkpoint cannot be converted exactly"
                )
            report.dropped[key] = "tied to the word embeddings (as UNITER's)"
        elif key == "feat_regress.weight":
            put(
                "mrfr_head.decoder.weight",
                value.T,
                key,
                "UNITER's MRFR output (tied to img_linear) transposed",
            )
        elif key.startswith("region_classifier.net.3."):
            put(
                f"moc_head.decoder.{key.rsplit('.', 1)[1]}",
                value[1:],
                key,
                "background class (row 0) dropped",
            )
        elif key.startswith("itm_output.") or key.startswith("rank_output."):
            _map_itm(key, value, tensors, itm_logit, put, report)
        else:
            for pattern, replacement in _RENAMES:
                if re.match(pattern, key):
                    target = re.sub(pattern, replacement, key)
                    put(target, value, key)
                    report.renamed[key] = target
                    break
            else:
                report.unmapped.append(key)
    if "mrfr_head.decoder.weight" not in out and "feat_regress.net.0.weight" in tensors:
        # A state dict saved without the tied duplicate: UNITER's MRFR output weight is img_linear's.
        put(
            "mrfr_head.decoder.weight",
            tensors[f"{_IMG}img_linear.weight"].T,
            "(derived) feat_regress.weight",
            "img_linear.weight transposed (UNITER ties them)",
        )
    return out, report


def _map_itm(key, value, tensors, itm_logit, put, report) -> None:
    """The ITM head from UNITER's 2-way `itm_output` (and a fine-tuned `rank_output`), per `itm_logit`."""
    kind, part = key.split(".", 1)
    target = f"itm_head.{part}"
    if kind == "rank_output":
        if itm_logit == "rank":
            put(target, value, key, "UNITER's fine-tuned retrieval score")
        else:
            report.dropped[key] = "UNITER's fine-tuned ranking head; --itm-logit rank uses it"
        return
    if itm_logit == "probability":
        put(target, value[1:2] - value[0:1], key, "2-way softmax -> one logit: matched - mismatched row")
    elif "rank_output.weight" in tensors:
        report.dropped[key] = "the pre-training ITM head; --itm-logit rank uses rank_output"
    else:
        put(
            target,
            value[1:2],
            key,
            "matched row: UNITER's zero-shot retrieval score (inf_itm.py's init_output)",
        )


# ----------------------------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------------------------


def _load_tokenizer(tokenizer_dir: str, vocab_size: int, path: str):
    from transformers import AutoTokenizer

    if not os.path.isdir(tokenizer_dir):
        raise ConversionError(
            f"--tokenizer {tokenizer_dir}: no such folder ; pass a local bert-base-cased folder"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise ConversionError(
            f"--tokenizer {tokenizer_dir}: cannot load a tokenizer ({first_line})"
        ) from None
    if len(tokenizer) != vocab_size:
        raise ConversionError(
            f"--tokenizer {tokenizer_dir}: {len(tokenizer)} tokens, but {path} has {vocab_size} word embeddings; "
            f"UNITER uses bert-base-cased ({UNITER_VOCAB_SIZE} tokens)"
        )
    if getattr(tokenizer, "do_lower_case", False) or tokenizer.init_kwargs.get("do_lower_case", False):
        raise ConversionError(
            f"--tokenizer {tokenizer_dir}: lowercases its input, but UNITER's vocabulary is cased (bert-base-cased)"
        )
    return tokenizer


def model_card(report: ConversionReport, model: torch.nn.Module, checkpoint_name: str) -> str:
    """The README.md of a converted folder: source, licence, what was converted and how to check it."""
    score = (
        'sigmoid(itm_logits) is UNITER\'s softmax probability of "matched"'
        if report.itm_logit == "probability"
        else "itm_logits is UNITER's retrieval score (rank_output, or itm_output's matched row as its zero-shot "
        "evaluation); its sigmoid is not UNITER's matching probability"
    )
    return "\n".join(
        [
            f"# ImageBERT weights converted from UNITER ({checkpoint_name})",
            "",
            "An `ImageBertForPreTraining` (`region_embedding_type: uniter`) holding the weights of a UNITER or VILLA "
            "checkpoint, converted exactly by `python -m modeling_imagebert.pretraining.convert_uniter`: on the same "
            "region features, boxes and text it computes UNITER's MLM logits, region-class logits (its 1600 object "
            f"classes, background dropped), MRFR predictions and ITM score; {score}.",
            "",
            "## Source and licence",
            "",
            "- Model: UNITER (Chen et al., 2020, *UNITER: UNiversal Image-TExt Representation Learning*), code "
            "https://github.com/ChenRocks/UNITER, MIT licence; or VILLA (Gan et al., 2020, *Large-Scale Adversarial "
            "Training for Vision-and-Language Representation Learning*), https://github.com/zhegan27/VILLA, same "
            "architecture.",
            "- The weights are the source's: their terms of use are those of the release they came from (Microsoft's "
            "UNITER / VILLA downloads), not this project's. This folder changes their layout, not their values (the "
            "location and ITM folds are exact linear rewrites).",
            "- Text: bert-base-cased's WordPiece vocabulary (28,996 tokens), saved with the processor.",
            "- Regions: 2048-d bottom-up-attention features (Anderson et al., 2018), 10-100 per image with "
            "confidence above 0.2, as UNITER's.",
            "",
            architecture_section(model),
            "## Conversion",
            "",
            f"Source file: `{checkpoint_name}` (UNITER {report.size}). {len(report.copied)} tensors copied, "
            f"{len(report.transformed)} transformed, {len(report.dropped)} dropped, {len(report.unmapped)} unmapped, "
            f"{len(report.missing)} missing; new (not in UNITER, initialised as ImageBERT's): {report.new or 'none'}. "
            "Every key is listed in `conversion_report.json`.",
            "",
            *[f"- `{key}`: {note}" for key, note in {**report.transformed, **report.dropped}.items()],
            "",
            "Check it against UNITER's own forward on the same inputs: `python tools/check_uniter_parity.py "
            f"{checkpoint_name} <this folder>`. Zero-shot Flickr30k: see docs/uniter.md.",
            "",
        ]
    )


def convert_uniter(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer_dir: str | os.PathLike,
    *,
    size: str | None = None,
    num_attention_heads: int | None = None,
    itm_logit: str = "probability",
    max_text_length: int = DEFAULT_MAX_TEXT_LENGTH,
    max_regions: int = DEFAULT_MAX_REGIONS,
    allow_partial: bool = False,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the UNITER / VILLA `checkpoint` into the `ImageBertForPreTraining` folder `out_dir`.

    Writes the model (`config.json`, `model.safetensors`, the remote-code files), the processor (the tokenizer of
    `tokenizer_dir`, `max_regions`, `max_text_length`), `README.md` and `conversion_report.json` into a
    temporary sibling renamed into place (with the project's ownership marker), so `out_dir` is complete or
    absent. Nothing is created when the checkpoint is refused. `out_dir` is replaced only with `overwrite` and
    only when this project wrote it.

    Returns the `ConversionReport`; raises `ConversionError` (one line) for an unreadable or refused file, a
    checkpoint of another model, a size or vocabulary mismatch, or unmapped / missing keys (unless
    `allow_partial`).
    """
    from ..modeling_imagebert import ImageBertForPreTraining
    from ..processing_imagebert import ImageBertProcessor

    path = str(checkpoint)
    if not overwrite and (os.path.exists(out_dir) or os.path.islink(out_dir)):
        raise ConversionError(
            f"{out_dir}: already exists ; choose another output, or pass --overwrite to replace a folder this project "
            "wrote"
        )
    tensors = read_uniter_checkpoint(path)
    check_is_uniter(tensors, path)
    config, found = infer_config(
        tensors,
        path,
        size=size,
        num_attention_heads=num_attention_heads,
        max_text_length=max_text_length,
        max_regions=max_regions,
    )
    tokenizer = _load_tokenizer(str(tokenizer_dir), config.vocab_size, path)
    state_dict, report = map_uniter_state_dict(tensors, itm_logit)
    report.source, report.size = os.path.abspath(path), found
    report.source_dtypes = sorted({str(value.dtype).removeprefix("torch.") for value in tensors.values()})

    model = ImageBertForPreTraining(config)
    own = model.state_dict()
    for target, value in state_dict.items():
        if target in own and tuple(own[target].shape) != tuple(value.shape):
            raise ConversionError(
                f"{path}: {target} converted to shape {tuple(value.shape)}, the model expects {tuple(own[target].shape)}"
            )
    targets_unknown = sorted(set(state_dict) - set(own))
    if (
        targets_unknown
    ):  # a rename that lands nowhere: report the source as unmapped rather than fail silently
        report.unmapped += targets_unknown
    tied = {"mlm_head.decoder.weight"}
    report.new = [key for key in NEW_IN_IMAGEBERT if key in own and key not in state_dict]
    report.missing = sorted(set(own) - set(state_dict) - tied - set(report.new))
    report.config = config.to_diff_dict()
    if not report.ok and not allow_partial:
        first = (report.unmapped or report.missing)[0]
        raise ConversionError(
            f"{path}: incomplete conversion, nothing written: {len(report.unmapped)} unmapped and "
            f"{len(report.missing)} missing keys (first: {first!r}) ; pass --allow-partial to write anyway"
        )
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
    model.tie_weights()
    model.eval()
    processor = ImageBertProcessor(
        tokenizer=tokenizer, max_regions=max_regions, max_text_length=max_text_length
    )

    with atomic_folder(
        out_dir,
        overwrite=overwrite,
        written_by="modeling_imagebert.pretraining.convert_uniter",
        inputs=[path, str(tokenizer_dir)],
    ) as staging:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (Path(staging) / "README.md").write_text(
            model_card(report, model, os.path.basename(path)), encoding="utf-8"
        )
        (Path(staging) / REPORT_NAME).write_text(
            json.dumps(dataclasses.asdict(report), indent=1) + "\n", encoding="utf-8"
        )
    return report


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_imagebert.pretraining.convert_uniter",
        description=__doc__.split("\n\n")[0],
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("checkpoint", help="UNITER / VILLA state dict (.pt), e.g. uniter-base.pt")
    parser.add_argument("out_dir", help="ImageBERT folder to create")
    parser.add_argument(
        "--tokenizer", required=True, help="folder of the cased BERT tokenizer UNITER uses (bert-base-cased)"
    )
    parser.add_argument(
        "--size", choices=sorted(UNITER_SIZES), default=None, help="refuse a checkpoint of another size"
    )
    parser.add_argument(
        "--num-attention-heads",
        type=int,
        default=None,
        help="for a checkpoint of neither released size (base 12, large 16 heads)",
    )
    parser.add_argument(
        "--itm-logit",
        choices=ITM_LOGITS,
        default="probability",
        help="probability: sigmoid(ITM logit) = UNITER's softmax P(matched); rank: UNITER's retrieval score "
        "(rank_output, or itm_output's matched row as its zero-shot evaluation), which its tables rank by",
    )
    parser.add_argument(
        "--max-text-length", type=int, default=DEFAULT_MAX_TEXT_LENGTH, help="text tokens kept"
    )
    parser.add_argument("--max-regions", type=int, default=DEFAULT_MAX_REGIONS, help="regions kept per image")
    parser.add_argument(
        "--allow-partial", action="store_true", help="write even with unmapped or missing keys"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an output folder this project wrote before"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line summary"
    )
    args = parser.parse_args(argv)
    report = convert_uniter(
        args.checkpoint,
        args.out_dir,
        args.tokenizer,
        size=args.size,
        num_attention_heads=args.num_attention_heads,
        itm_logit=args.itm_logit,
        max_text_length=args.max_text_length,
        max_regions=args.max_regions,
        allow_partial=args.allow_partial,
        overwrite=args.overwrite,
    )
    print(report.summary())
    print(f"wrote {os.path.abspath(args.out_dir)}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 written, 2 after a one-line error)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_uniter",
    "fold_location_weight",
    "infer_config",
    "map_uniter_state_dict",
    "read_uniter_checkpoint",
]
