"""What a pre-training run leaves in its output folder and prints at the end: the run-wide settings checks, the
loss history kept across resumes, the final model with its card and loss curves, `pretrain_results.json`, the
optional Hub upload and the next commands to run."""

from __future__ import annotations

import inspect
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import (
    LOCK_NAME,
    TEMP_PREFIX,
    UnsafeRemovalError,
    atomic_write_text,
    check_output_outside_inputs,
    check_removable,
    lock_folder,
    read_marker,
    release_folder,
    remove_ours,
    remove_stale_temporaries_in,
    write_marker,
)
from ..data.toy_world import DEMO_TOY_TEST_SPLIT, DEMO_TOY_WORLD, make_toy_world
from .checkpoints import (
    CheckpointError,
    ResumePoint,
    find_resume_point,
    list_checkpoints,
    list_stage_finals,
    load_checkpoint_state,
    new_run_id,
    on_main_process,
    run_id_of,
    save_pretrained_atomic,
    stage_final_name,
)
from .loss_curves import LOSS_CURVES_NAME, write_loss_curves
from .loss_log import history_until
from .model_card import build_model_card
from .recipe_diff import IGNORE_MISMATCH_FLAG, RecipeMismatchError, check_resume_recipe
from .recipes import Recipe, RecipeError

RESULTS_NAME = "pretrain_results.json"
LOSS_HISTORY_NAME = "loss_history.json"
RECIPE_NAME = "recipe.json"
RUN_WRITER = "run_pretrain"  # the `written_by` of an output folder's marker


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


class OutputDirInUseError(FileExistsError):
    """A run refused before writing anything: its output folder holds another run's work or files that
    run_pretrain did not write."""


@dataclass
class RunStart:
    """How a run starts in its output folder: its `run_id` (new, or the one of the run it continues) and where
    it resumes (`resume_point`, None: from the first stage)."""

    run_id: str
    resume_point: ResumePoint | None


# What a run leaves in its output folder besides checkpoints and stage-final folders.
_RUN_FILES = ("final", RESULTS_NAME, LOSS_HISTORY_NAME)
# The errors prepare_output_dir raises for a refused folder or checkpoint: one line each, no traceback needed.
RUN_FOLDER_ERRORS = (OutputDirInUseError, UnsafeRemovalError, CheckpointError, RecipeMismatchError)


def recipe_inputs(recipe: Recipe, base: str | Path | None = None) -> list[Path]:
    """The local paths `recipe` reads (dataset folders, model config, tokenizer, BERT checkpoint, checkpoints a
    stage starts from), absolute, from `base` (default the current folder); names that are no local path (a Hub
    id, "previous") are left out. An overwrite may not delete a folder that is or holds one of them."""
    base = Path(base) if base is not None else Path.cwd()
    names = [ds.path for stage in recipe.stages for ds in stage.datasets]
    if recipe.evaluation is not None and recipe.evaluation.dataset is not None:
        names.append(recipe.evaluation.dataset.path)
    names += [recipe.model.config, recipe.model.tokenizer, recipe.model.bert_checkpoint]
    names += [stage.init for stage in recipe.stages]
    paths = [(base / name).absolute() for name in names if name]
    return [path for path in paths if path.exists()]


def _run_items(output_dir: Path) -> list[Path]:
    """What `output_dir` holds of a pre-training run (any run): checkpoints, stage-final folders, final model,
    results and loss history."""
    items = [path for _, _, path in list_checkpoints(output_dir)]
    items += [path for _, path in list_stage_finals(output_dir)]
    items += [output_dir / name for name in _RUN_FILES if (output_dir / name).exists()]
    return sorted(items)


def _names(paths: list[Path], limit: int = 6) -> str:
    shown = ", ".join(path.name for path in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _folder_run_id(output_dir: Path) -> str | None:
    """The run id of a folder run_pretrain wrote (its marker), else None."""
    marker = read_marker(output_dir) if output_dir.is_dir() and not output_dir.is_symlink() else None
    if marker is None or marker.get("written_by") != RUN_WRITER:
        return None
    return marker.get("run_id")


def _contents(output_dir: Path) -> list[Path]:
    """What `output_dir` holds besides temporaries of killed writes and the lock file of a run."""
    return sorted(
        p for p in output_dir.iterdir() if not p.name.startswith(TEMP_PREFIX) and p.name != LOCK_NAME
    )


def _lock_if_ours(output_dir: Path) -> bool:
    """Locks `output_dir` for this run (`atomic.lock_folder`) when it is missing (created now), empty or
    run_pretrain's, so a second run started at once stops before deciding anything; a folder the run will refuse
    gets no lock file. Returns whether the folder was created here."""
    created = False
    if output_dir.is_symlink() or (output_dir.exists() and not output_dir.is_dir()):
        return False
    if not output_dir.exists():
        output_dir.mkdir(parents=True)
        created = True
    elif _folder_run_id(output_dir) is None and _contents(output_dir):
        return False
    try:
        lock_folder(output_dir, error=OutputDirInUseError)
    except BaseException:
        if created:
            output_dir.rmdir()  # never reached with a lock file in it: only a failed open/flock gets here
        raise
    return created


def _check_not_foreign(output_dir: Path) -> None:
    """Refuses a non-empty folder that run_pretrain did not write (no marker of ours)."""
    if not output_dir.exists() or _folder_run_id(output_dir) is not None:
        return
    if not output_dir.is_dir():
        raise OutputDirInUseError(f"{output_dir}: exists and is not a folder ; choose another --output_dir")
    # Temporaries of our own killed writes do not count: the run removes the stale ones once the folder is its.
    contents = _contents(output_dir)
    if contents:
        marker = read_marker(output_dir)
        writer = f"written by {marker['written_by']}" if marker is not None else "not written by run_pretrain"
        raise OutputDirInUseError(
            f"{output_dir}: is not empty and was {writer} (holds {_names(contents)}) ; choose a new or empty "
            "--output_dir (--overwrite_output_dir replaces only folders run_pretrain wrote)"
        )


def _new_run(output_dir: Path, overwrite: bool, inputs: list[Path]) -> RunStart:
    if overwrite and output_dir.exists() and (not output_dir.is_dir() or any(_contents(output_dir))):
        # Never the current folder or one above it, nor one that is or holds an input of the recipe; and only an
        # output folder of run_pretrain (not, say, a converted dataset, though it carries the package's marker).
        check_removable(output_dir, inputs=inputs)
        marker = read_marker(output_dir)
        if marker.get("written_by") != RUN_WRITER:
            raise UnsafeRemovalError(
                f"{output_dir}: was written by {marker.get('written_by')}, not by run_pretrain, and is not "
                "replaced ; remove it yourself or choose another --output_dir"
            )
        remove_ours(output_dir, inputs=inputs)
        print(f"--overwrite_output_dir: removed {output_dir} (written by an earlier run)")
        return RunStart(run_id=new_run_id(), resume_point=None)
    _check_not_foreign(output_dir)
    items = _run_items(output_dir)
    if items:
        raise OutputDirInUseError(
            f"{output_dir}: holds the run {_folder_run_id(output_dir)} ({_names(items)}) ; pass "
            "--overwrite_output_dir to replace it or --resume_from_checkpoint latest to continue it"
        )
    return RunStart(run_id=new_run_id(), resume_point=None)


def _resumed_run(output_dir: Path, resume_from_checkpoint: str) -> RunStart | None:
    """The resume point of `--resume_from_checkpoint` in `output_dir`, None when "latest" finds nothing."""
    folder_run = _folder_run_id(output_dir)
    if resume_from_checkpoint == "latest":
        _check_not_foreign(output_dir)
        if folder_run is None:
            return None
        point = find_resume_point(output_dir, "latest", run_id=folder_run)
        if point is None:
            print(f"no complete checkpoint of run {folder_run} in {output_dir}; starting it from scratch")
        return RunStart(run_id=folder_run, resume_point=point)
    point = find_resume_point(output_dir, resume_from_checkpoint)
    if point.run_id is None:
        raise CheckpointError(f"{point.checkpoint}: has no run id ; it was not written by this run_pretrain")
    if folder_run is not None and folder_run != point.run_id:
        raise CheckpointError(
            f"{point.checkpoint}: belongs to run {point.run_id}, {output_dir} holds run {folder_run} ; resume "
            "into the checkpoint's own output folder or a new --output_dir"
        )
    if folder_run is None:
        _check_not_foreign(output_dir)
    return RunStart(run_id=point.run_id, resume_point=point)


def _check_resume_recipe(output_dir: Path, start: RunStart, recipe: Recipe, force: bool) -> None:
    point = start.resume_point
    if point is None:
        return
    if point.checkpoint is not None:
        where, saved = point.checkpoint, load_checkpoint_state(point.checkpoint).get("recipe")
    else:
        where, path = output_dir, output_dir / RECIPE_NAME
        saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    differences = check_resume_recipe(
        saved if isinstance(saved, dict) else None, recipe.to_dict(), str(where), force=force
    )
    if differences:
        print(
            f"warning: {IGNORE_MISMATCH_FLAG}: resuming {where} with a changed recipe: {'; '.join(differences)}"
        )


def _check_other_runs(output_dir: Path, run_id: str) -> None:
    """Refuses stage-final or final folders of another run (this run would read or replace them) and warns once
    about other runs' checkpoints, which this run neither resumes nor deletes."""
    theirs = [path for _, path in list_stage_finals(output_dir) if run_id_of(path) != run_id]
    final = output_dir / "final"
    if final.is_dir() and run_id_of(final) != run_id:
        theirs.append(final)
    if theirs:
        raise OutputDirInUseError(
            f"{output_dir}: holds {_names(theirs)} of another run, which run {run_id} would read or replace ; "
            "move them out of the folder"
        )
    others = [path for _, _, path in list_checkpoints(output_dir) if run_id_of(path) != run_id]
    if others:
        print(
            f"warning: {output_dir} also holds checkpoints of other runs, kept and never resumed by run {run_id}: "
            + ", ".join(f"{path.name} (run {run_id_of(path)})" for path in others)
        )


def prepare_output_dir(
    accelerator,
    output_dir: Path,
    recipe: Recipe,
    overwrite: bool = False,
    *,
    resume_from_checkpoint: str | None = None,
    ignore_recipe_mismatch: bool = False,
    inputs: Sequence[str | Path] = (),
) -> RunStart:
    """Decides, on the main process and before writing anything, how the run starts in `output_dir`; then marks
    the folder with the run id, removes stale temporaries of killed saves (saying so) and writes the resolved
    recipe to `recipe.json`. Every process gets the same answer or the same error.

    A new run needs a missing or empty folder, or one run_pretrain wrote that holds no run (checkpoints,
    stage-final or final folders, results); `overwrite` (--overwrite_output_dir) first deletes such a folder,
    only through `atomic.remove_ours` (our marker, not the current folder, holding no input of the recipe nor
    `inputs`). `resume_from_checkpoint` ("latest" or a checkpoint path) continues the folder's run: its run id,
    its newest intact checkpoint (`find_resume_point`), and a recipe equal to the checkpoint's in every field
    that changes the result (`check_resume_recipe`; `ignore_recipe_mismatch` turns a difference into a warning).
    "latest" with nothing to resume starts from scratch and says so. The folder is locked for the rest of the run
    (`atomic.lock_folder`, taken before deciding): a second run started into it stops at once, naming this one.

    Returns:
        The `RunStart` (run id, resume point).

    Raises:
        OutputDirInUseError: the folder holds another run or files run_pretrain did not write, or another live
            run holds its lock.
        UnsafeRemovalError: `overwrite` of a folder that may not be deleted.
        CheckpointError: an explicit checkpoint that is incomplete, corrupt or of another run.
        RecipeMismatchError: a resume with another recipe, without `ignore_recipe_mismatch`.
    """
    output_dir = Path(output_dir).absolute()
    if overwrite and resume_from_checkpoint:
        raise ValueError(
            "--overwrite_output_dir starts the run again, --resume_from_checkpoint continues it: not both"
        )

    def decide() -> RunStart:
        start = _resumed_run(output_dir, resume_from_checkpoint) if resume_from_checkpoint else None
        if start is None:
            if resume_from_checkpoint:
                print(f"no checkpoint in {output_dir}; starting from scratch")
            start = _new_run(
                output_dir, overwrite, recipe_inputs(recipe) + [Path(p).absolute() for p in inputs]
            )
        else:
            _check_other_runs(output_dir, start.run_id)
            _check_resume_recipe(output_dir, start, recipe, ignore_recipe_mismatch)
        return start

    def decide_and_write() -> RunStart:
        # Before anything, the lock's file included: an output that is, holds or lies inside an input would write
        # over what the run reads.
        read = recipe_inputs(recipe) + [Path(p).absolute() for p in inputs]
        named = {f"recipe input {number}": path for number, path in enumerate(read, 1)}
        check_output_outside_inputs(output_dir, named, output_name="--output_dir")
        # The lock first: two runs started at once into one new folder must not both decide it is free.
        created = _lock_if_ours(output_dir)
        try:
            start = decide()
        except BaseException:
            release_folder(output_dir, undo=True)  # a refused run changes nothing in the folder
            if created and output_dir.is_dir() and not any(output_dir.iterdir()):
                output_dir.rmdir()  # nor leaves one behind
            raise
        # The checks passed: from here on the folder is this run's (locked again: --overwrite_output_dir removed
        # the previous folder with its lock file).
        output_dir.mkdir(parents=True, exist_ok=True)
        lock_folder(output_dir, error=OutputDirInUseError)
        if _folder_run_id(output_dir) != start.run_id:
            write_marker(output_dir, RUN_WRITER, run_id=start.run_id)
        remove_stale_temporaries_in(output_dir)
        atomic_write_text(output_dir / RECIPE_NAME, json.dumps(recipe.to_dict(), indent=2) + "\n")
        return start

    start = on_main_process(accelerator, decide_and_write)
    accelerator.wait_for_everyone()
    return start


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


def save_stage_final(
    accelerator,
    model,
    processor,
    output_dir: Path,
    stage: int,
    history: list[dict[str, Any]],
    *,
    run_id: str | None = None,
) -> Path:
    """Writes stage `stage`'s (1-based) final weights to `stage-<stage>-final/` (the next stage starts from them,
    and so does a resume after this point) and the loss history so far, on the main process while the others wait
    (`run_id`: default the output folder's). Call on every process; returns the folder."""
    accelerator.wait_for_everyone()
    final = output_dir / stage_final_name(stage)
    if accelerator.is_main_process:
        save_pretrained_atomic(accelerator.unwrap_model(model), processor, final, run_id=run_id)
        save_loss_history(output_dir, history)
        accelerator.print(f"stage {stage} final weights: {final}")
    accelerator.wait_for_everyone()
    return final


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
    *,
    run_id: str | None = None,
) -> Path:
    """Writes, on the main process: `loss_curves.png` (when matplotlib is installed) and `pretrain_results.json`
    in `output_dir`, and the final model folder `output_dir/final` (model, processor, the model card built from
    `base_card` with the saved model's architecture and parameter count, the stages, final losses, recalls and the
    embedded loss curves, and the PNG; marked with `run_id`, default the output folder's). Returns the final
    folder."""
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
        model=model,
        final_score=results.get("zero_shot_final_score", "itm"),
        itm_metrics=results.get("zero_shot_retrieval_itm"),
    )
    final_dir = output_dir / "final"
    run_id = run_id if run_id is not None else run_id_of(output_dir)
    files = [png] if png is not None else []
    save_pretrained_atomic(model, processor, final_dir, card=card, files=files, run_id=run_id)
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


# The scripts' `--toy` flags for the world and test split of a recipe's evaluation, with the default each script
# takes (DEMO_TOY_WORLD / DEMO_TOY_TEST_SPLIT): only values that differ from it are printed.
_EVALUATE_TOY_FLAGS = (
    ("num_test_images", "--toy_test_images", DEMO_TOY_TEST_SPLIT["num_test_images"]),
    ("seed", "--toy_seed", DEMO_TOY_TEST_SPLIT["seed"]),
    ("world_seed", "--toy_world_seed", DEMO_TOY_WORLD["world_seed"]),
    ("noise", "--toy_noise", DEMO_TOY_WORLD["noise"]),
    ("num_attributes", "--toy_num_attributes", DEMO_TOY_WORLD["num_attributes"]),
)
_RETRIEVAL_TOY_FLAGS = (
    ("num_test_images", "--toy_num_eval_images", DEMO_TOY_TEST_SPLIT["num_test_images"]),
    ("seed", "--toy_seed", DEMO_TOY_TEST_SPLIT["seed"]),
    ("world_seed", "--toy_world_seed", DEMO_TOY_WORLD["world_seed"]),
    ("noise", "--toy_noise", DEMO_TOY_WORLD["noise"]),
    ("num_attributes", "--toy_num_attributes", DEMO_TOY_WORLD["num_attributes"]),
)


def _toy_flags(toy: Mapping[str, Any], flags: tuple[tuple[str, str, Any], ...]) -> str:
    """` --toy` and the flags whose value in the recipe's `toy_world` (or make_toy_world's default where the recipe
    leaves it out) differs from the script's default."""
    defaults = {
        name: parameter.default for name, parameter in inspect.signature(make_toy_world).parameters.items()
    }
    text = " --toy"
    for key, flag, script_default in flags:
        value = toy.get(key, defaults[key])
        if value != script_default:
            text += f" {flag} {value}"
    return text


def next_steps_message(recipe: Recipe, final_dir: Path, wall_seconds: float) -> str:
    """The closing lines of a run: where the model is, how to load it, and the commands to run next, each a
    complete `python examples/...` line: evaluate the model again, fine-tune it for retrieval, evaluate the
    fine-tuned model. When the recipe's zero-shot check used the toy world, they pass the `--toy` flags that score
    the same world and test split (fine-tuning trains on that seed's train split and validates on its validation
    split, disjoint images)."""
    dataset = recipe.evaluation.dataset if recipe.evaluation is not None else None
    toy: Mapping[str, Any] | None = dataset.toy_world if dataset is not None and dataset.toy_world else None
    if toy:
        eval_flags = _toy_flags(toy, _EVALUATE_TOY_FLAGS)
        retrieval_flags = _toy_flags(toy, _RETRIEVAL_TOY_FLAGS)
        fine_tuned = "outputs/retrieval-toy"
    else:
        eval_flags = " --dataset DATASET"
        retrieval_flags = " --train_dataset DATASET --eval_dataset DATASET"
        fine_tuned = "outputs/retrieval"
    final = shlex.quote(str(final_dir))
    return (
        f"\nDone in {wall_seconds:.0f} s. Pre-trained model and processor: {final_dir}\n"
        f"  load it:   AutoModelForPreTraining.from_pretrained('{final_dir}')  (import modeling_imagebert first, or "
        f"pass trust_remote_code=True)\n"
        f"  next:      python examples/evaluate_retrieval.py --model_name_or_path {final}{eval_flags}"
        "   # zero-shot retrieval\n"
        f"             python examples/run_retrieval.py --model_name_or_path {final}{retrieval_flags}"
        f" --output_dir {fine_tuned}   # fine-tune for retrieval\n"
        f"             python examples/evaluate_retrieval.py --model_name_or_path {fine_tuned}{eval_flags}"
        "   # the fine-tuned model"
    )


__all__ = [
    "LOSS_HISTORY_NAME",
    "RECIPE_NAME",
    "RESULTS_NAME",
    "RUN_FOLDER_ERRORS",
    "RUN_WRITER",
    "OutputDirInUseError",
    "RunStart",
    "next_steps_message",
    "prepare_output_dir",
    "push_final_model",
    "recipe_inputs",
    "resumed_loss_history",
    "run_gradient_accumulation",
    "save_loss_history",
    "save_stage_final",
    "save_run_results",
    "set_cpu_threads",
    "tracker_from_flag",
]
