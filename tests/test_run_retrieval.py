"""Retrieval fine-tuning with Trainer (examples/run_retrieval.py, modeling_imagebert/retrieval/trainer.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from modeling_imagebert import ImageBertForPreTraining, ImageBertForRetrieval, ImageBertProcessor
from modeling_imagebert.data.collators import DataCollatorForCandidateGroups
from modeling_imagebert.data.toy_world import DEMO_TOY_WORLD, make_toy_world
from modeling_imagebert.retrieval.trainer import (
    CollatorEpochCallback,
    candidate_group_recall,
    fixed_candidate_layout,
    make_compute_metrics,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import run_retrieval  # noqa: E402

FEATURE_DIM = 16
NUM_CLASSES = 6  # toy object classes; the detector adds a background class
TOY = ["--toy", "--toy_num_images", "12", "--toy_num_eval_images", "8", "--toy_seed", "5"]
QUIET = ["--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no"]
RECALL_KEYS = [f"eval_{d}_retrieval/R@{k}" for d in ("image", "text") for k in (1, 5, 10)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, minilm_path) -> str:
    """A tiny pre-training checkpoint (1 MiniLM layer) with its processor, as run_pretrain.py writes one."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("pretrained")
    model = ImageBertForPreTraining.from_bert_pretrained(
        minilm_path,
        num_hidden_layers=1,
        visual_feature_dim=FEATURE_DIM,
        num_object_classes=NUM_CLASSES + 1,
        max_regions=12,
        max_text_length=16,
    )
    model.save_pretrained(folder)
    tokenizer = BertTokenizerFast.from_pretrained(minilm_path)
    ImageBertProcessor(tokenizer, max_regions=12, max_text_length=16).save_pretrained(folder)
    return str(folder)


def toy_eval_split():
    return make_toy_world(
        "retrieval",
        num_images=12,
        num_validation_images=8,
        num_test_images=8,
        seed=5,
        feature_dim=FEATURE_DIM,
        num_classes=NUM_CLASSES,
        noise=DEMO_TOY_WORLD["noise"],  # the script's --toy_noise default
    )["validation"]


# ---------------------------------------------------------------------------------------------- the fixed layout


def test_fixed_candidate_layout_is_deterministic_and_seeded():
    image_ids = [f"img{i // 3}" for i in range(3 * 12)]  # 12 images, 3 captions each
    first = fixed_candidate_layout(image_ids, num_candidates=6, seed=1)
    again = fixed_candidate_layout(image_ids, num_candidates=6, seed=1)
    other = fixed_candidate_layout(image_ids, num_candidates=6, seed=2)
    assert np.array_equal(first.text_rows, again.text_rows)
    assert np.array_equal(first.image_rows, again.image_rows)
    assert not np.array_equal(first.image_rows, other.image_rows)
    assert first.num_image_groups == 36 and first.num_text_groups == 12


def test_layout_groups_put_the_ground_truth_first_and_negatives_on_distinct_other_images():
    image_ids = [f"img{i // 3}" for i in range(3 * 12)]
    layout = fixed_candidate_layout(image_ids, num_candidates=6, seed=0)
    ids = np.asarray(image_ids)
    for g in range(len(layout)):
        text, image = layout.text_rows[g], layout.image_rows[g]
        if g < layout.num_image_groups:  # one caption against P images
            assert (text == g).all() and ids[image[0]] == ids[g]
            negatives = ids[image[1:]]
        else:  # one image against P captions, the first one its own
            assert len(set(image)) == 1 and ids[text[0]] == ids[image[0]]
            negatives = ids[text[1:]]
        assert len(set(negatives)) == 5 and ids[text[0]] not in set(negatives)


def test_layout_refuses_fewer_images_than_candidates():
    with pytest.raises(ValueError, match="3 distinct images but num_candidates=5"):
        fixed_candidate_layout(["a", "a", "b", "c"], num_candidates=5)


def test_group_recall_counts_ties_against_the_ground_truth_and_splits_directions():
    scores = np.array(
        [
            [0.9, 0.1, 0.2],  # image group: rank 0
            [0.5, 0.5, 0.1],  # image group: tie -> rank 1
            [0.1, 0.3, 0.2],  # text group: rank 2
        ]
    )
    metrics = candidate_group_recall(scores, num_image_groups=2, ks=(1, 2))
    assert metrics == {
        "image_retrieval/R@1": 50.0,
        "image_retrieval/R@2": 100.0,
        "text_retrieval/R@1": 0.0,
        "text_retrieval/R@2": 0.0,
        "rsum": 150.0,
    }


def test_compute_metrics_refuses_predictions_whose_group_order_was_lost():
    layout = fixed_candidate_layout([f"i{k}" for k in range(4)], num_candidates=3, direction="image")
    compute = make_compute_metrics(layout)
    labels = np.zeros((4, 3))
    labels[:, 0] = 1
    good = compute(SimpleNamespace(predictions=labels * 2.0, label_ids=labels))
    assert good["image_retrieval/R@1"] == 100.0
    with pytest.raises(ValueError, match="one positive first"):
        compute(SimpleNamespace(predictions=labels, label_ids=labels[:, ::-1]))
    with pytest.raises(ValueError, match="shape"):
        compute(SimpleNamespace(predictions=np.zeros(12), label_ids=labels.reshape(-1)))


def test_collator_epoch_follows_trainer_epochs_including_a_mid_epoch_resume():
    collator = SimpleNamespace(epoch=None)
    collator.set_epoch = lambda epoch: setattr(collator, "epoch", epoch)
    callback = CollatorEpochCallback(collator)
    for trainer_epoch, expected in ((0.0, 0), (1.0, 1), (2.9999999999, 3), (1.5, 1)):
        callback.on_epoch_begin(None, SimpleNamespace(epoch=trainer_epoch), None)
        assert collator.epoch == expected


# ---------------------------------------------------------------------------------------------- training


SLOW = pytest.mark.skipif(os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow: set IMAGEBERT_SLOW=1")


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory) -> str:
    """The built-in demo's pre-trained checkpoint (about 4 minutes on 2 CPU cores). From a checkpoint whose ITM head
    has not learned word-region alignment, none of the retrieval losses moves within a test-sized budget: ITM needs
    a few hundred steps to discover it, which is what pre-training is for."""
    sys.path.insert(0, str(Path(run_retrieval.__file__).parent))
    import run_pretrain

    out = tmp_path_factory.mktemp("demo")
    run_pretrain.main(["--output_dir", str(out), "--no_progress"])
    return str(out / "final")


@pytest.mark.slow
@SLOW
@pytest.mark.timeout(1200)  # the first one also runs the demo (its fixture), 4-8 minutes on 2 busy CPU cores
@pytest.mark.parametrize("loss", ["binary", "ce", "triplet"])
def test_each_loss_trains_from_the_demo_checkpoint(demo_checkpoint, tmp_path, loss):
    results = run_retrieval.main(
        [
            "--model_name_or_path", demo_checkpoint, "--output_dir", str(tmp_path), *QUIET,
            "--toy", "--toy_noise", "1.0", "--toy_seed", "5", "--toy_num_images", "200", "--toy_num_eval_images", "25",
            "--loss", loss, "--do_train", "--do_eval", "--eval_on_start", "--eval_strategy", "no",
            "--num_train_epochs", "1", "--logging_steps", "7", "--seed", "42",
        ]
    )  # fmt: skip
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 4
    assert np.mean(losses[-2:]) < 0.9 * np.mean(losses[:2]), f"{loss}: training loss went {losses}"
    start, end = history[0]["eval_loss"], results["eval"]["eval_loss"]
    assert end < start, f"{loss}: eval loss on the fixed layout went {start:.4f} -> {end:.4f}"
    assert set(RECALL_KEYS) <= set(results["eval"])


# ---------------------------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def single_process_eval(checkpoint, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("eval1")
    return run_retrieval.main(
        ["--model_name_or_path", checkpoint, "--output_dir", str(output), *TOY, *QUIET, "--do_eval",
         "--eval_num_candidates", "5", "--per_device_eval_batch_size", "3"]
    )["eval"]  # fmt: skip


def test_fixed_layout_evaluation_matches_scoring_each_pair_alone(checkpoint, single_process_eval):
    model = ImageBertForRetrieval.from_pretrained(checkpoint).eval()
    processor = ImageBertProcessor.from_pretrained(checkpoint)
    split = toy_eval_split()
    layout = fixed_candidate_layout(split["image_id"], num_candidates=5)
    collator = DataCollatorForCandidateGroups(processor.prepare_dataset(split), processor)
    scores = np.zeros((len(layout), 5))
    with torch.inference_mode():
        for g in range(len(layout)):
            for p in range(5):
                pair = {"group": g, "text_rows": layout.text_rows[g, p : p + 1]}
                pair["image_rows"] = layout.image_rows[g, p : p + 1]
                batch = collator([pair])
                batch.pop("labels")
                scores[g, p] = model.score(**batch).item()
    expected = candidate_group_recall(scores, layout.num_image_groups)
    for key in RECALL_KEYS:
        assert single_process_eval[key] == pytest.approx(expected[key.removeprefix("eval_")])
    # Recall on a random-head model is not trivially perfect or zero: the comparison above can fail.
    assert 0 < single_process_eval["eval_image_retrieval/R@1"] < 100


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("IMAGEBERT_SLOW") != "1", reason="slow (two processes): set IMAGEBERT_SLOW=1"
)
def test_two_ddp_processes_give_the_same_eval_metrics_as_one(checkpoint, single_process_eval, tmp_path):
    # 40 + 8 = 48 groups, 5 per process and step: the last step is padded with repeated groups, which must be dropped.
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        str(REPO / "examples" / "run_retrieval.py"),
        "--model_name_or_path", checkpoint, "--output_dir", str(tmp_path), *TOY, *QUIET, "--do_eval",
        "--eval_num_candidates", "5", "--per_device_eval_batch_size", "5", "--ddp_backend", "gloo",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "run_retrieval_results.json").read_text())["world_size"] == 2
    metrics = json.loads((tmp_path / "eval_results.json").read_text())
    for key in RECALL_KEYS:
        assert metrics[key] == pytest.approx(single_process_eval[key]), key
