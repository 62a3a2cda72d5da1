"""The zero-shot retrieval check at the end of a pre-training run (`examples/run_pretrain.py`).

The recipe's `evaluation` section (`pretraining.recipes.EvaluationSpec`) names a test split, the score to rank by
and, optionally, K for two-stage retrieval. `evaluate_zero_shot` runs full ranking by the ITM score (the paper's
protocol, always reported), two-stage retrieval when K is given (which also ranks the full matrix by the recipe's
final score, from the ITM scores already computed), prints the paper-style tables, and returns the entries the run
saves in `pretrain_results.json` (and the model card reads).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .evaluation import evaluate_retrieval
from .metrics import format_paper_table
from .two_stage import evaluate_two_stage

if TYPE_CHECKING:
    from ..pretraining.recipes import EvaluationSpec


def evaluate_zero_shot(
    model: torch.nn.Module,
    test,
    processor,
    evaluation: EvaluationSpec,
    *,
    accelerator=None,
    bf16: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Zero-shot retrieval of a pre-trained model on the recipe's test split: every caption scored against every
    image by the ITM head, and two-stage retrieval when `evaluation.candidates` is set.

    Args:
        model: `ImageBertForPreTraining` (a DDP wrapper is unwrapped).
        test: the test split, a `datasets.Dataset` in the schema of `modeling_imagebert.data.schema`.
        processor: the run's `ImageBertProcessor`.
        evaluation: the recipe's evaluation section (batch_size, candidates, final_score).
        accelerator: the run's `Accelerator` (shards split across processes; every process gets all the scores).
        bf16: bfloat16 autocast (the run's mixed precision).
        progress: tqdm bars on the main process.
        log: where the summary line and the tables go (`accelerator.print`: the main process only).

    Returns:
        `zero_shot_retrieval_itm` (full ranking by ITM), `zero_shot_retrieval` (full ranking by the final score),
        `zero_shot_final_score`, `num_test_images` and, with candidates, `zero_shot_two_stage` (the two-stage
        summary without its table and recall-vs-K curve); metrics in percent.
    """
    final_score = evaluation.final_score
    log(f"zero-shot retrieval: {len(test)} captions x {len(set(test['image_id']))} images, full ranking")
    full = evaluate_retrieval(
        model, test, processor, batch_size=evaluation.batch_size, accelerator=accelerator, progress=progress,
        bf16=bf16,
    )  # fmt: skip
    # Full ranking by the ITM score alone (the paper's), whatever the recipe ranks by.
    results: dict[str, Any] = {
        "zero_shot_retrieval_itm": full.metrics,
        "zero_shot_retrieval": full.metrics,
        "zero_shot_final_score": final_score,
        "num_test_images": len(full.image_ids),
    }
    table = {"ITM score (the paper's)": full.metrics}
    two_stage = None
    if evaluation.candidates is not None:
        # The same split, the ITC embeddings picking K candidates per query and the cross-encoder re-ranking them;
        # full ranking by the recipe's final score comes from the ITM scores just computed.
        two_stage = evaluate_two_stage(
            model, test, processor, candidates=evaluation.candidates, final_score=final_score,
            batch_size=evaluation.batch_size, accelerator=accelerator, progress=progress, bf16=bf16,
            full_scores=full.scores,
        )  # fmt: skip
        if final_score != "itm":
            results["zero_shot_retrieval"] = two_stage.full_metrics
            table["ITM + ITC score (this recipe's final score)"] = two_stage.full_metrics
        results["zero_shot_two_stage"] = {
            k: v for k, v in two_stage.to_json_dict().items() if k not in ("table", "recall_vs_k")
        }
    log(format_paper_table(table, with_rsum=True))
    if two_stage is not None:
        ranked_by = "ITM" if final_score == "itm" else "ITM + ITC"
        log(
            f"two-stage: ITC top-{two_stage.k} per query, {two_stage.passes['cross_encoder']} of "
            f"{two_stage.passes['full']} pairs re-ranked by {ranked_by}\n{two_stage.table}"
        )
    return results


__all__ = ["evaluate_zero_shot"]
