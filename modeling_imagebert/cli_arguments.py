"""What the command lines of the scripts share: `--help` with defaults, local model paths checked before any Hub
call, and the meaning of `--resume_from_checkpoint latest`.

Every script (`examples/run_pretrain.py`, `run_retrieval.py`, `evaluate_retrieval.py`) uses these, so a flag means
the same thing everywhere and a mistyped folder is reported at once instead of after the Hub client's retries.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

LATEST = "latest"
# How the docs and every printed hint run pre-training (from the repository root).
PRETRAIN_COMMAND = "accelerate launch examples/run_pretrain.py"
# Flags a resumed run must not repeat (they are replaced or would delete the run).
_NOT_REPEATED_ON_RESUME = {"--overwrite_output_dir": 0, "--resume_from_checkpoint": 1, "--output_dir": 1}
# `checkpoint-<step>` folders of `transformers.Trainer`; `trainer_state.json` is written after the weights, optimiser
# and scheduler, so a folder without it is a checkpoint whose save was cut short.
_TRAINER_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_TRAINER_STATE_NAME = "trainer_state.json"


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """`--help` keeps the description's layout (examples stay indented) and ends each option's help with its
    default, like `argparse.ArgumentDefaultsHelpFormatter`, except where the default says nothing: None (unset:
    the help says what happens then), False (a switch that is off) and an empty list; and where the help already
    names its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or default is argparse.SUPPRESS
            or default is None
            or default is False
            or default == []
            or "%(default)" in help_text
            or "default:" in help_text.lower()
        ):
            return help_text
        return f"{help_text} (default: %(default)s)"


def looks_like_local_path(value: str) -> bool:
    """Whether a `--model_name_or_path` value names a local folder rather than a Hub repository id.

    Local: it starts with `.`, `/` or `~`, has more than one `/` (a Hub id is `name` or `namespace/name`), uses the
    platform's other separator, is not a valid Hub id, or its first component exists here (`outputs/typo` when
    `outputs/` exists).
    """
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if value.startswith((".", "/", "~")) or value.count("/") > 1:
        return True
    if (os.sep != "/" and os.sep in value) or (os.altsep and os.altsep != "/" and os.altsep in value):
        return True
    try:
        validate_repo_id(value)
    except HFValidationError:
        return True
    return "/" in value and Path(value.split("/", 1)[0]).exists()


def check_local_model_path(value: str | None, flag: str, *, needs: str | None = "config.json") -> None:
    """Raises FileNotFoundError (one line, naming `flag`) when `value` looks like a local path
    (`looks_like_local_path`) and is not a folder, or lacks the file `needs`; returns quietly for a Hub id or None,
    so the Hub is only asked about names that can be Hub ids."""
    if value is None or not looks_like_local_path(value):
        return
    folder = Path(value).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"{flag} {value}: no such folder (a local path, so the Hub was not asked) ; check the path, e.g. "
            "outputs/imagebert-demo/final after the demo"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {value}: not a folder ; pass the folder save_pretrained wrote")
    if needs is not None and not (folder / needs).is_file():
        raise FileNotFoundError(
            f"{flag} {value}: the folder has no {needs} ; pass a folder written by save_pretrained (a checkpoint or "
            "a final model folder)"
        )


def latest_trainer_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete `checkpoint-<step>` folder `transformers.Trainer` wrote in `output_dir` (highest step
    with a `trainer_state.json`), or None when there is none (or no `output_dir`)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    steps = []
    for child in folder.iterdir():
        match = _TRAINER_CHECKPOINT.match(child.name)
        if match and child.is_dir() and (child / _TRAINER_STATE_NAME).is_file():
            steps.append((int(match.group(1)), child))
    return max(steps)[1] if steps else None


def resolve_trainer_resume(value: str | None, output_dir: str | Path) -> tuple[str | None, str | None]:
    """What `--resume_from_checkpoint VALUE` means for a Trainer run writing to `output_dir`, as in run_pretrain:
    `latest` resumes the newest complete checkpoint, or starts from scratch when there is none; a path must be an
    existing folder.

    Returns:
        (the checkpoint folder to pass to `Trainer.train`, or None to start from scratch; a message to print, or
        None).

    Raises:
        FileNotFoundError (one line) for a path that is not an existing folder.
    """
    if value is None or value == "":
        return None, None
    if value == LATEST:
        found = latest_trainer_checkpoint(output_dir)
        if found is None:
            return None, f"no checkpoint in {output_dir}; starting from scratch"
        return str(found), f"resuming from {found}"
    if not Path(value).is_dir():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {value}: no such checkpoint folder ; pass 'latest' (the newest checkpoint in "
            "--output_dir) or an existing checkpoint-<step> folder"
        )
    return value, f"resuming from {value}"


def pretrain_resume_command(output_dir: str | Path, argv: Sequence[str] | None = None) -> str:
    """The command line that continues a stopped pre-training run: `accelerate launch examples/run_pretrain.py`
    with the run's own flags (`argv`, default `sys.argv[1:]`: the same recipe, overrides and time slice), without
    `--overwrite_output_dir`, and with `--resume_from_checkpoint latest --output_dir OUTPUT_DIR`."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept, position = [], 0
    while position < len(args):
        token = args[position]
        name = token.split("=", 1)[0]
        if name in _NOT_REPEATED_ON_RESUME:
            position += 1 + (_NOT_REPEATED_ON_RESUME[name] if "=" not in token else 0)
            continue
        kept.append(token)
        position += 1
    kept += ["--resume_from_checkpoint", LATEST, "--output_dir", str(output_dir)]
    return " ".join([PRETRAIN_COMMAND, *(shlex.quote(token) for token in kept)])


__all__ = [
    "LATEST",
    "PRETRAIN_COMMAND",
    "DefaultsHelpFormatter",
    "check_local_model_path",
    "latest_trainer_checkpoint",
    "looks_like_local_path",
    "pretrain_resume_command",
    "resolve_trainer_resume",
]
