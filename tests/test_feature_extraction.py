"""The extraction runner and CLI, end to end with a tiny random BUTD detector on real photographs: batched
features equal single-image ones, bad images, every source kind, the three output formats read back by the
importers, the join with captions, global CNN features, folder safety, and kill-and-resume."""

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from feature_fixtures import (
    BOMB_LIMIT,
    DETECTOR_SKIPS,
    EXPECTED_SKIPS,
    bad_image_files,
    photo,
    save_tiny_detector,
    write_files,
    write_photos,
)
from kill import kill_at_random_moment
from PIL import Image

from modeling_imagebert.data.schema import validate_record
from modeling_imagebert.feature_formats import ExtractionError, iter_extracted_records, load_features
from modeling_imagebert.features.__main__ import main as extract_main
from modeling_imagebert.features.images import decode_image
from modeling_imagebert.features.runner import run_extraction
from modeling_imagebert.features.sources import list_images

REPO = Path(__file__).resolve().parents[1]
SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")
FEWER_PHOTOS = ("astronaut", "coffee", "rocket")


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("detector"))


@pytest.fixture(scope="module")
def detector(detector_dir):
    from modeling_imagebert.features import BUTDDetector, BUTDImageProcessor

    model = BUTDDetector.from_pretrained(detector_dir).eval()
    return model, BUTDImageProcessor.from_pretrained(detector_dir)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


def extract(refs, output, detector, batch_invariant=True, **options):
    model, processor = detector
    with torch.inference_mode():
        return run_extraction(
            refs,
            output,
            detect=partial(model.detect, processor=processor, batch_invariant=batch_invariant),
            feature_dim=model.config.hidden_size,
            detector_settings={"test": "tiny"},
            show_progress=False,
            log=lambda message: None,
            **options,
        )


def rows_by_id(folder) -> dict[str, dict]:
    dataset = load_features(folder).with_format("numpy", dtype=None)
    return {str(row["image_id"]): row for row in dataset}


def assert_same_rows(left: dict, right: dict, columns=None):
    assert list(left) == list(right)
    for image_id in left:
        for column in columns or left[image_id].keys():
            a, b = np.asarray(left[image_id][column]), np.asarray(right[image_id][column])
            assert a.dtype == b.dtype and np.array_equal(a, b), (image_id, column)


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = extract_main([str(arg) for arg in args])
    return status, out.getvalue(), err.getvalue()


def test_help_lists_every_option_with_its_default():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        extract_main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(out.getvalue().split())
    for expected in (
        "--shard-size SHARD_SIZE images per output shard (the resume unit) (default: 500)",
        "--num-boxes",
        "--adaptive MIN MAX",
        "--global-model",
        "{dataset,butd-tsv,npz}",
        "(default: dataset)",
        "--device",
        "--dtype",
        "--batch-size",
    ):
        assert expected in text, expected


def test_photographs_end_to_end_through_the_cli_equal_single_image_detection(
    photos, detector_dir, detector, tmp_path
):
    status, out, err = run_cli(
        photos,
        "--detector",
        detector_dir,
        "--output",
        tmp_path / "out",
        "--shard-size",
        3,
        "--batch-size",
        3,
        "--no-progress",
        "--device",
        "cpu",
    )
    assert status == 0, err
    assert "8 images extracted, 0 skipped" in out
    rows = rows_by_id(tmp_path / "out")
    assert list(rows) == sorted(f.stem for f in photos.glob("*.jpg"))  # source order: sorted file names
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["complete"] and [s["images"] for s in manifest["shards"]] == [3, 3, 2]

    # by default bit for bit what the detector finds in each image alone
    model, processor = detector
    for image_id, row in rows.items():
        image = decode_image(photos / f"{image_id}.jpg").image
        with torch.inference_mode():
            alone = model.detect([image], processor=processor)[0]
        assert row["region_features"].dtype == np.float16
        assert np.array_equal(row["region_features"], alone["features"].astype(np.float16)), image_id
        assert np.array_equal(row["region_boxes"], alone["boxes"]), image_id
        assert np.array_equal(row["region_classes"], alone["classes"].astype(np.int32)), image_id
        assert np.array_equal(row["region_scores"], alone["scores"]), image_id
        assert np.array_equal(row["region_attributes"], alone["attributes"].astype(np.int32)), image_id
        assert (row["image_height"], row["image_width"]) == image.shape[:2]
        assert row["region_features"].shape[0] > 0
        record = {k: row[k] for k in row if k not in ("region_attributes", "region_attribute_scores")}
        validate_record({**record, "caption": "a photo"}, 0, feature_dim=64, num_classes=20)


def test_batched_features_equal_single_image_ones(photos, detector, tmp_path):
    """Batch size and shard size never change a bit of the output, whether the detector runs each image alone
    (batch_invariant, the CLI's default) or the runner calls it one image at a time (exact); network batches of
    same-size images (the CLI's --batched) agree with single-image results up to float rounding, which float16
    storage mostly hides."""
    refs = list_images("folder", [photos])[:5]
    extract(refs, tmp_path / "one", detector, batch_size=1, shard_size=5)
    extract(refs, tmp_path / "invariant", detector, batch_size=4, shard_size=3)
    extract(refs, tmp_path / "exact", detector, batch_size=4, shard_size=3, exact=True, batch_invariant=False)
    extract(refs, tmp_path / "batched", detector, batch_size=4, shard_size=3, batch_invariant=False)
    single = rows_by_id(tmp_path / "one")
    assert_same_rows(single, rows_by_id(tmp_path / "invariant"))
    assert_same_rows(single, rows_by_id(tmp_path / "exact"))
    batched = rows_by_id(tmp_path / "batched")
    assert list(batched) == list(single)
    for image_id, row in batched.items():
        assert np.array_equal(row["region_classes"], single[image_id]["region_classes"]), image_id
        features, reference = row["region_features"].astype(np.float32), single[image_id]["region_features"]
        np.testing.assert_allclose(features, reference.astype(np.float32), rtol=2e-3, atol=1e-3)
        np.testing.assert_allclose(
            row["region_boxes"], single[image_id]["region_boxes"], rtol=1e-4, atol=1e-3
        )


def test_bad_images_are_converted_or_skipped_and_reported_without_stopping_the_run(detector, tmp_path):
    folder = write_files(tmp_path / "bad", bad_image_files())
    summary = extract(
        list_images("folder", [folder]), tmp_path / "out", detector, shard_size=4, max_pixels=BOMB_LIMIT
    )
    assert summary.complete
    rows = rows_by_id(tmp_path / "out")
    converted = {
        "good",
        "cmyk",
        "sixteen_bit",
        "grayscale",
        "rgba",
        "la",
        "palette",
        "palette_transparent",
        "exif_rotated",
    }
    assert set(rows) == converted
    assert (rows["exif_rotated"]["image_width"], rows["exif_rotated"]["image_height"]) == (96, 192)
    lines = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    assert lines[0] == "image_id\torigin\treason\tmessage"
    skipped = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert {image_id: fields[2] for image_id, fields in skipped.items()} == {
        **EXPECTED_SKIPS,
        **DETECTOR_SKIPS,
    }
    assert skipped["panorama"][3]  # the detector's own error, on one line
    assert skipped["bomb"][1].endswith("bomb.png") and "exceeds limit" in skipped["bomb"][3]
    report = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert report["extracted"] == len(converted)
    assert sum(report["skipped"].values()) == len(EXPECTED_SKIPS) + len(DETECTOR_SKIPS)


def test_every_source_kind_gives_the_same_features(photos, detector, tmp_path):
    import datasets
    import webdataset

    names = list(FEWER_PHOTOS)
    files = [photos / f"{name}.jpg" for name in names]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{path}\t{path.stem}\n" for path in files))
    hf = datasets.Dataset.from_dict({"image": [str(p) for p in files], "key": names})
    hf.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "hf"))
    with webdataset.TarWriter(str(tmp_path / "00000.tar")) as sink:  # as img2dataset writes its shards
        for path in files:
            sink.write({"__key__": path.stem, "jpg": path.read_bytes(), "txt": "caption", "json": "{}"})
    subset = tmp_path / "subset"
    subset.mkdir()
    for path in files:
        shutil.copy(path, subset / path.name)

    results = {}
    for kind, inputs, options in (
        ("folder", [subset], {}),
        ("list", [listing], {}),
        ("hf", [tmp_path / "hf"], {"id_column": "key"}),
        ("webdataset", [tmp_path / "00000.tar"], {}),
    ):
        refs = list_images(kind, inputs, **options)
        extract(refs, tmp_path / f"out-{kind}", detector, shard_size=2)
        results[kind] = rows_by_id(tmp_path / f"out-{kind}")
    assert sorted(results["folder"]) == sorted(names)
    for kind in ("list", "hf", "webdataset"):
        assert_same_rows({k: results["folder"][k] for k in names}, {k: results[kind][k] for k in names})


@pytest.mark.parametrize("output_format", ["butd-tsv", "npz"])
def test_interop_outputs_read_back_by_the_importers_equal_the_dataset(
    output_format, photos, detector, tmp_path
):
    from modeling_imagebert.data.importers import read_butd_tsv, read_npz_dir

    refs = list_images("folder", [photos])[:3]
    extract(refs, tmp_path / "dataset", detector, shard_size=2)
    extract(refs, tmp_path / output_format, detector, shard_size=2, output_format=output_format)
    expected = rows_by_id(tmp_path / "dataset")
    shards = sorted(
        (tmp_path / output_format / "shards").glob(
            "shard-?????" + (".tsv" if output_format == "butd-tsv" else "")
        )
    )
    assert len(shards) == 2
    reader = (
        partial(read_butd_tsv, show_progress=False)
        if output_format == "butd-tsv"
        else partial(read_npz_dir, show_progress=False)
    )
    records = {record["image_id"]: record for shard in shards for record in reader(shard)}
    assert list(records) == list(expected)
    columns = (
        "region_features",
        "region_boxes",
        "region_classes",
        "region_scores",
        "image_width",
        "image_height",
    )
    assert_same_rows(
        {k: {c: v[c] for c in columns} for k, v in expected.items()},
        {
            k: {
                c: np.asarray(v[c]).astype(np.asarray(expected[k][c]).dtype)
                if c.startswith("image")
                else v[c]
                for c in columns
            }
            for k, v in records.items()
        },
    )
    assert list(iter_extracted_records(tmp_path / output_format))[0]["image_id"] == list(expected)[0]


def test_convert_joins_extracted_features_with_karpathy_captions(photos, detector, tmp_path):
    from fixtures_formats import write_karpathy_json

    from modeling_imagebert.data.convert import main as convert_main
    from modeling_imagebert.data.storage import load_dataset_from_disk

    refs = [ref for ref in list_images("folder", [photos]) if ref.image_id in FEWER_PHOTOS]
    extract(refs, tmp_path / "features", detector, shard_size=1)
    karpathy = write_karpathy_json(
        tmp_path / "dataset_flickr30k.json",
        "flickr30k",
        [
            {"name": "astronaut", "split": "train", "captions": ["a woman in a space suit", "an astronaut"]},
            {"name": "coffee", "split": "train", "captions": ["a cup of coffee"]},
            {"name": "rocket", "split": "test", "captions": ["a rocket on the pad"]},
        ],
    )
    output = tmp_path / "pairs"
    status = convert_main(
        [
            "features",
            str(tmp_path / "features"),
            "--captions",
            str(karpathy),
            "--format",
            "karpathy",
            "--split",
            "train",
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert status == 0
    pairs = load_dataset_from_disk(output, feature_dim=64).with_format("numpy", dtype=None)
    assert sorted(zip(pairs["image_id"], pairs["caption"], strict=True)) == [
        ("astronaut", "a woman in a space suit"),
        ("astronaut", "an astronaut"),
        ("coffee", "a cup of coffee"),
    ]
    features = rows_by_id(tmp_path / "features")
    for row in pairs:
        assert np.array_equal(row["region_features"], features[str(row["image_id"])]["region_features"])

    # an unfinished extraction is refused with a clear message
    (tmp_path / "features" / "shards" / "shard-00001.done.json").unlink()
    extract_again = tmp_path / "pairs2"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert (
            convert_main(
                [
                    "features",
                    str(tmp_path / "features"),
                    "--captions",
                    str(karpathy),
                    "--format",
                    "karpathy",
                    "--split",
                    "train",
                    "--output",
                    str(extract_again),
                    "--no-progress",
                ]
            )
            == 2
        )
    assert "the extraction is unfinished (2 of 3 shards done)" in err.getvalue(), err.getvalue()
    assert not extract_again.exists()


def test_global_features_come_from_a_local_torchvision_cache(photos, detector, tmp_path, monkeypatch):
    import torchvision

    from modeling_imagebert.features.global_features import GlobalFeatureExtractor, cached_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(
        FileNotFoundError, match=r"googlenet-1378be20.pth.*nothing is downloaded.*--global-weights"
    ):
        GlobalFeatureExtractor.from_local_weights("googlenet")
    torch.manual_seed(0)
    reference = torchvision.models.googlenet(weights=None, aux_logits=True, init_weights=False)
    path = cached_weights_path("googlenet")
    assert path == tmp_path / "torch" / "hub" / "checkpoints" / "googlenet-1378be20.pth"
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    extractor = GlobalFeatureExtractor.from_local_weights("googlenet")

    refs = list_images("folder", [photos])[:1]  # one image: a CNN forward costs seconds on a busy CPU
    extract(refs, tmp_path / "out", detector, global_extractor=extractor, shard_size=2)
    rows = rows_by_id(tmp_path / "out")
    # the same numbers as torchvision's own forward up to the pooled feature, on the preprocessed image
    captured = {}
    reference.eval().fc.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    reference.transform_input = True
    for ref in refs:
        image = decode_image(ref.read()).image
        with torch.inference_mode():
            reference(extractor.preprocess([image]))
        assert row_global(rows, ref.image_id).shape == (1024,)
        np.testing.assert_allclose(
            row_global(rows, ref.image_id), captured["x"][0].numpy(), rtol=1e-5, atol=1e-6
        )
    assert np.abs(row_global(rows, refs[0].image_id)).max() > 0

    # convert carries global_feature into the pairs dataset
    from fixtures_formats import write_karpathy_json

    from modeling_imagebert.data.convert import main as convert_main
    from modeling_imagebert.data.storage import load_dataset_from_disk

    image_id = refs[0].image_id
    karpathy = write_karpathy_json(
        tmp_path / "k.json", "flickr30k", [{"name": image_id, "split": "test", "captions": ["one", "two"]}]
    )
    arguments = ["features", str(tmp_path / "out"), "--captions", str(karpathy), "--format", "karpathy"]
    assert (
        convert_main([*arguments, "--split", "test", "--output", str(tmp_path / "pairs"), "--no-progress"])
        == 0
    )
    pairs = load_dataset_from_disk(tmp_path / "pairs", feature_dim=64)
    assert len(pairs) == 2
    for value in pairs["global_feature"]:
        assert np.array_equal(np.asarray(value, dtype=np.float32), row_global(rows, image_id))

    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other.pth: not a googlenet state dict"):
        GlobalFeatureExtractor.from_local_weights("googlenet", tmp_path / "other.pth")


def row_global(rows, image_id):
    return np.asarray(rows[image_id]["global_feature"], dtype=np.float32)


def test_refuses_folders_it_did_not_create_and_resumes_only_with_the_same_settings(
    photos, detector, tmp_path
):
    refs = list_images("folder", [photos])[:2]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ExtractionError, match="was not created by this extractor"):
        extract(refs, foreign, detector)
    assert [p.name for p in foreign.iterdir()] == ["precious.txt"]

    killed_at_once = tmp_path / "killed-while-writing-its-marker"
    killed_at_once.mkdir()
    (killed_at_once / ".tmp-imagebert_features.json-x1y2").write_text("{")
    extract(refs, killed_at_once, detector, shard_size=2)
    assert not list(killed_at_once.glob(".tmp-*")) and (killed_at_once / "manifest.json").is_file()

    extract(refs, tmp_path / "out", detector, shard_size=1)
    with pytest.raises(ExtractionError, match=r"shard_size: 1 then, 2 now"):
        extract(refs, tmp_path / "out", detector, shard_size=2)
    with pytest.raises(ExtractionError, match=r"num_images: 2 then, 3 now"):
        extract(list_images("folder", [photos])[:3], tmp_path / "out", detector, shard_size=1)
    summary = extract(refs, tmp_path / "out", detector, shard_size=1)  # same settings: nothing left to do
    assert summary.shards_written == 0 and summary.shards_done_before == 2 and summary.complete


def test_leftovers_of_a_killed_run_are_removed_reported_and_the_shard_redone(photos, detector, tmp_path):
    refs = list_images("folder", [photos])[:3]
    extract(refs, tmp_path / "straight", detector, shard_size=1)
    out = tmp_path / "out"
    extract(refs, out, detector, shard_size=1)
    shards = out / "shards"
    # a kill between the data rename and the done record, and one while writing shard 2
    (shards / "shard-00001.done.json").unlink()
    (shards / "shard-00002.done.json").unlink()
    (shards / "shard-00002.arrow").unlink()
    (shards / ".tmp-shard-00002.arrow-abc123").write_bytes(b"half a shard")
    messages = []
    model, processor = detector
    summary = run_extraction(
        refs,
        out,
        detect=partial(model.detect, processor=processor),
        feature_dim=64,
        detector_settings={"test": "tiny"},
        shard_size=1,
        show_progress=False,
        log=messages.append,
    )
    assert summary.shards_done_before == 1 and summary.shards_written == 2
    assert sorted(Path(p).name for p in summary.removed_leftovers) == [
        ".tmp-shard-00002.arrow-abc123",
        "shard-00001.arrow",
    ]
    assert any("removed leftover" in m and "abc123" in m for m in messages)
    assert not list(out.rglob(".tmp-*"))
    assert_same_rows(rows_by_id(tmp_path / "straight"), rows_by_id(out))


def _kill_and_resume(photos, detector_dir, tmp_path, rng, seconds):
    """Start the CLI in a subprocess, SIGKILL it a random moment after it created its folder, check that every
    shard on disk is complete, then resume in this process."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "modeling_imagebert.features",
        str(photos),
        "--detector",
        str(detector_dir),
        "--output",
        str(out),
        "--shard-size",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
        "--device",
        "cpu",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code, stderr = kill_at_random_moment(
        command,
        started=lambda: (out / "imagebert_features.json").exists(),
        seconds=seconds,
        rng=rng,
        env=env,
        cwd=REPO,
    )
    import datasets

    for data in (out / "shards").glob("shard-?????.arrow"):
        rows = len(datasets.Dataset.from_file(str(data)))  # a complete Arrow file, or it would not load
        done = data.with_name(data.name.replace(".arrow", ".done.json"))
        if done.exists():  # a finished shard holds every image its record counts
            assert rows == json.loads(done.read_text())["extracted"] == 1, data
    return code, stderr


def test_sigkill_at_a_random_moment_then_resume_equals_a_straight_run(
    photos, detector_dir, detector, tmp_path
):
    seed = int(os.environ.get("IMAGEBERT_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    refs = list_images("folder", [photos])
    straight = extract(refs, tmp_path / "straight", detector, shard_size=1, batch_size=2)
    code, stderr = _kill_and_resume(photos, detector_dir, tmp_path, rng, 1.5 * straight.seconds)
    assert code in (-signal.SIGKILL, 0), stderr
    status, out, err = run_cli(
        photos,
        "--detector",
        detector_dir,
        "--output",
        tmp_path / "out",
        "--shard-size",
        1,
        "--batch-size",
        2,
        "--no-progress",
        "--device",
        "cpu",
    )
    assert status == 0, (seed, err)
    assert not list((tmp_path / "out").rglob(".tmp-*")), seed
    assert_same_rows(rows_by_id(tmp_path / "straight"), rows_by_id(tmp_path / "out"))
    # every finished shard has its data and its record, and nothing else is in the folder
    names = sorted(p.name for p in (tmp_path / "out" / "shards").iterdir())
    assert names == sorted(
        [f"shard-{i:05d}.arrow" for i in range(8)] + [f"shard-{i:05d}.done.json" for i in range(8)]
    )


@pytest.mark.slow
@SLOW
def test_repeated_sigkills_then_resume_equal_a_straight_run(photos, detector_dir, detector, tmp_path):
    seed = int(os.environ.get("IMAGEBERT_KILL_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    refs = list_images("folder", [photos])
    straight = extract(refs, tmp_path / "straight", detector, shard_size=1, batch_size=2)
    for _ in range(4):
        _kill_and_resume(photos, detector_dir, tmp_path, rng, 2 * straight.seconds)
    status, out, err = run_cli(
        photos,
        "--detector",
        detector_dir,
        "--output",
        tmp_path / "out",
        "--shard-size",
        1,
        "--batch-size",
        2,
        "--no-progress",
        "--device",
        "cpu",
    )
    assert status == 0, (seed, err)
    assert not list((tmp_path / "out").rglob(".tmp-*")), seed
    assert_same_rows(rows_by_id(tmp_path / "straight"), rows_by_id(tmp_path / "out"))


@pytest.mark.slow
@SLOW
def test_two_accelerate_processes_write_the_same_dataset_as_one(photos, detector_dir, detector, tmp_path):
    """Two real gloo processes (accelerate launch on CPU) take alternate shards; the main one merges the
    manifest; the result equals a one-process run."""
    # Both runs with one thread per process: CPU kernels round differently with other thread counts.
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    extraction = [
        "-m", "modeling_imagebert.features", str(photos), "--detector", str(detector_dir), "--shard-size", "2",
        "--batch-size", "2", "--no-progress",
    ]  # fmt: skip
    launch = [
        "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    for command in (
        [sys.executable, *extraction, "--output", str(tmp_path / "one"), "--device", "cpu"],
        [sys.executable, *launch, *extraction, "--output", str(tmp_path / "two")],
    ):
        done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    assert "shards: 2 written now, 0 done before, 4 in all (complete)" in done.stdout
    assert_same_rows(rows_by_id(tmp_path / "one"), rows_by_id(tmp_path / "two"))


def test_img2dataset_shards_with_their_captions_become_pairs(photos, detector_dir, tmp_path):
    import webdataset

    from modeling_imagebert.data.convert import main as convert_main
    from modeling_imagebert.data.storage import load_dataset_from_disk

    captions = {"000000000": "a cup of\tcoffee\n", "000000001": "a rocket"}
    with webdataset.TarWriter(str(tmp_path / "00000.tar")) as sink:  # as img2dataset writes its shards
        for (key, caption), name in zip(captions.items(), ("coffee", "rocket"), strict=True):
            record = {
                "key": key,
                "caption": caption,
                "url": f"http://example.com/{name}.jpg",
                "status": "success",
            }
            sink.write(
                {
                    "__key__": key,
                    "jpg": (photos / f"{name}.jpg").read_bytes(),
                    "txt": caption,
                    "json": json.dumps(record),
                }
            )
    status, out, err = run_cli(
        tmp_path / "00000.tar", "--detector", detector_dir, "--output", tmp_path / "features", "--write-captions",
        "--no-progress", "--device", "cpu",
    )  # fmt: skip
    assert status == 0, err
    assert (tmp_path / "features" / "captions.tsv").read_text().splitlines() == [
        "a cup of coffee\thttp://example.com/coffee.jpg\t000000000",
        "a rocket\thttp://example.com/rocket.jpg\t000000001",
    ]
    status = convert_main([
        "features", str(tmp_path / "features"), "--captions", str(tmp_path / "features" / "captions.tsv"),
        "--format", "cc", "--cc-id-column", "2", "--output", str(tmp_path / "pairs"), "--no-progress",
    ])  # fmt: skip
    assert status == 0
    pairs = load_dataset_from_disk(tmp_path / "pairs", feature_dim=64)
    assert sorted(zip(pairs["image_id"], pairs["caption"], strict=True)) == [
        ("000000000", "a cup of coffee"),
        ("000000001", "a rocket"),
    ]
    status, _, err = run_cli(
        photos, "--detector", detector_dir, "--output", tmp_path / "other", "--write-captions"
    )
    assert (
        status == 2
        and "--write-captions reads img2dataset .txt captions: it needs --source webdataset" in err
    )


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("name", ["resnet152", "densenet161"])
def test_large_global_models_load_torchvision_checkpoints(name, tmp_path, monkeypatch):
    """ResNet-152 and DenseNet-161 read their files from torchvision's cache; DenseNet's published file uses the
    old key names ("norm.1"), which are renamed while loading as torchvision does."""
    import re

    import torchvision

    from modeling_imagebert.features.global_features import GlobalFeatureExtractor, cached_weights_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    reference = getattr(torchvision.models, name)(weights=None).eval()
    state = reference.state_dict()
    if name == "densenet161":
        state = {
            re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in state.items()
        }
        assert any(".norm.1." in key for key in state)
    path = cached_weights_path(name)
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    extractor = GlobalFeatureExtractor.from_local_weights(name)
    image = np.asarray(Image.fromarray(photo("chelsea")))
    features = extractor.extract([image])
    assert features.shape == (1, {"resnet152": 2048, "densenet161": 2208}[name])
    head = reference.fc if name == "resnet152" else reference.classifier
    captured = {}
    head.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    with torch.inference_mode():
        reference(extractor.preprocess([image]))
    np.testing.assert_allclose(features[0], captured["x"][0].numpy(), rtol=1e-5, atol=1e-6)
