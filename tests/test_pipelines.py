"""Transformers pipelines on a saved ImageBERT checkpoint with a detector-backed processor.

Real photographs (scikit-image's), a tiny random BUTD detector and a tiny ImageBERT: the zero-shot image
classification pipeline's scores equal a manual `model(**processor(...))` call softmaxed over the labels, in the
package and as remote code without it."""

import json
import textwrap

import pytest
import torch
from feature_fixtures import save_tiny_detector, write_photos
from PIL import Image

from modeling_imagebert import (
    ImageBertConfig,
    ImageBertForRetrieval,
    ImageBertImageProcessor,
    ImageBertProcessor,
)

MAX_REGIONS = 12
LABELS = ["cat", "astronaut", "cup of coffee"]
TEMPLATE = "This is a photo of {}."


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    folder = write_photos(
        tmp_path_factory.mktemp("photos"), names=("chelsea", "astronaut", "coffee"), size=128
    )
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def processor(tokenizer, tmp_path_factory):
    detector = save_tiny_detector(tmp_path_factory.mktemp("detector"))
    return ImageBertProcessor(tokenizer, max_regions=MAX_REGIONS, max_text_length=16, detector=detector)


def tiny_model(tokenizer, **overrides) -> ImageBertForRetrieval:
    config = ImageBertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        visual_feature_dim=64,  # the tiny detector's hidden size
        num_object_classes=20,
        max_regions=MAX_REGIONS,
        max_text_length=16,
        initializer_range=0.5,  # random scores far enough apart that the ranking means something
        **overrides,
    )
    torch.manual_seed(0)
    return ImageBertForRetrieval(config).eval()


@pytest.fixture(scope="module")
def checkpoint(tokenizer, processor, tmp_path_factory):
    """A folder as a user saves it: the retrieval model and the detector-backed processor side by side."""
    folder = tmp_path_factory.mktemp("checkpoint")
    tiny_model(tokenizer).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def manual_label_scores(model, processor, image, labels=LABELS) -> torch.Tensor:
    """What the zero-shot pipeline must give: the model on the processor's inputs of (image, each label's
    sentence), the logits softmaxed over the labels, `(n_labels,)`."""
    sentences = [TEMPLATE.format(label) for label in labels]
    with torch.no_grad():
        return model(**processor(text=sentences, images=[image] * len(labels))).logits.softmax(-1)


def test_the_image_processor_gives_the_processors_region_inputs(processor, checkpoint, photos):
    from transformers import AutoImageProcessor

    saved = json.loads((checkpoint / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_imagebert.ImageBertImageProcessor"}
    expected = processor(images=photos)
    for loaded in (
        ImageBertImageProcessor.from_pretrained(checkpoint),
        AutoImageProcessor.from_pretrained(checkpoint),
    ):
        assert isinstance(loaded, ImageBertImageProcessor)
        inputs = loaded(images=photos, return_tensors="pt")
        assert set(inputs) == set(expected)
        for key in expected:
            assert torch.equal(inputs[key], expected[key]), key


def test_zero_shot_pipeline_scores_equal_a_manual_model_call(processor, checkpoint, photos):
    from transformers import pipeline

    classifier = pipeline("zero-shot-image-classification", model=str(checkpoint), trust_remote_code=True)
    assert isinstance(classifier.model, ImageBertForRetrieval)
    model = ImageBertForRetrieval.from_pretrained(checkpoint).eval()
    for path in photos:
        image = Image.open(path)
        results = classifier(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)
        scores = dict(zip(LABELS, manual_label_scores(model, processor, image).tolist(), strict=True))
        assert [result["label"] for result in results] == sorted(LABELS, key=lambda label: -scores[label])
        for result in results:  # the same computation: the broadcast image is the repeated one
            assert result["score"] == scores[result["label"]]
    assert len({result["label"] for result in results}) == len(LABELS)


def test_zero_shot_pipeline_runs_as_remote_code_without_the_package(processor, checkpoint, photos, tmp_path):
    from isolated import run_without_package

    model = ImageBertForRetrieval.from_pretrained(checkpoint).eval()
    expected = {
        str(path): manual_label_scores(model, processor, Image.open(path)).tolist() for path in photos
    }
    script = textwrap.dedent(
        f"""
        import pytest
        import torch
        from transformers import pipeline
        torch.set_num_threads({torch.get_num_threads()})
        expected = {expected!r}
        labels = {LABELS!r}
        classifier = pipeline(
            "zero-shot-image-classification", model={str(checkpoint)!r}, trust_remote_code=True
        )
        assert type(classifier.model).__module__.startswith("transformers_modules."), type(classifier.model)
        assert type(classifier.image_processor).__name__ == "ImageBertImageProcessor"
        for path, scores in expected.items():
            results = classifier(path, candidate_labels=labels, hypothesis_template={TEMPLATE!r})
            for result in results:
                assert result["score"] == pytest.approx(scores[labels.index(result["label"])], rel=1e-5, abs=1e-7)
        print("OK")
        """
    )
    result = run_without_package(script, tmp_path, timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
