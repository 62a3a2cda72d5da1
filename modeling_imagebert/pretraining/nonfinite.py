"""Non-finite training stops the run instead of saving NaN weights.

Each micro-batch folds whether its per-task losses, its total loss and (at the optimiser step) the gradient norm are
finite into a few tensors kept on the device: the first bad step, which quantities were bad there and their values.
Folding is sync-free (`torch.where` on the device, no host read), so the training step never waits for the device.
The loop reads the flag only where it would act on bad weights: at logging steps, before every checkpoint and at a
stage's end (with several processes, inside the all-reduce `StopRequests` already does there, so every process stops
at the same step). Then `NonFiniteTrainingError` names the stage, the first bad step and the task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..cli_arguments import pretrain_resume_command
from .checkpoints import find_resume_point


class NonFiniteTrainingError(FloatingPointError):
    """A loss or the gradient norm of a pre-training step was NaN or infinite. The message names the stage, the
    first bad step, the task and the value, and says how to go on (`error: ... ; lower the learning rate ...`)."""


def gradient_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor | None:
    """The 2-norm of all gradients of `parameters` as one vector: a 0-d tensor on their device, computed with
    torch's foreach norm and never read to the host. None when no parameter has a gradient."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


class NonFiniteWatch:
    """The device-side record of the first non-finite step of a stage.

    Args:
        tasks: the stage's enabled tasks (`mlm`, `moc`, ...), in the order their losses are checked.
        device: where the training step runs.

    Watched quantities, in order: each task's loss (`outputs.<task>_loss`), the weighted total `outputs.loss`, the
    gradient norm. `add` costs a handful of tiny device ops per micro-batch and no host read; `read` copies the
    record to the host once.
    """

    def __init__(self, tasks: Sequence[str], device: torch.device | str):
        self.tasks = list(tasks)
        self.names = [f"{task} loss" for task in self.tasks] + ["total loss", "gradient norm"]
        self.device = torch.device(device)
        self._first_step = torch.zeros((), dtype=torch.int64, device=self.device)  # 0: every step was finite
        self._first_bad = torch.zeros(len(self.names), dtype=torch.bool, device=self.device)  # [K]
        self._first_values = torch.zeros(len(self.names), dtype=torch.float32, device=self.device)  # [K]
        self._finite = torch.zeros(
            (), dtype=torch.float32, device=self.device
        )  # stands in for an absent value

    @property
    def flag(self) -> torch.Tensor:
        """A 0-d bool tensor on the device: True once any watched value was non-finite. Reading it is a sync."""
        return self._first_step > 0

    def add(self, step: int, outputs: Any, grad_norm: torch.Tensor | None = None) -> None:
        """Folds one micro-batch of optimiser step `step` (1-based in the stage) into the record, on the device.

        Args:
            step: the optimiser step this micro-batch belongs to.
            outputs: the model output (`loss` and the per-task `<task>_loss`; a task absent from this batch is
                skipped).
            grad_norm: the gradient norm of the step (at the micro-batch that steps the optimiser), else None.
        """
        values = [getattr(outputs, f"{task}_loss", None) for task in self.tasks]
        values += [getattr(outputs, "loss", None), grad_norm]
        stacked = torch.stack(
            [self._finite if v is None else v.detach().reshape(()).float() for v in values]
        )  # [K]
        bad = ~torch.isfinite(stacked)
        new = bad.any() & (self._first_step == 0)  # only the first bad step is kept
        self._first_step = torch.where(new, step, self._first_step)
        self._first_bad = torch.where(new, bad, self._first_bad)
        self._first_values = torch.where(new, stacked, self._first_values)

    def read(self) -> tuple[int, str, float] | None:
        """The first bad step as (step, what was non-finite, its value), or None when every step was finite. One
        device-to-host copy. The task losses are named before the total and the gradient norm: the most precise
        cause wins."""
        record = torch.cat(
            [self._first_step.reshape(1).double(), self._first_bad.double(), self._first_values.double()]
        ).tolist()
        step = int(record[0])
        if step == 0:
            return None
        count = len(self.names)
        bad, values = record[1 : 1 + count], record[1 + count :]
        index = next(i for i, flag in enumerate(bad) if flag)
        return step, self.names[index], values[index]

    def error(
        self,
        *,
        stage: int,
        stage_name: str,
        learning_rate: float,
        max_grad_norm: float | None,
        resume_hint: str,
    ) -> NonFiniteTrainingError:
        """The error to raise once the flag is set (on this process or, by the all-reduce, on another).

        Args:
            stage: the 1-based stage number; stage_name: its name.
            learning_rate, max_grad_norm: the stage's settings, quoted in the fix.
            resume_hint: where to resume from (the last good checkpoint), appended to the fix.
        """
        found = self.read()
        if found is None:
            what = ": another process saw a non-finite loss or gradient norm"
        else:
            step, name, value = found
            what = f" step {step}: non-finite {name} ({_number(value)})"
        field = f"stages[{stage - 1}]"
        clipping = (
            f"set {field}.max_grad_norm (clipping is off)"
            if not max_grad_norm
            else f"lower {field}.max_grad_norm (now {max_grad_norm:g})"
        )
        return NonFiniteTrainingError(
            f"stage {stage} ({stage_name}){what} ; lower {field}.learning_rate (now {learning_rate:g}) or "
            f"{clipping}, and check the stage's data; no weights of the bad steps were saved; {resume_hint}"
        )


def resume_hint(output_dir: str | Path, argv: Sequence[str] | None = None) -> str:
    """Where a stopped run goes on from: the newest complete checkpoint (or stage-final folder) of `output_dir`,
    which the non-finite check guarantees was saved before the first bad step, and the command that does it (the
    run's flags `argv`, default `sys.argv[1:]`, with `--resume_from_checkpoint latest`)."""
    point = find_resume_point(output_dir, "latest")
    if point is None:
        return f"no checkpoint was saved before it: rerun from the start (output folder {output_dir})"
    if point.checkpoint is not None:
        where = f"the last good checkpoint {point.checkpoint}"
    else:  # no checkpoint in this stage yet: it restarts from the previous stage's final weights
        where = f"the start of stage {point.stage} ({Path(output_dir) / f'stage-{point.stage - 1}-final'})"
    return f"resume from {where} with: {pretrain_resume_command(output_dir, argv)}"


def _number(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


__all__ = ["NonFiniteTrainingError", "NonFiniteWatch", "gradient_norm", "resume_hint"]
