#!/usr/bin/env python
"""Is the demo's zero-shot result a property of the recipe? Runs the demo over seeds and CPU thread counts.

    python benchmarks/sweep_demo.py                                  # default seed + seeds 1-10, 1 and 2 threads
    python benchmarks/sweep_demo.py --seeds 42 1 2 --threads 1 --jobs 2
    python benchmarks/sweep_demo.py --set stages.1.max_steps=400     # a candidate recipe change

Each run is `python examples/run_pretrain.py --seed S --num_threads T --output_dir <work>/seed-S-threads-T
--no_progress --save_steps 0` (no intermediate checkpoints: they cost disk, not results) plus the `--set` overrides.
A different thread count sums the matmuls in another order, which stands in for another machine's kernels.
`--jobs N` runs N single-thread runs at once (2-thread runs always run alone).

Prints, and writes to `<work>/sweep.json` and `<work>/sweep.md`: per seed and thread count, zero-shot image- and
sentence-retrieval R@1, the optimiser step (across both stages) where the ITM loss first fell below 0.5 (the
"take-off") and the wall time; then the range over the runs, how many reach `--target` R@1 in both directions, and
the largest difference between the thread counts of one seed. Exit status 1 when a run fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_R1, TEXT_R1 = "image_retrieval/R@1", "text_retrieval/R@1"


def takeoff_step(history: list[dict], threshold: float = 0.5) -> int | None:
    """The first global optimiser step whose logged ITM loss is below `threshold` (None: never)."""
    for record in history:
        if record["task"] == "itm" and record["loss"] < threshold:
            return int(record["global_step"])
    return None


def run_one(seed: int, threads: int, work: Path, overrides: list[str], recipe: str | None) -> dict:
    """One demo run; returns its row (seed, threads, R@1 both ways, take-off step, seconds) or raises."""
    out = work / f"seed-{seed}-threads-{threads}"
    command = [
        sys.executable, str(REPO / "examples" / "run_pretrain.py"), "--seed", str(seed), "--num_threads", str(threads),
        "--output_dir", str(out), "--no_progress", "--save_steps", "0",
    ]  # fmt: skip
    if recipe:
        command += ["--recipe", recipe]
    if out.exists():
        command.append("--overwrite_output_dir")
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    log = work / f"seed-{seed}-threads-{threads}.log"
    with log.open("w") as stream:  # streamed, so a long run can be watched
        done = subprocess.run(command, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed} threads {threads}: exit {done.returncode}; see {log}")
    results = json.loads((out / "pretrain_results.json").read_text())
    metrics = results["zero_shot_retrieval"]
    return {
        "seed": seed,
        "threads": threads,
        "image_r1": round(float(metrics[IMAGE_R1]), 1),
        "text_r1": round(float(metrics[TEXT_R1]), 1),
        "rsum": round(float(metrics["rsum"]), 1),
        "takeoff_step": takeoff_step(results["loss_history"]),
        "final_losses": results["final_losses"],
        "seconds": round(seconds, 1),
    }


def summarise(rows: list[dict], target: float) -> dict:
    """Range of R@1 both ways, runs reaching `target` both ways, the largest thread-count gap of one seed."""
    by_seed: dict[int, list[dict]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], []).append(row)
    gaps = [
        max(max(r[key] for r in group) - min(r[key] for r in group) for key in ("image_r1", "text_r1"))
        for group in by_seed.values()
        if len(group) > 1
    ]
    return {
        "runs": len(rows),
        "image_r1_range": [min(r["image_r1"] for r in rows), max(r["image_r1"] for r in rows)],
        "text_r1_range": [min(r["text_r1"] for r in rows), max(r["text_r1"] for r in rows)],
        "runs_at_target": sum(r["image_r1"] >= target and r["text_r1"] >= target for r in rows),
        "target": target,
        "max_thread_gap": round(max(gaps), 1) if gaps else None,
        "max_seconds": max(r["seconds"] for r in rows),
    }


def markdown(rows: list[dict], summary: dict) -> str:
    lines = [
        "| seed | threads | image R@1 | sentence R@1 | ITM take-off step | seconds |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"] != 42, r["seed"], r["threads"])):
        takeoff = "never" if r["takeoff_step"] is None else r["takeoff_step"]
        lines.append(
            f"| {r['seed']} | {r['threads']} | {r['image_r1']:.1f} | {r['text_r1']:.1f} | {takeoff} | "
            f"{r['seconds']:.0f} |"
        )
    s = summary
    lines.append("")
    lines.append(
        f"{s['runs']} runs: image R@1 {s['image_r1_range'][0]:.1f}-{s['image_r1_range'][1]:.1f}, sentence R@1 "
        f"{s['text_r1_range'][0]:.1f}-{s['text_r1_range'][1]:.1f}; {s['runs_at_target']}/{s['runs']} reach "
        f"{s['target']:.0f} both ways; largest gap between thread counts of one seed: {s['max_thread_gap']} points; "
        f"slowest run {s['max_seconds']:.0f} s."
    )
    return "\n".join(lines) + "\n"


def environment() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return {
        "commit": commit.stdout.strip(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[42, *range(1, 11)], help="(default: %(default)s)"
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="(default: %(default)s)")
    parser.add_argument(
        "--jobs", type=int, default=1, help="single-thread runs at once (default: %(default)s)"
    )
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", help="another recipe than the demo")
    parser.add_argument("--target", type=float, default=60.0, help="R@1 both ways (default: %(default)s)")
    parser.add_argument(
        "--work_dir", default=str(REPO / "outputs" / "demo-sweep"), help="run folders (default: %(default)s)"
    )
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar="SWEEP_JSON",
        help="run nothing: merge the rows of these sweep.json files (sweeps run in parts) into one table",
    )
    args = parser.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    rows: list[dict] = []
    if args.combine:
        for path in args.combine:
            rows.extend(json.loads(Path(path).read_text())["rows"])

    def save() -> str:
        summary = summarise(rows, args.target)
        report = {"environment": environment(), "overrides": args.overrides, "rows": rows, "summary": summary}
        (work / "sweep.json").write_text(json.dumps(report, indent=2) + "\n")
        text = markdown(rows, summary)
        (work / "sweep.md").write_text(text)
        return text

    def record(row: dict) -> None:
        rows.append(row)
        save()  # after every run, so a sweep cut short still has its table
        print(
            f"seed {row['seed']} threads {row['threads']}: image R@1 {row['image_r1']:.1f}, sentence R@1 "
            f"{row['text_r1']:.1f}, take-off {row['takeoff_step']}, {row['seconds']:.0f} s",
            flush=True,
        )

    single = [] if args.combine else [(s, t) for s in args.seeds for t in args.threads if t == 1]
    multi = [] if args.combine else [(s, t) for s in args.seeds for t in args.threads if t != 1]
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for row in pool.map(lambda st: run_one(*st, work, args.overrides, args.recipe), single):
            record(row)
    for seed, threads in multi:
        record(run_one(seed, threads, work, args.overrides, args.recipe))

    text = save()
    print(json.dumps(environment()))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
