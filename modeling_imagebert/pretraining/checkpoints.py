"""Checkpoints of multi-stage pre-training: atomic, resumable, rotated; the stage-final folders; signal handling.

A checkpoint `checkpoint-<stage>-<step>` holds `accelerator.save_state` (model, optimiser, RNG states, scaler), the
LR scheduler and a JSON state; it is written to a temporary folder and renamed into place once complete.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import TEMP_PREFIX, atomic_folder, replace_folder

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)-(\d+)$")
STAGE_FINAL_PATTERN = re.compile(r"^stage-(\d+)-final$")
TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "lr_scheduler.pt"


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_name(stage: int, step: int) -> str:
    """`checkpoint-<stage>-<step>` (stage 1-based, step = optimiser steps done in that stage)."""
    return f"checkpoint-{stage}-{step}"


def stage_final_name(stage: int) -> str:
    return f"stage-{stage}-final"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first, as (stage, step, path). Temporary folders of an
    interrupted save are never listed."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), int(match.group(2)), child))
    return sorted(found)


@dataclass
class ResumePoint:
    """Where a run resumes: `stage` (1-based) and the checkpoint to load (None: the stage starts afresh from the
    previous stage's final weights)."""

    stage: int
    checkpoint: Path | None


def find_resume_point(output_dir: str | Path, resume_from_checkpoint: str) -> ResumePoint | None:
    """Resolves `--resume_from_checkpoint`: "latest" (the newest checkpoint, or the start of the stage after the
    newest `stage-<k>-final` when that is newer; None when the folder has neither) or a checkpoint path.

    Raises FileNotFoundError for a path that is not a complete checkpoint.
    """
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        match = CHECKPOINT_PATTERN.match(path.name)
        if not path.is_dir() or not (path / TRAINER_STATE_NAME).is_file() or not match:
            raise FileNotFoundError(
                f"--resume_from_checkpoint {path}: not a complete checkpoint folder (checkpoint-<stage>-<step> with "
                f"{TRAINER_STATE_NAME})"
            )
        return ResumePoint(stage=int(match.group(1)), checkpoint=path)
    checkpoints = list_checkpoints(output_dir)
    finals = []
    if Path(output_dir).is_dir():
        for child in Path(output_dir).iterdir():
            match = STAGE_FINAL_PATTERN.match(child.name)
            if match and (child / "config.json").is_file():
                finals.append(int(match.group(1)))
    last_final = max(finals, default=0)
    if checkpoints and checkpoints[-1][0] > last_final:
        stage, _, path = checkpoints[-1]
        return ResumePoint(stage=stage, checkpoint=path)
    if last_final:
        return ResumePoint(stage=last_final + 1, checkpoint=None)
    return None


def rotate_checkpoints(output_dir: str | Path, save_total_limit: int | None) -> list[Path]:
    """Deletes the oldest checkpoints beyond `save_total_limit` (None: keep all). Returns the deleted paths."""
    if save_total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    doomed = [path for _, _, path in checkpoints[: max(0, len(checkpoints) - save_total_limit)]]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def save_checkpoint(
    accelerator, output_dir: str | Path, stage: int, step: int, state: dict[str, Any], scheduler=None
) -> Path:
    """Saves a resumable checkpoint atomically: `accelerator.save_state` (model, optimiser, RNG states, scaler),
    the LR scheduler and `state` (JSON) go to a temporary folder, renamed to `checkpoint-<stage>-<step>` once
    complete. Call on every process. Returns the checkpoint path."""
    output_dir = Path(output_dir)
    target = output_dir / checkpoint_name(stage, step)
    # The same temporary name on every process: each writes its part of the state into it.
    temp = output_dir / f"{TEMP_PREFIX}{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(temp, ignore_errors=True)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if scheduler is not None:
            torch.save(scheduler.state_dict(), temp / SCHEDULER_NAME)
        (temp / TRAINER_STATE_NAME).write_text(json.dumps(state, indent=2, default=str) + "\n")
        replace_folder(temp, target)
    accelerator.wait_for_everyone()
    return target


def load_checkpoint(accelerator, path: str | Path, scheduler=None) -> dict[str, Any]:
    """Restores what `save_checkpoint` wrote (into the already prepared objects) and returns its state dict."""
    path = Path(path)
    accelerator.load_state(str(path))
    if scheduler is not None and (path / SCHEDULER_NAME).is_file():
        scheduler.load_state_dict(torch.load(path / SCHEDULER_NAME, weights_only=True))
    return json.loads((path / TRAINER_STATE_NAME).read_text())


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (stage, step, loss history, ...), without loading its tensors."""
    return json.loads((Path(path) / TRAINER_STATE_NAME).read_text())


def save_pretrained_atomic(
    model, processor, target: str | Path, card: str | None = None, files: Sequence[str | Path] = ()
) -> Path:
    """`model.save_pretrained` + `processor.save_pretrained` (+ README.md `card`, + copies of `files`, e.g. the
    loss-curve PNG the card embeds) into a temporary folder, renamed onto `target` when complete. Call on the main
    process only."""
    with atomic_folder(target, overwrite=True) as temp:
        model.save_pretrained(temp)
        if processor is not None:
            processor.save_pretrained(temp)
        if card is not None:
            (temp / "README.md").write_text(card)
        for file in files:
            shutil.copyfile(file, temp / Path(file).name)
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
) -> Path:
    """`save_checkpoint` of optimiser step `step` of stage `stage_index` (0-based) of `recipe` (a `Recipe`), in
    its `training.output_dir`, with the state a resume checks (stage, step, processes, batch size) and the loss
    history so far; then, on the main process, `rotate_checkpoints` to `training.save_total_limit`. Call on
    every process. Returns the checkpoint path."""
    stage, number = recipe.stages[stage_index], stage_index + 1
    output_dir = Path(recipe.training.output_dir).absolute()
    state = {
        "stage": number,
        "stage_name": stage.name,
        "step": step,
        "num_steps": num_steps,
        "micro_step": step * stage.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "batch_size": stage.batch_size,
        "recipe": recipe.name,
        "loss_history": list(loss_history or []),
    }
    path = save_checkpoint(accelerator, output_dir, number, step, state, scheduler)
    if accelerator.is_main_process:
        rotate_checkpoints(output_dir, recipe.training.save_total_limit)
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
    "GracefulStop",
    "Stopped",
    "StopRequests",
    "restore_stage_checkpoint",
    "save_stage_checkpoint",
    "ResumePoint",
    "checkpoint_name",
    "find_resume_point",
    "list_checkpoints",
    "load_checkpoint",
    "load_checkpoint_state",
    "rotate_checkpoints",
    "save_checkpoint",
    "save_pretrained_atomic",
    "stage_final_name",
]
