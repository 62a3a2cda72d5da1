"""Write tiny files in exactly the real feature and caption formats, for importer tests.

Each writer mirrors how the original tools produce the files (LXMERT/Oscar bottom-up-attention TSV via
`csv.DictWriter` with base64 of raw numpy buffers, UNITER and bottom-up-attention.pytorch `.npz` dumps,
Karpathy-split JSON, Conceptual Captions TSV, SBU caption/URL files), so the importers are tested against
the formats, not against themselves.
"""

from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np

BUTD_FIELDNAMES = [
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
]


def make_detections(
    image_id: str, num_boxes: int, feature_dim: int, seed: int, width: int = 640, height: int = 480
):
    """A detector output for one image, as the extraction scripts hold it before writing (float32 / int64)."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, width / 2, num_boxes)
    y1 = rng.uniform(0, height / 2, num_boxes)
    x2 = x1 + rng.uniform(1, width / 2, num_boxes)
    y2 = y1 + rng.uniform(1, height / 2, num_boxes)
    return {
        "img_id": image_id,
        "img_h": height,
        "img_w": width,
        "objects_id": rng.integers(0, 1600, num_boxes).astype(np.int64),
        "objects_conf": np.sort(rng.uniform(0.2, 1.0, num_boxes).astype(np.float32))[::-1].copy(),
        "attrs_id": rng.integers(0, 400, num_boxes).astype(np.int64),
        "attrs_conf": rng.uniform(0, 1, num_boxes).astype(np.float32),
        "num_boxes": num_boxes,
        "boxes": np.stack([x1, y1, x2, y2], axis=1).astype(np.float32),
        # ReLU-pooled features with values that are not exact in float16
        "features": (rng.random((num_boxes, feature_dim)) * 7.3).astype(np.float32),
    }


def butd_fields(detections: dict) -> dict:
    """The TSV fields of one image: ints as text, arrays as base64 of their raw buffers (LXMERT layout)."""
    fields = {}
    for key in BUTD_FIELDNAMES:
        value = detections[key]
        if isinstance(value, np.ndarray):
            fields[key] = base64.b64encode(value.tobytes()).decode("ascii")
        else:
            fields[key] = str(value)
    return fields


def write_butd_tsv(path: str | Path, images: list[dict], rows: list[dict] | None = None) -> Path:
    """Write images (from `make_detections`) as a headerless tab-separated file; `rows` overrides the encoded
    fields (to write corrupt rows)."""
    path = Path(path)
    rows = rows if rows is not None else [butd_fields(image) for image in images]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=BUTD_FIELDNAMES, delimiter="\t")
        for row in rows:
            writer.writerow(row)
    return path


def norm_bb(boxes: np.ndarray, width: int, height: int, with_area: bool = False) -> np.ndarray:
    """UNITER's normalised boxes: x1, y1, x2, y2, w, h (and area) divided by the image size."""
    x1, y1, x2, y2 = (boxes[:, i] / s for i, s in enumerate((width, height, width, height)))
    columns = [x1, y1, x2, y2, x2 - x1, y2 - y1]
    if with_area:
        columns.append((x2 - x1) * (y2 - y1))
    return np.stack(columns, axis=1).astype(np.float32)


def write_uniter_npz(folder: str | Path, detections: dict, num_classes: int = 1600, with_size: bool = False):
    """A UNITER-style dump: features, norm_bb, conf, soft_labels (N x (K+1), column 0 background)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = detections["num_boxes"]
    soft = np.full((n, num_classes + 1), 0.1 / num_classes, dtype=np.float32)
    soft[:, 0] = 0.05  # background never wins
    soft[np.arange(n), detections["objects_id"] + 1] = 0.9
    arrays = {
        "features": detections["features"],
        "norm_bb": norm_bb(detections["boxes"], detections["img_w"], detections["img_h"]),
        "conf": detections["objects_conf"],
        "soft_labels": soft,
    }
    if with_size:
        arrays["image_w"] = np.array(detections["img_w"])
        arrays["image_h"] = np.array(detections["img_h"])
    path = folder / f"{detections['img_id']}.npz"
    np.savez_compressed(path, **arrays)
    return path


def write_bua_npz(folder: str | Path, detections: dict):
    """A bottom-up-attention.pytorch dump: x, bbox (pixels), num_bbox, image_h, image_w, info (pickled dict
    with objects_id and objects_conf)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    info = {
        "image_id": detections["img_id"],
        "image_h": detections["img_h"],
        "image_w": detections["img_w"],
        "num_boxes": detections["num_boxes"],
        "objects_id": detections["objects_id"],
        "objects_conf": detections["objects_conf"],
    }
    path = folder / f"{detections['img_id']}.npz"
    np.savez_compressed(
        path,
        x=detections["features"],
        bbox=detections["boxes"],
        num_bbox=detections["num_boxes"],
        image_h=detections["img_h"],
        image_w=detections["img_w"],
        info=info,
    )
    return path


def write_karpathy_json(path: str | Path, dataset: str, images: list[dict]) -> Path:
    """A Karpathy-split JSON. `images`: dicts with "name" (Flickr "1000092795" / COCO
    "COCO_val2014_000000391895"), "split" and "captions" (list of str); COCO entries get filepath/cocoid."""
    entries, sentence_id = [], 0
    for index, image in enumerate(images):
        sentences, sentids = [], []
        for caption in image["captions"]:
            tokens = [t.strip(".,").lower() for t in caption.split()]
            sentences.append({"tokens": tokens, "raw": caption, "imgid": index, "sentid": sentence_id})
            sentids.append(sentence_id)
            sentence_id += 1
        entry = {
            "sentids": sentids,
            "imgid": index,
            "sentences": sentences,
            "split": image["split"],
            "filename": image["name"] + ".jpg",
        }
        if dataset == "coco":
            entry["filepath"] = image["name"].split("_")[1]
            entry["cocoid"] = int(image["name"].rsplit("_", 1)[1])
        entries.append(entry)
    Path(path).write_text(json.dumps({"images": entries, "dataset": dataset}))
    return Path(path)


def write_cc_tsv(path: str | Path, pairs: list[tuple[str, str]]) -> Path:
    """Conceptual Captions: caption<TAB>url per line, no header."""
    Path(path).write_text("".join(f"{caption}\t{url}\n" for caption, url in pairs), encoding="utf-8")
    return Path(path)


def write_sbu(captions_path: str | Path, urls_path: str | Path, pairs: list[tuple[str, str]]):
    """SBU: one caption per line and one URL per line, line-aligned."""
    Path(captions_path).write_text("".join(f"{caption}\n" for caption, _ in pairs), encoding="utf-8")
    Path(urls_path).write_text("".join(f"{url}\n" for _, url in pairs), encoding="utf-8")
    return Path(captions_path), Path(urls_path)
