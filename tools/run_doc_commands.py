#!/usr/bin/env python
"""Run the shell commands of README.md and docs/*.md as written, from a fresh clone, and report each one.

    python tools/run_doc_commands.py --list                      # every command, numbered, with its markers
    python tools/run_doc_commands.py --skip-slow                 # the quick ones, in a fresh clone of HEAD
    python tools/run_doc_commands.py --only docs/evaluation.md --workdir ../my-checkout --have demo

Commands are the ```bash blocks of README.md, then docs/pretraining.md, docs/finetuning.md, docs/evaluation.md and
the other docs/*.md alphabetically (the order a reader follows; a command that needs what a later one provides
waits for it). A line ending in `\\` continues on the next one. Comment lines mark the command that follows them (a
trailing comment marks its own line's command):

    # needs: flickr30k, gpu       skipped unless each need is present: `gpu` when torch sees a GPU, `demo` (or
                                  any other name) once a command that `provides:` it passed, or given by --have
    # provides: demo              this command makes `demo` (the demo's outputs/imagebert-demo) for later ones;
                                  not run when --have names all it provides (an existing output is reused)
    # slow                        skipped with --skip-slow (minutes)

Commands that install packages (`make demo`, `make test`, `make install`, `pip install`) would repoint this
environment's editable install at the clone: they are skipped unless --allow-install. Each command runs with
`bash -c` in the work folder, PYTHONPATH set to it (the clone's package is imported, not an installed one) and
HF_HUB_OFFLINE=1, then prints PASS, FAIL (with the tail of its output) or SKIP (with the reason). The exit
status is 1 when a command failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The reading order: what the README points to first, and the demo's page before the pages that use its output.
FIRST_DOCS = ("README.md", "docs/pretraining.md", "docs/finetuning.md", "docs/evaluation.md")
_FENCE = re.compile(r"^```(\w*)\s*$")
_NEEDS = re.compile(r"#\s*needs:\s*([^#]+)", re.IGNORECASE)
_PROVIDES = re.compile(r"#\s*provides:\s*([^#]+)", re.IGNORECASE)
_SLOW = re.compile(r"#\s*slow\b", re.IGNORECASE)
# A bare shell assignment (`NAME=value`, `NAME=$(...)`): later commands of its block run after it, so they see it.
_ASSIGNMENT = re.compile(r"""^[A-Za-z_]\w*=(\$\(.*\)|"[^"]*"|'[^']*'|\S*)$""")
_INSTALLS = re.compile(r"^\s*(make(\s+\S+=\S+)*\s+(demo|test|install)\b|(python -m )?pip3? install\b)")


@dataclass
class DocCommand:
    """One command of a ```bash block: where it is, its text (continuation lines joined) and its markers."""

    file: str
    line: int
    text: str
    needs: list[str] = field(default_factory=list)
    provides: list[str] = field(default_factory=list)
    slow: bool = False
    # Bare assignments earlier in the same block, run first in the same shell.
    setup: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def installs(self) -> bool:
        return bool(_INSTALLS.match(self.text))


def _names(text: str) -> list[str]:
    """`flickr30k, gpu (and 40 GB)` -> ["flickr30k", "gpu"]: comma-separated names, parenthesised notes dropped."""
    text = re.sub(r"\([^)]*\)", "", text)
    return [name.strip().lower() for name in text.split(",") if name.strip()]


def _apply_markers(comment: str, needs: list[str], provides: list[str]) -> bool:
    """Adds the `needs:` / `provides:` names of `comment` to the lists; returns whether it says `slow`."""
    if match := _NEEDS.search(comment):
        needs += _names(match.group(1))
    if match := _PROVIDES.search(comment):
        provides += _names(match.group(1))
    return bool(_SLOW.search(comment))


def extract_commands(path: Path, name: str | None = None) -> list[DocCommand]:
    """The commands of the ```bash blocks of the Markdown file `path` (named `name` in reports), in order.

    Returns:
        One `DocCommand` per command: continuation lines (ending in `\\`) joined with their newlines kept, blank
        and comment-only lines dropped; marker comments on the lines before a command apply to it.
    """
    name = name or str(path)
    commands: list[DocCommand] = []
    in_bash = False
    pending_needs: list[str] = []
    pending_provides: list[str] = []
    pending_slow = False
    current: list[str] = []
    assignments: list[str] = []
    start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = _FENCE.match(line.strip())
        if fence:
            if in_bash and current:
                raise ValueError(
                    f"{name}:{start}: the command continues past the end of its block (trailing \\)"
                )
            in_bash = not in_bash and fence.group(1) in ("bash", "sh", "shell")
            assignments = []
            pending_needs, pending_provides, pending_slow = [], [], False
            continue
        if not in_bash:
            continue
        stripped = line.strip()
        if not current:
            if not stripped:
                continue
            if stripped.startswith("#"):
                pending_slow |= _apply_markers(stripped, pending_needs, pending_provides)
                continue
            start = number
        current.append(line)
        if stripped.endswith("\\"):
            continue
        needs, provides = list(pending_needs), list(pending_provides)
        slow = pending_slow
        # A trailing comment on the command's last line (`cmd   # needs: gpu`) marks it too.
        if "#" in stripped:
            slow |= _apply_markers(stripped[stripped.index("#") :], needs, provides)
        text = "\n".join(current)
        commands.append(DocCommand(name, start, text, needs, provides, slow, list(assignments)))
        if _ASSIGNMENT.match(text.strip()):
            assignments.append(text.strip())
        current, pending_needs, pending_provides, pending_slow = [], [], [], False
    if current:
        raise ValueError(f"{name}:{start}: the command continues past the end of the file (trailing \\)")
    return commands


def documentation_files(root: Path) -> list[str]:
    """README.md and docs/*.md of `root`, relative, in reading order (`FIRST_DOCS`, then the rest alphabetically)."""
    present = ["README.md"] if (root / "README.md").is_file() else []
    present += sorted(f"docs/{path.name}" for path in (root / "docs").glob("*.md"))
    first = [name for name in FIRST_DOCS if name in present]
    return first + [name for name in present if name not in first]


def all_commands(root: Path, only: list[str] | None = None) -> list[DocCommand]:
    """Every command of `root`'s documentation, in reading order; `only`: keep these files (relative paths)."""
    files = documentation_files(root)
    if only:
        wanted = [str(Path(name)) for name in only]
        unknown = sorted(set(wanted) - set(files))
        if unknown:
            raise SystemExit(f"error: --only {unknown[0]}: not one of the documentation files {files}")
        files = [name for name in files if name in wanted]
    return [command for name in files for command in extract_commands(root / name, name)]


def gpu_present() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def skip_reason(
    command: DocCommand,
    have: set[str],
    *,
    skip_slow: bool,
    allow_install: bool,
    provided_by: dict[str, str],
    given: frozenset[str] = frozenset(),
) -> str | None:
    """Why `command` is not run (None: run it). `have`: the needs present now; `provided_by`: need -> where a
    command that provides it is (to say which earlier command did not run); `given`: the needs --have declared
    present (a command that only provides those is not run again)."""
    if command.installs and not allow_install:
        return "installs packages into this environment (pass --allow-install)"
    if command.provides and set(command.provides) <= given:
        return f"provides {', '.join(command.provides)}, given by --have"
    missing = [need for need in command.needs if need not in have]
    if missing:
        details = [
            f"{need} (made by {provided_by[need]}, which did not pass in this run)"
            if need in provided_by
            else need
            for need in missing
        ]
        return "needs " + ", ".join(details)
    if skip_slow and command.slow:
        return "slow (--skip-slow)"
    return None


def fresh_clone(source: Path) -> Path:
    """A `git clone` of `source`'s committed HEAD in a new temporary folder (kept after the run for inspection)."""
    target = Path(tempfile.mkdtemp(prefix="doc-commands-")) / source.name
    subprocess.run(["git", "clone", "--quiet", str(source), str(target)], check=True)
    return target


def run_command(command: DocCommand, workdir: Path, timeout: float) -> tuple[bool, float, str]:
    """Runs `command` with bash in `workdir` (PYTHONPATH = workdir, HF_HUB_OFFLINE=1). Returns (passed, seconds,
    combined output)."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(workdir), os.environ.get("PYTHONPATH", "")]),
    )
    started = time.perf_counter()
    try:
        done = subprocess.run(
            ["bash", "-c", "\n".join([*command.setup, command.text])],
            cwd=workdir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as error:
        output = (
            error.stdout.decode(errors="replace") if isinstance(error.stdout, bytes) else error.stdout or ""
        )
        return False, time.perf_counter() - started, output + f"\n(timed out after {timeout:.0f} s)"
    return done.returncode == 0, time.perf_counter() - started, done.stdout


def _one_line(text: str) -> str:
    return " ".join(text.replace("\\\n", " ").split())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--list", action="store_true", help="list the commands and their markers, run nothing"
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="FILE", help="only this file (repeatable)"
    )
    parser.add_argument("--skip-slow", action="store_true", help="skip the commands marked `# slow`")
    parser.add_argument(
        "--have", action="append", default=[], metavar="NEED", help="treat this need as present (repeatable)"
    )
    parser.add_argument(
        "--allow-install", action="store_true", help="also run the commands that install packages"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="run in this checkout instead of a fresh clone of HEAD"
    )
    parser.add_argument(
        "--show-output",
        action="store_true",
        help="print every command's output, not only the tail of failures",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per command (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    root = args.workdir.resolve() if args.workdir is not None else REPO
    commands = all_commands(root, args.only)
    # What provides a need is looked up in every file, so a skipped --only file is still named as its source.
    provided_by = {need: command.where for command in all_commands(root) for need in command.provides}
    if args.list:
        for index, command in enumerate(commands, 1):
            markers = [f"needs: {', '.join(command.needs)}"] if command.needs else []
            markers += [f"provides: {', '.join(command.provides)}"] if command.provides else []
            markers += ["slow"] if command.slow else []
            markers += ["installs"] if command.installs else []
            suffix = f"  [{'; '.join(markers)}]" if markers else ""
            print(f"{index:3d}. {command.where}{suffix}\n     {_one_line(command.text)}")
        return 0

    workdir = root if args.workdir is not None else fresh_clone(REPO)
    print(f"work folder: {workdir}")
    given = frozenset(name.lower() for name in args.have)
    have = set(given) | ({"gpu"} if gpu_present() else set())
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    # A command whose need a later command provides (the README's use of a model the docs' commands train) waits
    # until that command has run: the queue keeps reading order otherwise.
    positions = {id(command): index for index, command in enumerate(commands, 1)}
    queue, waited = list(commands), set()
    while queue:
        command = queue.pop(0)
        index = positions[id(command)]
        pending = [provider for provider in queue if set(provider.provides) & (set(command.needs) - have)]
        if pending and id(command) not in waited:
            waited.add(id(command))
            queue.insert(queue.index(pending[-1]) + 1, command)
            continue
        head = f"{index:3d}. {command.where}: {_one_line(command.text)[:100]}"
        reason = skip_reason(
            command,
            have,
            skip_slow=args.skip_slow,
            allow_install=args.allow_install,
            provided_by=provided_by,
            given=given,
        )
        if reason is not None:
            counts["SKIP"] += 1
            print(f"SKIP {head}\n       {reason}", flush=True)
            continue
        passed, seconds, output = run_command(command, workdir, args.timeout)
        counts["PASS" if passed else "FAIL"] += 1
        print(f"{'PASS' if passed else 'FAIL'} {head}  ({seconds:.0f} s)", flush=True)
        if passed:
            have.update(command.provides)
        if args.show_output or not passed:
            tail = "\n".join(output.rstrip().splitlines()[None if args.show_output else -15 :])
            print("       | " + tail.replace("\n", "\n       | "), flush=True)
    print(
        f"\n{counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped (work folder: {workdir})"
    )
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    if shutil.which("bash") is None:
        raise SystemExit("error: bash is needed to run the documented commands")
    sys.exit(main())
