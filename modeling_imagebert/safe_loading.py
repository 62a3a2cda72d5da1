"""Reading pickles without running their code: one restricted unpickler, used wherever a format we read pickles.

`pickle.load` calls any global a file names, so a pickle from the web can run code. The formats we read only
need numpy arrays and plain containers, so `RestrictedUnpickler` admits the globals of an allow-list and refuses
every other one before it is looked up. Each reader picks the list its format needs: `NUMPY_ARRAYS` plus
`PLAIN_VALUES` for the `info` dict of a bottom-up-attention.pytorch `.npz` (`feature_formats/npz.py`), plus
`CHECKPOINT_CONTAINERS` for Detectron2's `.pkl` checkpoints written by Python 2 (`features/convert_checkpoints.py`).

The other loaders every reader of a user's file goes through, each failing with one line naming the file:

* `load_torch_file` / `load_safetensors_file` / `open_safetensors`, and `loading_weights` around a
  `from_pretrained` of a user's folder: weights-only `torch.load` and safetensors, where a pickle holding Python
  objects, a truncated, empty or foreign file becomes `WeightsFileError` ("<file>: not a weights-only checkpoint:
  it holds Python objects (refused, nothing run) ; expected <what>"), never torch's advice to set
  `weights_only=False`.
* `check_input_file`, `read_input_bytes`, `read_input_text`: a user's input is a regular file (a FIFO, a device
  such as /dev/zero, a socket or a folder is refused without blocking: the file is opened with `O_NONBLOCK` and
  checked with `fstat`) read up to a size cap (`NotRegularFileError`, `InputTooLargeError`).
* `load_yaml`: YAML without anchors and aliases (a 1 KB "billion laughs" alias bomb expands to gigabytes), for
  recipes and configs.
"""

from __future__ import annotations

import os
import pickle
import re
import stat
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from .atomic import file_type_words

# What a numpy array (and a numpy scalar) pickles to, in numpy 1 and numpy 2 module names.
NUMPY_ARRAYS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
# Plain containers, numbers and strings named as globals (an object array of them pickles them by name).
PLAIN_VALUES = frozenset(
    ("builtins", name)
    for name in (
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "int",
        "float",
        "complex",
        "bool",
        "str",
        "bytes",
    )
)
CHECKPOINT_CONTAINERS = frozenset(
    {
        ("collections", "OrderedDict"),
        # Protocol-2 pickles written by Python 3 store raw bytes as codecs.encode(text, "latin1").
        ("_codecs", "encode"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """A `pickle.Unpickler` that admits only the (module, name) globals of `allowed`.

    Args:
        file: the binary stream holding the pickle.
        allowed: the (module, name) pairs the format needs.
        admits: what `allowed` stands for, in the refusal message ("only <admits>").
        **kwargs: passed to `pickle.Unpickler` (e.g. `encoding="latin1"` for Python 2 pickles).

    Raises (from `load`):
        pickle.UnpicklingError: "refused to load <module>.<name>: only <admits>" for any other global.
    """

    def __init__(self, file: IO[bytes], *, allowed: Collection[tuple[str, str]], admits: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self.allowed = frozenset(allowed)
        self.admits = admits

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.allowed:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: only {self.admits}")
        return super().find_class(module, name)


# ---------------------------------------------------------------------------------------------------------------
# Weights: torch.load (weights only) and safetensors, one line naming the file
# ---------------------------------------------------------------------------------------------------------------


class WeightsFileError(ValueError):
    """A weights file that cannot be loaded safely: a pickle with Python objects, a truncated, empty or foreign
    file. The message is one line naming the file and what was expected."""


_WEIGHTS_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _weights_file_of(path: str | os.PathLike) -> str:
    """`path`, or for a folder the weights file `from_pretrained` reads in it (the first present of the usual
    names), so a message names a file the user can look at."""
    path = Path(path)
    if path.is_dir():
        for name in _WEIGHTS_FILES:
            if (path / name).exists():
                return str(path / name)
    return str(path)


def weights_problem(error: BaseException, path: str | os.PathLike, what: str) -> str | None:
    """One line for a weights file torch or safetensors refused (anywhere in `error`'s chain), else None.

    `<file>: <what is wrong> ; expected <what>`."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        name = type(current).__name__
        problem = None
        if isinstance(current, pickle.UnpicklingError) or "Weights only load failed" in text:
            found = re.search(r"unsupported GLOBAL (\S+)", text)
            if found:
                problem = (
                    f"not a weights-only checkpoint: it holds Python objects ({found.group(1).rstrip('.')}; "
                    "refused, nothing run)"
                )
            else:
                problem = "not a torch checkpoint (an unknown or damaged pickle; refused, nothing run)"
        elif name == "SafetensorError" or "deserializing header" in text:
            detail = " ".join(text.split())[:160]
            problem = f"not a readable safetensors file ({detail})"
        elif isinstance(current, EOFError) or "PytorchStreamReader failed" in text:
            problem = "truncated or empty (not a complete torch checkpoint)"
        elif "invalid load key" in text or "zip archive" in text:
            problem = "not a torch checkpoint (damaged or another format)"
        if problem is not None:
            return f"{_weights_file_of(path)}: {problem} ; expected {what}"
        current = current.__cause__ or current.__context__
    return None


@contextmanager
def loading_weights(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turns a weights file's refusal inside the block (a `from_pretrained` of the user's folder `path`, a
    `torch.load`) into `WeightsFileError`, one line naming the file (`weights_problem`); other errors pass."""
    try:
        yield
    except Exception as error:
        line = weights_problem(error, path, what)
        if line is None:
            raise
        raise WeightsFileError(line) from None


def load_torch_file(
    path: str | os.PathLike | IO[bytes], what: str, *, name: str | os.PathLike | None = None
) -> Any:
    """`torch.load(path, map_location="cpu", weights_only=True)` of a regular file (or a binary stream, named by
    `name` in messages).

    Args:
        path: the file, or a binary stream of its bytes.
        what: what the file should hold, for the message ("a torch state dict of resnet152").
        name: the file's name when `path` is a stream.

    Raises:
        WeightsFileError: a pickle holding Python objects, a truncated, empty or foreign file.
        NotRegularFileError: `path` is a FIFO, device, socket or folder.
    """
    import torch

    if isinstance(path, (str, os.PathLike)):
        check_input_file(path, what)
        name = path
    name = name if name is not None else "<stream>"
    with loading_weights(name, what), warnings.catch_warnings():
        # torch warns about pickle protocols it may not support; the refusal below says it in one line
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as error:
            # the weights-only unpickler's own failures on foreign bytes (a text file gives KeyError)
            raise WeightsFileError(
                f"{os.fspath(name)}: not a torch checkpoint ({type(error).__name__}: {error}) ; expected {what}"
            ) from None


def load_safetensors_file(path: str | os.PathLike, what: str) -> dict:
    """`safetensors.torch.load_file(path)` (tensors by name, on the CPU) of a regular file; a damaged or foreign
    file raises `WeightsFileError` naming it."""
    from safetensors.torch import load_file

    check_input_file(path, what)
    with loading_weights(path, what):
        return load_file(os.fspath(path))


@contextmanager
def open_safetensors(path: str | os.PathLike, what: str) -> Iterator[Any]:
    """`safetensors.safe_open(path, framework="pt")` of a regular file (its header and metadata, tensors on
    demand); a damaged or foreign file raises `WeightsFileError` naming it."""
    from safetensors import safe_open

    check_input_file(path, what)
    with loading_weights(path, what):
        handle = safe_open(os.fspath(path), framework="pt")
    with handle:
        yield handle


# ---------------------------------------------------------------------------------------------------------------
# Input files: regular files only, read with a size cap
# ---------------------------------------------------------------------------------------------------------------

MiB = 1 << 20
IMAGE_MAX_BYTES = 64 * MiB  # a decoded image of the paper's sizes is far below; /dev/zero would never end
TEXT_MAX_BYTES = 1 << 30  # caption and label files: a GiB of text is already a very large corpus
CONFIG_MAX_BYTES = 16 * MiB  # recipes and configs are kilobytes


class NotRegularFileError(OSError):
    """An input that is not a regular file: a FIFO (which would block a read forever), a device (/dev/zero never
    ends), a socket or a folder."""


class InputTooLargeError(ValueError):
    """An input larger than its cap."""


def _refuse(path: str | os.PathLike, mode: int, what: str) -> NotRegularFileError:
    reason = f"is {file_type_words(mode)}, not a regular file ; expected {what} (a regular file)"
    error = NotRegularFileError(f"{os.fspath(path)}: {reason}")
    error.reason = reason  # the message without the path, for callers that name the file themselves
    return error


def check_input_file(path: str | os.PathLike, what: str) -> os.stat_result:
    """The `stat` of `path` (a symlink is followed) when it is a regular file; else `NotRegularFileError` naming
    what it is. Never opens the file, so a FIFO cannot block. FileNotFoundError passes as is."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise _refuse(path, info.st_mode, what)
    return info


def read_input_bytes(path: str | os.PathLike, what: str, max_bytes: int) -> bytes:
    """The bytes of the regular file `path`, at most `max_bytes` of them.

    The file is opened with `O_NONBLOCK` (a FIFO opens at once instead of waiting for a writer) and checked with
    `fstat` on the open descriptor (no window between check and read), so nothing here blocks or grows without end.

    Raises:
        NotRegularFileError: a FIFO, device, socket or folder.
        InputTooLargeError: more than `max_bytes` bytes.
    """
    try:
        handle = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except IsADirectoryError:
        raise _refuse(path, stat.S_IFDIR, what) from None
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        raise _refuse(path, info.st_mode, what)
    with os.fdopen(handle, "rb") as file:
        if info.st_size > max_bytes:
            raise InputTooLargeError(
                f"{os.fspath(path)}: {info.st_size} bytes, more than the {max_bytes} allowed for {what}"
            )
        data = file.read(max_bytes + 1)  # the file may have grown since fstat
    if len(data) > max_bytes:
        raise InputTooLargeError(f"{os.fspath(path)}: more than the {max_bytes} bytes allowed for {what}")
    return data


def read_input_text(
    path: str | os.PathLike, what: str, max_bytes: int = TEXT_MAX_BYTES, *, encoding: str = "utf-8"
) -> str:
    """`read_input_bytes` decoded; an undecodable file raises ValueError naming the file and the byte offset."""
    data = read_input_bytes(path, what, max_bytes)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{os.fspath(path)}: not {encoding} text (byte {error.start}: {error.reason}) ; expected {what}"
        ) from None


# ---------------------------------------------------------------------------------------------------------------
# YAML without aliases
# ---------------------------------------------------------------------------------------------------------------


def load_yaml(text: str, source: str | os.PathLike, what: str = "recipes and configs") -> Any:
    """`yaml.safe_load(text)`, refusing anchors (`&name`) and aliases (`*name`): a few of them nested expand a
    1 KB file into gigabytes (the "billion laughs"), which a recipe never needs.

    Args:
        text: the YAML.
        source: where it comes from (a file, "--set stages.0.x"), named in the message.
        what: what the YAML is, in the message ("YAML aliases (*name) are not allowed in <what>").

    Raises:
        ValueError: "<source>: line N: YAML anchors and aliases (&name, *name) are not allowed in <what>".
        yaml.YAMLError: invalid YAML, as `yaml.safe_load` raises it.
    """
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            event = self.peek_event()
            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent) or anchor is not None:
                line = event.start_mark.line + 1
                raise ValueError(
                    f"{os.fspath(source)}: line {line}: YAML anchors and aliases (&name, *name) are not allowed in "
                    f"{what} ; write the value out"
                )
            return super().compose_node(parent, index)

    loader = NoAliasLoader(text)
    try:
        return loader.get_single_data()
    except ValueError as error:
        if str(error).startswith(f"{os.fspath(source)}: "):
            raise
        # A scalar YAML resolves but Python cannot build: an integer of more than 4,300 digits, a bad timestamp.
        raise ValueError(f"{os.fspath(source)}: a value cannot be read ({short_message(error)})") from None
    finally:
        loader.dispose()


def short_message(error: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, bounded to about `limit` characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "short_message",
    "CHECKPOINT_CONTAINERS",
    "CONFIG_MAX_BYTES",
    "IMAGE_MAX_BYTES",
    "NUMPY_ARRAYS",
    "PLAIN_VALUES",
    "TEXT_MAX_BYTES",
    "InputTooLargeError",
    "NotRegularFileError",
    "RestrictedUnpickler",
    "WeightsFileError",
    "check_input_file",
    "load_safetensors_file",
    "load_torch_file",
    "load_yaml",
    "loading_weights",
    "open_safetensors",
    "read_input_bytes",
    "read_input_text",
    "weights_problem",
]
