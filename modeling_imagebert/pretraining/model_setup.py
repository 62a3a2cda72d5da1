"""The model side of a pre-training stage: the model and processor a recipe describes, a stage's initial weights,
its task loss weights (written into the model config, so `outputs.loss` is the stage's loss) and its optimiser."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from ..configuration_imagebert import ImageBertConfig
from ..modeling_imagebert import ImageBertForPreTraining
from ..processing_imagebert import ImageBertProcessor
from ..safe_loading import loading_weights
from ..tasks_imagebert import PRETRAINING_TASKS, enabled_tasks
from .checkpoints import stage_final_name
from .recipes import (
    ADAMW_IMPLEMENTATIONS,
    Recipe,
    StageSpec,
    resolve_bert_checkpoint,
    resolve_model_config,
)


def build_model_and_processor(recipe: Recipe) -> tuple[ImageBertForPreTraining, ImageBertProcessor]:
    """A fresh `ImageBertForPreTraining` as `recipe.model` describes it (a BERT checkpoint with config overrides,
    or a config JSON with overrides and a tokenizer) and the processor that fits it (same max_regions and
    max_text_length). Raises ValueError naming the `model.*` field that is wrong."""
    from transformers import AutoTokenizer

    spec = recipe.model
    if spec.bert_checkpoint is not None:
        bert = resolve_bert_checkpoint(spec.bert_checkpoint)
        model = ImageBertForPreTraining.from_bert_pretrained(bert, **spec.overrides)
        tokenizer_path = resolve_bert_checkpoint(spec.tokenizer or spec.bert_checkpoint)
    else:
        config = ImageBertConfig.from_json_file(str(resolve_model_config(spec.config)))
        for key, value in spec.overrides.items():
            if not hasattr(config, key):
                raise ValueError(f"model.overrides.{key}: not an ImageBertConfig field")
            setattr(config, key, value)
        model = ImageBertForPreTraining(config)
        if spec.tokenizer is None:
            raise ValueError(
                "model.tokenizer: required with model.config (a folder or Hub id with a BERT tokenizer)"
            )
        tokenizer_path = resolve_bert_checkpoint(spec.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    processor = ImageBertProcessor(
        tokenizer, max_regions=model.config.max_regions, max_text_length=model.config.max_text_length
    )
    return model, processor


def init_stage_weights(
    model: ImageBertForPreTraining,
    recipe: Recipe,
    stage_index: int,
    output_dir: str | Path,
    fresh_model: Callable[[], ImageBertForPreTraining],
) -> None:
    """Loads the initial weights of stage `stage_index` (0-based) into `model`, in place (Accelerate keeps one
    model object across stages): a fresh model (`init: bert|config`, built by `fresh_model`), the previous stage's
    `stage-<k>-final` folder in `output_dir` (`init: previous`) or a checkpoint folder. Raises ValueError when the
    weights do not fit (missing or unexpected keys; the tied MLM decoder is allowed to be missing)."""
    init = recipe.stages[stage_index].init
    if init in ("bert", "config"):
        source = fresh_model()
    elif init == "previous":
        # stage_index is 0-based, stage_final_name 1-based: this names the previous stage's folder.
        folder = Path(output_dir) / stage_final_name(stage_index)
        with loading_weights(folder, "the previous stage's model folder"):
            source = ImageBertForPreTraining.from_pretrained(folder)
    else:
        with loading_weights(
            init, f"stage {stage_index + 1} init: a model folder written by save_pretrained"
        ):
            source = ImageBertForPreTraining.from_pretrained(init)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if k != "mlm_head.decoder.weight"]
    if missing or unexpected:
        raise ValueError(f"stage {stage_index + 1} init {init!r}: missing {missing}, unexpected {unexpected}")


def set_stage_loss_weights(config: ImageBertConfig, tasks: Mapping[str, float]) -> dict[str, float]:
    """Writes a stage's task weights into the config's `<task>_loss_weight` fields (the task table's; a task that is
    off, see `enabled_tasks`, gets 0), so the model's `outputs.loss` is the stage's weighted loss and a saved
    checkpoint records the weights it was trained with. The stage's batches carry the labels of the same enabled
    tasks (`ScheduledBatches` drops the others'). Returns the enabled tasks with their weights, in table order."""
    enabled = enabled_tasks(tasks)
    for task in PRETRAINING_TASKS:
        setattr(config, task.loss_weight_field, enabled.get(task.name, 0.0))
    return enabled


def make_optimizer(
    model: torch.nn.Module, stage: StageSpec, implementation: str = "fused"
) -> torch.optim.AdamW:
    """A new AdamW for a stage: weight decay on the matrices, none on biases, LayerNorm and other 1-D tensors.

    `implementation`: torch's kernel, one of `ADAMW_IMPLEMENTATIONS` ("fused" falls back to "foreach" when a
    parameter lives on a device without torch's fused kernels)."""
    if implementation not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation: expected one of {list(ADAMW_IMPLEMENTATIONS)}, got {implementation!r}"
        )
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        is_flat = parameter.ndim < 2 or "LayerNorm" in name or name.endswith(".bias")
        (no_decay if is_flat else decay).append(parameter)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=stage.learning_rate,
        betas=(stage.adam_beta1, stage.adam_beta2),
        eps=stage.adam_epsilon,
        **_kernel(implementation, decay + no_decay),
    )


_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def _kernel(implementation: str, parameters: list[torch.nn.Parameter]) -> dict[str, bool]:
    if implementation == "fused" and all(
        p.device.type in _FUSED_DEVICES
        and p.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        for p in parameters
    ):
        return {"fused": True}
    if implementation == "for-loop":
        return {"foreach": False}
    return {"foreach": True}


__all__ = ["build_model_and_processor", "init_stage_weights", "make_optimizer", "set_stage_loss_weights"]
