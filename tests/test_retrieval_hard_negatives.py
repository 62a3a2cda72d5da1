"""Retrieval fine-tuning negatives mined by ITC similarity (modeling_imagebert/retrieval/hard_negatives.py) and
`run_retrieval.py --negatives itc`."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from modeling_imagebert import ImageBertProcessor
from modeling_imagebert.data.collators import DataCollatorForImageTextRetrieval
from modeling_imagebert.data.toy_world import make_toy_world
from modeling_imagebert.retrieval.hard_negatives import mine_retrieval_negatives

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import run_retrieval  # noqa: E402

FEATURE_DIM = 16
NUM_CLASSES = 6


class _ScaleHead(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.value = scale

    def scale(self):
        return torch.tensor(self.value)


class _FixedEmbeddings(torch.nn.Module):
    """Stands in for the model: embeds a caption / an image by looking its tokens / first feature up in a table,
    so the test decides which partners are similar."""

    def __init__(
        self, text_table: dict[tuple, torch.Tensor], image_table: dict[float, torch.Tensor], scale=100.0
    ):
        super().__init__()
        self.text_table, self.image_table = text_table, image_table
        self.itc_head = _ScaleHead(scale)
        self.seen_training = []

    def text_embeddings(self, input_ids, attention_mask=None, token_type_ids=None):
        self.seen_training.append(self.training)
        rows = [tuple(ids[mask == 1].tolist()) for ids, mask in zip(input_ids, attention_mask, strict=True)]
        return torch.stack([self.text_table[row] for row in rows])

    def image_embeddings(
        self, region_features, region_locations, region_attention_mask=None, global_features=None
    ):
        return torch.stack([self.image_table[round(float(row[0, 0]), 3)] for row in region_features])


@pytest.fixture(scope="module")
def processor(minilm_path):
    from transformers import BertTokenizerFast

    return ImageBertProcessor(
        BertTokenizerFast.from_pretrained(minilm_path), max_regions=8, max_text_length=16
    )


def _examples(processor, num_images=6):
    raw = make_toy_world(
        "retrieval",
        num_images=num_images,
        num_validation_images=1,
        num_test_images=1,
        seed=5,
        feature_dim=FEATURE_DIM,
        num_classes=NUM_CLASSES,
    )["train"]
    encoded = processor.prepare_dataset(raw)
    # One caption per image, so each image's caption is known; example_index keys the collator's draws.
    first = {}
    for row in range(len(encoded)):
        first.setdefault(encoded[row]["image_id"], row)
    return [dict(encoded[row], example_index=i) for i, row in enumerate(first.values())]


def _batch(processor, count=4, direction="both", num_images=6):
    examples = _examples(processor, num_images)
    collator = DataCollatorForImageTextRetrieval(
        processor, num_candidates=count, negative_direction=direction
    )
    return examples, collator(examples)


def _identity_of_rows(batch, examples):
    """(caption example, image example) of every row, read back from its tokens and features."""
    tokens = {tuple(int(t) for t in e["input_ids"]): i for i, e in enumerate(examples)}
    first_feature = {
        round(float(torch.as_tensor(e["region_features"])[0, 0]), 3): i for i, e in enumerate(examples)
    }
    pairs = []
    for row in range(batch["labels"].shape[0]):
        ids = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
        pairs.append(
            (tokens[tuple(ids)], first_feature[round(float(batch["region_features"][row, 0, 0]), 3)])
        )
    return pairs


def _fixed_model(examples, near: dict[int, int]):
    """Embeddings where caption/image b is close to its own partner and to `near[b]`'s, far from the rest."""
    size = len(examples)
    text, image = {}, {}
    for i, example in enumerate(examples):
        vector = torch.zeros(size)
        vector[i] = 1.0
        if i in near:
            vector[near[i]] = 0.9
        text[tuple(int(t) for t in example["input_ids"])] = torch.nn.functional.normalize(vector, dim=0)
        image_vector = torch.zeros(size)
        image_vector[i] = 1.0
        image[round(float(torch.as_tensor(example["region_features"])[0, 0]), 3)] = image_vector
    return _FixedEmbeddings(text, image)


def test_mined_negatives_stay_negatives_keep_their_side_and_are_distinct_per_group(processor):
    examples, batch = _batch(processor, count=4)
    model = _fixed_model(examples, {})
    model.train()
    mined = mine_retrieval_negatives(model, batch, torch.Generator().manual_seed(0))
    assert model.training and model.seen_training == [False]  # picked in eval mode, training mode restored
    before, after = _identity_of_rows(batch, examples), _identity_of_rows(mined, examples)
    count, size = 4, len(examples)
    for group in range(size):
        rows = range(group * count, (group + 1) * count)
        assert after[rows[0]] == before[rows[0]] == (group, group)  # the positive is untouched
        image_side, caption_side = [], []
        for row in rows[1:]:
            caption, image = after[row]
            assert caption != image, f"row {row} became a positive"
            if before[row][0] == group:  # the collator kept the caption: the image is re-drawn
                assert caption == group
                image_side.append(image)
            else:  # it kept the image: the caption is re-drawn
                assert image == group
                caption_side.append(caption)
        assert len(set(image_side)) == len(image_side) and len(set(caption_side)) == len(caption_side)
    assert torch.equal(mined["labels"], batch["labels"]) and mined["num_candidates"] == count


def test_the_most_similar_wrong_partner_is_drawn_first(processor):
    examples, batch = _batch(processor, count=2, direction="image")  # one negative each: another image
    near = {b: (b + 1) % len(examples) for b in range(len(examples))}  # caption b resembles image b+1
    mined = mine_retrieval_negatives(_fixed_model(examples, near), batch, torch.Generator().manual_seed(0))
    pairs = _identity_of_rows(mined, examples)
    assert [pairs[2 * b + 1] for b in range(len(examples))] == [(b, near[b]) for b in range(len(examples))]
    random_pairs = _identity_of_rows(batch, examples)
    assert [random_pairs[2 * b + 1] for b in range(len(examples))] != [
        (b, near[b]) for b in range(len(examples))
    ]


def test_fraction_zero_keeps_the_collators_negatives_and_bad_fractions_are_refused(processor):
    examples, batch = _batch(processor, count=3)
    model = _fixed_model(examples, {})
    kept = mine_retrieval_negatives(model, batch, torch.Generator().manual_seed(0), fraction=0.0)
    for key in ("input_ids", "region_features", "region_locations", "region_attention_mask"):
        assert torch.equal(kept[key], batch[key]), key
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got 1.5"):
        mine_retrieval_negatives(model, batch, fraction=1.5)


def test_too_few_other_images_for_the_groups_is_a_clear_error(processor):
    examples, batch = _batch(processor, count=3)
    squeezed = dict(batch, itc_image_groups=torch.tensor([0, 0, 0, 0, 0, 1]))  # 6 positives, 2 image groups
    with pytest.raises(ValueError, match="fewer than the 2 negatives of a group"):
        mine_retrieval_negatives(_fixed_model(examples, {}), squeezed)


def test_a_batch_without_groups_is_returned_unchanged(processor):
    examples, batch = _batch(processor, count=3)
    plain = {key: value for key, value in batch.items() if key != "itc_image_groups"}
    assert mine_retrieval_negatives(_fixed_model(examples, {}), plain).keys() == plain.keys()


def test_run_retrieval_trains_with_itc_negatives_and_refuses_unknown_ones(
    minilm_path, tmp_path, capsys, monkeypatch
):
    import modeling_imagebert.retrieval.trainer as trainer_module

    mined = []

    def counting(model, batch, generator=None, fraction=1.0):
        mined.append(fraction)
        return mine_retrieval_negatives(model, batch, generator, fraction)

    monkeypatch.setattr(trainer_module, "mine_retrieval_negatives", counting)
    common = [
        "--from_bert", minilm_path, "--num_hidden_layers", "1", "--toy", "--toy_num_images", "12",
        "--toy_num_eval_images", "8", "--toy_seed", "5", "--eval_num_candidates", "5", "--loss", "binary+itc",
        "--do_train", "--max_steps", "2",
        "--per_device_train_batch_size", "8", "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no",
    ]  # fmt: skip
    run_retrieval.main([*common, "--output_dir", str(tmp_path / "random")])
    assert mined == []  # the paper's random negatives by default
    results = run_retrieval.main(
        [
            *common,
            "--output_dir",
            str(tmp_path / "itc"),
            "--negatives",
            "itc",
            "--hard_negative_fraction",
            "0.5",
        ]
    )
    assert mined == [0.5, 0.5]  # every training step mined, none of the evaluation
    assert math.isfinite(results["train"]["train_loss"])
    state = json.loads((tmp_path / "itc" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    with pytest.raises(SystemExit):
        run_retrieval.main([*common, "--output_dir", str(tmp_path / "bad"), "--negatives", "hardest"])
    assert "--negatives must be one of ('random', 'itc'), got 'hardest'" in capsys.readouterr().err
