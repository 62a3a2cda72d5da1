"""Configuration of the bottom-up-attention (BUTD) Faster R-CNN detector."""

import math

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

ANCHOR_STYLES = ("detectron2", "caffe")
ROI_POOLERS = ("roi_pool", "roi_align")
FINAL_BOXES = ("proposals", "regressed")


@strict(accept_kwargs=True)
class BUTDConfig(PreTrainedConfig):
    r"""
    Configuration of `BUTDDetector`: the Faster R-CNN ResNet-101 "C4" detector trained on Visual Genome by Anderson
    et al. (2018, "bottom-up attention"), whose 2048-d pooled RoI features ImageBERT, LXMERT, UNITER and VilBERT
    read. Defaults give the full original architecture and the community's extraction settings; every size is a
    field so tests can build a tiny detector.

    Backbone (ResNet, Caffe conventions: stride in the 1x1 conv, frozen batch norm, Caffe max pool):
        stem_out_channels (`int`, 64), stage_depths (`list[int]`, [3, 4, 23]): blocks of res2, res3, res4
        (ResNet-101); res5_depth (`int`, 3); res2_bottleneck_channels (`int`, 64) and res2_out_channels (`int`, 256),
        doubled at each later stage (res5 gives `hidden_size` = 8 * res2_out_channels = 2048);
        stride_in_1x1 (`bool`, True); caffe_maxpool (`bool`, True): stem max pool with no padding and ceil mode;
        norm_eps (`float`, 1e-5).
        res5_first_stride (`int`, 1) and res5_dilation (`int`, 2): the original VG model keeps res5 at the RoI
        resolution with dilated 3x3 convs (14x14 in, 14x14 out, then mean pool); set 2 and 1 for the halving
        variant (14x14 -> 7x7).

    Region proposal network (on res4, stride 16):
        rpn_hidden_channels (`int`, 512); anchor_sizes (`list[float]`, [64, 128, 256, 512]) and anchor_ratios
        (`list[float]`, [0.5, 1, 2], height / width); anchor_style (`str`, "detectron2"): "detectron2" (continuous
        anchors centred on the cell corner, py-bottom-up-attention and the LXMERT demo) or "caffe" (the rounded
        anchors of py-faster-rcnn's generate_anchors, MILVLG). rpn_box_weights (`list[float]`, [1, 1, 1, 1]),
        rpn_nms_threshold (`float`, 0.7), rpn_pre_nms_top_n (`int`, 6000), rpn_post_nms_top_n (`int`, 300),
        rpn_min_size (`float`, 0.0): proposals with a side at most this (in original-image pixels, i.e. times the
        resize scale on the network input) are dropped.

    Box conventions:
        box_size_offset (`float`, 0.0): 0 for Detectron2 (width = x2 - x1), 1 for Caffe (width = x2 - x1 + 1,
        boxes clipped to [0, W - 1]). box_scale_clamp (`float`, log(1000 / 16)): largest dw, dh before exp.

    RoI head:
        roi_pooler (`str`, "roi_pool"): torchvision RoIPool as Caffe, or "roi_align"; roi_pool_size (`int`, 14);
        roi_sampling_ratio (`int`, 0, RoIAlign only).
        num_classes (`int`, 1601): object classes including background, which is the LAST index (Detectron2
        order); class-specific box regression has 4 * (num_classes - 1) outputs. roi_box_weights
        (`list[float]`, [10, 10, 5, 5]).
        num_attributes (`int`, 401): attribute classes including "no attribute", the LAST index;
        attribute_embedding_dim (`int`, 256) and attribute_hidden_dim (`int`, 512): class embedding concatenated
        with the pooled feature -> Linear -> ReLU -> Linear.

    Selection of the final regions (as BUTD's generate_tsv.py, UNITER and MILVLG):
        nms_threshold (`float`, 0.3): per-class NMS over the candidate boxes; a box's confidence is its best score
        over the classes where it survives. score_threshold (`float`, 0.2): keep boxes at least this confident, then
        clamp their number to [min_boxes (`int`, 10), max_boxes (`int`, 100)], best first. fixed_boxes
        (`int | None`, None): keep exactly this many instead (36 as most releases, or the paper's 100).
        final_boxes (`str`, "proposals"): "proposals" as the original extraction (the regions are the RPN proposals
        and their features), or "regressed": boxes refined by the class-specific regression of their class, with
        features pooled again at those boxes.
    """

    model_type = "imagebert_butd"

    num_channels: int = 3
    stem_out_channels: int = 64
    stage_depths: list[int] | tuple[int, ...] = (3, 4, 23)
    res5_depth: int = 3
    res2_bottleneck_channels: int = 64
    res2_out_channels: int = 256
    stride_in_1x1: bool = True
    caffe_maxpool: bool = True
    norm_eps: float = 1e-5
    res5_first_stride: int = 1
    res5_dilation: int = 2

    rpn_hidden_channels: int = 512
    anchor_sizes: list[float | int] | tuple[float | int, ...] = (64, 128, 256, 512)
    anchor_ratios: list[float | int] | tuple[float | int, ...] = (0.5, 1.0, 2.0)
    anchor_style: str = "detectron2"
    rpn_box_weights: list[float | int] | tuple[float | int, ...] = (1.0, 1.0, 1.0, 1.0)
    rpn_nms_threshold: float = 0.7
    rpn_pre_nms_top_n: int = 6000
    rpn_post_nms_top_n: int = 300
    rpn_min_size: float | int = 0.0

    box_size_offset: float | int = 0.0
    box_scale_clamp: float = math.log(1000.0 / 16)

    roi_pooler: str = "roi_pool"
    roi_pool_size: int = 14
    roi_sampling_ratio: int = 0
    num_classes: int = 1601
    roi_box_weights: list[float | int] | tuple[float | int, ...] = (10.0, 10.0, 5.0, 5.0)
    num_attributes: int = 401
    attribute_embedding_dim: int = 256
    attribute_hidden_dim: int = 512

    nms_threshold: float = 0.3
    score_threshold: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    fixed_boxes: int | None = None
    final_boxes: str = "proposals"

    @property
    def hidden_size(self) -> int:
        """Dimension of the pooled RoI feature (res5 output channels)."""
        return self.res2_out_channels * 8

    @property
    def feature_stride(self) -> int:
        """Stride of res4, where the RPN and RoI pooling work: 4 (stem) * 2 (res3) * 2 (res4)."""
        return 16

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    @property
    def box_bounds(self) -> tuple[int, int]:
        """(least, most) regions kept per image."""
        if self.fixed_boxes is not None:
            return self.fixed_boxes, self.fixed_boxes
        return self.min_boxes, self.max_boxes

    def validate_butd(self):
        """Part of `@strict` validation: value ranges and choices."""
        for name in (
            "stem_out_channels",
            "res5_depth",
            "res2_bottleneck_channels",
            "res2_out_channels",
            "rpn_hidden_channels",
            "rpn_pre_nms_top_n",
            "rpn_post_nms_top_n",
            "roi_pool_size",
            "num_classes",
            "num_attributes",
            "attribute_embedding_dim",
            "attribute_hidden_dim",
            "res5_first_stride",
            "res5_dilation",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"BUTDConfig.{name} must be positive, got {getattr(self, name)}")
        if len(self.stage_depths) != 3 or any(d <= 0 for d in self.stage_depths):
            raise ValueError(
                f"BUTDConfig.stage_depths must be 3 positive block counts, got {self.stage_depths}"
            )
        if self.num_classes < 2 or self.num_attributes < 2:
            raise ValueError("BUTDConfig: num_classes and num_attributes count a background entry; need >= 2")
        if self.anchor_style not in ANCHOR_STYLES:
            raise ValueError(
                f"BUTDConfig.anchor_style must be one of {ANCHOR_STYLES}, got {self.anchor_style!r}"
            )
        if self.roi_pooler not in ROI_POOLERS:
            raise ValueError(f"BUTDConfig.roi_pooler must be one of {ROI_POOLERS}, got {self.roi_pooler!r}")
        if self.final_boxes not in FINAL_BOXES:
            raise ValueError(f"BUTDConfig.final_boxes must be one of {FINAL_BOXES}, got {self.final_boxes!r}")
        if not self.anchor_sizes or not self.anchor_ratios or min(self.anchor_sizes) <= 0:
            raise ValueError("BUTDConfig: anchor_sizes and anchor_ratios must be non-empty and positive")
        for name in ("rpn_box_weights", "roi_box_weights"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"BUTDConfig.{name} must hold 4 weights (dx, dy, dw, dh)")
        for name in ("nms_threshold", "rpn_nms_threshold"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"BUTDConfig.{name} must be in (0, 1], got {getattr(self, name)}")
        if not 0 <= self.min_boxes <= self.max_boxes:
            raise ValueError(
                f"BUTDConfig: need 0 <= min_boxes <= max_boxes, got {self.min_boxes} and {self.max_boxes}"
            )
        if self.fixed_boxes is not None and self.fixed_boxes <= 0:
            raise ValueError(f"BUTDConfig.fixed_boxes must be positive or None, got {self.fixed_boxes}")


# `save_pretrained` writes `auto_map` and copies this file beside the config, for loading with
# `trust_remote_code=True` without this package (the package itself registers the class with `AutoConfig`).
BUTDConfig.register_for_auto_class()

__all__ = ["BUTDConfig"]
