"""Files the library reads at run time, found inside the installed package.

They live in `modeling_imagebert/configuration/` (model sizes, pre-training recipes, LAIT's default config and word
lists, accelerate configs); the checkout's top-level `configuration/` is a link to that folder, so the paths the docs
name and the files a wheel ships are the same files. Code never reaches outside the package for them: an install
from a wheel or an index, run from any folder, finds them here.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

_PACKAGE = "modeling_imagebert"
_FOLDER = "configuration"


def data_path(*parts: str, check: bool = True) -> Path:
    """The path of packaged file `configuration/<parts...>`, e.g. `data_path("lait", "default.yaml")`.

    With `check`, raises `FileNotFoundError` naming the file when the install lacks it (a wheel built without its
    package data); without, the path is returned for the reader to report (module-level constants).
    """
    root = resources.files(_PACKAGE).joinpath(_FOLDER)
    if not isinstance(root, Path):  # a zip import: the readers of these files need real paths
        raise FileNotFoundError(
            f"{_PACKAGE}/{_FOLDER}: the package is not installed as files on disk ({type(root).__name__}); "
            "install it with pip (not as a zip) to use its packaged configs"
        )
    path = root.joinpath(*parts)
    if check and not path.exists():
        raise FileNotFoundError(
            f"{path}: missing from the installed package (its package data was not installed); reinstall "
            f"{_PACKAGE} with pip"
        )
    return path


def model_size_names() -> list[str]:
    """Names of the packaged model sizes (`configuration/models/<name>.json`), e.g. "imagebert-base"."""
    return sorted(path.stem for path in data_path("models").glob("*.json"))


def model_size_path(name: str) -> Path:
    """The `ImageBertConfig` JSON of packaged model size `name` ("imagebert-base", "imagebert-tiny")."""
    if name not in model_size_names():
        raise FileNotFoundError(
            f"model size {name!r}: not a packaged size; expected one of {', '.join(model_size_names())} "
            "or the path of an ImageBertConfig JSON file"
        )
    return data_path("models", f"{name}.json")


def demo_recipe_path() -> Path:
    """The built-in demo recipe (`configuration/pretraining/demo.yaml`), the default of `examples/run_pretrain.py`."""
    return data_path("pretraining", "demo.yaml")


__all__ = ["data_path", "demo_recipe_path", "model_size_names", "model_size_path"]
