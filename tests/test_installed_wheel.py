"""The package as a user installs it: a wheel built from this checkout, installed into a folder of its own and used
from a folder outside the checkout, so nothing can be found through the source tree. Each CLI's `--help`, LAIT's
default config and a LAIT run on a tiny WARC, and a 2-step pre-training run with the packaged demo recipe.

Before the package carried its own data, LAIT read `configuration/lait/default.yaml` through
`Path(__file__).parents[2]`, outside the package: every command below that reads a config failed here.
"""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The packaged files the library reads at run time (modeling_imagebert/package_data.py).
PACKAGED = (
    "modeling_imagebert/configuration/lait/default.yaml",
    "modeling_imagebert/configuration/lait/spam_words.txt",
    "modeling_imagebert/configuration/models/imagebert-base.json",
    "modeling_imagebert/configuration/models/imagebert-tiny.json",
    "modeling_imagebert/configuration/pretraining/demo.yaml",
)


def _source_files(root: Path) -> list[str]:
    """The checkout's files as git sees them (tracked, and new files not ignored): a build from a copy of these
    writes nothing into the checkout and sees no stale build/ or egg-info folder."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, check=True,
    ).stdout  # fmt: skip
    return sorted({name for name in listed.decode().split("\0") if name and (root / name).exists()})


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A folder holding the installed wheel (pip --target), dependencies taken from the test's environment."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files are the source")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    for name in _source_files(ROOT):
        target = source / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target, follow_symlinks=False)
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "--wheel-dir", str(work / "dist"), str(source)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (work / "dist").glob("modeling_imagebert-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        missing = [name for name in PACKAGED if name not in archive.namelist()]
    assert missing == [], f"the wheel lacks package data: {missing}"
    site = work / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    return site


def _run(site: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python *args` in `cwd` (outside the checkout) with the installed wheel first on the path."""
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1", "PYTHONSAFEPATH": "1"}
    env.pop("IMAGEBERT_DEBUG", None)
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# One interpreter runs every CLI's `--help` as `python -m` would (`runpy`, `__main__`), and reports where the package
# and LAIT's default config came from: the import of torch and transformers is paid once, not per command.
_CLI_PROBE = """
import contextlib, io, json, runpy, sys
import modeling_imagebert
from modeling_imagebert.lait import config
report = {"package": modeling_imagebert.__file__, "lait_config": str(config.DEFAULT_CONFIG_PATH),
          "lait_sections": sorted(config.default_config()), "help": {}}
for module in sys.argv[1:]:
    out, sys.argv[1:] = io.StringIO(), ["--help"]
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as stop:
            code = stop.code or 0
    report["help"][module] = [code, out.getvalue()]
print(json.dumps(report))
"""
CLIS = (
    "modeling_imagebert.data.convert",
    "modeling_imagebert.features",
    "modeling_imagebert.features.convert_checkpoints",
    "modeling_imagebert.lait",
)


def test_the_wheel_alone_gives_every_cli_and_lait_its_default_config(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", _CLI_PROBE, *CLIS)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(report["package"]).is_relative_to(installed)  # not the checkout
    assert Path(report["lait_config"]).is_relative_to(installed)
    assert {"pages", "images", "text", "scoring"} <= set(report["lait_sections"])
    for module, (code, text) in report["help"].items():
        assert code == 0 and text.startswith("usage: "), (
            f"python -m {module} --help: exit {code}: {text[:300]}"
        )


def test_lait_runs_on_a_tiny_warc(installed, tmp_path):
    from lait_fixture import MiniWebServer, build_mini_web

    with MiniWebServer(slow_seconds=0.2) as server:
        web = build_mini_web(tmp_path / "crawl", server, seed=0, n_articles=16, n_files=1)
        output = tmp_path / "pairs"
        done = _run(
            installed, tmp_path, "-m", "modeling_imagebert.lait", "run", "--input", *map(str, web.warc_files),
            "--output", str(output), "--processes", "1", "--set", "images.timeout_s=1.0",
            "--set", "engine.site_buckets=2", "--set", "engine.fetch_threads=2",
        )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    import pyarrow.parquet as pq

    kept = [row for row in pq.read_table(output / "pairs.parquet").to_pylist() if row["kept"]]
    assert kept, "a LAIT run on the mini-web kept no pair"


def test_a_two_step_pretraining_run_with_the_packaged_demo_recipe(installed, tmp_path):
    """The checkout's example script, run from elsewhere: its default recipe is the one inside the package."""
    output = tmp_path / "demo"
    done = _run(
        installed, tmp_path, str(ROOT / "examples" / "run_pretrain.py"), "--output_dir", str(output),
        "--no_progress", "--set", "stages.0.max_steps=1", "--set", "stages.1.max_steps=1",
        "--set", "stages.0.datasets.0.toy_world.num_images=64",
        "--set", "stages.1.datasets.0.toy_world.num_images=64",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((output / "pretrain_results.json").read_text())
    assert "demo" in json.dumps(results)
    assert (output / "final" / "model.safetensors").is_file()


def test_no_library_module_reaches_above_the_package_for_files():
    """`Path(__file__).parents[2]`-style paths find the checkout, not an install: packaged files go through
    `modeling_imagebert.package_data` instead. A module that climbs above its own package is named here."""
    import re

    climbing = re.compile(r"__file__\)[^\n]*(\.parents\[\d+\]|(\.parent){2,})")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "modeling_imagebert").rglob("*.py"))
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if climbing.search(line)
    ]
    assert offenders == []
