"""Pre-training fails fast and loudly: a non-finite loss stops the run with one line naming stage, step and task and
never saves its weights; every stage's data is checked before stage 1 trains (cached by dataset fingerprint); the
script's errors are one line with exit status 2. Runs are driven in-process, as tests/test_pretrain.py does."""

import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sync_counter import SyncCounter

from modeling_imagebert.cli import run_cli
from modeling_imagebert.pretraining import stage_checks
from modeling_imagebert.pretraining.checkpoints import StopRequests
from modeling_imagebert.pretraining.nonfinite import NonFiniteTrainingError, NonFiniteWatch, gradient_norm
from modeling_imagebert.pretraining.recipes import RecipeError

ROOT = Path(__file__).resolve().parent.parent
TOY = {"world_seed": 0, "feature_dim": 16, "num_classes": 6, "num_attributes": 2}


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "run_pretrain_failures", ROOT / "examples" / "run_pretrain.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_pretrain = _load_script()


@pytest.fixture(autouse=True)
def _validation_cache(tmp_path, monkeypatch):
    """Each test gets its own validation cache (never the user's datasets cache)."""
    monkeypatch.setenv(stage_checks.CACHE_ENV, str(tmp_path / "validated"))


def _recipe(minilm_path, *, stages=2, steps=3, **stage_fields) -> dict:
    """A tiny model (hidden 32) on toy worlds of 16 images per stage, no evaluation."""
    recipe = {
        "name": "tiny",
        "model": {
            "config": str(ROOT / "configuration" / "models" / "imagebert-tiny.json"),
            "tokenizer": minilm_path,
            "overrides": {
                "visual_feature_dim": 16, "num_object_classes": 7, "max_regions": 8, "max_text_length": 16,
                "num_hidden_layers": 1,
            },
        },
        "training": {"save_steps": 0, "logging_steps": 1, "num_threads": 1},
        "stages": [],
    }  # fmt: skip
    for s in range(stages):
        stage = {
            "name": f"s{s + 1}",
            "init": "config" if s == 0 else "previous",
            "datasets": [{"toy_world": {**TOY, "variant": "curated", "num_images": 16, "seed": s}}],
            "max_steps": steps,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "warmup_steps": 0,
        }
        stage.update(stage_fields)
        recipe["stages"].append(stage)
    return recipe


def _argv(tmp_path, recipe: dict, *extra, name="run") -> list[str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return ["--recipe", str(path), "--output_dir", str(tmp_path / name), "--no_progress", "--no_eval", *extra]


def _cli(argv, capsys) -> tuple[int, list[str]]:
    """Runs the script's command line in-process: (exit status, the `error:` lines on stderr)."""
    capsys.readouterr()
    try:
        code = run_cli(run_pretrain.cli_main, argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")]


def _toy_dataset(**toy):
    from modeling_imagebert.data.toy_world import make_toy_world

    return make_toy_world(**{**TOY, "variant": "curated", "num_images": 16, "seed": 7, **toy})


def _saved(tmp_path, name: str, change=None, **toy) -> Path:
    """A toy corpus saved as a dataset folder, with `change(rows)` applied (unvalidated, as a foreign tool might)."""
    import datasets

    from modeling_imagebert.data.storage import save_dataset

    dataset = _toy_dataset(**toy)
    if change is not None:
        rows = dataset.to_list()
        change(rows)
        dataset = datasets.Dataset.from_list(rows, features=dataset.features)
    return save_dataset(dataset, tmp_path / name, validate=False)


def _assert_nothing_non_finite(folder: Path) -> None:
    from safetensors.torch import load_file

    def refuse(constant):
        raise AssertionError(f"non-finite {constant} in a JSON file")

    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            for key, tensor in load_file(str(path)).items():
                assert bool(torch.isfinite(tensor).all()), f"{path}: {key} is not finite"
        elif path.suffix == ".json":
            json.loads(path.read_text(), parse_constant=refuse)


# ---------------------------------------------------------------------------------------------------------------
# Non-finite training
# ---------------------------------------------------------------------------------------------------------------


def test_a_nan_task_loss_stops_the_run_naming_stage_step_and_task_and_keeps_the_last_good_checkpoint(
    tmp_path, minilm_path, monkeypatch, capsys
):
    from modeling_imagebert import ImageBertForPreTraining

    original = ImageBertForPreTraining.forward
    calls = {"n": 0}

    def nan_moc_at_step_three(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 3 and outputs.moc_loss is not None:
            outputs.moc_loss = outputs.moc_loss * float("nan")
            outputs.loss = outputs.loss + outputs.moc_loss
        return outputs

    monkeypatch.setattr(ImageBertForPreTraining, "forward", nan_moc_at_step_three)
    recipe = _recipe(minilm_path, steps=5, itm_mode="joint")
    # Logging every 4 steps: the flag is still read before the checkpoints of steps 2 and 4.
    recipe["training"].update(save_steps=2, logging_steps=4)
    code, errors = _cli(_argv(tmp_path, recipe), capsys)
    out = tmp_path / "run"
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: stage 1 (s1) step 3: non-finite moc loss (nan) ; lower stages[0].")
    assert f"resume from the last good checkpoint {out / 'checkpoint-1-2'}" in errors[0]
    # The checkpoint due at step 4 (after the bad step) is never written, nor any final folder.
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-1-2"]
    _assert_nothing_non_finite(out)
    # The last good checkpoint is intact: the run resumes from it and finishes.
    monkeypatch.setattr(ImageBertForPreTraining, "forward", original)
    code, errors = _cli(_argv(tmp_path, recipe, "--resume_from_checkpoint", "latest"), capsys)
    assert code == 0 and errors == [] and (out / "final" / "model.safetensors").is_file()
    _assert_nothing_non_finite(out)


def test_an_exploding_learning_rate_stops_with_one_line_and_writes_no_final_model(
    tmp_path, minilm_path, capsys
):
    recipe = _recipe(minilm_path, stages=1, steps=6)
    recipe["training"].update(save_steps=1, logging_steps=10)
    code, errors = _cli(_argv(tmp_path, recipe, "--set", "stages.0.learning_rate=1e30"), capsys)
    out = tmp_path / "run"
    assert code == 2 and len(errors) == 1, errors
    assert errors[0].startswith("error: stage 1 (s1) step ")
    assert "non-finite" in errors[0] and "learning_rate (now 1e+30)" in errors[0]
    step = int(errors[0].split(" step ")[1].split(":")[0])
    assert 1 < step <= 6  # the first step's weights are fine; bad ones follow
    kept = sorted(p.name for p in out.glob("checkpoint-*"))
    assert kept == [f"checkpoint-1-{s}" for s in range(1, step)]
    assert not (out / "final").exists() and not (out / "stage-1-final").exists()
    assert not (out / "pretrain_results.json").exists()
    _assert_nothing_non_finite(out)


def test_folding_the_non_finite_flag_into_a_step_never_synchronises():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).mean().backward()
    watch = NonFiniteWatch(["mlm", "itm"], "cpu")

    class Outputs:
        loss = torch.tensor(2.0)
        mlm_loss = torch.tensor(1.0)
        itm_loss = None  # a batch without ITM

    class OneProcess:
        num_processes = 1

    stops = StopRequests(OneProcess())
    with SyncCounter() as counter:
        norm = gradient_norm(model.parameters())
        clipped = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        watch.add(1, Outputs(), norm)
        watch.add(2, Outputs(), clipped)
        flag = watch.flag
        assert stops.check(sync_point=False, nonfinite=flag) is None  # between sync points: not read
    assert counter.total == 0, dict(counter.counts)
    with SyncCounter() as counter:
        assert stops.check(sync_point=True, nonfinite=flag) is None
    assert counter.total == 1  # read once, at the sync point
    assert not bool(flag) and watch.read() is None
    Outputs.itm_loss = torch.tensor(float("inf"))
    watch.add(3, Outputs(), torch.tensor(float("nan")))
    Outputs.mlm_loss = torch.tensor(float("nan"))
    watch.add(4, Outputs(), None)  # a later bad step does not replace the first
    assert bool(watch.flag) and watch.read() == (3, "itm loss", math.inf)


class _FakeAccelerator:
    """Two processes whose all-reduce adds this process's flags to a peer's."""

    num_processes = 2
    device = torch.device("cpu")

    def __init__(self, peer_flags):
        self.peer = torch.tensor(peer_flags)

    def reduce(self, tensor, reduction="sum"):
        return tensor + self.peer


def test_every_process_stops_when_any_process_saw_a_non_finite_value():
    finite = torch.tensor(False)
    stops = StopRequests(_FakeAccelerator([0, 1]))  # the peer saw a NaN
    assert stops.check(sync_point=False, nonfinite=finite) is None  # read only at sync points
    stop = stops.check(sync_point=True, nonfinite=finite)
    assert stop is not None and stop.nonfinite
    stops = StopRequests(_FakeAccelerator([0, 0]), max_steps_this_run=2)
    assert stops.check(sync_point=False, nonfinite=finite) is None
    # The step budget ends at the same step everywhere: the flag is agreed on there, before the stop checkpoint.
    assert stops.check(sync_point=False, nonfinite=torch.tensor(True)).nonfinite
    stops = StopRequests(_FakeAccelerator([1, 0]))
    stop = stops.check(sync_point=True, nonfinite=finite)
    assert stop is not None and not stop.nonfinite and stop.code == 128 + 15


def test_the_non_finite_error_is_a_floating_point_error_run_cli_prints():
    error = NonFiniteWatch(["mlm"], "cpu").error(
        stage=2, stage_name="cc", learning_rate=1e-4, max_grad_norm=None, resume_hint="rerun"
    )
    assert isinstance(error, NonFiniteTrainingError) and isinstance(error, FloatingPointError)
    assert str(error).startswith("stage 2 (cc): another process saw a non-finite")
    assert "set stages[1].max_grad_norm (clipping is off)" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# Every stage's data, checked before stage 1 trains
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def count_forwards(monkeypatch):
    from modeling_imagebert import ImageBertForPreTraining

    calls = {"n": 0}
    original = ImageBertForPreTraining.forward

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageBertForPreTraining, "forward", counting)
    return calls


def test_a_nan_region_feature_in_stage_two_is_refused_before_stage_one_trains(
    tmp_path, minilm_path, count_forwards, capsys
):
    def nan_feature(rows):
        rows[5]["region_features"][2][3] = float("nan")

    data = _saved(tmp_path, "nan_data", nan_feature)
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["datasets"] = [{"path": str(data)}]
    code, errors = _cli(_argv(tmp_path, recipe), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"stages[1].datasets[0] ({data})" in errors[0]
    assert "record 5 (image_id='" in errors[0] and "field 'region_features'" in errors[0]
    assert "NaN or Inf" in errors[0]
    assert count_forwards["n"] == 0 and not list((tmp_path / "run").glob("*-final"))


def test_a_class_id_beyond_the_model_in_stage_two_is_refused_first_and_the_rerun_uses_the_cached_validation(
    tmp_path, minilm_path, count_forwards, monkeypatch, capsys
):
    def class_nine(rows):
        rows[3]["region_classes"][1] = 9

    data = _saved(tmp_path, "big_classes", class_nine)
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["datasets"] = [{"path": str(data)}]
    scans = {"n": 0}
    validate = stage_checks.validate_dataset

    def counting_validate(*args, **kwargs):
        scans["n"] += 1
        return validate(*args, **kwargs)

    monkeypatch.setattr(stage_checks, "validate_dataset", counting_validate)
    seconds = []
    for name in ("first", "second"):
        started = time.perf_counter()
        code, errors = _cli(_argv(tmp_path, recipe, name=name), capsys)
        seconds.append(time.perf_counter() - started)
        assert code == 2 and len(errors) == 1, errors
        assert errors[0].startswith(f"error: stages[1].datasets[0] ({data}): record 3 (image_id=")
        assert "field 'region_classes': found class id 9 in region 1" in errors[0]
        assert "num_object_classes=7" in errors[0] and "at least 10" in errors[0]
    # Stage 1 (the toy world, in memory) is validated on both runs; the saved dataset only on the first.
    assert scans["n"] == 3, scans
    assert count_forwards["n"] == 0
    print(f"run refused by the data check: first {seconds[0]:.2f} s, second (cached) {seconds[1]:.2f} s")


def test_a_dataset_edited_in_place_is_validated_again(tmp_path, monkeypatch):
    from modeling_imagebert.data.storage import load_dataset_from_disk

    data = _saved(tmp_path, "data")
    first = stage_checks.dataset_cache_key(load_dataset_from_disk(data))
    assert first == stage_checks.dataset_cache_key(load_dataset_from_disk(data))
    shard = next(data.glob("data-*.arrow"))
    shard.write_bytes(shard.read_bytes())  # same bytes, new modification time: the key is of the content
    assert stage_checks.dataset_cache_key(load_dataset_from_disk(data)) == first
    content = bytearray(shard.read_bytes())
    content[-100] ^= 1  # one bit of the data
    shard.write_bytes(bytes(content))
    assert stage_checks.dataset_cache_key(load_dataset_from_disk(data)) != first
    assert stage_checks.dataset_cache_key(_toy_dataset()) is None  # in memory: validated each time


def test_a_bad_evaluation_split_is_refused_before_training_not_after_it(
    tmp_path, minilm_path, count_forwards, capsys
):
    data = _saved(tmp_path, "test_split", lambda rows: rows[2].update(image_width=0))
    recipe = _recipe(minilm_path)
    recipe["evaluation"] = {"dataset": {"path": str(data)}, "batch_size": 8}
    argv = [a for a in _argv(tmp_path, recipe) if a != "--no_eval"]
    code, errors = _cli(argv, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"evaluation.dataset ({data}): record 2" in errors[0] and "field 'image_width'" in errors[0]
    assert count_forwards["n"] == 0


def test_an_itm_stage_whose_rows_share_one_image_id_is_refused_before_training(
    tmp_path, minilm_path, count_forwards, capsys
):
    def one_image(rows):
        for row in rows:
            row["image_id"] = "same"

    data = _saved(tmp_path, "one_image", one_image)
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["datasets"] = [{"path": str(data)}]
    code, errors = _cli(_argv(tmp_path, recipe), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"stages[1].datasets[0] ({data}): every one of its 16 rows has image_id 'same'" in errors[0]
    assert "no negative pair" in errors[0]
    assert count_forwards["n"] == 0
    # Without ITM the same data trains the masked tasks.
    recipe["stages"][1]["tasks"] = {"mlm": 1.0, "moc": 1.0, "mrfr": 1.0}
    recipe["stages"][1]["max_steps"] = 1
    recipe["stages"][0]["max_steps"] = 1
    code, errors = _cli(_argv(tmp_path, recipe, name="no_itm"), capsys)
    assert code == 0 and errors == []


def test_features_of_another_dimension_are_refused_naming_the_stage_and_dataset(
    tmp_path, minilm_path, capsys
):
    data = _saved(tmp_path, "dim8", feature_dim=8)
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["datasets"] = [{"path": str(data)}]
    code, errors = _cli(_argv(tmp_path, recipe), capsys)
    assert code == 2 and len(errors) == 1, errors
    assert f"stages[1].datasets[0] ({data}): region features have dimension 8" in errors[0]
    assert "visual_feature_dim=16" in errors[0]


def test_check_stage_data_returns_each_source_summary(tmp_path, minilm_path):
    from modeling_imagebert.pretraining.model_setup import build_model_and_processor
    from modeling_imagebert.pretraining.recipes import recipe_from_dict

    data = _saved(tmp_path, "good")
    raw = _recipe(minilm_path)
    raw["stages"][1]["datasets"].append({"path": str(data), "max_examples": 10})
    recipe = recipe_from_dict(raw)
    model, processor = build_model_and_processor(recipe)
    summaries = stage_checks.check_stage_data(recipe, processor, model.config, log=lambda line: None)
    assert list(summaries) == ["stages[0].datasets[0]", "stages[1].datasets[0]", "stages[1].datasets[1]"]
    saved = summaries["stages[1].datasets[1]"]
    dataset = _toy_dataset()
    classes = np.concatenate([np.asarray(c) for c in dataset["region_classes"][:10]])
    assert (saved.rows, saved.max_class_id, saved.num_image_ids) == (10, int(classes.max()), 10)
    assert not saved.cached
    again = stage_checks.check_stage_data(
        recipe, processor, model.config, first_stage=1, log=lambda line: None
    )
    assert list(again) == ["stages[1].datasets[0]", "stages[1].datasets[1]"]
    assert again["stages[1].datasets[1]"].cached and not again["stages[1].datasets[0]"].cached


# ---------------------------------------------------------------------------------------------------------------
# One line per error
# ---------------------------------------------------------------------------------------------------------------


def test_a_recipe_error_and_a_missing_dataset_print_one_line_and_exit_2(tmp_path, minilm_path, capsys):
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["learning_rte"] = 1e-4
    code, errors = _cli(_argv(tmp_path, recipe, name="typo"), capsys)
    assert code == 2 and len(errors) == 1
    assert "stages[1].learning_rte: unknown field of StageSpec" in errors[0]
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["datasets"] = [{"path": str(tmp_path / "data" / "cc")}]
    code, errors = _cli(_argv(tmp_path, recipe, name="missing"), capsys)
    assert code == 2 and len(errors) == 1
    assert "stages[1].datasets[0].path: no dataset folder at" in errors[0] and "data/cc" in errors[0]
    assert not (tmp_path / "missing").exists()
    code, errors = _cli(
        _argv(tmp_path, _recipe(minilm_path), "--set", "stages.1.gradient_accumulation_steps=2"), capsys
    )
    assert code == 2 and len(errors) == 1
    assert errors[0].startswith(
        "error: stages[1].gradient_accumulation_steps: 2 differs from stages[0]'s 1 ;"
    )
    with pytest.raises(RecipeError, match="no dataset folder"):  # main itself raises; --debug shows it
        run_pretrain.main(_argv(tmp_path, recipe, name="missing"))
    with pytest.raises(RecipeError):
        run_cli(run_pretrain.cli_main, [*_argv(tmp_path, recipe, name="missing"), "--debug"])


def test_other_processes_under_accelerate_launch_exit_2_without_printing(
    tmp_path, minilm_path, monkeypatch, capsys
):
    monkeypatch.setenv("RANK", "1")
    recipe = _recipe(minilm_path)
    recipe["stages"][1]["learning_rte"] = 1e-4
    code, errors = _cli(_argv(tmp_path, recipe), capsys)
    assert code == 2 and errors == []


def test_a_stop_keeps_its_exit_status_through_run_cli(tmp_path, minilm_path, capsys):
    recipe = _recipe(minilm_path, stages=1, steps=3)
    code, errors = _cli(_argv(tmp_path, recipe, "--max_steps_this_run", "1"), capsys)
    assert code == 0 and errors == []
    assert (tmp_path / "run" / "checkpoint-1-1").is_dir() and not (tmp_path / "run" / "final").exists()


def test_the_script_run_as_a_command_prints_one_line_for_a_missing_dataset(
    tmp_path, minilm_path, monkeypatch, capsys
):
    import runpy
    import sys

    recipe = _recipe(minilm_path)
    recipe["stages"][0]["datasets"] = [{"path": str(tmp_path / "gone")}]
    monkeypatch.setattr(sys, "argv", ["run_pretrain.py", *_argv(tmp_path, recipe)])
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(ROOT / "examples" / "run_pretrain.py"), run_name="__main__")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exited.value.code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and "stages[0].datasets[0].path" in lines[0]


@pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")
def test_two_processes_stop_together_on_a_non_finite_loss_and_print_one_line(tmp_path, minilm_path):
    import subprocess
    import sys

    recipe = _recipe(minilm_path, stages=1, steps=6)
    recipe["training"].update(save_steps=1, logging_steps=10)
    argv = _argv(tmp_path, recipe, "--set", "stages.0.learning_rate=1e30")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29547",
        str(ROOT / "examples" / "run_pretrain.py"), *argv,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(errors) == 1, done.stdout[-2000:] + done.stderr[-3000:]
    assert errors[0].startswith("error: stage 1 (s1) step ") and "non-finite" in errors[0]
    out = tmp_path / "run"
    assert not (out / "final").exists() and not (out / "stage-1-final").exists()
    _assert_nothing_non_finite(out)


def test_the_resume_hint_names_the_newest_complete_checkpoint_or_stage_start(tmp_path):
    from modeling_imagebert.atomic import write_marker
    from modeling_imagebert.pretraining.checkpoints import write_manifest
    from modeling_imagebert.pretraining.nonfinite import resume_hint

    assert resume_hint(tmp_path).startswith("no checkpoint was saved before it")
    (tmp_path / "stage-1-final").mkdir()
    (tmp_path / "stage-1-final" / "config.json").write_text("{}")
    write_manifest(tmp_path / "stage-1-final")
    assert f"the start of stage 2 ({tmp_path / 'stage-1-final'})" in resume_hint(tmp_path)
    for step in (1, 3):  # complete checkpoints, as save_checkpoint leaves them (state, marker, manifest)
        folder = tmp_path / f"checkpoint-2-{step}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text(json.dumps({"stage": 2, "step": step, "run_id": "run"}))
        write_marker(folder, "test", run_id="run")
        write_manifest(folder)
    (tmp_path / "checkpoint-2-5").mkdir()  # incomplete: no state file
    assert f"the last good checkpoint {tmp_path / 'checkpoint-2-3'} with" in resume_hint(tmp_path)
