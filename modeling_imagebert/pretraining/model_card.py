"""The model card (README.md) written beside a pre-trained checkpoint."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .recipes import Recipe

# The architecture fields a card states, in order, with their label; the paper's base size for comparison.
_ARCHITECTURE_FIELDS = (
    ("num_hidden_layers", "layers"),
    ("hidden_size", "hidden size"),
    ("num_attention_heads", "attention heads"),
    ("intermediate_size", "intermediate size"),
    ("max_regions", "regions"),
    ("visual_feature_dim", "region feature dim"),
    ("num_object_classes", "object classes (MOC)"),
    ("max_text_length", "text tokens"),
    ("vocab_size", "vocabulary"),
)
_PAPER_BASE = {
    "num_hidden_layers": 12,
    "hidden_size": 768,
    "num_attention_heads": 12,
    "visual_feature_dim": 2048,
}

# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameter values of `model` (a tied weight, e.g. the MLM decoder, counts once)."""
    return sum(parameter.numel() for parameter in model.parameters())


def architecture_section(model: torch.nn.Module) -> str:
    """The "This checkpoint" section of a card: the architecture of `model` as saved (layers, hidden size, heads,
    regions, region feature dim, object classes, ...) and its parameter count, said to differ from the paper's base
    size when it does. `model`: an ImageBERT model (anything with an ImageBERT `config`)."""
    config = model.config
    values = {name: getattr(config, name, None) for name, _ in _ARCHITECTURE_FIELDS}
    is_base = all(values.get(name) == value for name, value in _PAPER_BASE.items())
    rows = [
        f"| {label} | {values[name]} |" for name, label in _ARCHITECTURE_FIELDS if values[name] is not None
    ]
    rows.append(
        f"| global image token | {'yes' if getattr(config, 'use_global_image_feature', False) else 'no'} |"
    )
    parameters = count_parameters(model)
    rows.append(f"| parameters | {parameters:,} ({parameters / 1e6:.1f}M) |")
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    intro = (
        "The model saved in this folder has the paper's base size."
        if is_base
        else "The model saved in this folder is smaller than the paper's base model the Architecture section "
        "describes (12 layers, hidden 768, 2048-d region features): it has the sizes below."
    )
    return "\n".join(
        [
            "## This checkpoint",
            "",
            f"{intro} Class: `{architectures[0]}`.",
            "",
            "| | |",
            "|---|---|",
            *rows,
            "",
        ]
    )


def _insert_before_first_section(card: str, section: str) -> str:
    """`section` placed before the card's first `## ` heading (after the title and summary), or at the end."""
    match = re.search(r"^## ", card, flags=re.MULTILINE)
    if match is None:
        return card.rstrip() + "\n\n" + section
    return card[: match.start()] + section + "\n" + card[match.start() :]


def build_model_card(
    base_card: str,
    recipe: Recipe,
    final_losses: Mapping[str, float] | None,
    metrics: Mapping[str, float] | None,
    loss_curves: str | None = None,
    model: torch.nn.Module | None = None,
    final_score: str = "itm",
    itm_metrics: Mapping[str, float] | None = None,
) -> str:
    """The README.md of a pre-trained checkpoint: the project's MODEL_CARD.md (`base_card`, YAML front matter
    kept), with a "This checkpoint" section before its first section stating the architecture of `model` as saved
    (when given: layers, hidden size, heads, regions, feature dim, classes, parameter count), followed by a
    "Pre-training" section with the recipe's stages, the final per-task losses, the per-task loss curves
    (`loss_curves`: the PNG's file name beside the card; not embedded when None) and the zero-shot retrieval
    recalls (`metrics`, ranked by `final_score`; with "itm+itc", `itm_metrics` ranked by the ITM score alone)."""
    if model is not None:
        base_card = _insert_before_first_section(base_card, architecture_section(model))
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
    ranked = [(metrics, "ITM score" if final_score == "itm" else "ITM + ITC score")]
    if final_score != "itm" and itm_metrics:
        ranked.append((itm_metrics, "ITM score alone, the paper's"))
    for values, name in ranked:
        if values:
            lines += [
                "",
                f"Zero-shot retrieval ({name}, full ranking): "
                + ", ".join(f"{k} {v:.1f}" for k, v in values.items()),
            ]
    return base_card.rstrip() + "\n" + "\n".join(lines) + "\n"


def read_base_card(path: str | Path) -> str:
    """The project's MODEL_CARD.md at `path`, or a bare title when the file is absent (an installed package)."""
    path = Path(path)
    return path.read_text() if path.is_file() else "# ImageBERT\n"


__all__ = ["architecture_section", "build_model_card", "count_parameters", "read_base_card"]
