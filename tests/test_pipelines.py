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


@pytest.mark.parametrize("score", ["itc", "itm+itc"])
def test_zero_shot_pipeline_ranks_by_the_configured_score(processor, checkpoint, photos, score):
    from transformers import pipeline

    classifier = pipeline(
        "zero-shot-image-classification",
        model=str(checkpoint),
        model_kwargs={"zero_shot_score": score},
        trust_remote_code=True,
    )
    assert classifier.model.config.zero_shot_score == score
    image = Image.open(photos[0])
    # the texts (batch 3) and the image (batch 1) as the pipeline passes them
    inputs = {**processor(text=[TEMPLATE.format(label) for label in LABELS]), **processor(images=[image])}
    with torch.no_grad():  # one image against the labels: the model's own grid scores
        expected = classifier.model(**inputs).logits_per_image[0].softmax(-1).tolist()
    results = classifier(image, candidate_labels=LABELS, hypothesis_template=TEMPLATE)
    for result in results:
        assert result["score"] == pytest.approx(expected[LABELS.index(result["label"])], rel=1e-5, abs=1e-7)


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


# ------------------------------------------------------------------------------------------ image-text-retrieval

CAPTIONS = ["a cat looks to the side", "a woman in a space suit", "a cup of coffee on a saucer"]


def manual_pair_scores(model, processor, image, text) -> tuple[float, float]:
    """(ITM probability, ITC cosine) of one pair from the model's own calls on the processor's inputs."""
    inputs = processor(text=[text], images=[image])
    text_inputs = {key: inputs[key] for key in ("input_ids", "attention_mask", "token_type_ids")}
    image_inputs = {
        key: inputs[key] for key in ("region_features", "region_locations", "region_attention_mask")
    }
    with torch.no_grad():
        itm = model(**inputs).logits.sigmoid().item()
        text_embeds = model.get_text_features(**text_inputs).pooler_output
        image_embeds = model.get_image_features(**image_inputs).pooler_output
    return itm, (image_embeds @ text_embeds.T).item()


@pytest.fixture(scope="module")
def retriever(tokenizer, processor):
    from transformers import pipeline

    model = tiny_model(tokenizer)
    return pipeline(
        "image-text-retrieval",
        model=model,
        tokenizer=tokenizer,
        image_processor=ImageBertImageProcessor(processor),
    )


def test_retrieval_pipeline_gives_both_scores_of_manual_calls_in_any_batching(retriever, processor, photos):
    from modeling_imagebert import ImageTextRetrievalPipeline

    assert isinstance(retriever, ImageTextRetrievalPipeline)
    results = retriever(
        [str(path) for path in photos], texts=CAPTIONS, pair_batch_size=2
    )  # chunks of 2 and 1
    assert len(results) == len(photos)
    for path, per_text in zip(photos, results, strict=True):
        assert [result["text"] for result in per_text] == CAPTIONS
        for result in per_text:
            itm, itc = manual_pair_scores(retriever.model, processor, str(path), result["text"])
            assert result["itm_score"] == pytest.approx(itm, rel=1e-5, abs=1e-6)
            assert result["itc_score"] == pytest.approx(itc, rel=1e-5, abs=1e-6)
            assert 0 <= result["itm_score"] <= 1 and -1 <= result["itc_score"] <= 1
    # one image in gives one list out; the batching changes nothing but the rounding
    single = retriever(Image.open(photos[0]), texts=CAPTIONS, pair_batch_size=32)
    for ours, theirs in zip(single, results[0], strict=True):
        assert ours["itm_score"] == pytest.approx(theirs["itm_score"], rel=1e-5, abs=1e-6)
        assert ours["itc_score"] == pytest.approx(theirs["itc_score"], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="pass texts"):
        retriever(str(photos[0]))
    with pytest.raises(ValueError, match="pair_batch_size must be an int >= 1"):
        retriever(str(photos[0]), texts=CAPTIONS, pair_batch_size=0)


def test_retrieval_pipeline_is_saved_as_remote_code_and_runs_without_the_package(
    retriever, processor, photos, tmp_path
):
    from isolated import run_without_package

    folder = tmp_path / "retriever"
    retriever.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["custom_pipelines"]["image-text-retrieval"]["impl"] == (
        "pipeline_imagebert.ImageTextRetrievalPipeline"
    )
    assert config["custom_pipelines"]["image-text-retrieval"]["pt"] == ["AutoModelForSequenceClassification"]
    assert (folder / "pipeline_imagebert.py").is_file() and (folder / "detector" / "config.json").is_file()
    expected = retriever([str(path) for path in photos], texts=CAPTIONS, pair_batch_size=2)
    script = textwrap.dedent(
        f"""
        import pytest
        import torch
        from transformers import pipeline
        torch.set_num_threads({torch.get_num_threads()})
        retriever = pipeline("image-text-retrieval", model={str(folder)!r}, trust_remote_code=True)
        assert type(retriever).__module__.startswith("transformers_modules."), type(retriever)
        results = retriever({[str(path) for path in photos]!r}, texts={CAPTIONS!r}, pair_batch_size=2)
        for ours, theirs in zip(results, {expected!r}, strict=True):
            for a, b in zip(ours, theirs, strict=True):
                assert a["text"] == b["text"]
                assert a["itm_score"] == pytest.approx(b["itm_score"], rel=1e-5, abs=1e-6)
                assert a["itc_score"] == pytest.approx(b["itc_score"], rel=1e-5, abs=1e-6)
        print("OK")
        """
    )
    result = run_without_package(script, tmp_path, timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]
