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
sentence-retrieval R@1 ranked by the recipe's final score and by the ITM score alone, the optimiser step (across
both stages) where the ITM loss first fell below 0.5 (the "take-off") and the wall time; then, for both scores, the
range over the runs, how many reach `--target` R@1 in both directions, the largest difference between the thread
counts of one seed and how many seeds stay within `--max_gap`. Exit status 1 when a run fails.
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
    metrics = results["zero_shot_retrieval"]  # ranked by the recipe's final score
    itm = results.get("zero_shot_retrieval_itm", metrics)  # ranked by the ITM score alone (the paper's)
    return {
        "seed": seed,
        "threads": threads,
        "final_score": results.get("zero_shot_final_score", "itm"),
        "image_r1": round(float(metrics[IMAGE_R1]), 1),
        "text_r1": round(float(metrics[TEXT_R1]), 1),
        "rsum": round(float(metrics["rsum"]), 1),
        "image_r1_itm": round(float(itm[IMAGE_R1]), 1),
        "text_r1_itm": round(float(itm[TEXT_R1]), 1),
        "takeoff_step": takeoff_step(results["loss_history"]),
        "final_losses": results["final_losses"],
        "seconds": round(seconds, 1),
    }


def _gaps(rows: list[dict], keys: tuple[str, str]) -> dict[int, float]:
    """Per seed run at more than one thread count: the larger of the two directions' spread over thread counts."""
    by_seed: dict[int, list[dict]] = {}
    for row in rows:
        by_seed.setdefault(row["seed"], []).append(row)
    return {
        seed: round(max(max(r[key] for r in group) - min(r[key] for r in group) for key in keys), 1)
        for seed, group in by_seed.items()
        if len(group) > 1
    }


def _score_summary(rows: list[dict], keys: tuple[str, str], target: float, max_gap: float) -> dict:
    image, text = keys
    gaps = _gaps(rows, keys)
    return {
        "image_r1_range": [min(r[image] for r in rows), max(r[image] for r in rows)],
        "text_r1_range": [min(r[text] for r in rows), max(r[text] for r in rows)],
        "runs_at_target": sum(r[image] >= target and r[text] >= target for r in rows),
        "max_thread_gap": max(gaps.values()) if gaps else None,
        "seeds_within_gap": sum(gap <= max_gap for gap in gaps.values()),
        "seeds_compared": len(gaps),
    }


def summarise(rows: list[dict], target: float, max_gap: float = 5.0) -> dict:
    """Per score (the recipe's final score, and ITM alone): the range of R@1 both ways, the runs reaching `target`
    both ways, the largest gap between the thread counts of one seed and the seeds within `max_gap` points."""
    itm_keys = ("image_r1_itm", "text_r1_itm")
    # Rows of sweeps from before the ITM-only columns existed ranked by ITM alone.
    rows = [{**r, **{k: r.get(k, r[k.removesuffix("_itm")]) for k in itm_keys}} for r in rows]
    return {
        "runs": len(rows),
        "target": target,
        "max_gap": max_gap,
        "final_score": sorted({r.get("final_score", "itm") for r in rows}),
        **_score_summary(rows, ("image_r1", "text_r1"), target, max_gap),
        "itm": _score_summary(rows, itm_keys, target, max_gap),
        "max_seconds": max(r["seconds"] for r in rows),
    }


def _summary_line(name: str, s: dict, runs: int, target: float, max_gap: float) -> str:
    return (
        f"{name}: image R@1 {s['image_r1_range'][0]:.1f}-{s['image_r1_range'][1]:.1f}, sentence R@1 "
        f"{s['text_r1_range'][0]:.1f}-{s['text_r1_range'][1]:.1f}; {s['runs_at_target']}/{runs} runs reach "
        f"{target:.0f} both ways; {s['seeds_within_gap']}/{s['seeds_compared']} seeds' thread counts within "
        f"{max_gap:g} points, the largest gap {s['max_thread_gap']} points."
    )


def markdown(rows: list[dict], summary: dict) -> str:
    final = " / ".join(summary["final_score"])
    lines = [
        f"| seed | threads | image R@1 ({final}) | sentence R@1 ({final}) | image R@1 (itm) | sentence R@1 (itm) "
        "| ITM take-off step | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seed"] != 42, r["seed"], r["threads"])):
        takeoff = "never" if r["takeoff_step"] is None else r["takeoff_step"]
        lines.append(
            f"| {r['seed']} | {r['threads']} | {r['image_r1']:.1f} | {r['text_r1']:.1f} | "
            f"{r.get('image_r1_itm', r['image_r1']):.1f} | {r.get('text_r1_itm', r['text_r1']):.1f} | {takeoff} | "
            f"{r['seconds']:.0f} |"
        )
    s = summary
    lines.append("")
    lines.append(
        _summary_line(f"{s['runs']} runs, ranked by {final}", s, s["runs"], s["target"], s["max_gap"])
    )
    lines.append(_summary_line("Ranked by ITM alone", s["itm"], s["runs"], s["target"], s["max_gap"]))
    lines.append(f"Slowest run {s['max_seconds']:.0f} s.")
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
        "--max_gap", type=float, default=5.0, help="R@1 points between thread counts (default: %(default)s)"
    )
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
        summary = summarise(rows, args.target, args.max_gap)
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
            f"{row['text_r1']:.1f} ({row['final_score']}; itm alone {row['image_r1_itm']:.1f} / "
            f"{row['text_r1_itm']:.1f}), take-off {row['takeoff_step']}, {row['seconds']:.0f} s",
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
