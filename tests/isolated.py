"""Running a script in a fresh Python process where this package cannot be imported (as a Hub user without it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = str(Path(__file__).resolve().parents[1])


def run_without_package(script: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    """Runs `script` outside the repository with the package hidden (an editable install must not leak it in) and
    the Hub offline; the script starts by asserting that `modeling_imagebert` cannot be found."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(Path(cwd) / "modules"))
    prelude = (
        "import site; site.main()\n"
        "import sys; sys.meta_path = [f for f in sys.meta_path "
        "if 'editable' not in (getattr(f, '__module__', '') + type(f).__module__).lower()]\n"
        f"sys.path = [p for p in sys.path if p not in ('', {REPO!r})]\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('modeling_imagebert') is None, 'package must not be importable here'\n"
    )
    return subprocess.run(
        [sys.executable, "-S", "-c", prelude + script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
