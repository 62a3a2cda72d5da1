"""ITM hard negatives mined from ITC similarities (stage field `itm_negatives: itc`)."""

import pytest
import torch

from modeling_imagebert.pretraining.hard_negatives import mine_itm_negatives
from modeling_imagebert.pretraining.recipes import RecipeError, recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")


class _FixedEmbeddings(torch.nn.Module):
    """Stands in for the model: row i's text and image embeddings are given, the ITC scale is fixed."""

    def __init__(self, text, image, scale=100.0):
        super().__init__()
        self.text, self.image = text, image
        self.itc_head = type("Head", (), {"scale": lambda _self: torch.tensor(scale)})()

    def text_embeddings(self, input_ids, attention_mask=None, token_type_ids=None):
        return self.text[input_ids[:, 0]]

    def image_embeddings(
        self, region_features, region_locations=None, region_attention_mask=None, global_features=None
    ):
        return self.image[region_features[:, 0, 0].long()]


def _batch(labels, text_groups, image_groups):
    size = len(labels)
    return {
        "input_ids": torch.arange(size)[:, None].repeat(1, 3),  # row i's tokens are all i
        "attention_mask": torch.ones(size, 3, dtype=torch.long),
        "token_type_ids": torch.zeros(size, 3, dtype=torch.long),
        "region_features": torch.arange(size, dtype=torch.float)[:, None, None].repeat(1, 2, 4),
        "region_locations": torch.zeros(size, 2, 5),
        "region_attention_mask": torch.ones(size, 2, dtype=torch.long),
        "itm_labels": torch.tensor(labels),
        "itc_text_groups": torch.tensor(text_groups),
        "itc_image_groups": torch.tensor(image_groups),
    }


def test_negatives_are_redrawn_as_the_most_similar_wrong_partner_and_matched_rows_stay():
    # Four images; caption c describes image c. Image 0 looks most like caption 2, caption 1 most like image 3.
    eye = torch.eye(4)
    text = eye.clone()
    image = eye.clone()
    image[0] = torch.nn.functional.normalize(eye[0] + 3 * eye[2], dim=0)
    text[1] = torch.nn.functional.normalize(eye[1] + 3 * eye[3], dim=0)
    model = _FixedEmbeddings(text, image)
    # Rows: 0 and 1 are negatives from the collator (image 0 with caption 1, caption 1 with image 2); 2 and 3 match.
    batch = _batch([0, 0, 1, 1], text_groups=[1, 1, 2, 3], image_groups=[0, 2, 2, 3])
    mined = mine_itm_negatives(model, batch, torch.Generator().manual_seed(0))
    # Row 0 (even) keeps image 0 and takes the caption most like it that does not describe it: caption 2 (row 2).
    assert mined["input_ids"][0].tolist() == [2, 2, 2] and mined["region_features"][0, 0, 0] == 0
    assert mined["itc_text_groups"][0] == 2 and mined["itc_image_groups"][0] == 0
    # Row 1 (odd) keeps caption 1 and takes the image most like it that it does not describe: image 3 (row 3).
    assert mined["input_ids"][1].tolist() == [1, 1, 1] and mined["region_features"][1, 0, 0] == 3
    assert mined["itc_image_groups"][1] == 3
    for key in ("input_ids", "region_features", "itc_text_groups", "itc_image_groups", "itm_labels"):
        torch.testing.assert_close(mined[key][2:], batch[key][2:])  # matched rows untouched
    # Every row labelled 0 still pairs a caption with an image it does not describe.
    negative = mined["itm_labels"] == 0
    assert (mined["itc_text_groups"][negative] != mined["itc_image_groups"][negative]).all()


def test_draws_follow_the_generator_and_a_row_without_a_wrong_partner_is_kept():
    model = _FixedEmbeddings(torch.eye(4), torch.eye(4), scale=1.0)  # flat similarities: draws are random
    batch = _batch([0, 0, 0, 0], text_groups=[1, 0, 3, 2], image_groups=[0, 1, 2, 3])
    first = mine_itm_negatives(model, batch, torch.Generator().manual_seed(5))
    again = mine_itm_negatives(model, batch, torch.Generator().manual_seed(5))
    assert all(torch.equal(first[key], again[key]) for key in batch)
    draws = {tuple(mine_itm_negatives(model, batch, torch.Generator().manual_seed(s))["input_ids"][:, 0].tolist())
             for s in range(20)}  # fmt: skip
    assert len(draws) > 1  # not a fixed choice
    # One image group only: no caption can be a negative for it, so the collator's row stays as it was.
    single = _batch([0, 0], text_groups=[0, 0], image_groups=[0, 0])
    kept = mine_itm_negatives(model, single, torch.Generator().manual_seed(0))
    assert all(torch.equal(kept[key], single[key]) for key in single)


def test_a_fraction_of_the_negatives_is_mined_and_the_rest_keep_their_random_partner():
    # Sixty-four images, caption c describes image c; every image looks most like caption (c + 1) mod 64.
    size = 64
    text = torch.eye(size)
    image = torch.roll(torch.eye(size), shifts=1, dims=1)
    model = _FixedEmbeddings(text, image)
    groups = list(range(size))
    # Every row is a collator negative: row r pairs caption (r + 7) mod 64 with image r.
    batch = _batch([0] * size, text_groups=[(r + 7) % size for r in groups], image_groups=groups)
    batch["input_ids"] = batch["itc_text_groups"][:, None].repeat(1, 3)
    none = mine_itm_negatives(model, batch, torch.Generator().manual_seed(0), fraction=0.0)
    assert all(torch.equal(none[key], batch[key]) for key in batch)
    half = mine_itm_negatives(model, batch, torch.Generator().manual_seed(0), fraction=0.5)
    changed = (half["input_ids"][:, 0] != batch["input_ids"][:, 0]) | (
        half["region_features"][:, 0, 0] != batch["region_features"][:, 0, 0]
    )
    assert 16 <= int(changed.sum()) <= 48  # about half, not none and not all
    negative = half["itm_labels"] == 0
    assert (half["itc_text_groups"][negative] != half["itc_image_groups"][negative]).all()
    every = mine_itm_negatives(model, batch, torch.Generator().manual_seed(0), fraction=1.0)
    every_changed = (every["input_ids"][:, 0] != batch["input_ids"][:, 0]) | (
        every["region_features"][:, 0, 0] != batch["region_features"][:, 0, 0]
    )
    assert int(every_changed.sum()) > int(changed.sum())


def test_masked_task_batches_are_not_touched():
    model = _FixedEmbeddings(torch.eye(2), torch.eye(2))
    batch = {**_batch([0, 1], [1, 1], [0, 1]), "labels": torch.full((2, 3), -100)}
    mined = mine_itm_negatives(model, batch, torch.Generator().manual_seed(0))
    assert all(torch.equal(mined[key], batch[key]) for key in batch)


def test_real_itm_batches_are_mined_with_a_real_model(minilm_path):
    """The pre-training schedule's ITM batches carry what mining needs (no masked-task keys, the ITC groups), so
    the option is not silently a no-op; the mined batch still runs through the model."""
    from transformers import AutoTokenizer

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.pretraining.schedule import BatchSchedule, ScheduledBatches, build_stage_sources
    from modeling_imagebert.processing_imagebert import ImageBertProcessor

    processor = ImageBertProcessor(
        AutoTokenizer.from_pretrained(minilm_path), max_regions=8, max_text_length=16
    )
    toy = {"variant": "curated", "num_images": 16, "feature_dim": 16, "num_classes": 6, "num_attributes": 2}
    stage = recipe_from_dict(
        {
            "model": {"bert_checkpoint": "some/bert"},
            "stages": [
                {
                    "init": "bert",
                    "datasets": [{"toy_world": toy}],
                    "max_steps": 2,
                    "tasks": {"mlm": 1.0, "itm": 1.0, "itc": 1.0},
                    "itm_negatives": "itc",
                }
            ],
        }
    ).stages[0]
    sources = build_stage_sources(stage, 0, processor, seed=0)
    schedule = BatchSchedule([16], [1.0], batch_size=8, num_processes=1, seed=0, stage_index=0)
    batches = list(ScheduledBatches(sources, schedule, 0, 0, 12, stage.tasks, itm_batch_fraction=0.5))
    itm = [b for b in batches if "itm_labels" in b]
    assert itm
    torch.manual_seed(0)
    config = ImageBertConfig(
        vocab_size=processor.tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, visual_feature_dim=16, num_object_classes=7, max_regions=8, itc_loss_weight=1.0,
    )  # fmt: skip
    model = ImageBertForPreTraining(config)
    changed = 0
    for batch in itm:
        mined = mine_itm_negatives(model, batch, torch.Generator().manual_seed(0))
        negative = mined["itm_labels"] == 0
        assert (mined["itc_text_groups"][negative] != mined["itc_image_groups"][negative]).all()
        changed += int(not torch.equal(mined["input_ids"], batch["input_ids"]))
        assert torch.isfinite(model(**mined).loss)
    assert changed > 0


@pytest.mark.parametrize(
    "stage, message",
    [
        ({"itm_negatives": "hard"}, "expected 'random' or 'itc'"),
        ({"itm_negatives": "itc", "tasks": {"itm": 1.0, "mlm": 1.0}}, "needs both the itm and the itc task"),
        (
            {"itm_negatives": "itc", "tasks": {"itm": 1.0, "itc": 1.0, "mlm": 1.0}, "itm_mode": "joint"},
            "needs itm_mode 'separate'",
        ),
    ],
)
def test_recipe_refuses_hard_negatives_it_cannot_mine(stage, message):
    data = {
        "model": {"bert_checkpoint": "some/bert"},
        "stages": [{"init": "bert", "datasets": [{"toy_world": {"variant": "web", "num_images": 8}}], "max_steps": 2,
                    **stage}],
    }  # fmt: skip
    with pytest.raises(RecipeError, match=rf"stages\[0\]\.itm_negatives: .*{message}"):
        from modeling_imagebert.pretraining.recipes import validate_recipe

        validate_recipe(recipe_from_dict(data))


def test_a_checkpoint_saved_before_the_field_existed_resumes_with_random_negatives():
    from modeling_imagebert.pretraining.recipe_diff import recipe_differences

    saved = {"stages": [{"learning_rate": 1e-4}]}
    assert recipe_differences(saved, {"stages": [{"learning_rate": 1e-4, "itm_negatives": "random"}]}) == []
    assert recipe_differences(saved, {"stages": [{"learning_rate": 1e-4, "itm_negatives": "itc"}]}) == [
        'stages.0.itm_negatives: checkpoint absent, now "itc"'
    ]
    assert (
        recipe_differences(saved, {"stages": [{"learning_rate": 1e-4, "itm_hard_negative_fraction": 1.0}]})
        == []
    )
    assert recipe_differences(
        saved, {"stages": [{"learning_rate": 1e-4, "itm_hard_negative_fraction": 0.5}]}
    ) == ["stages.0.itm_hard_negative_fraction: checkpoint absent, now 0.5"]


@pytest.mark.parametrize("fraction", [1.5, -0.1, float("nan")])
def test_recipe_refuses_a_hard_negative_fraction_outside_zero_to_one(fraction):
    from modeling_imagebert.pretraining.recipes import validate_recipe

    data = {
        "model": {"bert_checkpoint": "some/bert"},
        "stages": [{"init": "bert", "datasets": [{"toy_world": {"variant": "web", "num_images": 8}}], "max_steps": 2,
                    "tasks": {"itm": 1.0, "itc": 1.0}, "itm_negatives": "itc", "itm_hard_negative_fraction": fraction}],
    }  # fmt: skip
    with pytest.raises(RecipeError, match=r"stages\[0\]\.itm_hard_negative_fraction: expected a probability"):
        validate_recipe(recipe_from_dict(data))
