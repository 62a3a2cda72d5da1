"""Importers: read detector features and captions from their standard files into the image-text schema.

Every format is read by a function of one record (one TSV row, one `.npz` file, one caption entry) wrapped
by a generator over a file or folder, so the record functions can also run under `datasets.map` or a
cluster engine. Image records (the features of one image) are plain dicts:

    {"image_id": str, "image_width": int, "image_height": int,
     "region_features": float16 [N, F], "region_boxes": float32 [N, 4] (pixel x1, y1, x2, y2),
     "region_classes": int32 [N], "region_scores": float32 [N]}

Captions are `(image_id, caption)` pairs. `build_pair_dataset` joins both into a `datasets.Dataset` in the
schema of `modeling_imagebert.data.schema.image_text_features` (one row per caption).

Bad input raises `ImportFormatError` naming the file, the line or record, the image id and the field; with
`on_error="skip"` the record is skipped instead, counted by reason in an `ImportReport` and logged, never
silently dropped.

Formats, one module each:

- bottom-up-attention TSV as written for LXMERT / Oscar (`read_butd_tsv`) and folders of per-image `.npz` files,
  UNITER or bottom-up-attention.pytorch keys (`read_npz_dir`): the feature formats live with their writers in
  `modeling_imagebert.feature_formats` (below `data/` and `features/`, which both use them) and are exported here.
- Karpathy-split caption JSON for Flickr30k and COCO (`karpathy.py`, `read_karpathy_captions`).
- Conceptual Captions TSV (`conceptual_captions.py`, `read_cc_captions`) and SBU captions + URL files (`sbu.py`,
  `read_sbu_captions`); `text_files.py` reads their lines.
- the join of captions with image records (`join.py`, `build_pair_dataset`).

`modeling_imagebert.data.importers` is the public import path of every name below.
"""

from ...feature_formats.butd_tsv import BUTD_TSV_COLUMNS, decode_butd_row, read_butd_tsv
from ...feature_formats.npz import decode_npz_record, read_npz_dir, read_npz_file
from ...feature_formats.report import ImportFormatError, ImportReport
from .conceptual_captions import read_cc_captions
from .join import build_pair_dataset, make_pair_row
from .karpathy import KARPATHY_IMAGE_ID_STYLES, karpathy_image_id, read_karpathy_captions
from .sbu import read_sbu_captions, sbu_photo_id

__all__ = [
    "BUTD_TSV_COLUMNS",
    "KARPATHY_IMAGE_ID_STYLES",
    "ImportFormatError",
    "ImportReport",
    "build_pair_dataset",
    "decode_butd_row",
    "decode_npz_record",
    "karpathy_image_id",
    "make_pair_row",
    "read_butd_tsv",
    "read_cc_captions",
    "read_karpathy_captions",
    "read_npz_dir",
    "read_npz_file",
    "read_sbu_captions",
    "sbu_photo_id",
]
