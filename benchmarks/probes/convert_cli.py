"""Probes of the convert CLI (`python -m modeling_imagebert.data.convert`) and the importers behind it:
output folder refusals, missing and damaged feature and caption files, pickles that would run code, a killed run's
temporaries."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .harness import SILENT, F, Probes, dead_pid


def probe_convert(p: Probes, work: Path) -> None:
    from fixtures_formats import butd_fields, make_detections, write_butd_tsv, write_karpathy_json

    from modeling_imagebert.atomic import MARKER_NAME, TEMP_PREFIX, _host_tag, is_ours
    from modeling_imagebert.data.convert import main
    from modeling_imagebert.data.storage import load_dataset_from_disk

    p.entry = "convert CLI"
    base = work / "convert"
    base.mkdir()
    detections = [make_detections(str(i), 3, F, seed=i) for i in range(3)]
    tsv = write_butd_tsv(base / "f.tsv", detections)
    cc = base / "cc.tsv"
    cc.write_text("".join(f"caption {i}\thttp://u/{i}.jpg\n" for i in range(3)))
    counter = iter(range(10**6))

    def out() -> Path:
        return base / f"out{next(counter)}"

    def run(
        *argv: str, features: Path = tsv, captions: Path = cc, fmt: str = "cc", output: Path | None = None
    ) -> int:
        args = ["butd-tsv", str(features), "--captions", str(captions), "--format", fmt, "--no-progress"]
        return main([*args, "--output", str(output or out()), *argv])

    def tsv_with(change: Callable[[list[dict]], None], name: str) -> Path:
        rows = [butd_fields(d) for d in detections]
        change(rows)
        return write_butd_tsv(base / name, detections, rows=rows)

    cwd = os.getcwd()
    os.chdir(base)
    try:
        before = sorted(os.listdir(base))
        p.cli("--output . --overwrite", lambda: run("--overwrite", output=Path(".")), "current folder")
        assert sorted(os.listdir(base)) == before
    finally:
        os.chdir(cwd)
    p.cli("--output the parent of the inputs --overwrite", lambda: run("--overwrite", output=base), "input")
    theirs = base / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    p.cli("--overwrite of a folder without our marker", lambda: run("--overwrite", output=theirs), "marker")
    p.cli("--output exists, no --overwrite", lambda: run(output=theirs), "exists")
    a_file = base / "a_file"
    a_file.write_text("x")
    p.cli("--output is a file, --overwrite", lambda: run("--overwrite", output=a_file), "a_file")
    linked = base / "linked"
    linked.symlink_to(theirs)
    (theirs / MARKER_NAME).write_text('{"written_by": "x"}')
    p.cli(
        "--output is a link to a marked folder, --overwrite",
        lambda: run("--overwrite", output=linked),
        "linked",
    )
    (theirs / MARKER_NAME).unlink()
    p.cli("features path missing", lambda: run(features=base / "nope.tsv"), "nope.tsv")
    p.cli("captions path missing", lambda: run(captions=base / "nope_cc.tsv"), "nope_cc.tsv")
    karpathy = write_karpathy_json(
        base / "k.json", "flickr30k", [{"name": "0", "split": "test", "captions": ["a"]}]
    )
    p.cli("karpathy without --split", lambda: run(captions=karpathy, fmt="karpathy"), "--split")
    p.cli("sbu without --urls", lambda: run(fmt="sbu"), "--urls")
    p.cli(
        "truncated base64 features",
        lambda: run(features=tsv_with(lambda r: r[1].update(features=r[1]["features"][:-9]), "t1.tsv")),
        "t1.tsv:2",
        "features",
    )
    bad_cols = base / "cols.tsv"
    bad_cols.write_text(tsv.read_text().splitlines()[0].rsplit("\t", 1)[0] + "\n")
    p.cli("BUTD row with 9 columns", lambda: run(features=bad_cols), "cols.tsv:1")
    raw = tsv.read_bytes().split(b"\n")
    (base / "bytes.tsv").write_bytes(b"\n".join([raw[0], b"\xff\xfe" + raw[1], *raw[2:]]))
    p.cli("BUTD row with undecodable bytes", lambda: run(features=base / "bytes.tsv"), "bytes.tsv:2", "utf-8")
    p.cli(
        "BUTD img_h not a number",
        lambda: run(features=tsv_with(lambda r: r[0].update(img_h="tall"), "h.tsv")),
        "h.tsv:1",
        "img_h",
    )
    p.cli(
        "BUTD negative img_w",
        lambda: run(features=tsv_with(lambda r: r[0].update(img_w="-5"), "w.tsv")),
        "w.tsv",
        "img_w",
    )
    p.cli(
        "BUTD num_boxes larger than the buffers",
        lambda: run(features=tsv_with(lambda r: r[2].update(num_boxes="99"), "nb.tsv")),
        "nb.tsv:3",
    )
    nan_detections = [dict(d) for d in detections]
    nan_detections[1] = dict(detections[1], features=np.full_like(detections[1]["features"], np.nan))
    p.cli(
        "NaN region features",
        lambda: run(features=write_butd_tsv(base / "nan.tsv", nan_detections)),
        "1",
        "nan",
    )
    swapped = [dict(d) for d in detections]
    swapped[0] = dict(detections[0], boxes=detections[0]["boxes"][:, [2, 3, 0, 1]].copy())
    p.cli(
        "boxes with x2 < x1",
        lambda: run(features=write_butd_tsv(base / "sw.tsv", swapped)),
        "0",
        "region_boxes",
    )
    (base / "empty.tsv").write_text("")
    p.cli("empty feature file", lambda: run(features=base / "empty.tsv"), "no usable image records")
    p.cli(
        "duplicate image id in the features",
        lambda: run(features=write_butd_tsv(base / "dup.tsv", [detections[0], detections[0]])),
        "duplicate",
        "'0'",
    )
    p.cli("--feature-dim differs from the file", lambda: run("--feature-dim", "16"), "feature_dim", "16")
    p.cli("--num-classes below a class id", lambda: run("--num-classes", "1"), "region_classes")
    wrong_ids = base / "ids.tsv"
    wrong_ids.write_text("".join(f"caption {i}\thttp://u/{i}.jpg\n" for i in range(3)))
    p.cli(
        "caption ids match no image (id scheme)",
        lambda: run("--image-id-style", "x{row}", captions=wrong_ids),
        "image",
    )
    p.cli("--num-shards 0", lambda: run("--num-shards", "0"), "num-shards")
    p.cli("--max-shard-size not a size", lambda: run("--max-shard-size", "lots"), "lots")
    p.cli("--image-id-style with an unknown field", lambda: run("--image-id-style", "{nope}"), "nope")

    header = base / "header.tsv"
    header.write_text("caption\turl\n" + cc.read_text())
    target = out()
    p.cli(
        "CC file with a header line",
        lambda: run(captions=header, output=target),
        ok=lambda: load_dataset_from_disk(target)["caption"] == ["caption 0", "caption 1", "caption 2"],
    )
    tab = base / "tab.tsv"
    tab.write_text("caption 0\thttp://u/0.jpg\ncap\ttion 1\thttp://u/1.jpg\n")
    p.cli("CC caption holding a tab", lambda: run(captions=tab), "tab.tsv:2", "tab")
    cr = base / "cr.tsv"
    cr.write_bytes(cc.read_bytes().replace(b"\n", b"\r"))
    target_cr = out()
    p.cli(
        "CC file with CR-only line endings",
        lambda: run(captions=cr, output=target_cr),
        ok=lambda: len(load_dataset_from_disk(target_cr)) == 3,
    )
    crlf = base / "crlf.tsv"
    crlf.write_bytes(cc.read_bytes().replace(b"\n", b"\r\n"))
    target_crlf = out()
    p.cli(
        "CC file with CRLF line endings",
        lambda: run(captions=crlf, output=target_crlf),
        ok=lambda: load_dataset_from_disk(target_crlf)["caption"][2] == "caption 2",
    )
    empty_caption = base / "ec.tsv"
    empty_caption.write_text("caption 0\thttp://u/0.jpg\n \thttp://u/1.jpg\n")
    p.cli("CC empty caption", lambda: run(captions=empty_caption), "ec.tsv:2", "caption")
    dup = write_karpathy_json(
        base / "dupk.json",
        "flickr30k",
        [
            {"name": "0", "split": "test", "captions": ["a"]},
            {"name": "0", "split": "test", "captions": ["b"]},
        ],
    )
    p.cli(
        "Karpathy duplicate file name",
        lambda: run("--split", "test", captions=dup, fmt="karpathy"),
        "images[1]",
        "'0'",
    )
    (base / "bad.json").write_text('{"images": [\n{"filename": }]}')
    p.cli(
        "Karpathy invalid JSON",
        lambda: run("--split", "test", captions=base / "bad.json", fmt="karpathy"),
        "bad.json:2",
    )
    (base / "latin.json").write_bytes(b'{"images": [{"filename": "caf\xe9.jpg"}]}')
    p.cli(
        "Karpathy file not UTF-8",
        lambda: run("--split", "test", captions=base / "latin.json", fmt="karpathy"),
        "latin.json:1",
        "utf-8",
    )
    (base / "nolist.json").write_text('{"images": {}}')
    p.cli(
        "Karpathy images not a list",
        lambda: run("--split", "test", captions=base / "nolist.json", fmt="karpathy"),
        "images",
    )
    (base / "nosent.json").write_text(
        '{"images": [{"filename": "0.jpg", "split": "test", "sentences": [{"raw": ""}]}]}'
    )
    p.cli(
        "Karpathy empty sentence",
        lambda: run("--split", "test", captions=base / "nosent.json", fmt="karpathy"),
        "raw",
    )
    sbu_c, sbu_u = base / "sbu_c.txt", base / "sbu_u.txt"
    sbu_c.write_text("a\nb\nc\n")
    sbu_u.write_text("http://static.flickr.com/1/11_a.jpg\n")
    p.cli(
        "SBU caption and URL files misaligned",
        lambda: run("--urls", str(sbu_u), captions=sbu_c, fmt="sbu"),
        "line-aligned",
    )

    npz = base / "npz"
    npz.mkdir()

    class RunsCode:
        def __reduce__(self):
            return (exec, (f"open({str(base / 'PWNED')!r}, 'w').write('x')",))

    (npz / "0.npz").write_bytes(pickle.dumps(RunsCode()))

    def run_npz(folder: Path) -> int:
        return main(["npz", str(folder), "--captions", str(cc), "--format", "cc", "--allow-pickle", "--no-progress",
                     "--output", str(out())])  # fmt: skip

    p.cli("raw pickle named .npz with --allow-pickle", lambda: run_npz(npz), "0.npz", "not an .npz")
    if (base / "PWNED").exists():
        p.add("raw pickle named .npz ran code", SILENT, "code ran")
    code_info = base / "npz_info"
    code_info.mkdir()
    info = np.empty((), dtype=object)
    info[()] = {"objects_id": RunsCode()}
    np.savez(code_info / "0.npz", x=np.ones((2, F)), bbox=np.ones((2, 4)), image_w=9, image_h=9, info=info)
    p.cli("npz info entry that runs code", lambda: run_npz(code_info), "0.npz", "info")
    if (base / "PWNED").exists():
        p.add("npz info entry ran code", SILENT, "code ran")
    obj = base / "npz_obj"
    obj.mkdir()
    features = np.empty(2, dtype=object)
    features[:] = [1, 2]
    np.savez(obj / "0.npz", features=features, boxes=np.zeros((2, 4)), image_w=1, image_h=1)
    code = base / "npz_trunc"
    code.mkdir()
    np.savez(code / "0.npz", features=np.ones((2, F)), boxes=np.ones((2, 4)), image_w=9, image_h=9)
    (code / "0.npz").write_bytes((code / "0.npz").read_bytes()[:100])
    p.cli("npz truncated", lambda: run_npz(code), "0.npz")

    def no_numpy_hint() -> int:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            result = run_npz(obj)
        sys.stderr.write(stderr.getvalue().replace("allow_pickle", "NUMPY-HINT-LEAKED"))
        return result

    p.cli("npz object array features (no numpy pickle hint)", no_numpy_hint, "0.npz", "never read")
    norm = base / "npz_norm"
    norm.mkdir()
    np.savez(
        norm / "0.npz",
        features=np.ones((2, F)),
        norm_bb=np.full((2, 6), 0.5),
        conf=np.ones(2),
        soft_labels=np.ones((2, 3)),
    )
    p.cli("UNITER norm_bb without an image size", lambda: run_npz(norm), "0.npz", "--image-size")

    target_stale = out()
    stale = base / f"{TEMP_PREFIX}{target_stale.name}.join.{_host_tag()}.{dead_pid()}.abc"
    stale.mkdir()
    p.cli(
        "a killed run's temporary folder beside the output",
        lambda: run(output=target_stale),
        ok=lambda: not stale.exists() and is_ours(target_stale),
    )
