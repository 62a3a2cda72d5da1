"""Label and id ranges are checked where data enters (processor, collators); captions cannot inject special ids."""

import numpy as np
import pytest
import torch

from modeling_imagebert.data.collators import (
    DataCollatorForImageBertPretraining,
    DataCollatorForImageTextRetrieval,
    add_labelled_positions,
)
from modeling_imagebert.processing_imagebert import ImageBertProcessor

F = 6


@pytest.fixture(scope="module")
def processor(minilm_path):
    from transformers import BertTokenizerFast

    return ImageBertProcessor(BertTokenizerFast.from_pretrained(minilm_path))


def example(i: int, input_ids=None, classes=None) -> dict:
    return {
        "image_id": f"img{i}",
        "input_ids": input_ids if input_ids is not None else [101, 2000 + i, 2001 + i, 102],
        "region_features": np.ones((2, F), np.float32),
        "region_locations": np.full((2, 5), 0.5, np.float32),
        "region_classes": np.array(classes if classes is not None else [1, 2]),
        "example_index": i,
    }


def test_special_token_strings_in_a_caption_are_tokenised_as_text(processor):
    tokenizer = processor.tokenizer
    (ids,) = processor._tokenize(["a dog [SEP] [MASK] [PAD] [CLS]"], ["record 0"])
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    inner = ids[1:-1]
    special = {
        tokenizer.sep_token_id,
        tokenizer.mask_token_id,
        tokenizer.pad_token_id,
        tokenizer.cls_token_id,
    }
    assert not special & set(inner)
    assert tokenizer.decode(inner) == "a dog [ sep ] [ mask ] [ pad ] [ cls ]"
    # and the tokenizer itself is left as it was: special tokens typed by a program still map to their ids
    assert tokenizer("[MASK]")["input_ids"][1] == tokenizer.mask_token_id


@pytest.mark.parametrize("bad", [30522, -1, 10**9])
def test_pretokenised_ids_outside_the_vocabulary_are_refused_naming_the_example(processor, bad):
    examples = [example(0), example(1, input_ids=[101, 2000, bad, 102])]
    with pytest.raises(
        ValueError, match=r"input_ids of example 1 \(image_id 'img1', example_index 1\).*vocabulary"
    ):
        processor.pad(examples)


def test_fractional_token_ids_are_refused(processor):
    with pytest.raises(ValueError, match=r"input_ids of example 0.*integer ids, got 0.5"):
        processor.pad([example(0, input_ids=np.array([101, 0.5, 102]))])


def test_region_class_ids_beyond_the_models_classes_are_refused_by_the_collator(processor):
    collator = DataCollatorForImageBertPretraining(processor, num_object_classes=1600)
    examples = [example(0), example(1, classes=[3, 1600])]
    with pytest.raises(
        ValueError, match=r"region_classes of example 1 \(image_id 'img1'.*1600.*num_object_classes"
    ):
        collator(examples)
    batch = DataCollatorForImageBertPretraining(processor, num_object_classes=1601)(examples)
    assert batch["region_class_labels"].max() <= 1600


def test_negative_region_class_ids_are_refused_even_without_a_class_count(processor):
    with pytest.raises(ValueError, match=r"region_classes of example 0.*-3.*>= 0"):
        DataCollatorForImageBertPretraining(processor)([example(0, classes=[-3, 1]), example(1)])


@pytest.mark.parametrize("itm", [[1, 2], [1, -1], [1.0, 0.5]])
def test_itm_labels_outside_zero_and_one_are_refused(itm):
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor(itm)}
    with pytest.raises(ValueError, match=r"itm_labels of batch row 1"):
        add_labelled_positions(batch)


def test_mlm_labels_below_minus_100_or_negative_are_refused():
    batch = {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, -7, 5]])}
    with pytest.raises(ValueError, match=r"labels of batch row 0, position 1: -7"):
        add_labelled_positions(batch)


def test_collators_make_labels_in_range_by_construction(processor):
    examples = [example(i) for i in range(6)]
    batch = DataCollatorForImageBertPretraining(processor, itm_negative_rate=0.5)(examples)
    assert set(batch["itm_labels"].tolist()) <= {0, 1}
    retrieval = DataCollatorForImageTextRetrieval(processor, num_candidates=3)(examples)
    assert set(retrieval["labels"].tolist()) == {0.0, 1.0}
