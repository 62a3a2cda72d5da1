"""Reading pickles without running their code: one restricted unpickler, used wherever a format we read pickles.

`pickle.load` calls any global a file names, so a pickle from the web can run code. The formats we read only
need numpy arrays and plain containers, so `RestrictedUnpickler` admits the globals of an allow-list and refuses
every other one before it is looked up. Each reader picks the list its format needs: `NUMPY_ARRAYS` plus
`PLAIN_VALUES` for the `info` dict of a bottom-up-attention.pytorch `.npz` (`feature_formats/npz.py`), plus
`CHECKPOINT_CONTAINERS` for Detectron2's `.pkl` checkpoints written by Python 2 (`features/convert_checkpoints.py`).
"""

from __future__ import annotations

import pickle
from collections.abc import Collection
from typing import IO, Any

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


__all__ = ["CHECKPOINT_CONTAINERS", "NUMPY_ARRAYS", "PLAIN_VALUES", "RestrictedUnpickler"]
