"""Checkpoints of multi-stage pre-training: atomic, verified, tied to one run; the stage-final folders; signals.

A checkpoint `checkpoint-<stage>-<step>` holds `accelerator.save_state` (model, optimiser, RNG states, scaler), the
LR scheduler and a JSON trainer state. It is written into a temporary sibling (`atomic.temporary_sibling`, so the
next run removes the leftover of a killed save and says so), gets the project's marker and a manifest (every
file's size and SHA-256), and is renamed into place once complete.

Runs. Every run has a run id (`new_run_id`: UTC time + random hex), kept in the output folder's marker, in every
checkpoint's trainer state and in the marker of every `stage-<k>-final` and `final` folder; a resumed run keeps the
id of the run it continues. Listing, rotation and `latest` see only the checkpoints of one run id, so an older
run's checkpoints in the same folder are never deleted and never resumed by mistake.

Integrity. Loading checks that every file the manifest lists is present with its size; resolving a resume point
also checks the checksums. `latest` skips a checkpoint that fails (naming it and the file) and falls back to the
newest complete one of the run; an explicit checkpoint that fails is refused with `CheckpointError`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import re
import secrets
import shutil
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..atomic import (
    MARKER_NAME,
    UnsafeRemovalError,
    atomic_folder,
    atomic_write_text,
    read_marker,
    remove_ours,
    replace_folder,
    temporary_sibling,
    write_marker,
)
from ..safe_loading import load_torch_file

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)-(\d+)$")
STAGE_FINAL_PATTERN = re.compile(r"^stage-(\d+)-final$")
TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "lr_scheduler.pt"
MANIFEST_NAME = "manifest.json"
# SHA-256 measured faster than blake2b here (CPU SHA extensions): ~0.5 s for a 280 MB demo checkpoint.
HASH_NAME = "sha256"
# The `written_by` of the markers: distinct from the output folder's ("run_pretrain"), so a checkpoint or model
# folder given as --output_dir is never taken for a run's output folder.
CHECKPOINT_WRITER = "run_pretrain checkpoint"
MODEL_WRITER = "run_pretrain model"

T = TypeVar("T")


class CheckpointError(ValueError):
    """A checkpoint or stage-final folder that is incomplete, corrupt, or of another run; the message names the
    folder and the file."""


def new_run_id() -> str:
    """A new run id: `<UTC time>-<6 random hex digits>`, e.g. `20261130T101500Z-3fa2c1` (sortable, unique enough
    for the runs of one output folder)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def on_main_process(accelerator, work: Callable[[], T]) -> T:
    """Runs `work()` on the main process only and hands its result, or the exception it raised, to every process
    (`broadcast_object_list`), so all of them return the same value or raise the same error instead of the others
    waiting forever for a main process that stopped."""
    from accelerate.utils import broadcast_object_list

    outcome: list[Any] = [None, None]
    if accelerator.is_main_process:
        try:
            outcome = [work(), None]
        except Exception as error:  # handed to every process, then raised everywhere
            outcome = [None, error]
    if accelerator.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


# ---------------------------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, HASH_NAME).hexdigest()


def write_manifest(folder: str | Path) -> Path:
    """Writes `folder/manifest.json`: {"algorithm": "sha256", "files": {relative path: {"size", "sha256"}}} for
    every file below `folder` but the manifest and the ownership marker. Returns the manifest path."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_file() and name not in (MANIFEST_NAME, MARKER_NAME):
            files[name] = {"size": path.stat().st_size, HASH_NAME: _file_digest(path)}
    manifest = {"algorithm": HASH_NAME, "files": files}
    return atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def manifest_problems(folder: str | Path, *, checksums: bool = True) -> list[str]:
    """What is wrong with `folder` against its manifest: no (readable) manifest, a listed file missing, a size
    or (with `checksums`) a checksum that differs. Empty when the folder is complete."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
        files = manifest["files"]
        algorithm = manifest["algorithm"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST_NAME} is missing or unreadable"]
    problems = []
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != entry["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, {entry['size']} were written")
        elif checksums:
            with open(path, "rb") as file:
                if hashlib.file_digest(file, algorithm).hexdigest() != entry[algorithm]:
                    problems.append(f"{name} fails its {algorithm} checksum (corrupted)")
    return problems


def verify_folder(folder: str | Path, *, checksums: bool = True) -> None:
    """Raises CheckpointError naming `folder` and each bad file unless `manifest_problems` finds nothing."""
    problems = manifest_problems(folder, checksums=checksums)
    if problems:
        raise CheckpointError(f"{folder}: {'; '.join(problems)} ; it cannot be resumed from")


# ---------------------------------------------------------------------------------------------------------------
# Listing the checkpoints of a run
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_name(stage: int, step: int) -> str:
    """`checkpoint-<stage>-<step>` (stage 1-based, step = optimiser steps done in that stage)."""
    return f"checkpoint-{stage}-{step}"


def stage_final_name(stage: int) -> str:
    return f"stage-{stage}-final"


def run_id_of(folder: str | Path) -> str | None:
    """The run id a checkpoint (its trainer state) or a marked folder (its marker) belongs to; None if unknown."""
    folder = Path(folder)
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        if isinstance(state, dict) and isinstance(state.get("run_id"), str):
            return state["run_id"]
    except (OSError, ValueError):
        pass
    marker = read_marker(folder)
    return marker.get("run_id") if marker is not None else None


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[tuple[int, int, Path]]:
    """Checkpoints in `output_dir` (with a trainer state; temporary folders never count), oldest first, as
    (stage, step, path); with `run_id`, only those of that run."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE_NAME).is_file():
            if run_id is None or run_id_of(child) == run_id:
                found.append((int(match.group(1)), int(match.group(2)), child))
    return sorted(found)


def list_stage_finals(output_dir: str | Path, run_id: str | None = None) -> list[tuple[int, Path]]:
    """`stage-<k>-final` folders in `output_dir` (with a config.json), as (k, path) by k; with `run_id`, only
    those whose marker names that run."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = STAGE_FINAL_PATTERN.match(child.name)
        if match and child.is_dir() and (child / "config.json").is_file():
            if run_id is None or run_id_of(child) == run_id:
                found.append((int(match.group(1)), child))
    return sorted(found)


@dataclass
class ResumePoint:
    """Where a run resumes: `stage` (1-based) and the checkpoint to load (None: the stage starts afresh from the
    previous stage's final weights); `run_id` of the checkpoint or stage-final folder it comes from."""

    stage: int
    checkpoint: Path | None
    run_id: str | None = None


def find_resume_point(
    output_dir: str | Path, resume_from_checkpoint: str, run_id: str | None = None
) -> ResumePoint | None:
    """Resolves `--resume_from_checkpoint`, checksums included.

    "latest": the newest complete checkpoint or `stage-<k>-final` of run `run_id` (None: of any run) in
    `output_dir` (a stage-final resumes at the start of stage k + 1); each newer one that fails its manifest is
    skipped with a warning naming it and the bad file. None when nothing is left.
    A checkpoint path: that checkpoint, which must be complete and intact.

    Raises:
        FileNotFoundError: the path is not a checkpoint folder.
        CheckpointError: the checkpoint at the path is incomplete or corrupt (the file named).
    """
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        match = CHECKPOINT_PATTERN.match(path.name)
        if not path.is_dir() or not (path / TRAINER_STATE_NAME).is_file() or not match:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {path}: not a complete checkpoint folder (checkpoint-<stage>-<step> with "
                f"{TRAINER_STATE_NAME})"
            )
        verify_folder(path)
        return ResumePoint(stage=int(match.group(1)), checkpoint=path, run_id=run_id_of(path))
    # Newest first; a stage-final comes after every checkpoint of its stage.
    candidates = [(stage, step, path, True) for stage, step, path in list_checkpoints(output_dir, run_id)]
    candidates += [
        (stage, float("inf"), path, False) for stage, path in list_stage_finals(output_dir, run_id)
    ]
    for stage, _, path, is_checkpoint in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        problems = manifest_problems(path)
        if problems:
            logger.warning(f"warning: skipping {path} for resume: {'; '.join(problems)}")
            continue
        if is_checkpoint:
            return ResumePoint(stage=stage, checkpoint=path, run_id=run_id_of(path))
        return ResumePoint(stage=stage + 1, checkpoint=None, run_id=run_id_of(path))
    return None


def rotate_checkpoints(
    output_dir: str | Path,
    save_total_limit: int | None,
    run_id: str,
    newest: tuple[int, int] | None = None,
) -> list[Path]:
    """Deletes the oldest checkpoints of run `run_id` beyond `save_total_limit` (None: keep all), counting only
    those up to `newest` (stage, step), the one just saved: a later one left by an earlier attempt of the run
    (skipped as corrupt, or passed over by an explicit resume) never pushes the new one out. Checkpoints of other
    runs are never touched, and only marked folders are deleted (`atomic.remove_ours`). Returns the deleted
    paths."""
    if save_total_limit is None:
        return []
    checkpoints = [c for c in list_checkpoints(output_dir, run_id) if newest is None or c[:2] <= newest]
    deleted = []
    for _, _, path in checkpoints[: max(0, len(checkpoints) - save_total_limit)]:
        try:
            remove_ours(path)
        except UnsafeRemovalError as error:
            logger.warning(f"warning: checkpoint rotation keeps {path}: {error}")
            continue
        deleted.append(path)
    return deleted


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    stage: int,
    step: int,
    state: dict[str, Any],
    scheduler=None,
    *,
    run_id: str,
) -> Path:
    """Saves a resumable checkpoint atomically: `accelerator.save_state` (model, optimiser, RNG states, scaler),
    the LR scheduler and `state` plus `run_id` (JSON) go to a temporary sibling, which gets the marker and the
    manifest and is renamed to `checkpoint-<stage>-<step>` once complete. Call on every process.

    Raises CheckpointError (before writing anything) when a checkpoint of that name from another run is there.
    Returns the checkpoint path."""
    output_dir = Path(output_dir)
    target = output_dir / checkpoint_name(stage, step)

    def make_temporary() -> str:
        if target.exists() and run_id_of(target) != run_id:
            raise CheckpointError(
                f"{target}: belongs to another run ({run_id_of(target)}), this run ({run_id}) would replace it ; "
                "move it out of the output folder and resume with --resume_from_checkpoint latest"
            )
        return str(temporary_sibling(target))

    # One temporary folder for all processes: each writes its part of the state into it.
    temp = Path(on_main_process(accelerator, make_temporary))
    try:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if scheduler is not None:
                torch.save(scheduler.state_dict(), temp / SCHEDULER_NAME)
            state = {**state, "run_id": run_id}
            (temp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2, default=str) + "\n")
            write_marker(temp, CHECKPOINT_WRITER, run_id=run_id)
            write_manifest(temp)
            replace_folder(temp, target)
    except BaseException:
        if accelerator.is_main_process:
            shutil.rmtree(temp, ignore_errors=True)
        raise
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, path: str | Path, scheduler=None) -> dict[str, Any]:
    """Restores what `save_checkpoint` wrote (into the already prepared objects) and returns its state dict.

    Every file of the manifest must be present with its size (the checksums were checked when the resume point
    was resolved, `find_resume_point`); raises CheckpointError naming the missing or truncated file."""
    path = Path(path)
    verify_folder(path, checksums=False)
    if scheduler is not None and not (path / SCHEDULER_NAME).is_file():
        raise CheckpointError(
            f"{path}: {SCHEDULER_NAME} is missing, the learning-rate schedule would restart ; resume from "
            "another checkpoint"
        )
    accelerator.load_state(str(path))
    if scheduler is not None:
        scheduler.load_state_dict(load_torch_file(path / SCHEDULER_NAME, "a learning-rate scheduler state"))
    return json.loads((path / TRAINER_STATE_NAME).read_text())


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (stage, step, run id, recipe, loss history, ...), without its tensors."""
    return json.loads((Path(path) / TRAINER_STATE_NAME).read_text())


def save_pretrained_atomic(
    model,
    processor,
    target: str | Path,
    card: str | None = None,
    files: Sequence[str | Path] = (),
    *,
    run_id: str | None = None,
) -> Path:
    """`model.save_pretrained` + `processor.save_pretrained` (+ README.md `card`, + copies of `files`, e.g. the
    loss-curve PNG the card embeds) into a temporary folder with a manifest and a marker naming `run_id`, renamed
    onto `target` when complete. Call on the main process only."""
    with atomic_folder(target, overwrite=True, written_by=MODEL_WRITER, run_id=run_id) as temp:
        model.save_pretrained(temp)
        if processor is not None:
            processor.save_pretrained(temp)
        if card is not None:
            (temp / "README.md").write_text(card)
        for file in files:
            shutil.copyfile(file, temp / Path(file).name)
        write_manifest(temp)
    return Path(target)


def save_stage_checkpoint(
    accelerator,
    recipe,
    stage_index: int,
    step: int,
    *,
    num_steps: int,
    scheduler=None,
    loss_history: list[dict[str, Any]] | None = None,
    run_id: str | None = None,
) -> Path:
    """`save_checkpoint` of optimiser step `step` of stage `stage_index` (0-based) of `recipe` (a `Recipe`), in
    its `training.output_dir`, with the state a resume checks (stage, step, processes, batch size, the resolved
    recipe) and the loss history so far; then, on the main process, `rotate_checkpoints` of this run to
    `training.save_total_limit`. `run_id`: default the one in the output folder's marker. Call on every process.
    Returns the checkpoint path."""
    stage, number = recipe.stages[stage_index], stage_index + 1
    output_dir = Path(recipe.training.output_dir).absolute()
    if run_id is None:
        run_id = run_id_of(output_dir)
        if run_id is None:
            raise CheckpointError(
                f"{output_dir}: has no run id in its marker ; start the run with run_pretrain"
            )
    state = {
        "stage": number,
        "stage_name": stage.name,
        "step": step,
        "num_steps": num_steps,
        "micro_step": step * stage.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "batch_size": stage.batch_size,
        "recipe_name": recipe.name,
        "recipe": recipe.to_dict(),
        "loss_history": list(loss_history or []),
    }
    path = save_checkpoint(accelerator, output_dir, number, step, state, scheduler, run_id=run_id)
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, recipe.training.save_total_limit, run_id, newest=(number, step))
    return path


def restore_stage_checkpoint(accelerator, path: str | Path, scheduler, batch_size: int) -> tuple[int, list]:
    """`load_checkpoint` for a stage about to resume; warns when the number of processes or the batch size
    changed (the data order then differs from an uninterrupted run). Returns (optimiser steps done, the loss
    history saved with it)."""
    state = load_checkpoint(accelerator, path, scheduler)
    if state.get("num_processes") != accelerator.num_processes or state.get("batch_size") != batch_size:
        accelerator.print(
            f"warning: {path} was written with {state.get('num_processes')} processes x batch "
            f"{state.get('batch_size')}; resuming with {accelerator.num_processes} x {batch_size} changes the "
            f"data order"
        )
    accelerator.print(f"resumed stage {state['stage']} at step {state['step']} from {path}")
    return int(state["step"]), list(state.get("loss_history", []))


# ---------------------------------------------------------------------------------------------------------------
# Signals and stops
# ---------------------------------------------------------------------------------------------------------------


class GracefulStop:
    """Catches SIGTERM and SIGINT so the training loop can save a checkpoint and exit at the end of the current
    step; a second SIGINT interrupts at once. Use as a context manager (restores the previous handlers)."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> GracefulStop:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Stopped(Exception):
    """Raised to leave the run once its stop checkpoint is written; `code` is the process exit status (0 for
    --max_steps_this_run, 128 + the signal number for a signal)."""

    def __init__(self, reason: str, code: int, nonfinite: bool = False):
        super().__init__(reason)
        self.code = code
        self.nonfinite = nonfinite  # a loss or gradient norm was NaN/inf: raise, never save a checkpoint


class StopRequests(GracefulStop):
    """Whether the run should stop after an optimiser step: a SIGTERM/SIGINT (caught as `GracefulStop` does),
    `max_steps_this_run` optimiser steps done in this run, or a non-finite loss or gradient norm. A context manager,
    like `GracefulStop`.

    With several processes they must all stop at the same step (a signal may reach only one, and `save_state`
    would hang): the step budget is the same everywhere, and a signal and the non-finite flag are agreed on by one
    all-reduce at sync points only (the logging steps, where the loop reads its losses anyway, and the steps before
    a checkpoint), so no step waits for the device for them.
    """

    def __init__(self, accelerator, max_steps_this_run: int | None = None):
        super().__init__()
        self.accelerator = accelerator
        self.max_steps_this_run = max_steps_this_run
        self.steps_this_run = 0

    def check(self, sync_point: bool, nonfinite: torch.Tensor | None = None) -> Stopped | None:
        """Counts one optimiser step; returns a `Stopped` (reason, exit code) when the run must stop now, else
        None. `sync_point`: whether processes may exchange flags at this step. `nonfinite`: this process's
        non-finite flag (a 0-d device tensor, e.g. `NonFiniteWatch.flag`), read at sync points and before any stop;
        when it is set on any process, every process gets a `Stopped` with `nonfinite=True` (never save then)."""
        self.steps_this_run += 1
        signal_stop = None
        if self.received is not None:
            signal_stop = Stopped(f"received signal {self.received}", 128 + self.received)
        budget_stop = None
        if self.max_steps_this_run is not None and self.steps_this_run >= self.max_steps_this_run:
            budget_stop = Stopped(f"--max_steps_this_run {self.max_steps_this_run} reached", 0)
        bad = Stopped("a loss or the gradient norm is not finite", 2, nonfinite=True)
        if self.accelerator.num_processes == 1:
            stop = signal_stop or budget_stop
            if nonfinite is not None and (sync_point or stop is not None) and bool(nonfinite):
                return bad
            return stop
        # Every process reaches the budget at the same step, so it is a sync point for the flag too.
        if sync_point or budget_stop is not None:
            device = self.accelerator.device
            flags = torch.zeros(2, dtype=torch.int64, device=device)
            flags[0] = int(signal_stop is not None)
            if nonfinite is not None:
                flags[1] = nonfinite.to(device=device, dtype=torch.int64)
            signals, nonfinite_count = self.accelerator.reduce(flags, reduction="sum").tolist()
            if nonfinite_count > 0:
                return bad
            if sync_point and signals > 0:
                return signal_stop or Stopped("another process was asked to stop", 128 + signal.SIGTERM)
        return budget_stop


__all__ = [
    "CHECKPOINT_PATTERN",
    "MANIFEST_NAME",
    "CheckpointError",
    "GracefulStop",
    "ResumePoint",
    "Stopped",
    "StopRequests",
    "checkpoint_name",
    "find_resume_point",
    "list_checkpoints",
    "list_stage_finals",
    "load_checkpoint",
    "load_checkpoint_state",
    "manifest_problems",
    "new_run_id",
    "on_main_process",
    "restore_stage_checkpoint",
    "rotate_checkpoints",
    "run_id_of",
    "save_checkpoint",
    "save_pretrained_atomic",
    "save_stage_checkpoint",
    "stage_final_name",
    "verify_folder",
    "write_manifest",
]
