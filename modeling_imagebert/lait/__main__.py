"""`python -m modeling_imagebert.lait`: run the LAIT pipeline, train its scorer and its image filter.

    python -m modeling_imagebert.lait run --input 'crawl/*.warc.gz' --output pairs/ --engine local|spark
    python -m modeling_imagebert.lait train-scorer --labels labelled.csv --output scorer.skops
    python -m modeling_imagebert.lait train-filter --labels images.csv --output filter.skops
    python -m modeling_imagebert.lait urls --input 'crawl/*.warc.gz' --output urls.parquet

Errors a user can fix (a bad config key, an output folder that is not ours, a bad labelled row) print one line
and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from modeling_imagebert.cli import run_cli
from modeling_imagebert.cli_arguments import DefaultsHelpFormatter
from modeling_imagebert.lait.config import load_config


def _config_epilog(sections: tuple[str, ...]) -> str:
    """The scalar defaults of `sections` of configuration/lait/default.yaml, one `section.key = value` a line."""
    try:
        from modeling_imagebert.lait.config import default_config

        config = default_config()
    except Exception as error:  # --help must work even when the defaults file is broken
        return f"(config defaults unavailable: {error})"
    lines = ["config defaults (configuration/lait/default.yaml; change with --config or --set):"]
    for section in sections:
        for key, value in config[section].items():
            if not isinstance(value, (dict, list)):
                lines.append(f"  {section}.{key} = {'null' if value is None else value}")
    return "\n".join(lines)


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="YAML file with any of the sections pages, images, text, scoring, aggregation, engine, merged over "
        "configuration/lait/default.yaml (default: the defaults alone)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (YAML syntax), e.g. --set images.min_width=400; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The CLI parser (subcommands run, train-scorer, train-filter, urls)."""
    parser = argparse.ArgumentParser(
        prog="python -m modeling_imagebert.lait",
        description="LAIT: weak-supervised image-text pairs from web pages (ImageBERT §3).",
        formatter_class=DefaultsHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run",
        help="WARC files -> pairs.parquet, webdataset shards, stats",
        formatter_class=DefaultsHelpFormatter,
        epilog=_config_epilog(("images", "scoring", "aggregation", "engine")),
    )
    run.add_argument("--input", required=True, nargs="+", help="WARC / WARC.gz paths or quoted glob patterns")
    run.add_argument(
        "--output", required=True, help="output folder: new, or one this command created (then it resumes)"
    )
    run.add_argument("--engine", choices=("local", "spark"), default="local", help="where the stages run")
    run.add_argument(
        "--processes", type=int, default=None, help="local engine workers (default: engine.processes)"
    )
    run.add_argument("--spark-master", default=None, help="Spark master URL (default: engine.spark_master)")
    _add_config(run)

    scorer = commands.add_parser(
        "train-scorer",
        help="train the stage-4 relevance scorer on labelled (image, text, relevant) rows",
        formatter_class=DefaultsHelpFormatter,
    )
    scorer.add_argument(
        "--labels",
        required=True,
        help="CSV or JSONL: image, text, relevant[, source, image_url, image_key]; with --set "
        "scoring.itm_checkpoint=... --set scoring.region_features=... the scorer also learns the ITM score",
    )
    scorer.add_argument("--output", required=True, help="the .skops file to write (plus <output>.json)")
    scorer.add_argument("--seed", type=int, default=0)
    _add_config(scorer)

    filt = commands.add_parser(
        "train-filter",
        help="train the stage-2 unnatural-image filter on labelled (image, drop) rows",
        formatter_class=DefaultsHelpFormatter,
    )
    filt.add_argument("--labels", required=True, help="CSV or JSONL: image, drop (1 = drop)")
    filt.add_argument("--output", required=True, help="the .skops file to write (plus <output>.json)")
    filt.add_argument("--seed", type=int, default=0)

    urls = commands.add_parser(
        "urls",
        help="stage 1 only: write the dominant-image URLs as an img2dataset URL list (parquet)",
        formatter_class=DefaultsHelpFormatter,
    )
    urls.add_argument(
        "--input", required=True, nargs="+", help="WARC / WARC.gz paths or quoted glob patterns"
    )
    urls.add_argument("--output", required=True, help="the parquet file to write (must not exist)")
    _add_config(urls)
    return parser


def _refuse_existing(path: str) -> None:
    import os

    if os.path.exists(path):
        raise FileExistsError(f"{path}: exists; refusing to overwrite a file this command did not create")


def _main(argv: Sequence[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        config = load_config(args.config, args.set)
        if args.spark_master:
            config["engine"]["spark_master"] = args.spark_master
        if args.engine == "local":
            from modeling_imagebert.lait.engine_local import run_local

            stats = run_local(args.input, args.output, config, processes=args.processes)
        else:
            from modeling_imagebert.lait.engine_spark import run_spark

            stats = run_spark(args.input, args.output, config)
        print(f"{args.output}: {stats['pairs_kept']} pairs kept of {stats['pairs_scored']} scored")
    elif args.command == "train-scorer":
        config = load_config(args.config, args.set)
        from modeling_imagebert.lait.scoring import train_scorer

        _refuse_existing(args.output)
        sidecar = train_scorer(
            args.labels,
            args.output,
            text_config=config["text"],
            scoring_config=config["scoring"],
            seed=args.seed,
        )
        print(json.dumps(sidecar["metrics"], indent=2))
    elif args.command == "train-filter":
        from modeling_imagebert.lait.filter_training import train_image_filter

        _refuse_existing(args.output)
        sidecar = train_image_filter(args.labels, args.output, seed=args.seed)
        print(json.dumps(sidecar["metrics"], indent=2))
    elif args.command == "urls":
        config = load_config(args.config, args.set)
        from modeling_imagebert.lait.engine_steps import extract_candidates, list_inputs
        from modeling_imagebert.lait.fetch import write_img2dataset_input

        _refuse_existing(args.output)
        candidates = []
        for warc_file in list_inputs(args.input):
            candidates.extend(extract_candidates(warc_file, config)[0])
        n = write_img2dataset_input(candidates, args.output)
        print(
            f"{args.output}: {n} image URLs (img2dataset --url_list {args.output} --input_format parquet ...)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point. Output: the process exit status (2 after a one-line error a user can fix)."""
    # ConfigError and OutputFolderError are ValueErrors; other OSErrors (a full disk, a permission) keep their
    # traceback.
    errors = (ValueError, FileExistsError, FileNotFoundError, NotImplementedError)
    return run_cli(_main, argv, errors=errors, hint=False)


if __name__ == "__main__":
    sys.exit(main())
