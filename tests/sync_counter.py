"""Counting host-device synchronisations: every op that reads a tensor's value on the host, or whose output shape
depends on the data, would stall a GPU's stream. Counted on CPU with a `TorchDispatchMode`, so the suite checks it
without a GPU."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a value on the host (scalar reads, truth tests) or size an output by the data.
SYNCING_OPS = {
    "aten::_local_scalar_dense",
    "aten::item",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::equal",
    "aten::unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::repeat_interleave",
    "aten::_coalesce",
    "aten::coalesce",
}


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (indices or ()) if i is not None
    )


class SyncCounter(TorchDispatchMode):
    """Records each synchronising op by name; boolean-mask indexing (`x[mask]`, `x[mask] = v`) counts as
    `bool_mask_index`."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in SYNCING_OPS:
            self.counts[name] += 1
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
            if _has_bool_index(args):
                self.counts["bool_mask_index"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
