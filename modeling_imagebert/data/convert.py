"""Convert detector features + captions from their standard files into an image-text dataset on disk.

Examples:

    # Flickr30k test split, LXMERT-style bottom-up-attention TSV features
    python -m modeling_imagebert.data.convert butd-tsv flickr30k_obj36.tsv \\
        --captions dataset_flickr30k.json --format karpathy --split test --output data/flickr30k_test

    # COCO Karpathy train (+restval) from UNITER .npz dumps whose boxes are normalised
    python -m modeling_imagebert.data.convert npz npz/coco_train2014 npz/coco_val2014 \\
        --captions dataset_coco.json --format karpathy --split train --image-id-style filename \\
        --image-size 640 480 --output data/coco_train --num-shards 64

    # images through our own extractor (python -m modeling_imagebert.features ... --output feats/flickr30k)
    python -m modeling_imagebert.data.convert features feats/flickr30k \\
        --captions dataset_flickr30k.json --format karpathy --split train --output data/flickr30k_train

    # Conceptual Captions / SBU
    python -m modeling_imagebert.data.convert npz cc_npz --captions Train_GCC-training.tsv --format cc ...
    python -m modeling_imagebert.data.convert npz sbu_npz --captions SBU_captioned_photo_dataset_captions.txt \\
        --urls SBU_captioned_photo_dataset_urls.txt --format sbu --image-id-style photo_id ...

Prints a summary (rows written, skips by reason, output path). Bad input ends the program with exit status 2
and a one-line error naming the file, line or record, image id and field (`--debug` shows the traceback).

The output folder carries a marker file (`modeling_imagebert.atomic.MARKER_NAME`); `--overwrite` replaces only a
folder with that marker, never the current folder, a folder above it, or one that is or holds an input. Temporary
folders beside the output are named after it and this process, so a run killed by SIGKILL leaves folders that the
next run of the same command removes (saying so on stderr).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..atomic import check_removable, remove_stale_temporaries, temporary_sibling
from ..cli import run_cli
from ..feature_formats import iter_extracted_records
from .importers import (
    KARPATHY_IMAGE_ID_STYLES,
    ImportFormatError,
    ImportReport,
    build_pair_dataset,
    read_butd_tsv,
    read_cc_captions,
    read_karpathy_captions,
    read_npz_dir,
    read_sbu_captions,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_imagebert.data.convert",
        description="Join detector region features with captions into an ImageBERT image-text dataset "
        "(one row per caption, float16 region features) saved as sharded Arrow files.",
    )
    parser.add_argument(
        "feature_format",
        choices=["butd-tsv", "npz", "features"],
        help="butd-tsv: bottom-up-attention TSV files as used by LXMERT/Oscar (no header; img_id, img_h, img_w, "
        "objects_id, objects_conf, attrs_id, attrs_conf, num_boxes, boxes, features; base64 arrays). "
        "npz: folders of per-image <image_id>.npz files (UNITER or bottom-up-attention.pytorch keys). "
        "features: folders written by python -m modeling_imagebert.features (any of its output formats; "
        "global_feature is carried over when present).",
    )
    parser.add_argument(
        "features",
        nargs="+",
        type=Path,
        help="the TSV file(s), .npz folder(s) or features folder(s), read in the order given",
    )
    parser.add_argument("--captions", required=True, type=Path, help="the caption file (see --format)")
    parser.add_argument(
        "--format",
        dest="caption_format",
        required=True,
        choices=["karpathy", "cc", "sbu"],
        help="karpathy: Karpathy-split JSON (dataset_flickr30k.json / dataset_coco.json), needs --split; "
        "cc: Conceptual Captions TSV (caption<TAB>url, no header); sbu: SBU captions file, needs --urls",
    )
    parser.add_argument(
        "--split",
        choices=["train", "val", "test", "restval"],
        help="Karpathy split to convert (train includes COCO restval unless --no-restval-as-train)",
    )
    parser.add_argument(
        "--no-restval-as-train",
        dest="restval_as_train",
        action="store_false",
        help="with --split train, leave out COCO's restval images",
    )
    parser.add_argument(
        "--image-id-style",
        default=None,
        help=f"how caption image ids are formed to match feature ids. karpathy: one of {KARPATHY_IMAGE_ID_STYLES} "
        "(default filename: Flickr '1000092795', COCO 'COCO_val2014_000000391895' as in LXMERT/Oscar TSVs; "
        "cocoid: '391895'); sbu: line (0-based line index, default) or photo_id (Flickr id in the URL); "
        "cc: a str.format template with {row} (0-based line index, default '{row}') and {url_sha1}",
    )
    parser.add_argument(
        "--cc-id-column",
        type=int,
        default=None,
        help="cc: 0-based TSV column that holds the image id (instead of --image-id-style)",
    )
    parser.add_argument("--urls", type=Path, help="sbu: the URLs file, line-aligned with --captions")
    parser.add_argument("--output", required=True, type=Path, help="output folder (save_dataset layout)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace --output if it exists and was written by this package (it carries our marker file); a "
        "folder without the marker, the current folder, or one holding an input is never replaced",
    )
    parser.add_argument(
        "--feature-dim",
        type=int,
        default=None,
        help="region feature dimension F; every image must match (default: taken from the first image)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="when given, detector class ids must lie in [0, N)"
    )
    parser.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="a corrupt feature record or caption line, or an invalid image record: stop with an error "
        "(raise, default) or skip it and count it in the summary (skip)",
    )
    parser.add_argument(
        "--on-missing",
        choices=["raise", "skip"],
        default="skip",
        help="captions whose image has no features: skip and count them (default) or stop with an error",
    )
    parser.add_argument(
        "--on-duplicate",
        choices=["raise", "skip"],
        default="raise",
        help="an image id found twice in the features, or an image id / file name found twice in a Karpathy "
        "caption file: stop with an error (default) or keep the first and count the rest in the summary",
    )
    parser.add_argument(
        "--cc-header",
        choices=["auto", "none", "skip"],
        default="auto",
        help="cc: a header line is detected and skipped (auto, default; counted in the summary), read as data "
        "(none) or the first line is always skipped (skip)",
    )
    parser.add_argument(
        "--image-size",
        nargs=2,
        type=int,
        metavar=("W", "H"),
        help="npz: image size in pixels for files without image_w/image_h (needed with normalised norm_bb)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="npz: read the pickled 'info' entry of bottom-up-attention.pytorch dumps through a restricted unpickler "
        "that admits only plain containers, numbers and numeric arrays; nothing else is ever unpickled",
    )
    parser.add_argument("--num-shards", type=int, default=None, help="write exactly this many Arrow shards")
    parser.add_argument(
        "--max-shard-size", default="500MB", help="largest Arrow shard when --num-shards is not given"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    # `run_cli` takes --debug out before parsing; it is declared here so that --help lists it.
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line summary"
    )
    return parser


def _captions(args: argparse.Namespace, report: ImportReport) -> Iterator[tuple[str, str]]:
    style = args.image_id_style
    if args.caption_format == "karpathy":
        if args.split is None:
            raise ValueError("--format karpathy needs --split (train, val, test or restval)")
        return read_karpathy_captions(
            args.captions,
            args.split,
            image_id_style=style or "filename",
            restval_as_train=args.restval_as_train,
            on_duplicate=args.on_duplicate,
            report=report,
        )
    if args.caption_format == "cc":
        return read_cc_captions(
            args.captions,
            id_column=args.cc_id_column,
            id_format=style or "{row}",
            header=args.cc_header,
            on_error=args.on_error,
            report=report,
        )
    if args.urls is None:
        raise ValueError("--format sbu needs --urls (SBU_captioned_photo_dataset_urls.txt)")
    return read_sbu_captions(
        args.captions, args.urls, image_id_style=style or "line", on_error=args.on_error, report=report
    )


def _images(args: argparse.Namespace, report: ImportReport) -> Iterator[dict]:
    show = not args.no_progress
    for source in args.features:
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such file or folder")
    for source in args.features:
        if args.feature_format == "butd-tsv":
            yield from read_butd_tsv(
                source,
                feature_dim=args.feature_dim,
                on_error=args.on_error,
                report=report,
                show_progress=show,
            )
        elif args.feature_format == "features":
            for record in iter_extracted_records(source):
                report.images_read += 1
                yield record
        else:
            yield from read_npz_dir(
                source,
                feature_dim=args.feature_dim,
                image_size=tuple(args.image_size) if args.image_size else None,
                allow_pickle=args.allow_pickle,
                on_error=args.on_error,
                report=report,
                show_progress=show,
            )


def _inputs(args: argparse.Namespace) -> list[Path]:
    """Every path the conversion reads: the output may not be, or hold, any of them."""
    return [*args.features, args.captions, *([args.urls] if args.urls is not None else [])]


def convert(args: argparse.Namespace) -> ImportReport:
    """Run one conversion described by parsed command-line arguments; returns the report.

    Temporaries of an earlier run of the same command that was killed are removed first (and reported on
    stderr); an existing `--output` is replaced only with `--overwrite` and only when it is ours to replace.
    """
    from .storage import save_dataset

    for stale in remove_stale_temporaries(args.output):
        print(f"note: removed {stale}, left by an interrupted earlier run", file=sys.stderr)
    if args.output.exists() or args.output.is_symlink():
        if not args.overwrite:
            raise FileExistsError(
                f"{args.output}: exists ; pass --overwrite to replace it or choose another --output"
            )
        check_removable(args.output, inputs=_inputs(args))
    if args.num_shards is not None and args.num_shards < 1:
        raise ValueError(
            f"--num-shards: expected an int >= 1, got {args.num_shards} ; pass a positive count or omit it"
        )
    report = ImportReport()
    captions = _captions(args, report)
    images = _images(args, report)
    first = next(images, None)
    if first is None:
        raise ImportFormatError("no usable image records in the feature input", source=args.features[0])
    feature_dim = args.feature_dim or int(first["region_features"].shape[1])
    # The join writes an Arrow file before the save copies it into shards: keep that intermediate copy next
    # to the output (same disk) and delete it afterwards, instead of leaving it in the datasets cache.
    # Named as a temporary of the output (kind "join"), so a run killed here leaves a folder the next run removes.
    cache_dir = temporary_sibling(args.output.absolute(), "join")
    try:
        dataset = build_pair_dataset(
            captions,
            itertools.chain([first], images),
            feature_dim=feature_dim,
            on_missing=args.on_missing,
            on_duplicate=args.on_duplicate,
            on_invalid=args.on_error,
            num_classes=args.num_classes,
            report=report,
            show_progress=not args.no_progress,
            cache_dir=cache_dir,
        )
        # Every image record was validated by build_pair_dataset and the columns come from the schema
        # itself, so the save does not validate all rows a second time.
        save_dataset(
            dataset,
            args.output,
            num_shards=args.num_shards,
            max_shard_size=args.max_shard_size,
            validate=False,
            feature_dim=feature_dim,
            num_classes=args.num_classes,
            overwrite=args.overwrite,
            written_by="python -m modeling_imagebert.data.convert",
            inputs=_inputs(args),
        )
        del dataset
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return report


def _main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.no_progress:
        import datasets

        datasets.disable_progress_bars()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = convert(args)
    print(f"wrote {report.rows_written} rows to {args.output}")
    print(report.summary())


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 2 on bad input). `run_cli` reads
    `--debug` (listed in `--help`) before the parser; DataValidationError's per-problem lines become one line."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
