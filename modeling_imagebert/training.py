"""Library helpers of `examples/run_pretrain.py`: stage data, a deterministic batch schedule, atomic checkpoints,
resume lookup, rotation, signal handling and the model card.

Determinism. A stage's data order is a pure function of (seed, stage, number of processes, batch size): every
micro-batch draws its source by weight from a generator seeded by (seed, stage, epoch), and each source is read
through a chain of seeded permutations (one per pass). The collators' masks derive from (seed, epoch,
example_index), with `example_index = pass * len(source) + row`, so an example gets fresh masks on every pass.
Resuming at micro-batch m therefore only recomputes indices: no data is read for the skipped batches, and the
resumed run sees exactly the batches and masks of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data.collators import DataCollatorForImageBertPretraining, hashed_uniform
from .processing_imagebert import IGNORE_INDEX, ImageBertProcessor
from .recipes import TASKS, DatasetSpec, Recipe, RecipeError, StageSpec

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)-(\d+)$")
STAGE_FINAL_PATTERN = re.compile(r"^stage-(\d+)-final$")
TRAINER_STATE_NAME = "trainer_state.json"
SCHEDULER_NAME = "lr_scheduler.pt"
_TEMP_PREFIX = ".tmp-"

# Collator random streams of the text-only MLM collator (distinct from the pre-training collator's).
_STREAM_TEXT_SELECT = 21
_STREAM_TEXT_ACTION = 22
_STREAM_TEXT_TOKEN = 23
_STREAM_ITM_BATCH = 24


# ---------------------------------------------------------------------------------------------------------------
# Data sources
# ---------------------------------------------------------------------------------------------------------------


def load_source(spec: DatasetSpec, base: str | Path | None = None):
    """The raw `datasets.Dataset` of a recipe source (a saved folder or a toy-world corpus), cut to
    `max_examples`.

    Raises `RecipeError` naming the path when the folder is missing or is a DatasetDict without `split`.
    """
    import datasets

    if spec.toy_world is not None:
        from .data.toy_world import make_toy_world

        dataset = make_toy_world(**spec.toy_world)
    else:
        folder = (Path(base) if base is not None else Path.cwd()) / spec.path
        if not folder.is_dir():
            raise RecipeError(f"dataset path {folder} does not exist")
        if spec.modality == "image_text":
            try:
                from .data.storage import load_dataset_from_disk

                dataset = load_dataset_from_disk(folder)
            except Exception:  # a DatasetDict folder: read the split below
                dataset = datasets.load_from_disk(str(folder))
        else:
            dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if spec.split is None:
            raise RecipeError(
                f"dataset {spec.path or spec.toy_world} has splits {list(dataset)}; set split: in the recipe"
            )
        if spec.split not in dataset:
            raise RecipeError(
                f"dataset {spec.path or spec.toy_world} has no split {spec.split!r} ({list(dataset)})"
            )
        dataset = dataset[spec.split]
    elif spec.split is not None and spec.toy_world is None:
        raise RecipeError(f"dataset {spec.path}: split {spec.split!r} given but the dataset has no splits")
    if spec.max_examples is not None:
        dataset = dataset.select(range(min(spec.max_examples, len(dataset))))
    if len(dataset) == 0:
        raise RecipeError(f"dataset {spec.path or spec.toy_world} is empty")
    return dataset


def encode_source(dataset, processor: ImageBertProcessor, modality: str):
    """Encodes a raw dataset for training: image-text rows with `processor.prepare_dataset`, text-only rows by
    tokenising the `caption` (or `text`) column. Returns a numpy-formatted `datasets.Dataset`."""
    if modality == "image_text":
        return processor.prepare_dataset(dataset)
    column = "caption" if "caption" in dataset.column_names else "text"
    if column not in dataset.column_names:
        raise RecipeError(f"a text-only source needs a caption or text column, got {dataset.column_names}")
    tokenizer = processor.tokenizer

    def tokenize(batch):
        ids = tokenizer(batch[column], truncation=True, max_length=processor.max_text_length)["input_ids"]
        return {"input_ids": ids}

    encoded = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize text-only source"
    )
    return encoded.with_format("numpy", dtype=None)


class DataCollatorForTextMLM:
    """Text-only MLM batches (no regions): BERT masking (select `mlm_probability` of the real, non-special tokens;
    80% [MASK], 10% random token, 10% kept) keyed on (seed, epoch, example_index) like the image-text collator.

    Input: examples with input_ids and example_index. Output: input_ids, attention_mask, token_type_ids, labels
    [B, T] long.
    """

    def __init__(self, processor: ImageBertProcessor, *, mlm_probability: float = 0.15, seed: int = 0):
        self.processor = processor
        self.mlm_probability = mlm_probability
        self.seed = seed
        self.epoch = 0
        tokenizer = processor.tokenizer
        self.mask_token_id = int(tokenizer.mask_token_id)
        self.special_ids = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
        self.random_token_ids = np.setdiff1d(np.arange(len(tokenizer), dtype=np.int64), self.special_ids)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        indices = np.asarray([int(e["example_index"]) for e in examples], dtype=np.int64)
        batch = self.processor.pad([{"input_ids": e["input_ids"]} for e in examples])
        input_ids = batch["input_ids"]  # [B, T]
        length = input_ids.shape[1]
        eligible = (batch["attention_mask"] == 1) & ~torch.from_numpy(
            np.isin(input_ids.numpy(), self.special_ids)
        )
        uniform = lambda stream: hashed_uniform(self.seed, self.epoch, indices, stream, length)  # noqa: E731
        selected = eligible & torch.from_numpy(uniform(_STREAM_TEXT_SELECT) < self.mlm_probability)
        action = torch.from_numpy(uniform(_STREAM_TEXT_ACTION))
        draw = uniform(_STREAM_TEXT_TOKEN)
        random_tokens = torch.from_numpy(
            self.random_token_ids[(draw * len(self.random_token_ids)).astype(np.int64)]
        )
        batch["labels"] = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        masked = torch.where(
            selected & (action < 0.8), torch.full_like(input_ids, self.mask_token_id), input_ids
        )
        batch["input_ids"] = torch.where(selected & (action >= 0.8) & (action < 0.9), random_tokens, masked)
        return batch


# Labels each task reads; a disabled task's labels are dropped from the batch.
TASK_LABELS = {
    "mlm": ("labels",),
    "moc": ("region_class_labels",),
    "mrfr": ("region_feature_targets",),
    "itm": ("itm_labels",),
}


@dataclass
class StageSource:
    """An encoded source of a stage with its collator."""

    spec: DatasetSpec
    encoded: Any
    collator: Any
    itm_collator: Any = None  # "separate" ITM mode: unmasked pairs with negatives

    def __len__(self) -> int:
        return len(self.encoded)


def build_stage_sources(
    stage: StageSpec,
    stage_index: int,
    processor: ImageBertProcessor,
    seed: int,
    base: str | Path | None = None,
) -> list[StageSource]:
    """Loads and encodes every source of a stage and gives each its collator (seeded by (seed, stage, source)).

    `stage_index` is 0-based. ITM negatives are drawn only when the stage trains ITM. In "separate" ITM mode (with
    a masked task also on), an image-text source gets a second collator for its ITM batches: no masks, negatives.
    """
    sources = []
    itm_on = stage.tasks.get("itm", 0) > 0
    masked_on = any(stage.tasks.get(task, 0) > 0 for task in ("mlm", "moc", "mrfr"))
    separate = itm_on and masked_on and stage.itm_mode == "separate"
    for s, spec in enumerate(stage.datasets):
        collator_seed = seed * 1_000_003 + stage_index * 1009 + s
        raw = load_source(spec, base)
        encoded = encode_source(raw, processor, spec.modality)
        if spec.modality == "text":
            collator = DataCollatorForTextMLM(
                processor, mlm_probability=stage.mlm_probability, seed=collator_seed
            )
        else:
            # No masks when no masked task is trained: an ITM-only stage would otherwise see [MASK] tokens and
            # zeroed regions on its matched pairs only, a shortcut to the ITM label.
            collator = DataCollatorForImageBertPretraining(
                processor,
                mlm_probability=stage.mlm_probability if masked_on else 0.0,
                region_mask_probability=stage.region_mask_probability if masked_on else 0.0,
                itm_negative_rate=stage.itm_negative_rate if itm_on and not separate else 0.0,
                seed=collator_seed,
            )
        itm_collator = None
        if separate and spec.modality == "image_text":
            itm_collator = DataCollatorForImageBertPretraining(
                processor,
                mlm_probability=0.0,
                region_mask_probability=0.0,
                itm_negative_rate=stage.itm_negative_rate,
                seed=collator_seed,
            )
        sources.append(StageSource(spec=spec, encoded=encoded, collator=collator, itm_collator=itm_collator))
    return sources


# ---------------------------------------------------------------------------------------------------------------
# The deterministic batch schedule
# ---------------------------------------------------------------------------------------------------------------


class BatchSchedule:
    """Which rows make micro-batch m of a stage, for each process (see the module docstring).

    Args:
        source_sizes: rows per source; weights: mixing weights (one per source).
        batch_size: B, rows per process per micro-batch; num_processes: W.
        seed, stage_index: key the generators.

    `batches_per_epoch` = ceil(sum(sizes) / (B * W)). `batch(m, rank)` -> (source, epoch, rows [B], example
    indices [B]); computing it for any m costs O(epoch count + B), so skipping batches reads no data.
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        weights: Sequence[float],
        *,
        batch_size: int,
        num_processes: int,
        seed: int,
        stage_index: int,
    ):
        self.sizes = [int(n) for n in source_sizes]
        total_weight = float(sum(weights))
        self.probabilities = np.asarray(weights, dtype=np.float64) / total_weight
        self.batch_size = int(batch_size)
        self.num_processes = int(num_processes)
        self.seed = int(seed)
        self.stage_index = int(stage_index)
        self.batches_per_epoch = max(1, math.ceil(sum(self.sizes) / (self.batch_size * self.num_processes)))
        self._choices: dict[int, np.ndarray] = {}
        self._cursor_at_epoch: list[np.ndarray] = [np.zeros(len(self.sizes), dtype=np.int64)]
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _epoch_choices(self, epoch: int) -> np.ndarray:
        if epoch not in self._choices:
            if len(self.sizes) == 1:
                choices = np.zeros(self.batches_per_epoch, dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, self.stage_index, epoch, 11])
                choices = rng.choice(len(self.sizes), self.batches_per_epoch, p=self.probabilities)
            self._choices[epoch] = choices
            if len(self._choices) > 4:  # keep memory flat on long runs
                self._choices.pop(min(self._choices))
        return self._choices[epoch]

    def _cursor(self, epoch: int) -> np.ndarray:
        """Micro-batches each source has served before `epoch`."""
        while len(self._cursor_at_epoch) <= epoch:
            e = len(self._cursor_at_epoch) - 1
            counts = np.bincount(self._epoch_choices(e), minlength=len(self.sizes))
            self._cursor_at_epoch.append(self._cursor_at_epoch[-1] + counts)
        return self._cursor_at_epoch[epoch]

    def _permutation(self, source: int, passes: int) -> np.ndarray:
        key = (source, passes)
        if key not in self._permutations:
            rng = np.random.default_rng([self.seed, self.stage_index, source, passes, 13])
            self._permutations[key] = rng.permutation(self.sizes[source])
            if len(self._permutations) > 4:
                self._permutations.pop(next(iter(self._permutations)))
        return self._permutations[key]

    def batch(self, micro_step: int, rank: int) -> tuple[int, int, np.ndarray, np.ndarray]:
        """(source, epoch, rows [B] int64, example_index [B] int64) of micro-batch `micro_step` for process `rank`."""
        epoch, position = divmod(int(micro_step), self.batches_per_epoch)
        choices = self._epoch_choices(epoch)
        source = int(choices[position])
        served = int(self._cursor(epoch)[source]) + int((choices[:position] == source).sum())
        size = self.sizes[source]
        start = served * self.batch_size * self.num_processes + rank * self.batch_size
        offsets = start + np.arange(self.batch_size, dtype=np.int64)  # [B]
        passes = offsets // size
        rows = np.empty(self.batch_size, dtype=np.int64)
        for p in np.unique(passes):
            here = passes == p
            rows[here] = self._permutation(source, int(p))[offsets[here] % size]
        return source, epoch, rows, passes * size + rows


class ScheduledBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item j is the collated micro-batch `start + j` of this process: use it with
    `DataLoader(batch_size=None)`, so DataLoader workers read and collate whole batches in order."""

    def __init__(
        self,
        sources: list[StageSource],
        schedule: BatchSchedule,
        rank: int,
        start: int,
        stop: int,
        tasks: Mapping,
        itm_batch_fraction: float = 0.5,
    ):
        self.sources, self.schedule, self.rank = sources, schedule, rank
        self.start, self.stop = int(start), int(stop)
        self.itm_batch_fraction = float(itm_batch_fraction)
        self.drop = [label for task in TASKS if tasks.get(task, 0) <= 0 for label in TASK_LABELS[task]]

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        if not 0 <= j < len(self):
            raise IndexError(f"micro-batch {j} is outside [0, {len(self)})")
        source_id, epoch, rows, example_index = self.schedule.batch(self.start + j, self.rank)
        source = self.sources[source_id]
        columns = source.encoded[rows.tolist()]
        examples = [{name: columns[name][i] for name in columns} for i in range(len(rows))]
        for example, index in zip(examples, example_index, strict=True):
            example["example_index"] = int(index)
            if "image_id" not in example:
                example["image_id"] = f"text-{index}"
        micro_step = np.asarray([self.start + j], dtype=np.int64)
        itm_batch = source.itm_collator is not None and (
            hashed_uniform(self.schedule.seed, self.schedule.stage_index, micro_step, _STREAM_ITM_BATCH, 1)[
                0, 0
            ]
            < self.itm_batch_fraction
        )
        collator = source.itm_collator if itm_batch else source.collator
        collator.set_epoch(epoch)
        batch = collator(examples)
        if itm_batch:
            drop = {"labels", "masked_regions", "region_class_labels", "region_feature_targets"}
        elif source.itm_collator is not None:
            drop = {"itm_labels"}  # all matched: an ITM loss here would only teach "always matched"
        else:
            drop = set()
        for name in drop | set(self.drop):
            batch.pop(name, None)
        return batch


def stage_num_steps(stage: StageSpec, schedule: BatchSchedule) -> int:
    """Optimiser steps of a stage: `max_steps`, else ceil(num_epochs * batches_per_epoch / accumulation)."""
    if stage.max_steps is not None:
        return int(stage.max_steps)
    return max(
        1, math.ceil(stage.num_epochs * schedule.batches_per_epoch / stage.gradient_accumulation_steps)
    )


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


def _replace_dir(temp: Path, target: Path) -> None:
    """Renames the finished `temp` folder onto `target` (a previous `target` is moved aside first, then deleted)."""
    old = None
    if target.exists():
        old = target.with_name(f"{_TEMP_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    os.rename(temp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    accelerator, output_dir: str | Path, stage: int, step: int, state: dict[str, Any], scheduler=None
) -> Path:
    """Saves a resumable checkpoint atomically: `accelerator.save_state` (model, optimiser, RNG states, scaler),
    the LR scheduler and `state` (JSON) go to a temporary folder, renamed to `checkpoint-<stage>-<step>` once
    complete. Call on every process. Returns the checkpoint path."""
    output_dir = Path(output_dir)
    target = output_dir / checkpoint_name(stage, step)
    temp = output_dir / f"{_TEMP_PREFIX}{target.name}"
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
        _replace_dir(temp, target)
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
    target = Path(target)
    temp = target.with_name(f"{_TEMP_PREFIX}{target.name}")
    shutil.rmtree(temp, ignore_errors=True)
    model.save_pretrained(temp)
    if processor is not None:
        processor.save_pretrained(temp)
    if card is not None:
        (temp / "README.md").write_text(card)
    _replace_dir(temp, target)
    return target


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


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def build_model_card(
    base_card: str,
    recipe: Recipe,
    final_losses: Mapping[str, float] | None,
    metrics: Mapping[str, float] | None,
) -> str:
    """The README.md of a pre-trained checkpoint: the project's MODEL_CARD.md (`base_card`, YAML front matter
    kept) followed by a "Pre-training" section with the recipe's stages, the final per-task losses and the
    zero-shot retrieval recalls."""
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
    if metrics:
        lines += [
            "",
            "Zero-shot retrieval (ITM score, full ranking): "
            + ", ".join(f"{k} {v:.1f}" for k, v in metrics.items()),
        ]
    return base_card.rstrip() + "\n" + "\n".join(lines) + "\n"


__all__ = [
    "BatchSchedule",
    "DataCollatorForTextMLM",
    "GracefulStop",
    "ResumePoint",
    "ScheduledBatches",
    "StageSource",
    "build_model_card",
    "build_stage_sources",
    "checkpoint_name",
    "encode_source",
    "find_resume_point",
    "list_checkpoints",
    "load_checkpoint",
    "load_source",
    "rotate_checkpoints",
    "save_checkpoint",
    "save_pretrained_atomic",
    "stage_final_name",
    "stage_num_steps",
]
