"""Specification of Recall@K for image-text retrieval, the paper's test protocols and the evaluate metric."""

import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_imagebert.retrieval.metrics import (
    coco_1k,
    coco_5k,
    flickr30k_1k,
    fold_mean_recall,
    format_paper_table,
    image_retrieval_ranks,
    image_retrieval_recall,
    recall_summary,
    text_retrieval_ranks,
    text_retrieval_recall,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
METRIC_DIR = REPO_ROOT / "metrics" / "recall_at_k"


def _reference_ranks(scores: np.ndarray, caption_image_index: np.ndarray) -> tuple[list[int], list[int]]:
    """Ranks straight from the definition, by sorting: ground truths sort AFTER tied competitors."""
    num_captions, num_images = scores.shape
    image_ranks = []
    for c in range(num_captions):
        own = caption_image_index[c]
        order = sorted(range(num_images), key=lambda j: (-scores[c, j], j == own))
        image_ranks.append(order.index(own))
    text_ranks = []
    for i in range(num_images):
        order = sorted(range(num_captions), key=lambda c: (-scores[c, i], caption_image_index[c] == i))
        text_ranks.append(min(order.index(c) for c in range(num_captions) if caption_image_index[c] == i))
    return image_ranks, text_ranks


def _tie_heavy_problem(num_images: int, per_image: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=(num_images * per_image, num_images)).astype(np.float32)  # many ties
    caption_image_index = np.repeat(np.arange(num_images), per_image)
    return scores, caption_image_index


# --- image retrieval (caption -> images) -------------------------------------------------------------


def test_image_retrieval_recall_counts_captions_whose_image_is_in_top_k():
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3],  # caption 0 -> image 0: rank 0
            [0.5, 0.4, 0.6, 0.1],  # caption 1 -> image 1: 0.5 and 0.6 above, rank 2
            [0.3, 0.2, 0.1, 0.0],  # caption 2 -> image 3: last, rank 3
        ]
    )
    index = [0, 1, 3]
    assert image_retrieval_ranks(scores, index).tolist() == [0, 2, 3]
    assert image_retrieval_recall(scores, index, ks=(1, 2, 3, 4)) == {
        "R@1": pytest.approx(1 / 3),
        "R@2": pytest.approx(1 / 3),
        "R@3": pytest.approx(2 / 3),
        "R@4": pytest.approx(1.0),
    }


def test_image_retrieval_tie_with_a_competitor_ranks_the_ground_truth_below_it():
    # Ground truth tied with one competitor at the top: rank 1, so a miss at K=1 and a hit at K=2,
    # whichever of the two tied columns is the ground truth.
    scores = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert image_retrieval_ranks(scores, [0, 1]).tolist() == [1, 1]
    assert image_retrieval_recall(scores, [0, 1], ks=(1, 2)) == {"R@1": 0.0, "R@2": 1.0}


def test_constant_scores_never_give_perfect_recall():
    scores = torch.full((8, 4), 0.5)
    index = np.repeat(np.arange(4), 2)
    # 3 competing images, 6 competing captions: every ground truth ranks last.
    assert image_retrieval_ranks(scores, index).tolist() == [3] * 8
    assert text_retrieval_ranks(scores, index).tolist() == [6] * 4
    summary = recall_summary(scores, index)
    assert summary["image_retrieval/R@1"] == 0.0 and summary["text_retrieval/R@5"] == 0.0
    assert summary["image_retrieval/R@5"] == 100.0  # K=5 > 3 competitors: every list is within the top 5
    assert summary["text_retrieval/R@10"] == 100.0


# --- text (sentence) retrieval (image -> captions) ---------------------------------------------------


def test_text_retrieval_hit_via_third_caption_counts():
    # Image 0 owns captions 0-4, image 1 owns captions 5-9.
    scores = torch.zeros(10, 2)
    scores[:, 0] = torch.tensor([0.1, 0.1, 0.95, 0.1, 0.1, 0.5, 0.6, 0.2, 0.3, 0.4])  # 3rd caption is best
    # Image 1: best own caption (0.55) has 4 foreign captions above it: rank 4.
    scores[:, 1] = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.6, 0.3, 0.2, 0.55, 0.1, 0.0])
    index = [0] * 5 + [1] * 5
    assert text_retrieval_ranks(scores, index).tolist() == [0, 4]
    assert text_retrieval_recall(scores, index, ks=(1, 4, 5)) == {"R@1": 0.5, "R@4": 0.5, "R@5": 1.0}


def test_text_retrieval_ties_between_own_captions_do_not_count_but_ties_with_foreign_ones_do():
    scores = torch.tensor(
        [
            [0.7, 0.7],  # image 0's caption
            [0.7, 0.2],  # image 0's caption, tied with its sibling: no penalty
            [0.5, 0.7],  # image 1's caption; its 0.7 is tied by caption 0, which belongs to image 0
            [0.1, 0.3],  # image 1's caption
        ]
    )
    index = [0, 0, 1, 1]
    # Image 0: best own score 0.7 (captions 0 and 1); foreign captions 2, 3 score 0.5, 0.1: rank 0.
    # Image 1: best own score 0.7 (caption 2); foreign caption 0 also scores 0.7: pessimistic rank 1.
    assert text_retrieval_ranks(scores, index).tolist() == [0, 1]


def test_ranks_match_the_sorting_definition_on_tie_heavy_matrices():
    for seed in range(3):
        scores, index = _tie_heavy_problem(num_images=6, per_image=3, seed=seed)
        image_ranks, text_ranks = _reference_ranks(scores, index)
        assert image_retrieval_ranks(scores, index).tolist() == image_ranks
        assert text_retrieval_ranks(scores, index).tolist() == text_ranks


def test_results_do_not_depend_on_the_order_of_images_or_captions():
    scores, index = _tie_heavy_problem(num_images=7, per_image=5, seed=11)
    rng = np.random.default_rng(0)
    caption_perm = rng.permutation(scores.shape[0])
    image_perm = rng.permutation(scores.shape[1])  # new column j holds old image image_perm[j]
    new_column_of = np.argsort(image_perm)
    shuffled = scores[caption_perm][:, image_perm]
    shuffled_index = new_column_of[index[caption_perm]]
    expected = recall_summary(scores, index, ks=(1, 2, 5))
    assert recall_summary(shuffled, shuffled_index, ks=(1, 2, 5)) == expected
    assert 0 < expected["rsum"] < 600  # a non-trivial problem, not all hits or all misses


def test_recall_summary_reports_percent_and_rsum():
    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])  # caption 3 belongs to image 1
    summary = recall_summary(scores, [0, 1, 0, 1], ks=(1,))
    assert summary == {"image_retrieval/R@1": 75.0, "text_retrieval/R@1": 100.0, "rsum": 175.0}


def test_large_matrices_are_processed_in_blocks_with_the_same_result(monkeypatch):
    import modeling_imagebert.retrieval.metrics as rm

    scores, index = _tie_heavy_problem(num_images=9, per_image=4, seed=5)
    whole = recall_summary(scores, index)
    monkeypatch.setattr(rm, "_MAX_BLOCK_ELEMENTS", 20)  # 2 caption rows per block
    assert recall_summary(scores, index) == whole


# --- protocols ------------------------------------------------------------------------------------------


def _block_diagonal_problem(num_images: int, fold_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Perfect within each fold of consecutive images, but every caption prefers an image of the next fold."""
    index = torch.arange(num_images).repeat_interleave(2)
    scores = torch.zeros(2 * num_images, num_images)
    scores[torch.arange(2 * num_images), index] = 1.0
    distractor = (index + fold_size) % num_images
    scores[torch.arange(2 * num_images), distractor] = 2.0
    return scores, index


def test_coco_1k_is_the_mean_over_folds_of_consecutive_images():
    scores, index = _block_diagonal_problem(num_images=10, fold_size=2)
    # The cross-fold distractors only matter when all images compete (the 5k protocol).
    assert coco_5k(scores, index, strict=False)["image_retrieval/R@1"] == 0.0
    assert coco_1k(scores, index, strict=False) == {key: 100.0 for key in recall_summary(scores, index)} | {
        "rsum": 600.0
    }

    # A fold with misses: the result is the plain mean of the five fold results.
    scores[0, 1] = 5.0  # caption 0 (image 0, fold 0) now prefers image 1 in its own fold
    folds = [
        recall_summary(scores[4 * f : 4 * f + 4, 2 * f : 2 * f + 2], index[4 * f : 4 * f + 4] - 2 * f)
        for f in range(5)
    ]
    result = coco_1k(scores, index, strict=False)
    assert result == {key: pytest.approx(sum(r[key] for r in folds) / 5) for key in folds[0]}
    assert result["image_retrieval/R@1"] == pytest.approx(
        (75.0 + 4 * 100.0) / 5
    )  # fold 0: 3 of 4 captions hit


def test_fold_mean_takes_captions_by_their_image_not_by_position():
    scores, index = _tie_heavy_problem(num_images=10, per_image=3, seed=2)
    perm = np.random.default_rng(1).permutation(len(index))
    assert fold_mean_recall(scores[perm], index[perm], num_folds=5) == pytest.approx(
        fold_mean_recall(scores, index, num_folds=5)
    )


def test_folds_must_divide_the_images():
    scores, index = _tie_heavy_problem(num_images=7, per_image=1, seed=0)
    with pytest.raises(ValueError, match="7 images cannot be split into 5"):
        coco_1k(scores, index, strict=False)


def test_protocols_check_official_sizes_and_say_what_was_given():
    scores, index = _block_diagonal_problem(num_images=10, fold_size=2)
    with pytest.raises(ValueError, match=r"MSCOCO 1k needs scores for exactly 5000 .* got 10 image columns"):
        coco_1k(scores, index)
    with pytest.raises(ValueError, match=r"MSCOCO 5k needs scores for exactly 5000 .* got 10"):
        coco_5k(scores, index)
    with pytest.raises(ValueError, match=r"Flickr30k 1k needs scores for exactly 1000 .* got 10"):
        flickr30k_1k(scores, index)
    # Right number of images, wrong number of captions (4 per image instead of 5).
    four = torch.eye(1000).repeat_interleave(4, dim=0)
    with pytest.raises(
        ValueError, match=r"exactly 5 captions per image .* got 4000 rows and image column 0 has 4"
    ):
        flickr30k_1k(four, torch.arange(1000).repeat_interleave(4))


def test_flickr30k_1k_accepts_the_official_size():
    scores = torch.eye(1000).repeat_interleave(5, dim=0)
    scores[0, 1] = 2.0  # one caption out of 5000 misses at R@1
    result = flickr30k_1k(scores, torch.arange(1000).repeat_interleave(5))
    assert result["image_retrieval/R@1"] == pytest.approx(100.0 * 4999 / 5000)
    # Image 1 now has a foreign caption (caption 0, score 2) above its own captions (score 1).
    assert result["text_retrieval/R@1"] == pytest.approx(100.0 * 999 / 1000)


# --- bad input --------------------------------------------------------------------------------------------


def test_nan_scores_are_rejected_with_their_position():
    scores = torch.eye(3)
    scores[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN \(first at caption row 2, image column 1\)"):
        recall_summary(scores, [0, 1, 2])


def test_caption_image_index_out_of_range_names_the_caption():
    with pytest.raises(ValueError, match=r"caption_image_index\[1\] = 3 .*expected 0 <= index < 3"):
        image_retrieval_recall(torch.eye(3), [0, 3, 2])
    with pytest.raises(ValueError, match="one entry per caption row of scores \\(3\\)"):
        image_retrieval_recall(torch.eye(3), [0, 1])
    with pytest.raises(ValueError, match="2-D matrix"):
        image_retrieval_recall(torch.ones(3), [0, 1, 2])


def test_text_retrieval_requires_a_caption_for_every_image():
    with pytest.raises(ValueError, match=r"image column\(s\) \[1\] .* have none"):
        text_retrieval_recall(torch.ones(2, 3), [0, 2])


def test_ks_must_be_positive_integers():
    with pytest.raises(ValueError, match="positive integer; got 0"):
        image_retrieval_recall(torch.eye(2), [0, 1], ks=(0, 1))


# --- paper table -----------------------------------------------------------------------------------------


def test_format_paper_table_lays_out_rows_like_table_2():
    results = {
        "Flickr30k 1k": {
            "image_retrieval/R@1": 73.14,
            "image_retrieval/R@5": 92.56,
            "image_retrieval/R@10": 96.0,
            "text_retrieval/R@1": 87.0,
            "text_retrieval/R@5": 97.6,
            "text_retrieval/R@10": 99.2,
            "rsum": 545.5,
        },
        "MSCOCO 5k": {"image_retrieval/R@1": 50.5, "text_retrieval/R@1": 66.44},
    }
    assert format_paper_table(results) == (
        "| Test set | Image Retrieval R@1 | R@5 | R@10 | Sentence Retrieval R@1 | R@5 | R@10 |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
        "| Flickr30k 1k | 73.1 | 92.6 | 96.0 | 87.0 | 97.6 | 99.2 |\n"
        "| MSCOCO 5k | 50.5 | - | - | 66.4 | - | - |\n"
    )
    assert format_paper_table(results, with_rsum=True).splitlines()[2].endswith("| 99.2 | 545.5 |")


def test_format_paper_table_rejects_rows_without_metrics():
    with pytest.raises(ValueError, match=r"results\['COCO'\] has none of the metrics"):
        format_paper_table({"COCO": {"accuracy": 1.0}})


# --- evaluate metric ---------------------------------------------------------------------------------------


@pytest.fixture
def offline_recall_metric(monkeypatch):
    """The metric loaded from its folder with every socket connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_EVALUATE_OFFLINE", "1")
    evaluate = pytest.importorskip("evaluate")

    def refuse(*args, **kwargs):
        raise AssertionError(f"the recall_at_k metric tried to reach the network: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.chdir(REPO_ROOT)
    return evaluate.load("metrics/recall_at_k"), evaluate.load(str(METRIC_DIR.resolve()))


def test_evaluate_metric_loads_offline_and_matches_the_library(offline_recall_metric):
    by_relative_path, by_absolute_path = offline_recall_metric
    scores, index = _tie_heavy_problem(num_images=10, per_image=3, seed=4)
    expected = recall_summary(scores, index, ks=(1, 2, 5))
    for metric in (by_relative_path, by_absolute_path):
        got = metric.compute(predictions=scores.tolist(), references=index.tolist(), ks=[1, 2, 5])
        assert got == pytest.approx(expected)
    folds = by_absolute_path.compute(predictions=scores.tolist(), references=index.tolist(), num_folds=5)
    assert folds == pytest.approx(fold_mean_recall(scores, index, num_folds=5))


def test_evaluate_metric_rejects_ragged_rows(offline_recall_metric):
    metric, _ = offline_recall_metric
    with pytest.raises(ValueError, match=r"predictions\[1\] scores 1 images but predictions\[0\] scores 2"):
        metric.compute(predictions=[[0.1, 0.2], [0.3]], references=[0, 1])
