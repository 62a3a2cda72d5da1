"""The compiled training step: `torch.compile` of the pre-training and retrieval models, as the recipes'
`training.compile` asks (`none`, `default`, `reduce-overhead`, `max-autotune`).

The models' forward traces as one graph (tests/test_compile.py: no graph break for any task mix, with dropout and
the global-image token); AOTAutograd compiles the backward with it. Shapes stay static (`dynamic=False`): the
batches are padded to shape buckets (`data.collators.pad_to_buckets`), and only the count of each head's positions
(`mlm_positions`, `moc_positions`, `mrfr_positions`), which moves by a few entries from batch to batch, is marked
dynamic, so a stage compiles once per kind of batch (masked, ITM, text-only) instead of once per batch shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..tasks_imagebert import PRETRAINING_TASKS
from .recipes import COMPILE_MODES

# The position entries whose length is left dynamic in a compiled step.
DYNAMIC_POSITION_KEYS = tuple(
    task.position_key for task in PRETRAINING_TASKS if task.position_key is not None
)


def compile_step(model: nn.Module, mode: str, backend: str = "inductor") -> nn.Module:
    """`model` itself for `mode` "none", else `torch.compile(model)` with that mode ("default" is torch's default
    mode) and static shapes. The compiled module shares `model`'s parameters: run the step through it and keep
    `model` for everything else (accelerate's accumulation, checkpoints, saving)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode: expected one of {list(COMPILE_MODES)}, got {mode!r}")
    if mode == "none":
        return model
    return torch.compile(model, backend=backend, mode=None if mode == "default" else mode, dynamic=False)


def mark_dynamic_positions(batch: Mapping[str, Any]) -> Mapping[str, Any]:
    """Marks the length of each head's positions in `batch` dynamic for `torch.compile` (see the module docstring);
    returns `batch`. Cheap: it tags the tensors, and does nothing outside a compiled step."""
    for key in DYNAMIC_POSITION_KEYS:
        positions = batch.get(key)
        if isinstance(positions, torch.Tensor) and positions.dim() == 1:
            torch._dynamo.maybe_mark_dynamic(positions, 0)
    return batch


__all__ = ["DYNAMIC_POSITION_KEYS", "compile_step", "mark_dynamic_positions"]
