"""The scripts agree with each other and with the docs: one toy-world default set, the same `latest`, defaults in
`--help`, local paths checked before the Hub, runnable printed hints, a model card that describes the saved model,
documented commands that parse to the demo's world, and a resumable evaluation cache that survives SIGKILL."""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from kill import kill_at_random_moment

from modeling_imagebert import (
    ImageBertConfig,
    ImageBertForPreTraining,
    ImageBertForRetrieval,
    ImageBertProcessor,
)
from modeling_imagebert.cli import run_cli
from modeling_imagebert.cli_arguments import looks_like_local_path, resolve_trainer_resume
from modeling_imagebert.data.toy_world import DEMO_TOY_TEST_SPLIT, DEMO_TOY_WORLD, make_toy_world
from modeling_imagebert.pretraining.model_card import architecture_section, build_model_card, count_parameters
from modeling_imagebert.pretraining.recipes import load_recipe
from modeling_imagebert.pretraining.run_outputs import next_steps_message, save_run_results

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configuration" / "pretraining" / "demo.yaml"
TINY = ROOT / "configuration" / "models" / "imagebert-tiny.json"
EXAMPLES = ("run_pretrain.py", "run_retrieval.py", "evaluate_retrieval.py")
WORLD_KEYS = tuple(DEMO_TOY_WORLD)
TOY_DEFAULTS = {name: p.default for name, p in inspect.signature(make_toy_world).parameters.items()}


def load_script(name: str):
    """An examples/ or tools/ script as a module (under a name of its own, so tests never share its globals)."""
    path = ROOT / ("tools" if name == "run_doc_commands.py" else "examples") / name
    spec = importlib.util.spec_from_file_location(f"agreement_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(name) for name in ("run_retrieval.py", "evaluate_retrieval.py")}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, minilm_path) -> Path:
    """A tiny pre-training checkpoint (2 layers, hidden 32) with its processor, as run_pretrain writes one."""
    from tiny_checkpoint import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), minilm_path)


def effective_world(toy: dict) -> dict:
    """The world arguments a recipe's `toy_world` entry gives make_toy_world (its defaults where left out)."""
    return {key: toy.get(key, TOY_DEFAULTS[key]) for key in WORLD_KEYS}


# --------------------------------------------------------------------------------------- one toy-world default set


def test_demo_recipe_repeats_the_shared_toy_world_defaults():
    recipe = yaml.safe_load(DEMO.read_text())
    worlds = [source["toy_world"] for stage in recipe["stages"] for source in stage["datasets"]]
    worlds.append(recipe["evaluation"]["dataset"]["toy_world"])
    for toy in worlds:
        assert effective_world(toy) == dict(DEMO_TOY_WORLD), toy
    test_split = recipe["evaluation"]["dataset"]["toy_world"]
    assert {key: test_split[key] for key in DEMO_TOY_TEST_SPLIT} == dict(DEMO_TOY_TEST_SPLIT)
    assert recipe["model"]["overrides"]["num_object_classes"] == DEMO_TOY_WORLD["num_classes"] + 1
    assert recipe["model"]["overrides"]["visual_feature_dim"] == DEMO_TOY_WORLD["feature_dim"]


def toy_settings_of(script: str, argv: list[str], scripts) -> dict:
    """The toy test world a script's command line selects, in make_toy_world's terms."""
    if script == "evaluate_retrieval.py":
        args = scripts[script].parse_args(argv)
        return {
            "world_seed": args.toy_world_seed,
            "noise": args.toy_noise,
            "num_attributes": args.toy_num_attributes,
            "seed": args.toy_seed,
            "num_test_images": args.toy_test_images,
        }
    args, _ = scripts[script].parse_args(argv)
    return {
        "world_seed": args.toy_world_seed,
        "noise": args.toy_noise,
        "num_attributes": args.toy_num_attributes,
        "seed": args.toy_seed,
        "num_test_images": args.toy_num_eval_images,
    }


def test_toy_defaults_of_both_retrieval_scripts_are_the_demo_world_and_test_split(scripts, tmp_path):
    expected = {key: DEMO_TOY_WORLD[key] for key in ("world_seed", "noise", "num_attributes")}
    expected.update(DEMO_TOY_TEST_SPLIT)
    evaluate = toy_settings_of("evaluate_retrieval.py", ["--model", "m", "--toy"], scripts)
    retrieval = toy_settings_of(
        "run_retrieval.py", ["--model_name_or_path", "m", "--toy", "--output_dir", str(tmp_path)], scripts
    )
    assert evaluate == expected and retrieval == expected


@pytest.mark.parametrize(
    "evaluation_world",
    [None, {"noise": 1.5, "seed": 7, "num_test_images": 40, "world_seed": 2, "num_attributes": 6}],
    ids=["demo", "changed-recipe"],
)
def test_printed_next_commands_select_the_recipes_test_world(evaluation_world, scripts):
    recipe = load_recipe(DEMO)
    toy = dict(recipe.evaluation.dataset.toy_world)
    if evaluation_world is not None:
        toy.update(evaluation_world)
        recipe.evaluation.dataset.toy_world = toy
    message = next_steps_message(recipe, Path("outputs/imagebert-demo/final"), 12.0)
    commands = [
        line.split("#")[0].split("next:")[-1].strip() for line in message.splitlines() if "examples/" in line
    ]
    assert len(commands) == 3
    wanted = {
        key: toy.get(key, TOY_DEFAULTS[key]) for key in ("world_seed", "noise", "num_attributes", "seed")
    }
    wanted["num_test_images"] = toy["num_test_images"]
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "python" and (ROOT / argv[1]).is_file(), command
        script = Path(argv[1]).name
        if script == "run_retrieval.py":
            argv += ["--output_dir", "unused"] if "--output_dir" not in argv else []
        assert toy_settings_of(script, argv[2:], scripts) == wanted, command


def test_evaluate_retrievals_toy_split_is_the_demos_zero_shot_split(scripts):
    from modeling_imagebert.pretraining.data_sources import load_source

    recipe = load_recipe(DEMO)
    config = ImageBertConfig.from_json_file(str(TINY))
    config.visual_feature_dim = recipe.model.overrides["visual_feature_dim"]
    config.num_object_classes = recipe.model.overrides["num_object_classes"]
    args = scripts["evaluate_retrieval.py"].parse_args(["--model", "m", "--toy"])
    ours = scripts["evaluate_retrieval.py"].load_split(args, config)
    demo = load_source(recipe.evaluation.dataset)
    assert ours["image_id"] == demo["image_id"] and ours["caption"] == demo["caption"]
    assert ours[:]["region_features"] == demo[:]["region_features"]


# --------------------------------------------------------------------------------------------- hints, modes, help


def test_printed_hints_run_the_scripts_with_python():
    message = next_steps_message(load_recipe(DEMO), Path("outputs/imagebert-demo/final"), 1.0)
    mentions = list(re.finditer(r"\S*examples/\w+\.py", message))
    assert len(mentions) == 3
    for mention in mentions:
        before = message[: mention.start()]
        assert before.endswith(("python ", "accelerate launch ")), message[max(0, mention.start() - 40) :]


def test_the_resume_hint_is_the_runs_own_command_with_latest():
    from modeling_imagebert.cli_arguments import pretrain_resume_command
    from modeling_imagebert.pretraining.nonfinite import resume_hint

    argv = ["--recipe", "my recipe.yaml", "--set", "stages.0.max_steps=3", "--overwrite_output_dir",
            "--output_dir=old", "--resume_from_checkpoint", "checkpoint-1-2", "--max_steps_this_run", "5"]  # fmt: skip
    command = pretrain_resume_command("outputs/run", argv)
    assert command == (
        "accelerate launch examples/run_pretrain.py --recipe 'my recipe.yaml' --set stages.0.max_steps=3 "
        "--max_steps_this_run 5 --resume_from_checkpoint latest --output_dir outputs/run"
    )
    assert shlex.split(command)[3:5] == ["--recipe", "my recipe.yaml"]
    assert resume_hint("nowhere", []).startswith("no checkpoint was saved")


def test_example_scripts_are_executable_with_a_python_shebang():
    paths = [ROOT / "examples" / name for name in EXAMPLES] + [ROOT / "tools" / "run_doc_commands.py"]
    for path in paths:
        assert path.read_text().splitlines()[0] == "#!/usr/bin/env python", path
        assert os.access(path, os.X_OK), f"{path} is not executable"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the committed modes cannot be read")
    listed = subprocess.run(
        ["git", "ls-files", "-s", *[str(p.relative_to(ROOT)) for p in paths]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert len(listed) == len(paths) and all(line.startswith("100755 ") for line in listed), listed


def help_text(capsys, parse, argv) -> str:
    with pytest.raises(SystemExit):
        parse(argv)
    return " ".join(capsys.readouterr().out.split())  # one line: argparse wraps "(default: 1.0)" anywhere


def test_help_of_every_script_shows_its_defaults(scripts, capsys):
    from modeling_imagebert.pretraining.arguments import build_argument_parser

    pretrain = help_text(capsys, build_argument_parser("demo", DEMO).parse_args, ["--help"])
    # argparse may break a long path after a hyphen ("/work/ci- clone/..."): compare it without whitespace
    assert f"(default:{DEMO})" in "".join(pretrain.split())
    assert "tracker: tensorboard, wandb, ..., all or none (default: none)" in pretrain
    assert "keeps the recipe's value when not given" in pretrain and "(default: None)" not in pretrain
    evaluate = help_text(capsys, scripts["evaluate_retrieval.py"].parse_args, ["--help"])
    assert f"--toy: region-feature noise (as pre-training) (default: {DEMO_TOY_WORLD['noise']})" in evaluate
    assert f"--toy: images in the test split (default: {DEMO_TOY_TEST_SPLIT['num_test_images']})" in evaluate
    assert "pairs per forward pass (default: 256)" in evaluate and "(default: None)" not in evaluate
    retrieval = help_text(capsys, scripts["run_retrieval.py"].parse_args, ["--help"])
    assert f"(keep the pre-training one) (default: {DEMO_TOY_WORLD['noise']})" in retrieval
    assert "(default: 5e-05)" in retrieval and "(default: binary)" in retrieval
    assert "'latest': the newest complete checkpoint-<step> in --output_dir" in retrieval
    assert "python examples/run_retrieval.py --toy" in retrieval  # the usage examples head the help


# ------------------------------------------------------------------------------------------------ local paths


def test_local_looking_paths_are_told_from_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for value in ("./final", "/no/such", "~/model", "outputs/imagebert-demo/final", "bad name!", "a\\b"):
        assert looks_like_local_path(value), value
    for value in ("bert-base-uncased", "google-bert/bert-base-uncased", "outputs/final"):
        assert not looks_like_local_path(value), value
    (tmp_path / "outputs").mkdir()
    assert looks_like_local_path("outputs/final")  # its first component exists here: a folder, not a Hub id


@pytest.mark.parametrize("script", ["run_retrieval.py", "evaluate_retrieval.py"])
@pytest.mark.parametrize("path", ["outputs/imagebert-demo/fnal", "./final", "outputs/typo"])
def test_a_missing_local_model_folder_is_one_line_without_asking_the_hub(
    script, path, scripts, tmp_path, monkeypatch, capsys
):
    import huggingface_hub
    import transformers.utils.hub

    def no_hub(*args, **kwargs):
        raise AssertionError("the Hub was asked about a local path")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for module, name in ((huggingface_hub, "hf_hub_download"), (transformers.utils.hub, "cached_files")):
        monkeypatch.setattr(module, name, no_hub)
    for cls in (ImageBertForPreTraining, ImageBertForRetrieval, ImageBertProcessor):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(no_hub))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    argv = ["--model_name_or_path", path, "--toy"]
    argv += ["--output_dir", str(tmp_path / "out")] if script == "run_retrieval.py" else []
    started = time.perf_counter()
    code = run_cli(scripts[script].main, argv)
    elapsed = time.perf_counter() - started
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"error: --model_name_or_path {path}: no such folder (a local path, so the Hub was"
    )
    assert elapsed < 2.0


# ------------------------------------------------------------------------------------------------ `latest`


def make_trainer_checkpoint(folder: Path, step: int, complete: bool = True) -> Path:
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return path


def test_latest_starts_from_scratch_without_checkpoints_and_resumes_the_newest_complete_one(tmp_path):
    assert resolve_trainer_resume("latest", tmp_path / "nothing-yet") == (
        None,
        f"no checkpoint in {tmp_path / 'nothing-yet'}; starting from scratch",
    )
    make_trainer_checkpoint(tmp_path, 5)
    newest = make_trainer_checkpoint(tmp_path, 10)
    make_trainer_checkpoint(tmp_path, 20, complete=False)  # cut short while saving
    (tmp_path / "checkpoint-30").write_text("a file, not a checkpoint")
    assert resolve_trainer_resume("latest", tmp_path) == (str(newest), f"resuming from {newest}")
    assert resolve_trainer_resume(None, tmp_path) == (None, None)
    with pytest.raises(
        FileNotFoundError, match=r"--resume_from_checkpoint .*missing: no such checkpoint folder"
    ):
        resolve_trainer_resume(str(tmp_path / "missing"), tmp_path)


def test_run_retrieval_latest_starts_then_resumes_and_a_missing_checkpoint_is_one_line(
    scripts, tiny_checkpoint, tmp_path, caplog, capsys
):
    output = tmp_path / "out"
    argv = [
        "--model_name_or_path", str(tiny_checkpoint), "--toy", "--toy_num_images", "8", "--toy_num_eval_images", "4",
        "--eval_num_candidates", "2", "--output_dir", str(output), "--do_train", "--save_steps", "1", "--per_device_train_batch_size", "4",
        "--num_candidates", "2", "--report_to", "none", "--disable_tqdm", "true", "--resume_from_checkpoint", "latest",
    ]  # fmt: skip
    main = scripts["run_retrieval.py"].main
    with caplog.at_level(logging.INFO, logger="run_retrieval"):
        main([*argv, "--max_steps", "1"])
        assert f"no checkpoint in {output}; starting from scratch" in caplog.text
        caplog.clear()
        main([*argv, "--max_steps", "2"])
        assert f"resuming from {output / 'checkpoint-1'}" in caplog.text
    assert json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    capsys.readouterr()
    missing = argv[:-1] + [str(tmp_path / "nowhere")]
    assert run_cli(main, missing) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "--resume_from_checkpoint" in err[0] and "no such checkpoint folder" in err[0]


# ------------------------------------------------------------------------------------------------ the model card


def card_table(card: str) -> dict[str, str]:
    section = card.split("## This checkpoint", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", section, flags=re.MULTILINE))


def test_the_final_models_card_states_the_architecture_it_ships_with(tmp_path):
    torch.manual_seed(0)
    model = ImageBertForPreTraining(ImageBertConfig.from_json_file(str(TINY)))
    recipe = load_recipe(DEMO)
    recipe.training.output_dir = str(tmp_path)
    base = (ROOT / "MODEL_CARD.md").read_text()
    final = save_run_results(model, None, recipe, {"final_losses": {"itm": 0.5}}, tmp_path, base)
    card = (final / "README.md").read_text()
    saved = json.loads((final / "config.json").read_text())
    table = card_table(card)
    assert table["layers"] == str(saved["num_hidden_layers"]) == "2"
    assert table["hidden size"] == str(saved["hidden_size"]) and table["attention heads"] == "4"
    assert table["regions"] == str(saved["max_regions"]) and table["region feature dim"] == "64"
    assert table["object classes (MOC)"] == str(saved["num_object_classes"])
    reloaded = ImageBertForPreTraining.from_pretrained(final)
    assert table["parameters"].startswith(f"{count_parameters(reloaded):,} ")
    assert count_parameters(model) < sum(p.numel() for p in model.state_dict().values())  # tied weights once
    # Placed before the base card's sections (which describe the paper's 12-layer base model) and says so.
    assert card.index("## This checkpoint") < card.index("## Architecture") < card.index("## Pre-training")
    assert "smaller than the paper's base model" in card
    assert card.startswith(base.split("# ImageBERT")[0])  # YAML front matter kept first


def test_a_base_size_model_is_said_to_be_the_base_size():
    config = ImageBertConfig()  # the paper's base defaults
    section = architecture_section(type("M", (), {"config": config, "parameters": lambda self: iter([])})())
    assert "has the paper's base size" in section and "| layers | 12 |" in section
    assert "## This checkpoint" not in build_model_card("# ImageBERT\n", load_recipe(DEMO), None, None)


# ------------------------------------------------------------------------------------------------ the docs


def doc_commands(name: str):
    return load_script("run_doc_commands.py").extract_commands(ROOT / name, name)


def test_finetuning_doc_describes_the_current_demo_and_cites_nothing_outside_the_repository():
    text = (ROOT / "docs" / "finetuning.md").read_text()
    recipe = yaml.safe_load(DEMO.read_text())
    steps = " + ".join(str(stage["max_steps"]) for stage in recipe["stages"])
    images = {stage["datasets"][0]["toy_world"]["num_images"] for stage in recipe["stages"]}
    assert "DESIGN.md" not in text
    assert f"{steps} steps" in text and all(f"{n:,} images" in text for n in images), (steps, images)


@pytest.mark.parametrize("name", ["docs/finetuning.md", "docs/evaluation.md"])
def test_documented_toy_commands_select_the_demo_world(name, scripts):
    expected = {key: DEMO_TOY_WORLD[key] for key in ("world_seed", "noise", "num_attributes")}
    expected.update(DEMO_TOY_TEST_SPLIT)
    checked = 0
    for command in doc_commands(name):
        argv = shlex.split(command.text.replace("\\\n", " "), comments=True)
        scripts_named = [i for i, token in enumerate(argv) if token.startswith("examples/")]
        if not scripts_named or "--toy" not in argv:
            continue
        position = scripts_named[0]
        script = Path(argv[position]).name
        rest = argv[position + 1 :]
        if script == "run_retrieval.py" and "--output_dir" not in rest:
            rest += ["--output_dir", "unused"]
        launcher = [token for token in argv[:position] if not re.match(r"^[A-Z_]+=", token)]
        assert launcher[:1] == ["python"] or launcher[:2] == ["accelerate", "launch"], command.where
        # A command that names its own test-split size (docs/evaluation.md's 1,000-image run) still scores the
        # demo's world and scenes, on a larger split.
        wanted = dict(expected)
        if "--toy_test_images" in rest:
            wanted["num_test_images"] = int(rest[rest.index("--toy_test_images") + 1])
        assert toy_settings_of(script, rest, scripts) == wanted, command.where
        checked += 1
    assert checked >= 2


def test_doc_runner_lists_marks_and_runs_commands_in_order(tmp_path, capsys):
    runner = load_script("run_doc_commands.py")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "intro\n```bash\necho one > made.txt   # provides: made\n# needs: flickr30k (the Karpathy split)\n"
        "python -c 'import sys; sys.exit(3)'\n```\n```python\nprint('not run')\n```\n"
    )
    (tmp_path / "docs" / "pretraining.md").write_text(
        '```bash\nVALUE=$(echo two)\n# slow\ntest "$VALUE" = two && \\\n    grep -q one made.txt\n'
        "# needs: made\ncat made.txt\nfalse\nmake demo   # installs\n```\n"
    )
    commands = runner.all_commands(tmp_path)
    assert [c.where for c in commands] == [
        "README.md:3", "README.md:5", "docs/pretraining.md:2", "docs/pretraining.md:4", "docs/pretraining.md:7",
        "docs/pretraining.md:8", "docs/pretraining.md:9",
    ]  # fmt: skip
    assert commands[0].provides == ["made"] and commands[1].needs == ["flickr30k"]
    assert commands[3].slow and commands[3].setup == ["VALUE=$(echo two)"] and "\n" in commands[3].text
    assert commands[6].installs and not commands[5].installs
    assert runner.main(["--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    verdicts = re.findall(r"^(PASS|FAIL|SKIP) +\d+\. (\S+):", out, flags=re.MULTILINE)
    assert verdicts == [
        ("PASS", "README.md:3"), ("SKIP", "README.md:5"), ("PASS", "docs/pretraining.md:2"),
        ("PASS", "docs/pretraining.md:4"), ("PASS", "docs/pretraining.md:7"), ("FAIL", "docs/pretraining.md:8"),
        ("SKIP", "docs/pretraining.md:9"),
    ]  # fmt: skip
    assert "needs flickr30k" in out and "installs packages" in out and "4 passed, 1 failed, 2 skipped" in out
    (tmp_path / "made.txt").unlink()
    assert runner.main(["--workdir", str(tmp_path), "--skip-slow", "--only", "docs/pretraining.md"]) == 1
    out = capsys.readouterr().out
    assert (
        "slow (--skip-slow)" in out
        and "needs made (made by README.md:3, which did not pass in this run)" in out
    )


def test_doc_runner_runs_a_command_after_the_later_one_that_provides_its_need(tmp_path, capsys):
    runner = load_script("run_doc_commands.py")
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "```bash\n# needs: model\ngrep -q trained model.txt\necho first\n```\n"
    )
    (tmp_path / "docs" / "finetuning.md").write_text(
        "```bash\necho trained > model.txt   # provides: model\n```\n"
    )
    assert runner.main(["--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    verdicts = re.findall(r"^(PASS|FAIL|SKIP) +\d+\. (\S+):", out, flags=re.MULTILINE)
    assert verdicts == [("PASS", "README.md:4"), ("PASS", "docs/finetuning.md:2"), ("PASS", "README.md:3")]
    (tmp_path / "model.txt").write_text("trained elsewhere")
    assert runner.main(["--workdir", str(tmp_path), "--have", "model"]) == 0
    out = capsys.readouterr().out
    assert (
        "provides model, given by --have" in out
        and (tmp_path / "model.txt").read_text() == "trained elsewhere"
    )


# -------------------------------------------------------------------------------- evaluation cache under SIGKILL


def test_sigkill_mid_scoring_then_rerun_equals_a_straight_run(scripts, tiny_checkpoint, tmp_path):
    from modeling_imagebert.data.storage import save_dataset

    seed = int(os.environ.get("IMAGEBERT_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    config = ImageBertConfig.from_json_file(str(TINY))
    split = make_toy_world(
        "retrieval", num_images=1, num_validation_images=1, num_test_images=24, seed=3, feature_dim=64,
        num_classes=config.num_object_classes - 1,
    )["test"]  # fmt: skip
    save_dataset(split, tmp_path / "data")
    common = ["--model", str(tiny_checkpoint), "--dataset", str(tmp_path / "data"), "--shard_size", "4",
              "--batch_size", "64", "--no_progress"]  # fmt: skip
    started = time.perf_counter()
    straight = scripts["evaluate_retrieval.py"].main(
        [*common, "--cache_dir", str(tmp_path / "straight"), "--save_scores", str(tmp_path / "straight.pt")]
    )
    seconds = time.perf_counter() - started

    cache = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    command = [
        sys.executable,
        str(ROOT / "examples" / "evaluate_retrieval.py"),
        *common,
        "--cache_dir",
        str(cache),
    ]
    code, stderr = kill_at_random_moment(
        command, started=lambda: bool(list(cache.glob("scores-*"))), seconds=seconds, rng=rng, env=env
    )
    assert code in (-signal.SIGKILL, 0), stderr
    scores = tmp_path / "scores.pt"
    resumed = scripts["evaluate_retrieval.py"].main(
        [*common, "--cache_dir", str(cache), "--save_scores", str(scores)]
    )
    assert resumed["metrics"] == straight["metrics"], f"IMAGEBERT_KILL_SEED={seed}"
    expected = torch.load(tmp_path / "straight.pt", weights_only=True)["scores"]
    assert torch.equal(torch.load(scores, weights_only=True)["scores"], expected), (
        f"IMAGEBERT_KILL_SEED={seed}"
    )
    leftovers = [p for p in cache.rglob("*") if p.name.startswith(".tmp")]
    assert not leftovers, leftovers
