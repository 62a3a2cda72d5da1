"""One-line errors for the command-line scripts: `error: <file/field>: <what> ; <how to fix>`, exit status 2.

Every command (`examples/*.py`, `python -m modeling_imagebert.data.convert`, `.features`,
`.features.convert_checkpoints`, `.lait`) wraps its `main` in `run_cli(main, argv)`; its `--help` uses
`cli_arguments.DefaultsHelpFormatter`. The project's own errors (bad data, bad paths, refused overwrites, non-finite
values: `ValueError` and its subclasses `ImportFormatError` / `DataValidationError`, `OSError`,
`FloatingPointError`) become one line on stderr, printed last and flushed, so under `accelerate launch` it is the last
thing the user reads before accelerate's own summary. `--debug` (or `IMAGEBERT_DEBUG=1`) re-raises instead, showing
the full traceback. Anything else (a bug) is never hidden: it propagates with its traceback.
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


def format_error(error: BaseException, *, hint: bool = True) -> str:
    """`error: <message on one line> ; <how to fix>`; a message that already carries its fix (` ; `) keeps it.

    With `hint=False` the message is only made one line (the commands whose messages name their own fix)."""
    # Multi-line messages (DataValidationError lists one problem a line) become one line, problems split by "; ".
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    message = "; ".join(line for line in lines if line) or type(error).__name__
    if hint and " ; " not in message:
        message = f"{message} ; {_hint(error)} (rerun with {DEBUG_FLAG} for the traceback)"
    return f"error: {message}"


def run_cli(
    main: Callable[[list[str]], Any],
    argv: Sequence[str] | None = None,
    *,
    errors: tuple[type[BaseException], ...] = USER_ERRORS,
    hint: bool = True,
    one_line: bool = True,
    exit_status: int = EXIT_BAD_INPUT,
) -> int:
    """Runs `main(argv without --debug)`; returns 0 on success, `exit_status` after printing one line for a user
    error.

    Args:
        main: the command's entry point, taking its argument list (argparse's own exits pass through).
        argv: the arguments (default `sys.argv[1:]`).
        errors: the exception types that are the user's to fix (default `USER_ERRORS`); others propagate.
        hint: end a message that names no fix with a generic one (`format_error`); the feature, LAIT and
            checkpoint converter commands write their own and pass False.
        one_line: join a multi-line message into one line; the checkpoint converter passes False, its refusal
            lists every unmapped key on a line of its own.
        exit_status: the status after a user error; the checkpoint converter keeps its 1.

    Returns:
        The exit status for `sys.exit`.
    """
    args, debug = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    debug = debug or os.environ.get("IMAGEBERT_DEBUG") == "1"
    try:
        main(args)
    except errors as error:
        if debug:
            raise
        sys.stdout.flush()
        line = format_error(error, hint=hint) if one_line else f"error: {error}"
        print(line, file=sys.stderr, flush=True)
        return exit_status
    return 0


__all__ = ["DEBUG_FLAG", "EXIT_BAD_INPUT", "USER_ERRORS", "format_error", "run_cli", "split_debug_flag"]
