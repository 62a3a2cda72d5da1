"""Importers read the real feature and caption formats exactly, and refuse or report bad input loudly."""

import base64
import csv
import hashlib
import logging
import runpy
import sys

import numpy as np
import pytest
from fixtures_formats import (
    butd_fields,
    make_detections,
    write_bua_npz,
    write_butd_tsv,
    write_cc_tsv,
    write_karpathy_json,
    write_sbu,
    write_uniter_npz,
)

from modeling_imagebert.data.convert import main
from modeling_imagebert.data.importers import (
    ImportFormatError,
    ImportReport,
    build_pair_dataset,
    read_butd_tsv,
    read_cc_captions,
    read_karpathy_captions,
    read_npz_dir,
    read_sbu_captions,
)

F = 16
FLICKR_IDS = ["1000092795", "10002456", "1000268201", "1000344755"]


@pytest.fixture
def detections():
    return [make_detections(image_id, 3 + i, F, seed=i) for i, image_id in enumerate(FLICKR_IDS)]


@pytest.fixture
def butd_tsv(tmp_path, detections):
    return write_butd_tsv(tmp_path / "flickr30k_obj36.tsv", detections)


@pytest.fixture
def flickr_json(tmp_path):
    images = [
        {"name": FLICKR_IDS[0], "split": "test", "captions": ["Two young guys are outside.", "Two men."]},
        {"name": FLICKR_IDS[1], "split": "train", "captions": ["A dog runs."]},
        {"name": FLICKR_IDS[2], "split": "test", "captions": ["A child climbs stairs."]},
        {"name": "99999999", "split": "test", "captions": ["An image with no features."]},
    ]
    return write_karpathy_json(tmp_path / "dataset_flickr30k.json", "flickr30k", images)


def assert_record_matches(record, source):
    """Boxes, classes, scores and size are preserved; features equal the float32 -> float16 cast bit for bit."""
    assert record["image_id"] == source["img_id"]
    assert (record["image_width"], record["image_height"]) == (source["img_w"], source["img_h"])
    expected = source["features"].astype(np.float16)
    got = np.asarray(record["region_features"])
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got.view(np.uint16), expected.view(np.uint16))
    np.testing.assert_array_equal(np.asarray(record["region_boxes"], dtype=np.float32), source["boxes"])
    np.testing.assert_array_equal(np.asarray(record["region_classes"]), source["objects_id"])
    np.testing.assert_array_equal(
        np.asarray(record["region_scores"], dtype=np.float32), source["objects_conf"]
    )


# ---------------------------------------------------------------- bottom-up-attention TSV


def test_butd_tsv_preserves_sizes_boxes_classes_scores_and_casts_features_to_float16_exactly(
    butd_tsv, detections
):
    records = list(read_butd_tsv(butd_tsv, feature_dim=F, show_progress=False))
    assert len(records) == len(detections)
    for record, source in zip(records, detections, strict=True):
        assert_record_matches(record, source)


def test_butd_tsv_reads_rows_larger_than_the_csv_default_field_limit(tmp_path):
    big = make_detections("COCO_val2014_000000391895", 10, 4096, seed=7)  # ~220 kB base64 field
    path = write_butd_tsv(tmp_path / "big.tsv", [big])
    csv.field_size_limit(131072)  # the csv default, which LXMERT raises to sys.maxsize
    (record,) = read_butd_tsv(path, show_progress=False)
    assert_record_matches(record, big)


def test_butd_truncated_base64_error_names_file_line_image_and_column(tmp_path, detections):
    rows = [butd_fields(d) for d in detections]
    rows[2]["features"] = rows[2]["features"][:-7]  # a file cut mid-write
    path = write_butd_tsv(tmp_path / "cut.tsv", detections, rows=rows)
    with pytest.raises(ImportFormatError) as info:
        list(read_butd_tsv(path, show_progress=False))
    message = str(info.value)
    assert "cut.tsv:3" in message and FLICKR_IDS[2] in message and "'features'" in message
    assert "base64" in message
    assert (info.value.line, info.value.image_id, info.value.field) == (3, FLICKR_IDS[2], "features")


def test_butd_buffer_shorter_than_num_boxes_is_an_error_naming_the_column(tmp_path, detections):
    rows = [butd_fields(d) for d in detections]
    rows[1]["num_boxes"] = str(detections[1]["num_boxes"] + 1)
    path = write_butd_tsv(tmp_path / "count.tsv", detections, rows=rows)
    with pytest.raises(ImportFormatError, match=r"count\.tsv:2.*10002456.*'objects_id'.*expected num_boxes"):
        list(read_butd_tsv(path, show_progress=False))


def test_butd_features_of_the_wrong_dimension_are_refused(butd_tsv):
    with pytest.raises(
        ImportFormatError, match=r":1, image_id='1000092795', field 'features'.*feature_dim = 3 \* 8"
    ):
        list(read_butd_tsv(butd_tsv, feature_dim=8, show_progress=False))


def test_butd_features_beyond_float16_range_are_refused(tmp_path):
    bad = make_detections("1", 2, F, seed=0)
    bad["features"][1, 3] = 1e6
    path = write_butd_tsv(tmp_path / "huge.tsv", [bad])
    with pytest.raises(ImportFormatError, match="float16 range"):
        list(read_butd_tsv(path, show_progress=False))


def test_butd_skip_mode_counts_each_bad_row_by_reason_and_logs_it(tmp_path, detections, caplog):
    rows = [butd_fields(d) for d in detections]
    rows[0]["boxes"] = rows[0]["boxes"][:-4] + "!!!!"  # not base64
    rows[3]["img_h"] = "0"
    path = write_butd_tsv(tmp_path / "mixed.tsv", detections, rows=rows)
    report = ImportReport()
    with caplog.at_level(logging.WARNING):
        records = list(read_butd_tsv(path, on_error="skip", report=report, show_progress=False))
    assert [r["image_id"] for r in records] == FLICKR_IDS[1:3]
    assert report.images_read == 2
    assert report.skipped == {"bad_base64": 1, "bad_count": 1}
    assert "mixed.tsv:1" in report.messages["bad_base64"][0]
    assert "skipped 2 record(s)" in caplog.text


# ---------------------------------------------------------------- per-image npz


def test_uniter_npz_scales_norm_bb_to_pixels_and_takes_classes_from_soft_labels_without_background(
    tmp_path, detections
):
    for d in detections:
        write_uniter_npz(tmp_path / "npz", d)
    size = (detections[0]["img_w"], detections[0]["img_h"])
    records = list(read_npz_dir(tmp_path / "npz", feature_dim=F, image_size=size, show_progress=False))
    by_id = {r["image_id"]: r for r in records}
    assert sorted(by_id) == sorted(FLICKR_IDS)
    for source in detections:
        record = by_id[source["img_id"]]
        np.testing.assert_allclose(record["region_boxes"], source["boxes"], rtol=1e-5, atol=1e-3)
        np.testing.assert_array_equal(record["region_classes"], source["objects_id"])
        np.testing.assert_array_equal(record["region_scores"], source["objects_conf"])
        np.testing.assert_array_equal(
            record["region_features"].view(np.uint16), source["features"].astype(np.float16).view(np.uint16)
        )


def test_normalised_boxes_without_an_image_size_are_a_clear_error(tmp_path, detections):
    write_uniter_npz(tmp_path / "npz", detections[0])
    with pytest.raises(
        ImportFormatError, match=r"1000092795\.npz, image_id='1000092795', field 'norm_bb'.*image_size"
    ):
        list(read_npz_dir(tmp_path / "npz", show_progress=False))


def test_uniter_npz_uses_its_own_image_size_when_present(tmp_path, detections):
    write_uniter_npz(tmp_path / "npz", detections[1], with_size=True)
    (record,) = read_npz_dir(tmp_path / "npz", image_size=(1, 1), show_progress=False)
    assert (record["image_width"], record["image_height"]) == (640, 480)
    np.testing.assert_allclose(record["region_boxes"], detections[1]["boxes"], rtol=1e-5, atol=1e-3)


def test_bottom_up_attention_pytorch_npz_reads_info_only_when_pickle_is_allowed(tmp_path, detections):
    write_bua_npz(tmp_path / "bua", detections[2])
    with pytest.raises(ImportFormatError, match="allow_pickle=True"):
        list(read_npz_dir(tmp_path / "bua", show_progress=False))
    (record,) = read_npz_dir(tmp_path / "bua", allow_pickle=True, show_progress=False)
    assert_record_matches(record, detections[2])


def test_npz_skip_mode_reports_unreadable_files(tmp_path, detections):
    write_bua_npz(tmp_path / "bua", detections[0])
    (tmp_path / "bua" / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    report = ImportReport()
    records = list(
        read_npz_dir(tmp_path / "bua", allow_pickle=True, on_error="skip", report=report, show_progress=False)
    )
    assert [r["image_id"] for r in records] == [FLICKR_IDS[0]]
    assert report.skipped == {"unreadable_file": 1}
    assert "broken.npz" in report.messages["unreadable_file"][0]


# ---------------------------------------------------------------- captions


def test_karpathy_flickr_yields_raw_captions_of_the_split_keyed_by_filename_stem(flickr_json):
    pairs = list(read_karpathy_captions(flickr_json, "test"))
    assert pairs == [
        (FLICKR_IDS[0], "Two young guys are outside."),
        (FLICKR_IDS[0], "Two men."),
        (FLICKR_IDS[2], "A child climbs stairs."),
        ("99999999", "An image with no features."),
    ]


def test_karpathy_coco_restval_counts_as_train_and_ids_follow_the_chosen_style(tmp_path):
    images = [
        {"name": "COCO_val2014_000000391895", "split": "restval", "captions": ["A man rides a bike."]},
        {"name": "COCO_train2014_000000000009", "split": "train", "captions": ["Food in bowls."]},
        {"name": "COCO_val2014_000000522418", "split": "test", "captions": ["A woman cuts cake."]},
    ]
    path = write_karpathy_json(tmp_path / "dataset_coco.json", "coco", images)
    assert [i for i, _ in read_karpathy_captions(path, "train")] == [
        "COCO_val2014_000000391895",
        "COCO_train2014_000000000009",
    ]
    assert [i for i, _ in read_karpathy_captions(path, "train", restval_as_train=False)] == [
        "COCO_train2014_000000000009"
    ]
    assert [i for i, _ in read_karpathy_captions(path, "train", image_id_style="cocoid")] == ["391895", "9"]
    with pytest.raises(ValueError, match="split"):
        list(read_karpathy_captions(path, "dev"))


def test_cc_ids_are_row_indices_or_url_hashes_and_bad_lines_name_the_line(tmp_path):
    url = "http://example.org/a.jpg"
    path = write_cc_tsv(
        tmp_path / "Train_GCC-training.tsv", [("a very typical bus station", url), ("sierra", "u2")]
    )
    assert list(read_cc_captions(path)) == [("0", "a very typical bus station"), ("1", "sierra")]
    sha = hashlib.sha1(url.encode()).hexdigest()
    assert next(read_cc_captions(path, id_format="{url_sha1}")) == (sha, "a very typical bus station")
    with open(path, "a") as handle:
        handle.write("a caption without url\n")
    with pytest.raises(ImportFormatError, match=r"Train_GCC-training\.tsv:3.*2 tab-separated columns"):
        list(read_cc_captions(path))
    report = ImportReport()
    assert len(list(read_cc_captions(path, on_error="skip", report=report))) == 2
    assert report.skipped == {"column_count": 1}


def test_sbu_ids_are_line_indices_or_flickr_photo_ids_and_misaligned_files_are_refused(tmp_path):
    pairs = [
        (
            "Man sits in a rusted car buried in the sand on Waitarere beach ",
            "http://static.flickr.com/2723/4385058960_b0f291553e.jpg",
        ),
        ("Interior design of modern living room ", "http://static.flickr.com/3205/3049946442_60b2a53ae4.jpg"),
    ]
    captions, urls = write_sbu(tmp_path / "caps.txt", tmp_path / "urls.txt", pairs)
    assert list(read_sbu_captions(captions, urls))[1] == ("1", "Interior design of modern living room")
    assert [i for i, _ in read_sbu_captions(captions, urls, image_id_style="photo_id")] == [
        "4385058960",
        "3049946442",
    ]
    urls.write_text(urls.read_text() + "http://static.flickr.com/1/1_a.jpg\n")
    with pytest.raises(ImportFormatError, match="2 lines.*has 3"):
        list(read_sbu_captions(captions, urls))


# ---------------------------------------------------------------- joining


def test_pair_dataset_has_one_row_per_caption_with_the_image_features_preserved(
    butd_tsv, flickr_json, detections
):
    report = ImportReport()
    ds = build_pair_dataset(
        read_karpathy_captions(flickr_json, "test", report=report),
        read_butd_tsv(butd_tsv, report=report, show_progress=False),
        feature_dim=F,
        report=report,
        show_progress=False,
    )
    assert ds["caption"] == ["Two young guys are outside.", "Two men.", "A child climbs stairs."]
    rows = ds.with_format("numpy", dtype=None)
    for row, source in zip(rows, [detections[0], detections[0], detections[2]], strict=True):
        assert_record_matches(row, source)
    assert report.rows_written == 3 and report.images_read == 4
    assert report.skipped == {"missing_image": 1}


def test_captions_of_missing_images_raise_naming_the_image_when_asked(butd_tsv, flickr_json):
    with pytest.raises(ImportFormatError, match="99999999.*no features"):
        build_pair_dataset(
            read_karpathy_captions(flickr_json, "test"),
            read_butd_tsv(butd_tsv, show_progress=False),
            feature_dim=F,
            on_missing="raise",
            show_progress=False,
        )


def test_duplicate_image_ids_in_features_raise_or_keep_the_first_and_count(detections):
    duplicate = make_detections(FLICKR_IDS[0], 2, F, seed=99)
    records = [next(read_butd_rows([d])) for d in (detections[0], duplicate)]
    captions = [(FLICKR_IDS[0], "a caption")]
    with pytest.raises(ImportFormatError, match="1000092795.*duplicate image id"):
        build_pair_dataset(captions, records, feature_dim=F, show_progress=False)
    report = ImportReport()
    ds = build_pair_dataset(
        captions, records, feature_dim=F, on_duplicate="skip", report=report, show_progress=False
    )
    assert_record_matches(ds.with_format("numpy", dtype=None)[0], detections[0])
    assert report.skipped == {"duplicate_image_id": 1}


def read_butd_rows(detections):
    from modeling_imagebert.data.importers import decode_butd_row

    for d in detections:
        yield decode_butd_row(butd_fields(d))


def test_id_scheme_mismatch_yields_an_error_with_a_hint_instead_of_an_empty_dataset(detections):
    records = {
        "COCO_val2014_000000391895": next(read_butd_rows([detections[0]]))
        | {"image_id": "COCO_val2014_000000391895"}
    }
    with pytest.raises(ImportFormatError, match="no caption matched.*try another image_id_style"):
        build_pair_dataset([("391895", "a man")], iter(records.values()), feature_dim=F, show_progress=False)


# ---------------------------------------------------------------- command line


def test_cli_converts_tsv_and_karpathy_end_to_end_and_prints_a_summary(
    tmp_path, butd_tsv, flickr_json, detections, capsys
):
    from modeling_imagebert.data.storage import load_dataset_from_disk

    out = tmp_path / "flickr_test"
    argv = [
        "butd-tsv",
        str(butd_tsv),
        "--captions",
        str(flickr_json),
        "--format",
        "karpathy",
        "--split",
        "test",
        "--output",
        str(out),
        "--num-shards",
        "2",
        "--no-progress",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote 3 rows to {out}" in printed and "missing_image: 1" in printed
    ds = load_dataset_from_disk(out)
    assert ds["image_id"] == [FLICKR_IDS[0], FLICKR_IDS[0], FLICKR_IDS[2]]
    assert_record_matches(ds.with_format("numpy", dtype=None)[2], detections[2])
    assert main(argv) == 2  # refuses to overwrite
    assert "exists" in capsys.readouterr().err


def test_cli_npz_with_cc_captions(tmp_path, detections, capsys):
    from modeling_imagebert.data.storage import load_dataset_from_disk

    for i, d in enumerate(detections[:2]):
        write_bua_npz(tmp_path / "npz", d | {"img_id": str(i)})
    captions = write_cc_tsv(tmp_path / "cc.tsv", [("first", "u0"), ("second", "u1")])
    out = tmp_path / "cc"
    argv = [
        "npz",
        str(tmp_path / "npz"),
        "--captions",
        str(captions),
        "--format",
        "cc",
        "--allow-pickle",
        "--output",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0
    ds = load_dataset_from_disk(out)
    assert ds["caption"] == ["first", "second"]
    assert_record_matches(ds.with_format("numpy", dtype=None)[1], detections[1] | {"img_id": "1"})


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # the test module imported it
def test_cli_exits_non_zero_with_one_line_naming_the_bad_record(
    tmp_path, detections, flickr_json, capsys, monkeypatch
):
    rows = [butd_fields(d) for d in detections]
    rows[1]["boxes"] = base64.b64encode(b"\x00" * 12).decode()  # 3 floats, not num_boxes * 4
    path = write_butd_tsv(tmp_path / "bad.tsv", detections, rows=rows)
    argv = ["butd-tsv", str(path), "--captions", str(flickr_json), "--format", "karpathy", "--split", "test",
            "--output", str(tmp_path / "out"), "--no-progress"]  # fmt: skip
    # Run the module as `python -m` does (in-process: a fresh interpreter would spend seconds importing torch).
    monkeypatch.setattr(sys, "argv", ["convert", *argv])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("modeling_imagebert.data.convert", run_name="__main__")
    assert exited.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "bad.tsv:2" in error_lines[0] and "10002456" in error_lines[0] and "'boxes'" in error_lines[0]
    assert not (tmp_path / "out").exists()


def test_butd_row_decoder_runs_under_datasets_map(detections):
    import datasets

    from modeling_imagebert.data.importers import decode_butd_row

    raw = datasets.Dataset.from_list([butd_fields(d) for d in detections[:2]])
    decoded = raw.map(lambda row: decode_butd_row(row, feature_dim=F), remove_columns=raw.column_names)
    for row, source in zip(decoded.with_format("numpy", dtype=None), detections, strict=False):
        assert_record_matches(row, source)


def test_image_records_failing_schema_validation_raise_or_are_counted_as_invalid(detections):
    from modeling_imagebert.data.schema import DataValidationError

    bad = next(read_butd_rows([detections[1]]))
    bad["region_boxes"] = bad["region_boxes"][:, [2, 3, 0, 1]].copy()  # x2 < x1: corners swapped
    records = [next(read_butd_rows([detections[0]])), bad]
    captions = [(FLICKR_IDS[0], "kept"), (FLICKR_IDS[1], "dropped one"), (FLICKR_IDS[1], "dropped two")]
    with pytest.raises(DataValidationError, match="10002456"):
        build_pair_dataset(captions, records, feature_dim=F, show_progress=False)
    report = ImportReport()
    ds = build_pair_dataset(
        captions, records, feature_dim=F, on_invalid="skip", report=report, show_progress=False
    )
    assert ds["caption"] == ["kept"]
    assert report.skipped == {"invalid_record": 2}
