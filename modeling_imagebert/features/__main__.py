"""Command line: extract BUTD region features (and optionally global CNN features) from images into a features
folder that `python -m modeling_imagebert.data.convert features` joins with captions.

Examples:

    # a folder of JPEGs (ids = file names without extension, as Karpathy's JSON names Flickr30k / COCO images)
    python -m modeling_imagebert.features images/flickr30k --detector checkpoints/butd-vg --output feats/flickr30k

    # webdataset shards written by img2dataset, the paper's fixed 100 boxes, on 4 GPUs
    accelerate launch --num_processes 4 -m modeling_imagebert.features shards/{00000..00099}.tar \\
        --source webdataset --detector checkpoints/butd-vg --num-boxes 100 --output feats/cc

A killed run is resumed by running the same command again. Exit status 0 on success, 2 on bad input (one line
naming the file and what was expected); bad images never stop a run: they are listed in skipped.tsv.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from ..cli import run_cli
from ..cli_arguments import DefaultsHelpFormatter
from ..feature_formats.shards import OUTPUT_FORMATS
from ..safe_loading import loading_weights
from .images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE
from .sources import ID_STYLES, SOURCE_KINDS

DTYPES = ("float32", "float16", "bfloat16")
GLOBAL_MODEL_NAMES = ("resnet152", "densenet161", "googlenet")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_imagebert.features",
        description="Extract bottom-up-attention region features (Faster R-CNN, Visual Genome) from images into "
        "resumable shards:\na features folder for `python -m modeling_imagebert.data.convert features`, or BUTD TSV "
        "/ per-image .npz\nfiles. Run the same command again to resume a killed run.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        help="image folder(s), list file(s), one saved `datasets` folder, or webdataset .tar shards (see --source)",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="the features folder (created; resumed if ours)"
    )
    parser.add_argument(
        "--source",
        choices=SOURCE_KINDS,
        default=None,
        help="input kind: folder (searched recursively), list (a text file: path or path<TAB>image_id per line), "
        "hf (a Dataset.save_to_disk folder with an Image column), webdataset (img2dataset .tar shards); "
        "default: guessed from the first input (.tar -> webdataset, a folder with state.json -> hf, another "
        "folder -> folder, a file -> list)",
    )
    parser.add_argument(
        "--id-style",
        choices=ID_STYLES,
        default="stem",
        help="folder / list ids: file name "
        "without extension (stem) or relative path without extension (relative)",
    )
    parser.add_argument("--image-column", default="image", help="hf: the datasets.Image column")
    parser.add_argument(
        "--id-column", default=None, help="hf: the column with image ids (default: row index)"
    )
    parser.add_argument(
        "--detector",
        type=Path,
        required=True,
        help="a folder written by BUTDDetector.save_pretrained (see modeling_imagebert.features.convert_checkpoints "
        "to make one from the original weights); its preprocessor_config.json, when present, sets the resizing",
    )
    boxes = parser.add_mutually_exclusive_group()
    boxes.add_argument(
        "--num-boxes",
        type=int,
        default=None,
        help="keep exactly this many regions per image (36, or 100 as the paper)",
    )
    boxes.add_argument(
        "--adaptive",
        nargs=2,
        type=int,
        metavar=("MIN", "MAX"),
        default=None,
        help="keep the regions above the detector's score threshold, at least MIN and at most MAX (default: the "
        "detector config's min_boxes / max_boxes, 10 and 100 for the VG model)",
    )
    parser.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        default="dataset",
        help="dataset: Arrow shards in our schema; butd-tsv: LXMERT/Oscar TSV; npz: per-image .npz files",
    )
    parser.add_argument(
        "--global-model",
        choices=GLOBAL_MODEL_NAMES,
        default=None,
        help="also write an average-pooled ImageNet CNN feature per image as global_feature (paper ablation)",
    )
    parser.add_argument(
        "--global-weights",
        type=Path,
        default=None,
        help="the global model's torchvision state dict (default: torchvision's cache, "
        "torch.hub.get_dir()/checkpoints/<file name>); nothing is downloaded",
    )
    parser.add_argument(
        "--shard-size", type=int, default=500, help="images per output shard (the resume unit)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images decoded and handed to the detector at once (sharing network batches only with --batched)",
    )
    parser.add_argument(
        "--batched",
        action="store_true",
        help="let same-size images share the detector's network batches: faster on a GPU, features within 1e-4 "
        "of the single-image ones; by default every image goes through the network alone, so its features are bit "
        "for bit the single-image ones whatever the batch size",
    )
    parser.add_argument(
        "--device",
        default="auto",
        help="torch device; auto: this process's accelerate device (cuda:i) or cpu",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="detector weights and activations")
    parser.add_argument("--num-workers", type=int, default=4, help="threads reading and decoding images")
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="skip images with more pixels than this (decompression bombs); 0 turns the check off (>= 0)",
    )
    parser.add_argument(
        "--min-side",
        type=int,
        default=DEFAULT_MIN_SIDE,
        help="skip images whose shorter side is below this (0: no minimum)",
    )
    parser.add_argument(
        "--write-captions",
        action="store_true",
        help="webdataset: also write OUTPUT/captions.tsv (caption<TAB>url<TAB>image_id from each sample's .txt and "
        ".json), for `python -m modeling_imagebert.data.convert features OUTPUT --captions OUTPUT/captions.tsv "
        "--format cc --cc-id-column 2`",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


# The numeric flags and the smallest value each accepts (checked before anything is listed or loaded): a count
# below it would run and silently do nothing useful (`--max-pixels -1` skipped every image as a bomb).
_FLAG_MINIMUMS = {
    "num_boxes": (1, "regions kept per image"),
    "shard_size": (1, "images per shard"),
    "batch_size": (1, "images per detector call"),
    "num_workers": (1, "reading threads"),
    "max_pixels": (0, "pixels, 0 turns the check off"),
    "min_side": (0, "pixels, 0 turns the check off"),
}


def check_flags(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first numeric flag below its minimum (`_FLAG_MINIMUMS`), or an `--adaptive`
    pair that is not 1 <= MIN <= MAX."""
    for name, (minimum, meaning) in _FLAG_MINIMUMS.items():
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(
                f"--{name.replace('_', '-')}: expected an integer >= {minimum} ({meaning}), got {value}"
            )
    if args.adaptive is not None and not 1 <= args.adaptive[0] <= args.adaptive[1]:
        raise ValueError(f"--adaptive: expected 1 <= MIN <= MAX, got {args.adaptive[0]} {args.adaptive[1]}")


def _guess_source(first: Path) -> str:
    if first.suffix == ".tar":
        return "webdataset"
    if first.is_dir():
        return "hf" if (first / "state.json").is_file() else "folder"
    return "list"


def _load_detector(args: argparse.Namespace, device):
    import torch

    from .configuration_butd import BUTDConfig
    from .image_processing_butd import BUTDImageProcessor
    from .modeling_butd import BUTDDetector

    if not (args.detector / "config.json").is_file():
        raise FileNotFoundError(
            f"{args.detector}: no config.json; expected a folder written by BUTDDetector.save_pretrained"
        )
    config = BUTDConfig.from_pretrained(args.detector)
    if args.num_boxes is not None:
        if args.num_boxes < 1:
            raise ValueError(f"--num-boxes must be >= 1, got {args.num_boxes}")
        config.fixed_boxes = args.num_boxes
    elif args.adaptive is not None:
        low, high = args.adaptive
        if not 1 <= low <= high:
            raise ValueError(f"--adaptive needs 1 <= MIN <= MAX, got {low} {high}")
        config.fixed_boxes, config.min_boxes, config.max_boxes = None, low, high
    dtype = getattr(torch, args.dtype)
    with loading_weights(
        args.detector, "a detector folder written by convert_checkpoints or save_pretrained"
    ):
        detector = BUTDDetector.from_pretrained(args.detector, config=config, dtype=dtype).to(device).eval()
    if (args.detector / "preprocessor_config.json").is_file():
        processor = BUTDImageProcessor.from_pretrained(args.detector)
    else:
        processor = BUTDImageProcessor()
    description = {
        "weights": str(args.detector.absolute()),
        "dtype": args.dtype,
        "box_bounds": list(config.box_bounds),
        "score_threshold": config.score_threshold,
        "final_boxes": config.final_boxes,
        "min_size": processor.min_size,
        "max_size": processor.max_size,
    }
    return detector, processor, config, description


def extract(args: argparse.Namespace):
    """Run one extraction described by parsed arguments; returns the `ExtractionSummary`."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..atomic import atomic_write_text
    from .global_features import GlobalFeatureExtractor
    from .runner import run_extraction
    from .sources import list_images, webdataset_captions

    # Several CPU processes (ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu ...) join a gloo group only when
    # the state is made with cpu=True.
    state = PartialState(cpu=args.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU"))
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != state.num_processes:
        raise ValueError(
            f"launched as {launched} processes but accelerate set up {state.num_processes}: they would write the "
            "same shards; on CPU launch with ACCELERATE_USE_CPU=1 (and --multi_gpu), or pass --device cpu"
        )
    device = state.device if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device on this machine; use --device cpu")
    kind = args.source or _guess_source(args.inputs[0])
    if args.write_captions and kind != "webdataset":
        raise ValueError(
            f"--write-captions reads img2dataset .txt captions: it needs --source webdataset, not {kind}"
        )
    refs = list_images(
        kind, args.inputs, id_style=args.id_style, image_column=args.image_column, id_column=args.id_column
    )
    if not refs:
        raise ValueError(f"no images found in {[str(path) for path in args.inputs]} (source kind {kind})")
    detector, processor, config, description = _load_detector(args, device)
    global_extractor = None
    if args.global_model is not None:
        global_extractor = GlobalFeatureExtractor.from_local_weights(args.global_model, args.global_weights)
        global_extractor = global_extractor.to(device=device, dtype=getattr(torch, args.dtype))

    @torch.inference_mode()
    def detect(images):
        return detector.detect(
            images, processor=processor, batch_size=args.batch_size, batch_invariant=not args.batched
        )

    summary = run_extraction(
        refs,
        args.output,
        detect=detect,
        feature_dim=config.hidden_size,
        detector_settings=description,
        output_format=args.output_format,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        exact=not args.batched,
        global_extractor=global_extractor,
        max_pixels=args.max_pixels or None,
        min_side=args.min_side,
        num_workers=args.num_workers,
        rank=state.process_index,
        world_size=state.num_processes,
        barrier=state.wait_for_everyone if state.num_processes > 1 else None,
        show_progress=not args.no_progress,
        log=partial(print, file=sys.stderr),
    )
    if args.write_captions and state.is_main_process:
        lines = [
            f"{caption}\t{url}\t{key}\n" for key, caption, url in webdataset_captions(args.inputs) if caption
        ]
        atomic_write_text(args.output / "captions.tsv", "".join(lines))
    return summary


def _main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    check_flags(args)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    summary = extract(args)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(summary.text())


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 on success, 2 on bad input)."""
    # ImageSourceError, ExtractionError and DataValidationError are ValueErrors; their messages name the fix.
    return run_cli(_main, argv, errors=(ValueError, OSError), hint=False)


if __name__ == "__main__":
    sys.exit(main())
