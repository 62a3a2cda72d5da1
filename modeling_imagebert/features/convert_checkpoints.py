"""Convert the public bottom-up-attention checkpoints into a `BUTDDetector` folder (safetensors + config.json +
preprocessor_config.json), never unpickling arbitrary objects.

Formats:
    lxmert      the LXMERT demo's `unc-nlp/frcnn-vg-finetuned` `pytorch_model.bin` (Detectron2 names, background last)
    detectron2  py-bottom-up-attention's `faster_rcnn_from_caffe[_attr].pkl` (a pickle of numpy arrays: read with an
                unpickler that admits only numpy arrays and plain containers)
    milvlg      MILVLG's `bua-caffe-frcn-r101_with_attributes.pth` (Caffe order: background first, a 2-way softmax
                RPN, Caffe anchors and "+1" box widths)

    # the LXMERT demo's weights (Hub repo unc-nlp/frcnn-vg-finetuned, file pytorch_model.bin)
    python -m modeling_imagebert.features.convert_checkpoints --format lxmert pytorch_model.bin butd-vg-lxmert/
    # py-bottom-up-attention's Caffe-converted weights with attributes
    python -m modeling_imagebert.features.convert_checkpoints --format detectron2 \
        faster_rcnn_from_caffe_attr.pkl butd-vg-d2/
    # MILVLG's conversion of the original Caffe model (bottom-up-attention.pytorch)
    python -m modeling_imagebert.features.convert_checkpoints --format milvlg \
        bua-caffe-frcn-r101_with_attributes.pth butd-vg-milvlg/

Then check the result against features the community extracted with the original model (see `parity.py`):

    python -m modeling_imagebert.features.parity --detector butd-vg-milvlg/ --images val2014/ \
        --reference-tsv coco_val2014_36.tsv --fixed-boxes 36 --limit 50

Every source key is either copied, transformed (named with what was done), ignored (`num_batches_tracked`, which
frozen batch norm does not use) or reported as unmapped; every detector key the source lacks is reported as
missing. Nothing is written unless both lists are empty (`--allow-partial` writes anyway, leaving missing weights
randomly initialised, and says so).
"""

import argparse
import io
import json
import os
import pickle
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..atomic import remove_stale_temporaries, replace_folder, temporary_sibling
from ..cli import run_cli
from ..cli_arguments import DefaultsHelpFormatter
from ..safe_loading import (
    CHECKPOINT_CONTAINERS,
    NUMPY_ARRAYS,
    RestrictedUnpickler,
    WeightsFileError,
    load_torch_file,
)

FORMATS = ("lxmert", "detectron2", "milvlg")
REPORT_NAME = "conversion_report.json"
# Anchor sizes a checkpoint's RPN implies, by its number of anchors per cell (with ratios 0.5, 1, 2).
_ANCHOR_SIZES_BY_COUNT = {12: [64, 128, 256, 512], 15: [32, 64, 128, 256, 512]}
_IGNORED = re.compile(r"\.num_batches_tracked$")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the key."""


@dataclass
class ConversionReport:
    """What a conversion did with every key. `ok` when nothing is unmapped or missing."""

    source: str
    format: str
    copied: list[str] = field(default_factory=list)
    transformed: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.unmapped and not self.missing

    def summary(self) -> str:
        lines = [
            f"{self.source} ({self.format}): {len(self.copied)} copied, {len(self.transformed)} transformed, "
            f"{len(self.ignored)} ignored, {len(self.unmapped)} unmapped, {len(self.missing)} missing"
        ]
        lines += [f"  transformed {key}: {note}" for key, note in self.transformed.items()]
        lines += [f"  UNMAPPED {key}" for key in self.unmapped]
        lines += [f"  MISSING {key}" for key in self.missing]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------------
# Reading checkpoints safely
# ----------------------------------------------------------------------------------------------------------------------


def load_numpy_pickle(path: str) -> dict:
    """Read a pickle holding only numpy arrays and plain containers (Detectron2 `.pkl` checkpoints).

    Returns the unpickled object. Raises `ConversionError` naming the file when it holds anything else.
    """
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        # latin1: the Caffe-converted pickles were written by Python 2.
        unpickler = RestrictedUnpickler(
            io.BytesIO(data),
            allowed=NUMPY_ARRAYS | CHECKPOINT_CONTAINERS,
            admits="numpy arrays and plain containers",
            encoding="latin1",
        )
        return unpickler.load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as error:
        raise ConversionError(f"{path}: not a pickle of numpy arrays ({error})") from None


def read_state_dict(path: str, format: str) -> dict[str, torch.Tensor]:
    """Source tensors by name: `.pkl` through the numpy-only unpickler, `.bin` / `.pth` with
    `torch.load(weights_only=True)`; a `{"model": {...}}` wrapper (Detectron2 checkpoints) is unwrapped."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such checkpoint file")
    if path.endswith(".pkl"):
        raw = load_numpy_pickle(path)
    else:
        try:
            raw = load_torch_file(path, "a weights-only torch checkpoint (.bin / .pth)")
        except (WeightsFileError, OSError) as error:  # ConversionError: the one type this command reports
            reason = str(error).removeprefix(f"{path}: ")
            raise ConversionError(
                f"{path}: cannot read as a weights-only torch checkpoint: {reason}"
            ) from None
    if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
        raw = raw["model"]
    if not isinstance(raw, dict) or not raw:
        raise ConversionError(
            f"{path}: expected a mapping of parameter names to arrays, got {type(raw).__name__}"
        )
    tensors = {}
    for key, value in raw.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            raise ConversionError(f"{path}: key {key!r} holds {type(value).__name__}, expected an array")
        tensors[str(key)] = value
    return tensors


# ----------------------------------------------------------------------------------------------------------------------
# Layout mapping
# ----------------------------------------------------------------------------------------------------------------------


def config_for(format: str, tensors: dict) -> dict:
    """BUTDConfig fields implied by a checkpoint: the architecture sizes read off the tensors, plus the box and
    anchor conventions of its format."""
    shapes = {key: tuple(value.shape) for key, value in tensors.items()}

    def shape(key: str, source_key: str | None = None) -> tuple:
        source_key = source_key or key
        if source_key not in shapes:
            raise ConversionError(
                f"{format} checkpoint lacks {source_key!r}, needed to read the architecture"
            )
        return shapes[source_key]

    depths = []
    for stage in ("res2", "res3", "res4"):
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(rf"backbone\.{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
    res5_blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"roi_heads\.res5\.(\d+)\.", k))}
    objectness = shape("proposal_generator.rpn_head.objectness_logits.weight")[0]
    num_anchors = objectness // 2 if format == "milvlg" else objectness
    if num_anchors not in _ANCHOR_SIZES_BY_COUNT:
        raise ConversionError(
            f"{format} checkpoint: rpn_head.objectness_logits has {objectness} outputs, expected anchors per cell "
            f"in {sorted(_ANCHOR_SIZES_BY_COUNT)} (3 ratios x 4 or 5 sizes)"
        )
    cls_rows = shape("roi_heads.box_predictor.cls_score.weight")[0]
    attr_key = "attr_linear2" if format == "milvlg" else "attr_score"
    embed_key = "cls_embed" if format == "milvlg" else "cls_embedding"
    fields = {
        "stem_out_channels": shape("backbone.stem.conv1.weight")[0],
        "stage_depths": depths,
        "res5_depth": len(res5_blocks),
        "res2_bottleneck_channels": shape("backbone.res2.0.conv1.weight")[0],
        "res2_out_channels": shape("backbone.res2.0.conv3.weight")[0],
        "rpn_hidden_channels": shape("proposal_generator.rpn_head.conv.weight")[0],
        "anchor_sizes": _ANCHOR_SIZES_BY_COUNT[num_anchors],
        "num_classes": cls_rows,
        "num_attributes": shape(f"roi_heads.box_predictor.{attr_key}.weight")[0],
        "attribute_embedding_dim": shape(f"roi_heads.box_predictor.{embed_key}.weight")[1],
        "attribute_hidden_dim": shape(
            f"roi_heads.box_predictor.{'attr_linear1' if format == 'milvlg' else 'fc_attr'}.weight"
        )[0],
    }
    if format == "milvlg":
        # Caffe conventions (MILVLG's BUABox2BoxTransform, BUABoxes.clip, RPN MIN_SIZE 16, BBOX_REG_WEIGHTS 1).
        fields.update(
            anchor_style="caffe",
            box_size_offset=1.0,
            rpn_min_size=16.0,
            roi_box_weights=[1.0, 1.0, 1.0, 1.0],
        )
    else:
        fields.update(anchor_style="detectron2", box_size_offset=0.0, rpn_min_size=0.0)
    return fields


def _background_last(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """Move row 0 (Caffe's background / no-attribute) of the first `rows` rows to the end."""
    return torch.cat([tensor[1:rows], tensor[:1]], dim=0)


def map_tensors(
    format: str, tensors: dict[str, torch.Tensor], target_shapes: dict[str, tuple]
) -> tuple[dict[str, torch.Tensor], ConversionReport]:
    """Map source tensors onto the detector's keys.

    Args:
        format: one of FORMATS.
        tensors: source name -> tensor.
        target_shapes: the detector's state-dict key -> shape.

    Returns:
        (converted state dict, report). A source key whose mapped shape disagrees with the detector raises
        `ConversionError` naming both.
    """
    report = ConversionReport(source="", format=format)
    out: dict[str, torch.Tensor] = {}

    def put(target: str, value: torch.Tensor, source: str, note: str | None = None):
        if target not in target_shapes:
            report.unmapped.append(source)
            return
        if tuple(value.shape) != tuple(target_shapes[target]):
            raise ConversionError(
                f"{format} checkpoint key {source!r} -> {target!r}: shape {tuple(value.shape)}, the detector "
                f"expects {tuple(target_shapes[target])}"
            )
        out[target] = value.to(torch.float32).contiguous()
        if note is None and source == target:
            report.copied.append(source)
        else:
            report.transformed[source] = note or f"renamed to {target}"

    for key, value in tensors.items():
        if _IGNORED.search(key):
            report.ignored.append(key)
        elif key == "proposal_generator.anchor_generator.cell_anchors.0":
            put(
                "proposal_generator.cell_anchors", value, key, "the checkpoint's own anchors kept as a buffer"
            )
        elif format == "milvlg" and key.startswith("roi_heads.box_predictor."):
            _map_milvlg_predictor(key, value, put, report)
        elif format == "milvlg" and key == "proposal_generator.rpn_head.objectness_logits.weight":
            half = value.shape[0] // 2
            put(
                key,
                value[half:] - value[:half],
                key,
                "2-way softmax -> one logit: foreground - background rows",
            )
        elif format == "milvlg" and key == "proposal_generator.rpn_head.objectness_logits.bias":
            half = value.shape[0] // 2
            put(
                key,
                value[half:] - value[:half],
                key,
                "2-way softmax -> one logit: foreground - background rows",
            )
        else:
            put(key, value, key)
    return out, report


def _map_milvlg_predictor(key: str, value: torch.Tensor, put, report: ConversionReport):
    """MILVLG's Caffe-ordered heads: background / no-attribute first; a background box; a 1602-row embedding."""
    name = key.removeprefix("roi_heads.box_predictor.")
    target = "roi_heads.box_predictor."
    if name in ("cls_score.weight", "cls_score.bias"):
        put(
            target + name,
            _background_last(value, value.shape[0]),
            key,
            "background class moved from first to last",
        )
    elif name in ("bbox_pred.weight", "bbox_pred.bias"):
        put(target + name, value[4:], key, "background box (first 4 rows) dropped")
    elif name == "cls_embed.weight":
        rows = value.shape[0] - 1  # the last of the num_classes + 1 rows is never indexed by an arg-max class
        put(
            target + "cls_embedding.weight",
            _background_last(value, rows),
            key,
            "background row moved last; unused last row dropped",
        )
    elif name in ("attr_linear1.weight", "attr_linear1.bias"):
        put(target + name.replace("attr_linear1", "fc_attr"), value, key, "renamed to fc_attr")
    elif name in ("attr_linear2.weight", "attr_linear2.bias"):
        put(
            target + name.replace("attr_linear2", "attr_score"),
            _background_last(value, value.shape[0]),
            key,
            "renamed to attr_score; no-attribute entry moved from first to last",
        )
    else:
        report.unmapped.append(key)


# ----------------------------------------------------------------------------------------------------------------------
# Writing the folder
# ----------------------------------------------------------------------------------------------------------------------


def convert_checkpoint(
    src: str, out_dir: str, format: str, *, allow_partial: bool = False, overwrite: bool = False
) -> ConversionReport:
    """Convert `src` (a checkpoint of `format`) into the detector folder `out_dir`.

    Writes `model.safetensors`, `config.json`, `preprocessor_config.json`, `conversion_report.json` and the
    detector's source files (remote code: `configuration_butd.py`, `modeling_butd.py`, `image_processing_butd.py`,
    `images.py`) into a temporary sibling folder renamed into place, so a kill leaves `out_dir` complete or absent. Refuses an existing
    `out_dir` unless it was written by this converter (has its report) and `overwrite` is set.

    Returns:
        The `ConversionReport`. Raises `ConversionError` when keys are unmapped or missing (unless
        `allow_partial`), or when the source cannot be read.
    """
    from safetensors.torch import save_file
    from transformers.dynamic_module_utils import custom_object_save

    from .configuration_butd import BUTDConfig
    from .image_processing_butd import BUTDImageProcessor
    from .modeling_butd import BUTDDetector

    if format not in FORMATS:
        raise ConversionError(f"unknown --format {format!r}; expected one of {FORMATS}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir):
        ours = os.path.isfile(os.path.join(out_dir, REPORT_NAME))
        if not (ours and overwrite):
            reason = "pass --overwrite to replace it" if ours else "it was not written by this converter"
            raise ConversionError(f"{out_dir}: already exists; {reason}")

    tensors = read_state_dict(src, format)
    config = BUTDConfig(**config_for(format, tensors))
    with torch.device("meta"):
        detector = BUTDDetector(config)
    target_shapes = {key: tuple(value.shape) for key, value in detector.state_dict().items()}
    state_dict, report = map_tensors(format, tensors, target_shapes)
    report.source, report.config = os.path.abspath(src), config_for(format, tensors)
    if "proposal_generator.cell_anchors" not in state_dict:
        # The anchors follow from the config (Caffe's rounded or Detectron2's exact ones); derive and say so.
        state_dict["proposal_generator.cell_anchors"] = detector._default_cell_anchors()
        report.transformed["(derived) proposal_generator.cell_anchors"] = (
            f"{config.anchor_style} anchors from config"
        )
    report.missing = sorted(set(target_shapes) - set(state_dict))
    if not report.ok and not allow_partial:
        raise ConversionError(f"{src}: incomplete conversion, nothing written\n{report.summary()}")

    remove_stale_temporaries(out_dir)
    staging = temporary_sibling(out_dir)
    try:
        save_file(state_dict, os.path.join(staging, "model.safetensors"), metadata={"format": "pt"})
        config.architectures = ["BUTDDetector"]
        # The source files and `auto_map` that `BUTDDetector.save_pretrained` writes, so the folder loads with
        # `AutoModel.from_pretrained(folder, trust_remote_code=True)` without this package, like a saved one.
        custom_object_save(detector, staging, config=config)
        config.save_pretrained(staging)
        BUTDImageProcessor().save_pretrained(staging)
        with open(os.path.join(staging, REPORT_NAME), "w") as handle:
            json.dump(asdict(report), handle, indent=1)
        # An earlier folder of ours (checked above) is moved aside, replaced, then deleted.
        replace_folder(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter
    )
    parser.add_argument("--format", required=True, choices=FORMATS, help="layout of the source checkpoint")
    parser.add_argument("src", help="checkpoint file (.bin, .pth or .pkl)")
    parser.add_argument("out_dir", help="detector folder to create")
    parser.add_argument(
        "--allow-partial", action="store_true", help="write even with unmapped or missing keys"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a folder this converter wrote before"
    )
    args = parser.parse_args(argv)
    report = convert_checkpoint(
        args.src, args.out_dir, args.format, allow_partial=args.allow_partial, overwrite=args.overwrite
    )
    print(report.summary())
    print(f"wrote {os.path.abspath(args.out_dir)}")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status: 0 when written, 1 after a `ConversionError` (its message
    keeps one unmapped or missing key a line)."""
    return run_cli(_main, argv, errors=(ConversionError,), hint=False, one_line=False, exit_status=1)


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "ConversionError",
    "ConversionReport",
    "convert_checkpoint",
    "load_numpy_pickle",
    "read_state_dict",
]
