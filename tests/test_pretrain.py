"""examples/run_pretrain.py end to end on tiny settings, in-process through its `main(argv)`: the demo recipe, exact
resume after a stop or a SIGTERM, stage chaining, failures before training, and a two-process CPU DDP run."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from kill import kill_at_random_moment

from modeling_imagebert.pretraining.recipes import RecipeError

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "run_pretrain.py"
SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")


def _load_script():
    spec = importlib.util.spec_from_file_location("run_pretrain", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_pretrain = _load_script()

TOY = {"world_seed": 0, "feature_dim": 16, "num_classes": 6, "num_attributes": 2}


def _tiny_recipe(minilm_path, *, stages=2, steps=3, evaluation=False, **stage_fields) -> dict:
    """A tiny config model (hidden 32) with the MiniLM tokenizer, toy world of 24 images per stage."""
    recipe = {
        "name": "tiny",
        "model": {
            "config": str(ROOT / "configuration" / "models" / "imagebert-tiny.json"),
            "tokenizer": minilm_path,
            "overrides": {
                "visual_feature_dim": 16,
                "num_object_classes": 7,
                "max_regions": 8,
                "max_text_length": 16,
            },
        },
        "training": {"save_steps": 0, "logging_steps": 1, "num_threads": 1},
        "stages": [],
    }
    for s in range(stages):
        stage = {
            "name": f"s{s + 1}",
            "init": "config" if s == 0 else "previous",
            "datasets": [
                {"toy_world": {**TOY, "variant": "web" if s == 0 else "curated", "num_images": 24, "seed": s}}
            ],
            "max_steps": steps,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_steps": 1,
        }
        stage.update(stage_fields)
        recipe["stages"].append(stage)
    if evaluation:
        recipe["evaluation"] = {
            "dataset": {
                "toy_world": {**TOY, "variant": "retrieval", "num_images": 1, "num_validation_images": 1,
                              "num_test_images": 4, "seed": 9},
                "split": "test",
            },
            "batch_size": 64,
        }  # fmt: skip
    return recipe


def _run(tmp_path, recipe: dict, *extra, name="run"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / name
    return run_pretrain.main(["--recipe", str(path), "--output_dir", str(out), "--no_progress", *extra]), out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path, atol=1e-6):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=0, msg=f"{key} differs")


def test_demo_recipe_end_to_end_at_its_smallest(tmp_path, minilm_path):
    from transformers import AutoModelForPreTraining, AutoProcessor

    import modeling_imagebert  # noqa: F401  (registers the Auto classes)

    out = tmp_path / "demo"
    results = run_pretrain.main(
        [
            "--output_dir", str(out), "--no_progress", "--max_steps", "6", "--batch_size", "4",
            "--set", "model.overrides.num_hidden_layers=1",
            "--set", "stages.0.datasets.0.toy_world.num_images=16",
            "--set", "stages.1.datasets.0.toy_world.num_images=16",
            "--set", "evaluation.dataset.toy_world.num_test_images=6",
            "--set", "training.num_threads=1",
        ]
    )  # fmt: skip
    assert [s["stage"] for s in results["stages"]] == [1, 2]
    # Stage 1 aligns the modalities without ITM (masked tasks + ITC); stage 2 adds ITM, whose batches are drawn per
    # step from the seed (itm_mode: separate): with seed 42 the six steps of stage 2 include ITM batches.
    assert set(results["stages"][0]["final_losses"]) == {"mlm", "moc", "mrfr", "itc"}
    trained = {task for stage in results["stages"] for task in stage["final_losses"]}
    assert trained == {"mlm", "moc", "mrfr", "itm", "itc"}
    assert all(torch.isfinite(torch.tensor(v)) for v in results["final_losses"].values())
    assert {"image_retrieval/R@1", "text_retrieval/R@1", "image_retrieval/R@10"} <= set(
        results["zero_shot_retrieval"]
    )
    # The demo ranks by ITM + ITC (evaluation.final_score) and reports ITM alone, the paper's score, beside it.
    assert results["zero_shot_final_score"] == "itm+itc"
    assert set(results["zero_shot_retrieval_itm"]) == set(results["zero_shot_retrieval"])
    # The two-stage table: the ITC top-K per query re-ranked, with full ranking by the same score beside it.
    two_stage = results["zero_shot_two_stage"]
    assert two_stage["k"] == 4 and two_stage["final_score"] == "itm+itc"
    assert two_stage["metrics"]["full"] == results["zero_shot_retrieval"]
    assert 0 < two_stage["passes"]["cross_encoder"] < two_stage["passes"]["full"] == 6 * 30
    model = AutoModelForPreTraining.from_pretrained(out / "final")
    processor = AutoProcessor.from_pretrained(out / "final")
    assert type(model).__name__ == "ImageBertForPreTraining" and model.config.num_hidden_layers == 1
    assert processor.max_regions == model.config.max_regions
    assert "## Pre-training" in (out / "final" / "README.md").read_text()
    assert (out / "stage-1-final" / "config.json").is_file()


def test_stage_two_starts_from_stage_one_final_weights(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path, steps=2)
    recipe["stages"][1].update(max_steps=1, learning_rate=1e-12, weight_decay=0.0, warmup_steps=0)
    _, out = _run(tmp_path, recipe)
    stage1, final = _weights(out / "stage-1-final"), _weights(out / "stage-2-final")
    # An lr of 1e-12 leaves the weights where stage 2 started: stage 1's final weights.
    _assert_same_weights(out / "stage-1-final", out / "stage-2-final", atol=1e-7)
    # ... which are not a fresh initialisation (stage 1 trained them).
    recipe["stages"] = recipe["stages"][:1]
    recipe["stages"][0]["learning_rate"] = 1e-12
    _, untrained = _run(tmp_path, recipe, name="untrained")
    key = "imagebert.embeddings.region_feature_projection.weight"
    assert not torch.allclose(_weights(untrained / "stage-1-final")[key], stage1[key])
    assert torch.allclose(final[key], stage1[key])


def test_stopped_and_resumed_run_ends_with_the_weights_of_a_straight_run(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path, steps=3)
    _, straight = _run(tmp_path, recipe, name="straight")
    # Stop inside stage 1, then inside stage 2, then finish: three runs of one output folder.
    first, parts = _run(tmp_path, recipe, "--max_steps_this_run", "2", name="parts")
    assert first["exit_code"] == 0 and "max_steps_this_run" in first["stopped"]
    assert (parts / "checkpoint-1-2" / "trainer_state.json").is_file()
    second, _ = _run(
        tmp_path, recipe, "--max_steps_this_run", "2", "--resume_from_checkpoint", "latest", name="parts"
    )
    assert (parts / "checkpoint-2-1").is_dir() and "stopped" in second
    # Without that checkpoint, stage 2 restarts from stage 1's final weights, and its data order is a function of
    # the step: the end is the same. The loss history comes back from the checkpoint of the first stop, then from
    # loss_history.json.
    shutil.rmtree(parts / "checkpoint-2-1")
    resumed, _ = _run(tmp_path, recipe, "--resume_from_checkpoint", "latest", name="parts")
    _assert_same_weights(straight / "stage-1-final", parts / "stage-1-final")
    _assert_same_weights(straight / "final", parts / "final")
    straight_history = json.loads((straight / "pretrain_results.json").read_text())["loss_history"]
    key = [(r["stage"], r["step"], r["global_step"], r["task"]) for r in straight_history]
    assert [(r["stage"], r["step"], r["global_step"], r["task"]) for r in resumed["loss_history"]] == key
    assert [r["loss"] for r in resumed["loss_history"]] == pytest.approx(
        [r["loss"] for r in straight_history]
    )


def test_sigterm_saves_a_checkpoint_then_exits_and_resume_finishes_identically(
    tmp_path, minilm_path, monkeypatch
):
    from modeling_imagebert.pretraining import schedule as training

    recipe = _tiny_recipe(minilm_path, stages=1, steps=4, gradient_accumulation_steps=2)
    _, straight = _run(tmp_path, recipe, name="straight")
    original = training.ScheduledBatches.__getitem__
    calls = {"n": 0}

    def signalling_getitem(self, j):
        calls["n"] += 1
        if calls["n"] == 3:  # during the second optimiser step (2 micro-batches per step)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, j)

    monkeypatch.setattr(training.ScheduledBatches, "__getitem__", signalling_getitem)
    stopped, out = _run(tmp_path, recipe, "--save_total_limit", "1", name="killed")
    monkeypatch.setattr(training.ScheduledBatches, "__getitem__", original)
    assert stopped["exit_code"] == 128 + signal.SIGTERM
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1-2"]
    assert not list(out.glob(".tmp-*"))
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
    _run(tmp_path, recipe, "--resume_from_checkpoint", "latest", name="killed")
    _assert_same_weights(straight / "final", out / "final")


def test_unknown_field_fails_before_training_with_a_clear_message(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path)
    recipe["stages"][1]["learning_rte"] = 1e-4
    with pytest.raises(RecipeError, match=r"stages\[1\]\.learning_rte: unknown field of StageSpec"):
        _run(tmp_path, recipe)
    assert not (tmp_path / "run").exists()


def test_missing_dataset_fails_before_training_with_a_clear_message(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path)
    recipe["stages"][1]["datasets"] = [{"path": str(tmp_path / "data" / "cc")}]
    with pytest.raises(
        RecipeError, match=r"stages\[1\]\.datasets\[0\]\.path: no dataset folder at .*data/cc"
    ):
        _run(tmp_path, recipe)
    assert not (tmp_path / "run").exists()


def test_report_to_tensorboard_without_tensorboard_says_how_to_install(tmp_path, minilm_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name in ("tensorboard", "tensorboardX"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(SystemExit, match="pip install tensorboard"):
        _run(tmp_path, _tiny_recipe(minilm_path), "--report_to", "tensorboard")


def test_text_only_batches_mix_with_image_text_batches(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path, stages=1, steps=4)
    stage = recipe["stages"][0]
    text = {
        "toy_world": {**TOY, "variant": "curated", "num_images": 24, "seed": 5},
        "modality": "text",
        "weight": 1.0,
    }
    stage["datasets"].append(text)
    results, out = _run(tmp_path, recipe)
    assert {"mlm", "moc", "mrfr"} <= set(results["final_losses"])
    assert all(torch.isfinite(torch.tensor(v)) for v in results["final_losses"].values())
    assert (out / "final" / "model.safetensors").is_file()


def test_two_process_cpu_ddp_run_trains_and_saves(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path, stages=1, steps=2)
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
        str(SCRIPT), "--recipe", str(path), "--output_dir", str(out), "--no_progress", "--save_steps", "1",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=170, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checkpoint = out / "checkpoint-1-1"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert (out / "final" / "model.safetensors").is_file()


def test_stage_task_weights_reach_the_model_so_outputs_loss_is_the_stage_loss(
    tmp_path, minilm_path, monkeypatch
):
    from modeling_imagebert import ImageBertForPreTraining

    # A recorder around the model's forward: what the script trains on is what forward returns as `loss`.
    seen = []
    original = ImageBertForPreTraining.forward

    def recording_forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        seen.append(
            (outputs.loss.detach(), outputs.mlm_loss, outputs.itm_loss, outputs.moc_loss, outputs.mrfr_loss)
        )
        return outputs

    monkeypatch.setattr(ImageBertForPreTraining, "forward", recording_forward)
    recipe = _tiny_recipe(minilm_path, stages=1, steps=2, tasks={"mlm": 2.0, "itm": 0.5}, itm_mode="joint")
    _, out = _run(tmp_path, recipe, "--no_eval")
    assert len(seen) == 2
    for loss, mlm, itm, moc, mrfr in seen:
        assert moc is None and mrfr is None  # disabled tasks: their labels never reach the model
        torch.testing.assert_close(loss, 2.0 * mlm.detach() + 0.5 * itm.detach(), rtol=0, atol=1e-6)
    config = json.loads((out / "final" / "config.json").read_text())
    assert (config["mlm_loss_weight"], config["itm_loss_weight"]) == (2.0, 0.5)
    assert (config["moc_loss_weight"], config["mrfr_loss_weight"]) == (0.0, 0.0)


def test_run_records_the_loss_history_and_embeds_its_curves_in_the_model_card(tmp_path, minilm_path):
    recipe = _tiny_recipe(minilm_path, stages=2, steps=3)
    recipe["training"]["logging_steps"] = 2
    results, out = _run(tmp_path, recipe, "--no_eval")
    history = json.loads((out / "pretrain_results.json").read_text())["loss_history"]
    assert history == results["loss_history"]
    # Logged at step 2 and at each stage's last step (3); stage 2 continues the global step count.
    assert sorted({(r["stage"], r["step"], r["global_step"]) for r in history}) == [
        (1, 2, 2), (1, 3, 3), (2, 2, 5), (2, 3, 6),
    ]  # fmt: skip
    last = {r["task"]: r["loss"] for r in history if (r["stage"], r["step"]) == (2, 3)}
    assert last == pytest.approx(results["final_losses"])
    png = (out / "loss_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and (out / "final" / "loss_curves.png").read_bytes() == png
    assert "![per-task loss curves](loss_curves.png)" in (out / "final" / "README.md").read_text()


def test_an_itc_task_in_a_stage_trains_the_contrastive_loss_beside_the_paper_tasks(
    tmp_path, minilm_path, monkeypatch
):
    from modeling_imagebert import ImageBertForPreTraining

    seen = []
    original = ImageBertForPreTraining.forward

    def recording_forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        seen.append((outputs.loss.detach(), outputs.itm_loss, outputs.itc_loss))
        return outputs

    monkeypatch.setattr(ImageBertForPreTraining, "forward", recording_forward)
    recipe = _tiny_recipe(minilm_path, stages=1, steps=2, tasks={"itm": 1.0, "itc": 0.5}, itm_mode="joint")
    _, out = _run(tmp_path, recipe, "--no_eval")
    assert len(seen) == 2
    for loss, itm, itc in seen:
        assert itc is not None and bool(torch.isfinite(itc))
        torch.testing.assert_close(loss, itm.detach() + 0.5 * itc.detach(), rtol=0, atol=1e-6)
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["itc_loss_weight"] == 0.5


def test_sigkill_at_a_random_moment_then_resume_equals_a_straight_run(tmp_path, minilm_path):
    """SIGKILL (no handler runs) at a random moment of training, then `--resume_from_checkpoint latest`: the run ends
    with the straight run's weights and leaves no temporary folder behind. IMAGEBERT_KILL_SEED replays a moment."""
    import random
    import time

    seed = int(os.environ.get("IMAGEBERT_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    recipe = _tiny_recipe(minilm_path, steps=6)
    recipe["training"]["save_steps"] = 1
    _, straight = _run(tmp_path, recipe, name="straight")

    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "killed"
    argv = [sys.executable, str(SCRIPT), "--recipe", str(path), "--output_dir", str(out), "--no_progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    # Training starts right after recipe.json is written; the tiny run trains and saves for about 1-3 s after that.
    code, stderr = kill_at_random_moment(
        argv, started=(out / "recipe.json").exists, seconds=3.0, rng=rng, env=env, cwd=ROOT, timeout=120
    )
    assert code in (-signal.SIGKILL, 0), (seed, stderr[-2000:])

    run_pretrain.main(
        [
            "--recipe",
            str(path),
            "--output_dir",
            str(out),
            "--no_progress",
            "--resume_from_checkpoint",
            "latest",
        ]
    )
    _assert_same_weights(straight / "final", out / "final")
    assert not [p.name for p in out.iterdir() if p.name.startswith(".tmp")], seed
