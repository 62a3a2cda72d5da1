"""One-line errors for the command-line scripts: `error: <file/field>: <what> ; <how to fix>`, exit status 2.

Every command (`examples/*.py`, `python -m modeling_imagebert.data.convert`, `.features`,
`.features.convert_checkpoints`, `.lait`) wraps its `main` in `run_cli(main, argv)`; its `--help` uses
`cli_arguments.DefaultsHelpFormatter`. The project's own errors (bad data, bad paths, refused overwrites, non-finite
values: `ValueError` and its subclasses `ImportFormatError` / `DataValidationError`, `OSError`,
`FloatingPointError`) become one line on stderr, printed last and flushed, so under `accelerate launch` it is the last
thing the user reads before accelerate's own summary. `--debug` (or `IMAGEBERT_DEBUG=1`) re-raises instead, showing
the full traceback. Anything else (a bug) is never hidden: it propagates with its traceback.

The machine's errors are the user's to fix too, so they get the same one line and exit status: a full disk, a quota,
a read-only or unwritable output, a file size limit (`ulimit -f`, with SIGXFSZ ignored), found anywhere in the
exception's chain, so the ones torch.save (`RuntimeError: PytorchStreamWriter failed writing file ...`) and datasets
(`DatasetGenerationError`) wrap come out as `error: <path>: no space left on device ; ...` (`environment_problem`).
Folders a command locked (`atomic.lock_folder`) are released when `main` returns or raises.
"""

from __future__ import annotations

import errno
import os
import re
import reprlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

EXIT_BAD_INPUT = 2
DEBUG_FLAG = "--debug"
# Values TrainingArguments' own `--debug` option takes: `--debug underflow_overflow` is not our flag.
_TRAINER_DEBUG_VALUES = ("underflow_overflow", "tpu_metrics_debug")
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, FloatingPointError)


# What the machine refused, by errno; the words also match an OSError that carries only a message (pyarrow's).
_SPACE_FIX = "free space (or raise the limit), then rerun: a resumable command continues where it stopped"
_ACCESS_FIX = "check the path's permissions, or choose a writable output"
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: ("no space left on device", "No space left on device", _SPACE_FIX),
    errno.EDQUOT: ("disk quota exceeded", "Disk quota exceeded", _SPACE_FIX),
    errno.EFBIG: ("file too large (the file size limit, ulimit -f)", "File too large", _SPACE_FIX),
    errno.EROFS: ("read-only file system", "Read-only file system", _ACCESS_FIX),
    errno.EACCES: ("permission denied", "Permission denied", _ACCESS_FIX),
    errno.EPERM: ("operation not permitted", "Operation not permitted", _ACCESS_FIX),
}


# What torch.save's C++ writer raises (a RuntimeError without errno) when the disk is full or a size limit is hit.
_TORCH_WRITE_FAILURES = (
    "PytorchStreamWriter failed",
    "unexpected pos",
    "iostream error",
    "file write failed",
)


def _path_from_traceback(error: BaseException) -> str | None:
    """The file a library was writing when `error` (an OSError without a file name: pyarrow's, a plain write's)
    was raised: the innermost frame's `path`-like local or its `self`'s path attribute (datasets' ArrowWriter)."""
    frames = []
    traceback = error.__traceback__
    while traceback is not None:
        frames.append(traceback.tb_frame)
        traceback = traceback.tb_next
    for frame in reversed(frames):
        owner = frame.f_locals.get("self")
        candidates = [frame.f_locals.get(name) for name in ("path", "filename", "file_path", "fname")]
        candidates += [getattr(owner, name, None) for name in ("_path", "path", "filename")] if owner else []
        for value in candidates:
            if isinstance(value, (str, os.PathLike)) and os.fspath(value):
                return os.fspath(value)
    return None


def _torch_save_target(error: BaseException) -> str | None:
    """The file `torch.save` was writing when `error` was raised (its `f` argument), from the traceback."""
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "save" and frame.f_globals.get("__name__") == "torch.serialization":
            target = frame.f_locals.get("f")
            return os.fspath(target) if isinstance(target, (str, os.PathLike)) else None
        traceback = traceback.tb_next
    return None


def environment_problem(error: BaseException) -> str | None:
    """One line for an error that is the machine's, not a bug: an OSError of a full disk, quota, read-only or
    unwritable path or file size limit anywhere in `error`'s chain (`__cause__` / `__context__`), or torch.save's
    failed write. `<path>: <what> (<system message>) ; <fix>`, else None."""
    from .atomic import target_of_temporary

    seen: set[int] = set()
    current: BaseException | None = error
    torch_failure = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError):
            text = str(current)
            for code, (words, system, fix) in _ENVIRONMENT_ERRNOS.items():
                if current.errno == code or (current.errno is None and system in text):
                    path = (
                        current.filename
                        or _torch_save_target(error)
                        or _path_from_traceback(current)
                        or "an output file"
                    )
                    path = target_of_temporary(path) or path  # the file asked for, not our temporary
                    detail = current.strerror or " ".join(text.split())
                    return f"{os.fspath(path)}: {words} ({detail}) ; {fix}"
        if type(current).__name__ == "SafetensorError":
            # safetensors' Rust writer reports the system error in its message only: "... (os error 28)".
            found = re.search(r"\(os error (\d+)\)", str(current))
            if found and int(found.group(1)) in _ENVIRONMENT_ERRNOS:
                words, _system, fix = _ENVIRONMENT_ERRNOS[int(found.group(1))]
                path = _path_from_traceback(current) or "a safetensors file"
                path = target_of_temporary(path) or path
                return f"{os.fspath(path)}: {words} (safetensors: {' '.join(str(current).split())}) ; {fix}"
        if isinstance(current, RuntimeError) and any(sign in str(current) for sign in _TORCH_WRITE_FAILURES):
            torch_failure = torch_failure or current
        current = current.__cause__ or current.__context__
    if torch_failure is not None:
        path = _torch_save_target(torch_failure) or _torch_save_target(error) or "a checkpoint file"
        path = target_of_temporary(path) or path
        detail = " ".join(str(torch_failure).split())
        return (
            f"{os.fspath(path)}: could not be written, the disk is full or a file size limit was reached "
            f"(torch.save: {detail}) ; {_SPACE_FIX}"
        )
    return None


_SHORT_REPR = reprlib.Repr()  # Python 3.11's Repr takes no arguments: set the bounds one by one
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 6
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def short_repr(value: Any, limit: int = 120) -> str:
    """`repr(value)` bounded to about `limit` characters (nested containers and long strings shortened with
    "..."), for error messages that quote a user's value: a huge value (a long string, a YAML structure) must not
    make the message itself huge or slow to build."""
    if isinstance(value, int) and value.bit_length() > 256:
        # Python refuses to print an int of more than 4,300 digits (and a long one is slow to print): its size.
        return f"<an integer of {value.bit_length()} bits>"
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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

    A full disk, a read-only output or a file size limit (`environment_problem`) is the user's error too: one line
    and `exit_status`, whichever exception carries it.

    Returns:
        The exit status for `sys.exit`.
    """
    from .atomic import releasing_locks

    args, debug = split_debug_flag(sys.argv[1:] if argv is None else list(argv))
    debug = debug or os.environ.get("IMAGEBERT_DEBUG") == "1"
    try:
        with (
            releasing_locks()
        ):  # the run is over when main returns or raises: its output folders are free again
            main(args)
    except Exception as error:
        machine = environment_problem(error)
        if debug or (machine is None and not isinstance(error, errors)):
            raise
        sys.stdout.flush()
        if machine is not None:
            line = f"error: {machine}"
        else:
            line = format_error(error, hint=hint) if one_line else f"error: {error}"
        print(line, file=sys.stderr, flush=True)
        return exit_status
    return 0


__all__ = [
    "DEBUG_FLAG",
    "EXIT_BAD_INPUT",
    "USER_ERRORS",
    "environment_problem",
    "format_error",
    "run_cli",
    "short_repr",
    "split_debug_flag",
]
