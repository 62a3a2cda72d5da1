"""ImageBertProcessor with a detector: raw images in, the model inputs of the documented extraction route out.

Real photographs (scikit-image's), a tiny random BUTD detector and a tiny ImageBERT: `processor(text=...,
images=...)` gives bit for bit the inputs of `python -m modeling_imagebert.features` + `python -m
modeling_imagebert.data.convert features` + `encode_record` + padding; every kind of image input reads the same
pixels; the detector is saved inside the processor's folder and loads back, also as remote code without the
package."""

import copy
import json
import os
import textwrap

import numpy as np
import pytest
import torch
from feature_fixtures import TINY_PROCESSOR, encode, photo, save_tiny_detector
from PIL import Image

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertProcessor
from modeling_imagebert.processing_imagebert import region_locations, top_region_indices

MAX_REGIONS = 12  # below the tiny detector's 10..100 regions for some photos, so the top-k rule is exercised
CAPTIONS = {
    "astronaut": "a woman in a space suit",
    "coffee": "a cup of coffee on a saucer",
    "chelsea": "a cat looks to the side",
    "rotated": "coffee seen the other way",
}
MODEL_KEYS = {
    "input_ids",
    "attention_mask",
    "token_type_ids",
    "region_features",
    "region_locations",
    "region_attention_mask",
}
REGION_KEYS = {"region_features", "region_locations", "region_attention_mask"}


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("detector"))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list:
    """astronaut (JPEG), coffee (PNG), chelsea (JPEG) and coffee again as a JPEG stored landscape with EXIF
    orientation 6 (shown portrait), each shrunk to at most 160 pixels, in source (sorted-name) order."""
    folder = tmp_path_factory.mktemp("photos")
    for name, suffix in (("astronaut", "JPEG"), ("coffee", "PNG"), ("chelsea", "JPEG")):
        image = Image.fromarray(photo(name))
        image.thumbnail((160, 160))
        (folder / f"{name}.{'png' if suffix == 'PNG' else 'jpg'}").write_bytes(
            encode(image, suffix, quality=90)
        )
    landscape = Image.fromarray(photo("coffee")).resize((150, 100))
    exif = landscape.getexif()
    exif[0x0112] = 6
    (folder / "rotated.jpg").write_bytes(encode(landscape, "JPEG", quality=90, exif=exif.tobytes()))
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(minilm_path)


@pytest.fixture(scope="module")
def processor(tokenizer, detector_dir):
    return ImageBertProcessor(tokenizer, max_regions=MAX_REGIONS, max_text_length=16, detector=detector_dir)


@pytest.fixture(scope="module")
def model(tokenizer):
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
    )
    torch.manual_seed(0)
    return ImageBertForPreTraining(config).eval()


def captions_of(paths) -> list[str]:
    return [CAPTIONS[path.stem] for path in paths]


@pytest.fixture(scope="module")
def cli_route(photos, detector_dir, processor, tmp_path_factory):
    """The documented route: the extraction CLI, `convert features` with a Karpathy JSON, then `encode_record`
    and the processor's padding. Returns the padded inputs (rows in the photos' order) and the features folder."""
    from fixtures_formats import write_karpathy_json

    from modeling_imagebert.data.convert import main as convert_main
    from modeling_imagebert.data.storage import load_dataset_from_disk
    from modeling_imagebert.features.__main__ import main as extract_main

    work = tmp_path_factory.mktemp("cli")
    folder = photos[0].parent
    status = extract_main(
        [str(folder), "--detector", str(detector_dir), "--output", str(work / "features")]
        + ["--shard-size", "2", "--no-progress", "--device", "cpu"]
    )
    assert status == 0
    karpathy = write_karpathy_json(
        work / "dataset.json",
        "flickr30k",
        [{"name": path.stem, "split": "test", "captions": [CAPTIONS[path.stem]]} for path in photos],
    )
    status = convert_main(
        ["features", str(work / "features"), "--captions", str(karpathy), "--format", "karpathy"]
        + ["--split", "test", "--output", str(work / "pairs"), "--no-progress"]
    )
    assert status == 0
    pairs = load_dataset_from_disk(work / "pairs", feature_dim=64).with_format("numpy", dtype=None)
    rows = {str(row["image_id"]): row for row in pairs}
    examples = [processor.encode_record(rows[path.stem], index) for index, path in enumerate(photos)]
    return processor.pad(examples), work / "features"


def test_images_give_the_cli_and_convert_routes_model_inputs_bit_for_bit(processor, photos, cli_route, model):
    expected, _ = cli_route
    inputs = processor(text=captions_of(photos), images=[str(path) for path in photos])
    assert set(inputs) == MODEL_KEYS
    for key in MODEL_KEYS:
        assert inputs[key].dtype == expected[key].dtype, key
        assert torch.equal(inputs[key], expected[key]), key
    counts = inputs["region_attention_mask"].sum(1)
    assert counts.max() == MAX_REGIONS and counts.min() >= 10  # the top-k rule cut some image

    # The model reads the inputs as they are; the detections ride beside them, not among the keys.
    with torch.no_grad():
        ours, theirs = model(**inputs), model(**expected)
    assert torch.equal(ours.itm_logits, theirs.itm_logits)


def test_detections_are_the_regions_the_model_sees(processor, photos):
    inputs = processor(text=captions_of(photos), images=photos)
    assert len(inputs.detections) == len(photos)
    for i, (path, detection) in enumerate(zip(photos, inputs.detections, strict=True)):
        n = int(inputs["region_attention_mask"][i].sum())
        assert detection["image_id"] == path.stem
        assert detection["boxes"].shape == (n, 4) and detection["boxes"].dtype == np.float32
        assert detection["classes"].shape == (n,) and detection["scores"].shape == (n,)
        assert (np.diff(detection["scores"]) <= 0).all()  # score-descending, as the region tokens
        locations = region_locations(detection["boxes"], detection["image_width"], detection["image_height"])
        assert torch.equal(inputs["region_locations"][i, :n], torch.from_numpy(locations))
    # .to() keeps them (BatchFeature moves its data in place)
    assert inputs.to("cpu").detections is inputs.detections


def test_images_without_text_give_the_region_inputs_only(processor, photos):
    with_text = processor(text=captions_of(photos), images=photos)
    regions = processor(images=photos)
    assert set(regions) == REGION_KEYS
    for key in REGION_KEYS:
        assert torch.equal(regions[key], with_text[key]), key
    single = processor(images=photos[0])
    assert torch.equal(
        single["region_features"][0], regions["region_features"][0, : single["region_features"].shape[1]]
    )


def test_detect_regions_returns_the_records_the_cli_stores(processor, photos, cli_route):
    from modeling_imagebert.feature_formats import load_features

    _, features = cli_route
    stored = {str(row["image_id"]): row for row in load_features(features).with_format("numpy", dtype=None)}
    records = processor.detect_regions(photos, batch_size=3)
    assert [record["image_id"] for record in records] == [path.stem for path in photos]
    for record in records:
        row = stored[record["image_id"]]
        assert record["region_features"].dtype == np.float32
        assert np.array_equal(record["region_features"].astype(np.float16), row["region_features"])
        for column in ("region_boxes", "region_classes", "region_scores", "region_attributes"):
            assert record[column].dtype == row[column].dtype, column
            assert np.array_equal(record[column], row[column]), column
        assert (record["image_width"], record["image_height"]) == (row["image_width"], row["image_height"])
    # the EXIF-rotated landscape is read as a viewer shows it: portrait
    rotated = next(record for record in records if record["image_id"] == "rotated")
    assert (rotated["image_width"], rotated["image_height"]) == (100, 150)
    named = processor.detect_regions(photos[:2], image_ids=["a", "b"])
    assert [record["image_id"] for record in named] == ["a", "b"]
    assert [
        record["image_id"] for record in processor.detect_regions([np.asarray(Image.open(photos[0]))])
    ] == ["0"]


def test_every_kind_of_image_input_reads_the_same_pixels(processor, photos):
    from modeling_imagebert.features.images import decode_image

    path = next(path for path in photos if path.stem == "rotated")  # EXIF orientation must be applied by all
    reference = processor(images=[path])
    for image in (
        str(path),
        path.as_uri(),  # file:///...
        Image.open(path),
        decode_image(path).image,
        path.read_bytes(),
    ):
        inputs = processor(images=[image])
        for key in REGION_KEYS:
            assert torch.equal(inputs[key], reference[key]), (type(image).__name__, key)


def test_bad_inputs_are_refused_with_one_line(processor, tokenizer, photos, tmp_path):
    for url in ("https://example.com/cat.jpg", "s3://bucket/cat.jpg", "file://server/share/cat.jpg"):
        with pytest.raises(ValueError, match="only local files are read") as error:
            processor(images=[photos[0], url])
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"nope\.jpg: unreadable: cannot read the file"):
        processor(images=[tmp_path / "nope.jpg"])
    (tmp_path / "text.jpg").write_text("<html>not found</html>")
    with pytest.raises(ValueError, match=r"text\.jpg: not_an_image"):
        processor(images=[tmp_path / "text.jpg"])
    with pytest.raises(ValueError, match="image 0: too_small"):
        processor(images=[np.zeros((5, 40, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="text has 1 items but images has 2"):
        processor(text=["one caption"], images=photos[:2])
    with pytest.raises(ValueError, match="caption of item 1: expected a non-empty string"):
        processor(text=["one caption", " "], images=[photos[0], "https://example.com/not/reached.jpg"])
    with pytest.raises(ValueError, match="pass images or region inputs, not both"):
        processor(images=photos[:1], region_features=np.zeros((1, 64)))
    plain = ImageBertProcessor(tokenizer, max_regions=MAX_REGIONS, max_text_length=16)
    with pytest.raises(ValueError, match="images: this processor has no detector"):
        plain(text=["a cat"], images=photos[:1])
    with pytest.raises(ValueError, match="detector_processor: required with a detector instance"):
        ImageBertProcessor(tokenizer, detector=processor.detector)


def test_region_features_reach_the_model_rounded_to_float16_as_stored(processor, photos):
    record = processor.detect_regions(photos[:1])[0]
    inputs = processor.encode_image_records([record])
    n = int(inputs["region_attention_mask"][0].sum())
    keep = top_region_indices(record["region_scores"], MAX_REGIONS)
    rounded = torch.from_numpy(record["region_features"][keep].astype(np.float16).astype(np.float32))
    assert torch.equal(inputs["region_features"][0, :n], rounded)
    assert not torch.equal(
        rounded, torch.from_numpy(record["region_features"][keep])
    )  # rounding did something
    record["region_features"] = record["region_features"] * 1e6  # beyond float16: storage refuses it too
    with pytest.raises(ValueError, match="beyond the float16 range"):
        processor.encode_image_records([record])


def test_the_detector_is_saved_inside_the_folder_and_loads_back(processor, photos, tmp_path, monkeypatch):
    from transformers import AutoProcessor

    from modeling_imagebert.features import BUTDDetector, BUTDImageProcessor

    # Saving and printing never deep-copy the detector (ProcessorMixin.to_dict deep-copies what is in __dict__).
    def refuse(self, memo):
        raise AssertionError("the detector was deep-copied")

    monkeypatch.setattr(BUTDDetector, "__deepcopy__", refuse, raising=False)
    processor.save_pretrained(tmp_path)
    repr(processor)
    assert copy.deepcopy(processor).detector is processor.detector
    monkeypatch.undo()

    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["detector_subfolder"] == "detector" and "detector" not in saved
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "modeling_butd.py",
        "images.py",
    } <= set(os.listdir(tmp_path / "detector"))
    reference = processor(text=captions_of(photos), images=photos)
    ImageBertConfig().save_pretrained(tmp_path)  # AutoProcessor maps the model type to our processor
    for loaded in (ImageBertProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, ImageBertProcessor)
        assert isinstance(loaded.detector, BUTDDetector)
        assert isinstance(loaded.detector_processor, BUTDImageProcessor)
        assert loaded.detector_processor.max_size == TINY_PROCESSOR["max_size"]
        inputs = loaded(text=captions_of(photos), images=photos)
        for key in MODEL_KEYS:
            assert torch.equal(inputs[key], reference[key]), key

    # a detector given to from_pretrained replaces the saved one
    other = BUTDDetector(processor.detector.config).eval()
    replaced = ImageBertProcessor.from_pretrained(
        tmp_path, detector=other, detector_processor=BUTDImageProcessor(min_size=64, max_size=96)
    )
    assert replaced.detector is other and replaced.detector_processor.max_size == 96
    # without a detector the folder is what it was before detectors existed
    plain = ImageBertProcessor(processor.tokenizer, max_regions=3)
    plain.save_pretrained(tmp_path / "plain")
    assert not (tmp_path / "plain" / "detector").exists()
    assert "detector_subfolder" not in json.loads((tmp_path / "plain" / "processor_config.json").read_text())
    assert ImageBertProcessor.from_pretrained(tmp_path / "plain").detector is None


def test_a_hub_processor_fetches_only_its_detector_subfolder(tmp_path, monkeypatch):
    import huggingface_hub

    from modeling_imagebert.detection_imagebert import _saved_detector_folder

    calls = []

    def fake_snapshot_download(repo_id, **options):
        calls.append((repo_id, options))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = _saved_detector_folder("someone/imagebert", "detector", {"subfolder": "proc", "revision": "abc"})
    assert folder == os.path.join(tmp_path, "proc/detector")
    assert calls[0][0] == "someone/imagebert"
    assert calls[0][1]["allow_patterns"] == ["proc/detector/*"] and calls[0][1]["revision"] == "abc"
    for bad in ("../elsewhere", "/etc", "a/b", ""):
        with pytest.raises(ValueError, match="detector_subfolder must be a folder name"):
            _saved_detector_folder("someone/imagebert", bad, {})


def test_model_and_processor_with_detector_run_from_a_hub_folder_without_the_package(
    processor, model, photos, tmp_path
):
    """The one-call path as a Hub user without this package has it: AutoProcessor and AutoModelForPreTraining with
    trust_remote_code=True, images in, the same inputs and scores as in the package."""
    from isolated import run_without_package

    folder = tmp_path / "hub_folder"
    processor.save_pretrained(folder)
    model.save_pretrained(folder)
    texts = captions_of(photos)
    inputs = processor(text=texts, images=photos)
    with torch.no_grad():
        expected = model(**inputs).itm_logits
    torch.save(
        {"inputs": dict(inputs), "itm_logits": expected, "boxes": [d["boxes"] for d in inputs.detections]},
        tmp_path / "io.pt",
    )
    # The same intra-op thread count as this process: convolutions may round differently in the last bits with
    # another one (and earlier tests may have changed this process's).
    script = textwrap.dedent(
        f"""
        import numpy as np
        import torch
        from transformers import AutoModelForPreTraining, AutoProcessor
        torch.set_num_threads({torch.get_num_threads()})
        io = torch.load({str(tmp_path / "io.pt")!r}, weights_only=False)
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__name__ == "ImageBertProcessor", type(processor)
        assert type(processor.detector).__name__ == "BUTDDetector", type(processor.detector)
        assert type(processor.detector).__module__.startswith("transformers_modules."), type(processor.detector)
        inputs = processor(images={[str(path) for path in photos]!r}, text={texts!r})
        for key, value in io["inputs"].items():
            assert torch.equal(inputs[key], value), key
        assert all(np.array_equal(d["boxes"], b) for d, b in zip(inputs.detections, io["boxes"], strict=True))
        model = AutoModelForPreTraining.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            assert torch.equal(model(**inputs).itm_logits, io["itm_logits"])
        print("OK")
        """
    )
    result = run_without_package(script, tmp_path, timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_the_package_imports_without_torchvision_and_pillow():
    """A base install (without the `features` extra) still imports the package; it then registers the detector's
    config only, as the detector needs torchvision and its image processor PIL."""
    import subprocess
    import sys

    script = textwrap.dedent(
        """
        import sys
        sys.modules["torchvision"] = None  # as if not installed: importing it raises ImportError
        sys.modules["PIL"] = None
        import modeling_imagebert
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        from transformers.models.auto.modeling_auto import MODEL_MAPPING
        from modeling_imagebert.features.configuration_butd import BUTDConfig
        assert CONFIG_MAPPING["imagebert_butd"] is BUTDConfig
        assert BUTDConfig not in MODEL_MAPPING
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_a_folder_of_photos_indexes_through_the_detector_like_its_own_detections(
    processor, model, photos, tmp_path
):
    """`ImageBertRetriever.index_images` reads image files through this processor's detector: the same hits and
    scores as indexing the records `detect_regions` gives for the same files, and a second call resumes from its
    cache with the same result."""
    from modeling_imagebert.retrieval.retriever import ImageBertRetriever

    ids = [path.stem for path in photos]
    records = processor.detect_regions([str(path) for path in photos], image_ids=ids)
    queries = [CAPTIONS["chelsea"], CAPTIONS["astronaut"]]

    def hits(retriever):
        return [
            [(hit.image_id, hit.score, hit.similarity) for hit in row] for row in retriever.search(queries, 3)
        ]

    expected = hits(ImageBertRetriever(model, processor, candidates=3).index(records))
    from_files = ImageBertRetriever(model, processor, candidates=3)
    from_files.index_images(photos[0].parent, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    got = hits(from_files)
    # Same images in the same order with the same cross-encoder scores; the embeddings were computed in batches of
    # 2 instead of 4, which moves a float32 matrix product's last bits (similarities within 1e-6).
    assert [[(i, score) for i, score, _ in row] for row in got] == [
        [(i, score) for i, score, _ in row] for row in expected
    ]
    for row, expected_row in zip(got, expected, strict=True):
        assert [s for *_, s in row] == pytest.approx([s for *_, s in expected_row], abs=1e-6)
    resumed = ImageBertRetriever(model, processor, candidates=3)
    resumed.index_images(photos[0].parent, batch_size=2, cache_dir=tmp_path / "cache", progress=False)
    assert hits(resumed) == got  # from the cache: exactly the same index
