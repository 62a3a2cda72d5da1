"""Probes of the LAIT pipeline (`modeling_imagebert.lait`): slow image servers, Content-Encoding bombs in WARC pages
and image responses, deeply nested pages, every number of the LAIT config, label files that are not UTF-8.

Anything that could hang or take the memory of the machine runs as a subprocess with a deadline
(`Probes.command`), which writes what it saw to a JSON file the probe then judges; servers listen on 127.0.0.1
only (a thread of this process), nothing reaches the network."""

from __future__ import annotations

import gzip
import io
import json
import sys
import textwrap
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from .harness import Probes


def _png(side: int = 400) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (side, side), (120, 80, 40)).save(out, format="PNG")
    return out.getvalue()


# Bombs: built once from a small member (never decoded here).
_GZIP_MEMBER = gzip.compress(b"\0" * (8 << 20), 9)  # 8 MiB of zeros in about 8 KB


def _deflate_bomb(decoded_mib: int) -> bytes:
    compressor, block = zlib.compressobj(9), b"\0" * (1 << 20)
    return b"".join(compressor.compress(block) for _ in range(decoded_mib)) + compressor.flush()


class _Handler(BaseHTTPRequestHandler):
    """The slow and hostile routes; `bodies` maps a path to (headers, body) for the bombs."""

    bodies: dict[str, tuple[list[tuple[str, str]], bytes]] = {}
    image = b""

    def log_message(self, *args):
        pass

    def _trickle(self, data: bytes, pause: float = 0.2) -> None:
        try:
            for byte in data:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(pause)
        except OSError:
            pass

    def do_GET(self):
        if self.path in self.bodies:
            headers, body = self.bodies[self.path]
            self.send_response(200)
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            try:
                self.wfile.write(body)
            except OSError:
                pass
        elif self.path == "/trickle.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self._trickle(self.image)
        elif self.path == "/stall.png":  # headers, then nothing
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.flush()
            time.sleep(20)
        elif self.path == "/slow-headers.png":
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nX-Padding: " + b"a" * 2000)
        elif self.path == "/redirect-to-trickle.png":
            self.send_response(302)
            self.send_header("Location", "/trickle.png")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/chunked-trickle.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._trickle(b"".join(b"1\r\n" + bytes([b]) + b"\r\n" for b in self.image[:500]))


_FETCH = textwrap.dedent(
    """
    import json, sys, time
    from modeling_imagebert.lait.config import load_config
    from modeling_imagebert.lait.fetch import fetch_url
    url, overrides, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    params = {**load_config()["images"], **overrides}
    start = time.monotonic()
    result = fetch_url(url, params)
    json.dump({"reason": result.reason, "seconds": time.monotonic() - start}, open(out, "w"))
    """
)

_DEEP = textwrap.dedent(
    """
    import json, sys, time
    from modeling_imagebert.lait.config import load_config
    from modeling_imagebert.lait.pages import stage1_pages
    from modeling_imagebert.lait.records import DropCounter, PageRecord
    html, out = open(sys.argv[1], encoding="utf-8").read(), sys.argv[2]
    page = PageRecord(warc_file="x.warc", warc_offset=0, page_url="http://site.example/deep.html", html=html)
    drops = DropCounter()
    start = time.monotonic()
    stage1_pages(page, load_config(), drops)
    json.dump({"dropped": drops.dropped, "seconds": time.monotonic() - start}, open(out, "w"))
    """
)

_BOMB = textwrap.dedent(
    """
    import json, resource, sys
    from modeling_imagebert.lait.config import load_config
    from modeling_imagebert.lait.fetch import ImageSources, fetch_url
    from modeling_imagebert.lait.records import DropCounter
    from modeling_imagebert.lait.warc import iter_pages
    kind, where, out = sys.argv[1], sys.argv[2], sys.argv[3]
    params = load_config()["images"]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if kind == "page":
        drops = DropCounter()
        pages = list(iter_pages(where, drops))
        seen = {"pages": len(pages), "dropped": drops.dropped}
    elif kind == "warc_image":
        result = ImageSources.for_warc_file(where, params).get("http://site.example/i.png", params)
        seen = {"reason": result.reason}
    else:
        seen = {"reason": fetch_url(where, params).reason}
    seen["growth_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    json.dump(seen, open(out, "w"))
    """
)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _warc(path: Path, records: list[tuple[str, str, list[tuple[str, str]], bytes]]) -> Path:
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as stream:
        writer = WARCWriter(stream, gzip=False)
        for url, content_type, headers, body in records:
            http = StatusAndHeaders(
                "200 OK",
                [("Content-Type", content_type), *headers, ("Content-Length", str(len(body)))],
                protocol="HTTP/1.1",
            )
            writer.write_record(
                writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)
            )
    return path


def probe_lait(p: Probes, work: Path) -> None:
    p.entry = "lait"
    base = work / "lait"
    base.mkdir()
    counter = iter(range(10**6))
    python = sys.executable

    _Handler.image = _png()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _slow_servers(p, base, counter, python, url)
        _bombs(p, base, counter, python, url)
    finally:
        server.shutdown()
        server.server_close()
    _deep_pages(p, base, counter, python)
    _config_numbers(p, base)
    _label_files(p, base)


def _slow_servers(p: Probes, base: Path, counter, python: str, url: str) -> None:
    """Group 1: a whole fetch has a deadline and a minimum rate; each case must end as too_slow/timeout in time."""
    quick = {"timeout_s": 1.0, "total_timeout_s": 2.0, "min_bytes_per_s": 0.0}
    cases = [
        ("image trickled 1 byte / 0.2 s", "/trickle.png", quick, ("too_slow",), 5.0),
        ("image under the minimum rate", "/trickle.png", {"timeout_s": 1.0, "total_timeout_s": 60.0}, ("too_slow",), 5.0),
        ("headers trickled 1 byte / 0.2 s", "/slow-headers.png", quick, ("too_slow",), 5.0),
        ("stall after the headers", "/stall.png", {**quick, "total_timeout_s": 10.0}, ("timeout",), 5.0),
        ("redirect to a trickle", "/redirect-to-trickle.png", quick, ("too_slow",), 5.0),
        ("chunked body trickled", "/chunked-trickle.png", quick, ("too_slow",), 5.0),
    ]  # fmt: skip
    for name, path, overrides, reasons, seconds in cases:
        out = base / f"fetch-{next(counter)}.json"
        p.command(
            f"slow server: {name}",
            [python, "-c", _FETCH, url + path, json.dumps(overrides), str(out)],
            timeout=60,
            ok=lambda out=out, reasons=reasons, seconds=seconds: (
                _json(out)["reason"] in reasons and _json(out)["seconds"] < seconds
            ),
        )


def _bombs(p: Probes, base: Path, counter, python: str, url: str) -> None:
    """Group 6: a coded body is decoded in a stream stopped at the bound: dropped, memory growth under 200 MB."""
    gzip_gib = _GZIP_MEMBER * 128  # 1 MB on the wire, 1 GiB decoded
    deflate_512 = _deflate_bomb(512)
    _Handler.bodies = {
        "/gzip-bomb.png": ([("Content-Type", "image/png"), ("Content-Encoding", "gzip")], gzip_gib),
        "/deflate-bomb.png": ([("Content-Type", "image/png"), ("Content-Encoding", "deflate")], deflate_512),
        "/raw-deflate-bomb.png": (
            [("Content-Type", "image/png"), ("Content-Encoding", "deflate")],
            deflate_512[2:-4],  # the zlib wrapper cut off: raw deflate, as some servers send
        ),
    }
    page_bombs = {
        "gzip page, 1 GiB decoded": ("gzip", gzip_gib),
        "deflate page, 512 MiB decoded": ("deflate", deflate_512),
    }
    try:
        import brotli

        page_bombs["br page, 512 MiB decoded"] = ("br", brotli.compress(b"\0" * (512 << 20), quality=1))
    except ImportError:
        pass
    for name, (coding, body) in page_bombs.items():
        warc = _warc(
            base / f"bomb-{next(counter)}.warc",
            [("http://site.example/p.html", "text/html", [("Content-Encoding", coding)], body)],
        )
        out = base / f"bomb-{next(counter)}.json"
        p.command(
            f"bomb: {name}",
            [python, "-c", _BOMB, "page", str(warc), str(out)],
            timeout=120,
            ok=lambda out=out: (
                _json(out)["dropped"] == {"warc": {"page_too_large": 1}} and _json(out)["growth_mb"] < 200
            ),
        )
    for name, path in (
        ("gzip image over HTTP, 1 GiB decoded", "/gzip-bomb.png"),
        ("deflate image over HTTP, 512 MiB decoded", "/deflate-bomb.png"),
        ("raw deflate image over HTTP, 512 MiB decoded", "/raw-deflate-bomb.png"),
    ):
        out = base / f"bomb-{next(counter)}.json"
        p.command(
            f"bomb: {name}",
            [python, "-c", _BOMB, "http", url + path, str(out)],
            timeout=120,
            ok=lambda out=out: _json(out)["reason"] == "too_large" and _json(out)["growth_mb"] < 200,
        )
    warc = _warc(
        base / f"bomb-{next(counter)}.warc",
        [("http://site.example/i.png", "image/png", [("Content-Encoding", "gzip")], gzip.compress(b"\0" * (64 << 20), 9))],
    )  # fmt: skip
    out = base / f"bomb-{next(counter)}.json"
    p.command(
        "bomb: gzip image stored in the WARC, 64 MiB decoded",
        [python, "-c", _BOMB, "warc_image", str(warc), str(out)],
        timeout=120,
        ok=lambda out=out: _json(out)["reason"] == "too_large" and _json(out)["growth_mb"] < 200,
    )


def _deep_pages(p: Probes, base: Path, counter, python: str) -> None:
    """Group 1: a deeply nested page ends in seconds (dropped as too_deep, or parsed when the parser is fast)."""
    img = '<html><body><img src="/a.jpg" width="600" height="400">'
    pages = {
        "380,000 nested <div>": img + "<div>" * 380_000 + "x" + "</div>" * 380_000,
        "200,000 nested <section>, never closed": img + "<section>" * 200_000,
        "150,000 <font> with distinct attributes": img
        + "".join(f'<font size="{i}">' for i in range(150_000)),
        "300,000 nested <b>": img + "<b>" * 300_000 + "x",
        "100,000 nested tables": img + "<table><tr><td>" * 100_000,
        "<svg> then 300,000 <div> (foreign content)": img + "<svg>" + "<div>" * 300_000,
        "<!-- comment --> 500,000 times": img + "<!-- c -->" * 500_000,
    }
    for name, html in pages.items():
        page = base / f"deep-{next(counter)}.html"
        page.write_text(html, encoding="utf-8")
        out = base / f"deep-{next(counter)}.json"
        p.command(
            f"deep page: {name}",
            [python, "-c", _DEEP, str(page), str(out)],
            timeout=60,
            ok=lambda out=out: _json(out)["seconds"] < 5.0,
        )


# Numbers of the default config that may legitimately be negative (scores and weights) or huge (counts, lengths).
_MAY_BE_NEGATIVE = {"pages.content_min_score", "pages.bias", "pages.min_score"}
_MAY_BE_HUGE = {
    "pages.max_language_rank", "pages.language_sample_chars", "pages.language_fill_chars", "pages.min_text_chars",
    "pages.max_images_per_page", "pages.content_min_chars", "pages.content_min_score", "pages.content_region_levels",
    "pages.content_region_fallback", "pages.reference_side", "pages.small_side", "pages.extreme_aspect",
    "pages.word_levels", "pages.bias", "pages.min_score", "pages.keep_margin", "pages.max_dominant",
    "pages.max_site_repeat", "pages.nearby_max_levels", "pages.nearby_min_words", "pages.nearby_max_chars",
    "text.min_words", "text.max_words", "text.max_candidates", "images.min_width", "images.min_height",
    "images.min_bytes_per_s", "aggregation.max_images_per_text",
}  # fmt: skip


def _config_numbers(p: Probes, base: Path) -> None:
    """Group 7: NaN, Inf, negative, huge and wrong-type values for every number of the config (its defaults, plus
    the numeric keys whose default is null), through `load_config` overrides and `--set`; refused naming the key."""
    from modeling_imagebert.lait.__main__ import main as lait_main
    from modeling_imagebert.lait.config import default_config, load_config

    keys: dict[str, object] = {}
    for section, values in default_config().items():
        for key, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                keys[f"{section}.{key}"] = value
        if section == "pages":
            for feature, weight in values["weights"].items():
                keys[f"pages.weights.{feature}"] = weight
    keys["scoring.threshold"] = 0.5
    keys["engine.spark_partitions"] = 4
    weights = {k for k in keys if k.startswith("pages.weights.")}

    def nested(dotted: str, value: object) -> dict:
        for part in reversed(dotted.split(".")):
            value = {part: value}
        return value

    for dotted, default in keys.items():
        cases = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "a string": "12"}
        if dotted not in _MAY_BE_NEGATIVE and dotted not in weights:
            cases["-1"] = -1
        if dotted not in _MAY_BE_HUGE and dotted not in weights:
            cases["1e18"] = 10**18 if isinstance(default, int) else 1e18
        if isinstance(default, int):
            cases["2.5 for an integer"] = 2.5
        for label, value in cases.items():
            p.error(
                f"config {dotted} = {label}",
                lambda dotted=dotted, value=value: load_config(overrides=nested(dotted, value)),
                dotted,
            )
    p.error(
        "config 10**400 for a float", lambda: load_config(overrides=["pages.bias=" + "9" * 400]), "pages.bias"
    )
    p.error(
        "config --set .nan", lambda: load_config(overrides=["scoring.threshold=.nan"]), "scoring.threshold"
    )
    p.error("config max_words < min_words", lambda: load_config(overrides=["text.min_words=10", "text.max_words=5"]), "text.max_words")  # fmt: skip
    config_file = base / "nan.yaml"
    config_file.write_text("scoring:\n  rule_threshold: .nan\n")
    p.cli(
        "lait run --config with rule_threshold .nan",
        lambda: lait_main(
            [
                "run",
                "--input",
                str(base / "none"),
                "--output",
                str(base / "out"),
                "--config",
                str(config_file),
            ]
        ),
        "scoring.rule_threshold",
    )
    p.cli(
        "lait run --set images.total_timeout_s=-5",
        lambda: lait_main(["run", "--input", str(base / "none"), "--output", str(base / "out"), "--set", "images.total_timeout_s=-5"]),
        "images.total_timeout_s",
    )  # fmt: skip


def _label_files(p: Probes, base: Path) -> None:
    """Group 8: label files for `lait train-filter` / `train-scorer` that are not UTF-8 text: named, with the line."""
    from modeling_imagebert.lait.__main__ import main as lait_main
    from modeling_imagebert.lait.filter_training import train_image_filter

    folder = base / "labels"
    folder.mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "a.png")
    text = "image,drop\na.png,0\ncaf\u00e9.png,1\n"
    files = {
        "latin-1 CSV": ("latin1.csv", text.encode("latin-1")),
        "UTF-16 CSV (BOM)": ("utf16.csv", text.encode("utf-16")),
        "binary (a PNG named .csv)": ("binary.csv", (folder / "a.png").read_bytes()),
        "NUL bytes in a CSV": ("nul.csv", b"image,drop\na.png\0,0\n"),
        "latin-1 JSONL": ("latin1.jsonl", '{"image": "caf\u00e9.png", "drop": 1}\n'.encode("latin-1")),
    }
    for name, (file_name, data) in files.items():
        path = folder / file_name
        path.write_bytes(data)
        p.error(
            f"label file: {name}",
            lambda path=path: train_image_filter(path, folder / "filter.skops"),
            file_name,
        )
    p.cli(
        "lait train-filter, latin-1 labels",
        lambda: lait_main(["train-filter", "--labels", str(folder / "latin1.csv"), "--output", str(folder / "f.skops")]),
        "latin1.csv",
        "utf-8",
    )  # fmt: skip
    # A UTF-8 file with a byte-order mark is UTF-8: read (the row's image is what fails here, named).
    bom = folder / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + b"image,drop\nmissing.png,0\n")
    p.error(
        "label file: UTF-8 with a BOM",
        lambda: train_image_filter(bom, folder / "filter.skops"),
        "missing.png",
    )
