"""Pre-training never loses a run: run ids, refused output folders, overwrite of our own folders only, verified
checkpoints and resume checks, driven in-process through examples/run_pretrain.py's `main(argv)` on the demo
recipe with a tiny model (the tiny config, the MiniLM tokenizer, 16 toy images per stage, 3 + 2 steps)."""

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_imagebert.atomic import read_marker
from modeling_imagebert.pretraining.checkpoints import (
    CheckpointError,
    find_resume_point,
    list_checkpoints,
    manifest_problems,
    rotate_checkpoints,
    run_id_of,
)
from modeling_imagebert.pretraining.recipe_diff import recipe_differences

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "run_pretrain.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("run_pretrain_safety", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_pretrain = _load_script()


def _demo_argv(minilm_path: str, out: Path, *extra: str) -> list[str]:
    """The demo recipe at its smallest: a checkpoint every step, none rotated away, no zero-shot check."""
    return [
        "--output_dir", str(out), "--no_progress", "--no_eval", "--batch_size", "4", "--num_threads", "1",
        "--save_steps", "1", "--set", "training.save_total_limit=null",
        "--set", f"model.config={ROOT / 'configuration' / 'models' / 'imagebert-tiny.json'}",
        "--set", "model.bert_checkpoint=null", "--set", f"model.tokenizer={minilm_path}",
        "--set", "stages.0.init=config",
        "--set", "stages.0.datasets.0.toy_world.num_images=16",
        "--set", "stages.1.datasets.0.toy_world.num_images=16",
        "--set", "stages.0.max_steps=3", "--set", "stages.1.max_steps=2",
        *extra,
    ]  # fmt: skip


def _refusal(argv: list[str]) -> str:
    """Runs main(argv), which must refuse; returns its one-line message (a SystemExit("error: ...") today, the
    project error itself once run_cli prints it)."""
    with pytest.raises((SystemExit, FileExistsError, ValueError)) as caught:
        run_pretrain.main(argv)
    message = str(caught.value.code if isinstance(caught.value, SystemExit) else caught.value)
    assert len(message.splitlines()) == 1, message
    return message


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file below `folder`: (size, mtime in ns, sha256)."""
    return {
        path.relative_to(folder).as_posix(): (
            path.stat().st_size,
            path.stat().st_mtime_ns,
            hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-6, rtol=0, msg=f"{key} differs")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, minilm_path):
    """A straight run, and the same run stopped after 2 steps (checkpoints 1-1 and 1-2)."""
    base = tmp_path_factory.mktemp("runs")
    run_pretrain.main(_demo_argv(minilm_path, base / "straight"))
    stopped = run_pretrain.main(_demo_argv(minilm_path, base / "stopped", "--max_steps_this_run", "2"))
    assert stopped["exit_code"] == 0
    return base


def _copy(runs: Path, name: str, to: Path) -> Path:
    return Path(shutil.copytree(runs / name, to / name))


def test_running_the_demo_recipe_twice_into_one_folder_is_refused_and_changes_nothing(
    runs, tmp_path, minilm_path
):
    out = _copy(runs, "straight", tmp_path)
    before = _snapshot(out)
    message = _refusal(_demo_argv(minilm_path, out))
    assert str(out) in message and "holds the run" in message and "checkpoint-1-1" in message
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint latest" in message
    assert _snapshot(out) == before


def test_every_folder_of_a_run_carries_its_run_id(runs):
    out = runs / "straight"
    run_id = read_marker(out)["run_id"]
    assert read_marker(out)["written_by"] == "run_pretrain"
    for folder in [*out.glob("checkpoint-*"), *out.glob("stage-*-final"), out / "final"]:
        assert read_marker(folder)["run_id"] == run_id, folder
        assert manifest_problems(folder) == [], folder
    for path in out.glob("checkpoint-*"):
        assert json.loads((path / "trainer_state.json").read_text())["run_id"] == run_id
    assert run_id != read_marker(runs / "stopped")["run_id"]


def test_resume_beside_an_older_runs_later_checkpoints_ends_with_the_straight_weights(
    runs, tmp_path, minilm_path, capsys
):
    # An older run (another seed) whose stage-1 checkpoints 1-3 and 1-4 sort after the stopped run's 1-1 and 1-2.
    older = tmp_path / "older"
    run_pretrain.main(
        _demo_argv(
            minilm_path, older, "--seed", "7", "--set", "stages.0.max_steps=5", "--max_steps_this_run", "4"
        )
    )
    out = _copy(runs, "stopped", tmp_path)
    for name in ("checkpoint-1-3", "checkpoint-1-4"):
        shutil.copytree(older / name, out / name)
    theirs = {name: _snapshot(out / name) for name in ("checkpoint-1-3", "checkpoint-1-4")}
    capsys.readouterr()
    run_pretrain.main(
        _demo_argv(minilm_path, out, "--resume_from_checkpoint", "latest", "--save_total_limit", "1")
    )
    printed = capsys.readouterr().out
    assert "resumed stage 1 at step 2" in printed
    assert "checkpoint-1-3 (run " in printed and "never resumed" in printed  # warned once, by name
    _assert_same_weights(runs / "straight" / "final", out / "final")
    assert {name: _snapshot(out / name) for name in theirs} == theirs  # rotation left the older run alone
    ours = read_marker(out)["run_id"]
    assert [p.name for _, _, p in list_checkpoints(out, ours)] == ["checkpoint-2-1"]


def test_overwrite_output_dir_refuses_what_run_pretrain_did_not_write_and_deletes_nothing(
    tmp_path, minilm_path, monkeypatch
):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    assert "marker" in _refusal(_demo_argv(minilm_path, theirs, "--overwrite_output_dir"))
    # Without the flag, a non-empty folder that is not ours is refused too, before anything is written.
    assert "not written by run_pretrain" in _refusal(_demo_argv(minilm_path, theirs))
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]

    # A converted dataset carries the package's marker, but it is no run_pretrain output folder.
    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    dataset = save_dataset(make_toy_world(variant="web", num_images=4, seed=1), tmp_path / "dataset")
    before = _snapshot(dataset)
    assert "not by run_pretrain" in _refusal(_demo_argv(minilm_path, dataset, "--overwrite_output_dir"))
    assert _snapshot(dataset) == before

    cwd = tmp_path / "work"
    cwd.mkdir()
    (cwd / "recipe-notes.md").write_text("mine")
    monkeypatch.chdir(cwd)
    assert "current folder" in _refusal(_demo_argv(minilm_path, Path("."), "--overwrite_output_dir"))
    assert sorted(p.name for p in cwd.iterdir()) == ["recipe-notes.md"]


def test_overwrite_output_dir_refuses_a_run_folder_holding_the_recipes_dataset_and_replaces_our_own(
    runs, tmp_path, minilm_path
):
    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    out = _copy(runs, "straight", tmp_path)
    old_run = read_marker(out)["run_id"]
    data = out / "data"
    toy = {"variant": "web", "num_images": 16, "seed": 1, "world_seed": 0, "num_classes": 12, "noise": 1.0}
    save_dataset(make_toy_world(**toy), data)
    before = _snapshot(out)
    uses_it = ["--set", "stages.0.datasets.0.toy_world=null", "--set", f"stages.0.datasets.0.path={data}"]
    message = _refusal(_demo_argv(minilm_path, out, "--overwrite_output_dir", *uses_it))
    assert "holds the input" in message and str(data) in message
    assert _snapshot(out) == before

    shutil.rmtree(data)
    run_pretrain.main(_demo_argv(minilm_path, out, "--overwrite_output_dir"))
    assert read_marker(out)["run_id"] != old_run
    assert {run_id_of(p) for p in out.glob("checkpoint-*")} == {read_marker(out)["run_id"]}
    _assert_same_weights(runs / "straight" / "final", out / "final")


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda c: (c / "lr_scheduler.pt").unlink(), "lr_scheduler.pt is missing"),
        (lambda c: _flip_byte(c / "model.safetensors"), "model.safetensors fails its sha256 checksum"),
        (lambda c: _truncate(c / "optimizer.bin"), "optimizer.bin has"),
        (lambda c: (c / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    ],
)
def test_a_damaged_checkpoint_is_named_and_refused_and_latest_falls_back_to_the_previous_one(
    runs, tmp_path, minilm_path, damage, named, caplog
):
    out = _copy(runs, "stopped", tmp_path)
    damage(out / "checkpoint-1-2")
    message = _refusal(_demo_argv(minilm_path, out, "--resume_from_checkpoint", str(out / "checkpoint-1-2")))
    assert "checkpoint-1-2" in message and named in message
    point = find_resume_point(out, "latest", run_id=read_marker(out)["run_id"])
    assert point.checkpoint == out / "checkpoint-1-1"
    assert any("checkpoint-1-2" in r.message and named in r.message for r in caplog.records)


def test_latest_skips_a_corrupt_checkpoint_and_the_run_ends_with_the_straight_weights(
    runs, tmp_path, minilm_path, capsys
):
    out = _copy(runs, "stopped", tmp_path)
    _flip_byte(out / "checkpoint-1-2" / "model.safetensors")
    run_pretrain.main(_demo_argv(minilm_path, out, "--resume_from_checkpoint", "latest"))
    assert "resumed stage 1 at step 1" in capsys.readouterr().out
    _assert_same_weights(runs / "straight" / "final", out / "final")
    assert manifest_problems(out / "checkpoint-1-2") == []  # replaced by the same run's new save


def test_resume_with_a_changed_learning_rate_is_refused_unless_forced(runs, tmp_path, minilm_path, capsys):
    out = _copy(runs, "stopped", tmp_path)
    recipe_before = _snapshot(out)["recipe.json"]
    message = _refusal(
        _demo_argv(minilm_path, out, "--resume_from_checkpoint", "latest", "--learning_rate", "0.001")
    )
    assert "stages.0.learning_rate: checkpoint 0.0002, now 0.001" in message
    assert "stages.1.learning_rate: checkpoint 0.0004, now 0.001" in message
    assert "--ignore_recipe_mismatch" in message and "save_steps" not in message
    assert _snapshot(out)["recipe.json"] == recipe_before  # rewritten only after the checks pass
    capsys.readouterr()
    argv = ["--resume_from_checkpoint", "latest", "--learning_rate", "0.001", "--ignore_recipe_mismatch"]
    run_pretrain.main(_demo_argv(minilm_path, out, *argv))
    assert "warning: --ignore_recipe_mismatch" in capsys.readouterr().out
    assert json.loads((out / "recipe.json").read_text())["stages"][0]["learning_rate"] == 0.001
    assert (out / "final" / "model.safetensors").is_file()


def test_latest_with_nothing_to_resume_starts_from_scratch_and_says_so_and_stale_temporaries_go(
    tmp_path, minilm_path, capsys, caplog
):
    from modeling_imagebert.atomic import _host_tag, write_marker

    # What a run killed during its first checkpoint save leaves: its marker, recipe.json and a temporary folder.
    out = tmp_path / "killed"
    out.mkdir()
    write_marker(out, "run_pretrain", run_id="killed-run")
    (out / "recipe.json").write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".tmp-checkpoint-1-2.new.{_host_tag()}.{dead.pid}.abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    argv = [
        "--resume_from_checkpoint",
        "latest",
        "--set",
        "stages.0.max_steps=1",
        "--set",
        "stages.1.max_steps=1",
    ]
    run_pretrain.main(_demo_argv(minilm_path, out, *argv))
    assert "no complete checkpoint of run killed-run" in capsys.readouterr().out
    assert not stale.exists()
    assert any("removed stale temporary" in r.message and stale.name in r.message for r in caplog.records)
    assert read_marker(out)["run_id"] == "killed-run" and (out / "final" / "config.json").is_file()
    # A folder with nothing in it: the same, under a new run id.
    run_pretrain.main(_demo_argv(minilm_path, tmp_path / "new", *argv))
    assert "starting from scratch" in capsys.readouterr().out
    assert read_marker(tmp_path / "new")["run_id"] not in (None, "killed-run")


def test_recipe_differences_name_each_field_and_ignore_how_the_run_is_stored():
    saved = {"training": {"seed": 42, "save_steps": 100, "output_dir": "a"}, "stages": [{"lr": 2e-4}]}
    current = {
        "training": {"seed": 43, "save_steps": 5, "output_dir": "b"},
        "stages": [{"lr": 2e-4}, {"lr": 1}],
    }
    assert recipe_differences(saved, current) == [
        "stages: checkpoint 1 entries, now 2",
        "training.seed: checkpoint 42, now 43",
    ]
    assert recipe_differences(saved, json.loads(json.dumps(saved))) == []
    # The AdamW kernel and the thread count change the weights only by float rounding: a resume may change them.
    kernel = {
        **saved,
        "training": {**saved["training"], "adamw_implementation": "for-loop", "num_threads": 1},
    }
    assert recipe_differences(saved, kernel) == []


def test_rotation_keeps_other_runs_and_later_checkpoints_of_an_earlier_attempt(tmp_path):
    from modeling_imagebert.atomic import write_marker
    from modeling_imagebert.pretraining.checkpoints import write_manifest

    def checkpoint(stage: int, step: int, run_id: str) -> Path:
        path = tmp_path / f"checkpoint-{stage}-{step}"
        path.mkdir()
        (path / "trainer_state.json").write_text(json.dumps({"stage": stage, "step": step, "run_id": run_id}))
        write_marker(path, "test", run_id=run_id)
        write_manifest(path)
        return path

    mine = [checkpoint(1, step, "mine") for step in (1, 2, 3)]
    later = checkpoint(1, 9, "mine")  # left by an earlier attempt of the run
    theirs = checkpoint(1, 5, "theirs")
    deleted = rotate_checkpoints(tmp_path, 1, "mine", newest=(1, 3))
    assert deleted == mine[:2]
    assert mine[2].is_dir() and later.is_dir() and theirs.is_dir()
    with pytest.raises(CheckpointError, match="trainer_state.json fails its sha256 checksum"):
        _flip_byte(mine[2] / "trainer_state.json")
        find_resume_point(tmp_path, str(mine[2]))


def test_a_model_folder_as_output_dir_or_another_runs_checkpoint_is_refused(runs, tmp_path, minilm_path):
    straight = runs / "straight"
    before = _snapshot(straight)
    assert "written by run_pretrain model" in _refusal(_demo_argv(minilm_path, straight / "final"))
    out = _copy(runs, "stopped", tmp_path)
    theirs = straight / "checkpoint-1-1"
    message = _refusal(_demo_argv(minilm_path, out, "--resume_from_checkpoint", str(theirs)))
    assert (
        f"{theirs}: belongs to run {run_id_of(theirs)}" in message and read_marker(out)["run_id"] in message
    )
    assert _snapshot(straight) == before


def test_an_output_dir_inside_a_dataset_the_recipe_reads_is_refused_before_anything_is_written(
    tmp_path, minilm_path
):
    """Issue 25: run_pretrain refused only overwriting an input; a new run into a folder inside its dataset wrote
    checkpoints into the dataset folder."""
    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    data = tmp_path / "data"
    toy = {"variant": "web", "num_images": 16, "seed": 1, "world_seed": 0, "num_classes": 12, "noise": 1.0}
    save_dataset(make_toy_world(**toy), data)
    before = _snapshot(data)
    uses_it = ["--set", "stages.0.datasets.0.toy_world=null", "--set", f"stages.0.datasets.0.path={data}"]
    message = _refusal(_demo_argv(minilm_path, data / "run", *uses_it))
    assert "is inside the input" in message and str(data) in message
    assert _snapshot(data) == before and not (data / "run").exists()
