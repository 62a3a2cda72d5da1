"""Importers never misalign captions, name the line of every decoding error, and never unpickle more than `info`."""

import json
import pickle

import numpy as np
import pytest
from fixtures_formats import make_detections, write_bua_npz, write_butd_tsv, write_karpathy_json

from modeling_imagebert.data.convert import main
from modeling_imagebert.data.importers import (
    ImportFormatError,
    ImportReport,
    read_butd_tsv,
    read_cc_captions,
    read_karpathy_captions,
    read_npz_dir,
    read_sbu_captions,
)

F = 8


def test_cc_header_line_is_detected_and_counted_instead_of_shifting_captions(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_text("caption\turl\nfirst\thttp://a/0.jpg\nsecond\thttp://a/1.jpg\n")
    report = ImportReport()
    assert list(read_cc_captions(path, report=report)) == [("0", "first"), ("1", "second")]
    assert report.skipped == {"header_line": 1}
    assert list(read_cc_captions(path, header="none"))[0] == ("0", "caption")


def test_cc_caption_with_a_tab_is_an_error_naming_the_line_not_a_cut_caption(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_text("good one\thttp://a/0.jpg\na dog\tand a cat\thttp://a/1.jpg\n")
    with pytest.raises(ImportFormatError, match=r"cc.tsv:2.*got 3.*tab inside the caption"):
        list(read_cc_captions(path))
    report = ImportReport()
    assert list(read_cc_captions(path, on_error="skip", report=report)) == [("0", "good one")]
    assert report.skipped == {"column_count": 1}


def test_cc_and_sbu_files_with_cr_only_line_endings_keep_every_caption(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_bytes(b"first\thttp://a/0.jpg\rsecond\thttp://a/1.jpg\rthird\thttp://a/2.jpg\r")
    assert [c for _, c in read_cc_captions(path)] == ["first", "second", "third"]
    captions, urls = tmp_path / "c.txt", tmp_path / "u.txt"
    captions.write_bytes(b"one\rtwo\r")
    urls.write_bytes(b"http://static.flickr.com/1/11_a.jpg\rhttp://static.flickr.com/1/22_b.jpg\r")
    assert list(read_sbu_captions(captions, urls, image_id_style="photo_id")) == [
        ("11", "one"),
        ("22", "two"),
    ]


def test_undecodable_caption_bytes_name_the_file_and_line(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_bytes(b"fine\thttp://a/0.jpg\nbad \xff byte\thttp://a/1.jpg\n")
    with pytest.raises(ImportFormatError, match=r"cc.tsv:2.*not UTF-8"):
        list(read_cc_captions(path))
    karpathy = tmp_path / "k.json"
    karpathy.write_bytes(b'{"images": [\n{"filename": "a\xfe.jpg"}]}')
    with pytest.raises(ImportFormatError, match=r"k.json:2.*not UTF-8"):
        list(read_karpathy_captions(karpathy, "test"))


def test_undecodable_bytes_in_a_butd_tsv_name_the_line_and_column(tmp_path):
    detections = [make_detections(str(i), 2, F, seed=i) for i in range(3)]
    path = write_butd_tsv(tmp_path / "f.tsv", detections)
    lines = path.read_bytes().split(b"\n")
    lines[1] = b"\xff" + lines[1]
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(ImportFormatError, match=r"f.tsv:2.*'img_id'.*not UTF-8"):
        list(read_butd_tsv(path, show_progress=False))
    report = ImportReport()
    assert [
        r["image_id"] for r in read_butd_tsv(path, on_error="skip", report=report, show_progress=False)
    ] == [
        "0",
        "2",
    ]
    assert report.skipped == {"bad_encoding": 1}


def test_duplicate_karpathy_filenames_are_refused_or_counted_by_name(tmp_path):
    images = [
        {"name": "111", "split": "test", "captions": ["first image"]},
        {"name": "111", "split": "test", "captions": ["another image, same file name"]},
        {"name": "222", "split": "test", "captions": ["third"]},
    ]
    path = write_karpathy_json(tmp_path / "k.json", "flickr30k", images)
    with pytest.raises(ImportFormatError, match=r"images\[1\] repeats the image id '111' of images\[0\]"):
        list(read_karpathy_captions(path, "test"))
    report = ImportReport()
    pairs = list(read_karpathy_captions(path, "test", on_duplicate="skip", report=report))
    assert pairs == [("111", "first image"), ("222", "third")]
    assert report.skipped == {"duplicate_image_entry": 1} and "duplicate_image_entry: 1" in report.summary()


def test_duplicate_karpathy_ids_across_splits_are_refused(tmp_path):
    data = {"images": [
        {"filename": "a.jpg", "cocoid": 7, "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "b.jpg", "cocoid": 7, "split": "test", "sentences": [{"raw": "y"}]},
    ]}  # fmt: skip
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ImportFormatError, match="'7'"):
        list(read_karpathy_captions(path, "test", image_id_style="cocoid"))


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_raw_pickle_named_npz_is_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "npz"
    folder.mkdir()
    (folder / "1.npz").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(ImportFormatError, match="not an .npz") as error:
        list(read_npz_dir(folder, allow_pickle=True, show_progress=False))
    assert "allow_pickle" not in str(error.value) and not (tmp_path / "PWNED").exists()


def test_info_entry_with_code_is_refused_and_a_plain_info_dict_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    detections = make_detections("5", 3, F, seed=0)
    good = write_bua_npz(tmp_path / "good", detections)
    (record,) = read_npz_dir(good.parent, allow_pickle=True, show_progress=False)
    np.testing.assert_array_equal(record["region_classes"], detections["objects_id"])
    bad = tmp_path / "bad"
    bad.mkdir()
    info = np.empty((), dtype=object)
    info[()] = {"objects_id": _RunsCode()}
    np.savez(
        bad / "5.npz", x=detections["features"], bbox=detections["boxes"], image_w=640, image_h=480, info=info
    )
    with pytest.raises(ImportFormatError, match=r"field 'info'.*refused to load builtins.exec"):
        list(read_npz_dir(bad, allow_pickle=True, show_progress=False))
    assert not (tmp_path / "PWNED").exists()


def test_an_object_array_other_than_info_gets_no_numpy_pickle_hint(tmp_path, capsys):
    folder = tmp_path / "npz"
    folder.mkdir()
    features = np.empty(2, dtype=object)
    features[:] = [1, 2]
    np.savez(folder / "1.npz", features=features, boxes=np.zeros((2, 4)), image_w=1, image_h=1)
    captions = tmp_path / "cc.tsv"
    captions.write_text("c\thttp://u/0\n")
    code = main(["npz", str(folder), "--captions", str(captions), "--format", "cc", "--output", str(tmp_path / "o"),
                 "--no-progress", "--allow-pickle", "--image-id-style", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "1.npz" in err and "never read" in err and "allow_pickle" not in err


def test_an_id_template_with_unknown_fields_is_refused_before_reading(tmp_path):
    path = tmp_path / "cc.tsv"
    path.write_text("a\thttp://u/0\n")
    with pytest.raises(ValueError, match=r"id_format '\{nope\}'.*\{row\} and \{url_sha1\}"):
        list(read_cc_captions(path, id_format="{nope}"))


def test_convert_refuses_zero_shards_instead_of_ignoring_the_flag(tmp_path, capsys):
    detections = [make_detections(str(i), 2, F, seed=i) for i in range(2)]
    features = write_butd_tsv(tmp_path / "f.tsv", detections)
    captions = tmp_path / "cc.tsv"
    captions.write_text("a\thttp://u/0\nb\thttp://u/1\n")
    argv = ["butd-tsv", str(features), "--captions", str(captions), "--format", "cc", "--no-progress",
            "--output", str(tmp_path / "out"), "--num-shards", "0"]  # fmt: skip
    assert main(argv) == 2
    assert "--num-shards" in capsys.readouterr().err and not (tmp_path / "out").exists()
