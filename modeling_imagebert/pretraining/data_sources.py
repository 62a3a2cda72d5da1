"""Loading the data sources of a recipe: a saved image-text dataset, a text-only dataset or a toy-world corpus,
then encoded for training (`ImageBertProcessor.prepare_dataset` for image-text rows, tokenised captions for text).

It reads recipe specs and raises `RecipeError`, so it lives in `pretraining/`, above the data layer it uses."""

from __future__ import annotations

from pathlib import Path

from ..processing_imagebert import ImageBertProcessor
from .recipes import RecipeError


def load_source(spec, base: str | Path | None = None):
    """The raw `datasets.Dataset` of a recipe source (a saved folder or a toy-world corpus), cut to
    `max_examples`.

    Raises `RecipeError` naming the path when the folder is missing or is a DatasetDict without `split`, and
    `DataValidationError` when a saved image-text folder is not a dataset, is damaged or has other column types.
    """
    import datasets

    if spec.toy_world is not None:
        from ..data.toy_world import make_toy_world

        dataset = make_toy_world(**spec.toy_world)
    else:
        folder = (Path(base) if base is not None else Path.cwd()) / spec.path
        if not folder.is_dir():
            raise RecipeError(f"dataset path {folder} does not exist")
        if spec.modality == "image_text" and not (folder / "dataset_dict.json").is_file():
            from ..data.storage import load_dataset_from_disk

            # Checks the folder and the column types; a damaged shard is named instead of read blindly.
            dataset = load_dataset_from_disk(folder)
        else:  # a DatasetDict folder (its split is read below) or a text-only source
            dataset = datasets.load_from_disk(str(folder))
    if isinstance(dataset, datasets.DatasetDict):
        if spec.split is None:
            raise RecipeError(
                f"dataset {spec.path or spec.toy_world} has splits {list(dataset)}; set split: in the recipe"
            )
        if spec.split not in dataset:
            raise RecipeError(
                f"dataset {spec.path or spec.toy_world} has no split {spec.split!r} ({list(dataset)})"
            )
        dataset = dataset[spec.split]
    elif spec.split is not None and spec.toy_world is None:
        raise RecipeError(f"dataset {spec.path}: split {spec.split!r} given but the dataset has no splits")
    if spec.max_examples is not None:
        dataset = dataset.select(range(min(spec.max_examples, len(dataset))))
    if len(dataset) == 0:
        raise RecipeError(f"dataset {spec.path or spec.toy_world} is empty")
    return dataset


def encode_source(dataset, processor: ImageBertProcessor, modality: str):
    """Encodes a raw dataset for training: image-text rows with `processor.prepare_dataset`, text-only rows by
    tokenising the `caption` (or `text`) column. Returns a numpy-formatted `datasets.Dataset`."""
    if modality == "image_text":
        return processor.prepare_dataset(dataset)
    column = "caption" if "caption" in dataset.column_names else "text"
    if column not in dataset.column_names:
        raise RecipeError(f"a text-only source needs a caption or text column, got {dataset.column_names}")
    tokenizer = processor.tokenizer

    def tokenize(batch):
        ids = tokenizer(batch[column], truncation=True, max_length=processor.max_text_length)["input_ids"]
        return {"input_ids": ids}

    encoded = dataset.map(
        tokenize, batched=True, remove_columns=dataset.column_names, desc="tokenize text-only source"
    )
    return encoded.with_format("numpy", dtype=None)


__all__ = ["encode_source", "load_source"]
