"""LAIT stage 4 with the ImageBERT ITM score as a feature: the workflow of docs/lait.md on the generated mini-web.

A first run keeps images in webdataset shards; the features pipeline (`run_extraction` with a deterministic stand-in
for the BUTD detector) writes their region features keyed by the shard key; a second run with
`scoring.itm_checkpoint` (a tiny ImageBERT, random weights) and `scoring.region_features` gives every pair whose
image has features the ITM probability of its caption with those regions.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from lait_fixture import BAD_TEXTS, MiniWebServer, build_mini_web  # noqa: E402
from tiny_checkpoint import save_tiny_checkpoint  # noqa: E402

from modeling_imagebert import ImageBertForPreTraining  # noqa: E402
from modeling_imagebert.feature_formats import load_features  # noqa: E402
from modeling_imagebert.features.runner import run_extraction  # noqa: E402
from modeling_imagebert.features.sources import list_webdataset  # noqa: E402
from modeling_imagebert.lait.config import load_config  # noqa: E402
from modeling_imagebert.lait.engine_local import run_local  # noqa: E402
from modeling_imagebert.lait.records import PairRecord  # noqa: E402
from modeling_imagebert.lait.scoring import ITM_FEATURE, Scorer, feature_matrix, pair_features  # noqa: E402
from modeling_imagebert.processing_imagebert import ImageBertProcessor  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BASE = {"images": {"timeout_s": 1.0}, "engine": {"processes": 2, "site_buckets": 4, "fetch_threads": 4}}


def _itm_overrides(checkpoint: Path, features: Path, **scoring) -> dict:
    return {
        **BASE,
        "scoring": {"itm_checkpoint": str(checkpoint), "region_features": str(features), **scoring},
    }


def fake_detect(images: list[np.ndarray], feature_dim: int = 64) -> list[dict]:
    """A deterministic stand-in for the BUTD detector: 3 to 7 boxes per image, features drawn from a generator
    seeded by the pixels (each image's result depends on that image alone)."""
    out = []
    for image in images:
        height, width = image.shape[:2]
        rng = np.random.default_rng(int(hashlib.sha256(image.tobytes()).hexdigest()[:8], 16))
        n = int(rng.integers(3, 8))
        x1 = rng.uniform(0, width / 2, n)
        y1 = rng.uniform(0, height / 2, n)
        boxes = np.stack([x1, y1, x1 + rng.uniform(10, width / 2, n), y1 + rng.uniform(10, height / 2, n)], 1)
        out.append(
            {
                "boxes": boxes.astype(np.float32),
                "features": rng.normal(0, 1, (n, feature_dim)).astype(np.float32),
                "classes": rng.integers(0, 20, n),
                "scores": rng.uniform(0.2, 1.0, n).astype(np.float32),
                "attributes": rng.integers(0, 10, n),
                "attribute_scores": rng.uniform(0, 1, n).astype(np.float32),
                "image_width": width,
                "image_height": height,
            }
        )
    return out


def extract(refs, output: Path, feature_dim: int = 64) -> Path:
    run_extraction(
        refs,
        output,
        detect=lambda images: fake_detect(images, feature_dim),
        feature_dim=feature_dim,
        detector_settings={"detector": "test stand-in"},
        exact=True,
        num_workers=1,
        show_progress=False,
        log=lambda message: None,
    )
    return output


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def server():
    with MiniWebServer(slow_seconds=4.0) as running:
        yield running


@pytest.fixture(scope="module")
def world(server, minilm_path, tmp_path_factory):
    """The whole workflow once: crawl, first run, features of all kept images but one, tiny checkpoint, ITM run."""

    root = tmp_path_factory.mktemp("itm")
    web = build_mini_web(root / "crawl", server, seed=1, n_articles=20, n_files=2)
    warcs = [str(p) for p in web.warc_files]
    first = run_local(warcs, root / "first", load_config(overrides=BASE))
    refs = list_webdataset(sorted((root / "first" / "shards").glob("*.tar")))
    assert len(refs) >= 5 and first["pairs_kept"] == len(refs)
    # One kept image is left out of the features: its pairs must get NaN.
    features = extract(refs[1:], root / "features")
    missing_key = refs[0].image_id

    checkpoint = save_tiny_checkpoint(root / "imagebert-tiny", minilm_path, seed=0)
    itm_config = load_config(overrides=_itm_overrides(checkpoint, features))
    stats = run_local(warcs, root / "itm", itm_config)
    rows = pq.read_table(root / "itm" / "pairs.parquet").to_pylist()
    return {
        "root": root,
        "web": web,
        "warcs": warcs,
        "features": features,
        "missing_key": missing_key,
        "checkpoint": checkpoint,
        "config": itm_config,
        "stats": stats,
        "rows": rows,
    }


def _direct_itm_probability(model, processor, record: dict, caption: str) -> float:
    batch = processor(
        text=caption,
        region_features=record["region_features"],
        region_boxes=record["region_boxes"],
        image_width=int(record["image_width"]),
        image_height=int(record["image_height"]),
        region_scores=record["region_scores"],
        region_classes=record["region_classes"],
    )
    with torch.inference_mode():
        return float(torch.sigmoid(model(**batch).itm_logits)[0])


def test_itm_score_equals_the_models_probability_for_the_same_caption_and_regions(world):
    model = ImageBertForPreTraining.from_pretrained(world["checkpoint"]).eval()
    processor = ImageBertProcessor.from_pretrained(world["checkpoint"])
    features = load_features(world["features"]).with_format("numpy", dtype=None)
    by_key = {image_id: row for row, image_id in enumerate(features.with_format(None)["image_id"])}
    scored = [r for r in world["rows"] if r["itm_score"] is not None]
    assert len(scored) >= 10
    for row in scored[:: max(1, len(scored) // 24)]:  # ~24 pairs spread over the run, each forwarded alone
        # The features pipeline names a LAIT shard image by its key, the content hash prefix.
        assert row["image_key"] == row["image_sha256"][:24]
        expected = _direct_itm_probability(model, processor, features[by_key[row["image_key"]]], row["text"])
        assert row["itm_score"] == pytest.approx(expected, abs=1e-5), row["text"]
    # The feature reaches the scorer under its name, with the stored value.
    pair = PairRecord.from_dict(
        {k: scored[0][k] for k in ("warc_file", "warc_offset", "page_url", "site", "image_url", "text")}
        | {"text_source": scored[0]["text_source"], "itm_score": scored[0]["itm_score"]}
    )
    assert pair_features(pair)[ITM_FEATURE] == scored[0]["itm_score"]
    assert len({round(r["itm_score"], 9) for r in scored}) > 1  # not one constant for every pair


def test_pairs_without_region_features_get_nan_and_are_counted(world):
    rows = world["rows"]
    with_features = set(load_features(world["features"])["image_id"])
    missing = [r for r in rows if r["image_key"] not in with_features]
    assert missing and any(r["image_key"] == world["missing_key"] for r in missing)
    assert all(r["itm_score"] is None for r in missing)
    assert all(r["itm_score"] is not None for r in rows if r["image_key"] in with_features)
    events = world["stats"]["counts"]["events"]["scoring"]
    assert events == {"itm_no_region_features": len(missing), "itm_scored": len(rows) - len(missing)}
    # To the scorer the missing feature is NaN, as every other missing feature.
    pair = PairRecord("f", 0, "p", "s", "http://x/y.jpg", missing[0]["text"], missing[0]["text_source"])
    assert math.isnan(feature_matrix([pair_features(pair)], [ITM_FEATURE])[0, 0])


def test_itm_scores_do_not_depend_on_which_pairs_share_a_batch(world):
    from modeling_imagebert.lait.scoring import itm_scorer_for

    itm = itm_scorer_for(world["config"]["scoring"])
    pairs = [
        PairRecord("f", 0, "p", "s", "u", r["text"], r["text_source"], image_sha256=r["image_sha256"])
        for r in world["rows"]
    ]
    together = itm.itm_probabilities(pairs)
    reversed_order = itm.itm_probabilities(pairs[::-1])[::-1]
    alone = [itm.itm_probabilities([p])[0] for p in pairs[:5]]
    assert together == reversed_order  # bit for bit, as the local and Spark engines need
    assert together[:5] == alone
    assert together == [r["itm_score"] for r in world["rows"]]  # and what the engine's workers computed


def _labelled_rows(server, world, folder: Path) -> Path:
    """Labelled (image, text, relevant) rows for the photos of the mini-web's article pages."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    bad = [*BAD_TEXTS, "Photo 3 of 12", "Advertisement", "More news from our site", "Share this on facebook"]
    for i, page in enumerate(p for p in world["web"].pages if p.kind == "article" and p.good_texts):
        name = page.dominant_url.rsplit("/", 1)[-1]
        data, _ = server.images["/img/" + name]
        (folder / name).write_bytes(data)
        rows.append({"image": f"images/{name}", "text": page.good_texts[0], "relevant": 1, "source": "alt"})
        rows.append({"image": f"images/{name}", "text": bad[i % len(bad)], "relevant": 0, "source": "title"})
    labels = folder.parent / "labels.jsonl"
    labels.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return labels


def test_a_scorer_trained_with_the_itm_feature_refuses_to_run_without_it(server, world, tmp_path):
    from modeling_imagebert.lait.scoring import train_scorer

    labels = _labelled_rows(server, world, tmp_path / "images")
    model = tmp_path / "scorer.skops"
    sidecar = train_scorer(labels, model, scoring_config=world["config"]["scoring"])
    assert ITM_FEATURE in sidecar["feature_names"] and sidecar["rows_with_itm_score"] > 0

    without = load_config(overrides={**BASE, "scoring": {"model": str(model)}})
    with pytest.raises(
        ValueError, match=r"^scoring\.itm_checkpoint: .*trained with the feature pair\.itm_score"
    ):
        Scorer(without["scoring"])
    with pytest.raises(ValueError, match=r"^scoring\.itm_checkpoint: "):
        run_local(world["warcs"], tmp_path / "never", without)
    assert not (tmp_path / "never").exists()  # refused before anything was written

    # With the checkpoint configured the same scorer runs and its input carries the ITM score.
    scorer = Scorer({**world["config"]["scoring"], "model": str(model)})
    row = next(r for r in world["rows"] if r["itm_score"] is not None)
    pair = PairRecord(
        "f", 0, "p", "s", "u", row["text"], row["text_source"], image_sha256=row["image_sha256"]
    )
    assert 0.0 <= scorer.score([pair])[0] <= 1.0
    assert pair.itm_score == row["itm_score"]


def test_bad_itm_settings_are_refused_naming_the_field(world, minilm_path, tmp_path):
    from modeling_imagebert.lait.itm_score import check_itm_settings

    scoring = world["config"]["scoring"]
    # A BERT folder is not an ImageBERT model.
    with pytest.raises(
        ValueError, match=r"^scoring\.itm_checkpoint: .*model_type 'bert'; expected 'imagebert'"
    ):
        check_itm_settings({**scoring, "itm_checkpoint": minilm_path})
    with pytest.raises(ValueError, match=r"^scoring\.itm_checkpoint: .*no config\.json"):
        check_itm_settings({**scoring, "itm_checkpoint": str(tmp_path)})
    # Features of another dimension than the model's visual_feature_dim.
    refs = list_webdataset(sorted((world["root"] / "first" / "shards").glob("*.tar")))[:1]
    narrow = extract(refs, tmp_path / "narrow", feature_dim=32)
    with pytest.raises(
        ValueError, match=r"^scoring\.region_features: .*dimension 32.*visual_feature_dim is 64"
    ):
        check_itm_settings({**scoring, "region_features": str(narrow)})
    with pytest.raises(ValueError, match=r"^scoring\.region_features: required with scoring\.itm_checkpoint"):
        check_itm_settings({**scoring, "region_features": None})
    with pytest.raises(ValueError, match=r"^scoring\.region_features: .*no imagebert_features\.json"):
        check_itm_settings({**scoring, "region_features": str(tmp_path)})
    from modeling_imagebert.lait.config import ConfigError

    with pytest.raises(ConfigError, match=r"scoring\.region_features: set without scoring\.itm_checkpoint"):
        load_config(overrides={"scoring": {"region_features": str(world["features"])}})


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow (Spark JVM start): set IMAGEBERT_SLOW=1"
)
def test_local_and_spark_local2_give_identical_itm_scores(world):
    pytest.importorskip("pyspark")
    from modeling_imagebert.lait.engine_spark import run_spark, spark_session

    spark = spark_session("local[2]")
    try:
        stats = run_spark(world["warcs"], world["root"] / "spark", world["config"], spark=spark)
    finally:
        spark.stop()
    distributed = pq.read_table(world["root"] / "spark" / "pairs.parquet").to_pylist()
    assert sum(r["itm_score"] is not None for r in distributed) >= 10
    assert distributed == world["rows"]
    assert stats["counts"] == world["stats"]["counts"]
