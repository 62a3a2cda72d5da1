#!/usr/bin/env python
"""Full-ranking image-text retrieval evaluation of an ImageBERT checkpoint (zero-shot or fine-tuned).

Every caption of the test split is scored against every image (image retrieval: each caption ranks all images;
text retrieval: each image ranks all captions, any of its ground-truth captions counting), then R@1/5/10 are
reported in both directions, laid out like Table 2 of the ImageBERT paper.

One process:

    python examples/evaluate_retrieval.py --model outputs/imagebert-demo/final --toy   # the demo's zero-shot table
    python examples/evaluate_retrieval.py --model runs/retrieval --dataset data/coco_karpathy --split test \
        --protocol coco_1k --bf16 --cache_dir cache/coco --output_json coco.json --output_markdown coco.md

Several GPUs (the shards of caption rows are split across processes; every process gets the full matrix):

    accelerate launch --num_processes 8 examples/evaluate_retrieval.py --model ... --dataset ... --protocol coco_5k

Two CPU processes (to check data parallelism without a GPU):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no examples/evaluate_retrieval.py --model ... --toy

With `--cache_dir`, an interrupted evaluation restarted with the same arguments resumes with the shards it lacks.
A `--dataset` is validated first (every value of every row, as run_pretrain validates its data): a NaN or infinite
feature, or a box outside its image, is one `error:` line naming the row and field, never a table of metrics.

Two-stage (embeddings from the same encoder pick K candidates per query in each direction, the cross-encoder
re-ranks them; reports stage 1 alone, two-stage and, with --full_ranking, full ranking, with passes and wall times):

    python examples/evaluate_retrieval.py --model runs/retrieval --toy --candidates 16 --full_ranking \
        --output_json two_stage.json --recall_plot recall_vs_k.png
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from modeling_imagebert import ImageBertForPreTraining, ImageBertForRetrieval
from modeling_imagebert.atomic import atomic_write_bytes, check_output_outside_inputs
from modeling_imagebert.cli_arguments import DefaultsHelpFormatter, check_local_model_path
from modeling_imagebert.data.toy_world import DEMO_TOY_TEST_SPLIT, DEMO_TOY_WORLD
from modeling_imagebert.pretraining.recipes import DatasetSpec
from modeling_imagebert.pretraining.stage_checks import check_source
from modeling_imagebert.processing_imagebert import ImageBertProcessor
from modeling_imagebert.retrieval.evaluation import PROTOCOLS, evaluate_retrieval
from modeling_imagebert.retrieval.two_stage import FINAL_SCORES, evaluate_two_stage
from modeling_imagebert.safe_loading import loading_weights

HEADS = {"itm": ImageBertForPreTraining, "retrieval": ImageBertForRetrieval}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument(
        "--model_name_or_path",
        "--model",
        dest="model",
        required=True,
        help="checkpoint folder (save_pretrained)",
    )
    parser.add_argument(
        "--head",
        choices=sorted(HEADS),
        default=None,
        help="itm: zero-shot with the pre-training ITM head; retrieval: the fine-tuned retrieval head. "
        "Default: read from the checkpoint's config (architectures).",
    )
    parser.add_argument("--processor", default=None, help="processor folder (default: the model folder)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--dataset", help="dataset folder written by save_dataset (a split, or a DatasetDict)")
    data.add_argument(
        "--toy",
        action="store_true",
        help="the toy world's retrieval test split (synthetic); the --toy_* defaults are the demo's test split",
    )
    parser.add_argument("--split", default="test", help="split to use when --dataset holds a DatasetDict")
    # The demo's world and test split (DEMO_TOY_WORLD, DEMO_TOY_TEST_SPLIT), so `--toy` alone scores what the
    # demo's zero-shot check scored; feature size and classes follow the checkpoint's config.
    parser.add_argument(
        "--toy_test_images",
        type=int,
        default=DEMO_TOY_TEST_SPLIT["num_test_images"],
        help="--toy: images in the test split",
    )
    parser.add_argument(
        "--toy_seed", type=int, default=DEMO_TOY_TEST_SPLIT["seed"], help="--toy: seed of the scenes"
    )
    parser.add_argument(
        "--toy_noise",
        type=float,
        default=DEMO_TOY_WORLD["noise"],
        help="--toy: region-feature noise (as pre-training)",
    )
    parser.add_argument(
        "--toy_world_seed",
        type=int,
        default=DEMO_TOY_WORLD["world_seed"],
        help="--toy: seed of the world (as pre-training)",
    )
    parser.add_argument(
        "--toy_num_attributes",
        type=int,
        default=DEMO_TOY_WORLD["num_attributes"],
        help="--toy: attributes of the world (as pre-training)",
    )
    parser.add_argument(
        "--protocol",
        choices=[p for p in PROTOCOLS if p],
        default=None,
        help="flickr30k_1k, coco_1k (mean of five 1k folds) or coco_5k; default: the whole split",
    )
    parser.add_argument(
        "--no_strict", action="store_true", help="run a named protocol on a split of another size"
    )
    parser.add_argument("--batch_size", type=int, default=256, help="pairs per forward pass")
    parser.add_argument("--shard_size", type=int, default=None, help="caption rows per cached shard")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument(
        "--cache_dir", default=None, help="keep score shards here to resume an interrupted run"
    )
    parser.add_argument("--output_json", default=None, help="write all metrics here")
    parser.add_argument("--output_markdown", default=None, help="write the paper-style table here")
    parser.add_argument(
        "--save_scores", default=None, help="save the score matrix and image ids (torch.save)"
    )
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    two_stage = parser.add_argument_group("two-stage retrieval")
    two_stage.add_argument(
        "--candidates",
        type=int,
        default=None,
        help="K: re-rank only each query's top-K candidates by embedding similarity (two-stage); default: full ranking",
    )
    two_stage.add_argument(
        "--final_score",
        choices=FINAL_SCORES,
        default=None,
        help="--candidates: rank by the cross-encoder's score (itm, the default) or add the ITC similarity "
        "(itm+itc, as BLIP)",
    )
    two_stage.add_argument(
        "--full_ranking",
        action="store_true",
        help="--candidates: also run full ranking and report it, ranked by the same --final_score",
    )
    two_stage.add_argument(
        "--recall_plot", default=None, help="--candidates: write the recall-vs-K plot (PNG) here"
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error instead of its one-line summary"
    )
    args = parser.parse_args(argv)
    if args.candidates is not None and args.candidates < 1:
        parser.error(f"--candidates must be a positive number of candidates per query, got {args.candidates}")
    if args.candidates is None and (args.full_ranking or args.recall_plot):
        parser.error("--full_ranking and --recall_plot go with --candidates K (two-stage evaluation)")
    # The ITC term needs the embeddings of stage 1: full ranking alone ranks by the cross-encoder (docs/evaluation.md),
    # so `--final_score itm+itc` without `--candidates` would be ignored, silently.
    if args.candidates is None and args.final_score not in (None, "itm"):
        parser.error(
            f"--final_score {args.final_score} goes with --candidates K (two-stage evaluation; add --full_ranking for "
            "full ranking by the same score); full ranking alone ranks by the cross-encoder's score (itm)"
        )
    args.final_score = args.final_score or "itm"
    for flag, value in (
        ("--batch_size", args.batch_size),
        ("--shard_size", args.shard_size),
        ("--toy_test_images", args.toy_test_images),
    ):
        if value is not None and value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    return args


def load_model(path: str, head: str | None) -> torch.nn.Module:
    """The scoring model of a checkpoint folder: `--head` when given, otherwise its config's architectures
    (ImageBertForRetrieval -> fine-tuned head; anything else -> the pre-training ITM head, zero-shot)."""
    # A local folder that does not exist is one line here, not a Hub error after the client's retries.
    check_local_model_path(path, "--model_name_or_path")
    if head is None:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"--model {path}: no config.json (expected a save_pretrained folder)")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        head = "retrieval" if "ImageBertForRetrieval" in architectures else "itm"
    with loading_weights(path, "a model folder written by save_pretrained"):
        return HEADS[head].from_pretrained(path)


def load_processor(path: str) -> ImageBertProcessor:
    check_local_model_path(path, "--processor", needs=None)
    try:
        return ImageBertProcessor.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path}: cannot load an ImageBertProcessor ({' '.join(str(error).split())}) ; pass --processor with the "
            "folder the pre-training script saved the processor to"
        ) from None


def load_split(args: argparse.Namespace, config):
    """The test split: a saved dataset (one split, or `--split` of a DatasetDict) or the toy world's test split."""
    if args.toy:
        from modeling_imagebert.data.toy_world import make_toy_world

        # The world must be the one the checkpoint was pre-trained on: same seed and sizes. The background is
        # the last detector class, so the toy world has num_object_classes - 1 object classes.
        return make_toy_world(
            "retrieval",
            num_images=1,
            num_validation_images=1,
            num_test_images=args.toy_test_images,
            seed=args.toy_seed,
            world_seed=args.toy_world_seed,
            feature_dim=config.visual_feature_dim,
            num_classes=config.num_object_classes - 1,
            num_attributes=args.toy_num_attributes,
            noise=args.toy_noise,
            with_global_feature=bool(config.use_global_image_feature),
        )["test"]
    from modeling_imagebert.data.storage import load_dataset_from_disk

    folder = Path(args.dataset)
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        if args.split not in splits:
            raise ValueError(
                f"{folder}: --split {args.split!r} is not one of its splits {splits} ; pass one of them"
            )
        folder = folder / args.split
    dataset = load_dataset_from_disk(folder, feature_dim=config.visual_feature_dim)
    # Every value of every row, once and vectorised (cached like run_pretrain's check), before any pair is scored:
    # an Inf feature would otherwise give NaN scores and metrics that look like results.
    check_source(
        dataset, DatasetSpec(path=str(folder)), "--dataset", config, show_progress=not args.no_progress
    )
    return dataset


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    check_outputs_outside_inputs(args)
    # The Accelerator only tells each process its rank and device: the model is not wrapped for inference, and
    # evaluate_retrieval splits the work itself (shards of caption rows) and sums the matrix across processes.
    accelerator = Accelerator()
    model = load_model(args.model, args.head)
    processor = load_processor(args.processor or args.model)
    dataset = load_split(args, model.config)

    if args.candidates is not None:
        return run_two_stage(args, model, processor, dataset, accelerator)

    result = evaluate_retrieval(
        model,
        dataset,
        processor,
        protocol=args.protocol,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        bf16=args.bf16,
        accelerator=accelerator,
        progress=not args.no_progress,
        shard_size=args.shard_size,
        strict=not args.no_strict,
    )
    summary = _summary(result, args, model, accelerator)
    if accelerator.is_main_process:
        print(result.table)
        print(json.dumps(result.metrics, indent=2))
        _write_outputs(
            args,
            summary,
            result.table,
            {
                "scores": result.scores,
                "caption_image_index": result.caption_image_index,
                "image_ids": result.image_ids,
            },
        )
    accelerator.wait_for_everyone()
    return summary


def check_outputs_outside_inputs(args: argparse.Namespace) -> None:
    """Refuses, before anything runs, an output (the result files, the score cache) that is, holds or lies inside an
    input: `--output_json model/config.json` would replace the model's config."""
    inputs = {"--model": args.model, "--processor": args.processor, "--dataset": args.dataset}
    outputs = {
        "--output_json": args.output_json,
        "--output_markdown": args.output_markdown,
        "--save_scores": args.save_scores,
        "--recall_plot": args.recall_plot,
        "--cache_dir": args.cache_dir,
    }
    for flag, path in outputs.items():
        if path:
            check_output_outside_inputs(path, inputs, output_name=flag)


def _summary(result, args: argparse.Namespace, model, accelerator) -> dict:
    """The result's JSON form with what was evaluated and how."""
    summary = result.to_json_dict()
    summary.update(
        model=str(args.model),
        head=type(model).__name__,
        dataset="toy world (synthetic)" if args.toy else str(args.dataset),
        split=args.split,
        num_processes=accelerator.num_processes,
        bf16=bool(args.bf16),
    )
    return summary


def _write_outputs(args: argparse.Namespace, summary: dict, table: str, scores: dict) -> None:
    """--output_json, --output_markdown and --save_scores, each written atomically (main process only)."""
    for path, data in (
        (args.output_json, (json.dumps(summary, indent=2) + "\n").encode()),
        (args.output_markdown, table.encode()),
    ):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, data)
    if args.save_scores:
        buffer = io.BytesIO()
        torch.save(scores, buffer)
        atomic_write_bytes(args.save_scores, buffer.getvalue())


def run_two_stage(args: argparse.Namespace, model, processor, dataset, accelerator) -> dict:
    """`--candidates K`: two-stage evaluation, the three tables, the JSON and the recall-vs-K plot."""
    result = evaluate_two_stage(
        model,
        dataset,
        processor,
        candidates=args.candidates,
        protocol=args.protocol,
        final_score=args.final_score,
        full_ranking=args.full_ranking,
        batch_size=args.batch_size,
        cache_dir=args.cache_dir,
        bf16=args.bf16,
        accelerator=accelerator,
        progress=not args.no_progress,
        shard_size=args.shard_size,
        strict=not args.no_strict,
    )
    summary = _summary(result, args, model, accelerator)
    if accelerator.is_main_process:
        print(result.table)
        passes, seconds = result.passes, result.seconds
        print(
            f"cross-encoder passes: {passes['cross_encoder']} of {passes['full']} "
            f"({passes['full'] / max(passes['cross_encoder'], 1):.1f}x fewer), plus {passes['embedding']} "
            f"embedding passes; stage 1 {seconds['stage1']:.1f} s, stage 2 {seconds['stage2']:.1f} s"
            + (f", full ranking {seconds['full']:.1f} s" if seconds["full"] is not None else "")
        )
        _write_outputs(
            args,
            summary,
            result.table,
            {
                "image_retrieval_scores": result.image_matrix,
                "text_retrieval_scores": result.text_matrix,
                "similarity": result.similarity,
                "caption_image_index": result.caption_image_index,
                "image_ids": result.image_ids,
            },
        )
        if args.recall_plot:
            result.plot_recall_vs_k(args.recall_plot)
    accelerator.wait_for_everyone()
    return summary


if __name__ == "__main__":
    from modeling_imagebert.cli import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
