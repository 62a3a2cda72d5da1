"""Every config and processor class of ours survives `save_pretrained` / `from_pretrained` with non-default
settings, directly and through the Auto classes, on whichever transformers is installed (CI: the pinned one;
`make test-latest`: the newest allowed). transformers 5.25 changed `ImageProcessingMixin.from_dict` (it reads the
class's `valid_kwargs`), which broke loading any saved detector folder: these tests would have caught it."""

import json

import pytest
import torch

from modeling_imagebert import ImageBertConfig, ImageBertProcessor
from modeling_imagebert.features import BUTDConfig, BUTDImageProcessor


def _settings(obj) -> dict:
    """What a class saves, without the bookkeeping fields transformers adds on the way (its version)."""
    settings = obj.to_dict()
    settings.pop("transformers_version", None)
    return settings


@pytest.mark.parametrize(
    ("config_class", "overrides"),
    [
        (
            ImageBertConfig,
            {"num_hidden_layers": 3, "max_regions": 7, "visual_feature_dim": 64, "itc_loss_weight": 0.5},
        ),
        (BUTDConfig, {"num_classes": 11, "num_attributes": 5, "box_size_offset": 1.0}),
    ],
)
def test_config_round_trips_with_its_settings(config_class, overrides, tmp_path):
    config = config_class(**overrides)
    config.save_pretrained(tmp_path)
    loaded = config_class.from_pretrained(tmp_path)
    assert type(loaded) is config_class
    assert _settings(loaded) == _settings(config)
    for key, value in overrides.items():
        assert getattr(loaded, key) == value


def test_butd_image_processor_round_trips_and_takes_overrides(tmp_path):
    processor = BUTDImageProcessor(min_size=400, max_size=700, image_mean=[1.0, 2.0, 3.0])
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert (saved["min_size"], saved["max_size"], saved["image_mean"]) == (400, 700, [1.0, 2.0, 3.0])

    loaded = BUTDImageProcessor.from_pretrained(tmp_path)
    assert (loaded.min_size, loaded.max_size, loaded.image_mean) == (400, 700, [1.0, 2.0, 3.0])
    # A keyword argument that is a setting overrides the saved value (what `valid_kwargs` declares on 5.25+).
    assert BUTDImageProcessor.from_pretrained(tmp_path, max_size=500).max_size == 500

    image = torch.randint(0, 256, (50, 80, 3), dtype=torch.uint8).numpy()
    expected = processor.preprocess_one(image)["pixel_values"]
    assert torch.equal(loaded.preprocess_one(image)["pixel_values"], expected)


def test_a_detector_folder_loads_its_processor_through_the_features_loader(tmp_path):
    """The features CLI, the parity tool and LAIT read a detector folder this way: on transformers 5.25 before the
    fix it raised `AttributeError: ... has no attribute 'valid_kwargs'` here."""
    from test_butd_detector import tiny_detector

    from modeling_imagebert.features import BUTDDetector

    tiny_detector(num_classes=5).save_pretrained(tmp_path)
    BUTDImageProcessor(min_size=64, max_size=96).save_pretrained(tmp_path)
    detector = BUTDDetector.from_pretrained(tmp_path)
    processor = BUTDImageProcessor.from_pretrained(tmp_path)
    assert detector.config.num_classes == 5 and (processor.min_size, processor.max_size) == (64, 96)


def test_imagebert_processor_round_trips_directly_and_through_auto_processor(minilm_path, tmp_path):
    from transformers import AutoProcessor, BertTokenizerFast

    processor = ImageBertProcessor(
        BertTokenizerFast.from_pretrained(minilm_path), max_regions=5, max_text_length=9
    )
    processor.save_pretrained(tmp_path)
    ImageBertConfig(max_regions=5, max_text_length=9).save_pretrained(tmp_path)
    for loaded in (ImageBertProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, ImageBertProcessor)
        assert (loaded.max_regions, loaded.max_text_length) == (5, 9)
        assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
        assert (
            loaded.tokenizer("a dog on grass")["input_ids"]
            == processor.tokenizer("a dog on grass")["input_ids"]
        )
