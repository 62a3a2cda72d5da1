"""Probes of pre-training's recipe values and run flags, the features CLI (`python -m modeling_imagebert.features`)
and the importers, as issue 25 found them: settings that leave a task nothing to learn, count flags of 0, -1 or
2.5, webdataset keys and file names the outputs cannot hold, damaged tar shards, JSON nested too deep, and a dataset
rewritten in place after run_pretrain validated it."""

from __future__ import annotations

import io
import json
import os
import runpy
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .harness import ROOT, Probes, tiny_model_recipe

TOY = {"world_seed": 0, "feature_dim": 16, "num_classes": 6, "num_attributes": 2, "num_images": 16}


def probe_features_data(p: Probes, work: Path) -> None:
    base = work / "features_data"
    base.mkdir()
    probe_recipe_values(p)
    probe_run_pretrain_flags(p, base)
    probe_features_cli(p, base)
    probe_deep_json(p, base)


# ------------------------------------------------------------------------------------------------- recipe values


def probe_recipe_values(p: Probes) -> None:
    """`recipe_from_dict` with task fractions, weights and probabilities that are 0, negative, NaN, huge or of the
    wrong type: refused with the field named, or (a task off) accepted."""
    from modeling_imagebert.pretraining.recipes import recipe_from_dict

    p.entry = "recipe values"

    def stage(**fields) -> dict:
        data = {
            "init": "bert",
            "datasets": [{"toy_world": {"variant": "web", "num_images": 8}}],
            "max_steps": 2,
        }
        data.update(fields)
        return {"model": {"bert_checkpoint": "some/bert"}, "stages": [data]}

    text_only = [{"toy_world": {"variant": "curated", "num_images": 8}, "modality": "text"}]
    refused = {
        "itm on, itm_batch_fraction 0": ({"itm_batch_fraction": 0}, "itm_batch_fraction"),
        "masked tasks on, itm_batch_fraction 1": ({"itm_batch_fraction": 1}, "itm_batch_fraction"),
        "itm_batch_fraction NaN": ({"itm_batch_fraction": float("nan")}, "itm_batch_fraction"),
        "itm_batch_fraction -0.5": ({"itm_batch_fraction": -0.5}, "itm_batch_fraction"),
        "itm_batch_fraction 'half'": ({"itm_batch_fraction": "half"}, "itm_batch_fraction"),
        "itm on, itm_negative_rate 0": ({"itm_negative_rate": 0}, "itm_negative_rate"),
        "itm on, itm_negative_rate 1": ({"itm_negative_rate": 1}, "itm_negative_rate"),
        "mlm on, mlm_probability 0": ({"mlm_probability": 0}, "mlm_probability"),
        "moc/mrfr on, region_mask_probability 0": ({"region_mask_probability": 0}, "region_mask_probability"),
        "mlm_probability 1e300": ({"mlm_probability": 1e300}, "mlm_probability"),
        "itm_negatives itc, hard-negative fraction 0": (
            {"tasks": {"itm": 1, "itc": 1}, "itm_negatives": "itc", "itm_hard_negative_fraction": 0},
            "itm_hard_negative_fraction",
        ),
        "task weight -1": ({"tasks": {"mlm": -1.0, "itm": 1.0}}, "tasks.mlm"),
        "task weight NaN": ({"tasks": {"mlm": float("nan"), "itm": 1.0}}, "tasks.mlm"),
        "task weight inf": ({"tasks": {"mlm": float("inf"), "itm": 1.0}}, "tasks.mlm"),
        "task weight 'yes'": ({"tasks": {"mlm": "yes"}}, "tasks.mlm"),
        "every task weight 0": ({"tasks": {"mlm": 0, "moc": 0, "mrfr": 0, "itm": 0}}, "tasks"),
        "text-only stage with moc on": ({"datasets": text_only, "tasks": {"mlm": 1, "moc": 1}}, "moc"),
        "dataset weight 0": (
            {"datasets": [{"toy_world": {"variant": "web", "num_images": 8}, "weight": 0}]},
            "weight",
        ),
    }
    for name, (fields, word) in refused.items():
        p.error(name, lambda fields=fields: recipe_from_dict(stage(**fields)), "stages[0]", word)
    # A task with weight 0 is off: its settings are not used (documented), so they are accepted.
    p.result(
        "itm weight 0 with itm_batch_fraction 0 (ITM off)",
        lambda: recipe_from_dict(
            stage(tasks={"mlm": 1, "moc": 1, "mrfr": 1, "itm": 0}, itm_batch_fraction=0)
        ),
        lambda recipe: "itm" not in {k for k, v in recipe.stages[0].tasks.items() if v > 0},
    )
    p.result(
        "joint ITM batches with itm_batch_fraction 0 (the fraction is unused)",
        lambda: recipe_from_dict(stage(itm_mode="joint", itm_batch_fraction=0)),
        lambda recipe: recipe.stages[0].itm_mode == "joint",
    )


# ------------------------------------------------------------------------------------------- run_pretrain's flags


def _pretrain_script(base: Path) -> tuple[Callable[..., int], Callable[..., Path]]:
    """(script(*argv, recipe_path=..., output=...) -> exit status, recipe(change) -> path): run_pretrain run as a
    command line would, in-process (a tiny 1-layer model, 1 stage of 2 steps on 16 toy images)."""
    import yaml

    counter = iter(range(10**6))

    def recipe(change: Callable[[dict], None] | None = None) -> Path:
        data = {
            "name": "probe",
            "model": tiny_model_recipe(),
            "training": {"save_steps": 0, "logging_steps": 10, "num_threads": 1},
            "stages": [{
                "name": "s1", "init": "config", "datasets": [{"toy_world": {**TOY, "variant": "curated"}}],
                "max_steps": 2, "batch_size": 4, "learning_rate": 1e-3, "warmup_steps": 0,
            }],
        }  # fmt: skip
        if change is not None:
            change(data)
        path = base / f"recipe{next(counter)}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    def script(*argv: str, recipe_path: Path | None = None, output: Path | None = None) -> int:
        output = output or base / f"out{next(counter)}"
        saved = sys.argv
        sys.argv = ["run_pretrain.py", "--recipe", str(recipe_path or recipe()), "--output_dir", str(output),
                    "--no_progress", "--no_eval", *argv]  # fmt: skip
        try:
            runpy.run_path(str(ROOT / "examples" / "run_pretrain.py"), run_name="__main__")
        except SystemExit as exit_:
            if isinstance(exit_.code, str):
                print(exit_.code, file=sys.stderr)
                return 1
            return exit_.code or 0
        finally:
            sys.argv = saved
        return 0

    return script, recipe


def probe_run_pretrain_flags(p: Probes, base: Path) -> None:
    """run_pretrain's count flags at 0, -1 and 2.5, and a saved dataset rewritten in place with a NaN (size kept,
    modification time put back) after a run validated it."""
    import datasets

    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    p.entry = "run_pretrain flags and cache"
    base = base / "pretrain"
    base.mkdir()
    os.environ["IMAGEBERT_VALIDATION_CACHE"] = str(base / "validated")  # never the user's datasets cache
    script, recipe = _pretrain_script(base)
    flags = {
        "--max_steps_this_run 0": (["--max_steps_this_run", "0"], "max_steps_this_run"),
        "--max_steps_this_run -1": (["--max_steps_this_run", "-1"], "max_steps_this_run"),
        "--max_steps_this_run 2.5": (["--max_steps_this_run", "2.5"], "max_steps_this_run"),
        "--max_steps 0": (["--max_steps", "0"], "max_steps"),
        "--max_steps -1": (["--max_steps", "-1"], "max_steps"),
        "--save_steps -1": (["--save_steps", "-1"], "save_steps"),
        "--save_total_limit 0": (["--save_total_limit", "0"], "save_total_limit"),
        "--logging_steps 0": (["--logging_steps", "0"], "logging_steps"),
        "--num_workers -1": (["--num_workers", "-1"], "num_workers"),
        "--num_threads 0": (["--num_threads", "0"], "num_threads"),
        "--gradient_accumulation_steps 0": (
            ["--gradient_accumulation_steps", "0"],
            "gradient_accumulation_steps",
        ),
        "--batch_size 0": (["--batch_size", "0"], "batch_size"),
        "--seed -1": (["--seed", "-1"], "seed"),
        "--seed 2**32": (["--seed", str(2**32)], "seed"),
        "--learning_rate nan": (["--learning_rate", "nan"], "learning_rate"),
    }
    for name, (argv, word) in flags.items():
        p.cli(name, lambda argv=argv: script(*argv), word)
    # Accepted (a weight is any finite number >= 0), and the first step's non-finite gradient stops the run.
    p.cli(
        "tasks.mlm 1e30 (the weighted loss overflows float32)",
        lambda: script("--set", "stages.0.tasks={mlm: 1.0e+30, moc: 1, mrfr: 1, itm: 1}"),
        "non-finite",
        "step 1",
        ok=lambda: False,
    )

    # Validated, then rewritten in place with one NaN feature: the same size, the modification time put back.
    def saved(folder: Path, nan: bool) -> Path:
        dataset = make_toy_world(**{**TOY, "variant": "curated", "seed": 5})
        if nan:
            rows = dataset.to_list()
            rows[3]["region_features"][1][2] = float("nan")
            dataset = datasets.Dataset.from_list(rows, features=dataset.features)
        return save_dataset(dataset, folder, validate=False)

    good, bad = saved(base / "data", nan=False), saved(base / "nan", nan=True)
    with_data = recipe(lambda d: d["stages"][0].update(datasets=[{"path": str(good)}]))
    shard = next(good.glob("data-*.arrow"))
    replacement = next(bad.glob("data-*.arrow")).read_bytes()
    p.cli(
        "a saved dataset trains (control: validated and cached)",
        lambda: script(recipe_path=with_data),
        ok=lambda: any((base / "validated").glob("*.json")) and len(replacement) == shard.stat().st_size,
    )
    p.cli("the same data again (cached, trains)", lambda: script(recipe_path=with_data), ok=lambda: True)
    before = shard.stat()
    with open(shard, "r+b") as handle:
        handle.write(replacement)
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    p.cli(
        "the dataset rewritten in place with a NaN, size and mtime kept",
        lambda: script(recipe_path=with_data),
        "stages[0].datasets[0]",
        "region_features",
    )
    nan_copy = base / "nan-copy"
    nan_copy.mkdir()
    for file in bad.iterdir():
        (nan_copy / file.name).write_bytes(file.read_bytes())
    p.cli(
        "a copy of the NaN dataset under another name",
        lambda: script(
            recipe_path=recipe(lambda d: d["stages"][0].update(datasets=[{"path": str(nan_copy)}]))
        ),
        "region_features",
    )


# ---------------------------------------------------------------------------------------------- the features CLI


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    with tarfile.open(path, "w", format=fmt, encoding="utf-8", errors="surrogateescape") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _utf8_name(path: Path) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _output_ok(output: Path, extracted: int, skipped: dict[str, int]) -> bool:
    """A finished features folder whose counts are `extracted` and `skipped` ({reason: count}), every file name and
    every text file strict UTF-8, one row per image in every TSV, and every written id free of control characters."""
    from modeling_imagebert.feature_formats import iter_extracted_records

    summary = json.loads((output / "summary.json").read_text())
    if summary["extracted"] != extracted or summary["skipped"] != skipped:
        return False
    for path in output.rglob("*"):
        if not _utf8_name(path) or not path.resolve().is_relative_to(output.resolve()):
            return False
        if path.suffix in (".tsv", ".json"):
            text = path.read_bytes().decode("utf-8")  # strict
            columns = {"skipped.tsv": 4, "captions.tsv": 3}.get(path.name, 10)
            if path.suffix == ".tsv" and any(len(line.split("\t")) != columns for line in text.splitlines()):
                return False
    ids = [record["image_id"] for record in iter_extracted_records(output)]
    return len(ids) == extracted and all(image_id.isprintable() for image_id in ids)


def probe_features_cli(p: Probes, base: Path) -> None:
    """The features CLI: numeric flags, webdataset keys with TAB / newline / CR / NUL / '..' / '/', file names that
    are not UTF-8, and truncated / empty / garbage tar shards."""
    from feature_fixtures import save_tiny_detector, write_photos

    from modeling_imagebert.features.__main__ import main

    p.entry = "features CLI"
    base = base / "features"
    base.mkdir()
    detector = save_tiny_detector(base / "detector")
    photos = write_photos(base / "photos", names=("coffee", "rocket"), size=64)
    jpeg = (photos / "coffee.jpg").read_bytes()
    counter = iter(range(10**6))

    def out() -> Path:
        return base / f"out{next(counter)}"

    def argv(inputs, output: Path, *flags) -> list[str]:
        return [*map(str, inputs), "--detector", str(detector), "--output", str(output), "--device", "cpu",
                "--no-progress", "--num-workers", "1", *map(str, flags)]  # fmt: skip

    numeric = {
        "--max-pixels -1": ["--max-pixels", "-1"],
        "--min-side -1": ["--min-side", "-1"],
        "--shard-size 0": ["--shard-size", "0"],
        "--shard-size -2": ["--shard-size", "-2"],
        "--shard-size 2.5": ["--shard-size", "2.5"],
        "--batch-size 0": ["--batch-size", "0"],
        "--num-workers 0": ["--num-workers", "0"],
        "--num-workers -1": ["--num-workers", "-1"],
        "--num-boxes 0": ["--num-boxes", "0"],
        "--adaptive 5 2": ["--adaptive", "5", "2"],
        "--adaptive 0 3": ["--adaptive", "0", "3"],
    }
    for name, flag in numeric.items():
        output = out()
        p.cli(name, lambda flag=flag, output=output: main(argv([photos], output, *flag)), flag[0].lstrip("-"))
    output = out()
    p.cli(
        "--max-pixels 0 (documented: the check off)",
        lambda: main(argv([photos], output, "--max-pixels", "0")),
        ok=lambda output=output: _output_ok(output, 2, {}),
    )

    keys = {
        "a TAB": "a\tb",
        "a newline": "c\nd",
        "a CR": "e\rf",
        "a NUL": "g\x00h",
        "'..' as a folder": "../escape",
        "a '/' folder": "sub/key",
    }
    for output_format in ("butd-tsv", "dataset", "npz"):
        for label, key in keys.items():
            members = [
                (f"{key}.jpg", jpeg),
                (f"{key}.txt", b"a cup"),
                ("good.jpg", jpeg),
                ("good.txt", b"a cup"),
            ]
            shard = _tar(base / f"keys{next(counter)}.tar", members)
            output = out()
            with p.guard(f"{output_format}: a key with {label}", base / "escape.npz", base / "escape.tsv"):
                tab_like = any(c in key for c in "\t\n\r")
                # A tar name ends at its first NUL (ustar): "g\0h.jpg" is the member "g", no image extension, so
                # not a sample (as any member without one).
                nul = "\x00" in key
                expected = (1, {"bad_image_id": 1}) if tab_like else (1, {}) if nul else (2, {})
                p.cli(
                    f"{output_format}: a webdataset key with {label}",
                    lambda shard=shard, output=output, output_format=output_format: main(
                        argv([shard], output, "--output-format", output_format, "--write-captions")
                    ),
                    *(["image_id"] if output_format == "npz" and "/" in key and not nul else []),
                    ok=lambda output=output, expected=expected: _output_ok(output, *expected),
                )

    latin = base / "latin1"
    latin.mkdir()
    Path(os.fsdecode(os.fsencode(latin) + b"/caf\xe9.jpg")).write_bytes(jpeg)
    (latin / "good.jpg").write_bytes(jpeg)
    for output_format in ("butd-tsv", "dataset", "npz"):
        output = out()
        p.cli(
            f"{output_format}: a folder with a Latin-1 file name",
            lambda output=output, output_format=output_format: main(
                argv([latin], output, "--output-format", output_format)
            ),
            "caf",
            ok=lambda output=output: _output_ok(output, 1, {"bad_image_id": 1}),
        )
    latin_tar = _tar(
        base / "latin1.tar", [("caf\udce9.jpg", jpeg), ("good.jpg", jpeg)], fmt=tarfile.GNU_FORMAT
    )
    output = out()
    p.cli(
        "a tar member name that is not UTF-8",
        lambda: main(argv([latin_tar], output, "--write-captions")),
        "caf",
        ok=lambda: _output_ok(output, 1, {"bad_image_id": 1}),
    )
    listed = base / "list.txt"
    listed.write_text(f"{photos / 'coffee.jpg'}\tid\x00nul\n{photos / 'rocket.jpg'}\trocket\n")
    output = out()
    p.cli(
        "a list file whose id holds a NUL",
        lambda: main(argv([listed], output, "--source", "list", "--output-format", "butd-tsv")),
        ok=lambda: _output_ok(output, 1, {"bad_image_id": 1}),
    )

    depth = 200_000
    deep = _tar(
        base / "deep-sidecar.tar",
        [("s1.jpg", jpeg), ("s1.txt", b"a cup"), ("s1.json", ("[" * depth + "]" * depth).encode())],
    )
    output = out()
    p.cli(
        f"--write-captions with a .json sidecar nested {depth:,} deep",
        lambda: main(argv([deep], output, "--write-captions")),
        ok=lambda: (output / "captions.tsv").read_text() == "a cup\t\ts1\n" and _output_ok(output, 1, {}),
    )

    dots = base / "dots.txt"
    dots.write_text(f"{photos / 'coffee.jpg'}\t..\n{photos / 'rocket.jpg'}\trocket\n")
    with p.guard("npz: a list file id '..'", base / "..npz", base.parent / ".npz"):
        p.cli(
            "npz: a list file id '..'",
            lambda: main(argv([dots], out(), "--source", "list", "--output-format", "npz")),
            "image_id",
            "'..'",
        )
    output = out()
    p.cli(
        "dataset: a list file id '..' (a plain string there)",
        lambda: main(argv([dots], output, "--source", "list")),
        ok=lambda: _output_ok(output, 2, {}),
    )

    # Damaged shards, each beside a good one (and alone), run as a command with a deadline: a reader that loops on
    # a damaged tar must show as a hang, not stop the probe.
    good = _tar(base / "good.tar", [("g1.jpg", jpeg), ("g2.jpg", jpeg)])
    whole = _tar(base / "whole.tar", [("c1.jpg", jpeg), ("c2.jpg", jpeg), ("c3.jpg", jpeg)]).read_bytes()
    second = 512 + -(-len(jpeg) // 512) * 512  # where the second member's header starts
    damaged = {
        "cut inside the second image": (whole[: second + 512 + 100], 3, {"unreadable": 2}),
        "cut inside the second header": (whole[: second + 100], 3, {"unreadable": 1}),
        "garbage after the first member": (
            whole[:second] + np.random.default_rng(1).bytes(len(whole) - second),
            3,
            {"unreadable": 1},
        ),
        "empty (0 bytes)": (b"", 2, {"unreadable": 1}),
        "random bytes": (np.random.default_rng(0).bytes(5000), 2, {"unreadable": 1}),
    }
    for label, (content, extracted, skipped) in damaged.items():
        shard = base / f"damaged{next(counter)}.tar"
        shard.write_bytes(content)
        output = out()
        p.command(
            f"a shard {label}, beside a good one",
            [sys.executable, "-m", "modeling_imagebert.features", *argv([good, shard], output)],
            timeout=180,
            ok=lambda output=output, extracted=extracted, skipped=skipped: _output_ok(
                output, extracted, skipped
            ),
        )
    lone = base / "lone-empty.tar"
    lone.write_bytes(b"")
    p.cli("only an empty shard", lambda: main(argv([lone], out())), "lone-empty.tar")
    p.cli("a shard that does not exist", lambda: main(argv([base / "absent.tar"], out())), "absent.tar")


# ------------------------------------------------------------------------------------------------- deep JSON / YAML


def probe_deep_json(p: Probes, base: Path) -> None:
    """A Karpathy split JSON and a recipe nested 200,000 deep (a webdataset .json sidecar: `probe_features_cli`)."""
    from modeling_imagebert.data.importers.karpathy import read_karpathy_captions
    from modeling_imagebert.pretraining.recipes import load_recipe

    p.entry = "deep JSON"
    depth = 200_000
    cases = {
        "lists as the images value": '{"images": ' + "[" * depth + "]" * depth + "}",
        "lists at the top": "[" * depth + "]" * depth,
        "objects in an entry": '{"images": [' + '{"a": ' * depth + "1" + "}" * depth + "]}",
    }
    for label, text in cases.items():
        path = base / f"dataset_flickr30k_{len(label)}.json"
        path.write_text(text)
        p.error(
            f"Karpathy JSON: {label}, {depth:,} deep",
            lambda path=path: list(read_karpathy_captions(path, split="test")),
            path.name,
        )
    recipe = base / "deep_recipe.yaml"
    recipe.write_text("stages: " + "[" * depth + "]" * depth + "\n")
    p.error(f"recipe YAML nested {depth:,} deep", lambda: load_recipe(recipe), "deep_recipe.yaml")


__all__ = ["probe_features_data"]
