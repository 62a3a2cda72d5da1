"""The demo sweep's summary (benchmarks/sweep_demo.py): ranges, runs at the target and thread-count gaps per score."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "sweep_demo.py"
_spec = importlib.util.spec_from_file_location("sweep_demo", _PATH)
sweep_demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep_demo)


def _row(seed, threads, image, text, image_itm=None, text_itm=None):
    row = {"seed": seed, "threads": threads, "image_r1": image, "text_r1": text, "takeoff_step": 400,
           "seconds": 200.0, "final_score": "itm+itc" if image_itm is not None else "itm"}  # fmt: skip
    if image_itm is not None:
        row.update(image_r1_itm=image_itm, text_r1_itm=text_itm)
    return row


def test_summary_counts_gaps_and_targets_for_the_final_score_and_for_itm_alone():
    rows = [
        _row(1, 1, 84.0, 100.0, 68.0, 64.0),
        _row(1, 2, 85.6, 96.0, 84.8, 92.0),  # final score: gap 4.0; ITM alone: gap 28.0
        _row(2, 1, 80.0, 92.0, 59.2, 80.0),  # ITM alone misses the target
        _row(2, 2, 80.8, 92.0, 72.0, 80.0),
    ]
    summary = sweep_demo.summarise(rows, target=60.0, max_gap=5.0)
    assert summary["runs_at_target"] == 4 and summary["itm"]["runs_at_target"] == 3
    assert summary["max_thread_gap"] == 4.0 and summary["itm"]["max_thread_gap"] == 28.0
    assert summary["seeds_within_gap"] == 2 and summary["itm"]["seeds_within_gap"] == 0
    assert summary["image_r1_range"] == [80.0, 85.6] and summary["itm"]["text_r1_range"] == [64.0, 92.0]
    text = sweep_demo.markdown(rows, summary)
    assert "| 1 | 1 | 84.0 | 100.0 | 68.0 | 64.0 | 400 | 200 |" in text
    assert "2/2 seeds' thread counts within 5 points, the largest gap 4.0 points" in text
    assert "Ranked by ITM alone:" in text and "0/2 seeds' thread counts within 5 points" in text


def test_rows_of_sweeps_before_the_itm_columns_count_as_ranked_by_itm():
    rows = [_row(3, 1, 74.4, 84.0), _row(3, 2, 80.8, 84.0)]
    summary = sweep_demo.summarise(rows, target=60.0)
    assert summary["final_score"] == ["itm"]
    assert summary["max_thread_gap"] == pytest.approx(6.4) and summary["itm"][
        "max_thread_gap"
    ] == pytest.approx(6.4)
    assert summary["seeds_within_gap"] == 0
