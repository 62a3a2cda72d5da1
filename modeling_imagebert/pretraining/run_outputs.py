"""What a pre-training run leaves in its output folder and prints at the end: the run-wide settings checks, the
loss history kept across resumes, the final model with its card and loss curves, `pretrain_results.json`, the
optional Hub upload and the next commands to run."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from .checkpoints import ResumePoint, load_checkpoint_state, save_pretrained_atomic
from .loss_curves import LOSS_CURVES_NAME, write_loss_curves
from .loss_log import history_until
from .model_card import build_model_card
from .recipes import Recipe, RecipeError

RESULTS_NAME = "pretrain_results.json"
LOSS_HISTORY_NAME = "loss_history.json"


# ---------------------------------------------------------------------------------------------------------------
# Before the first stage
# ---------------------------------------------------------------------------------------------------------------


def tracker_from_flag(report_to: str | None) -> str | None:
    """The `log_with` of `Accelerator` for `--report_to` (None for "none"). Exits with a `pip install` line when
    `--report_to tensorboard` is asked for without tensorboard (or tensorboardX) installed."""
    if report_to in (None, "none"):
        return None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise SystemExit(
                    "--report_to tensorboard: tensorboard is not installed; pip install tensorboard "
                    "(or use --report_to none)"
                ) from None
    return report_to


def run_gradient_accumulation(recipe: Recipe) -> int:
    """The one gradient accumulation of a run: Accelerate fixes it per `Accelerator`, so every stage must agree
    (else RecipeError naming the first stage that differs)."""
    first = recipe.stages[0].gradient_accumulation_steps
    for s, stage in enumerate(recipe.stages):
        if stage.gradient_accumulation_steps != first:
            raise RecipeError(
                f"stages[{s}].gradient_accumulation_steps: {stage.gradient_accumulation_steps} differs from "
                f"stages[0]'s {first} ; use one value in every stage (Accelerate fixes it per run)"
            )
    return first


def set_cpu_threads(accelerator, num_threads: int | None) -> None:
    """`torch.set_num_threads`: `num_threads`, or on CPU the cores shared evenly among the processes (so several
    processes on one machine do not oversubscribe it)."""
    if num_threads is None and accelerator.device.type == "cpu":
        num_threads = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    if num_threads:
        torch.set_num_threads(num_threads)


def prepare_output_dir(accelerator, output_dir: Path, recipe: Recipe, overwrite: bool) -> None:
    """Creates `output_dir` (after deleting it when `overwrite`, i.e. --overwrite_output_dir) and writes the
    resolved recipe to `recipe.json`, on the main process; every process waits for it."""
    if accelerator.is_main_process:
        if overwrite and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output_dir / "recipe.json", json.dumps(recipe.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------------------------
# Loss history across resumes
# ---------------------------------------------------------------------------------------------------------------


def resumed_loss_history(output_dir: Path, resume_point: ResumePoint | None) -> list[dict[str, Any]]:
    """The loss history a resumed run starts from: the one saved in the checkpoint it resumes, or, when it starts
    a stage afresh, the records of the earlier stages in `loss_history.json`. Empty for a new run."""
    if resume_point is None:
        return []
    if resume_point.checkpoint is not None:
        state = load_checkpoint_state(resume_point.checkpoint)
        return history_until(state.get("loss_history", []), int(state["stage"]), int(state["step"]))
    path = output_dir / LOSS_HISTORY_NAME
    if not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()) if int(r["stage"]) < resume_point.stage]


def save_loss_history(output_dir: Path, history: list[dict[str, Any]]) -> Path:
    """Writes the loss history to `loss_history.json` (atomically; main process), read back on resume."""
    return atomic_write_text(output_dir / LOSS_HISTORY_NAME, json.dumps(history) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# After the last stage
# ---------------------------------------------------------------------------------------------------------------


def save_run_results(
    model,
    processor,
    recipe: Recipe,
    results: dict[str, Any],
    output_dir: Path,
    base_card: str,
) -> Path:
    """Writes, on the main process: `loss_curves.png` (when matplotlib is installed) and `pretrain_results.json`
    in `output_dir`, and the final model folder `output_dir/final` (model, processor, the model card built from
    `base_card` with the stages, final losses, recalls and the embedded loss curves, and the PNG). Returns the
    final folder."""
    history = results.get("loss_history", [])
    png = write_loss_curves(
        history,
        output_dir / LOSS_CURVES_NAME,
        stage_names=[stage.name for stage in recipe.stages],
        title=f"{recipe.name}: per-task training losses",
    )
    card = build_model_card(
        base_card,
        recipe,
        results.get("final_losses"),
        results.get("zero_shot_retrieval"),
        loss_curves=LOSS_CURVES_NAME if png is not None else None,
    )
    final_dir = output_dir / "final"
    save_pretrained_atomic(model, processor, final_dir, card=card, files=[png] if png is not None else [])
    atomic_write_text(output_dir / RESULTS_NAME, json.dumps(results, indent=2) + "\n")
    return final_dir


def push_final_model(final_dir: Path, repo_id: str, recipe_name: str) -> str:
    """Uploads the final model folder to the Hub repository `repo_id` (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(final_dir), commit_message=f"pre-trained with {recipe_name}"
    )
    return f"https://huggingface.co/{repo_id}"


def next_steps_message(recipe: Recipe, final_dir: Path, wall_seconds: float) -> str:
    """The closing lines of a run: where the model is, how to load it, and the fine-tuning and evaluation
    commands (with the toy-world flags that reproduce the zero-shot check's test split when the recipe used it)."""
    dataset = recipe.evaluation.dataset if recipe.evaluation is not None else None
    toy: Mapping[str, Any] | None = dataset.toy_world if dataset is not None and dataset.toy_world else None
    if toy:
        world = f" --toy --toy_world_seed {toy.get('world_seed', 0)} --toy_noise {toy.get('noise', 1.5)}"
        retrieval_flags = world
        eval_flags = (
            f" --toy --toy_test_images {toy.get('num_test_images', 100)} --toy_seed {toy.get('seed', 0)}"
            f" --toy_world_seed {toy.get('world_seed', 0)} --toy_noise {toy.get('noise', 1.5)}"
        )
    else:
        retrieval_flags = " --train_dataset DATASET --eval_dataset DATASET"
        eval_flags = " --dataset DATASET"
    return (
        f"\nDone in {wall_seconds:.0f} s. Pre-trained model and processor: {final_dir}\n"
        f"  load it:   AutoModelForPreTraining.from_pretrained('{final_dir}')  (import modeling_imagebert first, or "
        f"pass trust_remote_code=True)\n"
        f"  next:      fine-tune for retrieval with examples/run_retrieval.py --model_name_or_path {final_dir}"
        f"{retrieval_flags} --do_train --do_eval --output_dir outputs/retrieval\n"
        f"             evaluate with examples/evaluate_retrieval.py --model_name_or_path {final_dir}{eval_flags}"
    )


__all__ = [
    "LOSS_HISTORY_NAME",
    "RESULTS_NAME",
    "next_steps_message",
    "prepare_output_dir",
    "push_final_model",
    "resumed_loss_history",
    "run_gradient_accumulation",
    "save_loss_history",
    "save_run_results",
    "set_cpu_threads",
    "tracker_from_flag",
]
