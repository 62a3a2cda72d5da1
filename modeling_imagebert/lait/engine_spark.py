"""The Spark LAIT engine: the shared steps (`engine_steps`) as PySpark transformations.

Step 1 runs in `mapPartitions` over the input files, step 2 after a `groupByKey(site)`, step 3 as DataFrame
group-bys (`countDistinct` of images per description, `row_number` over a window per image hash ordered by
`aggregate.PAIR_ORDER`). On a cluster the input and output paths must be on a filesystem every executor and the
driver see (NFS, a FUSE-mounted bucket); see docs/lait.md for the spark-submit line.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..atomic import releasing_locks
from .aggregate import PAIR_ORDER
from .config import config_fingerprint
from .engine_steps import PART_SCHEMA, SiteProcessor, extract_candidates, list_inputs
from .outputs import (
    OUTPUT_ORDER,
    contact_sheet_groups,
    output_row,
    prepare_output_folder,
    write_pairs_parquet,
    write_reports,
    write_shards,
)
from .records import DropCounter, ImageCandidate
from .scoring import check_scoring_settings


def _spark_step1(config: dict):
    def run(files: Iterable[str]) -> Iterator[tuple]:
        for warc_file in files:
            candidates, drops = extract_candidates(warc_file, config)
            yield ("drops", json.dumps(drops.to_dict()), "")
            for candidate in candidates:
                yield ("candidate", candidate.site, json.dumps(candidate.to_dict()))

    return run


def _spark_step2(config: dict):
    def run(groups: Iterable[tuple[str, Iterable[str]]]) -> Iterator[tuple]:
        drops = DropCounter()
        processor = SiteProcessor(config, drops, int(config["engine"]["contact_sheet_examples"]))
        sites = ([ImageCandidate.from_dict(json.loads(t)) for t in texts] for _site, texts in groups)
        for row in processor.process_sites(sites):
            yield ("pair", row)
        yield ("drops", {"counts": drops.to_dict(), "examples": dict(processor.examples)})

    return run


def spark_session(master: str | None = None, app_name: str = "lait"):
    """The active SparkSession, or a new one on `master`; None = the master spark-submit set (`--master`), or
    `local[*]` when run outside spark-submit."""
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    builder = (
        SparkSession.builder.appName(app_name)
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
    )
    if master:
        builder = builder.master(master)
    elif not SparkConf().contains("spark.master"):
        # Under spark-submit the JVM already carries --master in its system properties: never override it.
        builder = builder.master("local[*]")
    return builder.getOrCreate()


@releasing_locks()  # the output folder is locked (claim_folder) while the run runs
def run_spark(
    inputs: str | Sequence[str], output: str | Path, config: Mapping[str, Any], *, spark=None
) -> dict[str, Any]:
    """Runs the pipeline on Spark: the same stage functions in `mapPartitions`, the group steps as Spark
    group-bys. `spark` is a SparkSession (None = `spark_session(engine.spark_master)`). Output folder and stats as
    `run_local`; a Spark run is not resumable (Spark retries failed tasks itself), but its outputs are still
    written atomically."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    start = time.monotonic()
    files = list_inputs(inputs)
    output = Path(output)
    config = json.loads(json.dumps(config))
    check_scoring_settings(config["scoring"])
    prepare_output_folder(output, config_fingerprint(config))
    engine = config["engine"]
    spark = spark or spark_session(engine["spark_master"])
    sc = spark.sparkContext
    partitions = int(engine["spark_partitions"] or len(files))
    # The group-bys of step 3 shuffle into spark.sql.shuffle.partitions (200 by default): far too many tasks for
    # a few files; match the input parallelism instead.
    spark.conf.set("spark.sql.shuffle.partitions", str(partitions))

    step1 = sc.parallelize(files, min(partitions, len(files))).mapPartitions(_spark_step1(config)).cache()
    counts = DropCounter()
    for text in step1.filter(lambda t: t[0] == "drops").map(lambda t: t[1]).collect():
        counts.merge(DropCounter.from_dict(json.loads(text)))
    by_site = step1.filter(lambda t: t[0] == "candidate").map(lambda t: (t[1], t[2])).groupByKey(partitions)
    step2 = by_site.mapPartitions(_spark_step2(config)).cache()
    stage2_examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for info in step2.filter(lambda t: t[0] == "drops").map(lambda t: t[1]).collect():
        counts.merge(DropCounter.from_dict(info["counts"]))
        for reason, items in info["examples"].items():
            stage2_examples[reason].extend(items)
    n_examples = int(engine["contact_sheet_examples"])
    for reason in stage2_examples:
        stage2_examples[reason] = sorted(stage2_examples[reason], key=lambda e: e["image_url"])[:n_examples]

    schema = T.StructType(
        [
            T.StructField(
                f.name,
                {
                    pa.string(): T.StringType(),
                    pa.binary(): T.BinaryType(),
                    pa.bool_(): T.BooleanType(),
                    pa.float64(): T.DoubleType(),
                    pa.int64(): T.LongType(),
                }[f.type],
                True,
            )
            for f in PART_SCHEMA
        ]
    )
    pairs = spark.createDataFrame(step2.filter(lambda t: t[0] == "pair").map(lambda t: t[1]), schema).cache()

    # Step 3 as group-bys: descriptions on too many distinct images, then the best pair per image hash.
    passed = pairs.filter(F.col("passed_scoring"))
    limit = int(config["aggregation"]["max_images_per_text"])
    shared = (
        passed.groupBy("text_key")
        .agg(F.countDistinct("image_sha256").alias("n_images"))
        .filter(F.col("n_images") > limit)
        .select("text_key", F.lit(True).alias("shared"))
    )
    order = [F.col(c).desc() if descending else F.col(c).asc() for c, descending in PAIR_ORDER]
    window = Window.partitionBy("image_sha256").orderBy(*order)
    marked = passed.join(shared, "text_key", "left")
    eligible = marked.filter(F.col("shared").isNull()).withColumn("rank", F.row_number().over(window))
    status = (
        eligible.select(
            "*",
            (F.col("rank") == 1).alias("kept"),
            F.when(F.col("rank") == 1, F.lit(None)).otherwise(F.lit("aggregation")).alias("drop_stage"),
            F.when(F.col("rank") == 1, F.lit(None))
            .otherwise(F.lit("not_best_for_image"))
            .alias("drop_reason"),
        )
        .drop("rank", "shared")
        .unionByName(
            marked.filter(F.col("shared").isNotNull())
            .drop("shared")
            .select(
                "*",
                F.lit(False).alias("kept"),
                F.lit("aggregation").alias("drop_stage"),
                F.lit("shared_description").alias("drop_reason"),
            )
        )
        .unionByName(
            pairs.filter(~F.col("passed_scoring")).select(
                "*",
                F.lit(False).alias("kept"),
                F.lit("scoring").alias("drop_stage"),
                F.lit("below_threshold").alias("drop_reason"),
            )
        )
    ).cache()
    for row in status.filter(~F.col("kept")).groupBy("drop_stage", "drop_reason").count().collect():
        if row["drop_stage"] == "aggregation":
            counts.drop("aggregation", row["drop_reason"], int(row["count"]))
    kept_total = status.filter(F.col("kept")).count()
    if kept_total:
        counts.keep("aggregation", kept_total)

    sorted_status = status.orderBy(*[F.col(c).asc() for c in OUTPUT_ORDER])
    meta = sorted_status.drop("image_jpeg")
    written = write_pairs_parquet(
        output / "pairs.parquet",
        (
            output_row(r.asDict(), r["kept"], r["drop_stage"], r["drop_reason"])
            for r in meta.toLocalIterator()
        ),
    )
    examples_kept: list[tuple[Mapping[str, Any], bytes | None]] = []

    def samples() -> Iterator[tuple[Mapping[str, Any], bytes]]:
        for r in sorted_status.filter(F.col("kept")).toLocalIterator():
            out = output_row(r.asDict(), True, None, None)
            jpeg = bytes(r["image_jpeg"])
            if len(examples_kept) < n_examples:
                examples_kept.append((out, jpeg))
            yield out, jpeg

    shard_names = write_shards(output, samples(), int(engine["shard_size"]))
    dropped_examples: dict[str, list[tuple[Mapping[str, Any], bytes | None]]] = defaultdict(list)
    window_reason = Window.partitionBy("drop_reason").orderBy(*[F.col(c).asc() for c in OUTPUT_ORDER])
    for r in (
        status.filter(~F.col("kept"))
        .withColumn("n", F.row_number().over(window_reason))
        .filter(F.col("n") <= n_examples)
        .orderBy("drop_reason", *OUTPUT_ORDER)
        .collect()
    ):
        dropped_examples[r["drop_reason"]].append(
            (output_row(r.asDict(), False, r["drop_stage"], r["drop_reason"]), bytes(r["image_jpeg"]))
        )
    for frame in (status, pairs):
        frame.unpersist()
    step1.unpersist()
    step2.unpersist()
    return write_reports(
        output,
        engine="spark",
        inputs=files,
        counts=counts,
        pairs_written=written,
        kept=kept_total,
        shard_names=shard_names,
        examples=contact_sheet_groups(examples_kept, dropped_examples, stage2_examples),
        seconds=time.monotonic() - start,
    )


__all__ = ["run_spark", "spark_session"]
