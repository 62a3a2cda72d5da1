"""Lazy package namespaces: `import modeling_imagebert.data` (or `.features`, `.lait`) costs nothing until a name
is used, and each module of the package can be imported alone.

A package's `__init__.py` lists its public names and the module each lives in, then hands the table to
`lazy_getattr`; the module is imported on the first access of one of its names (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module-level `__getattr__` of `package` (its `__name__`) serving `exports`.

    Args:
        package: the package's `__name__`, e.g. "modeling_imagebert.lait".
        exports: public name -> the submodule (relative to `package`) that defines it.

    Returns:
        A function that imports `package.<module>` on first use of one of its names and returns the attribute;
        any other name raises AttributeError, as a plain module does.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f".{exports[name]}", package)
        return getattr(module, name)

    return __getattr__


__all__ = ["lazy_getattr"]
