"""The bottom-up-attention Faster R-CNN (Anderson et al., 2018) as a Transformers model: `BUTDDetector`.

Read top to bottom in build order: frozen batch norm -> conv with norm -> bottleneck -> stem -> backbone (res2-res4)
-> box coding and NMS helpers -> region proposal network -> RoI heads (RoI pooling, res5, mean pool, class / box /
attribute heads) -> region selection -> pre-trained base -> `BUTDDetector`.

Parameter names follow Detectron2's (`backbone.res4.22.conv2.norm.running_var`, `roi_heads.box_predictor.cls_score`),
so the checkpoints of py-bottom-up-attention and of the LXMERT demo map one to one; MILVLG's Caffe-ordered one is
rearranged by `convert_checkpoints.py`. Only torch and `torchvision.ops` (RoIPool / RoIAlign, NMS) are used.

Note to 12b: `detect(images, processor=...)` is the entry point and returns one dict of numpy arrays per image (see
`BUTDDetector.detect`). By default (`batch_invariant=True`) each image runs alone, so results are bit-identical
whatever the batch; `batch_invariant=False` batches same-shape images (equal within 1e-4).
"""

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision import ops
from transformers import PreTrainedModel
from transformers import initialization as init

from .configuration_butd import BUTDConfig

# ----------------------------------------------------------------------------------------------------------------------
# Backbone: ResNet with Caffe conventions
# ----------------------------------------------------------------------------------------------------------------------


class BUTDFrozenBatchNorm2d(nn.Module):
    """Batch norm with fixed statistics and affine (Caffe's BatchNorm + Scale): y = (x - mean) / sqrt(var + eps) *
    weight + bias. All four are buffers, saved with the model and never trained."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (C,) statistics folded into one scale and shift, broadcast over (N, C, H, W).
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)


class BUTDConv2d(nn.Conv2d):
    """Convolution without bias followed by a frozen batch norm kept as `.norm` (Detectron2's layout)."""

    def __init__(self, in_channels: int, out_channels: int, *, eps: float, **kwargs):
        super().__init__(in_channels, out_channels, bias=False, **kwargs)
        self.norm = BUTDFrozenBatchNorm2d(out_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(super().forward(x))


class BUTDBottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 -> 1x1, projection shortcut when the shape changes), stride in the 1x1 conv
    as the original MSRA / Caffe ResNets."""

    def __init__(
        self,
        in_channels: int,
        bottleneck_channels: int,
        out_channels: int,
        *,
        stride: int,
        dilation: int,
        stride_in_1x1: bool,
        eps: float,
    ):
        super().__init__()
        self.shortcut = (
            BUTDConv2d(in_channels, out_channels, kernel_size=1, stride=stride, eps=eps)
            if in_channels != out_channels or stride != 1
            else None
        )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = BUTDConv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1, eps=eps)
        self.conv2 = BUTDConv2d(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            stride=stride_3x3,
            padding=dilation,
            dilation=dilation,
            eps=eps,
        )
        self.conv3 = BUTDConv2d(bottleneck_channels, out_channels, kernel_size=1, eps=eps)
        # Only read by `_init_weights` (random weights start this norm small).
        self.conv3.norm.ends_residual_branch = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


def make_stage(
    depth: int,
    in_channels: int,
    bottleneck_channels: int,
    out_channels: int,
    *,
    first_stride: int,
    dilation: int,
    config: BUTDConfig,
) -> nn.Sequential:
    """A ResNet stage of `depth` bottlenecks; only the first one changes the stride and channels."""
    blocks = []
    for index in range(depth):
        blocks.append(
            BUTDBottleneck(
                in_channels if index == 0 else out_channels,
                bottleneck_channels,
                out_channels,
                stride=first_stride if index == 0 else 1,
                dilation=dilation,
                stride_in_1x1=config.stride_in_1x1,
                eps=config.norm_eps,
            )
        )
    return nn.Sequential(*blocks)


class BUTDStem(nn.Module):
    """7x7 stride-2 conv + frozen BN + ReLU + 3x3 stride-2 max pool (Caffe's: no padding, ceil mode)."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.caffe_maxpool = config.caffe_maxpool
        self.conv1 = BUTDConv2d(
            config.num_channels,
            config.stem_out_channels,
            kernel_size=7,
            stride=2,
            padding=3,
            eps=config.norm_eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        if self.caffe_maxpool:
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BUTDBackbone(nn.Module):
    """Stem and res2-res4 of the ResNet: (B, 3, H, W) BGR pixels -> (B, 4 * res2_out_channels, ~H/16, ~W/16)."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.stem = BUTDStem(config)
        in_channels, bottleneck, out_channels = (
            config.stem_out_channels,
            config.res2_bottleneck_channels,
            config.res2_out_channels,
        )
        for index, depth in enumerate(config.stage_depths):
            stage = make_stage(
                depth,
                in_channels,
                bottleneck,
                out_channels,
                first_stride=1 if index == 0 else 2,
                dilation=1,
                config=config,
            )
            self.add_module(f"res{index + 2}", stage)
            in_channels, bottleneck, out_channels = out_channels, bottleneck * 2, out_channels * 2

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(pixel_values))))


# ----------------------------------------------------------------------------------------------------------------------
# Boxes: anchors, delta decoding, clipping, IoU and NMS
# ----------------------------------------------------------------------------------------------------------------------


def detectron2_cell_anchors(sizes, ratios) -> torch.Tensor:
    """Anchors centred on (0, 0), as Detectron2's DefaultAnchorGenerator: for each size, for each ratio (h / w),
    w = sqrt(size^2 / ratio), h = ratio * w. Returns (len(sizes) * len(ratios), 4) x1, y1, x2, y2."""
    anchors = []
    for size in sizes:
        area = float(size) ** 2
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(anchors, dtype=torch.float32)


def caffe_cell_anchors(sizes, ratios, base_size: int = 16) -> torch.Tensor:
    """Anchors of py-faster-rcnn's generate_anchors (used by the Caffe model and MILVLG): start from the
    base_size x base_size box [0, base_size - 1]^2, enumerate ratios with rounded integer sides, then scale by
    size / base_size. Order: for each ratio, for each size. Returns (len(ratios) * len(sizes), 4)."""
    width = height = float(base_size)
    center = 0.5 * (base_size - 1)

    def around_center(ws: np.ndarray, hs: np.ndarray) -> np.ndarray:
        return np.stack(
            [
                center - 0.5 * (ws - 1),
                center - 0.5 * (hs - 1),
                center + 0.5 * (ws - 1),
                center + 0.5 * (hs - 1),
            ],
            axis=1,
        )

    area = width * height
    ratio_ws = np.round(np.sqrt(area / np.asarray(ratios, dtype=np.float64)))
    ratio_hs = np.round(ratio_ws * np.asarray(ratios, dtype=np.float64))
    scales = np.asarray(sizes, dtype=np.float64) / base_size
    anchors = [around_center(w * scales, h * scales) for w, h in zip(ratio_ws, ratio_hs, strict=True)]
    return torch.from_numpy(np.concatenate(anchors, axis=0)).float()


def grid_anchors(cell_anchors: torch.Tensor, height: int, width: int, stride: int) -> torch.Tensor:
    """All anchors of a (height, width) feature map: (height * width * A, 4), ordered (y, x, anchor)."""
    device = cell_anchors.device
    shift_x = torch.arange(width, device=device, dtype=torch.float32) * stride
    shift_y = torch.arange(height, device=device, dtype=torch.float32) * stride
    shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
    # (H * W, 1, 4) + (1, A, 4) -> (H * W * A, 4)
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell_anchors.view(1, -1, 4)).reshape(-1, 4)


def decode_boxes(
    deltas: torch.Tensor,
    boxes: torch.Tensor,
    weights,
    *,
    offset: float = 0.0,
    scale_clamp: float = math.log(1000.0 / 16),
) -> torch.Tensor:
    """Apply R-CNN deltas to boxes.

    Args:
        deltas: (N, 4 * K) float (dx, dy, dw, dh) per box, for K class-specific boxes.
        boxes: (N, 4) x1, y1, x2, y2.
        weights: (wx, wy, ww, wh) the deltas are divided by.
        offset: 0 (Detectron2: width = x2 - x1) or 1 (Caffe: width = x2 - x1 + 1, and x2 = ctr + 0.5 w - 1).
        scale_clamp: upper bound of dw, dh before the exponential.

    Returns:
        (N, 4 * K) decoded boxes.
    """
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0] + offset
    heights = boxes[:, 3] - boxes[:, 1] + offset
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=scale_clamp)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=scale_clamp)
    pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
    pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
    pred_w = torch.exp(dw) * widths[:, None]
    pred_h = torch.exp(dh) * heights[:, None]
    # (N, K, 4) -> (N, 4 * K), interleaved as the deltas.
    decoded = torch.stack(
        [
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w - offset,
            pred_ctr_y + 0.5 * pred_h - offset,
        ],
        dim=-1,
    )
    return decoded.reshape(deltas.shape)


def clip_boxes(boxes: torch.Tensor, height: float, width: float, offset: float = 0.0) -> torch.Tensor:
    """Clip (..., 4) boxes to [0, width - offset] x [0, height - offset]."""
    x = boxes[..., 0::2].clamp(min=0, max=width - offset)
    y = boxes[..., 1::2].clamp(min=0, max=height - offset)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """Pairwise IoU (N, M) of x1, y1, x2, y2 boxes; `offset` 1 counts pixels inclusively as Caffe's NMS."""
    area1 = (boxes1[:, 2] - boxes1[:, 0] + offset) * (boxes1[:, 3] - boxes1[:, 1] + offset)
    area2 = (boxes2[:, 2] - boxes2[:, 0] + offset) * (boxes2[:, 3] - boxes2[:, 1] + offset)
    top_left = torch.maximum(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.minimum(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left + offset).clamp(min=0).prod(dim=-1)
    return inter / (area1[:, None] + area2[None, :] - inter).clamp(min=1e-12)


def nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, offset: float = 0.0) -> torch.Tensor:
    """Greedy NMS; indices kept, best first. torchvision's kernel for Detectron2 boxes, an IoU with inclusive
    pixel counts for Caffe boxes (offset 1)."""
    if offset == 0.0:
        return ops.nms(boxes.float(), scores.float(), threshold)
    return _nms_from_iou(box_iou(boxes.float(), boxes.float(), offset), scores.float()[None], threshold)[0]


def _nms_from_iou(iou: torch.Tensor, scores: torch.Tensor, threshold: float) -> list[torch.Tensor]:
    """Greedy NMS of K score vectors over the SAME R boxes at once (as running NMS once per row).

    Args:
        iou: (R, R) pairwise IoU of the boxes.
        scores: (K, R) one row of scores per class.
        threshold: a box is suppressed by a kept, better-scored box with IoU above this.

    Returns:
        K index tensors of kept boxes, best first.
    """
    order, kept_by_rank = _greedy_suppression((iou > threshold)[None], scores[None])
    return [order[row][kept_by_rank[row]] for row in range(scores.shape[0])]


def _greedy_suppression(overlaps: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared loop of the NMS helpers, for G groups of K score rows over each group's R boxes at once: walk the
    boxes of every row best first; a box is kept unless a kept box of the same row overlaps it.

    Args:
        overlaps: (G, R, R) bool, box i overlaps box j above the threshold.
        scores: (G, K, R).

    Returns:
        the (G * K, R) score order of each row and the (G * K, R) bool "kept" flag of each rank.
    """
    groups, num_rows, num_boxes = scores.shape
    order = torch.sort(
        scores.reshape(groups * num_rows, num_boxes), dim=1, descending=True, stable=True
    ).indices
    # (G, R, R) -> (G * R, R): row g * R + i holds what box i of group g overlaps.
    flat_overlaps = overlaps.reshape(groups * num_boxes, num_boxes)
    row_base = torch.arange(groups, device=scores.device).repeat_interleave(num_rows) * num_boxes  # (G * K,)
    suppressed = torch.zeros(groups * num_rows, num_boxes, dtype=torch.bool, device=scores.device)
    kept_by_rank = torch.zeros_like(suppressed)
    rows = torch.arange(groups * num_rows, device=scores.device)
    for rank in range(num_boxes):
        candidate = order[:, rank]  # (G * K,)
        keep_now = ~suppressed[rows, candidate]
        kept_by_rank[:, rank] = keep_now
        # (G * K, R): each kept candidate suppresses the boxes overlapping it (itself included, which is harmless:
        # it has been decided already).
        suppressed |= flat_overlaps[row_base + candidate] & keep_now[:, None]
    return order, kept_by_rank


def per_class_max_confidence(
    boxes: torch.Tensor, class_scores: torch.Tensor, threshold: float, offset: float = 0.0
) -> torch.Tensor:
    """BUTD's selection score: for each class, NMS over all boxes by that class's score; a box's confidence is its
    best score over the classes where it survives (0 where it survives none).

    Args:
        boxes: (R, 4) the candidate boxes (shared by all classes).
        class_scores: (R, K) foreground class probabilities.
        threshold: NMS IoU threshold.
        offset: 1 for Caffe's inclusive-pixel IoU.

    Returns:
        (R,) float32 confidences.
    """
    return batched_max_confidence([boxes], [class_scores], threshold, offset)[0]


def batched_max_confidence(
    boxes: list[torch.Tensor], class_scores: list[torch.Tensor], threshold: float, offset: float = 0.0
) -> list[torch.Tensor]:
    """`per_class_max_confidence` of several images in one loop (one kernel sequence for the whole batch, not one
    per image). Images with fewer boxes are padded with boxes scored -1: they rank last in every class, so they
    never suppress a real box, and they are cut off the results."""
    counts = [len(b) for b in boxes]
    if not boxes or max(counts) == 0:
        return [s.new_zeros(len(s)).float() for s in class_scores]
    num_images, most, num_classes = len(boxes), max(counts), class_scores[0].shape[1]
    device = class_scores[0].device
    padded_boxes = torch.zeros(num_images, most, 4, device=device)
    padded_scores = torch.full((num_images, num_classes, most), -1.0, device=device)  # (G, K, R)
    overlaps = torch.zeros(num_images, most, most, dtype=torch.bool, device=device)
    for index, (image_boxes, scores) in enumerate(zip(boxes, class_scores, strict=True)):
        count = counts[index]
        padded_boxes[index, :count] = image_boxes.float()
        padded_scores[index, :, :count] = scores.float().t()
        overlaps[index, :count, :count] = (
            box_iou(image_boxes.float(), image_boxes.float(), offset) > threshold
        )
    order, kept_by_rank = _greedy_suppression(overlaps, padded_scores)
    # Back from rank order to box order: survives[row, order[row, r]] = kept_by_rank[row, r].
    survives = (
        torch.zeros_like(kept_by_rank).scatter_(1, order, kept_by_rank).view(num_images, num_classes, most)
    )
    confidence = torch.where(survives, padded_scores, torch.zeros_like(padded_scores)).amax(dim=1)  # (G, R)
    return [confidence[index, : counts[index]] for index in range(num_images)]


def select_regions(
    confidence: torch.Tensor, score_threshold: float, min_boxes: int, max_boxes: int
) -> torch.Tensor:
    """Indices of the regions kept, best first: those with confidence >= score_threshold, clamped to
    [min_boxes, max_boxes] by taking the most confident (fewer than min_boxes only if fewer exist)."""
    order = torch.sort(confidence, descending=True, stable=True).indices
    count = int((confidence >= score_threshold).sum())
    count = max(min_boxes, min(count, max_boxes))
    return order[: min(count, confidence.numel())]


# ----------------------------------------------------------------------------------------------------------------------
# Region proposal network
# ----------------------------------------------------------------------------------------------------------------------


class BUTDRPNHead(nn.Module):
    """3x3 conv + ReLU, then a 1x1 conv for one objectness logit per anchor and one for 4 deltas per anchor."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        in_channels = config.res2_out_channels * 4
        self.conv = nn.Conv2d(in_channels, config.rpn_hidden_channels, kernel_size=3, padding=1)
        self.objectness_logits = nn.Conv2d(config.rpn_hidden_channels, config.num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(config.rpn_hidden_channels, config.num_anchors * 4, kernel_size=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(features))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


class BUTDRegionProposalNetwork(nn.Module):
    """Proposals per image: decode every anchor, clip, drop small boxes, keep the `rpn_pre_nms_top_n` best, NMS,
    keep the `rpn_post_nms_top_n` best. The cell anchors are a saved buffer, so a converted checkpoint may carry its
    own (Caffe-rounded) anchors."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.config = config
        self.rpn_head = BUTDRPNHead(config)
        self.register_buffer("cell_anchors", torch.zeros(config.num_anchors, 4))

    def forward(
        self, features: torch.Tensor, image_size: tuple[int, int], scales: list[float]
    ) -> list[torch.Tensor]:
        """features: (B, C, h, w) res4 of B images of the same (H, W) `image_size`; scales: resize scale per image.
        Returns B tensors (R_i, 4) float32 of proposals in network-input pixels, best first."""
        config = self.config
        logits, deltas = self.rpn_head(features.to(self.rpn_head.conv.weight.dtype))
        batch, _, feat_h, feat_w = logits.shape
        # (B, A, h, w) -> (B, h, w, A) -> (B, h * w * A), the order of `grid_anchors`.
        logits = logits.float().permute(0, 2, 3, 1).reshape(batch, -1)
        # (B, A * 4, h, w) -> (B, A, 4, h, w) -> (B, h, w, A, 4) -> (B, h * w * A, 4)
        deltas = (
            deltas.float().view(batch, -1, 4, feat_h, feat_w).permute(0, 3, 4, 1, 2).reshape(batch, -1, 4)
        )
        anchors = grid_anchors(self.cell_anchors.float(), feat_h, feat_w, config.feature_stride)
        offset = float(config.box_size_offset)
        height, width = image_size
        proposals = []
        for index in range(batch):
            boxes = decode_boxes(
                deltas[index],
                anchors,
                config.rpn_box_weights,
                offset=offset,
                scale_clamp=config.box_scale_clamp,
            )
            boxes = clip_boxes(boxes, height, width, offset)
            sides = torch.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) + offset
            min_side = config.rpn_min_size * scales[index]
            keep = sides >= min_side if min_side > 0 else sides > 0
            boxes, scores = boxes[keep], logits[index][keep]
            top = torch.sort(scores, descending=True, stable=True).indices[: config.rpn_pre_nms_top_n]
            boxes, scores = boxes[top], scores[top]
            kept = nms(boxes, scores, config.rpn_nms_threshold, offset)[: config.rpn_post_nms_top_n]
            proposals.append(boxes[kept])
        return proposals


# ----------------------------------------------------------------------------------------------------------------------
# RoI heads
# ----------------------------------------------------------------------------------------------------------------------


class BUTDBoxPredictor(nn.Module):
    """Class logits (background last), class-specific box deltas and attribute logits from pooled RoI features.
    The attribute head embeds the arg-max class (over all classes, background included, as the original) and reads
    it with the feature: [feature, embedding] -> Linear -> ReLU -> Linear."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        hidden = config.hidden_size
        self.cls_score = nn.Linear(hidden, config.num_classes)
        self.bbox_pred = nn.Linear(hidden, 4 * (config.num_classes - 1))
        self.cls_embedding = nn.Embedding(config.num_classes, config.attribute_embedding_dim)
        self.fc_attr = nn.Linear(hidden + config.attribute_embedding_dim, config.attribute_hidden_dim)
        self.attr_score = nn.Linear(config.attribute_hidden_dim, config.num_attributes)

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pooled: (R, hidden). Returns class logits (R, num_classes), deltas (R, 4 * (num_classes - 1)),
        attribute logits (R, num_attributes)."""
        class_logits = self.cls_score(pooled)
        deltas = self.bbox_pred(pooled)
        embedded = self.cls_embedding(class_logits.argmax(dim=-1))
        attr_hidden = F.relu(self.fc_attr(torch.cat([pooled, embedded], dim=-1)))
        return class_logits, deltas, self.attr_score(attr_hidden)


class BUTDRoIHeads(nn.Module):
    """RoI pooling on res4 (roi_pool_size x roi_pool_size), res5, mean pool -> the `hidden_size` region feature."""

    def __init__(self, config: BUTDConfig):
        super().__init__()
        self.config = config
        in_channels = config.res2_out_channels * 4
        self.res5 = make_stage(
            config.res5_depth,
            in_channels,
            config.res2_bottleneck_channels * 8,
            config.hidden_size,
            first_stride=config.res5_first_stride,
            dilation=config.res5_dilation,
            config=config,
        )
        self.box_predictor = BUTDBoxPredictor(config)

    def pool(self, features: torch.Tensor, boxes: list[torch.Tensor]) -> torch.Tensor:
        """features: (B, C, h, w); boxes: B tensors (R_i, 4) in network-input pixels. Returns (sum R_i, C, S, S)."""
        # Pooled in float32: box corners up to ~1000 px lose whole pixels in bf16, and the crops are small.
        rois = [box.float() for box in boxes]
        size, scale = self.config.roi_pool_size, 1.0 / self.config.feature_stride
        if self.config.roi_pooler == "roi_align":
            pooled = ops.roi_align(
                features.float(),
                rois,
                size,
                spatial_scale=scale,
                sampling_ratio=self.config.roi_sampling_ratio,
            )
        else:
            pooled = ops.roi_pool(features.float(), rois, size, spatial_scale=scale)
        return pooled.to(features.dtype)

    def forward(self, pooled: torch.Tensor, chunk_size: int = 512) -> dict[str, torch.Tensor]:
        """pooled: (R, C, S, S) RoI crops. Runs res5 and the heads in chunks of `chunk_size` RoIs.
        Returns float32 "features" (R, hidden), "class_logits", "box_deltas", "attribute_logits"."""
        outputs = {"features": [], "class_logits": [], "box_deltas": [], "attribute_logits": []}
        for start in range(0, pooled.shape[0], chunk_size):
            # (r, hidden, s, s) -> (r, hidden): mean pool as the original's AVE pooling over the whole crop.
            features = self.res5(pooled[start : start + chunk_size]).mean(dim=(2, 3))
            class_logits, deltas, attr_logits = self.box_predictor(features)
            for key, value in zip(outputs, (features, class_logits, deltas, attr_logits), strict=True):
                outputs[key].append(value.float())
        if not outputs["features"]:
            hidden, classes = self.config.hidden_size, self.config.num_classes
            empty = pooled.new_zeros
            return {
                "features": empty(0, hidden).float(),
                "class_logits": empty(0, classes).float(),
                "box_deltas": empty(0, 4 * (classes - 1)).float(),
                "attribute_logits": empty(0, self.config.num_attributes).float(),
            }
        return {key: torch.cat(value) for key, value in outputs.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Pre-trained base and the detector
# ----------------------------------------------------------------------------------------------------------------------


class BUTDPreTrainedModel(PreTrainedModel):
    config_class = BUTDConfig
    config: BUTDConfig
    base_model_prefix = "butd"
    main_input_name = "pixel_values"
    _no_split_modules = ["BUTDBottleneck"]
    # The RPN is small; in fp32 its anchors stay exact and its objectness ranking does not tie in bf16.
    _keep_in_fp32_modules_strict = ["proposal_generator"]

    @torch.no_grad()
    def _init_weights(self, module):
        """Random weights for tests and benchmarks (real ones come from a converted checkpoint). The last norm of
        every residual branch starts at 0.1 so a random 33-block ResNet keeps activations of order one."""
        if isinstance(module, BUTDFrozenBatchNorm2d):
            init.constant_(module.weight, 0.1 if getattr(module, "ends_residual_branch", False) else 1.0)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
        elif isinstance(module, BUTDConv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, BUTDRPNHead):
            for layer in (module.conv, module.objectness_logits, module.anchor_deltas):
                init.normal_(layer.weight, std=0.01)
                init.zeros_(layer.bias)
        elif isinstance(module, BUTDRegionProposalNetwork):
            init.copy_(module.cell_anchors, self._default_cell_anchors())
        elif isinstance(module, BUTDBoxPredictor):
            init.normal_(module.cls_score.weight, std=0.01)
            init.normal_(module.bbox_pred.weight, std=0.001)
            init.normal_(module.cls_embedding.weight, std=0.01)
            init.normal_(module.fc_attr.weight, std=0.01)
            init.normal_(module.attr_score.weight, std=0.01)
            for layer in (module.cls_score, module.bbox_pred, module.fc_attr, module.attr_score):
                init.zeros_(layer.bias)

    def _default_cell_anchors(self) -> torch.Tensor:
        config = self.config
        if config.anchor_style == "caffe":
            return caffe_cell_anchors(config.anchor_sizes, config.anchor_ratios)
        return detectron2_cell_anchors(config.anchor_sizes, config.anchor_ratios)


class BUTDDetector(BUTDPreTrainedModel):
    r"""
    Faster R-CNN ResNet-101 C4 with attribute head, as trained on Visual Genome for bottom-up attention.

    `forward` runs one batch of same-size preprocessed images; `detect` takes raw RGB images, preprocesses them with
    a `BUTDImageProcessor`, groups them by resized shape (no padding ever enters the backbone, so an image gets the
    same regions alone or in a batch) and returns numpy results in original-image pixels.

    Example:

    ```python
    >>> from modeling_imagebert.features import BUTDConfig, BUTDDetector, BUTDImageProcessor
    >>> detector = BUTDDetector.from_pretrained("butd-vg")  # a folder written by convert_checkpoints
    >>> dets = detector.detect([rgb_uint8_image], processor=BUTDImageProcessor())
    >>> dets[0]["features"].shape  # (N, 2048), 10 <= N <= 100
    ```
    """

    def __init__(self, config: BUTDConfig):
        super().__init__(config)
        self.backbone = BUTDBackbone(config)
        self.proposal_generator = BUTDRegionProposalNetwork(config)
        self.roi_heads = BUTDRoIHeads(config)
        self.post_init()

    @torch.no_grad()
    def forward(
        self,
        pixel_values: torch.Tensor,
        scales: list[float] | None = None,
        roi_chunk_size: int = 512,
        original_sizes: list[tuple[int, int]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detect regions in a batch of same-size preprocessed images.

        Args:
            pixel_values: (B, 3, H, W) BGR mean-subtracted pixels (from `BUTDImageProcessor`), all images resized
                to the same (H, W) with no padding.
            scales: resize scale of each image (resized / original); boxes are divided by it. None: 1.0.
            roi_chunk_size: most RoIs through res5 at once (memory bound).
            original_sizes: (height, width) of each original image, where the boxes are clipped; None: the resized
                size divided by the scale, rounded.

        Returns:
            B dicts of tensors: "boxes" float32 (N, 4) x1, y1, x2, y2 in original pixels, "features" float32
            (N, hidden), "classes" int64 (N,) in [0, num_classes - 1), "scores" float32 (N,), "attributes" int64
            (N,) in [0, num_attributes - 1), "attribute_scores" float32 (N,). N follows the selection settings.
        """
        config = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
            raise ValueError(
                f"pixel_values must be (B, {config.num_channels}, H, W), got {tuple(pixel_values.shape)}"
            )
        batch = pixel_values.shape[0]
        scales = [1.0] * batch if scales is None else [float(s) for s in scales]
        image_size = (pixel_values.shape[2], pixel_values.shape[3])
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        features = self.backbone(pixel_values)
        proposals = self.proposal_generator(features, image_size, scales)
        heads = self.roi_heads(self.roi_heads.pool(features, proposals), roi_chunk_size)
        counts = [len(p) for p in proposals]
        per_image = {key: value.split(counts) for key, value in heads.items()}
        confidences = [None] * batch
        if config.final_boxes == "proposals":
            # BUTD's per-class NMS confidence of every proposal, all images in one loop.
            class_probs = [logits.softmax(dim=-1)[:, :-1] for logits in per_image["class_logits"]]
            offset = float(config.box_size_offset)
            confidences = batched_max_confidence(proposals, class_probs, config.nms_threshold, offset)
        results = []
        for index in range(batch):
            outputs = {key: value[index] for key, value in per_image.items()}
            results.append(self._select(outputs, proposals[index], image_size, confidences[index]))
        if config.final_boxes == "regressed":
            # Features of the final boxes: pool again at them and run res5 on those crops only.
            boxes = [result["boxes"] for result in results]
            pooled_again = self.roi_heads(self.roi_heads.pool(features, boxes), roi_chunk_size)["features"]
            for result, feats in zip(results, pooled_again.split([len(b) for b in boxes]), strict=True):
                result["features"] = feats
        if original_sizes is None:
            original_sizes = [(round(image_size[0] / s), round(image_size[1] / s)) for s in scales]
        offset = float(config.box_size_offset)
        for result, scale, original in zip(results, scales, original_sizes, strict=True):
            # Back to original pixels; clipped again because the resized size was rounded (a box may end at
            # 451.5 on a 451-pixel-wide image otherwise).
            result["boxes"] = clip_boxes(result["boxes"] / scale, original[0], original[1], offset)
        return results

    def _select(
        self,
        outputs: dict[str, torch.Tensor],
        proposals: torch.Tensor,
        image_size: tuple[int, int],
        confidence: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Choose one image's final regions from its per-proposal outputs (see `BUTDConfig`, selection);
        `confidence`: the proposals' per-class NMS confidence when already computed."""
        config = self.config
        offset = float(config.box_size_offset)
        class_probs = outputs["class_logits"].softmax(dim=-1)[:, :-1]  # (R, K - 1): background (last) removed
        attr_probs = outputs["attribute_logits"].softmax(dim=-1)[:, :-1]
        scores, classes = class_probs.max(dim=-1) if len(proposals) else (class_probs.new_zeros(0),) * 2
        min_boxes, max_boxes = config.box_bounds
        if config.final_boxes == "proposals":
            boxes = proposals.float()
            if confidence is None:
                confidence = per_class_max_confidence(boxes, class_probs, config.nms_threshold, offset)
            keep = select_regions(confidence, config.score_threshold, min_boxes, max_boxes)
        else:
            # Each proposal refined by its best class's regression; per-class NMS on those boxes.
            rows = torch.arange(len(proposals), device=proposals.device)
            deltas = outputs["box_deltas"].view(len(proposals), -1, 4)[rows, classes]
            boxes = decode_boxes(
                deltas,
                proposals.float(),
                config.roi_box_weights,
                offset=offset,
                scale_clamp=config.box_scale_clamp,
            )
            boxes = clip_boxes(boxes, image_size[0], image_size[1], offset)
            if offset == 0.0:
                survivors = ops.batched_nms(boxes, scores, classes, config.nms_threshold)
            else:
                survivors = torch.cat(
                    [
                        torch.nonzero(classes == c).flatten()[
                            nms(boxes[classes == c], scores[classes == c], config.nms_threshold, offset)
                        ]
                        for c in classes.unique()
                    ]
                    or [classes.new_zeros(0)]
                )
            confidence = torch.zeros_like(scores)
            confidence[survivors] = scores[survivors]
            keep = select_regions(confidence, config.score_threshold, min_boxes, max_boxes)
        attribute_scores, attributes = (
            attr_probs[keep].max(dim=-1) if len(keep) else (attr_probs.new_zeros(0),) * 2
        )
        return {
            "boxes": boxes[keep],
            "features": outputs["features"][keep],
            "classes": classes[keep].long(),
            "scores": scores[keep],
            "attributes": attributes.long(),
            "attribute_scores": attribute_scores,
        }

    @torch.no_grad()
    def features_at_boxes(
        self, image, boxes: np.ndarray, processor=None, roi_chunk_size: int = 512
    ) -> dict[str, np.ndarray]:
        """Pooled features and class / attribute predictions of given boxes (e.g. ground truth, or a reference
        extraction's boxes for a parity check) in one image.

        Args:
            image: RGB uint8 `np.ndarray` (H, W, 3) or PIL image.
            boxes: (N, 4) x1, y1, x2, y2 in original-image pixels.
            processor: a `BUTDImageProcessor` (default settings when None).

        Returns:
            dict of numpy arrays: "features" float32 (N, hidden), "classes" int64 (N,), "scores" float32 (N,),
            "attributes" int64 (N,), "attribute_scores" float32 (N,).
        """
        if processor is None:
            from .image_processing_butd import BUTDImageProcessor

            processor = BUTDImageProcessor()
        boxes = np.asarray(boxes, dtype=np.float32)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must be (N, 4) x1, y1, x2, y2, got shape {boxes.shape}")
        item = processor.preprocess_one(image)
        features = self.backbone(item["pixel_values"][None].to(device=self.device, dtype=self.dtype))
        scaled = torch.from_numpy(boxes).to(self.device) * item["scale"]
        heads = self.roi_heads(self.roi_heads.pool(features, [scaled]), roi_chunk_size)
        scores, classes = heads["class_logits"].softmax(dim=-1)[:, :-1].max(dim=-1)
        attribute_scores, attributes = heads["attribute_logits"].softmax(dim=-1)[:, :-1].max(dim=-1)
        outputs = {
            "features": heads["features"],
            "classes": classes,
            "scores": scores,
            "attributes": attributes,
            "attribute_scores": attribute_scores,
        }
        return {key: value.cpu().numpy() for key, value in outputs.items()}

    @torch.no_grad()
    def detect(
        self,
        images: list,
        processor=None,
        *,
        batch_size: int = 8,
        roi_chunk_size: int = 512,
        names: list[str] | None = None,
        batch_invariant: bool = True,
    ) -> list[dict]:
        """Detect regions in raw images, one result per image, the same whether an image comes alone or in a batch.

        Args:
            images: list of RGB uint8 `np.ndarray` (H, W, 3) or PIL images.
            processor: a `BUTDImageProcessor` (default: shorter side 600, longer at most 1000).
            batch_size: most images of the same resized shape through the network at once (batch_invariant=False).
            roi_chunk_size: most RoIs through res5 at once.
            names: how errors refer to each image.
            batch_invariant: True runs every image through the network alone, so its result is bit-identical
                whatever else is in the call (a convolution's kernel choice depends on the batch size, which moves
                results by ~1e-5). False lets same-shape images share the backbone and RoI batches (faster on a
                GPU when images are small or have few proposals); results then match the single-image ones within
                1e-4. No padding enters the backbone either way.

        Returns:
            list of dicts of numpy arrays: "boxes" float32 (N, 4) x1, y1, x2, y2 in original pixels, "features"
            float32 (N, hidden), "classes" int64 (N,) in [0, num_classes - 1) (background removed), "scores"
            float32 (N,), "attributes" int64 (N,), "attribute_scores" float32 (N,), "image_width" int,
            "image_height" int.
        """
        if processor is None:
            from .image_processing_butd import BUTDImageProcessor

            processor = BUTDImageProcessor()
        prepared = processor(list(images), names=names)
        groups: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(prepared):
            groups.setdefault(tuple(item["image_size"]), []).append(index)
        results: list[dict | None] = [None] * len(prepared)
        step = 1 if batch_invariant else batch_size
        for indices in groups.values():
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                pixel_values = torch.stack([prepared[i]["pixel_values"] for i in chunk])
                detections = self.forward(
                    pixel_values,
                    [prepared[i]["scale"] for i in chunk],
                    roi_chunk_size,
                    [prepared[i]["original_size"] for i in chunk],
                )
                for i, detection in zip(chunk, detections, strict=True):
                    height, width = prepared[i]["original_size"]
                    result = {key: value.cpu().numpy() for key, value in detection.items()}
                    result["boxes"] = result["boxes"].astype(np.float32)
                    result["features"] = result["features"].astype(np.float32)
                    result["image_width"], result["image_height"] = int(width), int(height)
                    results[i] = result
        return results


# `save_pretrained` writes `auto_map` and copies this file and the ones it imports (config, image processor, image
# decoding) beside the weights, so `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads the detector
# without this package.
BUTDDetector.register_for_auto_class("AutoModel")

__all__ = ["BUTDDetector", "BUTDPreTrainedModel"]
