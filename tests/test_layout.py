"""The remote-code unit (configuration, modeling, processing, and the model's siblings: CPU kernels, losses, task
table) stands alone: it imports only the standard library, torch, transformers, huggingface_hub, safetensors, numpy
(processor) and its sibling files, never the training and data code in `pretraining/`, `retrieval/` or `data/`, so
a Hub folder with these files (`save_pretrained` copies the modeling and configuration files and their relative
imports) loads with `trust_remote_code=True`."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "modeling_imagebert"
REMOTE_CODE = (
    "configuration_imagebert",
    "kernels_imagebert",
    "losses_imagebert",
    "modeling_imagebert",
    "processing_imagebert",
    "tasks_imagebert",
)
ALLOWED_LIBRARIES = {"torch", "transformers", "huggingface_hub", "safetensors"}
# Per file, on top of ALLOWED_LIBRARIES. The processor's `datasets` import is local to the function that
# describes its outputs as Arrow features (only dataset encoding calls it), so loading the processor does not
# need `datasets`.
EXTRA = {"processing_imagebert": {"numpy": "anywhere", "datasets": "in a function"}}


def disallowed_imports(source: str, name: str) -> list[str]:
    """The imports of module `name` (source text) that break the remote-code unit, as "line N: what" strings."""
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    extra = EXTRA.get(name, {})
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [(alias.name, 0) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            modules = [(node.module or "", node.level)]
            if node.level and not node.module:  # `from . import x`: x is the sibling module
                modules = [(alias.name, node.level) for alias in node.names]
        else:
            continue
        for module, level in modules:
            root = module.split(".")[0]
            if level:
                ok = level == 1 and module in REMOTE_CODE
            elif root == "__future__" or root in sys.stdlib_module_names or root in ALLOWED_LIBRARIES:
                ok = True
            else:
                where = extra.get(root)
                ok = where == "anywhere" or (where == "in a function" and id(node) not in top_level)
            if not ok:
                problems.append(f"line {node.lineno}: {'.' * level}{module}")
    return problems


@pytest.mark.parametrize("name", REMOTE_CODE)
def test_remote_code_file_imports_nothing_from_pretraining_retrieval_or_data(name):
    source = (PACKAGE / f"{name}.py").read_text()
    assert disallowed_imports(source, name) == [], f"{name}.py imports outside the remote-code unit"


@pytest.mark.parametrize(
    ("line", "reported"),
    [
        ("from .data.collators import DataCollatorForImageBertPretraining", ".data.collators"),
        ("from .pretraining import recipes", ".pretraining"),
        (
            "from modeling_imagebert.retrieval.metrics import recall_at_k",
            "modeling_imagebert.retrieval.metrics",
        ),
        ("from . import atomic", ".atomic"),
        ("import datasets", "datasets"),
        ("import numpy as np", "numpy"),
    ],
)
def test_an_import_of_training_or_data_code_is_caught(line, reported):
    assert disallowed_imports(f"import torch\n{line}\n", "modeling_imagebert") == [f"line 2: {reported}"]


def test_the_processor_may_import_numpy_and_datasets_only_in_a_function():
    assert disallowed_imports("import numpy\ndef f():\n    import datasets\n", "processing_imagebert") == []
    assert disallowed_imports("import datasets\n", "processing_imagebert") == ["line 1: datasets"]


def test_every_imagebert_module_of_the_package_is_checked_as_remote_code():
    # The unit's files are named `<part>_imagebert.py`: a new sibling must join REMOTE_CODE to be checked above.
    assert sorted(path.stem for path in PACKAGE.glob("*_imagebert.py")) == sorted(REMOTE_CODE)
