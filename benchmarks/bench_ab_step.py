"""A/B of ImageBERT's pre-training step between two checkouts, in one run: is a change slower?

    python benchmarks/bench_ab_step.py --a /path/to/main --b .               # base size, batch 8, fp32
    python benchmarks/bench_ab_step.py --a ../old --b . --size tiny --rounds 20

Each checkout runs in its own worker process (its `modeling_imagebert` first on the path), built from the same config
and fed the same batch (`bench_pretrain_step.make_batch` of this checkout: the paper's masking rates, half the pairs
negatives) with the heads' positions computed by that checkout's collator helper when it has one. The parent asks the
workers for one step each in turn, `--rounds` times after `--warmup` steps each, so that a change of load on a shared
machine hits both alike, and prints the median seconds per step, samples/s and the ratio B/A (> 1: B is faster). A
markdown row is appended to `benchmarks/RESULTS.md` unless `--no-record`.

One step is `zero_grad(set_to_none=True)`, forward (all the model's pre-training losses) and backward, as in
`bench_pretrain_step.py`. Two workers at once would share the cores; they never run at the same time here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKER = r"""
import json, sys, time
import torch
sys.path.insert(0, {checkout!r})
import modeling_imagebert  # this checkout's, imported before `build_imagebert` puts the bench's checkout on the path
sys.path.insert(1, {bench!r})
from bench_pretrain_step import SIZES, build_imagebert, make_batch, make_step
args = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(args["threads"])
size = SIZES[args["size"]]
model, inputs = build_imagebert(size, args["feature_dim"], args["regions"], args["text_length"])
batch = make_batch(args["batch_size"], args["text_length"], args["regions"], args["feature_dim"],
                   model.config.vocab_size)
step = make_step(model.train(), inputs(batch), "cpu", args["dtype"])
print(json.dumps({{"ready": modeling_imagebert.__file__}}), flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    step()
    print(json.dumps({{"seconds": time.perf_counter() - start}}), flush=True)
"""


def start_worker(checkout: Path, settings: dict) -> subprocess.Popen:
    """A worker importing `modeling_imagebert` from `checkout` (never this process's copy)."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "HF_HUB_OFFLINE": "1"}
    code = WORKER.format(bench=str(HERE), checkout=str(checkout))
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(settings)],
        cwd=str(checkout),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def ask(worker: subprocess.Popen) -> dict:
    worker.stdin.write("step\n")
    worker.stdin.flush()
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"a worker stopped (exit {worker.wait()}); run it alone to see its error")
    return json.loads(line)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", type=Path, required=True, help="checkout A (the baseline), a folder")
    parser.add_argument(
        "--b", type=Path, default=HERE.parent, help="checkout B (the change); default: this one"
    )
    parser.add_argument("--size", default="base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--regions", type=int, default=100)
    parser.add_argument("--text-length", type=int, default=40)
    parser.add_argument("--feature-dim", type=int, default=2048)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    for name in ("a", "b"):
        folder = getattr(args, name).resolve()
        if not (folder / "modeling_imagebert" / "__init__.py").is_file():
            parser.error(f"--{name} {folder}: not a checkout (no modeling_imagebert/__init__.py there)")
        setattr(args, name, folder)
    settings = {
        key: getattr(args, key)
        for key in ("size", "batch_size", "regions", "text_length", "feature_dim", "dtype", "threads")
    }
    workers = {name: start_worker(getattr(args, name), settings) for name in ("a", "b")}
    try:
        for name, worker in workers.items():
            ready = json.loads(worker.stdout.readline() or "{}")
            if "ready" not in ready:
                raise RuntimeError(f"worker {name} failed to start (exit {worker.wait()})")
            print(f"{name}: {ready['ready']}")
        for _ in range(args.warmup):
            for worker in workers.values():
                ask(worker)
        times = {name: [] for name in workers}
        for _ in range(args.rounds):
            for name, worker in workers.items():
                times[name].append(ask(worker)["seconds"])
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["a"] / median["b"]
    for name in workers:
        print(
            f"{name}: {median[name] * 1000:.1f} ms/step median of {args.rounds} "
            f"({args.batch_size / median[name]:.2f} samples/s)"
        )
    print(f"B/A speed: {ratio:.3f} (> 1: B is faster)")
    if not args.no_record:
        commit = {name: _commit(getattr(args, name)) for name in workers}
        row = (
            f"| {datetime.date.today()} | A/B step | {args.size} b{args.batch_size} {args.dtype} "
            f"| A {commit['a']} {median['a'] * 1000:.1f} ms | B {commit['b']} {median['b'] * 1000:.1f} ms "
            f"| B/A {ratio:.3f} | load {os.getloadavg()[0]:.1f} |"
        )
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as results:
            results.write(row + "\n")
    return {"a": median["a"], "b": median["b"], "ratio": ratio}


def _commit(folder: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


if __name__ == "__main__":
    main()
