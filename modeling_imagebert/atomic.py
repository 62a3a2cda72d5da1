"""Writing files and folders atomically, and deleting only what we wrote: the one helper every writer uses.

A folder is built under a temporary sibling name and renamed onto its target only once complete, so a reader (or a
resumed run) sees it whole or not at all; a file is written to a temporary sibling and `os.replace`d.

Ownership: every folder `atomic_folder` writes carries a small marker file (`MARKER_NAME`: what wrote it, when, a
run id). Replacing or removing an existing folder (`overwrite=True`, `remove_ours`) is refused unless the folder
carries that marker, and always refused for the current folder, a folder above it, and a folder that is or holds
one of the command's inputs. So an overwrite flag can never delete a user's folder. A folder that a command fills
over several runs instead (feature extraction, a LAIT run: resumed after a kill, never replaced whole) is claimed
with `claim_folder`: it carries that command's own marker, recording the settings a resumed run must match, and
a folder without it is never written into.

Special targets: a writer never replaces what is not a regular file (a file target) or a real folder (a folder
target): a symlink (even one to a regular file: `os.replace` would replace the link, not write through it), a FIFO,
a device node or a socket is refused with one line naming the path and what it is (`check_replaceable`), before the
work and again just before the rename.

A claimed folder (`claim_folder`, and run_pretrain's output folder) is locked for the life of the run
(`lock_folder`: `fcntl.flock` on `LOCK_NAME` inside it, released by the kernel when the process dies, so a killed
run's folder can be resumed at once); a second run into a held folder stops at once naming the holder's pid and host.

Finished files and folders get the mode a plain `open` or `mkdir` would give them (the umask's), not the
owner-only mode of the temporary they were written as.

Temporary names are `.tmp-<target name>.<kind>.<host>.<pid>.<random>` beside the target (`kind` is "new", "old",
"file" or a caller's word such as "join"). A kill (SIGKILL, power loss) can leave one behind; the next write of the
same target finds the ones whose process is gone (`remove_stale_temporaries`), removes them and says so. A folder
moved aside while being replaced ("old") is renamed back when the target is missing, so a kill during the swap
never loses the previous version.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import ContextDecorator, contextmanager
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
MARKER_NAME = ".written-by-modeling_imagebert.json"
# The lock file of a claimed folder. Not a TEMP_PREFIX name: leftover sweeps delete those, and a lock file deleted
# while held would let a second run lock a new one.
LOCK_NAME = ".lock-modeling_imagebert"
RUN_ID = uuid.uuid4().hex  # one id per process: every folder a run writes carries the same one


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


# What `open` and `mkdir` would give a new file / folder; read once, as os.umask can only be read by setting it.
_UMASK = _umask()
FILE_MODE = 0o666 & ~_UMASK
FOLDER_MODE = 0o777 & ~_UMASK


class UnsafeRemovalError(FileExistsError):
    """Refusal to replace or delete a folder that the project did not write, or that would take inputs with it."""


class FolderInUseError(UnsafeRemovalError):
    """Refusal to write into a folder another live run holds (`lock_folder`)."""


def describe_file_type(path: str | os.PathLike) -> str | None:
    """What `path` is, in words, when it is not a regular file or a real folder ("a symlink to /dev/stdout", "a
    FIFO (named pipe)", "a character device", ...); None for a regular file, a real folder or a missing path. The
    path itself is examined (`lstat`), never what a symlink points to."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISLNK(mode):
        try:
            return f"a symlink to {os.readlink(path)}"
        except OSError:
            return "a symlink"
    return file_type_words(mode)


def file_type_words(mode: int) -> str:
    """The kind of file an `st_mode` says, in words ("a folder", "a FIFO (named pipe)", "a character device", ...),
    for messages refusing what is not a regular file."""
    for test, words in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def check_replaceable(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Raises UnsafeRemovalError when `path` exists and is not what a writer may replace: a regular file (or, with
    `folder=True`, a real folder). A symlink is always refused, wherever it points: a rename would replace the link
    itself. Returns `path`."""
    path = Path(path)
    what = describe_file_type(path)
    if what is None and path.exists():
        if folder and not path.is_dir():
            what = "a file, not a folder"
        elif not folder and path.is_dir():
            what = "a folder"
    if what is not None:
        fix = "a new folder path" if folder else "the path of a regular file or a new one"
        raise UnsafeRemovalError(f"{path}: is {what}; refusing to replace it ; give {fix}")
    return path


def move_into_place(built: str | os.PathLike, target: str | os.PathLike) -> Path:
    """`os.replace(built, target)` for a file or folder built beside `target`, after `check_replaceable(target)`
    (a folder `built` may only replace a real folder, a file only a regular file)."""
    built, target = Path(built), Path(target)
    check_replaceable(target, folder=built.is_dir())
    os.replace(built, target)
    return target


def _host_tag() -> str:
    # Host names may hold dots or odd characters: a short hash keeps temporary names parseable.
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _temp_prefix(target: Path, kind: str) -> str:
    return f"{TEMP_PREFIX}{target.name}.{kind}.{_host_tag()}.{os.getpid()}."


def temporary_sibling(target: str | os.PathLike, kind: str = "new") -> Path:
    """A new, empty temporary folder beside `target` (same file system, so the final rename is atomic).

    Its name records `kind`, this host and this process id, so `remove_stale_temporaries(target)` can tell a
    leftover of a dead process from a folder another live process is filling.
    """
    if not kind.isidentifier():
        raise ValueError(f"kind must be a plain word, got {kind!r}")
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=_temp_prefix(target, kind), dir=target.parent))
    os.chmod(folder, FOLDER_MODE)  # mkdtemp's is owner-only; the folder is renamed into place as it is
    return folder


def _parse_temporary(name: str, target_name: str) -> tuple[str, str, int] | None:
    """(kind, host, pid) when `name` is a temporary of `target_name`, else None."""
    if not name.startswith(f"{TEMP_PREFIX}{target_name}."):
        return None
    parts = name[len(TEMP_PREFIX) + len(target_name) + 1 :].split(".")
    if len(parts) != 4 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def target_of_temporary(path: str | os.PathLike) -> Path | None:
    """The target a temporary sibling (`.tmp-<name>.<kind>.<host>.<pid>.<random>`), or a file inside one, was
    written for, else None: an error met while writing the temporary names the file or folder the user asked for."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.name.startswith(TEMP_PREFIX):
            fields = candidate.name[len(TEMP_PREFIX) :].rsplit(".", 4)
            if len(fields) == 5 and fields[3].isdigit():
                return candidate.parent / fields[0]
    return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(target: str | os.PathLike) -> list[Path]:
    """Removes the temporary siblings of `target` left by processes of this host that no longer run.

    A folder moved aside while `target` was being replaced ("old") is renamed back onto `target` when `target`
    is missing (the kill came between the two renames), else removed. Each action is logged as a warning.

    Returns:
        The paths removed or restored.
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return []
    host, handled = _host_tag(), []
    for path in sorted(target.parent.iterdir()):
        parsed = _parse_temporary(path.name, target.name)
        if parsed is None:
            continue
        kind, their_host, pid = parsed
        if their_host != host or _process_alive(pid):
            continue  # another machine's or a live process's work in progress
        if kind == "old" and (path / "folder").is_dir() and not target.exists():
            os.rename(path / "folder", target)
            logger.warning(f"restored {target} from {path}, left by an interrupted replace (process {pid})")
        else:
            logger.warning(f"removed stale temporary {path} left by an interrupted run (process {pid})")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        handled.append(path)
    return handled


def remove_stale_temporaries_in(folder: str | os.PathLike) -> list[Path]:
    """Removes every temporary (of any target) directly inside `folder` left by a process of this host that no
    longer runs, e.g. the half-written files of a killed writer of many files (a score cache). "old" folders are
    restored onto their target when it is missing, as in `remove_stale_temporaries`.

    Returns:
        The paths removed or restored.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    handled: list[Path] = []
    for path in sorted(folder.iterdir()):
        if not path.name.startswith(TEMP_PREFIX):
            continue
        # "<name>.<kind>.<host>.<pid>.<random>": the target's name may hold dots, the last four fields do not.
        fields = path.name[len(TEMP_PREFIX) :].rsplit(".", 4)
        if len(fields) == 5 and fields[3].isdigit():
            handled += remove_stale_temporaries(folder / fields[0])
    return handled


def write_marker(folder: str | os.PathLike, written_by: str, run_id: str | None = None) -> Path:
    """Writes the ownership marker into `folder`: {"written_by", "created" (UTC ISO time), "run_id"}.

    `run_id`: the run the folder belongs to when it outlives this process (a resumed pre-training run keeps the
    id of the run it continues); default `RUN_ID`, this process's id."""
    marker = {
        "written_by": written_by,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "run_id": RUN_ID if run_id is None else run_id,
    }
    return atomic_write_text(Path(folder) / MARKER_NAME, json.dumps(marker, indent=2) + "\n")


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of `folder` as a dict, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and "written_by" in marker else None


def is_ours(folder: str | os.PathLike) -> bool:
    """True when `folder` is a real folder (not a link) carrying the project's marker."""
    folder = Path(folder)
    return folder.is_dir() and not folder.is_symlink() and read_marker(folder) is not None


def check_removable(folder: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Raises UnsafeRemovalError unless `folder` may be deleted: it carries our marker, is not the current
    folder or above it, and neither is nor holds any of `inputs`. Returns the absolute folder."""
    folder = Path(folder).absolute()
    resolved = folder.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise UnsafeRemovalError(
            f"{folder}: refusing to replace the current folder or a folder above it ; choose a new output folder"
        )
    for item in inputs:
        item = Path(item).absolute().resolve()
        if item == resolved or resolved in item.parents:
            raise UnsafeRemovalError(
                f"{folder}: refusing to replace a folder that is or holds the input {item} ; choose another output"
            )
    if folder.is_symlink() or not folder.is_dir():
        raise UnsafeRemovalError(
            f"{folder}: exists and is not a folder written by modeling_imagebert ; remove it yourself or choose "
            "another output"
        )
    if read_marker(folder) is None:
        raise UnsafeRemovalError(
            f"{folder}: has no {MARKER_NAME} marker, so it was not written by modeling_imagebert and is not "
            "replaced ; remove it yourself or choose another output"
        )
    return folder


def remove_ours(folder: str | os.PathLike, *, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Deletes `folder` after `check_removable` (our marker, not the current folder, holds no input)."""
    shutil.rmtree(check_removable(folder, inputs=inputs))


def replace_folder(temp: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Renames the finished folder `temp` onto `target`. A previous `target` is first moved aside and deleted only
    after the rename, so a failure in between leaves the previous folder in place (and a kill in between leaves it
    in an "old" temporary that `remove_stale_temporaries` renames back)."""
    temp, target = Path(temp), Path(target)
    check_replaceable(target, folder=True)
    old = None
    if target.exists():
        old = temporary_sibling(target, "old")
        os.rename(target, old / "folder")
    try:
        os.rename(temp, target)
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old / "folder", target)  # put the previous folder back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return target


@contextmanager
def atomic_folder(
    target: str | os.PathLike,
    *,
    overwrite: bool = False,
    written_by: str = "modeling_imagebert",
    inputs: Iterable[str | os.PathLike] = (),
    run_id: str | None = None,
) -> Iterator[Path]:
    """Yields a temporary folder to fill; on success it gets our marker and replaces `target`, on an exception it is
    removed. Stale temporaries of `target` from killed runs are removed first.

    Args:
        target: the folder to write.
        overwrite: replace an existing `target`, only if `check_removable(target, inputs=inputs)` allows it.
        written_by: what wrote the folder (a command or function name), recorded in the marker.
        inputs: the paths the work reads; `target` may not be or hold any of them.
        run_id: the run id recorded in the marker (default: this process's `RUN_ID`).

    Raises:
        FileExistsError: `target` exists and `overwrite` is False (checked before and after the work).
        UnsafeRemovalError: `target` exists, `overwrite` is True, but it is not ours or would take inputs with it.
    """
    target = Path(target).absolute()
    inputs = list(inputs)
    remove_stale_temporaries(target)
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it")
        check_removable(target, inputs=inputs)
    temp = temporary_sibling(target)
    try:
        yield temp
        if target.exists() or target.is_symlink():
            if not overwrite:
                raise FileExistsError(f"{target} appeared while writing; pass overwrite=True to replace it")
            check_removable(target, inputs=inputs)
        write_marker(temp, written_by, run_id=run_id)
        replace_folder(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling path of `path` for a writer that needs a file name (pyarrow, skops, an Arrow or
    tar writer); it replaces `path` (`os.replace`) when the block ends, and is removed when the block raises. The
    parent folder is created.

    Raises UnsafeRemovalError (before and after the work) when `path` is a symlink, a folder or a special file
    (`check_replaceable`).

    The temporary is named like every other (`.tmp-<name>.file.<host>.<pid>.<random>`), so a kill leaves a
    leftover that `remove_stale_temporaries(path)` recognises.
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=_temp_prefix(path, "file"), dir=path.parent)
    os.close(handle)
    temp = Path(name)
    try:
        os.chmod(temp, FILE_MODE)  # mkstemp's is owner-only; writers reopen the file and keep its mode
        yield temp
        check_replaceable(path)  # again: the target may have changed while the work ran
        os.replace(temp, path)
    except BaseException as error:
        temp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.filename in (None, str(temp)):
            error.filename = str(path)  # a full disk names the file the user asked for, not our temporary
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes `data` to `path` through a temporary sibling file and `os.replace` (`atomic_file`)."""
    with atomic_file(path) as temp:
        temp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write_bytes` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


# The folders this process holds locked: absolute path -> the open lock file's descriptor.
_HELD_LOCKS: dict[str, int] = {}
# What each held lock file was before this process wrote its record into it (content and times, or None when it
# did not exist), so a run that is refused after taking the lock can leave the folder exactly as it found it.
_LOCK_BEFORE: dict[str, tuple[bytes, int, int] | None] = {}


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"run pid {int(holder['pid'])} on host {holder['host']} (since {holder['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another run"


def lock_folder(folder: str | os.PathLike, *, error: type[Exception] = FolderInUseError) -> Path:
    """Takes an exclusive lock on the existing folder `folder` for the rest of this process (or until
    `release_folder`): `fcntl.flock` on its `LOCK_NAME` file, which records this pid, host and time. The kernel
    drops the lock when the process ends however it ends, so a killed run's folder is free to resume at once.
    Taking a lock this process already holds does nothing.

    Raises:
        `error`: another process holds the lock ("<folder>: is in use by run pid N on host H").
    """
    folder = Path(folder).absolute()
    path = folder / LOCK_NAME
    key = str(folder)
    held = _HELD_LOCKS.get(key)
    if held is not None:
        try:
            now, mine = os.stat(path, follow_symlinks=False), os.fstat(held)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                return path
        except FileNotFoundError:
            pass  # the folder was replaced (run_pretrain --overwrite_output_dir): lock the new one
        release_folder(folder)
    for _ in range(10):
        try:
            before = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            before = None
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as problem:
            os.close(handle)
            if problem.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise error(
                f"{folder}: is in use by {_holder(path)} ; wait for it to end or choose another output folder"
            ) from None
        try:
            now, mine = os.stat(path, follow_symlinks=False), os.fstat(handle)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
            break
        os.close(handle)  # the file was removed or replaced between open and lock: lock the one there now
    else:
        raise error(
            f"{folder}: its lock file {LOCK_NAME} keeps changing ; is another run removing the folder?"
        )
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since}) + "\n"
    previous = None
    if before is not None and (before.st_dev, before.st_ino) == (mine.st_dev, mine.st_ino):
        previous = (os.pread(handle, 4096, 0), before.st_atime_ns, before.st_mtime_ns)
    _LOCK_BEFORE[key] = previous
    os.ftruncate(handle, 0)
    os.pwrite(handle, record.encode(), 0)
    _HELD_LOCKS[key] = handle
    return path


def release_folder(folder: str | os.PathLike, *, undo: bool = False) -> None:
    """Drops this process's lock on `folder` (`lock_folder`), if it holds one. The lock file stays; with `undo`
    (a run refused after taking the lock) it is put back as it was: removed when the lock made it, else its
    earlier record and times restored, so the refusal changes nothing in the folder."""
    key = str(Path(folder).absolute())
    handle = _HELD_LOCKS.pop(key, None)
    previous = _LOCK_BEFORE.pop(key, None)
    if handle is None:
        return
    try:
        if undo:
            path = Path(key) / LOCK_NAME
            if previous is None:
                path.unlink(missing_ok=True)
            else:
                content, atime_ns, mtime_ns = previous
                os.ftruncate(handle, 0)
                os.pwrite(handle, content, 0)
                os.utime(handle, ns=(atime_ns, mtime_ns))
    finally:
        os.close(handle)  # closing the only descriptor of the open file releases its flock


def held_folders() -> list[Path]:
    """The folders this process holds locked."""
    return [Path(key) for key in _HELD_LOCKS]


class releasing_locks(ContextDecorator):
    """Releases, when the block (or the decorated function: a whole run) ends, every folder lock taken inside it,
    so a run's output folder is free again once the run returns or raises, also when it is called in-process (a
    test, a notebook) rather than as its own process. Locks held before the block are kept."""

    def __enter__(self) -> releasing_locks:
        self._before = set(_HELD_LOCKS)
        return self

    def __exit__(self, *exc: object) -> None:
        for key in set(_HELD_LOCKS) - self._before:
            release_folder(key)


def claim_folder(
    folder: str | os.PathLike,
    marker_name: str,
    marker: Mapping[str, Any],
    *,
    owner: str,
    error: type[Exception] = UnsafeRemovalError,
) -> dict | None:
    """Makes `folder` the output of a command that fills it over several runs, resuming after a kill (feature
    extraction, a LAIT run), marked by that command's own marker file `marker_name`, and locks it for the rest of
    the run (`lock_folder`), so two runs never fill one folder at once.

    A missing or empty folder (or one holding only temporaries of the marker: a kill while it was written) is
    created and gets `marker` as JSON, written atomically. A folder carrying the marker is the command's to resume:
    the recorded marker is returned, for the caller to compare with this run's settings. Anything else is refused,
    so a resumable command never writes into a user's folder.

    Args:
        folder: the output folder.
        marker_name: the marker's file name inside `folder`.
        marker: what the marker records (the settings that fix the folder's content); a JSON object.
        owner: who writes such folders, named in a refusal ("this extractor", "the LAIT pipeline").
        error: the exception type of a refusal (the caller's own).

    Returns:
        None when the folder was claimed now; the recorded marker (a dict) when it already carried one.

    Raises:
        `error`: `folder` is not a folder, is not empty and has no marker, has an unreadable marker, or is held by
            another live run.
    """
    folder = Path(folder)
    path = folder / marker_name

    def check_not_foreign() -> None:
        if describe_file_type(folder) is not None or (folder.exists() and not folder.is_dir()):
            what = describe_file_type(folder) or "a file"
            raise error(f"{folder}: exists and is {what}, not a folder; choose a new output folder")
        if not path.is_file() and folder.is_dir():
            foreign = [
                p
                for p in folder.iterdir()
                if p.name != LOCK_NAME and not p.name.startswith(f"{TEMP_PREFIX}{marker_name}")
            ]
            if foreign:
                raise error(
                    f"{folder}: exists, is not empty and was not created by {owner} (no {marker_name}); refusing to "
                    "write into it: choose a new or empty folder"
                )

    check_not_foreign()  # before the lock file is made: nothing is written into a user's folder
    folder.mkdir(parents=True, exist_ok=True)
    lock_folder(folder, error=error)
    try:
        check_not_foreign()  # again under the lock: another run may have claimed it meanwhile
        if path.is_file():
            try:
                recorded = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as problem:
                raise error(f"{path}: unreadable marker ({problem}); choose a new output folder") from None
            if not isinstance(recorded, dict):
                raise error(f"{path}: unreadable marker (not a JSON object); choose a new output folder")
            return recorded
    except BaseException:
        release_folder(folder, undo=True)
        raise
    atomic_write_text(path, json.dumps(dict(marker), indent=1, sort_keys=True) + "\n")
    return None


def check_output_outside_inputs(
    output: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None], *, output_name: str = "output"
) -> Path:
    """Refuses an output path that is, holds, or lies inside one of `inputs`, before anything is written.

    A command that writes into its own input replaces what it reads (a fine-tuning run saving over the checkpoint it
    starts from), and one that writes next to its inputs inside them changes them for every later reader (a model
    folder inside a dataset folder). Paths are compared once resolved (symlinks followed), so a link to an input
    counts as the input. Inputs that are None or do not exist locally (a Hub id) are skipped.

    Args:
        output: the output file or folder.
        inputs: {flag or name that gave the input (named in the refusal): path}.
        output_name: how the refusal names the output (its flag).

    Returns:
        The absolute output path.

    Raises:
        UnsafeRemovalError (a FileExistsError): one line naming the output, the input and how they overlap.
    """
    output = Path(output).absolute()
    resolved = output.resolve()
    for name, item in inputs.items():
        if item is None or str(item) == "" or not Path(item).exists():
            continue
        item = Path(item).absolute().resolve()
        if item == resolved:
            relation = "is"
        elif resolved in item.parents:
            relation = "holds"
        elif item in resolved.parents:
            relation = "is inside"
        else:
            continue
        raise UnsafeRemovalError(
            f"{output_name} {output}: {relation} the input {name} {item}, so writing it would change or replace "
            f"what the command reads ; choose an {output_name} outside every input"
        )
    return output


__all__ = [
    "file_type_words",
    "FILE_MODE",
    "FOLDER_MODE",
    "LOCK_NAME",
    "FolderInUseError",
    "MARKER_NAME",
    "RUN_ID",
    "TEMP_PREFIX",
    "UnsafeRemovalError",
    "atomic_file",
    "atomic_folder",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_outside_inputs",
    "check_removable",
    "check_replaceable",
    "claim_folder",
    "describe_file_type",
    "held_folders",
    "lock_folder",
    "move_into_place",
    "release_folder",
    "releasing_locks",
    "is_ours",
    "read_marker",
    "remove_ours",
    "remove_stale_temporaries",
    "remove_stale_temporaries_in",
    "replace_folder",
    "target_of_temporary",
    "temporary_sibling",
    "write_marker",
]
