"""Region-feature file formats, each one's reader and writer side by side, below both `data/` and `features/`.

| module               | format                                                                              |
|----------------------|-------------------------------------------------------------------------------------|
| `butd_tsv.py`        | the bottom-up-attention TSV of LXMERT / Oscar                                       |
| `npz.py`             | folders of per-image `.npz` files (UNITER, bottom-up-attention.pytorch)             |
| `shards.py`          | the shards of our extraction runs (Arrow, or the two formats above)                 |
| `features_folder.py` | the folder of an extraction run: marker, shard records, manifest; reading it back   |
| `columns.py`         | the image columns shared by the image-text schema and our shards                    |
| `report.py`          | the error every reader raises and the report counting what an import read and skipped |
| `values.py`          | checked conversions of decoded values (float16 features, int32 classes, counts)     |

`data/importers` reads the BUTD and `.npz` formats (and a features folder) to join them with captions;
`features/runner.py` writes our shards and their folder. An image record, as every reader yields it:

    {"image_id": str, "image_width": int, "image_height": int,
     "region_features": float16 [N, F], "region_boxes": float32 [N, 4] (pixel x1, y1, x2, y2),
     "region_classes": int32 [N], "region_scores": float32 [N][, "global_feature": float32 [G]]}

This package imports only the standard library, numpy, tqdm and the shared modules (`atomic.py`,
`safe_loading.py`); `datasets` is imported by the functions that build or read Arrow columns.
"""

from .butd_tsv import BUTD_TSV_COLUMNS, butd_tsv_row, decode_butd_row, read_butd_tsv, write_butd_tsv
from .columns import GLOBAL_FEATURE_COLUMN, IMAGE_COLUMNS, global_feature_column, image_columns
from .features_folder import ExtractionError, iter_extracted_records, load_features
from .npz import decode_npz_record, npz_arrays, read_npz_dir, read_npz_file, write_npz_folder
from .report import ImportFormatError, ImportReport
from .shards import (
    OUTPUT_FORMATS,
    image_features_schema,
    read_shard_records,
    record_problem,
    shard_name,
    write_shard,
)

__all__ = [
    "BUTD_TSV_COLUMNS",
    "GLOBAL_FEATURE_COLUMN",
    "IMAGE_COLUMNS",
    "OUTPUT_FORMATS",
    "ExtractionError",
    "ImportFormatError",
    "ImportReport",
    "butd_tsv_row",
    "decode_butd_row",
    "decode_npz_record",
    "global_feature_column",
    "image_columns",
    "image_features_schema",
    "iter_extracted_records",
    "load_features",
    "npz_arrays",
    "read_butd_tsv",
    "read_npz_dir",
    "read_npz_file",
    "read_shard_records",
    "record_problem",
    "shard_name",
    "write_butd_tsv",
    "write_npz_folder",
    "write_shard",
]
