"""The local LAIT engine: the shared steps (`engine_steps`) in a process pool on this machine, resumable.

Step 1 runs in a process pool over files, each file's candidates written atomically to `_work/candidates/` and the
file added to a done-list; step 2 over `engine.site_buckets` site buckets (a site's bucket is a hash of its name),
each bucket's pairs written atomically to `_work/pairs/` with its own done-list. Memory is bounded by one file
(step 1) or one bucket (step 2) per worker. A killed run started again with the same `--output` skips what its
done-lists hold, so it never duplicates pairs. Step 3 reads only the pairs' metadata columns, then the image bytes
part by part for the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ..atomic import atomic_file, releasing_locks, remove_stale_temporaries_in
from .aggregate import aggregate_pairs
from .config import config_fingerprint
from .engine_steps import PART_SCHEMA, SiteProcessor, extract_candidates, list_inputs, site_bucket
from .outputs import (
    OutputFolderError,
    contact_sheet_groups,
    output_order,
    output_row,
    prepare_output_folder,
    write_json,
    write_pairs_parquet,
    write_reports,
    write_shards,
)
from .records import DropCounter, ImageCandidate
from .scoring import check_scoring_settings

CANDIDATE_SCHEMA = pa.schema([("bucket", pa.int32()), ("site", pa.string()), ("candidate_json", pa.string())])


def _safe_name(path: str) -> str:
    digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:10]
    return f"{digest}-{re.sub(r'[^A-Za-z0-9._-]', '_', os.path.basename(path))[:80]}"


def _read_done(path: Path) -> set[str]:
    if not path.exists():
        return set()
    # A line cut by a kill has no newline yet: only complete lines count.
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    return {line for line in lines[:-1] if line}


def _append_done(path: Path, name: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(name + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def _step1_task(args: tuple[str, str, dict, int]) -> str:
    warc_file, part, config, buckets = args
    candidates, drops = extract_candidates(warc_file, config)
    rows = [
        {"bucket": site_bucket(c.site, buckets), "site": c.site, "candidate_json": json.dumps(c.to_dict())}
        for c in candidates
    ]
    rows.sort(key=lambda r: r["bucket"])
    part_path = Path(part)
    write_json(part_path.with_suffix(".stats.json"), drops.to_dict())
    with atomic_file(part_path) as temp:
        pq.write_table(pa.Table.from_pylist(rows, schema=CANDIDATE_SCHEMA), temp)
    return warc_file


def _step2_task(args: tuple[int, list[str], str, dict]) -> int:
    bucket, candidate_parts, part, config = args
    drops = DropCounter()
    by_site: dict[str, list[ImageCandidate]] = defaultdict(list)
    for path in candidate_parts:
        table = pq.read_table(path, filters=[("bucket", "=", bucket)], columns=["site", "candidate_json"])
        for site, text in zip(
            table.column("site").to_pylist(), table.column("candidate_json").to_pylist(), strict=True
        ):
            by_site[site].append(ImageCandidate.from_dict(json.loads(text)))
    processor = SiteProcessor(config, drops, int(config["engine"]["contact_sheet_examples"]))
    rows = list(processor.process_sites(by_site[site] for site in sorted(by_site)))
    part_path = Path(part)
    write_json(
        part_path.with_suffix(".stats.json"), {"counts": drops.to_dict(), "examples": processor.examples}
    )
    with atomic_file(part_path) as temp:
        pq.write_table(pa.Table.from_pylist(rows, schema=PART_SCHEMA), temp)
    return bucket


def _pool_map(function, tasks: list, processes: int) -> Iterator:
    if processes <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    # fork: workers inherit the imported stage modules instead of importing them again.
    with get_context("fork").Pool(min(processes, len(tasks))) as pool:
        yield from pool.imap_unordered(function, tasks)


@releasing_locks()  # the output folder is locked (claim_folder) while the run runs
def run_local(
    inputs: str | Sequence[str],
    output: str | Path,
    config: Mapping[str, Any],
    *,
    processes: int | None = None,
) -> dict[str, Any]:
    """Runs the pipeline on this machine: `inputs` (glob patterns or paths of WARC / WARC.gz files) ->
    `output` folder (created, or resumed when it is ours with the same config). `processes` overrides
    `engine.processes` (0 = one per core). Output: the stats dict also written to `stats.json`."""
    start = time.monotonic()
    files = list_inputs(inputs)
    output = Path(output)
    config = json.loads(json.dumps(config))
    # Before anything is written: a bad scorer or ITM path stops the run now, not in every worker after step 1.
    check_scoring_settings(config["scoring"])
    prepare_output_folder(output, config_fingerprint(config))
    engine = config["engine"]
    processes = engine["processes"] if processes is None else processes
    processes = processes or os.cpu_count() or 1
    buckets = int(engine["site_buckets"])
    work = output / "_work"
    candidates_dir, pairs_dir = work / "candidates", work / "pairs"
    candidates_dir.mkdir(parents=True, exist_ok=True)
    pairs_dir.mkdir(parents=True, exist_ok=True)
    # The done-lists only mean something for the same inputs: a resume with other files would mix two runs.
    inputs_record = work / "inputs.json"
    if inputs_record.exists():
        previous = json.loads(inputs_record.read_text())
        if previous != {"files": files, "site_buckets": buckets}:
            raise OutputFolderError(
                f"{output}: started with other --input files or engine.site_buckets; give a new --output path "
                "or the same inputs to resume"
            )
    else:
        write_json(inputs_record, {"files": files, "site_buckets": buckets})
    # Temporary siblings a killed run left behind (the shards folder's are removed by `write_shards`).
    for folder in (output, work, candidates_dir, pairs_dir):
        remove_stale_temporaries_in(folder)

    # Step 1, resumable by input file.
    done_files = _read_done(work / "done-files.txt")
    parts = {f: str(candidates_dir / f"{_safe_name(f)}.parquet") for f in files}
    tasks = [(f, parts[f], config, buckets) for f in files if f not in done_files]
    for finished in _pool_map(_step1_task, tasks, processes):
        _append_done(work / "done-files.txt", finished)

    # Step 2, resumable by site bucket; it needs every file's candidates, so it starts after step 1.
    done_buckets = _read_done(work / "done-buckets.txt")
    candidate_parts = [parts[f] for f in files]
    pair_parts = {b: str(pairs_dir / f"bucket-{b:05d}.parquet") for b in range(buckets)}
    tasks2 = [
        (b, candidate_parts, pair_parts[b], config) for b in range(buckets) if str(b) not in done_buckets
    ]
    for finished in _pool_map(_step2_task, tasks2, processes):
        _append_done(work / "done-buckets.txt", str(finished))

    # Step 3: aggregation over the metadata columns of all parts.
    counts = DropCounter()
    for f in files:
        counts.merge(DropCounter.from_dict(json.loads(Path(parts[f]).with_suffix(".stats.json").read_text())))
    stage2_examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    metadata: list[dict[str, Any]] = []
    meta_columns = [name for name in PART_SCHEMA.names if name != "image_jpeg"]
    for b in range(buckets):
        info = json.loads(Path(pair_parts[b]).with_suffix(".stats.json").read_text())
        counts.merge(DropCounter.from_dict(info["counts"]))
        for reason, items in info["examples"].items():
            stage2_examples[reason].extend(items)
        table = pq.read_table(pair_parts[b], columns=meta_columns)
        for i, row in enumerate(table.to_pylist()):
            row.update(part=b, row_index=i)
            metadata.append(row)
    for reason in stage2_examples:
        stage2_examples[reason] = sorted(stage2_examples[reason], key=lambda e: e["image_url"])[
            : int(engine["contact_sheet_examples"])
        ]
    for row in metadata:
        if not row["passed_scoring"]:
            row.update(kept=False, drop_stage="scoring", drop_reason="below_threshold")
    aggregate_pairs(metadata, config["aggregation"], counts)
    metadata.sort(key=output_order)
    written = write_pairs_parquet(
        output / "pairs.parquet",
        (output_row(r, r["kept"], r["drop_stage"], r["drop_reason"]) for r in metadata),
    )

    # Shards and examples: image bytes read part by part (one bucket's bytes in memory at a time).
    n_examples = int(engine["contact_sheet_examples"])
    wanted: dict[int, dict[int, str]] = defaultdict(dict)
    group_count: dict[str, int] = defaultdict(int)
    for row in metadata:
        group = "kept" if row["kept"] else row["drop_reason"]
        if row["kept"]:
            wanted[row["part"]][row["row_index"]] = "kept"
        elif group_count[group] < n_examples:
            wanted[row["part"]][row["row_index"]] = group
        group_count[group] += 1
    kept_total = sum(1 for r in metadata if r["kept"])
    examples_kept: list[tuple[Mapping[str, Any], bytes | None]] = []
    dropped_examples: dict[str, list[tuple[Mapping[str, Any], bytes | None]]] = defaultdict(list)
    by_part_row = {(r["part"], r["row_index"]): r for r in metadata}

    def samples() -> Iterator[tuple[Mapping[str, Any], bytes]]:
        for b in sorted(wanted):
            images = pq.read_table(pair_parts[b], columns=["image_jpeg"]).column("image_jpeg")
            for index in sorted(wanted[b]):
                row = by_part_row[(b, index)]
                jpeg = images[index].as_py()
                group = wanted[b][index]
                out = output_row(row, row["kept"], row["drop_stage"], row["drop_reason"])
                if group == "kept":
                    if len(examples_kept) < n_examples:
                        examples_kept.append((out, jpeg))
                    yield out, jpeg
                else:
                    dropped_examples[group].append((out, jpeg))

    shard_names = write_shards(output, samples(), int(engine["shard_size"]))
    return write_reports(
        output,
        engine="local",
        inputs=files,
        counts=counts,
        pairs_written=written,
        kept=kept_total,
        shard_names=shard_names,
        examples=contact_sheet_groups(examples_kept, dropped_examples, stage2_examples),
        seconds=time.monotonic() - start,
    )


__all__ = ["CANDIDATE_SCHEMA", "run_local"]
