#!/usr/bin/env python
"""The paper's ablations in miniature: runs the toy twins of configuration/pretraining/ablations/ over seeds.

    python benchmarks/run_ablations.py                                   # every toy ablation, seeds 1 2 3
    python benchmarks/run_ablations.py --only table3-cc table3-lait-then-cc-sbu --seeds 1 2
    python benchmarks/run_ablations.py --set training.num_threads=1     # a recipe override for every run
    python benchmarks/run_ablations.py --finetune                        # also fine-tuned retrieval (run_retrieval --toy)

Each run is `python examples/run_pretrain.py --recipe configuration/pretraining/ablations/toy/<name>.yaml --seed S
--output_dir <work>/<name>/seed-S/pretrain --no_progress --save_steps 0`; its zero-shot retrieval comes from the
recipe's evaluation section (the toy world's held-out test split, ranked by the ITM score). With `--finetune`, the
final model is then fine-tuned with `python examples/run_retrieval.py --toy ... --do_full_ranking` and ranked on
the same test split.

Resumable: a run whose results file exists is not run again; one that left a folder without results (killed) is
continued with `--resume_from_checkpoint latest`. Not part of CI: the full suite is 15 recipes x seeds x 1-3 min.

Prints, and writes to `<work>/ablations.md`, `<work>/ablations.json` and `<work>/ablations.png` (matplotlib; skipped
with a message when missing): one table per part of the paper (Table 3, Table 4 parts 1-3, the image-introduction
schedules), laid out as the paper's (image retrieval R@1/5/10, sentence retrieval R@1/5/10), mean ± spread (sample
standard deviation) over the seeds, the mean wall time per run (pre-training, and fine-tuning when run), and the
paper's R@1 beside ours; when the recipe's evaluation ran two-stage retrieval, also the zero-shot R@1 of its ITC
embeddings alone (stage 1), a steadier reading than the ITM head's on 25 images. Fine-tunes left by an earlier
`--finetune` call are read and tabulated without the flag (a row fine-tuned on fewer seeds than it was pre-trained
on says so: "(n=1)"), so the zero-shot suite and `--only ... --finetune` for some rows make one table.
Exit status 1 when a run fails (the others still run; the failure is listed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOY_DIR = REPO / "configuration" / "pretraining" / "ablations" / "toy"
DIRECTIONS = (
    "image_retrieval",
    "text_retrieval",
)  # paper: "Image Retrieval" (caption -> image), "Sentence Retrieval"
KS = (1, 5, 10)

# Part of the paper, row label, paper (image R@1/5/10, sentence R@1/5/10) or None when no number is printed.
ROWS: dict[str, tuple[str, str, tuple[float, ...] | None]] = {
    "table3-lait": ("Table 3 (zero-shot)", "LAIT", (21.4, 46.0, 59.1, 31.6, 58.4, 72.0)),
    "table3-cc": ("Table 3 (zero-shot)", "CC", (33.0, 60.6, 72.5, 43.8, 73.7, 81.7)),
    "table3-sbu": ("Table 3 (zero-shot)", "SBU", None),
    "table3-cc-sbu": ("Table 3 (zero-shot)", "CC+SBU", (48.4, 76.0, 85.2, 64.3, 85.8, 92.3)),
    "table3-lait-cc-sbu-mixed": ("Table 3 (zero-shot)", "LAIT+CC+SBU", (46.4, 73.7, 83.4, 63.4, 86.8, 92.2)),
    "table3-lait-then-cc-sbu": ("Table 3 (zero-shot)", "LAIT → (CC+SBU)", (54.3, 79.6, 87.5, 70.7, 90.2, 94.0)),
    "table4-cc-sbu-global-feature": (
        "Table 4 part 1 (zero-shot; baseline: Table 3 CC+SBU)", "CC+SBU (w global feature)",
        (49.2, 75.9, 84.9, 64.0, 87.4, 92.4),
    ),
    "table4-cc-no-mrfr": ("Table 4 part 2 (zero-shot)", "CC", (33.0, 60.6, 72.5, 43.8, 73.7, 81.7)),
    "table4-cc-mrfr": ("Table 4 part 2 (zero-shot)", "CC (w MRFR loss)", (34.7, 61.7, 73.4, 45.3, 73.8, 84.2)),
    "table4-roi-36": ("Table 4 part 3 (paper: fine-tuned)", "RoI(36) [toy: 4]", (68.7, 88.6, 92.3, 84.3, 96.5, 97.9)),
    "table4-roi-100": (
        "Table 4 part 3 (paper: fine-tuned)", "RoI(100) [toy: 12]", (73.0, 92.2, 95.8, 87.3, 98.0, 99.5)
    ),
    "images-at-0": ("Image introduction (Keh et al. 2025)", "images from 0%", None),
    "images-at-50": ("Image introduction (Keh et al. 2025)", "images at 50%", None),
    "images-at-80": ("Image introduction (Keh et al. 2025)", "images at 80%", None),
    "images-after-text": ("Image introduction (Keh et al. 2025)", "images after full text", None),
}  # fmt: skip
# The toy global feature is a column the pre-training recipe reads; run_retrieval --toy makes no such column.
NO_FINETUNE = {"table4-cc-sbu-global-feature": "run_retrieval --toy has no global-feature column"}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run(command: list[str], log: Path) -> None:
    """Runs `command` from the repository root, streaming its output to `log`; raises RuntimeError on failure."""
    with log.open("a") as stream:
        done = subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"exit status {done.returncode}: {' '.join(command)} (log: {log})")


def _recalls(metrics: dict) -> list[float]:
    """[image R@1, R@5, R@10, sentence R@1, R@5, R@10] (percent) from a metrics dict keyed `direction/R@k`."""
    return [float(metrics[f"{direction}/R@{k}"]) for direction in DIRECTIONS for k in KS]


def run_one(
    name: str,
    seed: int,
    work: Path,
    finetune: bool,
    threads: int | None,
    overrides: list[str] | None = None,
    finetune_args: list[str] | None = None,
) -> dict:
    """Pre-trains (and optionally fine-tunes) one toy ablation for one seed, or reads the results a previous call
    left. Returns {"zero_shot": [6 recalls], "fine_tuned": [6] or None, "wall_seconds": float (pre-training),
    "finetune_seconds": float or None}."""
    run_dir = work / name / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    pretrain, results_file = run_dir / "pretrain", run_dir / "pretrain" / "pretrain_results.json"
    log = run_dir / "run.log"
    if not results_file.is_file():
        command = [
            sys.executable, "examples/run_pretrain.py", "--recipe", str(TOY_DIR / f"{name}.yaml"), "--seed", str(seed),
            "--output_dir", str(pretrain), "--no_progress", "--save_steps", "0",
        ]  # fmt: skip
        if threads:
            command += ["--num_threads", str(threads)]
        for override in overrides or []:
            command += ["--set", override]
        if pretrain.exists():  # a killed run: continue it (or start over when it saved nothing)
            command += ["--resume_from_checkpoint", "latest"]
        _run(command, log)
    results = json.loads(results_file.read_text())
    if "zero_shot_retrieval" not in results:
        raise RuntimeError(
            f"{results_file}: no zero_shot_retrieval (did the recipe lose its evaluation section?)"
        )
    row = {"zero_shot": _recalls(results["zero_shot_retrieval"]), "fine_tuned": None,
           "wall_seconds": float(results["wall_seconds"]), "finetune_seconds": None}  # fmt: skip
    # Stage 1 of the recipe's two-stage check (the ITC embeddings alone, over every pair), when it ran.
    stage1 = (results.get("zero_shot_two_stage") or {}).get("metrics", {}).get("stage1")
    row["itc"] = _recalls(stage1) if stage1 else None
    finetuned_dir, finetuned_file = run_dir / "finetune", run_dir / "finetune" / "run_retrieval_results.json"
    # A fine-tune left by an earlier `--finetune` call is read without the flag, so one table holds every result.
    if (finetune and name not in NO_FINETUNE) or finetuned_file.is_file():
        if not finetuned_file.is_file():
            started = time.perf_counter()
            _run([sys.executable, "examples/run_retrieval.py", "--toy", "--model_name_or_path", str(pretrain / "final"),
                  "--toy_eval_split", "test", "--do_train", "--do_eval", "--do_full_ranking", "--seed", str(seed),
                  "--output_dir", str(finetuned_dir), "--disable_tqdm", "true",
                  "--save_strategy", "no", "--report_to", "none", *(finetune_args or [])], log)  # fmt: skip
            _write_atomic(run_dir / "finetune_seconds.txt", f"{time.perf_counter() - started:.1f}\n")
        row["fine_tuned"] = _recalls(json.loads(finetuned_file.read_text())["full_ranking"])
        seconds_file = run_dir / "finetune_seconds.txt"
        row["finetune_seconds"] = float(seconds_file.read_text()) if seconds_file.is_file() else None
    return row


def _mean_spread(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def summarise(runs: dict[str, dict[int, dict]], finetune: bool) -> tuple[str, dict]:
    """Markdown tables (one per part of the paper) and a JSON-able summary from {name: {seed: row}}."""
    summary, parts = {}, {}
    for name, per_seed in runs.items():
        if not per_seed:
            continue
        rows = list(per_seed.values())
        entry = {
            "seeds": sorted(per_seed),
            "zero_shot_mean": [statistics.mean(r["zero_shot"][i] for r in rows) for i in range(6)],
            "zero_shot": [_mean_spread([r["zero_shot"][i] for r in rows]) for i in range(6)],
            "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in rows),
            "paper": ROWS[name][2],
            "per_seed": {str(seed): row for seed, row in per_seed.items()},
        }
        tuned = [r for r in rows if r.get("fine_tuned") is not None]
        if tuned:
            # Fewer fine-tuned seeds than pre-trained ones is said in every cell, never averaged away.
            few = f" (n={len(tuned)})" if len(tuned) < len(rows) else ""
            entry["fine_tuned"] = [_mean_spread([r["fine_tuned"][i] for r in tuned]) + few for i in range(6)]
            entry["fine_tuned_seeds"] = sorted(seed for seed, r in per_seed.items() if r.get("fine_tuned"))
            times = [r["finetune_seconds"] for r in tuned if r.get("finetune_seconds") is not None]
            entry["finetune_seconds_mean"] = statistics.mean(times) if times else None
        itc = [r["itc"] for r in rows if r.get("itc") is not None]
        if len(itc) == len(rows):
            entry["itc"] = [_mean_spread([values[i] for values in itc]) for i in range(6)]
        summary[name] = entry
        parts.setdefault(ROWS[name][0], []).append(name)
    with_itc = any("itc" in entry for entry in summary.values())
    lines = []
    for part, names in parts.items():
        # Fine-tuned columns in a part where a row was fine-tuned (every part with --finetune).
        tuned = finetune or any("fine_tuned" in summary[name] for name in names)
        header = ["Version", "IR R@1", "IR R@5", "IR R@10", "SR R@1", "SR R@5", "SR R@10"]
        if tuned:
            header += ["FT IR R@1", "FT IR R@5", "FT IR R@10", "FT SR R@1", "FT SR R@5", "FT SR R@10"]
        if with_itc:
            header += ["ITC IR R@1", "ITC SR R@1"]
        header += (
            ["pre-train s / run"]
            + (["fine-tune s / run"] if tuned else [])
            + ["paper IR R@1", "paper SR R@1"]
        )
        lines += [f"### {part}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for name in names:
            entry, paper = summary[name], ROWS[name][2]
            cells = [ROWS[name][1], *entry["zero_shot"]]
            if tuned:
                cells += entry.get("fine_tuned", [NO_FINETUNE.get(name, "not run")] + [""] * 5)
            if with_itc:
                cells += [entry["itc"][0], entry["itc"][3]] if "itc" in entry else ["—", "—"]
            cells.append(f"{entry['wall_seconds_mean']:.0f}")
            if tuned:
                seconds = entry.get("finetune_seconds_mean")
                cells.append("—" if seconds is None else f"{seconds:.0f}")
            cells += ["—", "—"] if paper is None else [paper[0], paper[3]]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
        lines.append("")
    seeds = sorted({seed for per_seed in runs.values() for seed in per_seed})
    lines.append(
        f"Toy world, mean ± sample standard deviation over seeds {seeds}; IR = image retrieval (caption → "
        "image), SR = sentence retrieval (image → caption), zero-shot unless marked FT (fine-tuned), ranked by the "
        "ITM score (the paper's); ITC = the same model's contrastive embeddings alone (stage 1 of its two-stage "
        "check), not a paper column."
    )
    return "\n".join(lines) + "\n", summary


def plot(summary: dict, path: Path) -> None:
    """Bar chart of zero-shot R@1 both ways per ablation (mean, error bar = spread) at `path`, written atomically."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no bar chart (pip install matplotlib)")
        return
    names = list(summary)
    fig, ax = plt.subplots(figsize=(max(6, len(names) * 0.8), 4))
    for offset, (index, label) in zip(
        (-0.2, 0.2), ((0, "image retrieval R@1"), (3, "sentence retrieval R@1")), strict=True
    ):
        means = [summary[n]["zero_shot_mean"][index] for n in names]
        spreads = [
            statistics.stdev(r["zero_shot"][index] for r in summary[n]["per_seed"].values())
            if len(summary[n]["per_seed"]) > 1
            else 0.0
            for n in names
        ]
        ax.bar(
            [i + offset for i in range(len(names))], means, width=0.4, yerr=spreads, label=label, capsize=3
        )
    ax.set_xticks(range(len(names)), [ROWS[n][1] for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("zero-shot R@1 (%)")
    ax.set_title("ImageBERT ablations on the toy world")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Runs the suite; returns the exit status (1 when a run failed)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument(
        "--only", nargs="+", choices=sorted(ROWS), metavar="NAME", help=f"from {sorted(ROWS)}"
    )
    parser.add_argument("--work_dir", type=Path, default=REPO / "outputs" / "ablations-toy")
    parser.add_argument(
        "--finetune", action="store_true", help="also fine-tune each model (run_retrieval --toy)"
    )
    parser.add_argument(
        "--num_threads", type=int, default=None, help="torch threads per run (default: the recipe's)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, every run"
    )
    parser.add_argument(
        "--finetune_arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra run_retrieval argument (repeat)",
    )
    args = parser.parse_args(argv)
    missing = sorted(set(ROWS) - {p.stem for p in TOY_DIR.glob("*.yaml")})
    if missing:
        print(f"error: {TOY_DIR}: no toy recipe for {missing}", file=sys.stderr)
        return 2
    args.work_dir.mkdir(parents=True, exist_ok=True)
    names = args.only or list(ROWS)
    runs: dict[str, dict[int, dict]] = {name: {} for name in names}
    failures = []
    for name in names:
        for seed in args.seeds:
            print(f"{name} seed {seed} ...", flush=True)
            try:
                runs[name][seed] = run_one(
                    name, seed, args.work_dir, args.finetune, args.num_threads, args.set, args.finetune_arg
                )
            except (RuntimeError, KeyError, json.JSONDecodeError) as error:
                failures.append(f"{name} seed {seed}: {error}")
                print(f"  failed: {error}", flush=True)
    table, summary = summarise(runs, args.finetune)
    print(table)
    _write_atomic(args.work_dir / "ablations.md", table)
    _write_atomic(
        args.work_dir / "ablations.json", json.dumps({"summary": summary, "failures": failures}, indent=2)
    )
    if summary:
        plot(summary, args.work_dir / "ablations.png")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    print(f"wrote {args.work_dir}/ablations.md, .json and .png")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
