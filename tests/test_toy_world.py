import re

import numpy as np
import pytest

from modeling_imagebert.data.schema import image_text_features, validate_dataset
from modeling_imagebert.data.toy_world import SPAM_WORDS, ToyWorld, make_toy_world, toy_world_for

SMALL = dict(num_images=40, feature_dim=16, num_classes=12, num_attributes=6)


def _numpy(dataset):
    return dataset.with_format("numpy", dtype=None)


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+|[^\sa-z]", caption)


def _mentions_only_present_classes(world: ToyWorld, row) -> bool:
    mentioned = world.mentioned_classes(row["caption"])
    return bool(mentioned) and mentioned <= set(row["region_classes"].tolist())


@pytest.fixture(scope="module")
def retrieval():
    return make_toy_world(
        "retrieval", num_images=30, num_validation_images=20, num_test_images=60, feature_dim=32, seed=3
    )


def test_same_arguments_give_bit_identical_datasets():
    first, second = _numpy(make_toy_world("web", **SMALL)), _numpy(make_toy_world("web", **SMALL))
    assert list(first["caption"]) == list(second["caption"])
    assert list(first["image_id"]) == list(second["image_id"])
    for column in ("region_features", "region_boxes", "region_classes", "region_scores"):
        for a, b in zip(first[column], second[column], strict=True):
            assert a.dtype == b.dtype and np.array_equal(a.view(np.uint8), b.view(np.uint8)), column


def test_different_seeds_sample_different_scenes_of_the_same_world():
    first = make_toy_world("curated", seed=0, **SMALL)
    second = make_toy_world("curated", seed=1, **SMALL)
    assert list(first["caption"]) != list(second["caption"])
    assert not np.array_equal(_numpy(first)[0]["region_features"], _numpy(second)[0]["region_features"])
    assert set(first["image_id"]).isdisjoint(second["image_id"])
    # The prototypes depend on world_seed only, so corpora of one world can be combined.
    np.testing.assert_array_equal(
        toy_world_for(first).class_prototypes, toy_world_for(second).class_prototypes
    )
    other_world = make_toy_world("curated", seed=0, world_seed=1, **SMALL)
    assert not np.array_equal(
        toy_world_for(other_world).class_prototypes, toy_world_for(first).class_prototypes
    )


@pytest.mark.parametrize("variant", ["curated", "web"])
def test_corpus_passes_the_schema_validator_with_detector_invariants(variant):
    dataset = make_toy_world(variant, captions_per_image=2, with_global_feature=True, **SMALL)
    world = toy_world_for(dataset)
    assert dataset.features == image_text_features(16, with_global_feature=True)
    assert len(dataset) == 80
    assert validate_dataset(dataset, num_classes=world.num_region_classes, show_progress=False) == 80
    for row in _numpy(dataset):
        features, boxes, scores = row["region_features"], row["region_boxes"], row["region_scores"]
        assert features.dtype == np.float16 and np.isfinite(features).all()
        assert 10 <= len(features) <= 30
        assert (boxes[:, 2] - boxes[:, 0] >= 4).all() and (boxes[:, 3] - boxes[:, 1] >= 4).all()
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= row["image_width"]).all()
        assert (boxes[:, [1, 3]] <= row["image_height"]).all()
        assert 320 <= row["image_width"] <= 640 and 320 <= row["image_height"] <= 640
        assert ((scores > 0) & (scores <= 1)).all() and (np.diff(scores) <= 0).all()  # detector order
        classes = row["region_classes"]
        assert ((classes >= 0) & (classes <= world.background_class_id)).all()
        assert (classes == world.background_class_id).any() and (classes < world.num_classes).sum() >= 6


def test_every_caption_word_is_one_wordpiece_token_of_the_bert_vocab(minilm_path, retrieval):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    world = ToyWorld.create(num_classes=40, num_attributes=16)  # the whole vocabulary
    for word in world.vocabulary():
        assert tokenizer.tokenize(word) == [word], word
    vocabulary = set(world.vocabulary())
    captions = list(make_toy_world("web", **SMALL)["caption"]) + list(retrieval["test"]["caption"])
    for caption in captions:
        assert set(_words(caption)) <= vocabulary, caption
        assert tokenizer.tokenize(caption) == _words(caption)


def test_curated_and_retrieval_captions_name_only_objects_in_the_image(retrieval):
    curated = make_toy_world("curated", captions_per_image=3, **SMALL)
    for dataset in (curated, retrieval["test"]):
        world = toy_world_for(dataset)
        for row in _numpy(dataset):
            assert _mentions_only_present_classes(world, row), row["caption"]
            assert len(world.mentioned_classes(row["caption"])) >= 2


def test_left_and_right_in_captions_follow_the_boxes(retrieval):
    world = toy_world_for(retrieval["test"])
    checked = 0
    for row in _numpy(retrieval["test"]):
        match = re.fullmatch(
            r"an? (?:\w+ )?(\w+) on the (left|right) of an? (?:\w+ )?(\w+) \.", row["caption"]
        )
        if not match:
            continue
        first, side, second = match.groups()
        centres = {}
        for name in (first, second):  # the best-scored region of the class is the tight box of the object
            region = np.flatnonzero(row["region_classes"] == world.class_names.index(name))[0]
            box = row["region_boxes"][region]
            centres[name] = (box[0] + box[2]) / 2
        assert (centres[first] < centres[second]) == (side == "left"), row["caption"]
        checked += 1
    assert checked >= 10


def test_web_variant_has_the_configured_fraction_of_unrelated_captions():
    noisy = make_toy_world("web", num_images=500, feature_dim=8, unrelated_fraction=0.3, spam_fraction=0.2)
    world = toy_world_for(noisy)
    unrelated = np.mean([not _mentions_only_present_classes(world, row) for row in _numpy(noisy)])
    assert abs(unrelated - 0.3) < 0.06
    spam_words = set(SPAM_WORDS)
    padded = [c for c in list(noisy["caption"]) if world.mentioned_classes(c) and spam_words & set(_words(c))]
    assert abs(len(padded) / 500 - 0.7 * 0.2) < 0.05  # spam_fraction of the faithful captions

    clean = make_toy_world("web", num_images=200, feature_dim=8, unrelated_fraction=0.0, spam_fraction=0.0)
    assert all(_mentions_only_present_classes(world, row) for row in _numpy(clean))
    assert not any(spam_words & set(_words(c)) for c in list(clean["caption"]))


def test_retrieval_has_five_different_captions_per_image_and_disjoint_splits(retrieval):
    assert {split: len(ds) for split, ds in retrieval.items()} == {
        "train": 150,
        "validation": 100,
        "test": 300,
    }
    images = {}
    for split, dataset in retrieval.items():
        ids = list(dataset["image_id"])
        assert all(image_id.startswith(f"retrieval-{split}-") for image_id in ids)
        for image_id in set(ids):
            rows = [i for i, other in enumerate(ids) if other == image_id]
            assert len(rows) == 5 and rows == list(range(rows[0], rows[0] + 5))  # consecutive rows
            assert len({dataset[i]["caption"] for i in rows}) == 5
        images[split] = set(ids)
    assert images["train"].isdisjoint(images["test"]) and images["validation"].isdisjoint(images["test"])
    assert images["train"].isdisjoint(images["validation"])
    test, train = _numpy(retrieval["test"]), _numpy(retrieval["train"])
    np.testing.assert_array_equal(test[0]["region_features"], test[4]["region_features"])  # one image, 5 rows
    assert test[0]["region_features"].shape != train[0]["region_features"].shape or not np.array_equal(
        test[0]["region_features"], train[0]["region_features"]
    )


def test_nearest_prototype_classifier_recovers_region_classes_well_above_chance():
    dataset = make_toy_world("curated", num_images=60)
    world = toy_world_for(dataset)
    rows = _numpy(dataset)
    features = np.concatenate(list(rows["region_features"]))
    classes = np.concatenate(list(rows["region_classes"]))
    accuracy = (world.nearest_prototype_classes(features) == classes).mean()
    assert accuracy > 0.8 > 10 / world.num_region_classes  # chance is 1 / 25
    # ... but not trivially: the noise costs some regions their class.
    assert accuracy < 0.99


def test_captions_identify_their_image_with_the_prototypes(retrieval):
    """Text-to-image retrieval by an oracle that knows the prototypes: R@1 far above chance, so the task is learnable
    from the data alone."""
    dataset = _numpy(retrieval["test"])
    world = toy_world_for(retrieval["test"])
    row_image_ids = list(dataset["image_id"])
    image_ids = row_image_ids[::5]
    features = [f.astype(np.float32) for f in list(dataset["region_features"])[::5]]
    features = [f / np.linalg.norm(f, axis=1, keepdims=True) for f in features]
    hits = 0
    for row, caption in enumerate(list(dataset["caption"])):
        targets = np.stack(
            [
                world.class_prototypes[c] + (0.6 * world.attribute_prototypes[a] if a is not None else 0)
                for c, a in world.mentioned_objects(caption)
            ]
        )
        targets /= np.linalg.norm(targets, axis=1, keepdims=True)
        scores = [(f @ targets.T).max(0).sum() for f in features]
        hits += image_ids[int(np.argmax(scores))] == row_image_ids[row]
    assert hits / len(dataset) > 0.7  # chance is 1 / 60


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variant="noisy"), "variant must be one of"),
        (
            dict(variant="curated", unrelated_fraction=0.2),
            "unrelated_fraction applies only to the 'web' variant",
        ),
        (dict(variant="web", unrelated_fraction=1.5), "unrelated_fraction must be a number in"),
        (dict(num_classes=41), r"num_classes must be in \[6, 40\]"),
        (dict(num_images=0), "num_images must be >= 1"),
    ],
)
def test_bad_arguments_raise_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_toy_world(**kwargs)
