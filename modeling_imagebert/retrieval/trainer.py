"""Glue between `transformers.Trainer` and retrieval fine-tuning (used by `examples/run_retrieval.py`).

Training batches come from `DataCollatorForImageTextRetrieval` (groups of P rows, the positive first). Evaluation
during training runs on a FIXED candidate layout, chosen once from a seed, so every evaluation of every run (and
every process count) scores exactly the same pairs:

* image retrieval groups, one per caption: the caption with its own image first, then `P - 1` other images;
* text retrieval groups, one per image: the image with its first ground-truth caption first, then `P - 1`
  captions of other images.

A group's recall@K says whether its ground truth ranks in the top K of its P candidates (pessimistic ties, as in
`modeling_imagebert.retrieval.metrics`). This is a cheap, deterministic proxy for the full-ranking protocol of
`modeling_imagebert.retrieval.evaluation`, which ranks every image / caption of a split.

Under DDP, Trainer pads the last evaluation batch with repeated groups and drops them again when gathering; that
only works when each prediction row is one dataset item, so `RetrievalTrainer.prediction_step` returns logits and
labels as [groups, P] instead of the model's flat [groups * P].

A NaN or infinite training loss (or gradient norm) stops the run instead of training on and saving NaN weights
(Trainer's `logging_nan_inf_filter` would only hide it from the logs): `RetrievalTrainer` records the first bad
step on the device, with pre-training's `NonFiniteWatch` (no host read per step), and reads the record where the
Trainer would act on the weights (a logging, evaluation or checkpoint step, the end of training); then
`NonFiniteTrainingError` names the step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from ..pretraining.nonfinite import NonFiniteTrainingError, NonFiniteWatch
from .hard_negatives import mine_retrieval_negatives
from .metrics import DEFAULT_KS, image_retrieval_ranks

GROUP_DIRECTIONS = ("both", "image", "text")


@dataclass(frozen=True)
class CandidateLayout:
    """A fixed evaluation layout: G groups of P (caption row, image row) pairs, the ground truth first.

    Attributes:
        text_rows: int64 [G, P], the dataset row whose caption each pair uses.
        image_rows: int64 [G, P], the dataset row whose image (regions) each pair uses.
        num_image_groups: the first `num_image_groups` groups are image retrieval (one caption, P images); the rest
            are text retrieval (one image, P captions).
    """

    text_rows: np.ndarray
    image_rows: np.ndarray
    num_image_groups: int

    @property
    def num_candidates(self) -> int:
        return int(self.text_rows.shape[1])

    @property
    def num_text_groups(self) -> int:
        return len(self) - self.num_image_groups

    def __len__(self) -> int:
        return int(self.text_rows.shape[0])

    def __getitem__(self, group: int) -> dict[str, Any]:
        """One evaluation item: {"group": g, "text_rows": int64 [P], "image_rows": int64 [P]}."""
        return {"group": int(group), "text_rows": self.text_rows[group], "image_rows": self.image_rows[group]}


def fixed_candidate_layout(
    image_ids: Sequence[str],
    *,
    num_candidates: int = 20,
    direction: str = "both",
    seed: int = 0,
    max_groups: int | None = None,
) -> CandidateLayout:
    """Choose, once, the candidates each evaluation caption / image is ranked against.

    Args:
        image_ids: the image id of every row of the evaluation split (one row per (image, caption)).
        num_candidates: P, candidates per group (the ground truth plus P - 1 negatives from distinct other images).
        direction: "image" (image retrieval groups only), "text" (text retrieval only) or "both".
        seed: the negatives depend only on (image_ids, num_candidates, direction, seed, max_groups).
        max_groups: keep at most this many groups per direction (the first captions / images), None for all.

    Returns:
        `CandidateLayout`: image retrieval groups (one per caption row) first, then text retrieval groups (one per
        distinct image, in order of first occurrence, its ground truth being its first caption row).
    """
    if direction not in GROUP_DIRECTIONS:
        raise ValueError(f"direction must be one of {GROUP_DIRECTIONS}, got {direction!r}")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be an int >= 1, got {num_candidates!r}")
    if max_groups is not None and (
        isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1
    ):
        raise ValueError(f"max_groups must be None or an int >= 1, got {max_groups!r}")
    ids = [str(value) for value in image_ids]
    for row, value in enumerate(ids):
        if not value:
            raise ValueError(f"image_id of row {row}: expected a non-empty string")
    distinct, image_of_row = np.unique(np.asarray(ids, dtype=object), return_inverse=True)
    if len(distinct) < num_candidates:
        raise ValueError(
            f"fixed_candidate_layout: the evaluation split has {len(distinct)} distinct images but num_candidates="
            f"{num_candidates} needs at least {num_candidates} (the ground truth plus {num_candidates - 1} negatives "
            f"with other images); lower --eval_num_candidates or use a larger split"
        )
    rows_of_image = [np.flatnonzero(image_of_row == k) for k in range(len(distinct))]
    first_row = np.array([rows[0] for rows in rows_of_image], dtype=np.int64)
    # Images in order of first occurrence (np.unique sorts them by id).
    image_order = np.argsort(first_row, kind="stable")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(num_candidates), 0x1A7]))
    negatives_needed = num_candidates - 1

    def draw_other_images(own: int) -> np.ndarray:
        others = rng.choice(len(distinct) - 1, size=negatives_needed, replace=False)
        return others + (others >= own)  # skip the own image

    text_rows, image_rows = [], []
    num_image_groups = 0
    if direction in ("both", "image"):
        captions = range(len(ids)) if max_groups is None else range(min(max_groups, len(ids)))
        for row in captions:
            others = draw_other_images(int(image_of_row[row]))
            text_rows.append(np.full(num_candidates, row, dtype=np.int64))
            image_rows.append(np.concatenate([[row], first_row[others]]).astype(np.int64))
        num_image_groups = len(text_rows)
    if direction in ("both", "text"):
        images = image_order if max_groups is None else image_order[:max_groups]
        for image in images:
            others = draw_other_images(int(image))
            picks = rng.random(negatives_needed)
            negative_captions = [
                rows_of_image[k][int(p * len(rows_of_image[k]))] for k, p in zip(others, picks, strict=True)
            ]
            own_row = int(first_row[image])
            text_rows.append(np.asarray([own_row, *negative_captions], dtype=np.int64))
            image_rows.append(np.full(num_candidates, own_row, dtype=np.int64))
    return CandidateLayout(
        text_rows=np.stack(text_rows), image_rows=np.stack(image_rows), num_image_groups=num_image_groups
    )


def candidate_group_recall(scores, num_image_groups: int, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@K (percent) over candidate groups whose ground truth is column 0.

    Args:
        scores: float [G, P]; row g holds the scores of group g's candidates, the ground truth first.
        num_image_groups: the first rows are image retrieval groups, the rest text retrieval groups.
        ks: cut-offs K.

    Returns:
        `image_retrieval/R@K` and/or `text_retrieval/R@K` (for the directions present) and `rsum`, in percent;
        a ground truth tied with a negative ranks below it.
    """
    scores = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if scores.dim() != 2:
        raise ValueError(f"scores must be [groups, candidates], got shape {tuple(scores.shape)}")
    if not 0 <= num_image_groups <= scores.shape[0]:
        raise ValueError(f"num_image_groups must be in [0, {scores.shape[0]}], got {num_image_groups}")
    metrics: dict[str, float] = {}
    for name, block in (
        ("image_retrieval", scores[:num_image_groups]),
        ("text_retrieval", scores[num_image_groups:]),
    ):
        if block.shape[0] == 0:
            continue
        ranks = image_retrieval_ranks(block, torch.zeros(block.shape[0], dtype=torch.long))  # [g]
        for k in ks:
            metrics[f"{name}/R@{k}"] = 100.0 * float((ranks < k).double().mean())
    metrics["rsum"] = sum(metrics.values())
    return metrics


def make_compute_metrics(layout: CandidateLayout, ks: Sequence[int] = DEFAULT_KS) -> Callable[[Any], dict]:
    """A `compute_metrics` for `Trainer` on `layout`: takes an `EvalPrediction` whose predictions and label_ids are
    [G, P] (as `RetrievalTrainer` returns them) and gives `candidate_group_recall`."""

    def compute_metrics(eval_prediction) -> dict[str, float]:
        scores = np.asarray(eval_prediction.predictions)
        labels = np.asarray(eval_prediction.label_ids)
        expected = (len(layout), layout.num_candidates)
        if scores.shape != expected or labels.shape != expected:
            raise ValueError(
                f"compute_metrics: expected predictions and labels of shape {expected} (the candidate layout), got "
                f"{scores.shape} and {labels.shape}; evaluate with RetrievalTrainer on the layout's dataset"
            )
        if not (labels[:, 0] == 1).all() or (labels[:, 1:] != 0).any():
            raise ValueError(
                "compute_metrics: labels are not one positive first per group; the order was lost"
            )
        return candidate_group_recall(scores, layout.num_image_groups, ks)

    return compute_metrics


class CollatorEpochCallback(TrainerCallback):
    """Calls `collator.set_epoch(epoch)` at the start of each Trainer epoch, so retrieval negatives change per epoch
    and a resumed run draws those of its epoch. Trainer creates the epoch's DataLoader iterator (where worker
    processes copy the collator) after `on_epoch_begin`, so the workers see the new epoch."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))


class RetrievalTrainer(Trainer):
    """`Trainer` that evaluates on a `CandidateLayout` with its own collator.

    Args:
        eval_collator: the collator of the evaluation dataset (`DataCollatorForCandidateGroups`); `data_collator`
            serves training only.
        eval_num_candidates: P of the evaluation layout; predictions and labels are reshaped to [groups, P].
        negatives: "random" (the paper's: the collator's negatives, uniform over the batch's other images) or "itc"
            (each training batch's negatives re-drawn by the model's ITC similarity, `mine_retrieval_negatives`).
        hard_negative_fraction: with "itc", the chance each negative is re-drawn.
        Other arguments as `Trainer`.
    """

    NEGATIVES = ("random", "itc")

    def __init__(
        self,
        *args,
        eval_collator=None,
        eval_num_candidates: int | None = None,
        negatives: str = "random",
        hard_negative_fraction: float = 1.0,
        **kwargs,
    ):
        if negatives not in self.NEGATIVES:
            raise ValueError(f"negatives must be one of {self.NEGATIVES}, got {negatives!r}")
        if not 0.0 <= hard_negative_fraction <= 1.0:
            raise ValueError(f"hard_negative_fraction must be in [0, 1], got {hard_negative_fraction!r}")
        super().__init__(*args, **kwargs)
        self.eval_collator = eval_collator
        self.eval_num_candidates = eval_num_candidates
        self.negatives = negatives
        self.hard_negative_fraction = hard_negative_fraction
        self._nonfinite: NonFiniteWatch | None = None  # created on the first training step, on its device

    # ---------------------------------------------------------------------------------------- non-finite training

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self._nonfinite is None:
            self._nonfinite = NonFiniteWatch([], loss.device)
        # Folded on the device: no host read in the step (global_step counts finished steps; this is the next one).
        self._nonfinite.add(self.state.global_step + 1, SimpleNamespace(loss=loss))
        return loss

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, *args, **kwargs):
        # Called after each optimiser step (global_step already counts it), before anything is logged or saved.
        if (
            self._nonfinite is not None
            and isinstance(grad_norm, torch.Tensor)
            and self.accelerator.scaler is None
        ):
            # With fp16 an inf gradient norm is the loss scaler's business: it skips that step.
            self._nonfinite.add(self.state.global_step, SimpleNamespace(loss=None), grad_norm.detach())
        if self.control.should_log or self.control.should_save or self.control.should_evaluate:
            self.check_finite_training()
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, *args, **kwargs)

    def train(self, *args, **kwargs):
        result = super().train(*args, **kwargs)
        self.check_finite_training()  # before the caller saves the final model
        return result

    def check_finite_training(self) -> None:
        """Raises `NonFiniteTrainingError` (one line: the first bad step, what was non-finite, how to go on) when
        any training step so far had a NaN or infinite loss or gradient norm, on any process. Every process must
        call it at the same step (the Trainer's logging, evaluation and save steps are the same on all)."""
        if self._nonfinite is None:
            return
        flag = self._nonfinite.flag
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag.long(), reduction="sum") > 0
        if not bool(flag):
            return
        found = self._nonfinite.read()
        if found is None:
            what = "another process saw a non-finite training loss or gradient norm"
        else:
            step, name, value = found
            name = "training loss" if name == "total loss" else name
            what = f"step {step}: non-finite {name} ({value})"
        clipping = (
            f"lower --max_grad_norm (now {self.args.max_grad_norm:g})"
            if self.args.max_grad_norm
            else "set --max_grad_norm (clipping is off)"
        )
        raise NonFiniteTrainingError(
            f"retrieval fine-tuning {what} ; lower --learning_rate (now {self.args.learning_rate:g}) or {clipping}, "
            f"and check the training data; the weights of the bad steps were not saved (checkpoints in "
            f"{self.args.output_dir} are from before step {found[0] if found else '?'})"
        )

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.negatives == "itc" and model.training:
            # Seeded by the step, so a resumed run draws the negatives an uninterrupted one would.
            device = inputs["labels"].device
            generator = torch.Generator(device=device).manual_seed(
                int(self.args.seed) * 1_000_003 + int(self.state.global_step)
            )
            inputs = mine_retrieval_negatives(
                self.accelerator.unwrap_model(model), inputs, generator, self.hard_negative_fraction
            )
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator = self.data_collator
        self.data_collator = self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        count = self.eval_num_candidates
        if isinstance(logits, (tuple, list)):
            logits = logits[0]  # the scores; the per-term losses are scalars
        if count is not None:
            if logits is not None:
                logits = logits.reshape(-1, count)
            if labels is not None:
                labels = labels.reshape(-1, count)
        return loss, logits, labels


__all__ = [
    "CandidateLayout",
    "CollatorEpochCallback",
    "RetrievalTrainer",
    "candidate_group_recall",
    "fixed_candidate_layout",
    "make_compute_metrics",
]
