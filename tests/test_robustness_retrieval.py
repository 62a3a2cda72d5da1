"""Issue 25, retrieval: every value is checked where it enters the retrieval scripts, the retriever and the processor,
and run_retrieval never writes over its inputs nor saves NaN weights.

One test per finding: run_retrieval's output folder vs its inputs, its splits validated before step 1, a NaN loss
stopping it, its loss weights and counts; `ImageBertRetriever.index` refusing NaN features; the processor refusing
boxes outside their image; evaluate_retrieval validating `--dataset`; `load_index` checking the ids and embeddings it
loads; `--final_score itm+itc` without `--candidates`; the retriever's counts; `max_regions=0`.
"""

from __future__ import annotations

import json
import os
import runpy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from test_retrieval_evaluation import tiny_config, tiny_model, tiny_processor, toy_test_split

from modeling_imagebert import ImageBertConfig, ImageBertForRetrieval, ImageBertProcessor
from modeling_imagebert.cli import run_cli
from modeling_imagebert.data.storage import save_dataset
from modeling_imagebert.data.toy_world import make_toy_world
from modeling_imagebert.retrieval.retriever import ImageBertRetriever

ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--disable_tqdm", "true", "--report_to", "none"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, minilm_path) -> Path:
    from tiny_checkpoint import save_tiny_checkpoint

    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), minilm_path)


@pytest.fixture(scope="module")
def scripts() -> dict:
    return {
        name: runpy.run_path(str(ROOT / "examples" / f"{name}.py"), run_name="robustness")["main"]
        for name in ("run_retrieval", "evaluate_retrieval")
    }


@pytest.fixture(scope="module")
def processor(minilm_path) -> ImageBertProcessor:
    return tiny_processor(minilm_path)


@pytest.fixture(scope="module")
def model():
    return tiny_model(ImageBertForRetrieval, seed=3).eval()


def toy_split(name: str, num_images: int = 8):
    config = tiny_config()
    return make_toy_world(
        "retrieval",
        num_images=num_images,
        num_validation_images=num_images,
        num_test_images=num_images,
        seed=1,
        feature_dim=config.visual_feature_dim,
        num_classes=config.num_object_classes - 1,
    )[name]


def with_bad_feature(dataset, row: int, value: float):
    """`dataset` with `value` written into the first feature of row `row`'s first region."""
    import datasets

    rows = dataset.to_list()
    rows[row]["region_features"][0][0] = value
    return datasets.Dataset.from_list(rows, features=dataset.features)


def run(main, argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = run_cli(main, argv)
    except SystemExit as exited:  # argparse's own refusals
        code = exited.code
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return code, errors


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()
    }


# ------------------------------------------------------------------------------------------ run_retrieval (group 2)


def test_run_retrieval_refuses_an_output_dir_that_is_holds_or_lies_inside_an_input(
    checkpoint, scripts, tmp_path, capsys
):
    before = tree_state(checkpoint)
    for output, relation in (
        (checkpoint, "is the input --model_name_or_path"),
        (checkpoint / "finetuned", "is inside the input --model_name_or_path"),
        (checkpoint.parent, "holds the input --model_name_or_path"),
    ):
        argv = ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--toy"]
        argv += ["--toy_num_images", "8", "--max_steps", "1", "--do_train", *QUIET]
        code, errors = run(scripts["run_retrieval"], argv, capsys)
        assert code == 2 and len(errors) == 1, errors
        assert relation in errors[0] and "--output_dir" in errors[0]
    assert tree_state(checkpoint) == before and not (checkpoint / "finetuned").exists()


def test_run_retrieval_into_a_folder_another_live_run_holds_stops_at_once(
    checkpoint, scripts, tmp_path, capsys
):
    """Issue 25, group 3 for fine-tuning: two runs into one folder both trained and the folder kept one of them."""
    import subprocess
    import sys

    folder = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom pathlib import Path\nfrom modeling_imagebert.atomic import lock_folder\n"
            "Path(sys.argv[1]).mkdir()\nlock_folder(sys.argv[1])\nprint('locked', flush=True)\ntime.sleep(600)",
            str(folder),
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        argv = ["--model_name_or_path", str(checkpoint), "--output_dir", str(folder), "--toy"]
        argv += ["--toy_num_images", "8", "--max_steps", "1", "--do_train", *QUIET]
        code, errors = run(scripts["run_retrieval"], argv, capsys)
        assert code == 2 and len(errors) == 1 and f"is in use by run pid {holder.pid}" in errors[0], errors
        assert [p.name for p in folder.iterdir()] == [".lock-modeling_imagebert"]  # nothing written
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_run_retrieval_refuses_a_train_split_with_a_nan_feature_before_step_1(
    checkpoint, scripts, tmp_path, capsys
):
    data = save_dataset(
        with_bad_feature(toy_split("train"), 7, float("nan")), tmp_path / "train", validate=False
    )
    output = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(checkpoint),
        "--train_dataset",
        str(data),
        "--output_dir",
        str(output),
    ]
    code, errors = run(scripts["run_retrieval"], [*argv, "--do_train", "--max_steps", "2", *QUIET], capsys)
    assert code == 2 and len(errors) == 1, errors
    assert all(word in errors[0] for word in ("--train_dataset", "record 7", "region_features", "NaN"))
    assert not (output / "model.safetensors").exists()


def test_run_retrieval_stops_on_a_nan_loss_naming_the_step_and_saves_no_nan_weights(
    checkpoint, scripts, tmp_path, capsys, monkeypatch
):
    forward, calls = ImageBertForRetrieval.forward, []

    def nan_from_the_third_step(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) >= 3:
                outputs["loss"] = outputs["loss"] * float("nan")
        return outputs

    monkeypatch.setattr(ImageBertForRetrieval, "forward", nan_from_the_third_step)
    output = tmp_path / "out"
    argv = [
        "--model_name_or_path",
        str(checkpoint),
        "--output_dir",
        str(output),
        "--toy",
        "--toy_num_images",
        "8",
    ]
    argv += ["--do_train", "--max_steps", "5", "--per_device_train_batch_size", "4", "--num_candidates", "2"]
    argv += ["--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "100", *QUIET]
    code, errors = run(scripts["run_retrieval"], argv, capsys)
    assert code == 2 and len(errors) == 1, errors
    assert "step 3: non-finite training loss" in errors[0]
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (output / "model.safetensors").exists()
    from safetensors.torch import load_file

    for weights in output.rglob("*.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(weights).values() if t.is_floating_point())


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--loss", "0*binary"], ["--loss", "positive finite"]),
        (["--loss", "binary+1e999*ce"], ["--loss", "positive finite"]),
        (["--num_candidates", "1"], ["--num_candidates", ">= 2"]),
        (["--eval_num_candidates", "1"], ["--eval_num_candidates", ">= 2"]),
        (["--full_ranking_batch_size", "0"], ["--full_ranking_batch_size", ">= 1"]),
    ],
)
def test_run_retrieval_refuses_zero_loss_weights_and_groups_without_negatives(
    checkpoint, scripts, tmp_path, capsys, flags, words
):
    argv = ["--model_name_or_path", str(checkpoint), "--output_dir", str(tmp_path / "out"), "--toy", *flags]
    code, errors = run(scripts["run_retrieval"], argv, capsys)
    assert code == 2 and len(errors) == 1 and all(word in errors[0] for word in words), errors
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ values where they enter (group 5)


def test_the_retriever_refuses_to_index_a_nan_feature_naming_the_image_and_field(model, processor):
    rows = [dict(row) for row in toy_test_split(num_images=6)]
    first_of_image = next(i for i, row in enumerate(rows) if row["image_id"] == rows[-1]["image_id"])
    features = np.array(rows[first_of_image]["region_features"], dtype=np.float32)
    features[2, 5] = np.nan
    rows[first_of_image]["region_features"] = features
    with pytest.raises(ValueError, match="region_features of record") as error:
        ImageBertRetriever(model, processor, candidates=4).index(rows)
    assert rows[-1]["image_id"] in str(error.value) and "\n" not in str(error.value)
    # Finite but far too large: the embedding overflows, and the image is named.
    features = np.array(rows[first_of_image]["region_features"], dtype=np.float32)
    features[2, 5] = 3e38
    rows[first_of_image]["region_features"] = np.nan_to_num(features, nan=0.0)
    with pytest.raises(ValueError, match="image_embeds") as error:
        ImageBertRetriever(model, processor, candidates=4).index(rows)
    assert rows[-1]["image_id"] in str(error.value)


def test_the_processor_refuses_boxes_outside_the_image_and_clamps_a_rounding_overshoot(processor):
    features = np.ones((2, tiny_config().visual_feature_dim), np.float32)
    with pytest.raises(ValueError) as error:
        processor(
            text="a cube", region_features=features, region_boxes=[[0, 0, 10, 10], [0, 0, 640, 480]],
            image_width=32, image_height=24,
        )  # fmt: skip
    message = str(error.value)
    assert all(word in message for word in ("item 0", "box 1", "640.0", "32 x 24")) and "\n" not in message
    with pytest.raises(ValueError, match="box 0 .* outside"):
        processor(
            region_features=features[:1], region_boxes=[[-5, 0, 10, 10]], image_width=32, image_height=24
        )
    inputs = processor(
        region_features=features,
        region_boxes=[[-0.4, 0, 32.5, 24.3], [1, 2, 3, 4]],
        image_width=32,
        image_height=24,
    )
    locations = inputs["region_locations"][0]
    assert float(locations[:, :4].min()) >= 0.0 and float(locations[:, :4].max()) <= 1.0
    assert torch.allclose(locations[0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))


def test_evaluate_retrieval_refuses_a_dataset_with_an_inf_before_scoring(
    checkpoint, scripts, tmp_path, capsys
):
    data = save_dataset(
        with_bad_feature(toy_split("test", 4), 2, float("inf")), tmp_path / "test", validate=False
    )
    code, errors = run(
        scripts["evaluate_retrieval"], ["--model", str(checkpoint), "--dataset", str(data)], capsys
    )
    assert code == 2 and len(errors) == 1, errors
    assert all(word in errors[0] for word in ("--dataset", "record 2", "region_features"))


def _rewrite_index(path: Path, target: Path, edit) -> None:
    """Copies the index at `path` to `target` after `edit(tensors, settings)`, keeping its metadata otherwise."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
    tensors, settings = load_file(str(path)), json.loads(metadata["settings"])
    edit(tensors, settings)
    metadata["settings"] = json.dumps(settings, sort_keys=True)
    save_file(tensors, str(target), metadata)


def test_load_index_refuses_ids_rotated_against_their_embeddings_and_edited_embeddings(
    model, processor, tmp_path
):
    from modeling_imagebert.retrieval import retriever as retriever_module

    saved = ImageBertRetriever(model, processor, candidates=4).index(toy_test_split(num_images=6))
    path = saved.save_index(tmp_path / "index.safetensors")

    def rotate_ids(tensors, settings):  # ids and their recorded digest both rotated: every hit a wrong image
        ids = json.loads(tensors["image_ids"].numpy().tobytes())
        ids = ids[1:] + ids[:1]
        tensors["image_ids"] = torch.frombuffer(bytearray(json.dumps(ids).encode()), dtype=torch.uint8)
        settings["image_ids_sha256"] = retriever_module._ids_digest(ids)

    def swap_embeddings(tensors, settings):
        tensors["image_embeds"] = tensors["image_embeds"][[1, 0, *range(2, 6)]].contiguous()

    for name, edit in (("rotated", rotate_ids), ("swapped", swap_embeddings)):
        _rewrite_index(path, tmp_path / f"{name}.safetensors", edit)
        with pytest.raises(ValueError, match="content digest differs") as error:
            ImageBertRetriever(model, processor, candidates=4).load_index(tmp_path / f"{name}.safetensors")
        assert "\n" not in str(error.value)

    def as_version_2(tensors, settings):  # what the previous version wrote: still loads, with a warning
        settings.pop("content_sha256")

    _rewrite_index(path, tmp_path / "v2.safetensors", as_version_2)
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(tmp_path / "v2.safetensors"), framework="pt") as handle:
        metadata = {**handle.metadata(), "format_version": "2"}
    save_file(load_file(str(tmp_path / "v2.safetensors")), str(tmp_path / "v2.safetensors"), metadata)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = ImageBertRetriever(model, processor, candidates=4).load_index(tmp_path / "v2.safetensors")
    assert loaded.image_ids == saved.image_ids and any("format version 2" in str(w.message) for w in caught)


def test_an_index_of_image_files_records_its_detector_and_refuses_another_one(minilm_path, tmp_path):
    """Images indexed from files depend on the processor's detector: a saved index, and the batch cache of
    `index_images`, are refused (the cache: not reused) with another detector."""
    from feature_fixtures import save_tiny_detector, write_photos
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(minilm_path)
    config = tiny_config()

    def processor_with(seed: int) -> ImageBertProcessor:
        detector = save_tiny_detector(tmp_path / f"detector{seed}", seed=seed)
        return ImageBertProcessor(
            tokenizer, max_regions=config.max_regions, max_text_length=24, detector=detector
        )

    first, second = processor_with(0), processor_with(1)
    model = tiny_model(ImageBertForRetrieval, seed=3).eval()
    photos = write_photos(tmp_path / "photos", size=96)
    cache = tmp_path / "cache"
    built = ImageBertRetriever(model, first, candidates=2).index_images(
        photos, cache_dir=cache, progress=False
    )
    path = built.save_index(tmp_path / "photos.safetensors")
    with pytest.raises(ValueError, match="built from image files with another detector"):
        ImageBertRetriever(model, second, candidates=2).load_index(path)
    ImageBertRetriever(model, first, candidates=2).load_index(path)  # the same detector: accepted
    fresh = ImageBertRetriever(model, second, candidates=2).index_images(photos, progress=False)
    cached = ImageBertRetriever(model, second, candidates=2).index_images(
        photos, cache_dir=cache, progress=False
    )
    assert torch.equal(cached.image_embeds, fresh.image_embeds)
    assert not torch.equal(cached.image_embeds, built.image_embeds)


# ------------------------------------------------------------------------------------------ silent results (group 7)


def test_evaluate_retrieval_refuses_final_score_itm_itc_without_candidates(checkpoint, scripts, capsys):
    code, errors = run(
        scripts["evaluate_retrieval"],
        ["--model", str(checkpoint), "--toy", "--final_score", "itm+itc"],
        capsys,
    )
    assert code == 2 and len(errors) == 1 and "--final_score itm+itc goes with --candidates" in errors[0]


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "3"])
def test_the_retrievers_counts_are_refused_in_one_line_naming_the_parameter(model, processor, value):
    retriever = ImageBertRetriever(model, processor, candidates=4).index(toy_test_split(num_images=6))
    with pytest.raises(ValueError, match=f"top_k must be an int >= 1, got {value!r}"):
        retriever.search(["a red cube"], top_k=value)
    for name in ("candidates", "batch_size"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            ImageBertRetriever(model, processor, **{name: value})
    assert len(retriever.search(["a red cube"], top_k=10**12)[0]) == 4  # huge: every candidate, no error


@pytest.mark.parametrize("value", [0, 2.5, True, "3"])
def test_the_evaluation_functions_refuse_bad_counts_before_any_work(model, processor, value):
    from modeling_imagebert.retrieval.evaluation import evaluate_retrieval
    from modeling_imagebert.retrieval.two_stage import evaluate_two_stage

    split = toy_test_split(num_images=3)
    calls = {
        "batch_size": lambda: evaluate_retrieval(model, split, processor, batch_size=value, progress=False),
        "shard_size": lambda: evaluate_retrieval(model, split, processor, shard_size=value, progress=False),
        "candidates": lambda: evaluate_two_stage(model, split, processor, candidates=value, progress=False),
        "embedding_batch_size": lambda: evaluate_two_stage(
            model, split, processor, candidates=2, embedding_batch_size=value, progress=False
        ),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"{name}.* must be an int >= 1"):
            call()


# ------------------------------------------------------------------------------------------ tracebacks (group 8)


def test_max_regions_zero_is_refused_in_one_line_by_the_processor_and_the_config(minilm_path):
    from transformers import BertTokenizerFast

    with pytest.raises(ValueError, match="max_regions must be an int >= 1"):
        ImageBertProcessor(BertTokenizerFast.from_pretrained(minilm_path), max_regions=0)
    with pytest.raises(Exception, match="max_regions must be >= 1"):
        ImageBertConfig(max_regions=0)


def test_a_refused_run_leaves_no_output_folder(checkpoint, scripts, tmp_path, capsys):
    """The checks come before anything is written: a refused run creates nothing."""
    output = tmp_path / "never"
    code, _ = run(
        scripts["run_retrieval"],
        ["--model_name_or_path", str(checkpoint), "--output_dir", str(output), "--toy", "--loss", "0*ce"],
        capsys,
    )
    assert code == 2 and not output.exists() and not os.listdir(tmp_path)
