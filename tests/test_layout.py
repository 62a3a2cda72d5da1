"""The package's layout holds.

The remote-code unit (configuration, modeling, processing, and the model's siblings: CPU kernels, losses, task
table) stands alone: it imports only the standard library, torch, transformers, huggingface_hub, safetensors, numpy
(processor and its detection half) and its sibling files, never the training and data code in `pretraining/`,
`retrieval/` or `data/`, so a Hub folder with these files (`save_pretrained` copies the modeling and configuration files and their relative
imports) loads with `trust_remote_code=True`. The BUTD detector's files in `features/` (config,
model, image processor, image decoding) are a second such unit: `save_pretrained` copies them into the detector's
folder (and a processor's `detector/` subfolder), so they import only those libraries, torchvision, PIL and each
other.

Imports run one way between the subpackages (DESIGN.md's layout): remote-code unit <- `data/` <- `features/` <-
`pretraining/` <- `retrieval/` <- `lait/` <- `app/`, a package importing only those before it; the shared mechanisms
(top-level modules such as `atomic.py`, `cli.py`, `safe_loading.py`, and `feature_formats/`) live below all of
them and import none."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "modeling_imagebert"
REMOTE_CODE = (
    "configuration_imagebert",
    "detection_imagebert",
    "image_processing_imagebert",
    "kernels_imagebert",
    "losses_imagebert",
    "modeling_imagebert",
    "pipeline_imagebert",
    "processing_imagebert",
    "tasks_imagebert",
)
ALLOWED_LIBRARIES = {"torch", "transformers", "huggingface_hub", "safetensors"}
# Per file, on top of ALLOWED_LIBRARIES. The processor's `datasets` import is local to the function that
# describes its outputs as Arrow features (only dataset encoding calls it), so loading the processor does not
# need `datasets`.
EXTRA = {
    "processing_imagebert": {"numpy": "anywhere", "datasets": "in a function"},
    "detection_imagebert": {"numpy": "anywhere"},
}


# The detector's remote-code unit, in modeling_imagebert/features/.
DETECTOR_CODE = ("configuration_butd", "modeling_butd", "image_processing_butd", "images")
DETECTOR_LIBRARIES = ALLOWED_LIBRARIES | {"numpy", "torchvision", "PIL"}


def disallowed_imports(
    source: str, name: str, siblings: tuple[str, ...] = REMOTE_CODE, libraries: set[str] = ALLOWED_LIBRARIES
) -> list[str]:
    """The imports of module `name` (source text) that break its remote-code unit (`siblings`, which may import
    `libraries` and each other), as "line N: what" strings."""
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
                ok = level == 1 and module in siblings
            elif root == "__future__" or root in sys.stdlib_module_names or root in libraries:
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


@pytest.mark.parametrize("name", DETECTOR_CODE)
def test_detector_remote_code_file_imports_only_its_libraries_and_siblings(name):
    source = (PACKAGE / "features" / f"{name}.py").read_text()
    problems = disallowed_imports(source, name, DETECTOR_CODE, DETECTOR_LIBRARIES)
    assert problems == [], f"features/{name}.py imports outside the detector's remote-code files"


def test_an_import_of_package_code_in_the_detector_files_is_caught():
    source = (
        "import PIL\nfrom .images import decode_image\nfrom ..atomic import atomic_write_text\nimport yaml\n"
    )
    assert disallowed_imports(source, "modeling_butd", DETECTOR_CODE, DETECTOR_LIBRARIES) == [
        "line 3: ..atomic",
        "line 4: yaml",
    ]


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


# --------------------------------------------------------------------------------------------------------------
# One-way imports between the subpackages
# --------------------------------------------------------------------------------------------------------------

LAYERS = (
    "data",
    "features",
    "pretraining",
    "retrieval",
    "lait",
    "app",
)  # each may import only those before it


def room_of(module: str) -> str | None:
    """The room of a dotted module name: a name of LAYERS, "remote code", "shared" (every other module of the
    package), or None outside the package (and for the package itself, whose `__init__` exports the model)."""
    parts = module.split(".")
    if parts[0] != PACKAGE.name or len(parts) == 1:
        return None
    if parts[1] in LAYERS:
        return parts[1]
    return "remote code" if parts[1] in REMOTE_CODE else "shared"


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `source`, the text of module `module` (a package's
    `__init__` when `is_package`); `from x import y` gives "x.y", as y may be a module."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """The imports of `module` (see `imported_modules`) that run against the layout, as "line N: name (why)":
    a layer importing a later layer, or a shared module importing any layer."""
    room = room_of(module)
    if room not in (*LAYERS, "shared"):
        return []  # the remote-code unit has its own, stricter test above; the package root exports the model
    problems = []
    for line, name in imported_modules(source, module, is_package):
        target = room_of(name)
        if target not in LAYERS:
            continue
        if room == "shared":
            problems.append(f"line {line}: {name} (a shared module imports {target}/)")
        elif LAYERS.index(target) > LAYERS.index(room):
            problems.append(f"line {line}: {name} ({room}/ imports {target}/, which comes after it)")
    return problems


def _package_modules() -> list[tuple[str, Path, bool]]:
    """(dotted name, file, whether it is a package's `__init__`) of every module of the package."""
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        is_package = relative.name == "__init__"
        parts = relative.parts[:-1] if is_package else relative.parts
        modules.append((".".join(parts), path, is_package))
    return modules


@pytest.mark.parametrize(
    ("module", "path", "is_package"), [pytest.param(*entry, id=entry[0]) for entry in _package_modules()]
)
def test_no_import_runs_back_up_the_layers(module, path, is_package):
    assert upward_imports(path.read_text(), module, is_package) == []


def test_every_layer_is_found_and_the_feature_formats_count_as_shared():
    rooms = {room_of(module) for module, _, _ in _package_modules()}
    assert rooms == {*LAYERS, "remote code", "shared", None}
    assert room_of("modeling_imagebert.feature_formats.npz") == "shared"


@pytest.mark.parametrize(
    ("module", "line", "reported"),
    [
        (
            "modeling_imagebert.data.loading",
            "from ..pretraining.recipes import RecipeError",
            "line 2: modeling_imagebert.pretraining.recipes.RecipeError (data/ imports pretraining/, which comes "
            "after it)",
        ),
        (
            "modeling_imagebert.data.convert",
            "    from ..features.runner import iter_extracted_records",
            "line 2: modeling_imagebert.features.runner.iter_extracted_records (data/ imports features/, which "
            "comes after it)",
        ),
        (
            "modeling_imagebert.retrieval.metrics",
            "import modeling_imagebert.lait.text",
            "line 2: modeling_imagebert.lait.text (retrieval/ imports lait/, which comes after it)",
        ),
        (
            "modeling_imagebert.features.runner",
            "from .. import retrieval",
            "line 2: modeling_imagebert.retrieval (features/ imports retrieval/, which comes after it)",
        ),
        (
            "modeling_imagebert.atomic",
            "from .data.schema import DataValidationError",
            "line 2: modeling_imagebert.data.schema.DataValidationError (a shared module imports data/)",
        ),
        (
            "modeling_imagebert.feature_formats.butd_tsv",
            "from ..data.importers import ImportReport",
            "line 2: modeling_imagebert.data.importers.ImportReport (a shared module imports data/)",
        ),
    ],
)
def test_a_planted_upward_import_is_caught(module, line, reported):
    source = f"import numpy as np\n{line}\n" if not line.startswith(" ") else f"def f():\n{line}\n"
    assert upward_imports(source, module) == [reported]


def test_imports_down_the_layers_and_of_shared_modules_pass():
    source = (
        "from ..atomic import atomic_write_text\n"
        "from ..feature_formats import read_butd_tsv\n"
        "from ..data.collators import DataCollatorForImageBertPretraining\n"
        "from ..processing_imagebert import ImageBertProcessor\n"
        "from . import recipes\n"
        "from .recipes import RecipeError\n"
    )
    assert upward_imports(source, "modeling_imagebert.pretraining.schedule") == []
    # In a package's __init__, "." is the package itself.
    assert upward_imports("from .runner import run_extraction\n", "modeling_imagebert.features", True) == []
    assert upward_imports("from .. import lait\n", "modeling_imagebert.features", True) == [
        "line 1: modeling_imagebert.lait (features/ imports lait/, which comes after it)"
    ]


def test_every_imagebert_module_of_the_package_is_checked_as_remote_code():
    # The unit's files are named `<part>_imagebert.py`: a new sibling must join REMOTE_CODE to be checked above.
    assert sorted(path.stem for path in PACKAGE.glob("*_imagebert.py")) == sorted(REMOTE_CODE)
