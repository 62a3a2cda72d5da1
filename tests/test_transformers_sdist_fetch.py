"""The helper that fetches transformers' common model tests (`.ci/fetch_transformers_sdist.py`), on synthetic
archives: nothing is downloaded."""

import importlib.util
import io
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_fetcher():
    spec = importlib.util.spec_from_file_location(
        "fetch_transformers_sdist", REPO / ".ci" / "fetch_transformers_sdist.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sdist(path: Path, version: str, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"transformers-{version}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_unpack_keeps_only_the_tests_and_pkg_info(tmp_path):
    fetcher = _load_fetcher()
    archive = _sdist(
        tmp_path / "t.tar.gz",
        "9.9.9",
        {
            "PKG-INFO": "Version: 9.9.9\n",
            "tests/test_modeling_common.py": "X = 1\n",
            "tests/test_configuration_common.py": "Y = 2\n",
            "src/transformers/__init__.py": "",
            "setup.py": "",
        },
    )
    target = tmp_path / "cache" / "9.9.9" / "transformers-9.9.9"
    assert fetcher.unpack(archive, "9.9.9", target) == target
    kept = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert kept == ["PKG-INFO", "tests/test_configuration_common.py", "tests/test_modeling_common.py"]
    # No staging folder is left beside the result.
    assert [p.name for p in target.parent.iterdir()] == ["transformers-9.9.9"]


def test_unpack_refuses_an_archive_of_another_version(tmp_path):
    fetcher = _load_fetcher()
    archive = _sdist(tmp_path / "t.tar.gz", "1.0.0", {"tests/test_modeling_common.py": ""})
    target = tmp_path / "cache" / "transformers-9.9.9"
    with pytest.raises(SystemExit, match=r"t\.tar\.gz: not the transformers 9\.9\.9 sdist"):
        fetcher.unpack(archive, "9.9.9", target)
    assert not target.exists()


def test_fetch_reuses_the_cached_copy_without_downloading(tmp_path, monkeypatch, capsys):
    import transformers

    fetcher = _load_fetcher()
    version = transformers.__version__
    cached = tmp_path / "transformers-sdist" / version / f"transformers-{version}"
    (cached / "tests").mkdir(parents=True)
    (cached / "tests" / "test_modeling_common.py").write_text("")
    monkeypatch.setenv("IMAGEBERT_CACHE_DIR", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although a cached copy exists")

    monkeypatch.setattr(fetcher, "download", no_download)
    assert fetcher.main([]) == 0
    assert capsys.readouterr().out.strip() == str(cached)
