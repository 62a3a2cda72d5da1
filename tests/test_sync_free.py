"""The training step never waits on the device: a forward + backward of the pre-training and retrieval models on the
collators' batches performs no host-device synchronisation (no scalar read, no data-dependent shape), and computes
the same losses and gradients as the plain computation from the labels."""

import numpy as np
import pytest
import torch
from sync_counter import SyncCounter
from torch.nn import functional as F

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertForRetrieval
from modeling_imagebert.data.collators import (
    POSITION_KEYS,
    DataCollatorForImageBertPretraining,
    DataCollatorForImageTextRetrieval,
    DataCollatorForTextMLM,
    add_labelled_positions,
)
from modeling_imagebert.processing_imagebert import ImageBertProcessor

FEATURE_DIM = 12


@pytest.fixture(scope="module")
def processor(minilm_path):
    from transformers import BertTokenizerFast

    return ImageBertProcessor(BertTokenizerFast.from_pretrained(minilm_path))


def _config(processor, **overrides) -> ImageBertConfig:
    kwargs = dict(
        vocab_size=len(processor.tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        visual_feature_dim=FEATURE_DIM,
        num_object_classes=1600,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ImageBertConfig(**{**kwargs, **overrides})


def _examples(count, captions_per_image=2, seed=0):
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        n = int(rng.integers(1, 9))
        examples.append(
            {
                "image_id": f"img{i // captions_per_image}",
                "input_ids": [101, *rng.integers(3000, 29000, int(rng.integers(3, 12))).tolist(), 102],
                "region_features": rng.standard_normal((n, FEATURE_DIM)).astype(np.float16),
                "region_locations": rng.uniform(0, 1, (n, 5)).astype(np.float32),
                "region_classes": rng.integers(0, 1600, n),
                "example_index": i,
            }
        )
    return examples


def _pretraining_batch(processor, seed=1, **collator_kwargs):
    collator = DataCollatorForImageBertPretraining(
        processor, mlm_probability=0.3, region_mask_probability=0.3, seed=seed, **collator_kwargs
    )
    return collator(_examples(8, seed=seed))


def _seeded(cls, config):
    torch.manual_seed(0)
    return cls(config).train()


def _count_step(model, batch) -> SyncCounter:
    with SyncCounter() as counter:
        model(**batch).loss.backward()
    return counter


def test_pretraining_step_on_a_collator_batch_never_synchronises(processor):
    model = _seeded(ImageBertForPreTraining, _config(processor))
    counter = _count_step(model, _pretraining_batch(processor))
    assert counter.total == 0, dict(counter.counts)


def test_pretraining_step_with_dropout_and_the_global_feature_never_synchronises(processor):
    config = _config(
        processor, hidden_dropout_prob=0.1, use_global_image_feature=True, global_image_feature_dim=6
    )
    model = _seeded(ImageBertForPreTraining, config)
    batch = _pretraining_batch(processor)
    batch["global_image_features"] = torch.randn(batch["input_ids"].shape[0], 6)
    add_labelled_positions(batch)  # the positions of the regions move by one with the global token
    counter = _count_step(model, batch)
    assert counter.total == 0, dict(counter.counts)


def test_text_only_and_itm_only_batches_never_synchronise(processor):
    model = _seeded(ImageBertForPreTraining, _config(processor))
    examples = _examples(6)
    text = DataCollatorForTextMLM(processor, mlm_probability=0.3, seed=3)(
        [{"input_ids": e["input_ids"], "example_index": e["example_index"]} for e in examples]
    )
    assert _count_step(model, text).total == 0
    itm = DataCollatorForImageBertPretraining(processor, mlm_probability=0.0, region_mask_probability=0.0)(
        examples
    )
    for name in ("labels", "masked_regions", "region_class_labels", "region_feature_targets"):
        itm.pop(name)
    add_labelled_positions(itm)
    assert _count_step(model, itm).total == 0


@pytest.mark.parametrize("loss", ["binary", "ce", "triplet", "binary+0.5*ce+triplet"])
def test_retrieval_step_on_a_collator_batch_never_synchronises(processor, loss):
    model = _seeded(ImageBertForRetrieval, _config(processor, retrieval_loss=loss))
    batch = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2)(
        _examples(6, captions_per_image=1)
    )
    counter = _count_step(model, batch)
    assert counter.total == 0, dict(counter.counts)


def test_the_counter_sees_the_synchronising_paths(processor):
    # The same step without the collator's positions derives them from the labels on the host, and
    # config.check_inputs reads values: both must be counted, or the zero above would prove nothing.
    model = _seeded(ImageBertForPreTraining, _config(processor))
    batch = _pretraining_batch(processor)
    plain = {k: v for k, v in batch.items() if k not in POSITION_KEYS}
    assert _count_step(model, plain).counts["aten::nonzero"] == 3  # MLM, MOC and MRFR positions
    model.config.check_inputs = True
    assert _count_step(model, batch).total > 0
    x = torch.arange(6.0)
    with SyncCounter() as counter:
        x[x > 2].sum().item()
    assert counter.counts["bool_mask_index"] == 1 and counter.counts["aten::_local_scalar_dense"] == 1


def _reference_losses(model, batch) -> dict[str, torch.Tensor]:
    """Today's computation, written out plainly: the full encoder output, boolean masks of the labelled positions of
    matched pairs, mean cross-entropy / mean squared error over them, BCE for ITM."""
    base = model.imagebert(
        **{
            k: batch[k]
            for k in (
                "input_ids",
                "attention_mask",
                "token_type_ids",
                "region_features",
                "region_locations",
                "region_attention_mask",
            )
        }
    )
    matched = (batch["itm_labels"] == 1)[:, None]
    text, regions = base.text_hidden_state, base.region_hidden_state
    mlm = (batch["labels"] != -100) & matched
    moc = (batch["region_class_labels"] != -100) & matched
    mrfr = batch["masked_regions"] & matched
    itm_logits = model.itm_head(base.pooler_output).squeeze(-1)
    return {
        "mlm": F.cross_entropy(model.mlm_head(text[mlm]), batch["labels"][mlm]),
        "moc": F.cross_entropy(model.moc_head(regions[moc]), batch["region_class_labels"][moc]),
        "mrfr": F.mse_loss(model.mrfr_head(regions[mrfr]), batch["region_feature_targets"][mrfr]),
        "itm": F.binary_cross_entropy_with_logits(itm_logits, batch["itm_labels"].float()),
    }


def _gradients(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("sparse_last_layer", [True, False])
def test_indexed_heads_give_the_reference_losses_and_gradients(processor, sparse_last_layer):
    model = _seeded(ImageBertForPreTraining, _config(processor))
    model.set_fast_paths(sparse_last_layer=sparse_last_layer)
    batch = _pretraining_batch(processor, seed=4)
    assert bool((batch["itm_labels"] == 0).any()) and bool((batch["labels"] != -100).any())

    out = model(**batch)
    out.loss.backward()
    fast = _gradients(model)
    # ITC is off: its head is kept in the graph (for DDP) with zero gradients, which the reference does not do.
    itc = {name: fast.pop(name) for name in list(fast) if name.startswith("itc_head.")}
    assert itc and all(not bool(grad.any()) for grad in itc.values())
    model.zero_grad()
    reference = _reference_losses(model, batch)
    sum(reference.values()).backward()
    slow = _gradients(model)

    for task, value in reference.items():
        torch.testing.assert_close(getattr(out, f"{task}_loss"), value, rtol=1e-5, atol=1e-6)
    assert fast.keys() == slow.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-6, msg=name)


def test_positions_from_the_collator_equal_the_ones_derived_from_the_labels(processor):
    model = _seeded(ImageBertForPreTraining, _config(processor))
    batch = _pretraining_batch(processor, seed=5)
    with_positions = model(**batch)
    derived = model(**{k: v for k, v in batch.items() if k not in POSITION_KEYS})
    for task in ("mlm", "moc", "mrfr", "itm"):
        torch.testing.assert_close(getattr(with_positions, f"{task}_loss"), getattr(derived, f"{task}_loss"))


def test_positions_leave_out_mismatched_pairs_and_list_the_pooler_row_first(processor):
    batch = _pretraining_batch(processor, seed=6)
    length = batch["input_ids"].shape[1]
    rows = batch["mlm_positions"] // length
    assert bool((batch["itm_labels"][rows] == 1).all())
    positions = batch["last_layer_positions"]
    assert bool((positions[:, 0] == 0).all())
    for row in positions:  # distinct within each row
        assert len(set(row.tolist())) == len(row)


def test_a_batch_without_labelled_tokens_still_reaches_every_head(processor):
    # One ignored entry keeps each head in the graph (DDP needs a gradient for every parameter), with a zero loss.
    model = _seeded(ImageBertForPreTraining, _config(processor))
    batch = DataCollatorForImageBertPretraining(processor, mlm_probability=0.0, region_mask_probability=0.0)(
        _examples(4)
    )
    assert batch["mlm_positions"].tolist() == [-100]
    out = model(**batch)
    assert [float(v.detach()) for v in (out.mlm_loss, out.moc_loss, out.mrfr_loss)] == [0.0, 0.0, 0.0]
    out.loss.backward()
    assert model.mlm_head.transform.dense.weight.grad is not None
    assert model.mrfr_head.decoder.weight.grad is not None


def test_scoring_pairs_never_synchronises(processor):
    # Zero-shot retrieval ranks by the ITM score of the pre-training model: [CLS] alone in the last layer.
    model = _seeded(ImageBertForPreTraining, _config(processor)).eval()
    batch = _pretraining_batch(processor)
    inputs = {
        k: batch[k]
        for k in (
            "input_ids",
            "attention_mask",
            "token_type_ids",
            "region_features",
            "region_locations",
            "region_attention_mask",
        )
    }
    with torch.inference_mode(), SyncCounter() as counter:
        model.score(**inputs)
    assert counter.total == 0, dict(counter.counts)


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0])
def test_check_inputs_refuses_itm_and_retrieval_labels_other_than_0_and_1(processor, bad):
    config = _config(processor, check_inputs=True)
    batch = _pretraining_batch(processor)
    batch["itm_labels"] = batch["itm_labels"].float()
    batch["itm_labels"][0] = bad
    with pytest.raises(ValueError, match="itm_labels must be 0 or 1"):
        _seeded(ImageBertForPreTraining, config)(**batch)
    retrieval = DataCollatorForImageTextRetrieval(processor, num_candidates=3, seed=2)(
        _examples(6, captions_per_image=1)
    )
    retrieval["labels"][1] = bad
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        _seeded(ImageBertForRetrieval, config)(**retrieval)
