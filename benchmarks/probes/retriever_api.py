"""Probes of the retrieval entry points that issue 25 covers: `ImageBertRetriever` (index, search, save_index /
load_index), the processor's region inputs, and run_retrieval / evaluate_retrieval's outputs, data and flags.

Families: NaN / Inf / huge / negative features and boxes, boxes outside the image, zero-size images, ids rotated or
duplicated, index files with changed settings, ids or embeddings, bad counts for every count parameter (0, -1,
2.5, True, "3", 10**12), output folders that are, hold or lie inside an input (guarded: a write there is tallied
as a write outside the output), NaN in a train split (no NaN tensor may be saved), bad `--loss` strings."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import numpy as np

from .harness import ROOT, Probes

COUNTS = (0, -1, 2.5, True, "3")


def _files(folder: Path) -> list[Path]:
    """`folder` and everything under it, for `Probes.guard`."""
    return [folder, *sorted(folder.rglob("*"))]


def _no_nan_tensor_saved(folder: Path) -> bool:
    """True when no safetensors file under `folder` holds a NaN or infinite floating-point tensor."""
    import torch
    from safetensors.torch import load_file

    for path in folder.rglob("*.safetensors"):
        for tensor in load_file(str(path)).values():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return False
    return True


def probe_retriever(p: Probes, processor, work: Path) -> None:
    base = work / "retriever"
    base.mkdir()
    _probe_index_and_search(p, processor, base)
    _probe_processor_regions(p, processor)
    _probe_index_files(p, processor, base)
    _probe_scripts(p, processor, base)


# ------------------------------------------------------------------------------------------------ the retriever


def _tiny_model():
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForRetrieval

    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    torch.manual_seed(0)
    return ImageBertForRetrieval(config).eval()


def _rows(num_images: int = 6) -> list[dict]:
    from modeling_imagebert.data.toy_world import make_toy_world

    split = make_toy_world(
        "retrieval", num_images=1, num_validation_images=1, num_test_images=num_images, seed=0,
        feature_dim=64, num_classes=23,
    )["test"]  # fmt: skip
    rows, seen = [], set()
    for row in split:  # one row per image
        if row["image_id"] not in seen:
            seen.add(row["image_id"])
            rows.append({k: (np.asarray(v) if isinstance(v, list) else v) for k, v in row.items()})
    return rows


def _probe_index_and_search(p: Probes, processor, base: Path) -> None:
    from modeling_imagebert.retrieval.retriever import ImageBertRetriever

    p.entry = "ImageBertRetriever index / search"
    model = _tiny_model()
    rows = _rows()

    def index_with(change) -> object:
        changed = [dict(row) for row in rows]
        change(changed[3])
        return ImageBertRetriever(model, processor, candidates=4).index(changed)

    def feature(value):
        def change(row):
            features = np.array(row["region_features"], dtype=np.float32)
            features[1, 2] = value
            row["region_features"] = features

        return change

    image = rows[3]["image_id"]
    p.error("index: a NaN feature", lambda: index_with(feature(np.nan)), image, "region_features")
    p.error("index: an Inf feature", lambda: index_with(feature(np.inf)), image, "region_features")
    p.error("index: a -Inf feature", lambda: index_with(feature(-np.inf)), image, "region_features")
    p.error("index: a huge feature (3e38)", lambda: index_with(feature(3e38)), image, "image_embeds")
    p.result(
        "index: negative features (legitimate)",
        lambda: index_with(feature(-4.0)).search(["a red cube"], top_k=3),
        lambda hits: len(hits[0]) == 3,
    )

    def boxes(value):
        def change(row):
            row["region_boxes"] = np.array(row["region_boxes"], dtype=np.float32)
            row["region_boxes"][0] = value

        return change

    def size(width, height):
        def change(row):
            row["image_width"], row["image_height"] = width, height

        return change

    def far_outside(row):
        row["region_boxes"] = np.array(row["region_boxes"], dtype=np.float32)
        row["region_boxes"][0] = [0, 0, row["image_width"] * 10, row["image_height"] * 10]

    p.error(
        "index: a box far outside its image", lambda: index_with(far_outside), image, "region_boxes", "box 0"
    )
    p.error(
        "index: a box with negative coordinates", lambda: index_with(boxes([-50, -50, 5, 5])), image, "box 0"
    )
    p.error("index: a NaN box", lambda: index_with(boxes([np.nan, 0, 5, 5])), image, "region_boxes")
    p.error("index: a zero-width image", lambda: index_with(size(0, 100)), image, "image_width")
    p.error("index: a NaN image height", lambda: index_with(size(100, float("nan"))), image, "image_height")
    p.error(
        "index: an infinite image width", lambda: index_with(size(float("inf"), 100)), image, "image_width"
    )
    p.error("index: an image width given as text", lambda: index_with(size("640", 480)), image, "image_width")

    def missing_id(row):
        row["image_id"] = None

    p.error("index: an image without image_id", lambda: index_with(missing_id), "image_id")
    p.result(
        "index: a repeated image_id (its first row kept, documented)",
        lambda: ImageBertRetriever(model, processor, candidates=4).index([*rows, rows[0]]).image_ids,
        lambda ids: ids == [row["image_id"] for row in rows],
    )
    p.error("index: an empty collection", lambda: ImageBertRetriever(model, processor).index([]), "no images")

    retriever = ImageBertRetriever(model, processor, candidates=4).index(rows)
    for value in COUNTS:
        p.error(f"search: top_k={value!r}", lambda v=value: retriever.search(["a cube"], top_k=v), "top_k")
        for name in ("candidates", "batch_size"):
            p.error(
                f"constructor: {name}={value!r}",
                lambda n=name, v=value: ImageBertRetriever(model, processor, **{n: v}),
                name,
            )
    p.result(
        "search: top_k=10**12 (every candidate)",
        lambda: retriever.search(["a cube"], top_k=10**12),
        lambda hits: len(hits[0]) == 4,
    )
    p.result(
        "constructor: candidates=10**12 (every image)",
        lambda: (
            ImageBertRetriever(model, processor, candidates=10**12).index(rows).search(["a cube"], top_k=100)
        ),
        lambda hits: len(hits[0]) == len(rows),
    )
    p.result(
        "constructor: batch_size=10**12",
        lambda: (
            ImageBertRetriever(model, processor, batch_size=10**12).index(rows).search(["a cube"], top_k=2)
        ),
        lambda hits: len(hits[0]) == 2,
    )
    from modeling_imagebert.retrieval.evaluation import evaluate_retrieval
    from modeling_imagebert.retrieval.two_stage import evaluate_two_stage

    split = [{**row, "caption": "a red cube"} for row in rows]
    for value in (0, 2.5, True, "3"):
        for name, call in (
            (
                "batch_size",
                lambda v: evaluate_retrieval(model, split, processor, batch_size=v, progress=False),
            ),
            (
                "shard_size",
                lambda v: evaluate_retrieval(model, split, processor, shard_size=v, progress=False),
            ),
            (
                "candidates",
                lambda v: evaluate_two_stage(model, split, processor, candidates=v, progress=False),
            ),
            (
                "batch_size",
                lambda v: evaluate_two_stage(
                    model, split, processor, candidates=2, batch_size=v, progress=False
                ),
            ),
        ):
            p.error(f"evaluation functions: {name}={value!r}", lambda c=call, v=value: c(v), name)
    for value in (0, -1, 2.5, True):
        p.error(
            f"constructor: index_options nlist={value!r}",
            lambda v=value: ImageBertRetriever(model, processor, index_options={"nlist": v}),
            "nlist",
        )


def _probe_processor_regions(p: Probes, processor) -> None:
    from transformers import BertTokenizerFast

    from modeling_imagebert import ImageBertConfig, ImageBertProcessor

    from .harness import tokenizer_path

    p.entry = "processor region inputs"
    features = np.ones((2, 64), np.float32)

    def call(boxes, width=32, height=24, regions=features):
        return processor(
            text="a cube", region_features=regions, region_boxes=boxes, image_width=width, image_height=height
        )

    p.error("boxes of a 640 x 480 image given with 32 x 24", lambda: call([[0, 0, 10, 10], [0, 0, 640, 480]]),
            "item 0", "box 1", "32 x 24")  # fmt: skip
    p.error("a box left of the image", lambda: call([[-40, 0, 10, 10], [0, 0, 5, 5]]), "box 0", "outside")
    p.error("a box below the image", lambda: call([[0, 0, 10, 10], [0, 20, 5, 90]]), "box 1", "outside")
    p.result(
        "a box overshooting by half a pixel (clamped)",
        lambda: call([[-0.5, 0, 32.5, 24.2], [1, 1, 2, 2]])["region_locations"],
        lambda locations: float(locations[..., :4].min()) >= 0 and float(locations[..., :4].max()) <= 1,
    )
    p.error("a zero-size image", lambda: call([[0, 0, 0, 0], [0, 0, 0, 0]], width=0, height=0), "image_width")
    p.error(
        "a NaN feature", lambda: call([[0, 0, 1, 1]] * 2, regions=np.full((2, 64), np.nan)), "region_features"
    )
    p.error(
        "an Inf feature",
        lambda: call([[0, 0, 1, 1]] * 2, regions=np.full((2, 64), np.inf)),
        "region_features",
    )
    tokenizer = BertTokenizerFast.from_pretrained(tokenizer_path())
    for value in (*COUNTS, -5):
        p.error(
            f"ImageBertProcessor(max_regions={value!r})",
            lambda v=value: ImageBertProcessor(tokenizer, max_regions=v),
            "max_regions",
        )
    p.error(
        "ImageBertConfig(max_regions=0)", lambda: _config_error(ImageBertConfig, max_regions=0), "max_regions"
    )


def _config_error(config_class, **settings):
    """The config's own validation error (huggingface_hub's strict dataclass error, not a ValueError) as the
    ValueError it says."""
    try:
        return config_class(**settings)
    except ValueError:
        raise
    except Exception as error:  # noqa: BLE001 - StrictDataclassClassValidationError: re-raised as what it says
        raise ValueError(" ".join(str(error).split())) from None


# ------------------------------------------------------------------------------------------------ index files


def _probe_index_files(p: Probes, processor, base: Path) -> None:
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import BertTokenizerFast

    from modeling_imagebert import ImageBertProcessor
    from modeling_imagebert.retrieval import retriever as retriever_module
    from modeling_imagebert.retrieval.retriever import ImageBertRetriever

    from .harness import tokenizer_path

    p.entry = "ImageBertRetriever load_index"
    model = _tiny_model()
    rows = _rows()
    built = ImageBertRetriever(model, processor, candidates=4).index(rows)
    path = built.save_index(base / "index.safetensors")
    counter = iter(range(10**6))

    def edited(edit, version: str | None = None) -> Path:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata())
        tensors, settings = load_file(str(path)), json.loads(metadata["settings"])
        edit(tensors, settings)
        metadata["settings"] = json.dumps(settings, sort_keys=True)
        if version is not None:
            metadata["format_version"] = version
        target = base / f"edited{next(counter)}.safetensors"
        save_file(tensors, str(target), metadata)
        return target

    def load(target: Path, retriever=None, **kwargs):
        return (retriever or ImageBertRetriever(model, processor, candidates=4)).load_index(target, **kwargs)

    def ids_of(tensors) -> list[str]:
        return json.loads(tensors["image_ids"].numpy().tobytes())

    def set_ids(tensors, settings, ids):
        tensors["image_ids"] = torch.frombuffer(bytearray(json.dumps(ids).encode()), dtype=torch.uint8)
        settings["image_ids_sha256"] = retriever_module._ids_digest(ids)
        settings["num_images"] = len(ids)

    def rotate(tensors, settings):
        ids = ids_of(tensors)
        set_ids(tensors, settings, ids[1:] + ids[:1])

    def duplicate(tensors, settings):
        ids = ids_of(tensors)
        set_ids(tensors, settings, [ids[0], *ids[:-1]])

    def swap_embeddings(tensors, settings):
        tensors["image_embeds"] = tensors["image_embeds"][[1, 0, *range(2, len(rows))]].contiguous()

    def nan_embedding(tensors, settings):
        tensors["image_embeds"][2, 0] = float("nan")

    def other_max_regions(tensors, settings):
        settings["processor"]["max_regions"] = 10

    p.error("ids rotated (their digest updated)", lambda: load(edited(rotate)), "content digest")
    p.error("ids duplicated (their digest updated)", lambda: load(edited(duplicate)), "content digest")
    p.error("embeddings of two images swapped", lambda: load(edited(swap_embeddings)), "content digest")
    p.error("a NaN embedding", lambda: load(edited(nan_embedding)), "content digest")
    p.error("recorded with another max_regions", lambda: load(edited(other_max_regions)), "max_regions")
    other = ImageBertProcessor(
        BertTokenizerFast.from_pretrained(tokenizer_path()), max_regions=12, max_text_length=24
    )
    p.error(
        "loaded with a processor of another max_regions",
        lambda: load(path, ImageBertRetriever(model, other, candidates=4)),
        "max_regions",
    )
    p.error(
        "loaded with image_ids in another order",
        lambda: load(path, image_ids=list(reversed(built.image_ids))),
        "image ids differ",
    )
    p.error(
        "loaded by another model",
        lambda: load(path, ImageBertRetriever(_perturbed(model), processor)),
        "other model weights",
    )
    p.error(
        "a format version from the future", lambda: load(edited(lambda t, s: None, version="9")), "rebuild"
    )
    p.error("settings that are not JSON", lambda: load(_garbled_settings(path, base)), "settings")
    truncated = base / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    p.error("a truncated file", lambda: load(truncated), "truncated")

    def version_2(tensors, settings):
        settings.pop("content_sha256", None)

    p.result(
        "an index of the previous format (version 2) still loads",
        lambda: load(edited(version_2, version="2")).search(["a cube"], top_k=2),
        lambda hits: len(hits[0]) == 2,
    )


def _perturbed(model):
    import copy

    import torch

    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    return other


def _garbled_settings(path: Path, base: Path) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), "settings": "{not json"}
    target = base / "garbled.safetensors"
    save_file(load_file(str(path)), str(target), metadata)
    return target


# ------------------------------------------------------------------------------------------------ the scripts


def _probe_scripts(p: Probes, processor, base: Path) -> None:
    import os

    import datasets
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.cli import run_cli
    from modeling_imagebert.data.storage import save_dataset
    from modeling_imagebert.data.toy_world import make_toy_world

    p.entry = "run_retrieval / evaluate_retrieval (issue 25)"
    os.environ["IMAGEBERT_VALIDATION_CACHE"] = str(base / "validated")  # never the user's datasets cache
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    checkpoint = base / "ckpt"
    torch.manual_seed(0)
    ImageBertForPreTraining(config).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    retrieval_main = runpy.run_path(str(ROOT / "examples" / "run_retrieval.py"), run_name="probe")["main"]
    evaluate_main = runpy.run_path(str(ROOT / "examples" / "evaluate_retrieval.py"), run_name="probe")["main"]
    splits = make_toy_world(
        "retrieval", num_images=8, num_validation_images=4, num_test_images=4, seed=1, feature_dim=64,
        num_classes=23,
    )  # fmt: skip

    def saved(name: str, split: str, change=None) -> Path:
        rows = splits[split].to_list()
        if change is not None:
            change(rows)
        dataset = datasets.Dataset.from_list(rows, features=splits[split].features)
        return save_dataset(dataset, base / name, validate=False)

    def nan_feature(rows):
        rows[5]["region_features"][0][0] = float("nan")

    def inf_feature(rows):
        rows[2]["region_features"][1][3] = float("inf")

    def box_outside(rows):
        rows[3]["region_boxes"][0] = [0.0, 0.0, 1e5, 1e5]

    train = saved("train", "train")
    evaluation = saved("eval", "validation")
    nan_train = saved("train_nan", "train", nan_feature)
    inf_eval = saved("eval_inf", "validation", inf_feature)
    box_train = saved("train_box", "train", box_outside)
    inf_test = saved("test_inf", "test", inf_feature)
    counter = iter(range(10**6))

    def out() -> Path:
        return base / f"out{next(counter)}"

    def retrieve(*argv: str, output: Path | None = None) -> int:
        output = output if output is not None else out()
        return run_cli(
            retrieval_main,
            ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--disable_tqdm", "true",
             "--report_to", "none", "--max_steps", "2", "--per_device_train_batch_size", "4", *argv],
        )  # fmt: skip

    data = ["--train_dataset", str(train), "--do_train"]
    inputs = [*_files(checkpoint), *_files(train)]
    with p.guard("output_dir is the model folder", *inputs):
        p.cli(
            "--output_dir is the model folder",
            lambda: retrieve(*data, output=checkpoint),
            "--output_dir",
            "is",
        )
    with p.guard("output_dir inside the model folder", *inputs):
        p.cli(
            "--output_dir inside the model folder",
            lambda: retrieve(*data, output=checkpoint / "finetuned"),
            "is inside",
        )
    with p.guard("output_dir holds the model folder", *inputs):
        p.cli("--output_dir holds the model folder", lambda: retrieve(*data, output=base), "holds")
    with p.guard("output_dir is the train dataset", *inputs):
        p.cli("--output_dir is the train dataset", lambda: retrieve(*data, output=train), "--train_dataset")
    link = base / "link_to_ckpt"
    link.symlink_to(checkpoint, target_is_directory=True)
    with p.guard("output_dir is a link to the model folder", *inputs):
        p.cli(
            "--output_dir is a link to the model folder", lambda: retrieve(*data, output=link), "is the input"
        )
    processor_folder = base / "processor_only"
    processor.save_pretrained(processor_folder)
    with p.guard("output_dir is the --processor folder", *_files(processor_folder)):
        p.cli(
            "--output_dir is the --processor folder",
            lambda: retrieve(*data, "--processor", str(processor_folder), output=processor_folder),
            "--processor",
        )

    nan_output = out()
    p.cli(
        "a NaN feature in the train split",
        lambda: retrieve("--train_dataset", str(nan_train), "--do_train", output=nan_output),
        "--train_dataset", "record 5", "region_features",
    )  # fmt: skip
    p.result(
        "a NaN feature in the train split: no NaN tensor saved",
        lambda: _no_nan_tensor_saved(nan_output) if nan_output.exists() else True,
        bool,
    )
    p.cli(
        "an Inf feature in the eval split",
        lambda: retrieve(*data, "--eval_dataset", str(inf_eval), "--do_eval"),
        "--eval_dataset", "record 2", "region_features",
    )  # fmt: skip
    p.cli(
        "a box outside its image in the train split",
        lambda: retrieve("--train_dataset", str(box_train), "--do_train"),
        "record 3", "region_boxes",
    )  # fmt: skip
    diverging = out()
    steep = ["--learning_rate", "1e30", "--max_grad_norm", "0", "--max_steps", "4", "--num_candidates", "2"]
    steep += ["--save_strategy", "steps", "--save_steps", "1"]
    p.cli(
        "a diverging learning rate (1e30, no clipping)",
        lambda: retrieve(*data, *steep, output=diverging),
        "non-finite",
        ok=lambda: _no_nan_tensor_saved(diverging),
    )
    for loss in ("0*binary", "binary+0*ce", "1e999*binary", "-1*binary", "binary+binary", "0.0*itc+ce", ""):
        p.cli(f"--loss {loss!r}", lambda v=loss: retrieve("--toy", "--loss", v), "--loss")
    for flag, value in (
        ("--num_candidates", "1"), ("--num_candidates", "0"), ("--num_candidates", "-3"),
        ("--eval_num_candidates", "1"), ("--eval_max_groups", "0"), ("--full_ranking_batch_size", "0"),
        ("--toy_num_images", "0"), ("--triplet_margin", "nan"), ("--triplet_margin", "-1"),
        ("--hard_negative_fraction", "nan"),
    ):  # fmt: skip
        p.cli(f"{flag} {value}", lambda f=flag, v=value: retrieve("--toy", f, v), flag)

    def evaluate(*argv: str) -> int:
        return run_cli(evaluate_main, ["--model", str(checkpoint), "--no_progress", *argv])

    p.cli("evaluate: an Inf feature in --dataset", lambda: evaluate("--dataset", str(inf_test)), "record 2",
          "region_features")  # fmt: skip
    p.cli(
        "evaluate: --final_score itm+itc without --candidates",
        lambda: evaluate("--toy", "--toy_test_images", "4", "--final_score", "itm+itc"),
        "--final_score", "--candidates",
    )  # fmt: skip
    for flag in ("--batch_size", "--shard_size", "--toy_test_images", "--candidates"):
        for value in ("0", "-1"):
            p.cli(f"evaluate: {flag} {value}", lambda f=flag, v=value: evaluate("--toy", f, v), flag)
    p.cli(
        "evaluate: a clean --dataset (metrics)",
        lambda: evaluate("--dataset", str(evaluation), "--output_json", str(base / "eval.json")),
        ok=lambda: "image_retrieval/R@1" in json.loads((base / "eval.json").read_text())["metrics"],
    )


__all__ = ["probe_retriever"]
