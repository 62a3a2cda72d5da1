"""Recall@K for image-text retrieval as an `evaluate` metric.

A thin wrapper: all the arithmetic lives in `modeling_imagebert.retrieval.metrics`, so this metric and the
library always agree. Load it offline from its folder:

    evaluate.load("/abs/path/to/metrics/recall_at_k")  # or "metrics/recall_at_k" from the repository root
"""

import datasets
import evaluate
import numpy as np

from modeling_imagebert.retrieval.metrics import DEFAULT_KS, fold_mean_recall, recall_summary

_DESCRIPTION = """\
Recall@K of image-text retrieval in both directions, in percent, as the ImageBERT paper (Table 2) reports it.
Image retrieval (caption -> images): a caption is a hit at K if its own image ranks in the top K.
Sentence retrieval (image -> captions): an image is a hit at K if ANY of its ground-truth captions ranks in
the top K. Ties are pessimistic: a competitor with a score equal to the ground truth's ranks above it, so
constant scores never give perfect recall and the order of candidates never matters.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one row of the score matrix per caption: the caption's score
        with every image (higher = better match). All rows have the same length, the number of images.
    references (`list` of `int`): for each caption, the index of its own image in the rows of `predictions`.
        Every image needs at least one caption.
    ks (`list` of `int`, defaults to `[1, 5, 10]`): the cut-offs K.
    num_folds (`int`, defaults to 1): average over this many folds of consecutive images and their
        captions (5 on the MSCOCO 5k test gives the MSCOCO 1k protocol).
Returns:
    `image_retrieval/R@K`, `text_retrieval/R@K` for each K, and `rsum` (their sum), all in percent.
Examples:
    >>> recall = evaluate.load("metrics/recall_at_k")
    >>> recall.compute(predictions=[[0.9, 0.1], [0.2, 0.8]], references=[0, 1], ks=[1])
    {'image_retrieval/R@1': 100.0, 'text_retrieval/R@1': 100.0, 'rsum': 200.0}
"""

_CITATION = """\
@article{qi2020imagebert,
  title={ImageBERT: Cross-modal Pre-training with Large-scale Weak-supervised Image-Text Data},
  author={Qi, Di and Su, Lin and Song, Jia and Cui, Edward and Bharti, Taroon and Sacheti, Arun},
  journal={arXiv preprint arXiv:2001.07966},
  year={2020}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RecallAtK(evaluate.Metric):
    """Image-text retrieval Recall@K (both directions) over a caption x image score matrix."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # float64 so that scores are compared exactly as given (a float32 cast could create ties).
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, ks=DEFAULT_KS, num_folds=1):
        if len(predictions) == 0:
            raise ValueError("recall_at_k needs at least one caption (one row of predictions)")
        num_images = len(predictions[0])
        for row, scores in enumerate(predictions):
            if len(scores) != num_images:
                raise ValueError(
                    f"predictions[{row}] scores {len(scores)} images but predictions[0] scores {num_images}; "
                    "every caption must be scored against the same images"
                )
        scores = np.asarray(predictions, dtype=np.float64)  # (num_captions, num_images)
        caption_image_index = np.asarray(references, dtype=np.int64)  # (num_captions,)
        if num_folds == 1:
            return recall_summary(scores, caption_image_index, ks)
        return fold_mean_recall(scores, caption_image_index, num_folds, ks)
