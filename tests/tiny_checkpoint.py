"""A tiny ImageBERT checkpoint folder (random weights, the MiniLM tokenizer) for the script tests."""

from pathlib import Path

import torch
from transformers import BertTokenizerFast

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertProcessor

TINY = Path(__file__).resolve().parent.parent / "configuration" / "models" / "imagebert-tiny.json"


def save_tiny_checkpoint(folder: Path, minilm_path: str, seed: int = 0) -> Path:
    """Saves `ImageBertForPreTraining` of the tiny config (weights drawn from `seed`) and its processor into
    `folder`, as a pre-training run's final folder holds them. Returns `folder`."""
    config = ImageBertConfig.from_json_file(str(TINY))
    torch.manual_seed(seed)
    ImageBertForPreTraining(config).save_pretrained(folder)
    ImageBertProcessor(
        BertTokenizerFast.from_pretrained(minilm_path),
        max_regions=config.max_regions,
        max_text_length=config.max_text_length,
    ).save_pretrained(folder)
    return folder
