"""Pair-scoring throughput of the full-ranking retrieval evaluator against scoring pairs one by one.

A full-ranking evaluation scores every (caption, image) pair of a test split with the cross-encoder. The batched
evaluator (`modeling_imagebert.retrieval.evaluation.score_caption_rows`) keeps every image's padded regions and
every caption's token ids as tensors on the device and builds batches of pairs by indexing them; the baseline calls
`model.score` on each pair alone (its inputs sliced from the same tensors, so neither side pays for encoding).

The model is built from a config (random weights, nothing downloaded): base size is `ImageBertConfig()` (12 layers,
hidden 768), fed `--text-length` tokens and `--regions` regions of `--feature-dim`-d features per pair. The script
prints pairs/s of both and their ratio, and appends a markdown row to `benchmarks/RESULTS.md`.

It also times the first stage of two-stage retrieval (text and image embeddings per second, one unimodal pass each,
`modeling_imagebert.retrieval.two_stage`) and projects, from the measured rates, the cost of evaluating Flickr30k 1k
(1,000 images x 5,000 captions) and MSCOCO 5k (5,000 x 25,000) on this machine: full ranking (every pair) against
two-stage with K candidates per query in each direction (C + I embeddings, then at most (C + I) x K pairs: the
union of both directions' top-K, an upper bound).

Usage:
    python benchmarks/bench_retrieval_scoring.py                              # base size, small counts, CPU
    python benchmarks/bench_retrieval_scoring.py --size tiny --num-images 8   # smoke run
    python benchmarks/bench_retrieval_scoring.py --device cuda --dtype bf16 --num-images 100 --batch-size 512
    python benchmarks/bench_retrieval_scoring.py --candidates 16,128,256 --no-record   # projections only printed
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import time
from pathlib import Path

import torch

from modeling_imagebert import ImageBertConfig, ImageBertForRetrieval
from modeling_imagebert.retrieval.evaluation import RetrievalInputs, score_caption_rows
from modeling_imagebert.retrieval.two_stage import embed_images, embed_texts

RESULTS = Path(__file__).with_name("RESULTS.md")
ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "base": lambda: ImageBertConfig(),
    "tiny": lambda: ImageBertConfig.from_json_file(
        str(ROOT / "configuration" / "models" / "imagebert-tiny.json")
    ),
}


def synthetic_inputs(args, config: ImageBertConfig) -> RetrievalInputs:
    """Random captions of exactly `text_length` tokens and images of exactly `regions` regions."""
    generator = torch.Generator().manual_seed(0)
    num_captions = args.num_images * args.captions_per_image
    input_ids = torch.randint(1000, config.vocab_size, (num_captions, args.text_length), generator=generator)
    input_ids[:, 0], input_ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    corners = torch.rand(args.num_images, args.regions, 2, 2, generator=generator).sort(dim=2).values
    x1, x2 = corners[..., 0, 0], corners[..., 1, 0]
    y1, y2 = corners[..., 0, 1], corners[..., 1, 1]
    locations = torch.stack([x1, y1, x2, y2, (x2 - x1) * (y2 - y1)], dim=-1)  # (I, R, 5)
    return RetrievalInputs(
        image_ids=[f"image-{i}" for i in range(args.num_images)],
        caption_image_index=torch.arange(args.num_images).repeat_interleave(args.captions_per_image),
        text={"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)},
        images={
            "region_features": torch.randn(
                args.num_images, args.regions, args.feature_dim, generator=generator
            ).half(),
            "region_locations": locations,
            "region_attention_mask": torch.ones(args.num_images, args.regions, dtype=torch.long),
        },
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_batched(model, inputs: RetrievalInputs, args, device) -> float:
    """Pairs per second of the batched evaluator over the whole caption x image matrix."""
    warm = max(1, min(inputs.num_captions, -(-args.batch_size // inputs.num_images)))
    score_caption_rows(model, inputs, 0, warm, batch_size=args.batch_size, bf16=args.bf16, device=device)
    _sync(device)
    began = time.perf_counter()
    score_caption_rows(
        model, inputs, 0, inputs.num_captions, batch_size=args.batch_size, bf16=args.bf16, device=device
    )
    _sync(device)
    return inputs.num_captions * inputs.num_images / (time.perf_counter() - began)


def time_one_by_one(model, inputs: RetrievalInputs, args, device) -> float:
    """Pairs per second of `model.score` called on one pair at a time (the first `one_by_one_pairs` pairs)."""
    text = {name: tensor.to(device) for name, tensor in inputs.text.items()}
    images = {name: tensor.to(device) for name, tensor in inputs.images.items()}
    pairs = [(c, i) for c in range(inputs.num_captions) for i in range(inputs.num_images)]
    pairs = pairs[: args.one_by_one_pairs]
    dtype = next(model.parameters()).dtype

    def score(c: int, i: int) -> torch.Tensor:
        return model.score(
            input_ids=text["input_ids"][c : c + 1],
            attention_mask=text["attention_mask"][c : c + 1],
            token_type_ids=torch.zeros_like(text["input_ids"][c : c + 1]),
            region_features=images["region_features"][i : i + 1].to(dtype),
            region_locations=images["region_locations"][i : i + 1],
            region_attention_mask=images["region_attention_mask"][i : i + 1],
        )

    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16),
    ):
        score(*pairs[0])  # warm-up
        _sync(device)
        began = time.perf_counter()
        for c, i in pairs:
            score(c, i).float().cpu()  # a per-pair evaluator reads each score back
        _sync(device)
    return len(pairs) / (time.perf_counter() - began)


def time_embeddings(model, inputs: RetrievalInputs, args, device) -> tuple[float, float]:
    """Texts per second and images per second of the unimodal embedding passes (the first stage)."""
    kwargs = {"batch_size": args.batch_size, "bf16": args.bf16, "device": device}
    embed_texts(model, {k: v[:2] for k, v in inputs.text.items()}, **kwargs)  # warm-up
    embed_images(model, {k: v[:1] for k, v in inputs.images.items()}, **kwargs)
    _sync(device)
    began = time.perf_counter()
    embed_texts(model, inputs.text, **kwargs)
    _sync(device)
    texts = inputs.num_captions / (time.perf_counter() - began)
    began = time.perf_counter()
    embed_images(model, inputs.images, **kwargs)
    _sync(device)
    images = inputs.num_images / (time.perf_counter() - began)
    return texts, images


# Test splits of the paper's protocols: (images, captions).
PROTOCOL_SIZES = {"Flickr30k 1k": (1000, 5000), "MSCOCO 5k": (5000, 25000)}


def project_costs(
    pairs_per_s: float, texts_per_s: float, images_per_s: float, ks: list[int]
) -> list[dict[str, object]]:
    """Projected wall time of full ranking and of two-stage at each K, for Flickr30k 1k and MSCOCO 5k.

    Two-stage counts C + I embedding passes and (C + I) x K cross-encoder pairs (the union of both directions'
    top-K, at most that many; the similarity matrix and top-K are negligible beside the passes)."""
    rows = []
    for name, (images, captions) in PROTOCOL_SIZES.items():
        full = captions * images
        rows.append({"split": name, "method": "full ranking", "pairs": full, "seconds": full / pairs_per_s})
        embed_seconds = captions / texts_per_s + images / images_per_s
        for k in ks:
            pairs = min((captions + images) * k, full)
            rows.append(
                {
                    "split": name,
                    "method": f"two-stage K={k}",
                    "pairs": pairs,
                    "seconds": embed_seconds + pairs / pairs_per_s,
                }
            )
    return rows


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def append_projection(
    args, device, texts_per_s: float, images_per_s: float, pairs_per_s: float, rows
) -> None:
    """Append the projected costs under their own section of benchmarks/RESULTS.md."""
    marker = "## Two-stage retrieval: projected cost (`bench_retrieval_scoring.py`)"
    header = (
        "| date | commit | machine | device | size | dtype | texts/s | images/s | pairs/s | split | method | "
        "cross-encoder pairs | projected time | vs full |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else ""
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as f:
        if marker not in text:
            f.write(f"\n{marker}\n\n{header}")
        full = {row["split"]: row["seconds"] for row in rows if row["method"] == "full ranking"}
        for row in rows:
            f.write(
                f"| {date} | {_git_commit()} | {_machine(device)} | {device.type} | {args.size} | "
                f"{'bf16' if args.bf16 else 'fp32'} | {texts_per_s:.1f} | {images_per_s:.1f} | {pairs_per_s:.1f} | "
                f"{row['split']} | {row['method']} | {row['pairs']:,} | {_duration(row['seconds'])} | "
                f"{full[row['split']] / row['seconds']:.1f}x |\n"
            )


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def append_results(args, device, batched: float, single: float) -> None:
    """Append one row under this script's section of benchmarks/RESULTS.md (rows of other scripts are kept)."""
    marker = "## Retrieval pair scoring (`bench_retrieval_scoring.py`)"
    header = (
        "| date | commit | machine | device | size | images x captions | text+regions | batch | dtype | "
        "batched pairs/s | one-by-one pairs/s | ratio |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else ""
    with RESULTS.open("a") as f:
        if not text.strip():
            f.write("# Benchmark results\n\nRows are appended by the scripts in `benchmarks/`.\n\n")
        if marker not in text:
            f.write(f"\n{marker}\n\n{header}")
        date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        f.write(
            f"| {date} | {_git_commit()} | {_machine(device)} | {device.type} | {args.size} | "
            f"{args.num_images} x {args.num_images * args.captions_per_image} | {args.text_length}+{args.regions} | "
            f"{args.batch_size} | {'bf16' if args.bf16 else 'fp32'} | {batched:.1f} | {single:.1f} | "
            f"{batched / single:.1f}x |\n"
        )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument(
        "--feature-dim", type=int, default=None, help="default: the config's visual_feature_dim"
    )
    parser.add_argument("--batch-size", type=int, default=40)
    parser.add_argument("--one-by-one-pairs", type=int, default=20, help="pairs timed one by one")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--candidates",
        default="16,128",
        help="comma-separated K of the two-stage projection (16: >= 50x fewer pairs; 128: ALBEF/BLIP's Flickr30k)",
    )
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    args.bf16 = args.dtype == "bf16"

    config = SIZES[args.size]()
    config.max_regions = max(config.max_regions, args.regions)
    args.feature_dim = args.feature_dim or config.visual_feature_dim
    config.visual_feature_dim = args.feature_dim
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ImageBertForRetrieval(config).to(device).eval()
    inputs = synthetic_inputs(args, config)

    batched = time_batched(model, inputs, args, device)
    single = time_one_by_one(model, inputs, args, device)
    print(
        f"{args.size} ({config.num_hidden_layers} layers x {config.hidden_size}), {args.text_length} tokens + "
        f"{args.regions} regions x {args.feature_dim}, {args.dtype} on {device.type}:\n"
        f"  batched evaluator ({args.num_images} images x {inputs.num_captions} captions, batch "
        f"{args.batch_size}): {batched:.1f} pairs/s\n"
        f"  one pair at a time ({min(args.one_by_one_pairs, inputs.num_captions * inputs.num_images)} pairs): "
        f"{single:.1f} pairs/s\n"
        f"  ratio: {batched / single:.1f}x"
    )
    texts_per_s, images_per_s = time_embeddings(model, inputs, args, device)
    ks = [int(k) for k in args.candidates.split(",") if k.strip()]
    projection = project_costs(batched, texts_per_s, images_per_s, ks)
    full = {row["split"]: row["seconds"] for row in projection if row["method"] == "full ranking"}
    print(f"  embeddings: {texts_per_s:.1f} texts/s, {images_per_s:.1f} images/s")
    print("  projected cost on this machine:")
    for row in projection:
        print(
            f"    {row['split']:13s} {row['method']:18s} {row['pairs']:>12,} pairs  {_duration(row['seconds']):>9s}  "
            f"({full[row['split']] / row['seconds']:.1f}x faster than full)"
        )
    if not args.no_record:
        append_results(args, device, batched, single)
        append_projection(args, device, texts_per_s, images_per_s, batched, projection)
        print(f"appended rows to {RESULTS}")
    return {
        "batched_pairs_per_s": batched,
        "one_by_one_pairs_per_s": single,
        "ratio": batched / single,
        "texts_per_s": texts_per_s,
        "images_per_s": images_per_s,
        "projection": projection,
    }


if __name__ == "__main__":
    main()
