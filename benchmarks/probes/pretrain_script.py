"""Probes of `examples/run_pretrain.py` run as a command: bad recipes, flags and datasets, a diverging learning
rate and damaged checkpoints."""

from __future__ import annotations

import json
import os
import runpy
import sys
from collections.abc import Callable
from pathlib import Path

from .harness import ROOT, Probes, tiny_model_recipe


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
            "model": tiny_model_recipe(),
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
        lambda: script(
            recipe_path=recipe(
                lambda d: (
                    in_stage(0, text_only, modality="text")(d),
                    d["stages"][0].update(tasks={"mlm": 1.0}),
                )
            )
        ),
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
