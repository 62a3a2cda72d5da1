#!/usr/bin/env python
"""Multi-stage ImageBERT pre-training with Accelerate.

    accelerate launch examples/run_pretrain.py                      # the built-in demo (demo.yaml), CPU, ~4 min
    accelerate launch examples/run_pretrain.py --recipe configuration/pretraining/imagebert-base-lait-cc-sbu.yaml
    accelerate launch --config_file configuration/accelerate/multi_gpu.yaml examples/run_pretrain.py --recipe ...

A recipe (YAML in configuration/pretraining/) lists stages; each stage has its datasets (mixed per batch by
weight, image-text or text-only), tasks and loss weights, length, batch size, learning rate and warm-up, and starts
from a BERT checkpoint or from the previous stage's final weights with a new optimiser. Flags override recipe
fields: `--set stages.0.max_steps=3`, or the dedicated flags (`--help`).

Writes to the output folder: `stage-<k>-final/` per stage, `final/` (model, processor, model card),
`checkpoint-<stage>-<step>/` (resume with `--resume_from_checkpoint latest`), `pretrain_results.json` and
`loss_curves.png` (the per-task loss curves of every stage). A folder holding another run is refused: continue it
with `--resume_from_checkpoint latest` or replace it with `--overwrite_output_dir` (only a folder this script wrote).
"""

import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from torch.utils.data import DataLoader
from transformers import get_scheduler

from modeling_imagebert import ImageBertForPreTraining
from modeling_imagebert.atomic import releasing_locks
from modeling_imagebert.cli import DEBUG_FLAG, EXIT_BAD_INPUT, USER_ERRORS, run_cli
from modeling_imagebert.cli_arguments import pretrain_resume_command
from modeling_imagebert.package_data import demo_recipe_path
from modeling_imagebert.pretraining import checkpoints as ckpt
from modeling_imagebert.pretraining import run_outputs as outputs_of_run
from modeling_imagebert.pretraining.arguments import build_argument_parser, recipe_from_arguments
from modeling_imagebert.pretraining.compiling import compile_step, mark_dynamic_positions
from modeling_imagebert.pretraining.data_sources import load_source
from modeling_imagebert.pretraining.hard_negatives import mine_itm_negatives
from modeling_imagebert.pretraining.loss_log import StageLossLog
from modeling_imagebert.pretraining.model_card import read_base_card
from modeling_imagebert.pretraining.model_setup import (
    build_model_and_processor,
    init_stage_weights,
    make_optimizer,
    set_stage_loss_weights,
)
from modeling_imagebert.pretraining.nonfinite import NonFiniteWatch, gradient_norm, resume_hint
from modeling_imagebert.pretraining.schedule import StagePlan, plan_stage
from modeling_imagebert.pretraining.stage_checks import check_stage_data
from modeling_imagebert.retrieval.zero_shot import evaluate_zero_shot

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = demo_recipe_path()  # package data: found from any folder, also from an installed wheel


def get_dataloaders(accelerator, plan: StagePlan, first_micro_batch: int, num_workers: int, seed: int):
    """Yields one DataLoader per epoch of the stage's schedule, from `first_micro_batch` (> 0 on resume) to the
    stage's end. Each item is a whole collated micro-batch of this process: the schedule fixes which rows and masks
    it holds, so resuming skips batches without reading them."""
    generator = torch.Generator().manual_seed(seed)  # workers draw from it, never from the global RNG
    per_epoch, end = plan.schedule.batches_per_epoch, plan.num_micro_batches
    start = first_micro_batch
    while start < end:
        stop = min(end, (start // per_epoch + 1) * per_epoch)
        batches = plan.batches(accelerator.process_index, start, stop)
        yield DataLoader(
            batches, batch_size=None, shuffle=False, num_workers=num_workers, generator=generator
        )
        start = stop


def train_stage(accelerator, model, processor, recipe, stage_index, args, stops, history, resume):
    """Trains stage `stage_index` (0-based), from the checkpoint of the run's resume point `resume` when it lies
    in this stage; returns the prepared model and each task's last logged loss."""
    stage, training, number = recipe.stages[stage_index], recipe.training, stage_index + 1
    output_dir = Path(training.output_dir).absolute()
    config = accelerator.unwrap_model(model).config
    # With training.compile, batches are padded to shape buckets: a compiled step then sees a few shapes per stage.
    plan = plan_stage(
        stage, stage_index, processor, config, num_processes=accelerator.num_processes, seed=training.seed,
        shape_buckets=training.uses_shape_buckets,
    )  # fmt: skip
    # One source of truth for the loss: the stage's task weights go into the config (disabled tasks 0), so
    # `outputs.loss` is the weighted sum this stage trains on, and the saved config records it.
    set_stage_loss_weights(config, stage.tasks)

    # A new optimiser and LR schedule per stage. The scheduler is stepped by hand, once per optimiser step
    # whatever the number of processes, and saved beside accelerate's state in checkpoints.
    optimizer = make_optimizer(accelerator.unwrap_model(model), stage, training.adamw_implementation)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The forward + backward run through the compiled module (training.compile; the model itself when "none"); it
    # shares the prepared model's parameters, which everything else (accumulation, checkpoints) keeps using.
    step_model = compile_step(model, training.compile)
    scheduler = get_scheduler(
        stage.lr_scheduler, optimizer, num_warmup_steps=plan.warmup_steps, num_training_steps=plan.num_steps
    )
    step = 0
    if resume is not None and resume.stage == number and resume.checkpoint is not None:
        step, _ = ckpt.restore_stage_checkpoint(accelerator, resume.checkpoint, scheduler, stage.batch_size)

    def checkpoint(step_now: int) -> Path:
        return ckpt.save_stage_checkpoint(  # model, optimiser, RNG states, LR schedule, position, losses
            accelerator, recipe, stage_index, step_now, num_steps=plan.num_steps, scheduler=scheduler,
            loss_history=history,
        )  # fmt: skip

    log = StageLossLog(
        accelerator, stage=number, num_stages=len(recipe.stages), stage_name=stage.name,
        num_steps=plan.num_steps, first_step=step, tasks=plan.tasks, logging_steps=training.logging_steps,
        history=history, progress=not args.no_progress,
    )  # fmt: skip
    # A NaN/inf loss or gradient norm is recorded on the device (no host read per step) and read below, before
    # anything is logged or saved: a stage with bad weights stops instead of writing them.
    watch = NonFiniteWatch(plan.tasks, accelerator.device)
    model.train()
    first_micro_batch = step * stage.gradient_accumulation_steps
    micro_batch = first_micro_batch
    for loader in get_dataloaders(accelerator, plan, first_micro_batch, training.num_workers, training.seed):
        for batch in loader:
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            # ALBEF hard negatives for ITM batches; the draws depend only on (seed, stage, micro-batch).
            if stage.itm_negatives == "itc":
                mining_seed = (training.seed * 1_000_003 + stage_index * 1009) * 1_000_003 + micro_batch
                generator = torch.Generator(device=accelerator.device).manual_seed(mining_seed)
                batch = mine_itm_negatives(
                    accelerator.unwrap_model(model), batch, generator, stage.itm_hard_negative_fraction
                )
            micro_batch += 1
            # `accumulate` skips the gradient all-reduce and the optimiser step until the last micro-batch of a step.
            with accelerator.accumulate(model):
                outputs = step_model(**(batch if step_model is model else mark_dynamic_positions(batch)))
                accelerator.backward(outputs.loss)
                # clip_grad_norm_ returns the gradient norm; without clipping it is measured for the check alone.
                grad_norm = None
                if accelerator.sync_gradients and stage.max_grad_norm:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), stage.max_grad_norm)
                elif accelerator.sync_gradients:
                    grad_norm = gradient_norm(model.parameters())
                # With fp16 an inf gradient norm is the loss scaler's business: it skips that step.
                watch.add(step + 1, outputs, grad_norm if accelerator.scaler is None else None)
                optimizer.step()
                optimizer.zero_grad()
            log.add(outputs)  # keeps the detached per-task losses on the device: no host sync here
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the step did not happen
                scheduler.step()
            step += 1
            save_now = bool(training.save_steps) and step % training.save_steps == 0 and step < plan.num_steps
            # Flags are read (and agreed on by every process) where the loop acts: logging, saving, the stage's end.
            sync_point = log.is_logging_step(step) or save_now or step == plan.num_steps
            stop = stops.check(sync_point=sync_point, nonfinite=watch.flag)
            if stop is not None and stop.nonfinite:
                log.close(discard=True)
                raise watch.error(
                    stage=number, stage_name=stage.name, learning_rate=stage.learning_rate,
                    max_grad_norm=stage.max_grad_norm, resume_hint=resume_hint(output_dir, args.command_line),
                )  # fmt: skip
            # At logging steps only: read the losses to the host, log them and record the loss history.
            log.step(step, scheduler.get_last_lr()[0])
            if stop is not None and step < plan.num_steps:
                # A signal or --max_steps_this_run: save where we are, then leave the run.
                log.close()
                path = checkpoint(step)
                accelerator.print(
                    f"{stop}: saved {path}; continue with: {pretrain_resume_command(output_dir, args.command_line)}"
                )
                raise stop
            if save_now:
                checkpoint(step)
    losses = log.close()
    summary = ", ".join(f"{task} {value:.4f}" for task, value in losses.items())
    accelerator.print(f"stage {number} ({stage.name}) done: {plan.num_steps} steps; final losses {summary}")
    return model, losses


@releasing_locks()  # the output folder is locked (prepare_output_dir) while the run runs
def training_function(recipe, args) -> dict:
    """Runs every stage of `recipe` (from the resume point), the zero-shot check, and saves the results."""
    training = recipe.training
    output_dir = Path(training.output_dir).absolute()
    # find_unused_parameters: text-only batches and disabled tasks skip heads; DDP must not wait for them.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=recipe.needs_unused_parameter_search())
    accelerator = Accelerator(
        gradient_accumulation_steps=outputs_of_run.run_gradient_accumulation(recipe),
        mixed_precision=training.mixed_precision,
        kwargs_handlers=[ddp],
        log_with=outputs_of_run.tracker_from_flag(args.report_to),
        project_dir=str(output_dir),
    )
    outputs_of_run.set_cpu_threads(accelerator, training.num_threads)
    # Before anything is written: refuse a folder of another run (or files not ours), find the resume point (this
    # run's newest intact checkpoint), check the recipe against it; then mark the folder and write recipe.json.
    start = outputs_of_run.prepare_output_dir(
        accelerator, output_dir, recipe, args.overwrite_output_dir,
        resume_from_checkpoint=args.resume_from_checkpoint,
        ignore_recipe_mismatch=args.ignore_recipe_mismatch, inputs=[args.recipe],
    )  # fmt: skip
    resume_point = start.resume_point
    if accelerator.log_with:
        accelerator.init_trackers(recipe.name.replace("/", "-"))

    history = outputs_of_run.resumed_loss_history(output_dir, resume_point)

    # The seed before building the model, so new weights (region embedding, heads) are reproducible.
    set_seed(training.seed)
    started = time.perf_counter()
    model, processor = build_model_and_processor(recipe)

    def fresh_model():
        set_seed(training.seed)
        return build_model_and_processor(recipe)[0]

    first_stage = 0 if resume_point is None else resume_point.stage - 1
    # Every remaining stage's data is checked now (the validation cached by data content), so a bad row or a
    # data/model mismatch in stage 2 fails before stage 1 trains. The main process checks first and caches.
    with accelerator.main_process_first():
        check_stage_data(
            recipe, processor, model.config, first_stage=first_stage, log=accelerator.print,
            show_progress=not args.no_progress and accelerator.is_main_process,
        )  # fmt: skip
    results: dict = {"recipe": recipe.name, "output_dir": str(output_dir), "stages": []}
    with ckpt.StopRequests(accelerator, args.max_steps_this_run) as stops:
        try:
            for stage_index in range(first_stage, len(recipe.stages)):
                accelerator.free_memory()  # forget the previous stage's optimiser (a new one per stage)
                model = accelerator.unwrap_model(model)
                set_seed(training.seed + stage_index)
                if stage_index > 0 or recipe.stages[0].init not in ("bert", "config"):
                    init_stage_weights(model, recipe, stage_index, output_dir, fresh_model)
                model, losses = train_stage(
                    accelerator, model, processor, recipe, stage_index, args, stops, history, resume_point
                )
                results["stages"].append({"stage": stage_index + 1, "final_losses": losses})
                # Each stage's final weights: the next stage starts from them, and a resume after this point too.
                outputs_of_run.save_stage_final(
                    accelerator, model, processor, output_dir, stage_index + 1, history, run_id=start.run_id
                )
        except ckpt.Stopped as stop:
            accelerator.end_training()
            return {**results, "stopped": str(stop), "exit_code": stop.code}

    model = accelerator.unwrap_model(model)
    if first_stage >= len(recipe.stages):
        accelerator.print(f"every stage of {output_dir} is already finished; evaluating the final model")
        last_stage_final = output_dir / ckpt.stage_final_name(len(recipe.stages))
        model = ImageBertForPreTraining.from_pretrained(last_stage_final)
    results["train_seconds"] = time.perf_counter() - started

    # Zero-shot retrieval on the test split (full ranking; two-stage when the recipe asks): printed and saved.
    if recipe.evaluation is not None:
        test = load_source(recipe.evaluation.dataset)
        results.update(evaluate_zero_shot(
            model, test, processor, recipe.evaluation, accelerator=accelerator, progress=not args.no_progress,
            bf16=training.mixed_precision == "bf16", log=accelerator.print,
        ))  # fmt: skip

    results["final_losses"] = results["stages"][-1]["final_losses"] if results["stages"] else None
    results["loss_history"] = history
    results["wall_seconds"] = time.perf_counter() - started
    final_dir = output_dir / "final"
    # Final model + card (with the loss curves), pretrain_results.json and loss_curves.png; then the Hub.
    if accelerator.is_main_process:
        card = read_base_card(REPO_ROOT / "MODEL_CARD.md")  # the project's card; the run appends its section
        outputs_of_run.save_run_results(
            model, processor, recipe, results, output_dir, card, run_id=start.run_id
        )
        if args.push_to_hub:
            repo_id = args.hub_model_id or output_dir.name
            url = outputs_of_run.push_final_model(final_dir, repo_id, recipe.name)
            accelerator.print(f"pushed {final_dir} to {url}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    accelerator.print(outputs_of_run.next_steps_message(recipe, final_dir, results["wall_seconds"]))
    return results


def main(argv: list[str] | None = None) -> dict:
    """Runs the recipe; returns a results dict (per-stage final losses, zero-shot metrics, loss history, wall time;
    `exit_code` when the run stopped early on a signal or --max_steps_this_run).

    Raises the project's errors for `run_cli` to print as one line: RecipeError (a recipe field),
    FileNotFoundError (a path), DataValidationError (a stage's data: stage, dataset, row and field),
    NonFiniteTrainingError (stage, step and task of a NaN/inf loss)."""
    args = build_argument_parser(__doc__, DEFAULT_RECIPE).parse_args(argv)
    # The run's own flags, for the resume command printed when it stops.
    args.command_line = list(sys.argv[1:] if argv is None else argv)
    return training_function(recipe_from_arguments(args), args)


def cli_main(argv: list[str]) -> None:
    """`main` for `run_cli`: exits with a stop's status (128 + n after signal n, 0 after --max_steps_this_run).
    Under `accelerate launch` every process fails alike; only the main process prints the one error line."""
    try:
        results = main(argv)
    except USER_ERRORS:
        debug = DEBUG_FLAG in sys.argv[1:] or os.environ.get("IMAGEBERT_DEBUG") == "1"
        if int(os.environ.get("RANK", "0")) > 0 and not debug:
            raise SystemExit(EXIT_BAD_INPUT) from None
        raise
    if results.get("exit_code"):
        raise SystemExit(results["exit_code"])


if __name__ == "__main__":
    sys.exit(run_cli(cli_main, sys.argv[1:]))
