"""Issue 25, pre-training, feature extraction and the importers: every value checked where it enters, and a bad
file skipped with a reason instead of stopping a run.

- the validation cache of run_pretrain is keyed on the data's bytes, so a file rewritten in place (size and
  modification time kept) is validated again;
- a recipe setting that leaves an enabled task nothing to learn (`itm_batch_fraction: 0` with ITM on, ...) and a
  run flag out of range (`--max_steps_this_run 0`, a features flag such as `--max-pixels -1`) are refused by name;
- an image id the outputs cannot hold (a TAB or newline in a webdataset key, a file name that is not UTF-8) is
  skipped as `bad_image_id`; a damaged tar shard is skipped as `unreadable` and the run goes on;
- a Karpathy JSON nested too deep for Python is one error naming the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
import types
from pathlib import Path

import numpy as np
import pytest
from feature_fixtures import save_tiny_detector, write_photos

from modeling_imagebert.pretraining.recipes import RecipeError, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
TOY = {"world_seed": 0, "feature_dim": 16, "num_classes": 6, "num_attributes": 2, "num_images": 16}


# ----------------------------------------------------------------------------------- group 5: the validation cache


def _save_toy(folder: Path, nan: bool) -> Path:
    import datasets

    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    dataset = make_toy_world(**TOY, variant="curated", seed=3)
    if nan:
        rows = dataset.to_list()
        rows[3]["region_features"][1][2] = float("nan")
        dataset = datasets.Dataset.from_list(rows, features=dataset.features)
    return save_dataset(dataset, folder, validate=False)


def test_a_dataset_rewritten_in_place_with_size_and_mtime_kept_is_validated_again(tmp_path, monkeypatch):
    import datasets

    from modeling_imagebert.data.schema import DataValidationError
    from modeling_imagebert.pretraining import stage_checks
    from modeling_imagebert.pretraining.recipes import DatasetSpec

    monkeypatch.setenv(stage_checks.CACHE_ENV, str(tmp_path / "validated"))
    good, bad = _save_toy(tmp_path / "good", nan=False), _save_toy(tmp_path / "bad", nan=True)
    config = types.SimpleNamespace(visual_feature_dim=16, num_object_classes=7)
    spec = DatasetSpec(path=str(good))

    def check():
        dataset = datasets.load_from_disk(str(good))
        return stage_checks.check_source(
            dataset, spec, "stages[0].datasets[0]", config, show_progress=False, log=print
        )

    assert not check().cached
    assert check().cached  # the unchanged data is not scanned twice
    shard = next(good.glob("data-*.arrow"))
    before = shard.stat()
    replacement = next(bad.glob("data-*.arrow")).read_bytes()
    assert len(replacement) == before.st_size  # the same size: one float16 became NaN
    with open(shard, "r+b") as handle:  # in place: same inode, same size
        handle.write(replacement)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the modification time put back
    assert shard.stat().st_mtime_ns == before.st_mtime_ns and shard.stat().st_size == before.st_size
    with pytest.raises(DataValidationError, match=r"stages\[0\]\.datasets\[0\].*record 3.*region_features"):
        check()


def test_a_remembered_digest_is_reused_until_a_write_changes_the_files_change_time(tmp_path, monkeypatch):
    import time

    import datasets

    from modeling_imagebert.pretraining import stage_checks

    monkeypatch.setenv(stage_checks.CACHE_ENV, str(tmp_path / "validated"))
    monkeypatch.setattr(stage_checks, "RACY_SECONDS", -1.0)  # remember even a file written a moment ago
    hashed = []
    real = stage_checks.file_digest
    monkeypatch.setattr(stage_checks, "file_digest", lambda path: hashed.append(path) or real(path))
    good, bad = _save_toy(tmp_path / "good", nan=False), _save_toy(tmp_path / "bad", nan=True)

    def key():
        return stage_checks.dataset_cache_key(datasets.load_from_disk(str(good)))

    first = key()
    files = len(hashed)
    assert files >= 1 and key() == first and len(hashed) == files  # unchanged: no byte read again
    time.sleep(0.05)  # past the file system's timestamp tick
    shard = next(good.glob("data-*.arrow"))
    before = shard.stat()
    with open(shard, "r+b") as handle:
        handle.write(next(bad.glob("data-*.arrow")).read_bytes())
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert key() != first and len(hashed) > files


# ------------------------------------------------------------------- group 7: recipe values and run flags refused


def _stage(**fields) -> dict:
    stage = {"init": "bert", "datasets": [{"toy_world": {"variant": "web", "num_images": 8}}], "max_steps": 2}
    stage.update(fields)
    return {"model": {"bert_checkpoint": "some/bert"}, "stages": [stage]}


TEXT_ONLY = [{"toy_world": {"variant": "curated", "num_images": 8}, "modality": "text"}]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"itm_batch_fraction": 0.0}, "stages[0].itm_batch_fraction: 0 with the itm task on"),
        ({"itm_batch_fraction": 1.0}, "stages[0].itm_batch_fraction: 1 makes every batch an ITM batch"),
        ({"itm_negative_rate": 0.0}, "stages[0].itm_negative_rate: 0 gives ITM no mismatched pair"),
        ({"itm_negative_rate": 1.0}, "stages[0].itm_negative_rate: 1 gives ITM no matched pair"),
        ({"mlm_probability": 0.0}, "stages[0].mlm_probability: 0 masks no token"),
        ({"region_mask_probability": 0.0}, "stages[0].region_mask_probability: 0 masks no region"),
        (
            {"tasks": {"itm": 1.0, "itc": 1.0}, "itm_negatives": "itc", "itm_hard_negative_fraction": 0.0},
            "stages[0].itm_hard_negative_fraction: 0 re-draws no negative",
        ),
        (
            {"datasets": TEXT_ONLY, "tasks": {"mlm": 1.0, "moc": 1.0}},
            "stages[0].tasks: moc need image-text data",
        ),
    ],
)
def test_a_setting_that_leaves_an_enabled_task_nothing_to_learn_is_refused_by_name(fields, named):
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(_stage(**fields))
    assert str(error.value).startswith(named) and "\n" not in str(error.value)


def test_the_same_settings_with_the_task_off_are_accepted():
    # A task with weight 0 is off (documented): its settings do not matter.
    recipe_from_dict(_stage(tasks={"mlm": 1.0, "moc": 1.0, "mrfr": 1.0, "itm": 0.0}, itm_batch_fraction=0.0))
    recipe_from_dict(_stage(tasks={"itm": 1.0}, mlm_probability=0.0, region_mask_probability=0.0))
    recipe_from_dict(_stage(itm_mode="joint", itm_batch_fraction=0.0))  # joint batches ignore the fraction


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--max_steps_this_run", "0"], "--max_steps_this_run: expected an integer >= 1"),
        (["--max_steps_this_run", "-1"], "--max_steps_this_run: expected an integer >= 1"),
        (["--seed", "-1"], "training.seed: expected an integer in [0, 2**32)"),
    ],
)
def test_run_pretrain_refuses_a_count_flag_out_of_range_before_anything_runs(argv, named, tmp_path):
    from modeling_imagebert.package_data import demo_recipe_path
    from modeling_imagebert.pretraining.arguments import build_argument_parser, recipe_from_arguments

    args = build_argument_parser(None, demo_recipe_path()).parse_args(
        ["--output_dir", str(tmp_path / "o"), *argv]
    )
    with pytest.raises(ValueError) as error:
        recipe_from_arguments(args)
    assert named in str(error.value)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flag",
    [
        ["--max-pixels", "-1"],
        ["--min-side", "-1"],
        ["--shard-size", "0"],
        ["--batch-size", "0"],
        ["--num-workers", "0"],
        ["--num-boxes", "0"],
        ["--adaptive", "5", "2"],
    ],
)
def test_features_refuses_a_numeric_flag_out_of_range_by_name(flag, tmp_path):
    from modeling_imagebert.features.__main__ import main

    photos = write_photos(tmp_path / "photos", names=("coffee",), size=48)
    detector = tmp_path / "no-detector"  # never reached: the flags are checked first
    status, err = _features(main, photos, "--detector", detector, "--output", tmp_path / "out", *flag)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and errors[0].startswith(f"error: {flag[0]}: expected"), err
    assert not (tmp_path / "out").exists()


def _features(main, *argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main([str(arg) for arg in argv])
    return status, err.getvalue()


# ----------------------------------------------- groups 7 and 8: ids the outputs cannot hold, damaged shards, names


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    return save_tiny_detector(tmp_path_factory.mktemp("detector"))


@pytest.fixture(scope="module")
def jpeg(tmp_path_factory) -> bytes:
    return (
        write_photos(tmp_path_factory.mktemp("photo"), names=("coffee",), size=64) / "coffee.jpg"
    ).read_bytes()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:  # PAX: any character in a name
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _extract(detector_dir, output: Path, *inputs, extra=()) -> tuple[int, str]:
    from modeling_imagebert.features.__main__ import main

    return _features(main, *inputs, "--detector", detector_dir, "--output", output, "--device", "cpu",
                     "--no-progress", "--num-workers", "1", *extra)  # fmt: skip


def _skipped(output: Path) -> list[list[str]]:
    text = (output / "skipped.tsv").read_bytes().decode("utf-8")  # strict: every byte written is UTF-8
    return [line.split("\t") for line in text.splitlines()[1:]]


@pytest.mark.parametrize("output_format", ["butd-tsv", "dataset", "npz"])
def test_a_webdataset_key_with_a_tab_or_newline_is_skipped_as_bad_image_id_not_written(
    output_format, detector_dir, jpeg, tmp_path
):
    from modeling_imagebert.feature_formats import iter_extracted_records

    shard = _tar(
        tmp_path / "00000.tar",
        [("a\tb.jpg", jpeg), ("good.jpg", jpeg), ("c\nd.jpg", jpeg), ("e\rf.jpg", jpeg)],
    )
    status, err = _extract(detector_dir, tmp_path / "out", shard, extra=["--output-format", output_format])
    assert status == 0, err
    assert [record["image_id"] for record in iter_extracted_records(tmp_path / "out")] == ["good"]
    skipped = _skipped(tmp_path / "out")
    assert [(row[0], row[2]) for row in skipped] == [("a\\tb", "bad_image_id"), ("c\\nd", "bad_image_id"),
                                                     ("e\\rf", "bad_image_id")]  # fmt: skip
    assert all(len(row) == 4 for row in skipped)
    if output_format == "butd-tsv":  # one row of 10 columns per extracted image, nothing else
        lines = next((tmp_path / "out" / "shards").glob("*.tsv")).read_text().split("\n")
        assert [len(line.split("\t")) for line in lines if line] == [10]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["skipped"] == {"bad_image_id": 3} and summary["extracted"] == 1


def test_a_file_name_that_is_not_utf8_is_skipped_and_every_output_stays_utf8(detector_dir, jpeg, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(jpeg)
    try:
        Path(os.fsdecode(os.fsencode(folder) + b"/caf\xe9.jpg")).write_bytes(jpeg)
    except (OSError, UnicodeError):  # pragma: no cover - a file system that only takes UTF-8 names
        pytest.skip("this file system refuses non-UTF-8 file names")
    status, err = _extract(detector_dir, tmp_path / "out", folder)
    assert status == 0, err
    assert [(row[0], row[2]) for row in _skipped(tmp_path / "out")] == [("caf\\xe9", "bad_image_id")]
    for path in (tmp_path / "out").rglob("*.json"):
        path.read_bytes().decode("utf-8")


def test_a_damaged_tar_shard_is_skipped_as_unreadable_and_the_run_goes_on(detector_dir, jpeg, tmp_path):
    good = _tar(tmp_path / "00000.tar", [("g1.jpg", jpeg), ("g2.jpg", jpeg)])
    full = _tar(tmp_path / "full.tar", [("c1.jpg", jpeg), ("c2.jpg", jpeg), ("c3.jpg", jpeg)]).read_bytes()
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full[: len(full) // 2])  # cut inside the second image
    garbage = tmp_path / "00002.tar"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    status, err = _extract(detector_dir, tmp_path / "out", good, cut, garbage, extra=["--write-captions"])
    assert status == 0, err
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["extracted"] == 3  # g1, g2 and the intact c1
    assert summary["skipped"] == {"unreadable": 3}  # c2 cut short, the rest of 00001.tar, all of 00002.tar
    origins = sorted(row[1] for row in _skipped(tmp_path / "out"))
    assert origins == sorted([f"{cut}#c2.jpg", str(cut), str(garbage)])


def test_only_unreadable_shards_is_one_error_naming_the_shard(detector_dir, tmp_path):
    empty = tmp_path / "00000.tar"
    empty.write_bytes(b"")
    status, err = _extract(detector_dir, tmp_path / "out", empty)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 2 and len(errors) == 1 and str(empty) in errors[0], err


# --------------------------------------------------------------------------------- group 8: deep Karpathy JSON


def test_a_karpathy_json_nested_200000_deep_is_one_error_naming_the_file(tmp_path):
    from modeling_imagebert.data.importers.karpathy import read_karpathy_captions
    from modeling_imagebert.feature_formats.report import ImportFormatError

    path = tmp_path / "dataset_flickr30k.json"
    path.write_text('{"images": ' + "[" * 200_000 + "]" * 200_000 + "}")
    with pytest.raises(ImportFormatError, match="dataset_flickr30k.json.*nested deeper"):
        list(read_karpathy_captions(path, split="test"))


def test_a_webdataset_json_sidecar_nested_200000_deep_leaves_the_url_empty(detector_dir, jpeg, tmp_path):
    deep = ("[" * 200_000 + "]" * 200_000).encode()
    shard = _tar(tmp_path / "00000.tar", [("s1.jpg", jpeg), ("s1.txt", b"a cup"), ("s1.json", deep)])
    status, err = _extract(detector_dir, tmp_path / "out", shard, extra=["--write-captions"])
    assert status == 0, err
    assert (tmp_path / "out" / "captions.tsv").read_text() == "a cup\t\ts1\n"


# ------------------------------------------------------------------- a batch whose images have no region at all


def test_a_pretraining_batch_without_any_region_trains_the_text_tasks():
    """The schema allows an image with no region; a batch made only of such images gave `RuntimeError:
    ZeroDivisionError` (the region heads' placeholder row indexed an empty label tensor)."""
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.data.collators import add_labelled_positions

    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    torch.manual_seed(0)
    model = ImageBertForPreTraining(config)
    size, length, dim = 2, 8, config.visual_feature_dim
    input_ids = torch.randint(1000, 2000, (size, length))
    labels = torch.full((size, length), -100)
    labels[:, 2] = input_ids[:, 2]
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.ones(size, length, dtype=torch.long),
        "token_type_ids": torch.zeros(size, length, dtype=torch.long),
        "region_features": torch.zeros(size, 0, dim),
        "region_locations": torch.zeros(size, 0, 5),
        "region_attention_mask": torch.zeros(size, 0, dtype=torch.long),
        "labels": labels,
        "masked_regions": torch.zeros(size, 0, dtype=torch.bool),
        "region_class_labels": torch.zeros(size, 0, dtype=torch.long),
        "region_feature_targets": torch.zeros(size, 0, dim),
        "itm_labels": torch.tensor([1, 0]),
    }
    output = model(**add_labelled_positions(batch))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    assert output.moc_logits is None and output.mrfr_predictions is None
    assert output.mlm_logits.shape == (1, config.vocab_size)
