"""ImageBertProcessor: encoding dataset rows, ad-hoc inference inputs, padding, save/load."""

import numpy as np
import pytest
import torch

from modeling_imagebert.processing_imagebert import ImageBertProcessor, region_locations

FEATURE_DIM = 8


@pytest.fixture(scope="module")
def processor(minilm_path):
    from transformers import BertTokenizerFast

    return ImageBertProcessor(
        BertTokenizerFast.from_pretrained(minilm_path), max_regions=4, max_text_length=8
    )


def make_record(
    num_regions=6, seed=0, caption="a brown dog runs on the green grass near a lake", image_id="img0"
):
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0, 50, num_regions)
    y1 = rng.uniform(0, 30, num_regions)
    boxes = np.stack(
        [x1, y1, x1 + rng.uniform(1, 50, num_regions), y1 + rng.uniform(1, 30, num_regions)], axis=1
    )
    return {
        "image_id": image_id,
        "caption": caption,
        "region_features": rng.standard_normal((num_regions, FEATURE_DIM)).astype(np.float16),
        "region_boxes": boxes.astype(np.float32),
        "image_width": 100,
        "image_height": 60,
        "region_classes": rng.integers(0, 1600, num_regions).astype(np.int32),
        "region_scores": rng.uniform(0, 1, num_regions).astype(np.float32),
    }


def test_region_locations_match_hand_computed_values():
    boxes = np.array([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 200.0, 100.0]])
    expected = np.array(
        [[0.05, 0.2, 0.15, 0.6, 20 * 40 / (200 * 100)], [0.0, 0.0, 1.0, 1.0, 1.0]], dtype=np.float32
    )
    np.testing.assert_allclose(region_locations(boxes, 200, 100), expected, rtol=1e-6)


def test_encode_record_keeps_top_regions_by_score_stable_on_ties(processor):
    record = make_record(num_regions=6)
    record["region_scores"] = np.array([0.1, 0.9, 0.5, 0.9, 0.2, 0.7], dtype=np.float32)
    encoded = processor.encode_record(record, index=11)
    keep = [1, 3, 5, 2]  # score-descending; the tied 0.9s keep detector order
    np.testing.assert_array_equal(encoded["region_features"], record["region_features"][keep])
    np.testing.assert_array_equal(encoded["region_classes"], record["region_classes"][keep])
    np.testing.assert_allclose(
        encoded["region_locations"], region_locations(record["region_boxes"][keep], 100, 60), rtol=1e-6
    )
    assert encoded["region_features"].dtype == np.float16
    assert encoded["example_index"] == 11
    assert encoded["image_id"] == "img0"


def test_encode_record_truncates_caption_to_max_text_length(processor):
    encoded = processor.encode_record(make_record(), index=0)
    tokenizer = processor.tokenizer
    full = tokenizer("a brown dog runs on the green grass near a lake")["input_ids"]
    assert len(full) > 8
    assert encoded["input_ids"] == full[:7] + [tokenizer.sep_token_id]
    short = processor.encode_record(make_record(caption="a dog"), index=0)
    assert short["input_ids"] == [
        tokenizer.cls_token_id,
        *tokenizer("a dog", add_special_tokens=False)["input_ids"],
        102,
    ]


def test_encode_record_errors_name_field_and_record(processor):
    record = make_record(num_regions=3, image_id="img42")
    record["region_boxes"] = record["region_boxes"][:, :3]
    with pytest.raises(ValueError, match=r"region_boxes of record 7 \(image_id 'img42'\).*\[N, 4\]"):
        processor.encode_record(record, index=7)
    record = make_record(num_regions=3)
    record["region_scores"] = record["region_scores"][:2]
    with pytest.raises(ValueError, match="region_scores of record 1.*2 scores for 3"):
        processor.encode_record(record, index=1)
    record = make_record(num_regions=3)
    record["region_boxes"][0] = [10, 10, 5, 20]
    with pytest.raises(ValueError, match="box 0.*x2 < x1"):
        processor.encode_record(record, index=0)
    with pytest.raises(ValueError, match="caption of record 0"):
        processor.encode_record(make_record(caption=""), index=0)


def test_call_pads_text_and_regions_to_the_longest_in_the_batch(processor):
    first, second = make_record(num_regions=3, seed=1), make_record(num_regions=0, seed=2)
    inputs = processor(
        text=["a dog", "a cat sits on a red mat"],
        region_features=[first["region_features"], second["region_features"]],
        region_boxes=[first["region_boxes"], second["region_boxes"]],
        image_width=[100, 100],
        image_height=[60, 60],
        region_scores=[first["region_scores"], second["region_scores"]],
    )
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8]
    assert inputs["input_ids"][0, 4:].tolist() == [processor.tokenizer.pad_token_id] * 4
    assert inputs["region_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert inputs["region_features"].dtype == torch.float32
    order = np.argsort(-first["region_scores"], kind="stable")
    torch.testing.assert_close(
        inputs["region_features"][0], torch.from_numpy(first["region_features"][order]).float()
    )
    assert inputs["region_features"][1].abs().sum() == 0
    assert (inputs["token_type_ids"] == 0).all()


def test_call_on_text_only_and_regions_only(processor):
    text_only = processor("a dog")
    assert set(text_only) == {"input_ids", "attention_mask", "token_type_ids"}
    assert text_only["input_ids"].shape == (1, 4)
    record = make_record(num_regions=2)
    regions_only = processor(
        region_features=torch.from_numpy(record["region_features"]),
        region_boxes=record["region_boxes"],
        image_width=100,
        image_height=60,
    )
    assert set(regions_only) == {"region_features", "region_locations", "region_attention_mask"}
    torch.testing.assert_close(
        regions_only["region_locations"][0],
        torch.from_numpy(region_locations(record["region_boxes"], 100, 60)),
    )


def test_call_errors_name_argument_and_item(processor):
    record = make_record(num_regions=2)
    with pytest.raises(ValueError, match="text has 2 items but region_features has 1"):
        processor(["a", "b"], record["region_features"], record["region_boxes"], 100, 60)
    with pytest.raises(ValueError, match=r"region_boxes of item 1: expected shape \[N, 4\]"):
        processor(
            ["a", "b"],
            [record["region_features"]] * 2,
            [record["region_boxes"], record["region_boxes"][:, :2]],
            [100, 100],
            [60, 60],
        )
    with pytest.raises(ValueError, match="region_scores of item 0: 6 regions exceed max_regions=4"):
        many = make_record(num_regions=6)
        processor("a", many["region_features"], many["region_boxes"], 100, 60)
    with pytest.raises(ValueError, match="image_height of item 0"):
        processor("a", record["region_features"], record["region_boxes"], 100, 0)


def test_save_and_load_round_trip(processor, tmp_path):
    from transformers import AutoProcessor

    from modeling_imagebert import ImageBertConfig

    processor.save_pretrained(tmp_path)
    loaded = ImageBertProcessor.from_pretrained(tmp_path)
    assert (loaded.max_regions, loaded.max_text_length) == (4, 8)
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    record = make_record()
    assert loaded.encode_record(record, 0)["input_ids"] == processor.encode_record(record, 0)["input_ids"]
    ImageBertConfig().save_pretrained(tmp_path)
    auto = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(auto, ImageBertProcessor) and auto.max_regions == 4


def test_prepare_dataset_keeps_float16_and_writes_example_index(processor):
    from datasets import Dataset

    from modeling_imagebert.data.schema import image_text_features

    records = [make_record(num_regions=n, seed=n, image_id=f"img{n}") for n in (0, 3, 6)]
    dataset = Dataset.from_list(records, features=image_text_features(FEATURE_DIM))
    encoded = processor.prepare_dataset(dataset)
    assert sorted(encoded.column_names) == sorted(
        ["image_id", "input_ids", "region_features", "region_locations", "region_classes", "example_index"]
    )
    rows = [encoded[i] for i in range(3)]
    assert [row["example_index"] for row in rows] == [0, 1, 2]
    assert [len(row["region_features"]) for row in rows] == [0, 3, 4]
    assert rows[2]["region_features"].dtype == np.float16
    expected = processor.encode_record(records[2], 2)
    np.testing.assert_array_equal(rows[2]["region_features"], expected["region_features"])
    batch = processor.pad(rows)
    assert batch["region_features"].shape == (3, 4, FEATURE_DIM)
    assert batch["region_attention_mask"].sum(1).tolist() == [0, 3, 4]


def test_captions_are_tokenised_in_one_batched_call(processor, monkeypatch):
    from datasets import Dataset

    from modeling_imagebert.data.schema import image_text_features

    calls = []
    tokenizer = processor.tokenizer
    original = type(tokenizer).__call__

    def counting(self, text, *args, **kwargs):
        calls.append(len(text) if isinstance(text, list) else 1)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    captions = ["a dog", "two cats on a mat", "a red car"]
    processor(text=captions)
    assert calls == [3]

    calls.clear()
    records = [make_record(seed=i, caption=c, image_id=f"img{i}") for i, c in enumerate(captions)]
    features = image_text_features(FEATURE_DIM)
    dataset = Dataset.from_list(records, features=features)
    encoded = processor.prepare_dataset(dataset)
    assert calls == [3]
    # Same ids as the one-record path.
    for i, record in enumerate(records):
        assert encoded[i]["input_ids"].tolist() == processor.encode_record(record, i)["input_ids"]


def test_processor_loads_through_autoprocessor_without_the_package(processor, tmp_path):
    import textwrap

    from isolated import run_without_package

    folder = tmp_path / "hub_folder"
    processor.save_pretrained(folder)
    expected = processor(text=["a dog on grass"])["input_ids"].tolist()
    script = textwrap.dedent(
        f"""
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "ImageBertProcessor", type(processor)
        assert processor.max_regions == {processor.max_regions} and processor.max_text_length == {processor.max_text_length}
        assert processor(text=["a dog on grass"])["input_ids"].tolist() == {expected!r}
        print("OK")
        """
    )
    result = run_without_package(script, tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
