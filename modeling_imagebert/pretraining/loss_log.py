"""Per-task training losses of a pre-training stage: kept on the device between logging steps, read to the host
once per logging window, logged (tracker, progress bar or printed line) and recorded as the run's loss history.

The training step never waits for the device: `add` keeps the detached loss tensors, and only `step` at a logging
step stacks the window's values and copies them to the host in one transfer. A task's logged loss is its mean over
the micro-batches of the window that trained it (with `itm_mode: separate`, batches differ in tasks).

The loss history is a list of records `{"stage", "step", "global_step", "task", "loss"}`, one per task and logging
step; `global_step` counts optimiser steps across stages, so stages plot end to end.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..tasks_imagebert import TASK_NAMES


def global_step_offset(history: Sequence[Mapping[str, Any]], stage: int) -> int:
    """Optimiser steps of the stages before `stage` (1-based), read from `history`: every stage logs its last
    step, so it is the largest `global_step` recorded by an earlier stage (0 when there is none)."""
    return max((int(r["global_step"]) for r in history if int(r["stage"]) < stage), default=0)


def history_until(history: Sequence[Mapping[str, Any]], stage: int, step: int) -> list[dict[str, Any]]:
    """The records of `history` up to optimiser step `step` of stage `stage` (1-based): what a run resumed there
    had logged before it stopped."""
    return [
        dict(r)
        for r in history
        if int(r["stage"]) < stage or (int(r["stage"]) == stage and int(r["step"]) <= step)
    ]


class StageLossLog:
    """The losses of one stage, from its micro-batches to the logs.

    Args:
        accelerator: logs go through `accelerator.log` (trackers) and `accelerator.print` (main process only).
        stage: 1-based stage number; num_stages, stage_name: for the progress bar's label.
        num_steps: optimiser steps of the stage; first_step: where it starts (> 0 when resumed).
        tasks: the enabled tasks with their weights; only their losses are kept.
        logging_steps: log every N optimiser steps (and at the last one).
        history: the run's loss history so far, appended to in place.
        progress: show a tqdm bar on the main process (else print one line per logging step).
    """

    def __init__(
        self,
        accelerator,
        *,
        stage: int,
        num_stages: int,
        stage_name: str,
        num_steps: int,
        first_step: int,
        tasks: Mapping[str, float],
        logging_steps: int,
        history: list[dict[str, Any]],
        progress: bool = True,
    ):
        self.accelerator = accelerator
        self.stage, self.num_steps, self.logging_steps = stage, num_steps, logging_steps
        self.tasks = [task for task in TASK_NAMES if task in tasks]
        self.history = history
        self.offset = global_step_offset(history, stage)
        self.last_losses: dict[str, float] = {}
        self._window: dict[str, list[torch.Tensor]] = {}
        self._bar = None
        if progress and accelerator.is_main_process:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=num_steps, initial=first_step, desc=f"stage {stage}/{num_stages} {stage_name}"
            )

    def add(self, outputs: Any) -> None:
        """Keeps the per-task losses of one micro-batch (`outputs.{task}_loss`, detached, still on the device)."""
        for task in self.tasks:
            value = getattr(outputs, f"{task}_loss", None)
            if value is not None:
                self._window.setdefault(task, []).append(value.detach())

    def _read_window(self) -> None:
        """Moves the window's means into `last_losses`: one device-to-host copy for every task together."""
        if not self._window:
            return
        counts = {task: len(values) for task, values in self._window.items()}
        flat = torch.stack([v.float() for values in self._window.values() for v in values]).cpu().tolist()
        start = 0
        for task, count in counts.items():
            # Summed on the host in float64, in micro-batch order.
            self.last_losses[task] = sum(flat[start : start + count]) / count
            start += count
        self._window = {}

    def is_logging_step(self, step: int) -> bool:
        """Whether optimiser step `step` (1-based in the stage) logs: every `logging_steps`, and the last."""
        return step % self.logging_steps == 0 or step == self.num_steps

    def step(self, step: int, learning_rate: float | None = None) -> bool:
        """Called after optimiser step `step` (1-based in the stage). At a logging step (every `logging_steps`,
        and the last) reads the window, logs it, and records it in the history. Returns whether it logged.
        Check the non-finite flag first (`NonFiniteWatch`): the history must never record a NaN."""
        logged = self.is_logging_step(step)
        if logged:
            self._read_window()
            logs: dict[str, float] = {f"stage{self.stage}/{t}_loss": v for t, v in self.last_losses.items()}
            if learning_rate is not None:
                logs[f"stage{self.stage}/lr"] = learning_rate
            self.accelerator.log(logs, step=step)
            for task, value in self.last_losses.items():
                self.history.append(
                    {
                        "stage": self.stage,
                        "step": step,
                        "global_step": self.offset + step,
                        "task": task,
                        "loss": value,
                    }
                )
            if self._bar is None:
                self.accelerator.print(
                    f"stage {self.stage} step {step}/{self.num_steps}: "
                    + ", ".join(f"{t} {v:.4f}" for t, v in self.last_losses.items())
                )
            else:
                postfix = {t: f"{v:.3f}" for t, v in self.last_losses.items()}
                if learning_rate is not None:
                    postfix["lr"] = f"{learning_rate:.1e}"
                self._bar.set_postfix(postfix)
        if self._bar is not None:
            self._bar.update(1)
        return logged

    def close(self, discard: bool = False) -> dict[str, float]:
        """Closes the progress bar; returns each task's mean loss over its last logged window (or the unlogged
        rest, when the stage stopped between logging steps). `discard`: drop the unlogged rest unread (a stage
        stopped by a non-finite loss)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if discard:
            self._window = {}
        self._read_window()
        return dict(self.last_losses)


__all__ = ["StageLossLog", "global_step_offset", "history_until"]
