"""Length-grouped sampling: batches of examples of similar length, so that padding to the longest in the batch is cheap.

Real data has 10-100 regions per image and captions of 8-40 tokens; the processor and the collators pad each batch
only to its longest example, and the model's cost grows with the padded length. `LengthGroupedSampler` draws a
seeded random permutation each epoch, cuts it into mega-batches of `batch_size * mega_batch_multiplier` examples,
sorts each mega-batch by length (text tokens + regions) and cuts it into batches, then shuffles the batch order. The
order is a pure function of (seed, epoch, lengths), and `state_dict` / `load_state_dict` resume mid-epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


def example_lengths(dataset: Any) -> list[int]:
    """Length of each encoded example: text tokens + regions (+ 1 for a global-image feature).

    Args:
        dataset: a sequence of encoded examples (dicts from `ImageBertProcessor.encode_record`) or a `datasets.Dataset`
            with their columns (`input_ids` and `region_locations`; the small columns are read, not the features).

    Returns:
        list[int] of the dataset's length.
    """
    if hasattr(dataset, "column_names") and hasattr(dataset, "select_columns"):
        missing = [name for name in ("input_ids", "region_locations") if name not in dataset.column_names]
        if missing:
            raise ValueError(
                f"example_lengths: the dataset has no column(s) {missing}; encode it with the processor first "
                f"(columns found: {dataset.column_names})"
            )
        columns = dataset.select_columns(["input_ids", "region_locations"]).with_format(None)
        return [
            len(ids) + len(loc)
            for ids, loc in zip(columns["input_ids"], columns["region_locations"], strict=True)
        ]
    lengths = []
    for index, example in enumerate(dataset):
        if not isinstance(example, Mapping) or "input_ids" not in example:
            raise ValueError(
                f"example_lengths: example {index} has no input_ids (expected encoded examples from "
                f"ImageBertProcessor.encode_record)"
            )
        regions = example.get("region_features")
        if regions is None:
            regions = example.get("region_locations", ())
        lengths.append(
            len(example["input_ids"]) + len(regions) + int(example.get("global_feature") is not None)
        )
    return lengths


class LengthGroupedSampler(Sampler[int]):
    """Yields dataset indices so that consecutive groups of `batch_size` have similar lengths.

    Args:
        lengths: int [N], the length of each example (see `example_lengths`).
        batch_size: B, the DataLoader's batch size (the grouping unit).
        seed (0): the permutation of epoch e derives from (seed, e) only.
        mega_batch_multiplier (50): examples are sorted by length within windows of B * multiplier shuffled examples;
            larger groups pad less, smaller ones keep more randomness.
        drop_last (False): drop the last, incomplete batch of each epoch.

    Every index appears exactly once per epoch (except the dropped tail with `drop_last`). Call `set_epoch(e)` before
    each epoch. `state_dict()` gives {"seed", "epoch", "start"}; set `start` to the number of samples already
    consumed in that epoch (the sampler counts what it has yielded, which a prefetching DataLoader over-counts: prefer
    passing the trainer's own count to `load_state_dict`) and the sampler resumes with the next index of the same
    order.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int = 0,
        mega_batch_multiplier: int = 50,
        drop_last: bool = False,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"LengthGroupedSampler: batch_size must be a positive int, got {batch_size!r}")
        if (
            isinstance(mega_batch_multiplier, bool)
            or not isinstance(mega_batch_multiplier, int)
            or mega_batch_multiplier < 1
        ):
            raise ValueError(
                f"LengthGroupedSampler: mega_batch_multiplier must be a positive int, got {mega_batch_multiplier!r}"
            )
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        if self.lengths.dim() != 1:
            raise ValueError(
                f"LengthGroupedSampler: lengths must be one int per example, got shape {tuple(self.lengths.shape)}"
            )
        if len(self.lengths) and int(self.lengths.min()) < 0:
            bad = int(torch.nonzero(self.lengths < 0)[0])
            raise ValueError(
                f"LengthGroupedSampler: lengths[{bad}] is {int(self.lengths[bad])}; expected >= 0"
            )
        self.batch_size = batch_size
        self.seed = int(seed)
        self.mega_batch_multiplier = mega_batch_multiplier
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch` and start it from the beginning."""
        self.epoch = int(epoch)
        self.start = 0

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Resume: the next iteration yields the order of `state["epoch"]` from position `state["start"]`."""
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"LengthGroupedSampler.load_state_dict: the state was saved with seed {state['seed']}, this sampler "
                f"has seed {self.seed}; the order would differ"
            )
        start = int(state["start"])
        if not 0 <= start <= len(self):
            raise ValueError(
                f"LengthGroupedSampler.load_state_dict: start {start} is outside [0, {len(self)}]"
            )
        self.epoch = int(state["epoch"])
        self.start = start

    def order(self, epoch: int | None = None) -> list[int]:
        """The full index order of `epoch` (default: the current one), before resuming and `drop_last`."""
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        permutation = torch.randperm(len(self.lengths), generator=generator)
        window = self.batch_size * self.mega_batch_multiplier
        batches = []
        for begin in range(0, len(permutation), window):
            mega = permutation[begin : begin + window]
            # Stable sort, longest first, so ties keep the random order.
            mega = mega[torch.sort(self.lengths[mega], descending=True, stable=True).indices]
            batches.extend(mega.split(self.batch_size))
        # Keep the incomplete batch (if any) last, shuffle the order of the full ones.
        tail = [batches.pop()] if batches and len(batches[-1]) < self.batch_size else []
        batch_order = torch.randperm(len(batches), generator=generator).tolist()
        ordered = [batches[i] for i in batch_order] + tail
        return torch.cat(ordered).tolist() if ordered else []

    def __len__(self) -> int:
        if self.drop_last:
            return len(self.lengths) // self.batch_size * self.batch_size
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        indices = self.order()[: len(self)]
        start = self.start if self.start < len(indices) else 0  # a finished epoch iterated again starts over
        for position in range(start, len(indices)):
            self.start = position + 1
            yield indices[position]
