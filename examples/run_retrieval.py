#!/usr/bin/env python
"""Fine-tune ImageBERT for image-text retrieval with `transformers.Trainer` (paper §4.4).

    # the toy world, from the pre-training demo checkpoint (CPU, a few minutes); with no --do_* flag it trains and
    # then evaluates. --toy defaults to the demo's world (DEMO_TOY_WORLD: world seed 0, noise 1.0, 8 attributes)
    python examples/run_retrieval.py --toy --model_name_or_path outputs/imagebert-demo/final \
        --do_train --do_eval --output_dir outputs/retrieval-toy

    # Flickr30k / COCO converted with `python -m modeling_imagebert.data.convert` (one folder per split)
    accelerate launch examples/run_retrieval.py --model_name_or_path CKPT \
        --train_dataset data/flickr30k/train --eval_dataset data/flickr30k/val --output_dir outputs/flickr30k --do_train --do_eval \
        --num_train_epochs 10 --eval_strategy epoch --save_strategy epoch --bf16 --do_full_ranking

Every `TrainingArguments` flag works (`--learning_rate` 5e-5 and `--per_device_train_batch_size` 24 default to the
paper's settings; `--push_to_hub`, `--report_to`, `--seed`, ...). Ours:

    --loss binary|ce|triplet|itc or a weighted sum such as binary+0.5*triplet or binary+itc   (config.retrieval_loss)
    --num_candidates P          rows per positive in a training group (the positive + P-1 negatives)
    --negative_direction        text (negative captions: image-to-text), image (negative images), both
    --negatives                 random (the paper's) or itc: hard negatives drawn by ITC similarity over the batch

`--torch_compile` (with `--torch_compile_mode default|reduce-overhead|max-autotune`) compiles the training step as
one graph, as `training.compile` does in run_pretrain.py, and pads the training batches to shape buckets; Trainer's
default optimiser is already torch's fused AdamW (`--optim adamw_torch_fused`).

During training, evaluation scores a FIXED candidate layout (`--eval_num_candidates`, default 20: each eval caption
against its image and 19 others, each eval image against one of its captions and 19 others; negatives chosen once
from `--eval_layout_seed`) and reports recall@1/5/10 per direction. `--do_full_ranking` then ranks the whole eval
split with the full-ranking evaluator (`modeling_imagebert.retrieval.evaluation`) and writes JSON and markdown.

Bad input (a missing or malformed dataset, a bad flag value) ends the script with one line on stderr,
`error: <file/field>: <what> ; <how to fix>`, and exit status 2; a bare `--debug` (or IMAGEBERT_DEBUG=1) shows the
traceback instead (`--debug underflow_overflow` stays TrainingArguments' own option). Before anything is written or
trained, as run_pretrain does: an `--output_dir` that is, holds or lies inside an input (the model, processor or
dataset folders) is refused; the train and eval splits are validated (every value of every row, once, vectorised,
cached like run_pretrain's: the error names the split, row and field). A NaN or infinite training loss stops the run
(exit 2, naming the step) before any weights of the bad steps are saved.

`--resume_from_checkpoint latest` resumes the newest complete `checkpoint-<step>` in `--output_dir`, or starts from
scratch (saying so) when there is none, as `examples/run_pretrain.py` does; another value must be a checkpoint folder.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import BertTokenizerFast, HfArgumentParser, TrainingArguments, set_seed

from modeling_imagebert import ImageBertForRetrieval, ImageBertProcessor
from modeling_imagebert.atomic import atomic_write_text, check_output_outside_inputs, lock_folder
from modeling_imagebert.cli_arguments import (
    DefaultsHelpFormatter,
    check_local_model_path,
    resolve_trainer_resume,
)
from modeling_imagebert.configuration_imagebert import parse_retrieval_loss
from modeling_imagebert.data import DataCollatorForImageTextRetrieval
from modeling_imagebert.data.collators import DataCollatorForCandidateGroups
from modeling_imagebert.data.storage import load_dataset_from_disk
from modeling_imagebert.data.toy_world import DEMO_TOY_TEST_SPLIT, DEMO_TOY_WORLD, make_toy_world
from modeling_imagebert.pretraining.recipes import DatasetSpec
from modeling_imagebert.pretraining.stage_checks import check_source
from modeling_imagebert.retrieval.trainer import (
    CollatorEpochCallback,
    RetrievalTrainer,
    fixed_candidate_layout,
    make_compute_metrics,
)
from modeling_imagebert.safe_loading import loading_weights

logger = logging.getLogger("run_retrieval")


@dataclass
class RetrievalArguments:
    """The flags of this script beside `TrainingArguments`."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "pre-training (or retrieval) checkpoint folder; the score head starts from its ITM head"
        },
    )
    from_bert: str | None = field(
        default=None, metadata={"help": "start from a BERT checkpoint folder instead (new region embeddings)"}
    )
    processor: str | None = field(
        default=None,
        metadata={"help": "processor folder (default: --model_name_or_path, or --from_bert's tokenizer)"},
    )
    loss: str = field(
        default="binary",
        metadata={"help": "binary, ce, triplet or a weighted sum such as binary+0.5*triplet"},
    )
    triplet_margin: float | None = field(
        default=None, metadata={"help": "triplet hinge margin (default: config)"}
    )
    num_candidates: int = field(
        default=4, metadata={"help": "P: rows per training positive (1 positive + P-1)"}
    )
    negative_direction: str = field(default="both", metadata={"help": "text, image or both"})
    negatives: str = field(
        default="random",
        metadata={
            "help": "random (the paper's: uniform over the batch's other images) or itc (hard negatives drawn by the "
            "model's ITC similarity over the batch, ALBEF; train ITC too, e.g. --loss binary+itc)"
        },
    )
    hard_negative_fraction: float = field(
        default=1.0,
        metadata={"help": "--negatives itc: the chance each negative is re-drawn (the rest stay random)"},
    )
    train_dataset: str | None = field(
        default=None, metadata={"help": "training split saved with save_dataset"}
    )
    eval_dataset: str | None = field(
        default=None, metadata={"help": "evaluation split saved with save_dataset"}
    )
    toy: bool = field(
        default=False, metadata={"help": "use the toy world's retrieval splits (train / validation)"}
    )
    toy_num_images: int = field(default=200, metadata={"help": "toy train images (5 captions each)"})
    toy_num_eval_images: int = field(
        default=DEMO_TOY_TEST_SPLIT["num_test_images"], metadata={"help": "toy validation (and test) images"}
    )
    toy_seed: int = field(
        default=DEMO_TOY_TEST_SPLIT["seed"],
        metadata={"help": "toy scenes seed (the demo's: its test split is --toy_eval_split test)"},
    )
    toy_world_seed: int = field(
        default=DEMO_TOY_WORLD["world_seed"], metadata={"help": "toy world seed (keep the pre-training one)"}
    )
    toy_noise: float = field(
        default=DEMO_TOY_WORLD["noise"],
        metadata={"help": "toy region-feature noise (keep the pre-training one)"},
    )
    toy_num_attributes: int = field(
        default=DEMO_TOY_WORLD["num_attributes"],
        metadata={"help": "toy attributes (keep the pre-training one)"},
    )
    toy_eval_split: str = field(
        default="validation", metadata={"help": "toy split evaluated: validation or test"}
    )
    eval_num_candidates: int = field(
        default=20, metadata={"help": "candidates per eval group (ground truth first)"}
    )
    eval_layout_seed: int = field(default=0, metadata={"help": "seed of the fixed evaluation negatives"})
    eval_direction: str = field(default="both", metadata={"help": "eval groups: image, text or both"})
    eval_max_groups: int | None = field(
        default=None, metadata={"help": "at most this many eval groups per direction"}
    )
    do_full_ranking: bool = field(
        default=False, metadata={"help": "after training, full-ranking evaluation of the eval split"}
    )
    full_ranking_protocol: str | None = field(
        default=None, metadata={"help": "flickr30k_1k, coco_1k or coco_5k (default: the whole split)"}
    )
    full_ranking_batch_size: int = field(
        default=256, metadata={"help": "pairs per forward pass of the evaluator"}
    )
    num_hidden_layers: int | None = field(
        default=None, metadata={"help": "--from_bert only: keep the first k layers"}
    )


def parse_args(argv: list[str] | None = None) -> tuple[RetrievalArguments, TrainingArguments]:
    # DefaultsHelpFormatter: --help keeps the usage examples above laid out and shows every set default.
    parser = HfArgumentParser(
        (RetrievalArguments, TrainingArguments), description=__doc__, formatter_class=DefaultsHelpFormatter
    )
    # TrainingArguments' own help says the flag is for scripts to interpret: say how this one does.
    for action in parser._actions:
        if action.dest == "resume_from_checkpoint":
            action.help = (
                "'latest': the newest complete checkpoint-<step> in --output_dir (from scratch, saying so, when "
                "there is none); or a checkpoint folder"
            )
    # The paper's fine-tuning settings (§4.4) as defaults; the command line still overrides them.
    parser.set_defaults(learning_rate=5e-5, per_device_train_batch_size=24, report_to="none")
    args, training_args = parser.parse_args_into_dataclasses(args=argv)
    if (args.model_name_or_path is None) == (args.from_bert is None):
        parser.error("give exactly one of --model_name_or_path (an ImageBERT checkpoint) and --from_bert")
    if args.toy == bool(args.train_dataset or args.eval_dataset):
        parser.error("give either --toy or --train_dataset/--eval_dataset")
    if args.negative_direction not in DataCollatorForImageTextRetrieval.DIRECTIONS:
        parser.error(f"--negative_direction must be one of {DataCollatorForImageTextRetrieval.DIRECTIONS}")
    if args.negatives not in RetrievalTrainer.NEGATIVES:
        parser.error(f"--negatives must be one of {RetrievalTrainer.NEGATIVES}, got {args.negatives!r}")
    if not 0.0 <= args.hard_negative_fraction <= 1.0:
        parser.error(f"--hard_negative_fraction must be in [0, 1], got {args.hard_negative_fraction}")
    try:
        parse_retrieval_loss(args.loss)  # each term's weight positive and finite
    except ValueError as error:
        parser.error(f"--loss: {error}")
    # Counts: a training group needs the positive and at least one negative (P = 1 trains on positives alone),
    # an evaluation group a ground truth and at least one other candidate.
    for flag, value, least in (
        ("--num_candidates", args.num_candidates, 2),
        ("--eval_num_candidates", args.eval_num_candidates, 2),
        ("--eval_max_groups", args.eval_max_groups, 1),
        ("--full_ranking_batch_size", args.full_ranking_batch_size, 1),
        ("--toy_num_images", args.toy_num_images, 1),
        ("--toy_num_eval_images", args.toy_num_eval_images, 1),
    ):
        if value is not None and value < least:
            parser.error(f"{flag} must be >= {least}, got {value}")
    if args.triplet_margin is not None and not 0.0 <= args.triplet_margin < float("inf"):
        parser.error(f"--triplet_margin must be a finite number >= 0, got {args.triplet_margin}")
    if not (
        training_args.do_train or training_args.do_eval or training_args.do_predict or args.do_full_ranking
    ):
        # No --do_* flag at all: train, then evaluate, rather than exit having done nothing.
        training_args.do_train = training_args.do_eval = True
    if not training_args.do_train:
        logger.warning("--do_train not given: no fine-tuning, the checkpoint is evaluated as it is")
    # Custom collators and our label name; see DESIGN.md "Transformers 5 facts".
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]
    return args, training_args


def check_output_dir(args: RetrievalArguments, training_args: TrainingArguments) -> None:
    """Refuses, before anything is written, an --output_dir that is, holds or lies inside an input: saving the
    fine-tuned model there would replace (or change) the checkpoint, processor or data the run reads."""
    inputs = {
        "--model_name_or_path": args.model_name_or_path,
        "--from_bert": args.from_bert,
        "--processor": args.processor,
        "--train_dataset": args.train_dataset,
        "--eval_dataset": args.eval_dataset,
    }
    check_output_outside_inputs(training_args.output_dir, inputs, output_name="--output_dir")


def validate_splits(train, evaluation, args: RetrievalArguments, config, *, show_progress: bool) -> None:
    """Every row of the train and eval splits checked once, before step 1, with run_pretrain's check
    (`stage_checks.check_source`: the schema's vectorised validator, cached by dataset, and the class ids against
    the model): a NaN feature or a box outside its image is one line naming the split, row and field, not a run
    that trains NaN weights."""
    for flag, dataset, path in (
        ("--train_dataset", train, args.train_dataset),
        ("--eval_dataset", evaluation, args.eval_dataset),
    ):
        if dataset is None:
            continue
        where = flag if not args.toy else f"the toy {'train' if flag == '--train_dataset' else 'eval'} split"
        spec = DatasetSpec(path=path) if path else DatasetSpec(toy_world={})
        check_source(dataset, spec, where, config, show_progress=show_progress, log=logger.info)


def load_model_and_processor(args: RetrievalArguments, toy_dims: dict | None):
    """The retrieval model (score head from the ITM head of a pre-training checkpoint) and its processor."""
    # A local folder that does not exist is one line here, not a Hub error after the client's retries.
    check_local_model_path(args.model_name_or_path, "--model_name_or_path")
    check_local_model_path(args.from_bert, "--from_bert")
    check_local_model_path(args.processor, "--processor", needs=None)
    if args.model_name_or_path is not None:
        with loading_weights(args.model_name_or_path, "a model folder written by save_pretrained"):
            model = ImageBertForRetrieval.from_pretrained(args.model_name_or_path)
        processor = ImageBertProcessor.from_pretrained(args.processor or args.model_name_or_path)
    else:
        overrides = dict(toy_dims or {})
        if args.num_hidden_layers is not None:
            overrides["num_hidden_layers"] = args.num_hidden_layers
        model = ImageBertForRetrieval.from_bert_pretrained(args.from_bert, **overrides)
        if args.processor:
            processor = ImageBertProcessor.from_pretrained(args.processor)
        else:
            tokenizer = BertTokenizerFast.from_pretrained(args.from_bert)
            processor = ImageBertProcessor(
                tokenizer, max_regions=model.config.max_regions, max_text_length=model.config.max_text_length
            )
    model.config.retrieval_loss = args.loss
    if args.triplet_margin is not None:
        model.config.triplet_margin = args.triplet_margin
    return model, processor


def load_splits(args: RetrievalArguments, feature_dim: int | None, num_classes: int | None):
    """(train, eval) raw splits in the dataset schema; either may be None."""
    if args.toy:
        if feature_dim is None or num_classes is None:
            raise ValueError("--toy needs the checkpoint's visual_feature_dim and num_object_classes")
        splits = make_toy_world(
            "retrieval",
            num_images=args.toy_num_images,
            num_validation_images=args.toy_num_eval_images,
            num_test_images=args.toy_num_eval_images,
            seed=args.toy_seed,
            world_seed=args.toy_world_seed,
            feature_dim=feature_dim,
            num_classes=num_classes,
            num_attributes=args.toy_num_attributes,
            noise=args.toy_noise,
        )
        if args.toy_eval_split not in splits:
            raise ValueError(f"--toy_eval_split must be one of {list(splits)}, got {args.toy_eval_split!r}")
        return splits["train"], splits[args.toy_eval_split]
    train = (
        load_dataset_from_disk(args.train_dataset, feature_dim=feature_dim) if args.train_dataset else None
    )
    evaluation = (
        load_dataset_from_disk(args.eval_dataset, feature_dim=feature_dim) if args.eval_dataset else None
    )
    return train, evaluation


def main(argv: list[str] | None = None) -> dict:
    args, training_args = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if training_args.process_index == 0 else logging.WARNING,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity_warning()
    check_output_dir(args, training_args)
    if training_args.process_index == 0 and (training_args.do_train or training_args.do_eval):
        # One run at a time in a folder: a second run started into it stops here, naming this one (the kernel
        # drops the lock when this process ends, however it ends, so a killed run resumes at once).
        Path(training_args.output_dir).mkdir(parents=True, exist_ok=True)
        lock_folder(training_args.output_dir)
    set_seed(training_args.seed)
    # `latest` with no checkpoint starts from scratch (as run_pretrain); a missing folder fails here, before any work.
    resume, message = resolve_trainer_resume(training_args.resume_from_checkpoint, training_args.output_dir)
    if message and training_args.do_train:
        logger.info(message)

    # --from_bert on the toy world: the region sizes come from the demo's toy world (K classes + background).
    toy_dims = None
    if args.from_bert is not None and args.toy:
        toy_dims = {
            "visual_feature_dim": DEMO_TOY_WORLD["feature_dim"],
            "num_object_classes": DEMO_TOY_WORLD["num_classes"] + 1,
            "max_regions": 30,  # every toy detection (10-30 per image)
            "max_text_length": 24,
        }
    model, processor = load_model_and_processor(args, toy_dims)
    config = model.config
    # Toy region classes: K objects + background, so K = num_object_classes - 1.
    train_raw, eval_raw = load_splits(args, config.visual_feature_dim, config.num_object_classes - 1)
    if training_args.do_train and train_raw is None:
        raise ValueError("--do_train needs --train_dataset (or --toy)")
    # The main process validates first (and caches the result); the others then read its cache.
    with training_args.main_process_first(desc="validate datasets"):
        validate_splits(
            train_raw if training_args.do_train else None,
            eval_raw,
            args,
            config,
            show_progress=not training_args.disable_tqdm and training_args.process_index == 0,
        )

    # Encode once (WordPiece, top regions, 5-D locations); numpy format keeps float16 features.
    # The main process encodes first, so the others reuse its datasets cache files instead of racing to write them.
    with training_args.main_process_first(desc="encode datasets"):
        train_dataset = processor.prepare_dataset(train_raw) if train_raw is not None else None
        eval_encoded = processor.prepare_dataset(eval_raw) if eval_raw is not None else None
    eval_dataset, layout, eval_collator = None, None, None
    if eval_raw is not None:
        layout = fixed_candidate_layout(
            eval_raw["image_id"],
            num_candidates=args.eval_num_candidates,
            direction=args.eval_direction,
            seed=args.eval_layout_seed,
            max_groups=args.eval_max_groups,
        )
        eval_dataset = layout  # items are groups of (caption row, image row) pairs
        eval_collator = DataCollatorForCandidateGroups(eval_encoded, processor)
        logger.info(
            "evaluation layout: %d image-retrieval and %d text-retrieval groups of %d candidates",
            layout.num_image_groups,
            layout.num_text_groups,
            layout.num_candidates,
        )

    train_collator = DataCollatorForImageTextRetrieval(
        processor,
        num_candidates=args.num_candidates,
        negative_direction=args.negative_direction,
        seed=training_args.seed,
        # A compiled step (--torch_compile, --torch_compile_mode reduce-overhead) sees a few shapes, not one per batch.
        shape_buckets=training_args.torch_compile,
    )
    trainer = RetrievalTrainer(
        model=model,
        args=training_args,
        data_collator=train_collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        compute_metrics=make_compute_metrics(layout) if layout is not None else None,
        callbacks=[CollatorEpochCallback(train_collator)],
        eval_collator=eval_collator,
        eval_num_candidates=layout.num_candidates if layout is not None else None,
        negatives=args.negatives,
        hard_negative_fraction=args.hard_negative_fraction,
    )

    results: dict = {"world_size": training_args.world_size}
    if training_args.do_train:
        start = time.perf_counter()
        train_result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model()  # model + processor in output_dir
        metrics = dict(train_result.metrics, train_wall_seconds=time.perf_counter() - start)
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results["train"] = metrics
    if training_args.do_eval and eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results["eval"] = metrics
    if args.do_full_ranking and eval_raw is not None:
        from modeling_imagebert.retrieval.evaluation import evaluate_retrieval

        evaluation = evaluate_retrieval(
            trainer.model,
            eval_raw,
            processor,
            protocol=args.full_ranking_protocol,
            batch_size=args.full_ranking_batch_size,
            bf16=training_args.bf16,
            accelerator=trainer.accelerator,
            progress=not training_args.disable_tqdm,
        )
        if trainer.is_world_process_zero():
            output = Path(training_args.output_dir)
            output.mkdir(parents=True, exist_ok=True)
            evaluation.save_json(output / "full_ranking.json")
            atomic_write_text(output / "full_ranking.md", evaluation.table + "\n")
            logger.info("full-ranking evaluation:\n%s", evaluation.table)
        results["full_ranking"] = evaluation.metrics
    if training_args.push_to_hub and training_args.do_train:
        trainer.push_to_hub(tags=["imagebert", "image-text-retrieval"])
    if trainer.is_world_process_zero():
        atomic_write_text(
            Path(training_args.output_dir) / "run_retrieval_results.json", json.dumps(results, indent=2)
        )
    return results


if __name__ == "__main__":
    from modeling_imagebert.cli import run_cli

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("WORLD_SIZE", "1"))))
    sys.exit(run_cli(main))
