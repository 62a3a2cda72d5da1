"""A PNG of the per-task training loss curves of a multi-stage run (matplotlib, an optional dependency)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_bytes
from ..tasks_imagebert import PRETRAINING_TASKS

LOSS_CURVES_NAME = "loss_curves.png"
MATPLOTLIB_MISSING = "loss curves skipped: matplotlib is not installed (pip install matplotlib)"


def write_loss_curves(
    history: Sequence[Mapping[str, Any]],
    path: str | Path,
    *,
    stage_names: Sequence[str] = (),
    title: str | None = None,
) -> Path | None:
    """Plots a loss history (records `{"stage", "step", "global_step", "task", "loss"}`, see `loss_log`) to a PNG
    at `path`, written atomically: one panel per task that has records, loss against the global optimiser step,
    one colour per stage, a dashed line where each stage begins. `stage_names[i]` labels stage i + 1.

    Returns `path`, or None (after printing one line saying how to install it) when matplotlib is missing, or
    when `history` is empty.
    """
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: this runs on training machines
        import matplotlib.pyplot as plt
    except ImportError:
        print(MATPLOTLIB_MISSING)
        return None

    tasks = [task for task in PRETRAINING_TASKS if any(r["task"] == task.name for r in history)]
    stages = sorted({int(r["stage"]) for r in history})
    # A stage begins one step after the previous one's last logged step.
    starts = {
        s: min(int(r["global_step"]) - int(r["step"]) for r in history if int(r["stage"]) == s)
        for s in stages
    }
    columns = min(2, len(tasks))
    rows = -(-len(tasks) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.6 * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    for panel, task in zip(axes.flat, tasks, strict=False):
        for k, stage in enumerate(stages):
            points = sorted(
                (int(r["global_step"]), float(r["loss"]))
                for r in history
                if r["task"] == task.name and int(r["stage"]) == stage
            )
            if not points:
                continue
            name = stage_names[stage - 1] if stage - 1 < len(stage_names) else ""
            label = f"stage {stage}" + (f" ({name})" if name else "")
            panel.plot(*zip(*points, strict=True), color=colours(k % 10), label=label, linewidth=1.5)
        for stage in stages[1:]:
            panel.axvline(starts[stage], color="grey", linestyle="--", linewidth=1)
        panel.set_title(task.title)
        panel.set_xlabel("optimiser step (all stages)")
        panel.set_ylabel("training loss")
        panel.grid(alpha=0.3)
        panel.legend(fontsize="small")
    for panel in list(axes.flat)[len(tasks) :]:
        panel.set_visible(False)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return atomic_write_bytes(path, buffer.getvalue())


__all__ = ["LOSS_CURVES_NAME", "MATPLOTLIB_MISSING", "write_loss_curves"]
