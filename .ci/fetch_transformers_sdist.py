"""Fetch and unpack the tests of the transformers source distribution matching the installed transformers.

`tests/test_modeling_common_suite.py` runs transformers' own common model tests (`ModelTesterMixin`,
`ConfigTester`) against our classes; they ship in the sdist only, not in the wheel. This script downloads the
sdist with `pip download --no-binary :all: --no-deps transformers==<installed>`, unpacks its `tests/` folder into
`<cache>/<version>/transformers-<version>/` (reused when present) and prints that folder, the value for the
`TRANSFORMERS_SDIST_DIR` environment variable the test file reads.

    TRANSFORMERS_SDIST_DIR=$(python .ci/fetch_transformers_sdist.py) python -m pytest tests/test_modeling_common_suite.py

Cache: `$IMAGEBERT_CACHE_DIR` or `~/.cache/modeling_imagebert`, under `transformers-sdist/<version>/`.
`--archive FILE` unpacks an sdist already on disk instead of downloading it (offline machines).
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

# The sdist's files the common suite needs (its `tests/*.py`) and the top-level PKG-INFO naming the version.
_NEEDED = ("tests/", "PKG-INFO")


def cache_root() -> Path:
    """`$IMAGEBERT_CACHE_DIR` or `~/.cache/modeling_imagebert`, the folder all our cached downloads live under."""
    return Path(os.environ.get("IMAGEBERT_CACHE_DIR") or Path.home() / ".cache" / "modeling_imagebert")


def unpack(archive: Path, version: str, target: Path) -> Path:
    """Unpack the `tests/` folder of the transformers sdist `archive` into `target` (created atomically: a temp
    sibling renamed into place, so a killed run leaves it complete or absent). Returns `target`.
    Raises `SystemExit` when `archive` is not the sdist of `version`."""
    prefix = f"transformers-{version}/"
    with tarfile.open(archive) as tar:
        members = [
            m
            for m in tar.getmembers()
            if m.name.startswith(prefix) and m.name[len(prefix) :].startswith(_NEEDED)
        ]
        if not any(m.name == f"{prefix}tests/test_modeling_common.py" for m in members):
            raise SystemExit(
                f"{archive}: not the transformers {version} sdist (no {prefix}tests/test_modeling_common.py)"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=target.parent))
        # filter="data" refuses absolute paths, links out of the folder and device files.
        tar.extractall(staging, members=members, filter="data")
    os.replace(staging / prefix.rstrip("/"), target)
    staging.rmdir()
    return target


def download(version: str, into: Path) -> Path:
    """Download the transformers `version` sdist into the folder `into` with pip; returns the archive's path."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            f"transformers=={version}",
            "--dest",
            str(into),
        ],
        check=True,
        stdout=sys.stderr,
    )
    archives = sorted(into.glob(f"transformers-{version}.tar.gz"))
    if not archives:
        raise SystemExit(f"pip download left no transformers-{version}.tar.gz in {into}")
    return archives[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--archive", type=Path, help="an sdist already on disk, unpacked instead of downloading"
    )
    args = parser.parse_args(argv)

    import transformers

    version = transformers.__version__
    target = cache_root() / "transformers-sdist" / version / f"transformers-{version}"
    if not (target / "tests" / "test_modeling_common.py").is_file():
        if args.archive is not None:
            unpack(args.archive, version, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
                unpack(download(version, Path(scratch)), version, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
