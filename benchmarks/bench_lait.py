"""LAIT throughput: stages 1 + 3 (WARC -> English pages -> dominant images -> cleaned text) per core, and the
Spark `local[2]` speed-up over one local process on the same input.

The input is a synthetic Common-Crawl-like WARC.gz written here: ~50 KB HTML pages shaped like news/blog pages
(head with meta tags, inline CSS and JavaScript, navigation with dozens of links, a logo, an article of English
paragraphs with one or two figures, a sidebar of related thumbnails, ad banners, social icons, a tracking pixel
and a footer), about 25 `<img>` per page, 10% non-English pages and 5% non-HTML or non-200 records, gzip per
record as Common Crawl writes them.

    PYTHONPATH=$PWD python benchmarks/bench_lait.py                  # 4000 pages in 8 files, stages 1+3, then Spark
    PYTHONPATH=$PWD python benchmarks/bench_lait.py --pages 500 --no-spark --no-record   # quick, no Spark

Prints a markdown table: pages/s for WARC reading alone, for stages 1+3 in one process (wall clock, and per core
from the process's CPU time, which stays meaningful when other programs share the cores), and the Spark
`local[2]` speed-up over one local process on the same files (wall clock: it needs two idle cores); appends the
rows to `benchmarks/RESULTS.md` unless `--no-record`.
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import random
import subprocess
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")

_WORDS = (
    "the a of and to in is was for on that with as by at from his her their it this which an are were be has had "
    "have not but they one all two new first after year years time people city government world state water river "
    "team season game music film book school family house village church station road island park forest mountain "
    "national company war history north south east west early later during while since under between many most "
    "small large old young red blue green black white photographs shows morning evening winter summer spring "
    "autumn local police president minister market street bridge harbour garden museum festival players fans "
    "election council project research university students children women men visitors animals birds dogs horses"
).split()
_FOREIGN = (
    "der die das und ist nicht mit von auf für eine einem wurde werden sind auch nach wie bei oder aber "
    "le la les et est une dans pour pas sur avec qui plus par sont ses ont été cette comme mais nous"
).split()
_PHOTO_NOUNS = (
    "fox",
    "bridge",
    "harbour",
    "market",
    "cathedral",
    "mountain lake",
    "train",
    "crowd",
    "garden",
)
_PHOTO_ADJECTIVES = ("red", "old", "busy", "quiet", "snowy", "historic", "crowded", "green", "small")


def _sentence(rng: random.Random, words: tuple[str, ...] | list[str], n: int) -> str:
    text = " ".join(rng.choice(words) for _ in range(n))
    return text[0].upper() + text[1:] + "."


def _paragraph(rng: random.Random, words, sentences: int) -> str:
    return " ".join(_sentence(rng, words, rng.randint(8, 22)) for _ in range(sentences))


def synthetic_page(rng: random.Random, index: int, english: bool = True) -> tuple[str, str]:
    """One synthetic news/blog page: (page URL, HTML of about 50 KB with about 25 <img>)."""
    site = f"site{rng.randint(0, 199)}.example.com"
    url = f"https://www.{site}/{rng.choice(['news', 'blog', 'travel', 'sport'])}/story-{index}.html"
    words = _WORDS if english else _FOREIGN
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_sentence(rng, words, 8)}</title>",
        *(f"<meta name='m{i}' content='{_sentence(rng, words, 10)}'>" for i in range(12)),
        *(f"<link rel='stylesheet' href='/css/s{i}.css'>" for i in range(4)),
        "<style>",
        *(f".c{i} {{ margin: {i}px; padding: {i % 7}px; color: #{i:06x}; }}\n" for i in range(120)),
        "</style><script>",
        *(
            f"function f{i}(a, b) {{ var x = a * {i} + b; return window.track('{i}', x); }}\n"
            for i in range(160)
        ),
        "</script></head><body><header class='site-header'>",
        f"<a href='/'><img src='/static/logo.png' class='site-logo' alt='{site} logo' width='160' height='48'></a>",
        "<nav class='main-nav'><ul>",
        *(f"<li><a href='/section/{i}'>{rng.choice(words).title()}</a></li>" for i in range(45)),
        "</ul></nav></header><main><article class='post'>",
        f"<h1>{_sentence(rng, words, 9)}</h1>",
        f"<div class='byline'><img src='/avatars/a{rng.randint(0, 50)}.jpg' class='avatar' width='40' height='40'>"
        f"By {rng.choice(words).title()} {rng.choice(words).title()}</div>",
    ]
    n_figures = rng.choice((1, 1, 2))
    for paragraph in range(40):
        parts.append(f"<p>{_paragraph(rng, words, rng.randint(3, 6))}</p>")
        if paragraph in (1, 9)[:n_figures]:
            noun, adjective = rng.choice(_PHOTO_NOUNS), rng.choice(_PHOTO_ADJECTIVES)
            photo = f"https://cdn.{site}/photos/{index}-{paragraph}.jpg"
            parts.append(
                f"<figure class='wp-caption'><img src='{photo}' alt='A {adjective} {noun} in the {rng.choice(words)}'"
                f" width='{rng.choice((800, 1024, 1200))}' height='{rng.choice((533, 683, 800))}'>"
                f"<figcaption>{_sentence(rng, words, 12)}</figcaption></figure>"
            )
    parts.append("<div class='share'>")
    parts.extend(
        f"<a href='https://{s}.com/share'><img src='/icons/{s}.svg' class='social-icon' width='24' height='24'></a>"
        for s in ("facebook", "twitter", "pinterest", "whatsapp", "rss")
    )
    parts.append("</div></article></main><aside class='sidebar'><h3>Related</h3><ul>")
    for _ in range(8):
        parts.append(
            f"<li><a href='/story-{rng.randint(0, 10**6)}'><img src='/thumbs/t{rng.randint(0, 10**6)}.jpg' "
            f"width='150' height='100' alt='{_sentence(rng, words, 5)}'>{_sentence(rng, words, 7)}</a></li>"
        )
    parts.append("</ul><div class='ad-slot'>")
    parts.append("<img src='https://ads.adnet.example/banner728x90.gif' class='ad' width='728' height='90'>")
    parts.append(
        "<img src='https://ads.adnet.example/box300.jpg' class='advert' width='300' height='250'></div>"
    )
    parts.append("</aside><footer class='site-footer'><ul>")
    parts.extend(f"<li><a href='/about/{i}'>{_sentence(rng, words, 3)}</a></li>" for i in range(30))
    parts.append(
        f"</ul><p>{_paragraph(rng, words, 2)}</p><img src='/static/logo.png' width='160' height='48'>"
    )
    parts.append("<img src='https://track.example/pixel.gif?id=1' width='1' height='1'></footer>")
    parts.append(
        "<script>" + "".join(f"window.dataLayer.push({{e: {i}}});" for i in range(200)) + "</script>"
    )
    parts.append("</body></html>")
    return url, "\n".join(parts)


def write_synthetic_warc(path: str | os.PathLike, n_pages: int, seed: int = 0) -> dict[str, int]:
    """Writes `n_pages` response records (90% English HTML, 10% non-English, plus 5% extra 404 / image records)
    to a gzipped WARC at `path`; returns counts {"html": ..., "english": ..., "other": ..., "bytes": ...}."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    rng = random.Random(seed)
    counts = {"html": 0, "english": 0, "other": 0, "html_bytes": 0}
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    with open(tmp, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for index in range(n_pages):
            english = rng.random() >= 0.1
            url, page = synthetic_page(rng, index, english)
            body = page.encode("utf-8")
            headers = StatusAndHeaders(
                "200 OK", [("Content-Type", "text/html; charset=utf-8")], protocol="HTTP/1.1"
            )
            record = writer.create_warc_record(
                url, "response", payload=io.BytesIO(body), http_headers=headers
            )
            writer.write_record(record)
            counts["html"] += 1
            counts["english"] += english
            counts["html_bytes"] += len(body)
            if rng.random() < 0.05:
                status = rng.choice(("404 Not Found", "200 OK"))
                ctype = "text/html" if status.startswith("404") else "image/jpeg"
                headers = StatusAndHeaders(status, [("Content-Type", ctype)], protocol="HTTP/1.1")
                record = writer.create_warc_record(
                    url + "/x",
                    "response",
                    payload=io.BytesIO(b"\xff\xd8" + bytes(2000)),
                    http_headers=headers,
                )
                writer.write_record(record)
                counts["other"] += 1
    os.replace(tmp, path)
    return counts


def run_stages_1_and_3(paths: list[str], config: dict) -> tuple[int, int, dict]:
    """Stages 1 + 3 over WARC files in this process: returns (pages read, images with text, drop counts)."""
    from modeling_imagebert.lait.page_settings import pages_settings
    from modeling_imagebert.lait.pages import stage1_pages
    from modeling_imagebert.lait.records import DropCounter
    from modeling_imagebert.lait.text import stage3_text, text_settings
    from modeling_imagebert.lait.warc import iter_pages

    pages_config, text_config = pages_settings(config), text_settings(config)
    drops = DropCounter()
    n_pages = n_images = 0
    for path in paths:
        for page in iter_pages(path, drops, max_page_bytes=pages_config.max_page_bytes):
            n_pages += 1
            for candidate in stage1_pages(page, pages_config, drops):
                if stage3_text(candidate, text_config, drops) is not None:
                    n_images += 1
    return n_pages, n_images, drops.to_dict()


def read_only(paths: list[str]) -> int:
    from modeling_imagebert.lait.records import DropCounter
    from modeling_imagebert.lait.warc import iter_pages

    drops = DropCounter()
    return sum(1 for path in paths for _ in iter_pages(path, drops))


def _timed(function, *args):
    """(result, wall seconds, CPU seconds of this process): CPU time is the per-core figure when other programs
    share the cores."""
    start, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pages", type=int, default=4000, help="synthetic pages in the WARC.gz files (default 4000)"
    )
    parser.add_argument(
        "--files", type=int, default=8, help="WARC files the pages are split into (default 8)"
    )
    parser.add_argument("--no-spark", action="store_true", help="skip the Spark local[2] comparison")
    parser.add_argument("--repeats", type=int, default=3, help="Spark comparison: best of N runs per side")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of stages 1 + 3")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = parser.parse_args()

    from modeling_imagebert.lait.config import load_config

    config = load_config()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lait-") as folder:
        paths, total_bytes, per_file = [], 0, -(-args.pages // args.files)
        for index in range(args.files):
            path = os.path.join(folder, f"synthetic-{index:05d}.warc.gz")
            counts = write_synthetic_warc(path, per_file, seed=index)
            paths.append(path)
            total_bytes += counts["html_bytes"]
        n_html = per_file * args.files
        mean_kb = total_bytes / n_html / 1024
        print(f"input: {n_html} HTML pages in {args.files} WARC.gz files, mean page {mean_kb:.1f} KB")
        run_stages_1_and_3(paths[:1], config)  # warm-up: vocab, word lists, language profiles
        n_read, read_s, read_cpu = _timed(read_only, paths)
        rows.append(("WARC read + decode only (1 process)", n_read, read_s, read_cpu))
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.enable()
        (n_pages, n_images, drops), stage_s, stage_cpu = _timed(run_stages_1_and_3, paths, config)
        if args.profile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        rows.append(("stages 1+3, WARC to cleaned text (1 process)", n_pages, stage_s, stage_cpu))
        print(f"stages 1+3: {n_images} dominant images with text; drops {drops['dropped']}")
        if not args.no_spark:
            rows.extend(_spark_rows(paths, config, args.repeats))
    print()
    load = os.getloadavg()[0]
    print(f"load average at the end: {load:.1f} on {os.cpu_count()} cores")
    print("| measurement | pages | wall s | CPU s | pages/s (wall) | pages/s per core (CPU) |")
    print("|---|---|---|---|---|---|")
    for name, pages, seconds, cpu in rows:
        per_core = f"{pages / cpu:.0f}" if cpu else "n/a"
        print(f"| {name} | {pages} | {seconds:.2f} | {cpu:.2f} | {pages / seconds:.0f} | {per_core} |")
    if not args.no_record:
        append_results(rows, mean_kb, load)
        print(f"appended {len(rows)} rows to {RESULTS}")


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_results(rows: list[tuple], mean_kb: float, load: float) -> None:
    """Appends one row per measurement under this script's section of benchmarks/RESULTS.md."""
    marker = "## LAIT stages 1+3 (`bench_lait.py`)"
    header = (
        "| date | commit | machine | load avg | page KB | measurement | pages | wall s | pages/s (wall) | "
        "pages/s per core (CPU) |\n|---|---|---|---|---|---|---|---|---|---|\n"
    )
    text = RESULTS.read_text() if RESULTS.exists() else ""
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    with RESULTS.open("a") as f:
        if marker not in text:
            f.write(f"\n{marker}\n\n{header}")
        for name, pages, seconds, cpu in rows:
            per_core = f"{pages / cpu:.0f}" if cpu else "n/a"
            f.write(
                f"| {date} | {_git_commit()} | {_machine()} | {load:.1f} | {mean_kb:.1f} | {name} | {pages} | "
                f"{seconds:.2f} | {pages / seconds:.0f} | {per_core} |\n"
            )


def _stages_1_and_3_task(config: dict):
    """A mapPartitions function: for each WARC file, the engines' step 1 (`extract_candidates`: read, decode,
    stage 1) then stage 3 on every candidate; yields (pages, images with text, CPU seconds) per file."""

    def run(files):
        from modeling_imagebert.lait.engine_steps import extract_candidates
        from modeling_imagebert.lait.text import stage3_text

        for warc_file in files:
            cpu = time.process_time()
            candidates, drops = extract_candidates(warc_file, config)
            kept = sum(stage3_text(candidate, config, drops) is not None for candidate in candidates)
            yield drops.kept.get("warc", 0), kept, time.process_time() - cpu

    return run


def _spark_rows(paths: list[str], config: dict, repeats: int) -> list[tuple]:
    """Stages 1 + 3 as one local process and as Spark `local[2]` over the same files, through the engines' step-1
    function (`engine_steps.extract_candidates`) and `text.stage3_text`. Spark gets one partition per core (files of
    equal size) and is timed after a warm-up job has started its Python workers (session start-up is not part of
    the throughput); each side is the best of `repeats` runs. The Spark row's CPU column is the workers' CPU
    time, so its per-core figure shows whether a worker does the same work per page as the local process; the
    ratio of the local CPU time to the busiest partition's CPU time is printed as the speed-up two idle cores
    would allow (an upper bound: it leaves out Spark's scheduling)."""
    try:
        from modeling_imagebert.lait.engine_spark import spark_session
    except ImportError as error:
        print(f"Spark comparison skipped: the LAIT engines are not available ({error})")
        return []
    task = _stages_1_and_3_task(config)
    # Best of `repeats` for both sides (as timeit does): other programs on the machine only ever add time.
    local_runs = [_timed(lambda: list(task(paths))) for _ in range(repeats)]
    local_counts, local_s, local_cpu = min(local_runs, key=lambda run: run[1])
    spark = spark_session("local[2]", app_name="bench-lait")
    try:
        context = spark.sparkContext
        slices = min(len(paths), context.defaultParallelism)
        context.parallelize(paths[:slices], slices).mapPartitions(task).collect()  # warm-up: workers, imports
        spark_runs = [
            _timed(
                lambda: (
                    context.parallelize(paths, slices)
                    .mapPartitionsWithIndex(lambda index, files: ((index, *row) for row in task(files)))
                    .collect()
                )
            )
            for _ in range(repeats)
        ]
        indexed_counts, spark_s, _ = min(spark_runs, key=lambda run: run[1])
        spark_counts = [row[1:] for row in indexed_counts]
        # The busiest partition's CPU time: the wall time Spark would need on idle cores, scheduling aside.
        partition_cpu: dict[int, float] = {}
        for index, _, _, cpu in indexed_counts:
            partition_cpu[index] = partition_cpu.get(index, 0.0) + cpu
        critical_cpu = max(partition_cpu.values())
    finally:
        spark.stop()
    if sorted(c[:2] for c in spark_counts) != sorted(c[:2] for c in local_counts):
        raise RuntimeError(
            f"Spark and local results differ: {sorted(spark_counts)} vs {sorted(local_counts)}"
        )
    pages = sum(count[0] for count in local_counts)
    worker_cpu = sum(count[2] for count in spark_counts)
    print(f"Spark local[2] speed-up over one local process: {local_s / spark_s:.2f}x (same {pages} pages)")
    print(
        f"CPU-time bound on idle cores: local {local_cpu:.2f} s / busiest Spark partition {critical_cpu:.2f} s = "
        f"{local_cpu / critical_cpu:.2f}x (scheduling overhead and other programs left out)"
    )
    return [
        ("stages 1+3, one local process (engines step 1 + stage 3)", pages, local_s, local_cpu),
        (
            f"stages 1+3, Spark local[2] ({local_s / spark_s:.2f}x the local process)",
            pages,
            spark_s,
            worker_cpu,
        ),
    ]


if __name__ == "__main__":
    main()
