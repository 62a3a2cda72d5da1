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


def save_pretrained_atomic(model, processor, target: str | Path, card: str | None = None) -> Path:
    """`model.save_pretrained` + `processor.save_pretrained` (+ README.md `card`) into a temporary folder, renamed
    onto `target` when complete. Call on the main process only."""
    with atomic_folder(target, overwrite=True) as temp:
        model.save_pretrained(temp)
        if processor is not None:
            processor.save_pretrained(temp)
        if card is not None:
            (temp / "README.md").write_text(card)
    return Path(target)


# ---------------------------------------------------------------------------------------------------------------
# Signals
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


__all__ = [
    "GracefulStop",
    "ResumePoint",
    "checkpoint_name",
    "find_resume_point",
    "list_checkpoints",
    "load_checkpoint",
    "rotate_checkpoints",
    "save_checkpoint",
    "save_pretrained_atomic",
    "stage_final_name",
]
