"""Probes of `examples/evaluate_retrieval.py` and `examples/run_retrieval.py` run as commands: missing or foreign
datasets, model and processor folders, bad flags."""

from __future__ import annotations

import runpy
from pathlib import Path

from .harness import ROOT, F, Probes, good_row


def probe_scripts(p: Probes, processor, work: Path) -> None:
    import torch

    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining
    from modeling_imagebert.cli import run_cli

    p.entry = "run_retrieval / evaluate_retrieval"
    config = ImageBertConfig.from_json_file(str(ROOT / "configuration" / "models" / "imagebert-tiny.json"))
    checkpoint = work / "ckpt"
    torch.manual_seed(0)
    ImageBertForPreTraining(config).save_pretrained(checkpoint)
    processor.save_pretrained(checkpoint)
    evaluate_main = runpy.run_path(str(ROOT / "examples" / "evaluate_retrieval.py"), run_name="probe")["main"]
    retrieval_main = runpy.run_path(str(ROOT / "examples" / "run_retrieval.py"), run_name="probe")["main"]
    (work / "not_a_dataset").mkdir()
    (work / "empty_processor").mkdir()

    def evaluate(*argv: str) -> int:
        return run_cli(evaluate_main, ["--model", str(checkpoint), "--no_progress", *argv])

    def retrieve(*argv: str) -> int:
        return run_cli(
            retrieval_main, ["--model_name_or_path", str(checkpoint), "--output_dir", str(work / "rr"), *argv]
        )

    import datasets

    from modeling_imagebert.data.schema import image_text_features

    datasets.DatasetDict(
        {"test": datasets.Dataset.from_list([good_row(0)], features=image_text_features(F))}
    ).save_to_disk(str(work / "dd"))
    datasets.Dataset.from_list([good_row(0)], features=image_text_features(F)).save_to_disk(str(work / "f8"))
    p.cli("evaluate: dataset missing", lambda: evaluate("--dataset", str(work / "gone")), "gone")
    p.cli(
        "evaluate: folder that is not a dataset",
        lambda: evaluate("--dataset", str(work / "not_a_dataset")),
        "state.json",
    )
    p.cli(
        "evaluate: --split not in the DatasetDict",
        lambda: evaluate("--dataset", str(work / "dd"), "--split", "val"),
        "val",
    )
    p.cli("evaluate: features of another dimension", lambda: evaluate("--dataset", str(work / "f8")), "64")
    p.cli(
        "evaluate: model folder missing",
        lambda: run_cli(evaluate_main, ["--model", str(work / "nomodel"), "--toy"]),
        "nomodel",
    )
    p.cli(
        "evaluate: processor folder empty",
        lambda: evaluate("--toy", "--processor", str(work / "empty_processor")),
        "empty_processor",
    )
    p.cli("evaluate: unknown --protocol", lambda: evaluate("--toy", "--protocol", "coco_9k"), "protocol")
    p.cli(
        "run_retrieval: train dataset missing",
        lambda: retrieve("--train_dataset", str(work / "gone"), "--do_train"),
        "gone",
    )
    p.cli(
        "run_retrieval: train dataset of another dimension",
        lambda: retrieve("--train_dataset", str(work / "f8"), "--do_train"),
        "64",
    )
    p.cli("run_retrieval: bad --loss", lambda: retrieve("--toy", "--loss", "hinge"), "loss")
    p.cli(
        "run_retrieval: both --toy and --train_dataset",
        lambda: retrieve("--toy", "--train_dataset", str(work / "f8")),
        "toy",
    )
