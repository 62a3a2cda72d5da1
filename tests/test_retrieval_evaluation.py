"""Specification of the full-ranking retrieval evaluation (modeling_imagebert.retrieval.evaluation)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertForRetrieval
from modeling_imagebert.processing_imagebert import ImageBertProcessor
from modeling_imagebert.retrieval.evaluation import evaluate_retrieval
from modeling_imagebert.retrieval.metrics import fold_mean_recall, recall_summary

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configuration" / "models" / "imagebert-tiny.json"


def tiny_config(**overrides) -> ImageBertConfig:
    config = ImageBertConfig.from_json_file(str(TINY))
    for name, value in overrides.items():
        setattr(config, name, value)
    return config


def tiny_model(cls=ImageBertForPreTraining, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls(tiny_config(**overrides))


def tiny_processor(tokenizer_path: str) -> ImageBertProcessor:
    """The processor of `tiny_config()`'s sizes over the tokenizer at `tokenizer_path`."""
    from transformers import BertTokenizerFast

    config = tiny_config()
    return ImageBertProcessor(
        BertTokenizerFast.from_pretrained(tokenizer_path),
        max_regions=config.max_regions,
        max_text_length=config.max_text_length,
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def processor(minilm_path) -> ImageBertProcessor:
    return tiny_processor(minilm_path)


def toy_test_split(num_images: int = 4, seed: int = 0):
    from modeling_imagebert.data.toy_world import make_toy_world

    config = tiny_config()
    return make_toy_world(
        "retrieval",
        num_images=1,
        num_validation_images=1,
        num_test_images=num_images,
        seed=seed,
        feature_dim=config.visual_feature_dim,
        num_classes=config.num_object_classes - 1,
    )["test"]


@pytest.fixture(scope="module")
def split():
    return toy_test_split()


def score_one_pair(model, processor, caption_record, image_record) -> float:
    """The reference: one (caption, image) pair encoded and padded alone, scored alone."""
    caption = processor.encode_record(caption_record)
    example = processor.encode_record(image_record)
    example["input_ids"] = caption["input_ids"]
    batch = processor.pad([example])
    model.eval()
    with torch.no_grad():
        return float(model.score(**batch)[0])


def test_full_ranking_scores_equal_scoring_each_pair_alone(processor, split):
    model = tiny_model()
    model.train()  # the evaluator must switch dropout off, and put the mode back
    # batch_size 7 does not divide the 4 images: batches mix captions and images of different lengths.
    result = evaluate_retrieval(model, split, processor, batch_size=7, shard_size=3, progress=False)
    assert model.training
    rows = split.with_format("numpy", dtype=None)
    image_rows = {}
    for row, image_id in enumerate(split["image_id"]):
        image_rows.setdefault(image_id, row)
    assert result.image_ids == list(image_rows)
    checked = list(range(len(split)))  # every caption against every image: 80 single passes
    expected = torch.tensor(
        [
            [
                score_one_pair(model, processor, rows[c], rows[image_rows[image_id]])
                for image_id in result.image_ids
            ]
            for c in checked
        ]
    )
    torch.testing.assert_close(result.scores[checked], expected, rtol=0, atol=1e-5)
    assert result.caption_image_index.tolist() == [list(image_rows).index(i) for i in split["image_id"]]
    assert result.metrics == recall_summary(result.scores, result.caption_image_index)
    assert "| Test split (4 images, 20 captions) |" in result.table


def test_interrupted_evaluation_resumes_from_cache_computing_only_missing_shards(processor, split, tmp_path):
    model = tiny_model()
    full = evaluate_retrieval(model, split, processor, batch_size=16, shard_size=4, progress=False)
    assert full.num_shards == 5

    class Interrupt(Exception):
        pass

    def stop_after_two(shard: int) -> None:
        if shard == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        evaluate_retrieval(
            model, split, processor, batch_size=16, shard_size=4, cache_dir=tmp_path, progress=False,
            shard_callback=stop_after_two,
        )  # fmt: skip
    resumed = evaluate_retrieval(
        model, split, processor, batch_size=16, shard_size=4, cache_dir=tmp_path, progress=False
    )
    assert resumed.computed_shards == [2, 3, 4]
    assert torch.equal(resumed.scores, full.scores)
    assert resumed.metrics == full.metrics
    again = evaluate_retrieval(
        model, split, processor, batch_size=16, shard_size=4, cache_dir=tmp_path, progress=False
    )
    assert again.computed_shards == []
    assert torch.equal(again.scores, full.scores)


def test_cache_made_with_other_weights_is_ignored_with_a_warning(processor, split, tmp_path):
    old = tiny_model(seed=0)
    evaluate_retrieval(old, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    new = tiny_model(seed=0)
    with torch.no_grad():
        new.itm_head.weight.add_(0.5)  # only the weights change: same class, config and data
    with pytest.warns(UserWarning, match="ignoring cached scores .* different model weights"):
        stale = evaluate_retrieval(new, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    assert stale.computed_shards == [0, 1]
    fresh = evaluate_retrieval(new, split, processor, shard_size=10, progress=False)
    assert torch.equal(stale.scores, fresh.scores)


def test_cache_made_on_other_data_is_ignored(processor, split, tmp_path):
    model = tiny_model()
    evaluate_retrieval(model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    other = toy_test_split(seed=1)
    with pytest.warns(UserWarning, match="different test split"):
        result = evaluate_retrieval(
            model, other, processor, shard_size=10, cache_dir=tmp_path, progress=False
        )
    assert result.computed_shards == [0, 1]


def test_damaged_cache_shard_is_recomputed_not_trusted(processor, split, tmp_path):
    model = tiny_model()
    first = evaluate_retrieval(model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    (shard,) = tmp_path.glob("scores-*/shard-000001.pt")
    shard.write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match="ignoring cached shard"):
        second = evaluate_retrieval(
            model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False
        )
    assert second.computed_shards == [1]
    assert torch.equal(first.scores, second.scores)


def test_one_flipped_bit_in_a_cache_shard_is_caught_by_its_checksum_and_recomputed(
    processor, split, tmp_path
):
    model = tiny_model()
    first = evaluate_retrieval(model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    (shard,) = tmp_path.glob("scores-*/shard-000000.pt")
    data = bytearray(shard.read_bytes())
    start = bytes(data).find(torch.load(shard, weights_only=True)["scores"].numpy().tobytes())
    assert start > 0
    data[start + 2] ^= 0x10  # one bit of one stored score: torch.load reads the file without complaint
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"shard-000000.pt \(sha256 .* differs from the manifest"):
        second = evaluate_retrieval(
            model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False
        )
    assert second.computed_shards == [0]
    assert torch.equal(first.scores, second.scores)


def test_cached_shard_with_non_finite_scores_is_recomputed_like_a_fresh_one(processor, split, tmp_path):
    import hashlib
    import io

    model = tiny_model()
    first = evaluate_retrieval(model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    (shard,) = tmp_path.glob("scores-*/shard-000001.pt")
    payload = torch.load(shard, weights_only=True)
    payload["scores"][0, 0] = float("nan")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    shard.write_bytes(buffer.getvalue())  # a consistent manifest: only the finiteness check can catch it
    entry = json.loads(shard.with_suffix(".json").read_text())
    entry.update(size=len(buffer.getvalue()), sha256=hashlib.sha256(buffer.getvalue()).hexdigest())
    shard.with_suffix(".json").write_text(json.dumps(entry))
    with pytest.warns(UserWarning, match="non-finite"):
        second = evaluate_retrieval(
            model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False
        )
    assert second.computed_shards == [1] and torch.equal(first.scores, second.scores)


def test_a_shard_file_left_half_written_by_a_killed_evaluation_is_removed_by_the_next_run(
    processor, split, tmp_path
):
    import subprocess

    model = tiny_model()
    evaluate_retrieval(model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    (folder,) = tmp_path.glob("scores-*")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from modeling_imagebert.atomic import _host_tag

    # What a SIGKILL inside atomic_write_bytes of shard 1 leaves behind.
    stale = folder / f".tmp-shard-000001.pt.file.{_host_tag()}.{dead.pid}.x1y2z3"
    stale.write_bytes(b"half a shard")
    with pytest.warns(UserWarning, match="left by an interrupted evaluation"):
        evaluate_retrieval(model, split, processor, shard_size=10, cache_dir=tmp_path, progress=False)
    assert not stale.exists()


def test_coco_1k_is_the_mean_over_folds_and_strict_sizes_are_enforced(processor):
    split = toy_test_split(num_images=5)
    model = tiny_model()
    result = evaluate_retrieval(model, split, processor, protocol="coco_1k", strict=False, progress=False)
    assert result.metrics == fold_mean_recall(result.scores, result.caption_image_index, 5)
    assert "| MSCOCO 1k |" in result.table
    with pytest.raises(ValueError, match="exactly 5000 images with 5 captions each; the split has 5 images"):
        evaluate_retrieval(model, split, processor, protocol="coco_5k", progress=False)
    with pytest.raises(ValueError, match="protocol must be one of"):
        evaluate_retrieval(model, split, processor, protocol="coco_2k", progress=False)


def test_blank_caption_is_reported_with_its_record_and_image_id(processor, split):
    rows = split.to_list()
    rows[7]["caption"] = "  "
    with pytest.raises(ValueError, match=r"caption of record 7 \(image_id '.*'\)"):
        evaluate_retrieval(tiny_model(), rows, processor, progress=False)


def test_a_datasetdict_is_refused_with_its_split_names(processor):
    from modeling_imagebert.data.toy_world import make_toy_world

    splits = make_toy_world(
        "retrieval", num_images=1, num_validation_images=1, num_test_images=1, feature_dim=64
    )
    with pytest.raises(ValueError, match=r"splits \['train', 'validation', 'test'\].*dataset\['test'\]"):
        evaluate_retrieval(tiny_model(), splits, processor, progress=False)


def test_regions_beyond_the_models_max_regions_are_refused(processor, split):
    model = tiny_model(max_regions=5)
    with pytest.raises(ValueError, match="config.max_regions=5"):
        evaluate_retrieval(model, split, processor, progress=False)


def _load_cli():
    spec = importlib.util.spec_from_file_location(
        "evaluate_retrieval_cli", ROOT / "examples" / "evaluate_retrieval.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("architecture", [ImageBertForPreTraining, ImageBertForRetrieval])
def test_cli_end_to_end_on_a_saved_checkpoint_and_dataset(architecture, processor, split, tmp_path):
    from modeling_imagebert.data.storage import save_dataset

    model = tiny_model(architecture)
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    save_dataset(split, tmp_path / "data")
    cli = _load_cli()
    summary = cli.main(
        [
            "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data"), "--batch_size", "32",
            "--output_json", str(tmp_path / "out.json"), "--output_markdown", str(tmp_path / "table.md"),
            "--no_progress",
        ]
    )  # fmt: skip
    # The head follows the checkpoint's architecture, and the numbers are those of the library function.
    assert summary["head"] == architecture.__name__
    expected = evaluate_retrieval(model, split, processor, progress=False)
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["metrics"] == pytest.approx(expected.metrics)
    assert (tmp_path / "table.md").read_text() == expected.table


SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")


@pytest.mark.slow
@SLOW
def test_two_processes_give_the_same_scores_as_one(processor, split, tmp_path):
    """Two real gloo processes (accelerate launch) split the shards and both end with the one-process matrix."""
    from modeling_imagebert.data.storage import save_dataset

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    save_dataset(split, tmp_path / "data")
    single = evaluate_retrieval(model, split, processor, shard_size=3, progress=False)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "examples" / "evaluate_retrieval.py"), "--model", str(tmp_path / "model"),
        "--dataset", str(tmp_path / "data"), "--shard_size", "3", "--no_progress",
        "--save_scores", str(tmp_path / "scores.pt"), "--output_json", str(tmp_path / "out.json"),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out.json").read_text())
    assert summary["num_processes"] == 2
    # 7 shards of 3 captions: the main process scored shards 0, 2, 4, 6 and received 1, 3, 5 from the other.
    assert summary["computed_shards"] == 4
    saved = torch.load(tmp_path / "scores.pt")
    torch.testing.assert_close(saved["scores"], single.scores, rtol=0, atol=1e-6)
    assert summary["metrics"] == pytest.approx(single.metrics)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
