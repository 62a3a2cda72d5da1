#!/usr/bin/env python
"""Multi-stage ImageBERT pre-training with Accelerate.

    accelerate launch examples/run_pretrain.py                      # the built-in demo (demo.yaml), CPU, ~3 min
    accelerate launch examples/run_pretrain.py --recipe configuration/pretraining/imagebert-base-lait-cc-sbu.yaml
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml examples/run_pretrain.py --recipe ...

A recipe (YAML in configuration/pretraining/) lists stages; each stage has its datasets (mixed per batch by
weight, image-text or text-only), tasks and loss weights, length, batch size, learning rate and warm-up, and starts
from a BERT checkpoint or from the previous stage's final weights with a new optimiser. Flags override recipe
fields: `--set stages.0.max_steps=3`, or the dedicated flags below.

The shape follows Accelerate's examples: `build_model_and_processor`, `train_stage`, `training_function`, `main`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO_ROOT / "configuration" / "pretraining" / "demo.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", default=str(DEFAULT_RECIPE), help="recipe YAML (default: demo.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set stages.0.max_steps=3 --set stages.1.learning_rate=5e-5",
    )
    parser.add_argument("--output_dir", help="overrides training.output_dir")
    parser.add_argument("--seed", type=int, help="overrides training.seed")
    parser.add_argument("--max_steps", type=int, help="overrides max_steps of every stage")
    parser.add_argument("--batch_size", type=int, help="overrides batch_size of every stage (per process)")
    parser.add_argument("--gradient_accumulation_steps", type=int, help="overrides it in every stage")
    parser.add_argument("--learning_rate", type=float, help="overrides learning_rate of every stage")
    parser.add_argument(
        "--save_steps", type=int, help="checkpoint every N optimiser steps (0: only on signals)"
    )
    parser.add_argument(
        "--save_total_limit", type=int, help="keep at most N checkpoints (older ones are deleted)"
    )
    parser.add_argument("--logging_steps", type=int)
    parser.add_argument("--num_workers", type=int, help="DataLoader workers")
    parser.add_argument(
        "--num_threads", type=int, help="torch threads per process (default: cores / processes)"
    )
    parser.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16", "fp8"], help="overrides accelerate's setting"
    )
    parser.add_argument(
        "--resume_from_checkpoint", help="'latest' (newest checkpoint in output_dir) or a checkpoint folder"
    )
    parser.add_argument(
        "--max_steps_this_run",
        type=int,
        help="stop after this many optimiser steps in this run, saving a checkpoint (for time-sliced jobs)",
    )
    parser.add_argument("--no_eval", action="store_true", help="skip the zero-shot retrieval check")
    parser.add_argument("--report_to", default="none", help="tracker: tensorboard, wandb, ..., all or none")
    parser.add_argument(
        "--push_to_hub", action="store_true", help="upload the final model, processor and card"
    )
    parser.add_argument("--hub_model_id", help="repository for --push_to_hub (default: the output_dir name)")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="delete output_dir first")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def load_recipe_with_flags(args: argparse.Namespace):
    """The recipe with `--set` overrides and the dedicated flags applied, validated, paths checked."""
    from modeling_imagebert.pretraining.recipes import check_recipe_paths, load_recipe

    overrides = list(args.overrides)
    for flag in ("output_dir", "seed", "save_steps", "save_total_limit", "logging_steps", "num_workers"):
        if getattr(args, flag) is not None:
            overrides.append(f"training.{flag}={getattr(args, flag)}")
    if args.num_threads is not None:
        overrides.append(f"training.num_threads={args.num_threads}")
    if args.mixed_precision is not None:
        overrides.append(f"training.mixed_precision={args.mixed_precision}")
    if args.no_eval:
        overrides.append("evaluation=null")
    recipe = load_recipe(args.recipe, overrides)
    for stage in recipe.stages:
        if args.max_steps is not None:
            stage.max_steps = args.max_steps
        if args.batch_size is not None:
            stage.batch_size = args.batch_size
        if args.gradient_accumulation_steps is not None:
            stage.gradient_accumulation_steps = args.gradient_accumulation_steps
        if args.learning_rate is not None:
            stage.learning_rate = args.learning_rate
    from modeling_imagebert.pretraining.recipes import validate_recipe

    validate_recipe(recipe)
    check_recipe_paths(recipe)
    return recipe


def build_model_and_processor(recipe):
    """A fresh model as the recipe's model section describes it, and its processor."""
    from transformers import AutoTokenizer

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.pretraining.recipes import resolve_bert_checkpoint
    from modeling_imagebert.processing_imagebert import ImageBertProcessor

    spec = recipe.model
    if spec.bert_checkpoint is not None:
        bert = resolve_bert_checkpoint(spec.bert_checkpoint)
        model = ImageBertForPreTraining.from_bert_pretrained(bert, **spec.overrides)
        tokenizer_path = resolve_bert_checkpoint(spec.tokenizer or spec.bert_checkpoint)
    else:
        config = ImageBertConfig.from_json_file(spec.config)
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


def check_data_against_model(sources, config, stage_index: int) -> None:
    """Fails before training when a source's features or classes do not fit the model."""
    from modeling_imagebert.pretraining.recipes import RecipeError

    for d, source in enumerate(sources):
        features = source.encoded.features
        if "region_features" not in features:
            continue
        dim = features["region_features"].shape[1]
        if dim != config.visual_feature_dim:
            raise RecipeError(
                f"stages[{stage_index}].datasets[{d}]: region features have dimension {dim}, the model expects "
                f"visual_feature_dim={config.visual_feature_dim} (set model.overrides.visual_feature_dim)"
            )


def init_stage_weights(model, recipe, stage_index: int, output_dir: Path, fresh_model) -> None:
    """Loads the stage's initial weights into `model` (in place, so Accelerate keeps one model object)."""
    from modeling_imagebert import ImageBertForPreTraining
    from modeling_imagebert.pretraining.checkpoints import stage_final_name

    init = recipe.stages[stage_index].init
    if init in ("bert", "config"):
        source = fresh_model()
    elif init == "previous":
        folder = output_dir / stage_final_name(
            stage_index
        )  # stage_index is 0-based: the previous stage's number
        source = ImageBertForPreTraining.from_pretrained(folder)
    else:
        source = ImageBertForPreTraining.from_pretrained(init)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    missing = [k for k in missing if k != "mlm_head.decoder.weight"]
    if missing or unexpected:
        raise ValueError(f"stage {stage_index + 1} init {init!r}: missing {missing}, unexpected {unexpected}")


def make_optimizer(model, stage):
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(
            parameter
        )
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": stage.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=stage.learning_rate,
        betas=(stage.adam_beta1, stage.adam_beta2),
        eps=stage.adam_epsilon,
    )


class _Stopped(Exception):
    """Raised to leave the run after a signal or --max_steps_this_run, once the checkpoint is written."""

    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.code = code


def train_stage(
    accelerator,
    model,
    processor,
    recipe,
    stage_index: int,
    output_dir: Path,
    args,
    stopper,
    run_budget,
    resume,
):
    """Trains one stage (0-based `stage_index`); returns the running mean of each task's loss over the last
    logging window."""
    from transformers import get_scheduler

    from modeling_imagebert.pretraining.checkpoints import (
        load_checkpoint,
        rotate_checkpoints,
        save_checkpoint,
    )
    from modeling_imagebert.pretraining.schedule import (
        BatchSchedule,
        ScheduledBatches,
        build_stage_sources,
        stage_num_steps,
    )

    stage = recipe.stages[stage_index]
    training = recipe.training
    number = stage_index + 1
    sources = build_stage_sources(stage, stage_index, processor, training.seed)
    check_data_against_model(sources, accelerator.unwrap_model(model).config, stage_index)
    schedule = BatchSchedule(
        [len(s) for s in sources],
        [s.spec.weight for s in sources],
        batch_size=stage.batch_size,
        num_processes=accelerator.num_processes,
        seed=training.seed,
        stage_index=stage_index,
    )
    accumulation = stage.gradient_accumulation_steps
    num_steps = stage_num_steps(stage, schedule)
    warmup = stage.warmup_steps if stage.warmup_steps > 0 else math.ceil(stage.warmup_ratio * num_steps)

    # A new optimiser and schedule per stage. The scheduler is stepped by hand (once per optimiser step, whatever
    # the number of processes) and saved beside accelerate's state.
    optimizer = make_optimizer(accelerator.unwrap_model(model), stage)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = get_scheduler(
        stage.lr_scheduler, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=num_steps
    )

    step = 0
    if resume is not None:
        state = load_checkpoint(accelerator, resume, scheduler)
        step = int(state["step"])
        if (
            state.get("num_processes") != accelerator.num_processes
            or state.get("batch_size") != stage.batch_size
        ):
            accelerator.print(
                f"warning: {resume} was written with {state.get('num_processes')} processes x batch "
                f"{state.get('batch_size')}; resuming with {accelerator.num_processes} x {stage.batch_size} changes "
                f"the data order"
            )
        accelerator.print(f"resumed stage {number} at step {step} from {resume}")

    def state_dict(step_now: int) -> dict:
        return {
            "stage": number,
            "stage_name": stage.name,
            "step": step_now,
            "num_steps": num_steps,
            "micro_step": step_now * accumulation,
            "num_processes": accelerator.num_processes,
            "batch_size": stage.batch_size,
            "recipe": recipe.name,
        }

    def checkpoint(step_now: int) -> Path:
        path = save_checkpoint(accelerator, output_dir, number, step_now, state_dict(step_now), scheduler)
        if accelerator.is_main_process:
            rotate_checkpoints(output_dir, training.save_total_limit)
        return path

    enabled = {t: w for t, w in stage.tasks.items() if w > 0}
    progress = None
    if accelerator.is_main_process and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(
            total=num_steps, initial=step, desc=f"stage {number}/{len(recipe.stages)} {stage.name}"
        )
    window: dict[str, list[float]] = {}
    last_losses: dict[str, float] = {}
    model.train()
    generator = torch.Generator().manual_seed(
        training.seed
    )  # DataLoader draws from it, never from the global RNG
    micro = step * accumulation
    total_micro = num_steps * accumulation
    while micro < total_micro:
        # One DataLoader per epoch of the schedule, started at the current micro-batch (that is the skip on resume).
        epoch_end = min(total_micro, (micro // schedule.batches_per_epoch + 1) * schedule.batches_per_epoch)
        dataset = ScheduledBatches(
            sources, schedule, accelerator.process_index, micro, epoch_end, enabled, stage.itm_batch_fraction
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=None, shuffle=False, num_workers=training.num_workers, generator=generator
        )
        for batch in loader:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                outputs = model(**batch)
                losses = {t: getattr(outputs, f"{t}_loss") for t in TASKS_ORDER if t in enabled}
                losses = {t: v for t, v in losses.items() if v is not None}
                loss = sum(enabled[t] * v for t, v in losses.items())
                accelerator.backward(loss)
                if accelerator.sync_gradients and stage.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            micro += 1
            for t, v in losses.items():
                window.setdefault(t, []).append(float(v.detach()))
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            step += 1
            if step % training.logging_steps == 0 or step == num_steps:
                # Per task, the mean over the batches of the last window that trained it (batches differ in tasks).
                last_losses.update({t: sum(v) / len(v) for t, v in window.items()})
                window = {}
                logs = {f"stage{number}/{t}_loss": v for t, v in last_losses.items()}
                logs[f"stage{number}/lr"] = scheduler.get_last_lr()[0]
                accelerator.log(logs, step=step)
                if progress is None:
                    accelerator.print(
                        f"stage {number} step {step}/{num_steps}: "
                        + ", ".join(f"{t} {v:.4f}" for t, v in last_losses.items())
                    )
                else:
                    progress.set_postfix(
                        {
                            **{t: f"{v:.3f}" for t, v in last_losses.items()},
                            "lr": f"{logs[f'stage{number}/lr']:.1e}",
                        }
                    )
            if progress is not None:
                progress.update(1)
            run_budget["steps"] += 1
            stop_reason = None
            if stopper.received is not None:
                stop_reason = (f"received signal {stopper.received}", 128 + stopper.received)
            elif args.max_steps_this_run is not None and run_budget["steps"] >= args.max_steps_this_run:
                stop_reason = (f"--max_steps_this_run {args.max_steps_this_run} reached", 0)
            if accelerator.num_processes > 1:
                # Every process must agree to stop (a signal may reach only one), or save_state would hang.
                flag = torch.tensor(
                    [0 if stop_reason is None else stop_reason[1] + 1], device=accelerator.device
                )
                flag = accelerator.reduce(flag, reduction="sum")
                if stop_reason is None and int(flag.item()) > 0:
                    stop_reason = ("another process was asked to stop", 128 + 15)
            if stop_reason is not None and step < num_steps:
                if progress is not None:
                    progress.close()
                path = checkpoint(step)
                accelerator.print(
                    f"{stop_reason[0]}: saved {path}; continue with --resume_from_checkpoint latest "
                    f"--output_dir {output_dir}"
                )
                raise _Stopped(stop_reason[0], stop_reason[1])
            if training.save_steps and step % training.save_steps == 0 and step < num_steps:
                checkpoint(step)
            if micro >= total_micro:
                break
    if progress is not None:
        progress.close()
    if window:
        last_losses.update({t: sum(v) / len(v) for t, v in window.items()})
    accelerator.print(
        f"stage {number} ({stage.name}) done: {num_steps} steps; final losses "
        + ", ".join(f"{t} {v:.4f}" for t, v in last_losses.items())
    )
    return model, optimizer, last_losses


TASKS_ORDER = ("mlm", "moc", "mrfr", "itm")


def training_function(recipe, args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, set_seed

    from modeling_imagebert.pretraining.checkpoints import (
        GracefulStop,
        find_resume_point,
        save_pretrained_atomic,
        stage_final_name,
    )
    from modeling_imagebert.pretraining.model_card import build_model_card

    training = recipe.training
    output_dir = Path(training.output_dir).absolute()
    # find_unused_parameters: text-only batches skip the region heads and a disabled task skips its head, so DDP
    # must not wait for their gradients.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=recipe.needs_unused_parameter_search())]
    log_with = None
    if args.report_to not in (None, "none"):
        if args.report_to == "tensorboard":
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                try:
                    import tensorboardX  # noqa: F401
                except ImportError:
                    raise SystemExit(
                        "--report_to tensorboard: tensorboard is not installed; pip install tensorboard "
                        "(or use --report_to none)"
                    ) from None
        log_with = args.report_to
    accumulation = {s.gradient_accumulation_steps for s in recipe.stages}
    if len(accumulation) > 1:
        raise SystemExit(
            "gradient_accumulation_steps must be the same in every stage (Accelerate fixes it per run)"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation.pop(),
        mixed_precision=training.mixed_precision,
        kwargs_handlers=handlers,
        log_with=log_with,
        project_dir=str(output_dir),
    )
    threads = training.num_threads
    if threads is None and accelerator.device.type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // accelerator.num_processes)
    if threads:
        torch.set_num_threads(threads)
    if args.overwrite_output_dir and accelerator.is_main_process and output_dir.exists():
        shutil.rmtree(output_dir)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
    accelerator.wait_for_everyone()
    if log_with is not None:
        accelerator.init_trackers(recipe.name.replace("/", "-"))

    resume_point = None
    if args.resume_from_checkpoint:
        resume_point = find_resume_point(output_dir, args.resume_from_checkpoint)
        if resume_point is None:
            accelerator.print(f"no checkpoint in {output_dir}; starting from scratch")
        elif resume_point.stage > len(recipe.stages):
            accelerator.print(f"every stage of {output_dir} is already finished; evaluating the final model")

    set_seed(training.seed)
    started = time.perf_counter()
    model, processor = build_model_and_processor(recipe)

    def fresh_model():
        set_seed(training.seed)
        return build_model_and_processor(recipe)[0]

    first_stage = 0 if resume_point is None else resume_point.stage - 1
    results: dict = {"recipe": recipe.name, "output_dir": str(output_dir), "stages": []}
    run_budget = {"steps": 0}
    prepared = model
    with GracefulStop() as stopper:
        try:
            for stage_index in range(first_stage, len(recipe.stages)):
                accelerator.free_memory()  # forget the previous stage's optimiser (a new one per stage)
                unwrapped = accelerator.unwrap_model(prepared)
                set_seed(training.seed + stage_index)
                if stage_index > 0 or recipe.stages[0].init not in ("bert", "config"):
                    init_stage_weights(unwrapped, recipe, stage_index, output_dir, fresh_model)
                resume = None
                if resume_point is not None and stage_index == resume_point.stage - 1:
                    resume = resume_point.checkpoint
                prepared, _, losses = train_stage(
                    accelerator,
                    unwrapped,
                    processor,
                    recipe,
                    stage_index,
                    output_dir,
                    args,
                    stopper,
                    run_budget,
                    resume,
                )
                results["stages"].append({"stage": stage_index + 1, "final_losses": losses})
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    final = save_pretrained_atomic(
                        accelerator.unwrap_model(prepared),
                        processor,
                        output_dir / stage_final_name(stage_index + 1),
                    )
                    accelerator.print(f"stage {stage_index + 1} final weights: {final}")
                accelerator.wait_for_everyone()
        except _Stopped as stop:
            accelerator.end_training()
            results["stopped"] = str(stop)
            results["exit_code"] = stop.code
            return results

    model = accelerator.unwrap_model(prepared)
    if first_stage >= len(recipe.stages):
        from modeling_imagebert import ImageBertForPreTraining

        model = ImageBertForPreTraining.from_pretrained(output_dir / stage_final_name(len(recipe.stages)))
    results["train_seconds"] = time.perf_counter() - started

    metrics = None
    if recipe.evaluation is not None:
        from modeling_imagebert.data.loading import load_source
        from modeling_imagebert.retrieval.evaluation import evaluate_retrieval

        test = load_source(recipe.evaluation.dataset)
        accelerator.print(
            f"zero-shot retrieval: {len(test)} captions x {len(set(test['image_id']))} images, ranked by the ITM score"
        )
        evaluation = evaluate_retrieval(
            model,
            test,
            processor,
            batch_size=recipe.evaluation.batch_size,
            accelerator=accelerator,
            progress=not args.no_progress,
            bf16=training.mixed_precision == "bf16",
        )
        metrics = evaluation.metrics
        results["zero_shot_retrieval"] = metrics
        results["num_test_images"] = len(evaluation.image_ids)
        accelerator.print(evaluation.table)

    final_losses = results["stages"][-1]["final_losses"] if results["stages"] else None
    results["final_losses"] = final_losses
    results["wall_seconds"] = time.perf_counter() - started
    final_dir = output_dir / "final"
    if accelerator.is_main_process:
        base_card = (
            (REPO_ROOT / "MODEL_CARD.md").read_text()
            if (REPO_ROOT / "MODEL_CARD.md").is_file()
            else "# ImageBERT\n"
        )
        card = build_model_card(base_card, recipe, final_losses, metrics)
        save_pretrained_atomic(model, processor, final_dir, card=card)
        (output_dir / "pretrain_results.json").write_text(json.dumps(results, indent=2) + "\n")
        if args.push_to_hub:
            from huggingface_hub import HfApi

            repo_id = args.hub_model_id or output_dir.name
            api = HfApi()
            api.create_repo(repo_id, exist_ok=True)
            api.upload_folder(
                repo_id=repo_id, folder_path=str(final_dir), commit_message=f"pre-trained with {recipe.name}"
            )
            accelerator.print(f"pushed {final_dir} to https://huggingface.co/{repo_id}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    # On the toy world, the follow-up commands need the same toy test split as the zero-shot check above.
    eval_data = recipe.evaluation.dataset if recipe.evaluation is not None else None
    toy = eval_data.toy_world if eval_data is not None and eval_data.toy_world else None
    toy_flags = (
        f" --toy --toy_test_images {toy.get('num_test_images', 100)} --toy_seed {toy.get('seed', 0)}"
        f" --toy_world_seed {toy.get('world_seed', 0)} --toy_noise {toy.get('noise', 1.5)}"
        if toy
        else " --dataset DATASET"
    )
    retrieval_flags = (
        f" --toy --toy_world_seed {toy.get('world_seed', 0)} --toy_noise {toy.get('noise', 1.5)}"
        if toy
        else " --train_dataset DATASET --eval_dataset DATASET"
    )
    accelerator.print(
        f"\nDone in {results['wall_seconds']:.0f} s. Pre-trained model and processor: {final_dir}\n"
        f"  load it:   AutoModelForPreTraining.from_pretrained('{final_dir}')  (import modeling_imagebert first, or "
        f"pass trust_remote_code=True)\n"
        f"  next:      fine-tune for retrieval with examples/run_retrieval.py --model_name_or_path {final_dir}"
        f"{retrieval_flags} --do_train --do_eval --output_dir outputs/retrieval\n"
        f"             evaluate with examples/evaluate_retrieval.py --model_name_or_path {final_dir}{toy_flags}"
    )
    return results


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe; returns a results dict (per-stage final losses, zero-shot metrics, wall time; `exit_code`
    when the run stopped early on a signal or --max_steps_this_run)."""
    args = parse_args(argv)
    from modeling_imagebert.pretraining.recipes import RecipeError

    try:
        recipe = load_recipe_with_flags(args)
    except (RecipeError, FileNotFoundError) as error:
        raise SystemExit(f"error: {error}") from None
    return training_function(recipe, args)


if __name__ == "__main__":
    outcome = main(sys.argv[1:])
    sys.exit(outcome.get("exit_code", 0))
