"""The stage batch schedule of multi-stage pre-training: which source and rows make each micro-batch.

Determinism. A stage's data order is a pure function of (seed, stage, number of processes, batch size): every
micro-batch draws its source by weight from a generator seeded by (seed, stage, epoch), and each source is read
through a chain of seeded permutations (one per pass). The collators' masks derive from (seed, epoch,
example_index), with `example_index = pass * len(source) + row`, so an example gets fresh masks on every pass.
Resuming at micro-batch m therefore only recomputes indices: no data is read for the skipped batches, and the
resumed run sees exactly the batches and masks of an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.collators import (
    DataCollatorForImageBertPretraining,
    DataCollatorForTextMLM,
    add_labelled_positions,
    hashed_uniform,
    pad_to_buckets,
)
from ..processing_imagebert import ImageBertProcessor
from ..tasks_imagebert import MASKED_BATCH_KEYS, PRETRAINING_TASKS, dropped_label_keys, enabled_tasks
from .data_sources import encode_source, load_source
from .recipes import DatasetSpec, StageSpec
from .stage_checks import check_feature_dim

_STREAM_ITM_BATCH = 24


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
    num_object_classes: int | None = None,
) -> list[StageSource]:
    """Loads and encodes every source of a stage and gives each its collator (seeded by (seed, stage, source)).

    `stage_index` is 0-based. ITM negatives are drawn only when the stage trains ITM. In "separate" ITM mode (with
    a masked task also on), an image-text source gets a second collator for its ITM batches: no masks, negatives.
    With `num_object_classes`, the collators refuse region class ids outside [0, num_object_classes), naming the
    example.
    """
    sources = []
    enabled = enabled_tasks(stage.tasks)
    itm_on = "itm" in enabled
    masked_on = any(task.masked and task.name in enabled for task in PRETRAINING_TASKS)
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
                num_object_classes=num_object_classes,
            )
        itm_collator = None
        if separate and spec.modality == "image_text":
            itm_collator = DataCollatorForImageBertPretraining(
                processor,
                mlm_probability=0.0,
                region_mask_probability=0.0,
                itm_negative_rate=stage.itm_negative_rate,
                seed=collator_seed,
                num_object_classes=num_object_classes,
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
    `DataLoader(batch_size=None)`, so DataLoader workers read and collate whole batches in order.

    `shape_buckets`: None (the default: padded to the batch's longest caption and most regions), or the keyword
    arguments of `collators.pad_to_buckets` (`pad_token_id`, `max_text_length`, `max_regions`): every batch is
    padded to shape buckets, so that a compiled step sees few shapes (same losses)."""

    def __init__(
        self,
        sources: list[StageSource],
        schedule: BatchSchedule,
        rank: int,
        start: int,
        stop: int,
        tasks: Mapping,
        itm_batch_fraction: float = 0.5,
        shape_buckets: Mapping[str, int] | None = None,
    ):
        self.sources, self.schedule, self.rank = sources, schedule, rank
        self.shape_buckets = None if shape_buckets is None else dict(shape_buckets)
        self.start, self.stop = int(start), int(stop)
        self.itm_batch_fraction = float(itm_batch_fraction)
        # The labels of the tasks the stage does not train (the task table's `label_keys`).
        self.drop = dropped_label_keys(tasks)

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
            drop = set(MASKED_BATCH_KEYS)
        elif source.itm_collator is not None:
            drop = {"itm_labels"}  # all matched: an ITM loss here would only teach "always matched"
        else:
            drop = set()
        for name in drop | set(self.drop):
            batch.pop(name, None)
        # The heads' positions follow the labels that stay.
        if drop or self.drop:
            add_labelled_positions(batch)
        if self.shape_buckets is not None:
            pad_to_buckets(batch, **self.shape_buckets)
        return batch


def stage_num_steps(stage: StageSpec, schedule: BatchSchedule) -> int:
    """Optimiser steps of a stage: `max_steps`, else ceil(num_epochs * batches_per_epoch / accumulation)."""
    if stage.max_steps is not None:
        return int(stage.max_steps)
    return max(
        1, math.ceil(stage.num_epochs * schedule.batches_per_epoch / stage.gradient_accumulation_steps)
    )


def check_sources_fit_model(sources: Sequence[StageSource], config: Any, stage_index: int) -> None:
    """Fails before training (RecipeError naming `stages[i].datasets[j]`) when a source's region features do not
    have the model's `visual_feature_dim` (`stage_checks.check_source` checks the rest of each source up front)."""
    for d, source in enumerate(sources):
        check_feature_dim(source.encoded.features, config, f"stages[{stage_index}].datasets[{d}]")


@dataclass
class StagePlan:
    """What a stage trains on and for how long: its encoded `sources`, the batch `schedule`, `num_steps`
    optimiser steps, `warmup_steps`, and the enabled `tasks` (weight > 0) with their loss weights."""

    stage: StageSpec
    sources: list[StageSource]
    schedule: BatchSchedule
    num_steps: int
    warmup_steps: int
    tasks: dict[str, float]
    shape_buckets: dict[str, int] | None = None

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches of the whole stage per process (optimiser steps x gradient accumulation)."""
        return self.num_steps * self.stage.gradient_accumulation_steps

    def batches(self, rank: int, start: int, stop: int) -> ScheduledBatches:
        """The collated micro-batches [start, stop) of process `rank`, for `DataLoader(batch_size=None)`."""
        return ScheduledBatches(
            self.sources,
            self.schedule,
            rank,
            start,
            stop,
            self.tasks,
            self.stage.itm_batch_fraction,
            shape_buckets=self.shape_buckets,
        )


def plan_stage(
    stage: StageSpec,
    stage_index: int,
    processor: ImageBertProcessor,
    config: Any,
    *,
    num_processes: int,
    seed: int,
    shape_buckets: bool = False,
) -> StagePlan:
    """Loads and encodes the sources of stage `stage_index` (0-based), checks them against the model `config`,
    and lays out its batch schedule for `num_processes` processes (see `BatchSchedule`). With `shape_buckets`, the
    batches are padded to shape buckets (`collators.pad_to_buckets`, up to the processor's `max_text_length` and
    `max_regions`), for a compiled step."""
    sources = build_stage_sources(
        stage, stage_index, processor, seed, num_object_classes=getattr(config, "num_object_classes", None)
    )
    check_sources_fit_model(sources, config, stage_index)
    schedule = BatchSchedule(
        [len(s) for s in sources],
        [s.spec.weight for s in sources],
        batch_size=stage.batch_size,
        num_processes=num_processes,
        seed=seed,
        stage_index=stage_index,
    )
    num_steps = stage_num_steps(stage, schedule)
    warmup = stage.warmup_steps if stage.warmup_steps > 0 else math.ceil(stage.warmup_ratio * num_steps)
    buckets = None
    if shape_buckets:
        pad_id = processor.tokenizer.pad_token_id
        buckets = {
            "pad_token_id": 0 if pad_id is None else int(pad_id),
            "max_text_length": processor.max_text_length,
            "max_regions": processor.max_regions,
        }
    return StagePlan(stage, sources, schedule, num_steps, warmup, enabled_tasks(stage.tasks), buckets)


__all__ = [
    "BatchSchedule",
    "ScheduledBatches",
    "StagePlan",
    "StageSource",
    "build_stage_sources",
    "check_sources_fit_model",
    "plan_stage",
    "stage_num_steps",
]
