"""Whether a resumed run trains what its checkpoint was trained with: the recipe fields that change the result
must match, the ones that only change how the run is watched or stored may differ."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from .recipes import RecipeError

# Fields a resume may change: where and how often the run writes and logs, its CPU threads, loader workers and AdamW
# kernel (threads and kernel change the result only by float rounding), whether the step is compiled and its batches
# padded to shape buckets (the same losses up to float rounding; with dropout, compiled steps draw their masks from
# another generator), the zero-shot check run after training, and the recipe's name. Everything else (model, stages, datasets, seed, batch
# sizes, steps, schedules, precision) changes the weights a resumed run ends with.
RESUME_FREE_FIELDS = (
    "name",
    "description",
    "training.output_dir",
    "training.logging_steps",
    "training.num_workers",
    "training.num_threads",
    "training.adamw_implementation",
    "training.compile",
    "training.shape_buckets",
    "training.save_steps",
    "training.save_total_limit",
    "evaluation",
)
IGNORE_MISMATCH_FLAG = "--ignore_recipe_mismatch"

_ABSENT = object()
# Stage fields added after recipes were first saved, with the value a recipe without them meant: a checkpoint whose
# recipe lacks one resumes under that value without a mismatch.
_LATER_STAGE_FIELDS = {"itm_negatives": "random", "itm_hard_negative_fraction": 1.0}


class RecipeMismatchError(RecipeError):
    """A resume whose recipe differs from the checkpoint's in fields that change the result."""


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value, sort_keys=True)


def _walk(saved: Any, current: Any, path: str, free: Sequence[str], out: list[str]) -> None:
    if path in free:
        return
    if (
        saved is _ABSENT
        and path.startswith("stages.")
        and _LATER_STAGE_FIELDS.get(path.rsplit(".", 1)[-1], _ABSENT) == current
    ):
        return
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        for key in sorted(set(saved) | set(current), key=str):
            child = f"{path}.{key}" if path else str(key)
            _walk(saved.get(key, _ABSENT), current.get(key, _ABSENT), child, free, out)
    elif isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for index, (a, b) in enumerate(zip(saved, current, strict=True)):
            _walk(a, b, f"{path}.{index}", free, out)
    elif isinstance(saved, list) and isinstance(current, list):
        out.append(f"{path}: checkpoint {len(saved)} entries, now {len(current)}")
    elif saved != current:
        out.append(f"{path}: checkpoint {_show(saved)}, now {_show(current)}")


def recipe_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], free: Sequence[str] = RESUME_FREE_FIELDS
) -> list[str]:
    """The fields (dotted paths with 0-based list indices, as `--set` writes them) in which two resolved recipes
    (`Recipe.to_dict()` forms) differ, outside `free`, each as `stages.1.learning_rate: checkpoint 0.0002, now
    0.001`. Both are compared in their JSON form, so a recipe read back from a checkpoint compares equal to the
    one that wrote it."""
    saved, current = json.loads(json.dumps(saved)), json.loads(json.dumps(current))
    out: list[str] = []
    _walk(saved, current, "", tuple(free), out)
    return out


def check_resume_recipe(
    saved: Mapping[str, Any] | None, current: Mapping[str, Any], where: str, *, force: bool = False
) -> list[str]:
    """Refuses to resume `where` (a checkpoint or output folder) with a recipe that differs from `saved`, the
    one it was trained with, in fields outside `RESUME_FREE_FIELDS`. With `force`, returns the differences for a
    warning instead. `saved` None: the recipe is unknown, which is refused the same way.

    Raises:
        RecipeMismatchError: one line listing every differing field, and the flag that forces the resume.
    """
    if saved is None:
        differences = ["the recipe it was trained with is not recorded"]
    else:
        differences = recipe_differences(saved, current)
    if differences and not force:
        raise RecipeMismatchError(
            f"{where}: resuming with another recipe than the run's: {'; '.join(differences)} ; resume with the "
            f"same recipe and flags, or pass {IGNORE_MISMATCH_FLAG} to continue anyway"
        )
    return differences


__all__ = [
    "IGNORE_MISMATCH_FLAG",
    "RESUME_FREE_FIELDS",
    "RecipeMismatchError",
    "check_resume_recipe",
    "recipe_differences",
]
