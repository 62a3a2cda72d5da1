"""Where images come from: a folder, a list file, a `datasets` Image column, or webdataset tar shards.

Every source is listed up front into `ImageRef`s (an id, where the image is, and a `read()` that returns its
encoded bytes), in a deterministic order, without reading any image data. The extraction runner cuts that list
into fixed shards, so a resumed run (or process i of n) can start at any shard without reading the ones before.
Image ids must be unique: a duplicate is refused with both places named.

Every id is written as UTF-8 text into TSV files (skipped.tsv, captions.tsv, the BUTD TSV layout) as well as Arrow
and .npz names, so an id must be UTF-8 text without control characters. An image whose id is not (a file name in
another encoding, read with Python's surrogateescape; a TAB, newline, CR or NUL in a webdataset key, a list file's
id or a dataset's id column) is not extracted: it is skipped as `bad_image_id`, and reported under its id with the
undecodable bytes written `\\xNN` and the control characters as Python escapes (`\\t`, `\\x00`). A webdataset
shard that is damaged partway (cut short, a garbage header) gives the images listed before the damage, and the
rest of it one `unreadable` skip naming the shard and the byte where it breaks; a shard that cannot be opened as a
tar at all (empty, not a tar, no permission) is one `unreadable` skip, and the run goes on with the other shards
(a missing file is still refused, as a mistyped name).

| kind         | input                                   | image_id                                    | order                |
|--------------|-----------------------------------------|---------------------------------------------|----------------------|
| `folder`     | a folder, searched recursively          | file name without extension (`--id-style stem`) or the relative path without extension (`relative`) | sorted relative paths |
| `list`       | a text file: `path` or `path<TAB>id` per line (relative paths are relative to the list file; blank lines and `#` comments skipped) | the id column, else as for folders | file order |
| `hf`         | a folder written by `Dataset.save_to_disk` and the name of its `Image` column | `--id-column`, else the row index | row order |
| `webdataset` | `.tar` shards as img2dataset writes them (`{key}.jpg` or `.png` or `.webp` beside `{key}.txt` / `{key}.json`) | the key | shard order, then tar order |
"""

from __future__ import annotations

import dataclasses
import os
import tarfile
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..safe_loading import (
    TEXT_MAX_BYTES,
    InputTooLargeError,
    NotRegularFileError,
    check_input_file,
    read_input_bytes,
)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".webp",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".jfif",
    ".ppm",
    ".pgm",
)
WEBDATASET_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
SOURCE_KINDS = ("folder", "list", "hf", "webdataset")
ID_STYLES = ("stem", "relative")


class ImageSourceError(ValueError):
    """An image source cannot be listed: a missing file, a malformed list line, a duplicate image id. The message
    names the file (and line) and what was expected."""


@dataclass(frozen=True)
class ImageRef:
    """One image of a source: its id, where it is (`origin`, for messages and the skipped-files report), and how
    to read its encoded bytes.

    Attributes:
        image_id: the unique id written with its features.
        origin: a path, "tar#member" or "dataset[row]" naming where the image is.
        path: a file to read, or None.
        tar_path, tar_offset, tar_size: a member of an uncompressed tar to read by seeking, or None.
        payload: a zero-argument callable returning the bytes (for `datasets` rows), or None.
        problem: (reason, message) when the image is skipped without being read (a bad id, a damaged shard).
    """

    image_id: str
    origin: str
    path: Path | None = None
    tar_path: Path | None = None
    tar_offset: int = 0
    tar_size: int = 0
    payload: Any = field(default=None, compare=False)
    problem: tuple[str, str] | None = None

    def read(self) -> bytes | Path:
        """The encoded image: bytes, or the path of a file (read by `images.decode_image`, which reports a file
        that cannot be read as a skip instead of raising)."""
        if self.path is not None:
            return self.path
        if self.tar_path is not None:
            with open(self.tar_path, "rb") as handle:
                handle.seek(self.tar_offset)
                data = handle.read(self.tar_size)
            if len(data) != self.tar_size:  # a shard cut short inside this member
                raise OSError(f"the tar ends inside this member: {len(data)} of {self.tar_size} bytes")
            return data
        return self.payload()


def printable(text: str) -> str:
    """`text` as valid UTF-8 text on one line: each undecodable byte of a surrogateescape'd file name as `\\xNN`,
    each control character as its Python escape (`\\t`, `\\n`, `\\x00`); anything else unchanged."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if "\udc80" <= char <= "\udcff":
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif unicodedata.category(char) in ("Cc", "Cs"):
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    return "".join(out)


def image_id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot be written to every output (see the module docstring), or None."""
    if image_id.isprintable():
        return None
    if any("\udc80" <= char <= "\udcff" for char in image_id):
        return "is not UTF-8 (a file name in another encoding); rename the file to UTF-8"
    bad = next((char for char in image_id if unicodedata.category(char) in ("Cc", "Cs")), None)
    if bad is None:
        return None  # spaces beyond ASCII and format characters print fine
    return (
        f"holds the control character {bad!r}, which the TSV outputs (skipped.tsv, captions.tsv, butd-tsv) cannot "
        "hold; rename the sample"
    )


def _checked_id(ref: ImageRef) -> ImageRef:
    """`ref`, or a copy skipped as `bad_image_id` under its printable id (see the module docstring)."""
    origin = printable(ref.origin)
    problem = image_id_problem(ref.image_id)
    if problem is None and origin == ref.origin:
        return ref
    if problem is not None and ref.problem is None:
        printed = printable(ref.image_id)
        return dataclasses.replace(
            ref, image_id=printed, origin=origin, problem=("bad_image_id", f"image_id '{printed}' {problem}")
        )
    return dataclasses.replace(ref, image_id=printable(ref.image_id), origin=origin)


def _check_unique(refs: Sequence[ImageRef]) -> list[ImageRef]:
    seen: dict[str, str] = {}
    refs = [_checked_id(ref) for ref in refs]
    for ref in refs:
        if ref.image_id in seen:
            raise ImageSourceError(
                f"duplicate image_id {ref.image_id!r}: {seen[ref.image_id]} and {ref.origin}; expected unique ids "
                "(rename one file, or use --id-style relative for folders)"
            )
        if not ref.image_id.strip():
            raise ImageSourceError(f"{ref.origin}: empty image_id; expected a non-empty id")
        seen[ref.image_id] = ref.origin
    return list(refs)


def _image_id(relative: Path, id_style: str) -> str:
    if id_style == "stem":
        return relative.stem
    return relative.with_suffix("").as_posix()


def list_folder(
    folder: str | os.PathLike, *, id_style: str = "stem", extensions: Iterable[str] = IMAGE_EXTENSIONS
) -> list[ImageRef]:
    """The image files under `folder` (recursively, hidden files and folders left out), sorted by relative path.

    Args:
        folder: the folder to search.
        id_style: "stem" (file name without extension, e.g. Flickr30k "1000092795" or COCO
            "COCO_val2014_000000391895", the ids Karpathy JSON's `filename` style gives) or "relative" (relative
            path without extension, for folders that reuse file names).
        extensions: file extensions counted as images (case-insensitive).

    Returns:
        `ImageRef`s with `path` set.
    """
    if id_style not in ID_STYLES:
        raise ValueError(f"id_style must be one of {ID_STYLES}, got {id_style!r}")
    root = Path(folder)
    if not root.is_dir():
        raise ImageSourceError(f"{root}: no such folder; expected a folder of images")
    wanted = {extension.lower() for extension in extensions}
    found = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if not name.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in wanted:
                found.append((Path(directory) / name).relative_to(root))
    found.sort(key=lambda relative: relative.as_posix())
    return _check_unique(
        [
            ImageRef(_image_id(relative, id_style), str(root / relative), path=root / relative)
            for relative in found
        ]
    )


def list_file(list_path: str | os.PathLike, *, id_style: str = "stem") -> list[ImageRef]:
    """The images named in a list file, one per line: `path` or `path<TAB>image_id`; relative paths are taken
    relative to the list file's folder; blank lines and lines starting with `#` are skipped.

    Files that do not exist are still listed: the runner reports them as skipped ("unreadable") instead of
    stopping the whole run.
    """
    list_path = Path(list_path)
    try:
        # A regular file read with a size cap: a FIFO or /dev/zero as the list would block or fill memory.
        lines = (
            read_input_bytes(list_path, "a list file of images", TEXT_MAX_BYTES).decode("utf-8").splitlines()
        )
    except (NotRegularFileError, InputTooLargeError) as error:
        raise ImageSourceError(str(error)) from None
    except OSError as error:
        raise ImageSourceError(
            f"{list_path}: cannot read the list file ({error.strerror or error})"
        ) from None
    except UnicodeDecodeError as error:
        raise ImageSourceError(
            f"{list_path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    refs = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        columns = text.split("\t")
        if len(columns) > 2 or not columns[0].strip():
            raise ImageSourceError(
                f"{list_path}:{number}: found {len(columns)} tab-separated columns {columns[:3]}; expected "
                "'path' or 'path<TAB>image_id'"
            )
        path = Path(columns[0].strip())
        if not path.is_absolute():
            path = list_path.parent / path
        image_id = columns[1].strip() if len(columns) == 2 else _image_id(Path(columns[0].strip()), id_style)
        refs.append(ImageRef(image_id, f"{path} ({list_path}:{number})", path=path))
    return _check_unique(refs)


class _DatasetRow:
    """Reads the encoded bytes of one row's image lazily (the dataset is memory-mapped, so this costs nothing
    until called)."""

    def __init__(self, dataset, column: str, index: int, base: Path):
        self.dataset, self.column, self.index, self.base = dataset, column, index, base

    def __call__(self) -> bytes | Path:
        value = self.dataset[self.index][self.column]
        if value is None:
            return b""
        if value.get("bytes"):
            return value["bytes"]
        path = Path(value.get("path") or "")
        return path if path.is_absolute() else self.base / path


def list_hf_dataset(
    folder: str | os.PathLike, column: str = "image", *, id_column: str | None = None
) -> list[ImageRef]:
    """The images of a `datasets` Image column in a folder written by `Dataset.save_to_disk`.

    Args:
        folder: the saved dataset (one split; a DatasetDict folder is refused with its split names).
        column: the `datasets.Image` column.
        id_column: a column holding image ids; the row index ("0", "1", ...) when None.
    """
    import datasets

    folder = Path(folder)
    if (folder / "dataset_dict.json").is_file():
        raise ImageSourceError(
            f"{folder}: holds a DatasetDict; expected one split folder (e.g. {folder}/train)"
        )
    try:
        dataset = datasets.load_from_disk(str(folder))
    except FileNotFoundError as error:
        raise ImageSourceError(f"{folder}: not a saved dataset ({error})") from None
    if column not in dataset.column_names:
        raise ImageSourceError(
            f"{folder}: no column {column!r}; expected an Image column among {dataset.column_names}"
        )
    if not isinstance(dataset.features[column], datasets.Image):
        raise ImageSourceError(
            f"{folder}: column {column!r} is {dataset.features[column]!r}; expected a datasets.Image column"
        )
    if id_column is not None and id_column not in dataset.column_names:
        raise ImageSourceError(f"{folder}: no id column {id_column!r}; columns are {dataset.column_names}")
    ids = [str(value) for value in dataset[id_column]] if id_column is not None else None
    raw = dataset.cast_column(column, datasets.Image(decode=False)).select_columns([column])
    return _check_unique(
        [
            ImageRef(
                ids[index] if ids is not None else str(index),
                f"{folder}[{index}]",
                payload=_DatasetRow(raw, column, index, folder),
            )
            for index in range(len(raw))
        ]
    )


def _webdataset_key(name: str) -> tuple[str, str]:
    """Split a tar member name into (key, extension) as webdataset does: the key is everything before the first
    dot of the base name (folders included), the extension everything after it."""
    folder, _, base = name.rpartition("/")
    stem, dot, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower() if dot else ""


def _damage_after(path: Path, offset: int) -> bool:
    """Whether `path` holds anything but zero bytes from `offset` on: tarfile ends its listing quietly at a garbage
    or cut-short header, so a listing that stopped before the end-of-archive padding stopped at damage."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return True
    return False


def _unreadable_shard(shard: Path, message: str) -> ImageRef:
    """The skip that stands for a shard's images that cannot be listed (see the module docstring)."""
    return ImageRef(f"{shard}#", str(shard), problem=("unreadable", f"{shard}: {message}"))


def list_webdataset(shards: Sequence[str | os.PathLike]) -> list[ImageRef]:
    """The images of webdataset tar shards as img2dataset writes them (`{key}.jpg` with `{key}.txt` and
    `{key}.json`), in shard order then tar order. Only headers are read (members are located by offset); samples
    without an image (img2dataset keeps failed downloads only in its parquet) are left out. A damaged or
    unreadable shard becomes an `unreadable` skip (see the module docstring).

    Args:
        shards: uncompressed `.tar` files.
    """
    refs = []
    for shard in shards:
        shard = Path(shard)
        if not shard.exists():
            raise ImageSourceError(f"{shard}: no such file; expected a webdataset .tar shard")
        try:
            check_input_file(shard, "a webdataset .tar shard")  # a FIFO would block the listing for ever
        except NotRegularFileError as error:
            refs.append(_unreadable_shard(shard, str(error).removeprefix(f"{shard}: ")))
            continue
        try:
            archive = tarfile.open(shard, mode="r:")  # uncompressed only: members are read by seeking
        except (tarfile.TarError, OSError) as error:
            refs.append(
                _unreadable_shard(
                    shard,
                    f"not an uncompressed tar ({error}); expected a webdataset .tar shard as img2dataset writes "
                    "(decompress .tar.gz shards first)",
                )
            )
            continue
        chosen: dict[str, tarfile.TarInfo] = {}
        damage = None
        with archive:
            try:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = _webdataset_key(member.name)
                    if extension in WEBDATASET_IMAGE_EXTENSIONS and key not in chosen:
                        chosen[key] = member
            except (tarfile.TarError, OSError) as error:  # "unexpected end of data": cut inside a member
                damage = f"{error} at byte {archive.offset}"
            if damage is None and _damage_after(shard, archive.offset):
                damage = f"no valid tar header at byte {archive.offset}"
        for key, member in chosen.items():
            refs.append(
                ImageRef(
                    key,
                    f"{shard}#{member.name}",
                    tar_path=shard,
                    tar_offset=member.offset_data,
                    tar_size=member.size,
                )
            )
        if damage is not None:
            refs.append(
                _unreadable_shard(
                    shard,
                    f"damaged tar ({damage}, after {len(chosen)} images); the samples after it are lost",
                )
            )
    if refs and all(ref.problem is not None and ref.problem[0] == "unreadable" for ref in refs):
        raise ImageSourceError(f"no readable webdataset shard: {refs[0].problem[1]}")
    return _check_unique(refs)


def webdataset_captions(shards: Sequence[str | os.PathLike]) -> list[tuple[str, str, str]]:
    """(key, caption, url) of every sample with an image in img2dataset shards: the caption from `{key}.txt`,
    the URL from the "url" field of `{key}.json` ("" when absent). Whitespace runs (tabs, newlines) in captions
    become single spaces so that the result can be written as a TSV."""
    import json

    rows = []
    for shard in shards:
        texts: dict[str, str] = {}
        urls: dict[str, str] = {}
        keys: list[str] = []
        try:  # a damaged shard gives the captions before the damage (its images are skipped as unreadable)
            with tarfile.open(shard, mode="r:") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    key, extension = _webdataset_key(member.name)
                    if extension in WEBDATASET_IMAGE_EXTENSIONS and key not in keys:
                        keys.append(key)
                    elif extension == "txt":
                        texts[key] = archive.extractfile(member).read().decode("utf-8", errors="replace")
                    elif extension == "json":
                        try:
                            urls[key] = str(json.loads(archive.extractfile(member).read()).get("url") or "")
                        except (ValueError, AttributeError, RecursionError):
                            urls[key] = ""
        except (tarfile.TarError, OSError):
            pass
        for key in keys:
            if image_id_problem(key) is not None:
                continue  # skipped as bad_image_id: a TAB or newline in the key would break the TSV row
            rows.append((key, " ".join(texts.get(key, "").split()), " ".join(urls.get(key, "").split())))
    return rows


def list_images(
    kind: str,
    inputs: Sequence[str | os.PathLike],
    *,
    id_style: str = "stem",
    image_column: str = "image",
    id_column: str | None = None,
) -> list[ImageRef]:
    """List the images of one source kind (see the table in the module docstring).

    Args:
        kind: one of `SOURCE_KINDS`.
        inputs: folders (folder), list files (list), one saved dataset folder (hf), tar shards (webdataset);
            several folders or list files are listed in the order given and must not share ids.
        id_style, image_column, id_column: see `list_folder` / `list_hf_dataset`.

    Returns:
        `ImageRef`s in a deterministic order, ids unique.
    """
    if kind not in SOURCE_KINDS:
        raise ValueError(f"source kind must be one of {SOURCE_KINDS}, got {kind!r}")
    if not inputs:
        raise ImageSourceError(f"no {kind} input given")
    if kind == "webdataset":
        return list_webdataset(inputs)
    if kind == "hf":
        if len(inputs) != 1:
            raise ImageSourceError(f"--source hf reads one saved dataset folder, got {len(inputs)} inputs")
        return list_hf_dataset(inputs[0], image_column, id_column=id_column)
    lister = list_folder if kind == "folder" else list_file
    refs = []
    for item in inputs:
        refs.extend(lister(item, id_style=id_style))
    return _check_unique(refs)


__all__ = [
    "ID_STYLES",
    "IMAGE_EXTENSIONS",
    "SOURCE_KINDS",
    "ImageRef",
    "ImageSourceError",
    "image_id_problem",
    "list_file",
    "list_folder",
    "list_hf_dataset",
    "list_images",
    "list_webdataset",
    "printable",
    "webdataset_captions",
]
