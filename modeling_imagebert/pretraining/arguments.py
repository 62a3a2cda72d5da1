"""The command line of `examples/run_pretrain.py`: its flags and how they override the recipe."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli_arguments import DefaultsHelpFormatter
from .recipes import (
    ADAMW_IMPLEMENTATIONS,
    COMPILE_MODES,
    Recipe,
    check_recipe_paths,
    load_recipe,
    validate_recipe,
)

# Flags copied as-is into the recipe's `training` section.
_TRAINING_FLAGS = (
    "output_dir",
    "seed",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "num_workers",
    "num_threads",
    "mixed_precision",
    "adamw_implementation",
    "compile",
)
# Flags applied to every stage.
_STAGE_FLAGS = ("max_steps", "batch_size", "gradient_accumulation_steps", "learning_rate")


def build_argument_parser(description: str | None, default_recipe: str | Path) -> argparse.ArgumentParser:
    """The pre-training command line. `description`: the script's docstring; `default_recipe`: the recipe run
    when `--recipe` is not given. Every flag but `--recipe` and `--set` defaults to None (keep the recipe's value)."""
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=DefaultsHelpFormatter,
        epilog=f"A flag that overrides the recipe keeps the recipe's value when not given (default recipe: "
        f"{default_recipe}); the other flags' defaults are shown beside them.",
    )
    add = parser.add_argument
    add("--recipe", default=str(default_recipe), help="recipe YAML (default: %(default)s)")
    add(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set stages.0.max_steps=3 --set stages.1.learning_rate=5e-5",
    )
    add("--output_dir", help="overrides training.output_dir")
    add("--seed", type=int, help="overrides training.seed")
    add("--max_steps", type=int, help="overrides max_steps of every stage")
    add("--batch_size", type=int, help="overrides batch_size of every stage (per process)")
    add("--gradient_accumulation_steps", type=int, help="overrides it in every stage")
    add("--learning_rate", type=float, help="overrides learning_rate of every stage")
    add("--save_steps", type=int, help="checkpoint every N optimiser steps (0: only on signals)")
    add("--save_total_limit", type=int, help="keep at most N checkpoints (older ones are deleted)")
    add("--logging_steps", type=int, help="log the per-task losses every N optimiser steps")
    add("--num_workers", type=int, help="DataLoader workers")
    add("--num_threads", type=int, help="torch threads per process (default: cores / processes)")
    add("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], help="overrides accelerate's setting")
    add(
        "--adamw_implementation",
        choices=list(ADAMW_IMPLEMENTATIONS),
        help="overrides training.adamw_implementation (torch's AdamW kernel; the recipes' default: fused)",
    )
    add(
        "--compile",
        choices=list(COMPILE_MODES),
        help="overrides training.compile (torch.compile of the training step, with shape-bucketed batches; the "
        "recipes' default: none)",
    )
    # Continue the folder's run, or replace the folder: not both.
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--resume_from_checkpoint",
        help="'latest' (the newest intact checkpoint of output_dir's run; from scratch when there is none) or a "
        "checkpoint folder",
    )
    start.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="delete output_dir first: only a folder run_pretrain wrote (never the current folder or one holding "
        "an input); without it a folder holding another run is refused",
    )
    add(
        "--ignore_recipe_mismatch",
        action="store_true",
        help="resume even when the recipe differs from the checkpoint's in fields that change the result "
        "(a warning lists them)",
    )
    add(
        "--max_steps_this_run",
        type=int,
        help="stop after this many optimiser steps in this run, saving a checkpoint (for time-sliced jobs)",
    )
    add("--no_eval", action="store_true", help="skip the zero-shot retrieval check")
    add("--report_to", default="none", help="tracker: tensorboard, wandb, ..., all or none")
    add("--push_to_hub", action="store_true", help="upload the final model, processor and card")
    add("--hub_model_id", help="repository for --push_to_hub (default: the output_dir name)")
    add("--no_progress", action="store_true", help="no progress bars")
    add(
        "--debug",
        action="store_true",
        help="show the full traceback of an error instead of its one-line message",
    )
    return parser


def recipe_from_arguments(args: argparse.Namespace) -> Recipe:
    """The recipe of `args.recipe` with the `--set` overrides and the dedicated flags applied, validated and its
    dataset paths checked. Raises RecipeError (field and expectation named) or FileNotFoundError; a run flag out
    of its range (`--max_steps_this_run 0`) raises ValueError naming the flag."""
    if args.max_steps_this_run is not None and args.max_steps_this_run < 1:
        raise ValueError(
            f"--max_steps_this_run: expected an integer >= 1 (optimiser steps before this run stops and saves), got "
            f"{args.max_steps_this_run}; leave it out to train to the end"
        )
    overrides = list(args.overrides)
    for flag in _TRAINING_FLAGS:
        if getattr(args, flag) is not None:
            overrides.append(f"training.{flag}={getattr(args, flag)}")
    if args.no_eval:
        overrides.append("evaluation=null")
    recipe = load_recipe(args.recipe, overrides)
    for stage in recipe.stages:
        for flag in _STAGE_FLAGS:
            if getattr(args, flag) is not None:
                setattr(stage, flag, getattr(args, flag))
    validate_recipe(recipe)
    check_recipe_paths(recipe)
    return recipe


__all__ = ["build_argument_parser", "recipe_from_arguments"]
