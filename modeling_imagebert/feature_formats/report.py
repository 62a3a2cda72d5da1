"""What every reader of a source file reports: the one-line `ImportFormatError` it raises on bad input, and the
`ImportReport` that counts what an import read, wrote and skipped, by reason.

Shared by the feature readers of this package and the caption readers and join of `data/importers`: pass one
report to all of them to collect one import's counts in one place. With `on_error="skip"` a bad record is counted
and its message kept (`ImportReport.skip`), never silently dropped.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

_ON_ERROR = ("raise", "skip")
_MAX_REPORT_MESSAGES = 20


class ImportFormatError(ValueError):
    """A source file does not hold what its format promises.

    The message is one line naming the file, the line or record, the image id and the field; the same facts
    are kept as attributes (`source`, `line`, `image_id`, `field`, `reason`) for programmatic use. `reason`
    is a short key (e.g. "bad_base64") used to count skips in an `ImportReport`.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | os.PathLike | None = None,
        line: int | None = None,
        image_id: str | None = None,
        field: str | None = None,
        reason: str = "invalid",
    ):
        self.source = None if source is None else str(source)
        self.line = line
        self.image_id = image_id
        self.field = field
        self.reason = reason
        where = []
        if self.source is not None:
            where.append(self.source + (f":{line}" if line is not None else ""))
        elif line is not None:
            where.append(f"line {line}")
        if image_id is not None:
            where.append(f"image_id={image_id!r}")
        if field is not None:
            where.append(f"field {field!r}")
        prefix = ", ".join(where)
        full = f"{prefix}: {message}" if prefix else message
        super().__init__(" ".join(full.split("\n")))


@dataclass
class ImportReport:
    """Counts of what an import read, wrote and skipped, by reason.

    Pass one instance to the readers and to `build_pair_dataset` to collect everything in one place.
    `skipped` maps a reason key (e.g. "bad_base64", "missing_image", "duplicate_image_id") to a count;
    `messages` keeps the first few full error messages for each reason.
    """

    images_read: int = 0
    captions_read: int = 0
    rows_written: int = 0
    skipped: Counter = field(default_factory=Counter)
    messages: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, message: str) -> None:
        """Count one skipped record under `reason` and keep its message (the first few per reason)."""
        self.skipped[reason] += 1
        kept = self.messages.setdefault(reason, [])
        if len(kept) < _MAX_REPORT_MESSAGES:
            kept.append(message)

    def skip_or_raise(self, failure: ImportFormatError, on_error: str) -> None:
        """With `on_error="raise"` re-raise `failure`; otherwise count it as a skip (see `skip`)."""
        if on_error == "raise":
            raise failure
        self.skip(failure.reason, str(failure))

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """A short multi-line human-readable summary."""
        lines = [
            f"images read: {self.images_read}",
            f"captions read: {self.captions_read}",
            f"rows written: {self.rows_written}",
        ]
        if self.skipped:
            lines.append(f"skipped: {self.total_skipped}")
            for reason, count in sorted(self.skipped.items()):
                example = self.messages.get(reason, [""])[0]
                lines.append(f"  {reason}: {count}" + (f" (first: {example})" if example else ""))
        else:
            lines.append("skipped: 0")
        return "\n".join(lines)


def check_on_error(on_error: str, name: str = "on_error") -> None:
    """Raises ValueError naming the argument `name` unless `on_error` is "raise" or "skip"."""
    if on_error not in _ON_ERROR:
        raise ValueError(f"{name} must be one of {_ON_ERROR}, got {on_error!r}")


def log_skips(report: ImportReport, what: str, before: Counter) -> None:
    """Logs one warning with the skips `report` counted since it held `before` (a copy of `report.skipped`)."""
    new = report.skipped - before
    if new:
        details = ", ".join(f"{reason}: {count}" for reason, count in sorted(new.items()))
        logger.warning("%s: skipped %d record(s) (%s)", what, sum(new.values()), details)


__all__ = ["ImportFormatError", "ImportReport", "check_on_error", "log_skips"]
