"""Collators: masking rates, conditional masking, negatives, and randomness keyed on (seed, epoch, example_index)."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from modeling_imagebert.data.collators import (
    DataCollatorForImageBertPretraining,
    DataCollatorForImageTextRetrieval,
    hashed_uniform,
)
from modeling_imagebert.processing_imagebert import ImageBertProcessor

FEATURE_DIM = 12
TOKEN_BASE = 2000  # input_ids[1] = TOKEN_BASE + example number: tells which example a caption comes from


@pytest.fixture(scope="module")
def processor(minilm_path):
    from transformers import BertTokenizerFast

    return ImageBertProcessor(BertTokenizerFast.from_pretrained(minilm_path))


def make_examples(
    count, captions_per_image=5, min_regions=0, max_regions=40, min_words=4, max_words=40, seed=0
):
    """Encoded examples; region_features[:, 0] = example number tells which example an image comes from."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        words = rng.integers(min_words, max_words + 1)
        n = rng.integers(min_regions, max_regions + 1)
        features = rng.standard_normal((n, FEATURE_DIM)).astype(np.float16)
        features[:, 0] = i
        examples.append(
            {
                "image_id": f"img{i // captions_per_image}",
                "input_ids": [101, TOKEN_BASE + i, *rng.integers(3000, 29000, words).tolist(), 102],
                "region_features": features,
                "region_locations": rng.uniform(0, 1, (n, 5)).astype(np.float32),
                "region_classes": rng.integers(0, 1600, n),
                "example_index": i,
            }
        )
    return examples


def text_source(batch):
    ids = batch["input_ids"][:, 1]
    if "labels" in batch and batch["labels"].dim() == 2:  # undo MLM masking of the marker token
        ids = torch.where(batch["labels"][:, 1] != -100, batch["labels"][:, 1], ids)
    return (ids - TOKEN_BASE).tolist()


def image_source(batch):
    return (
        batch["region_feature_targets" if "region_feature_targets" in batch else "region_features"][:, 0, 0]
        .long()
        .tolist()
    )


def test_hashed_uniform_depends_only_on_its_key():
    a = hashed_uniform(0, 1, np.array([5, 9]), 4, 1000)
    b = hashed_uniform(0, 1, np.array([9, 5, 7]), 4, 10)
    np.testing.assert_array_equal(a[1, :10], b[0])
    assert 0.0 <= a.min() and a.max() < 1.0 and abs(a.mean() - 0.5) < 0.03
    assert not np.array_equal(a, hashed_uniform(0, 2, np.array([5, 9]), 4, 1000))
    assert not np.array_equal(a, hashed_uniform(1, 1, np.array([5, 9]), 4, 1000))


def test_mlm_and_region_masking_rates(processor):
    examples = make_examples(600, seed=1)
    collator = DataCollatorForImageBertPretraining(processor, itm_negative_rate=0.0)
    batch = collator(examples)
    original = processor.pad(examples, return_region_classes=True)
    real_text = (original["attention_mask"] == 1) & ~torch.isin(
        original["input_ids"], torch.tensor([0, 100, 101, 102, 103])
    )
    assert real_text.sum() >= 10_000
    selected = batch["labels"] != -100
    assert not (selected & ~real_text).any(), "special or padding tokens were masked"
    assert abs(selected.sum().item() / real_text.sum().item() - 0.15) < 0.015
    assert torch.equal(batch["labels"][selected], original["input_ids"][selected])
    masked = selected & (batch["input_ids"] == processor.tokenizer.mask_token_id)
    unchanged = selected & (batch["input_ids"] == original["input_ids"])
    replaced = selected & ~masked & ~unchanged
    total = selected.sum().item()
    assert abs(masked.sum().item() / total - 0.8) < 0.04
    assert abs(replaced.sum().item() / total - 0.1) < 0.03
    assert abs(unchanged.sum().item() / total - 0.1) < 0.03
    assert not torch.isin(
        batch["input_ids"][replaced], torch.tensor(processor.tokenizer.all_special_ids)
    ).any()
    assert torch.equal(batch["input_ids"][~selected], original["input_ids"][~selected])

    real_regions = original["region_attention_mask"] == 1
    assert real_regions.sum() >= 10_000
    masked_regions = batch["masked_regions"]
    assert masked_regions.dtype == torch.bool and not (masked_regions & ~real_regions).any()
    assert abs(masked_regions.sum().item() / real_regions.sum().item() - 0.15) < 0.015
    torch.testing.assert_close(batch["region_feature_targets"], original["region_features"])
    zeroed = masked_regions & (batch["region_features"] == 0).all(-1)
    kept = masked_regions & (batch["region_features"] == original["region_features"]).all(-1)
    assert abs(zeroed.sum().item() / masked_regions.sum().item() - 0.9) < 0.03
    assert torch.equal(zeroed | kept, masked_regions)
    assert torch.equal(
        batch["region_features"][~masked_regions], original["region_features"][~masked_regions]
    )
    expected_classes = torch.where(
        masked_regions, original["region_classes"], torch.full_like(masked_regions, -100, dtype=torch.long)
    )
    assert torch.equal(batch["region_class_labels"], expected_classes)
    assert (batch["itm_labels"] == 1).all()


def test_negatives_get_no_masks_and_never_share_image_id(processor):
    examples = make_examples(400, min_regions=1, max_regions=3, max_words=8, seed=2)
    collator = DataCollatorForImageBertPretraining(processor)
    batches = [collator(examples[start : start + 16]) for start in range(0, 400, 16)]
    itm = torch.cat([b["itm_labels"] for b in batches])
    assert abs((itm == 0).float().mean().item() - 0.5) < 0.08
    assert abs(collator.stats["negative_captions"] / collator.stats["negatives"] - 0.5) < 0.1
    for batch in batches:
        negative = batch["itm_labels"] == 0
        assert (batch["labels"][negative] == -100).all()
        assert not batch["masked_regions"][negative].any()
        assert (batch["region_class_labels"][negative] == -100).all()
        for row, (text, image) in enumerate(zip(text_source(batch), image_source(batch), strict=True)):
            if negative[row]:
                assert examples[text]["image_id"] != examples[image]["image_id"]
            else:
                assert text == image


def test_no_partner_in_batch_keeps_example_positive(processor):
    examples = make_examples(5, captions_per_image=5, seed=3)  # one image
    collator = DataCollatorForImageBertPretraining(processor, itm_negative_rate=1.0)
    batch = collator(examples)
    assert (batch["itm_labels"] == 1).all()
    assert collator.stats["no_partner"] == 5 and collator.stats["negatives"] == 0


def masks_by_index(batches):
    """example_index -> (itm label, masked ids, labels, masked regions) of matched examples, unpadded."""
    found = {}
    for batch, indices in batches:
        for row, index in enumerate(indices):
            length = int(batch["attention_mask"][row].sum())
            regions = int(batch["region_attention_mask"][row].sum())
            found[index] = (
                int(batch["itm_labels"][row]),
                batch["input_ids"][row, :length].tolist(),
                batch["labels"][row, :length].tolist(),
                batch["masked_regions"][row, :regions].tolist(),
            )
    return found


class _WithIndices:
    """Wraps a collator to also return the example indices of the batch (to compare across loaders)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples):
        return self.collator(examples), [e["example_index"] for e in examples]


def test_same_masks_across_workers_and_batch_neighbours_and_new_masks_per_epoch(processor):
    examples = make_examples(40, captions_per_image=2, seed=4)
    collator = DataCollatorForImageBertPretraining(processor, seed=7)
    collator.set_epoch(3)
    single = masks_by_index(
        DataLoader(examples, batch_size=8, collate_fn=_WithIndices(collator), num_workers=0)
    )
    workers = masks_by_index(
        DataLoader(examples, batch_size=8, collate_fn=_WithIndices(collator), num_workers=2)
    )
    order = np.random.default_rng(0).permutation(40)
    shuffled = [examples[i] for i in order]
    neighbours = masks_by_index(DataLoader(shuffled, batch_size=5, collate_fn=_WithIndices(collator)))
    assert single == workers
    assert sum(v[2] != [-100] * len(v[2]) for v in single.values()) > 10, "too few masked examples to compare"
    for index, (itm, ids, labels, regions) in single.items():
        assert neighbours[index][0] == itm
        if itm == 1:
            assert neighbours[index][1:] == (ids, labels, regions)
    collator.set_epoch(4)
    next_epoch = masks_by_index(DataLoader(examples, batch_size=8, collate_fn=_WithIndices(collator)))
    assert next_epoch != single
    same_itm = [i for i in single if single[i][0] == next_epoch[i][0] == 1]
    assert any(single[i][2] != next_epoch[i][2] for i in same_itm)


@pytest.mark.parametrize("direction", ["text", "image", "both"])
def test_retrieval_groups_put_positive_first_and_negatives_from_other_images(processor, direction):
    examples = make_examples(24, captions_per_image=3, min_regions=1, max_regions=4, max_words=6, seed=5)
    collator = DataCollatorForImageTextRetrieval(processor, num_candidates=4, negative_direction=direction)
    caption_side = 0
    for start in range(0, 24, 12):
        chunk = examples[start : start + 12]
        batch = collator(chunk)
        assert batch["labels"].dtype == torch.float32
        assert batch["labels"].tolist() == [1.0, 0.0, 0.0, 0.0] * 12
        texts, images = text_source(batch), image_source(batch)
        for group, example in enumerate(chunk):
            rows = range(4 * group, 4 * group + 4)
            own = example["example_index"]
            assert (texts[rows[0]], images[rows[0]]) == (own, own)
            negative_images = set()
            for row in rows[1:]:
                text, image = texts[row], images[row]
                assert examples[text]["image_id"] != examples[image]["image_id"]
                assert own in (text, image)
                caption_side += image == own
                negative_images.add(examples[text if image == own else image]["image_id"])
            assert len(negative_images) == 3, "the P-1 negatives of a group come from distinct images"
    if direction == "text":
        assert caption_side == 72
    elif direction == "image":
        assert caption_side == 0
    else:
        assert 24 <= caption_side <= 48


def test_retrieval_needs_enough_distinct_images(processor):
    collator = DataCollatorForImageTextRetrieval(processor, num_candidates=4)
    with pytest.raises(ValueError, match="batch of 6 examples has 2 distinct images, but num_candidates=4"):
        collator(make_examples(6, captions_per_image=3))


def test_collators_require_example_index(processor):
    examples = make_examples(4, captions_per_image=1)
    del examples[2]["example_index"]
    with pytest.raises(ValueError, match=r"example 2 \(image_id 'img2'\) has no example_index"):
        DataCollatorForImageBertPretraining(processor)(examples)
