"""LAIT stage 2 (fetching, decoding, classifiers, img2dataset shards), stage 5 (aggregation rules) and the config
loader, each on small hand-made inputs."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from lait_fixture import MiniWebServer, _photo  # noqa: E402

from modeling_imagebert.lait.aggregate import aggregate_pairs, text_key  # noqa: E402
from modeling_imagebert.lait.config import ConfigError, load_config  # noqa: E402
from modeling_imagebert.lait.fetch import (  # noqa: E402
    ImageSources,
    fetch_url,
    index_img2dataset_output,
    write_img2dataset_input,
)
from modeling_imagebert.lait.images import stage2_image  # noqa: E402
from modeling_imagebert.lait.records import DropCounter, ImageCandidate, TextCandidate  # noqa: E402


def _params(**images) -> dict:
    return load_config(overrides={"images": {"timeout_s": 2.0, **images}})["images"]


def _candidate(url: str) -> ImageCandidate:
    return ImageCandidate("crawl.warc.gz", 0, "http://site.example/a.html", "site.example", url)


@pytest.fixture(scope="module")
def server():
    with MiniWebServer(slow_seconds=1.0) as running:
        import numpy as np

        running.add("/photo.jpg", _photo(np.random.default_rng(0), 400, 320), "image/jpeg")
        running.add("/tiny.jpg", _photo(np.random.default_rng(1), 301, 300), "image/jpeg")
        running.add("/broken.jpg", b"\xff\xd8\xff" + b"\x00" * 100, "image/jpeg")
        yield running


def test_fetcher_bounds_size_scheme_and_redirects(server):
    assert fetch_url(f"{server.base_url}/photo.jpg", _params()).data[:3] == b"\xff\xd8\xff"
    assert fetch_url(f"{server.base_url}/photo.jpg", _params(max_bytes=1000)).reason == "too_large"
    assert fetch_url("ftp://example.org/x.jpg", _params()).reason == "unsupported_scheme"
    assert fetch_url(f"{server.base_url}/loop/a.jpg", _params()).reason == "redirect_loop"
    assert fetch_url(f"{server.base_url}/html/x.jpg", _params()).reason == "not_an_image"
    assert fetch_url(f"{server.base_url}/missing.jpg", _params()).reason == "not_found"
    assert fetch_url(f"{server.base_url}/slow/x.jpg", _params(timeout_s=0.2)).reason == "timeout"
    assert fetch_url(f"{server.base_url}/garbage/x.jpg", _params()).reason == "connection_error"
    assert fetch_url(f"{server.base_url}/truncated/x.jpg", _params()).reason == "truncated"


def test_stage2_keeps_only_images_wider_and_taller_than_the_minimum(server):
    drops = DropCounter()
    kept = stage2_image(_candidate(f"{server.base_url}/photo.jpg"), _params(), drops)
    assert kept is not None and (kept.width, kept.height) == (400, 320)
    # 301 x 300: wider than 300 but not taller.
    assert stage2_image(_candidate(f"{server.base_url}/tiny.jpg"), _params(), drops) is None
    assert stage2_image(_candidate(f"{server.base_url}/broken.jpg"), _params(), drops) is None
    assert drops.kept == {"images": 1}
    assert drops.dropped == {"images": {"too_small": 1, "undecodable": 1}}


def _tiny_vit(folder: Path, labels: list[str], winner: int) -> str:
    """A tiny random ViT image classifier saved to `folder`, whose head always prefers label `winner`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=16,
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-5.0)
        model.classifier.bias[winner] = 5.0
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def test_transformers_classifier_drops_images_with_a_drop_label(server, tmp_path):
    model = _tiny_vit(tmp_path / "vit", ["nsfw", "safe"], winner=0)
    url = f"{server.base_url}/photo.jpg"
    racy = {"name": "racy", "type": "transformers", "model": model, "drop_labels": ["nsfw"], "threshold": 0.5}
    drops = DropCounter()
    assert stage2_image(_candidate(url), _params(classifiers=[racy]), drops) is None
    assert drops.dropped["images"] == {"classifier_racy": 1}
    kept = stage2_image(_candidate(url), _params(classifiers=[{**racy, "drop_labels": ["safe"]}]), drops)
    assert kept is not None and kept.scores["racy"] < 0.01
    with pytest.raises(ValueError, match="not among the model's labels"):
        stage2_image(_candidate(url), _params(classifiers=[{**racy, "drop_labels": ["porn"]}]), drops)


def test_classifier_specs_are_checked_when_the_config_loads():
    with pytest.raises(
        ConfigError, match=r"images.classifiers\[0\].type: expected 'transformers' or 'sklearn'"
    ):
        load_config(overrides={"images": {"classifiers": [{"name": "x", "type": "keras", "model": "m"}]}})
    with pytest.raises(ConfigError, match=r"drop_labels: expected a non-empty list"):
        load_config(
            overrides={"images": {"classifiers": [{"name": "x", "type": "transformers", "model": "m"}]}}
        )


def test_img2dataset_shards_are_read_back_by_url(tmp_path):
    """A folder in img2dataset's webdataset layout ({key}.jpg/.txt/.json, status in the json) feeds stage 2
    without any HTTP request."""
    import numpy as np

    jpeg = _photo(np.random.default_rng(2), 420, 330)
    url = "http://unserved.example/img/cat.jpg"
    shards = tmp_path / "images"
    shards.mkdir()
    with tarfile.open(shards / "00000.tar", "w") as tar:
        for name, data in (
            ("000000000.jpg", jpeg),
            ("000000000.txt", b"a cat"),
            ("000000000.json", json.dumps({"url": url, "status": "success", "key": "000000000"}).encode()),
            (
                "000000001.json",
                json.dumps({"url": "http://x/y.jpg", "status": "failed_to_download"}).encode(),
            ),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    index = index_img2dataset_output(shards)
    assert list(index) == [url]
    params = _params(fetch_http=False, img2dataset_output=str(shards))
    drops = DropCounter()
    sources = ImageSources(img2dataset_index=index)
    assert stage2_image(_candidate(url), params, drops, sources).width == 420
    assert stage2_image(_candidate("http://unserved.example/other.jpg"), params, drops, sources) is None
    assert drops.dropped["images"] == {"no_source": 1}


def test_img2dataset_url_list_has_one_row_per_image_url(tmp_path):
    candidates = [
        ImageCandidate(
            "f", 0, "http://a/1", "a", "http://a/x.jpg", text_candidates=[TextCandidate("alt", "A cat")]
        ),
        ImageCandidate("f", 9, "http://a/2", "a", "http://a/x.jpg"),
        ImageCandidate("f", 20, "http://a/3", "a", "http://a/y.jpg"),
    ]
    assert write_img2dataset_input(candidates, tmp_path / "urls.parquet") == 2
    table = pq.read_table(tmp_path / "urls.parquet").to_pylist()
    assert table[0] == {"url": "http://a/x.jpg", "caption": "A cat", "page_url": "http://a/1"}


def _pair(image: str, text: str, score: float, page: str = "p", dominance: float = 1.0) -> dict:
    return {
        "image_sha256": image,
        "text": text,
        "text_key": text_key(text),
        "relevance_score": score,
        "dominance_score": dominance,
        "page_url": page,
        "warc_file": "w",
        "warc_offset": 0,
        "text_source": "alt",
        "passed_scoring": True,
    }


def test_a_description_on_too_many_images_is_dropped_with_all_its_pairs():
    pairs = [_pair(f"img{i}", "Product image", 0.9) for i in range(4)]
    pairs.append(_pair("img0", "A red bicycle by the wall", 0.6))
    drops = DropCounter()
    aggregate_pairs(pairs, {"max_images_per_text": 3}, drops)
    assert [p["drop_reason"] for p in pairs[:4]] == ["shared_description"] * 4
    # The image keeps its next best, real description instead of disappearing.
    assert pairs[4]["kept"] is True
    assert drops.dropped["aggregation"] == {"shared_description": 4}
    # At the limit (3 distinct images) the description stays.
    at_limit = [_pair(f"img{i}", "product IMAGE ", 0.9) for i in range(3)]
    aggregate_pairs(at_limit, {"max_images_per_text": 3}, DropCounter())
    assert all(p["kept"] for p in at_limit)


def test_an_image_on_several_pages_keeps_only_its_best_pair_with_stable_ties():
    pairs = [
        _pair("same", "A cat on a sofa", 0.7, page="b"),
        _pair("same", "A cat sleeping on a red sofa", 0.9, page="c"),
        _pair("same", "Cat", 0.9, page="a", dominance=0.5),
        _pair("tie", "Two dogs", 0.8, page="z"),
        _pair("tie", "Two dogs playing", 0.8, page="y"),
    ]
    aggregate_pairs(pairs, {"max_images_per_text": 10}, DropCounter())
    kept = {p["image_sha256"]: p["text"] for p in pairs if p["kept"]}
    # Highest score, then highest dominance; on a full tie the smallest page URL.
    assert kept == {"same": "A cat sleeping on a red sofa", "tie": "Two dogs playing"}
    assert sum(p["drop_reason"] == "not_best_for_image" for p in pairs) == 3


def test_config_rejects_wrong_types_and_unknown_sections(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("images:\n  min_width: wide\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: images.min_width: expected an integer"):
        load_config(bad)
    bad.write_text("imagez:\n  min_width: 10\n")
    with pytest.raises(ConfigError, match=r"imagez: unknown key; did you mean images\?"):
        load_config(bad)
    good = tmp_path / "good.yaml"
    good.write_text("aggregation:\n  max_images_per_text: 3\n")
    config = load_config(good, ["images.min_width=500"])
    assert config["aggregation"]["max_images_per_text"] == 3 and config["images"]["min_width"] == 500
    assert config["images"]["min_height"] == 300


def test_cli_help_shows_the_defaults(capsys):
    from modeling_imagebert.lait.__main__ import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--engine {local,spark}" in out and "(default: local)" in out


def test_small_images_never_reach_the_classifiers(server, tmp_path):
    """The size rule runs first: a classifier that would fail to load is never touched for a too-small image."""
    missing = {"name": "racy", "type": "sklearn", "model": str(tmp_path / "absent.skops")}
    drops = DropCounter()
    assert (
        stage2_image(_candidate(f"{server.base_url}/tiny.jpg"), _params(classifiers=[missing]), drops) is None
    )
    assert drops.dropped["images"] == {"too_small": 1}
    # Decoded bytes are never a partial image: PIL either decodes the whole file or the stage says undecodable.
    assert Image.open(io.BytesIO(server.images["/photo.jpg"][0])).size == (400, 320)


def test_itm_checkpoint_needs_region_features_and_a_real_checkpoint(tmp_path):
    # The ITM score feature itself is specified in tests/test_lait_itm_score.py.
    from modeling_imagebert.lait.scoring import Scorer

    params = load_config(overrides={"scoring": {"itm_checkpoint": "checkpoints/imagebert"}})["scoring"]
    with pytest.raises(ValueError, match=r"^scoring\.region_features: required with scoring\.itm_checkpoint"):
        Scorer(params)
    with pytest.raises(ValueError, match=r"^scoring\.itm_checkpoint: .*no config\.json"):
        Scorer({**params, "region_features": str(tmp_path)})
