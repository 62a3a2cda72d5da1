"""The model card (README.md) written beside a pre-trained checkpoint."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .recipes import Recipe

# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def build_model_card(
    base_card: str,
    recipe: Recipe,
    final_losses: Mapping[str, float] | None,
    metrics: Mapping[str, float] | None,
    loss_curves: str | None = None,
) -> str:
    """The README.md of a pre-trained checkpoint: the project's MODEL_CARD.md (`base_card`, YAML front matter
    kept) followed by a "Pre-training" section with the recipe's stages, the final per-task losses, the per-task
    loss curves (`loss_curves`: the PNG's file name beside the card; not embedded when None) and the zero-shot
    retrieval recalls."""
    lines = [
        "",
        "## Pre-training",
        "",
        f"Recipe `{recipe.name}`" + (f": {recipe.description.strip()}" if recipe.description else "."),
    ]
    lines += [
        "",
        "| stage | data (weight) | tasks (loss weight) | steps / epochs | batch | lr | init |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, stage in enumerate(recipe.stages, 1):
        data = ", ".join(
            f"{(s.path or 'toy-world ' + str(s.toy_world.get('variant', 'curated')))} [{s.modality}] ({s.weight:g})"
            for s in stage.datasets
        )
        tasks = ", ".join(f"{t} ({w:g})" for t, w in stage.tasks.items() if w > 0)
        length = f"{stage.max_steps} steps" if stage.max_steps is not None else f"{stage.num_epochs:g} epochs"
        lines.append(
            f"| {i} {stage.name} | {data} | {tasks} | {length} | {stage.batch_size} | {stage.learning_rate:g} | {stage.init} |"
        )
    if final_losses:
        lines += [
            "",
            "Final per-task training losses: " + ", ".join(f"{k} {v:.4f}" for k, v in final_losses.items()),
        ]
    if loss_curves:
        lines += ["", f"![per-task loss curves]({loss_curves})"]
    if metrics:
        lines += [
            "",
            "Zero-shot retrieval (ITM score, full ranking): "
            + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()),
        ]
    return base_card.rstrip() + "\n" + "\n".join(lines) + "\n"


def read_base_card(path: str | Path) -> str:
    """The project's MODEL_CARD.md at `path`, or a bare title when the file is absent (an installed package)."""
    path = Path(path)
    return path.read_text() if path.is_file() else "# ImageBERT\n"


__all__ = ["build_model_card", "read_base_card"]
