"""The pre-training task table: one row per task, read by every part that repeats something per task.

The config (loss weight fields and their validation), the model (label value checks, head positions, last-layer
rows, the weighted loss, the output's per-task losses, the heads a retrieval model leaves behind), the collators
(position keys, label checks), the recipes (task names, defaults, text-only stages), the stage schedule (labels a
stage drops, masked batches), the ITM hard-negative miner, the loss log and the loss plots all read
`PRETRAINING_TASKS`; whether a task is on is `enabled_tasks`, once. Adding a task is one row here, plus:
- `ImageBertConfig`: its `<name>_loss_weight` field;
- `ImageBertForPreTraining`: its head `<name>_head`, its labels (and positions) as `forward` arguments, its loss, and
  the `<name>_loss` field of `ImageBertForPreTrainingOutput` (tests/test_modeling.py checks each row has them);
  a masked task also derives its positions from its labels in `_head_positions` (batches without the collators');
- the collator code that makes its labels (and, for a masked task, its positions in `add_labelled_positions`).

Part of the remote-code unit (the config and the model read it): `save_pretrained` copies it beside them. It
imports only the standard library.
"""

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PretrainingTask:
    """One pre-training task.

    Attributes:
        name: its name in recipes (`tasks: {mlm: 1.0}`), in the loss logs and in `outputs.<name>_loss`.
        title: what the loss curves call it.
        label_keys: the batch entries its loss reads (the first is its label); a stage that does not train the
            task drops them from its batches.
        position_key: the batch entry of flat positions its head reads (the collators compute them), or None for a
            task that reads the pooled row or its own unimodal passes.
        positions_over: the part of the joint sequence `position_key` indexes: "text" or "regions" (None without
            positions).
        label_values: what the values of its label must be, checked where the data enters (collators) and by the
            model with `config.check_inputs`: "binary" (0 or 1), the config field that bounds its class ids
            (ids in [0, config.<field>) or -100), or None (not checked).
        masked: trained on masked inputs, so in `itm_mode: separate` its labels stay out of ITM's unmasked batches.
        needs_images: reads regions; a text-only stage trains only tasks without this.
        in_paper: one of the paper's four tasks (§4.3), on by default in a recipe's stage; the others are options.
    """

    name: str
    title: str
    label_keys: tuple[str, ...]
    position_key: str | None = None
    positions_over: str | None = None
    label_values: str | None = None
    masked: bool = False
    needs_images: bool = True
    in_paper: bool = True

    @property
    def loss_weight_field(self) -> str:
        """The `ImageBertConfig` field holding its loss weight."""
        return f"{self.name}_loss_weight"

    @property
    def loss_output(self) -> str:
        """The `ImageBertForPreTrainingOutput` field holding its unweighted loss."""
        return f"{self.name}_loss"


PRETRAINING_TASKS = (
    PretrainingTask(
        "mlm",
        "MLM (masked language modelling)",
        label_keys=("labels",),
        position_key="mlm_positions",
        positions_over="text",
        label_values="vocab_size",
        masked=True,
        needs_images=False,
    ),
    PretrainingTask(
        "moc",
        "MOC (masked object classification)",
        label_keys=("region_class_labels",),
        position_key="moc_positions",
        positions_over="regions",
        label_values="num_object_classes",
        masked=True,
    ),
    PretrainingTask(
        "mrfr",
        "MRFR (masked region feature regression)",
        label_keys=("region_feature_targets",),
        position_key="mrfr_positions",
        positions_over="regions",
        masked=True,
    ),
    PretrainingTask("itm", "ITM (image-text matching)", label_keys=("itm_labels",), label_values="binary"),
    # In-batch image-text contrastive (not in the paper): the embeddings two-stage retrieval picks candidates with.
    # Its groups are optional (default: every row its own image); it is on when its loss weight is > 0.
    PretrainingTask(
        "itc",
        "ITC (image-text contrastive)",
        label_keys=("itc_text_groups", "itc_image_groups"),
        in_paper=False,
    ),
)
TASK_NAMES = tuple(task.name for task in PRETRAINING_TASKS)
PAPER_TASK_NAMES = tuple(task.name for task in PRETRAINING_TASKS if task.in_paper)
# The entries of a masked batch: the masked tasks' labels and the collator's record of the regions it masked (which
# the masked region tasks share).
MASKED_BATCH_KEYS = (
    *(key for task in PRETRAINING_TASKS if task.masked for key in task.label_keys),
    "masked_regions",
)


def enabled_tasks(weights: Mapping[str, float]) -> dict[str, float]:
    """The one rule of which tasks are on: `{name: weight}` of the tasks whose weight in `weights` (a stage's
    `tasks`, names not listed count as 0) is > 0, as floats, in table order."""
    return {
        task.name: float(weights[task.name]) for task in PRETRAINING_TASKS if weights.get(task.name, 0) > 0
    }


def dropped_label_keys(weights: Mapping[str, float]) -> list[str]:
    """The batch entries of the tasks that are off under `weights` (see `enabled_tasks`), in table order."""
    enabled = enabled_tasks(weights)
    return [key for task in PRETRAINING_TASKS if task.name not in enabled for key in task.label_keys]


__all__ = [
    "MASKED_BATCH_KEYS",
    "PAPER_TASK_NAMES",
    "PRETRAINING_TASKS",
    "TASK_NAMES",
    "PretrainingTask",
    "dropped_label_keys",
    "enabled_tasks",
]
