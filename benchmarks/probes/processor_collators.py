"""Probes of the processor (`ImageBertProcessor` encoding and padding) and the collators: records and batches
of the wrong shape, type or range."""

from __future__ import annotations

import numpy as np

from .harness import F, Probes, good_row


def probe_processor_and_collators(p: Probes, processor) -> None:
    import torch

    from modeling_imagebert.data.collators import (
        DataCollatorForImageBertPretraining,
        DataCollatorForImageTextRetrieval,
        add_labelled_positions,
    )

    p.entry = "processor"
    record = {k: v for k, v in good_row(0).items()}

    def encode(**change) -> dict:
        return processor.encode_record({**record, **change}, 7)

    p.error("caption empty", lambda: encode(caption=" "), "record 7", "caption")
    p.error("caption not a string", lambda: encode(caption=3), "record 7", "caption")
    p.error(
        "region_features 3-D",
        lambda: encode(region_features=np.ones((1, 3, F))),
        "record 7",
        "region_features",
    )
    p.error("boxes wrong shape", lambda: encode(region_boxes=np.ones((3, 5))), "record 7", "region_boxes")
    p.error("boxes NaN", lambda: encode(region_boxes=np.full((3, 4), np.nan)), "record 7", "region_boxes")
    p.error("image width 0", lambda: encode(image_width=0), "record 7", "image_width")
    p.error(
        "class ids fractional", lambda: encode(region_classes=[0.5, 1.0, 2.0]), "record 7", "region_classes"
    )
    p.error("scores NaN", lambda: encode(region_scores=[np.nan] * 3), "record 7", "region_scores")
    p.error("scores missing", lambda: encode(region_scores=None), "record 7", "region_scores")
    p.error("image id missing", lambda: encode(image_id=None), "record 7", "image_id")
    special = processor.tokenizer.all_special_ids
    p.result(
        "caption '[SEP] [MASK] [PAD]' injects no special ids",
        lambda: encode(caption="a [SEP] [MASK] [PAD] b")["input_ids"],
        lambda ids: not set(ids[1:-1]) & set(special),
    )
    encoded = encode()
    p.error(
        "pad: token id beyond the vocabulary",
        lambda: processor.pad([{**encoded, "input_ids": [101, 40000, 102]}]),
        "image_id 'img0'",
        "input_ids",
    )
    p.error(
        "pad: negative token id",
        lambda: processor.pad([{**encoded, "input_ids": [101, -4, 102]}]),
        "input_ids",
        "-4",
    )
    p.error(
        "pad: fractional token id",
        lambda: processor.pad([{**encoded, "input_ids": np.array([101, 2.5, 102])}]),
        "input_ids",
    )
    p.error(
        "pad: region class id negative",
        lambda: processor.pad(
            [{**encoded, "region_classes": np.array([-2, 0, 1])}], return_region_classes=True
        ),
        "region_classes",
    )
    p.error(
        "pad: mixed feature dims",
        lambda: processor.pad([encoded, {**encoded, "region_features": np.ones((3, F + 1))}]),
        "dimension",
    )
    p.error("call: return_tensors np", lambda: processor(text="a", return_tensors="np"), "return_tensors")
    p.error("call: empty text list", lambda: processor(text=[]), "text")

    p.entry = "collators"
    examples = [{**encode(caption=f"c {i}", image_id=f"img{i}"), "example_index": i} for i in range(4)]
    pretraining = DataCollatorForImageBertPretraining(processor, num_object_classes=2)
    p.error(
        "class id >= num_object_classes",
        lambda: pretraining(examples),
        "region_classes",
        "num_object_classes",
    )
    p.error("empty batch", lambda: DataCollatorForImageBertPretraining(processor)([]), "empty")
    p.error(
        "example without example_index",
        lambda: DataCollatorForImageBertPretraining(processor)([{**examples[0], "example_index": None}]),
        "example_index",
    )
    p.error(
        "example without image_id",
        lambda: DataCollatorForImageBertPretraining(processor)([{**examples[0], "image_id": None}]),
        "image_id",
    )
    p.error(
        "probability above 1",
        lambda: DataCollatorForImageBertPretraining(processor, mlm_probability=1.5),
        "mlm_probability",
    )
    p.error(
        "num_candidates 0",
        lambda: DataCollatorForImageTextRetrieval(processor, num_candidates=0),
        "num_candidates",
    )
    p.error("seed not an int", lambda: DataCollatorForImageTextRetrieval(processor, seed=0.5), "seed")
    p.error(
        "itm_labels of 2",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor([1, 2])}
        ),
        "itm_labels",
    )
    p.error(
        "itm_labels of -1",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor([1, -1])}
        ),
        "itm_labels",
    )
    p.error(
        "itm_labels of 0.5",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor([1.0, 0.5])}
        ),
        "itm_labels",
    )
    p.error(
        "MLM label -7",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, -7, 1]])}
        ),
        "labels",
        "-7",
    )
    batch = DataCollatorForImageTextRetrieval(processor, num_candidates=3)(examples)
    p.result(
        "retrieval labels made by the collator",
        lambda: batch["labels"],
        lambda labels: set(labels.tolist()) == {0.0, 1.0},
    )
