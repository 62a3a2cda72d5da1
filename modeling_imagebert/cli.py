"""One-line errors for the command-line scripts: `error: <file/field>: <what> ; <how to fix>`, exit status 2.

A script wraps its `main` in `run_cli(main, argv)`. The project's own errors (bad data, bad paths, refused
overwrites, non-finite values: `ValueError` and its subclasses `ImportFormatError` / `DataValidationError`,
`OSError`, `FloatingPointError`) become one line on stderr, printed last and flushed, so under `accelerate launch`
it is the last thing the user reads before accelerate's own summary. `--debug` (or `IMAGEBERT_DEBUG=1`) re-raises
instead, showing the full traceback. Anything else (a bug) is never hidden: it propagates with its traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_BAD_INPUT = 2
DEBUG_FLAG = "--debug"
# Values TrainingArguments' own `--debug` option takes: `--debug underflow_overflow` is not our flag.
_TRAINER_DEBUG_VALUES = ("underflow_overflow", "tpu_metrics_debug")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)


def split_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Removes a bare `--debug` from `argv`. Returns (the other arguments, whether it was there)."""
    rest, debug = [], False
    for position, token in enumerate(argv):
        following = argv[position + 1] if position + 1 < len(argv) else None
        if token == DEBUG_FLAG and not (
            following is not None and following.split()[0] in _TRAINER_DEBUG_VALUES
        ):
            debug = True
            continue
        rest.append(token)
    return rest, debug


def _hint(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "check the path"
    if isinstance(error, FileExistsError):
        return "choose another output or pass the script's overwrite flag"
    if type(error).__name__ in ("DataValidationError", "ImportFormatError"):
        return "fix the named record or convert the data again with python -m modeling_imagebert.data.convert"
    if isinstance(error, FloatingPointError):
        return "check the inputs and settings that produced non-finite values"
    return "see --help"


def format_error(error: BaseException) -> str:
    """`error: <message on one line> ; <how to fix>`; a message that already carries its fix (` ; `) keeps it."""
    # Multi-line messages (DataValidationError lists one problem a line) become one line, problems split by "; ".
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    message = "; ".join(line for line in lines if line) or type(error).__name__
    if " ; " not in message:
        message = f"{message} ; {_hint(error)} (rerun with {DEBUG_FLAG} for the traceback)"
    return f"error: {message}"


def run_cli(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """Runs `main(argv without --debug)`; returns 0 on success, 2 after printing one line for a user error.

    Args:
        main: the script's entry point, taking its argument list.
        argv: the arguments (default `sys.argv[1:]`).

    Returns:
        The exit status for `sys.exit`.
    """
    args, debug = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    debug = debug or os.environ.get("IMAGEBERT_DEBUG") == "1"
    try:
        main(args)
    except USER_ERRORS as error:
        if debug:
            raise
        sys.stdout.flush()
        print(format_error(error), file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return 0


__all__ = ["DEBUG_FLAG", "EXIT_BAD_INPUT", "USER_ERRORS", "format_error", "run_cli", "split_debug_flag"]
