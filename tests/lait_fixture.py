"""The mini-web: a few hundred generated HTML pages in WARC.gz files, their images served from 127.0.0.1, and
the ground truth of which image is each page's dominant one and which texts describe it well.

`MiniWebServer` (a `ThreadingHTTPServer` on 127.0.0.1, an ephemeral port) must start first, because the pages
link their images by absolute URL; then `build_mini_web(folder, server)` writes the WARCs and registers the
images on the server. Page kinds (`GroundTruthPage.kind`):

- `plain`: an English page whose photo has no declared size and no `<main>`/`<article>`/`<figure>` around it;
- `article`: English, a site logo, navigation icons, a large ad banner (class "ad"), a linked sidebar teaser and
  one dominant photo in `<article><figure>`; its texts are of known quality (`good_texts`: a real caption in alt
  and/or figcaption; bad: file names, "click here", a URL, a spam title);
- `foreign`: the same layout in German or French (expected: nothing kept);
- `spam`: the only text is spam (expected: nothing kept);
- `duplicate`: an article whose photo has the same bytes as another page's (expected: the image once);
- `shared`: distinct photos all described by the same template sentence (expected: dropped as shared);
- `small`: the dominant photo is 200 px wide (expected: dropped as too small);
- `missing`, `slow`, `loop`, `html`: the photo URL answers 404, sleeps past the timeout, redirects in a loop,
  or returns an HTML page (expected: counted under the matching stage-2 reason);
- `noimage`: a page without any `<img>`;
- `warc_image`: the photo is stored in the WARC itself, on a host that is not served.

A separate `damaged.warc.gz` holds the malformed WARC cases: broken HTTP headers, a non-UTF-8 page declared
right, a mis-declared charset, a gigantic page, and a truncated last record.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SUBJECTS = [
    "a young woman",
    "an old man",
    "two children",
    "a brown dog",
    "a black cat",
    "a group of friends",
    "a street musician",
    "a fisherman",
    "a cyclist",
    "a farmer",
    "a red car",
    "a small boat",
    "a white horse",
    "a family",
    "a chef",
    "a student",
    "a mountain goat",
    "a tall lighthouse",
    "an old train",
    "a yellow bus",
]
ACTIONS = [
    "walking along",
    "sitting near",
    "standing beside",
    "resting on",
    "running across",
    "looking at",
    "waiting at",
    "crossing",
    "playing near",
    "working in",
]
PLACES = [
    "the river in spring",
    "a busy market square",
    "the beach at sunset",
    "a quiet forest path",
    "the old harbour",
    "a snowy mountain road",
    "the city park",
    "a wooden bridge",
    "the train station",
    "a field of sunflowers",
    "the stone wall of the castle",
    "a crowded street at night",
]
ENGLISH_BODY = (
    "The city council met on Tuesday to discuss the new plans for the harbour and the public park. "
    "Many residents said that they would like more trees, better lighting and safer paths for children. "
    "The project will start next year and should be finished before the summer festival, officials said. "
)
GERMAN_BODY = (
    "Der Stadtrat hat am Dienstag die neuen Pläne für den Hafen und den Park besprochen. Viele Bewohner "
    "wünschen sich mehr Bäume, bessere Beleuchtung und sichere Wege für Kinder. Das Projekt beginnt im "
    "nächsten Jahr und soll vor dem Sommerfest fertig sein, sagte die Verwaltung. "
)
FRENCH_BODY = (
    "Le conseil municipal s'est réuni mardi pour discuter des nouveaux projets pour le port et le parc. "
    "De nombreux habitants souhaitent plus d'arbres, un meilleur éclairage et des chemins plus sûrs pour les "
    "enfants. Le projet commencera l'année prochaine et devrait être terminé avant le festival d'été. "
)
GERMAN_CAPTIONS = [
    "Ein Mann fährt mit dem Fahrrad durch die Altstadt",
    "Zwei Kinder spielen am Strand im Sommer",
]
FRENCH_CAPTIONS = ["Une femme marche le long de la rivière au printemps", "Un chien brun court dans le parc"]
SPAM_TEXT = "buy cheap viagra online casino bonus free money porn"
SHARED_TEXT = "Stock photo of the week from our picture library"
BAD_TEXTS = ["IMG_4032.JPG", "click here", "http://cdn.example.org/photos/4032.jpg", "image"]


@dataclass
class GroundTruthPage:
    """What the pipeline should find on one page."""

    page_url: str
    kind: str
    dominant_url: str | None  # the photo's URL (None for pages without one)
    dominant_sha256: str | None
    good_texts: list[str] = field(default_factory=list)  # texts that describe the photo well
    expect_pair: bool = False  # whether the photo should end as a kept pair (possibly via another page)


@dataclass
class MiniWeb:
    """The generated crawl: WARC files, ground truth per page, and the expected counts of stage-2 failures."""

    warc_files: list[Path]
    pages: list[GroundTruthPage]
    damaged_warc: Path | None = None

    def expected_images(self) -> dict[str, set[str]]:
        """sha256 of every photo that should be kept -> the union of its good texts over all its pages."""
        images: dict[str, set[str]] = {}
        for page in self.pages:
            if page.expect_pair and page.dominant_sha256:
                images.setdefault(page.dominant_sha256, set()).update(page.good_texts)
        return images

    def count(self, kind: str) -> int:
        return sum(page.kind == kind for page in self.pages)


class MiniWebServer:
    """An HTTP server on 127.0.0.1 serving registered images and the failure routes (`/missing/`, `/slow/`,
    `/loop/`, `/html/`, `/garbage/` (no HTTP status line), `/truncated/` (a body cut short)). Use as a context manager; `slow_seconds` is how long `/slow/` sleeps."""

    def __init__(self, slow_seconds: float = 1.5):
        self.images: dict[str, tuple[bytes, str]] = {}
        self.slow_seconds = slow_seconds
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server.requests += 1
                path = self.path.split("?")[0]
                if path in server.images:
                    data, content_type = server.images[path]
                    self._send(200, data, content_type)
                elif path.startswith("/slow/"):
                    time.sleep(server.slow_seconds)
                    self._send(200, b"\xff\xd8\xff", "image/jpeg")
                elif path.startswith("/loop/"):
                    target = "/loop/b.jpg" if path.endswith("a.jpg") else "/loop/a.jpg"
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif path.startswith("/garbage/"):
                    # Not an HTTP response at all.
                    self.wfile.write(b"SURPRISE\r\n\r\n")
                    self.close_connection = True
                elif path.startswith("/truncated/"):
                    # Announces 100000 bytes, sends 10, hangs up.
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(b"\xff\xd8\xff" + b"\x00" * 7)
                    self.close_connection = True
                elif path.startswith("/html/"):
                    self._send(200, b"<!doctype html><html><body>Not found, sorry</body></html>", "text/html")
                else:
                    self._send(404, b"not found", "text/plain")

            def _send(self, status: int, data: bytes, content_type: str) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        class Server(ThreadingHTTPServer):
            # The engines download with several threads per process: a deeper accept queue than the default 5.
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )

    def __enter__(self) -> MiniWebServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add(self, path: str, data: bytes, content_type: str) -> str:
        self.images[path] = (data, content_type)
        return self.base_url + path


_NOISE: dict[int, np.ndarray] = {}


def _photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth colour gradients, shapes and sensor-like noise (many colours, real edges).
    The noise is cut at a random offset from one shared field, which keeps the fixture fast to build."""
    if 0 not in _NOISE:
        _NOISE[0] = np.random.default_rng(12345).normal(0, 18, size=(800, 1000, 3)).astype(np.float32)
    noise = _NOISE[0]
    oy, ox = int(rng.integers(0, noise.shape[0] - height)), int(rng.integers(0, noise.shape[1] - width))
    y = np.arange(height, dtype=np.float32)[:, None, None]
    x = np.arange(width, dtype=np.float32)[None, :, None]
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-0.4, 0.4, size=(2, 3)).astype(np.float32)
    array = base + slope[0] * x + slope[1] * y + noise[oy : oy + height, ox : ox + width]
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
        box = (x0, y0, x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2)))
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, size=3)))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _flat(width: int, height: int, colour: tuple[int, int, int], text: str = "") -> bytes:
    """A flat graphic PNG (logo, icon, banner)."""
    image = Image.new("RGB", (width, height), colour)
    if text:
        ImageDraw.Draw(image).text((4, 4), text, fill=(255, 255, 255))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _page_html(
    *,
    title: str,
    body: str,
    lang: str,
    site_logo: str,
    icons: list[str],
    banner: str,
    teaser: str,
    photo_url: str | None,
    alt: str | None,
    img_title: str | None,
    figcaption: str | None,
    plain: bool = False,
) -> str:
    icons_html = "".join(
        f'<a href="/s{i}"><img src="{u}" class="icon social-icon" width="24" height="24"></a>'
        for i, u in enumerate(icons)
    )
    figure = ""
    if photo_url is not None:
        # A plain page declares no size and uses no <main>/<article>/<figure>: the harder case for stage 1.
        attrs = f'src="{photo_url}"' if plain else f'src="{photo_url}" width="640" height="480"'
        if alt is not None:
            attrs += f' alt="{alt}"'
        if img_title is not None:
            attrs += f' title="{img_title}"'
        caption = f"<figcaption>{figcaption}</figcaption>" if figcaption else ""
        figure = f"<figure><img {attrs}>{caption}</figure>"
    images_part = (
        f'<header><a href="/"><img src="{site_logo}" class="site-logo" alt="logo" width="160" height="50"></a>'
        f"<nav>{icons_html}<a href='/news'>News</a> <a href='/about'>About</a></nav></header>"
        f'<div class="ad-slot"><a href="http://ads.example.net/click"><img src="{banner}" class="ad banner" '
        f'width="728" height="90" alt="advertisement"></a></div>'
    )
    aside = f'<aside class="sidebar"><a href="/related"><img src="{teaser}" class="thumb" width="120" height="90"></a></aside>'
    content = f"<h1>{title}</h1><p>{body}</p>{figure}<p>{body}</p>"
    content = f"<div class='wrap'>{content}</div>" if plain else f"<main><article>{content}</article></main>"
    return (
        f"<!doctype html><html lang='{lang}'><head><meta charset='utf-8'><title>{title}</title>"
        "<style>body{font-family:sans-serif}</style><script>var x = 1;</script></head><body>"
        f"{images_part}{content}"
        f"{aside}<footer><p>Copyright 2026 Example Media. All rights reserved.</p></footer></body></html>"
    )


def _warc_response(writer, url: str, body: bytes, content_type: str, status: str = "200 OK") -> None:
    from warcio.statusandheaders import StatusAndHeaders

    headers = StatusAndHeaders(
        status, [("Content-Type", content_type), ("Content-Length", str(len(body)))], protocol="HTTP/1.1"
    )
    writer.write_record(
        writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
    )


def build_mini_web(
    folder: Path, server: MiniWebServer, *, seed: int = 0, n_articles: int = 150, n_files: int = 4
) -> MiniWeb:
    """Writes the mini-web into `folder` (`crawl-{i}.warc.gz` plus `damaged.warc.gz`), registers its images on
    `server`, and returns the ground truth. Deterministic for a given seed (apart from the server's port)."""
    from warcio.warcwriter import WARCWriter

    rng = np.random.default_rng(seed)
    pyrng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    captions = [f"{s.capitalize()} {a} {p}" for s in SUBJECTS for a in ACTIONS for p in PLACES]
    pyrng.shuffle(captions)
    caption_iter = iter(captions)

    logos = [
        server.add(f"/img/logo{i}.png", _flat(160, 50, (200, 30 * i, 40), "LOGO"), "image/png")
        for i in range(6)
    ]
    icons = [server.add(f"/img/icon{i}.png", _flat(24, 24, (20, 20 * i, 200)), "image/png") for i in range(4)]
    # Ad banners are photo-like JPEGs (a real ad often is): only their DOM position and class give them away.
    banners = [server.add(f"/img/banner{i}.jpg", _photo(rng, 728, 90), "image/jpeg") for i in range(3)]
    # A large sidebar teaser photo (bigger than 300 px): stage 2 alone would not reject it, stage 1 must.
    teasers = [server.add(f"/img/teaser{i}.jpg", _photo(rng, 360, 320), "image/jpeg") for i in range(5)]

    pages: list[GroundTruthPage] = []
    documents: list[tuple[str, bytes, str]] = []  # (url, body, content type) in crawl order
    photo_bytes: list[tuple[str, bytes]] = []

    def new_photo(
        name: str, width: int = 400, height: int = 320, host: str | None = None
    ) -> tuple[str, bytes, str]:
        data = _photo(rng, width, height)
        url = server.add(f"/img/{name}.jpg", data, "image/jpeg") if host is None else f"{host}/img/{name}.jpg"
        return url, data, hashlib.sha256(data).hexdigest()

    def add_page(
        kind,
        site,
        n,
        *,
        photo,
        alt,
        img_title,
        figcaption,
        good,
        expect,
        lang="en",
        body=ENGLISH_BODY,
        title=None,
        plain=False,
    ):
        page_url = f"http://{site}/article/{n}.html"
        html = _page_html(
            title=title or f"News from {site} number {n}",
            body=body,
            lang=lang,
            site_logo=logos[int(hashlib.sha1(site.encode()).hexdigest(), 16) % len(logos)],
            icons=icons,
            banner=banners[n % len(banners)],
            teaser=teasers[n % len(teasers)],
            photo_url=photo[0] if photo else None,
            alt=alt,
            img_title=img_title,
            figcaption=figcaption,
            plain=plain,
        )
        documents.append((page_url, html.encode("utf-8"), "text/html; charset=utf-8"))
        pages.append(
            GroundTruthPage(
                page_url, kind, photo[0] if photo else None, photo[2] if photo else None, good, expect
            )
        )

    sites = [f"site{i}.example.com" for i in range(8)]
    for n in range(n_articles):
        site = sites[n % len(sites)]
        caption = next(caption_iter)
        photo = new_photo(f"photo{n}")
        photo_bytes.append((photo[0], photo[1]))
        variant = n % 5
        if variant == 0:  # good alt, good figcaption (same sentence)
            add_page(
                "article",
                site,
                n,
                photo=photo,
                alt=caption,
                img_title=None,
                figcaption=caption,
                good=[caption],
                expect=True,
            )
        elif variant == 1:  # file-name alt, good figcaption
            add_page(
                "article",
                site,
                n,
                photo=photo,
                alt=BAD_TEXTS[0],
                img_title=None,
                figcaption=caption,
                good=[caption],
                expect=True,
            )
        elif variant == 2:  # good alt, "click here" title
            add_page(
                "article",
                site,
                n,
                photo=photo,
                alt=caption,
                img_title=BAD_TEXTS[1],
                figcaption=None,
                good=[caption],
                expect=True,
            )
        elif variant == 3:  # good title only, URL as alt
            add_page(
                "article",
                site,
                n,
                photo=photo,
                alt=BAD_TEXTS[2],
                img_title=caption,
                figcaption=None,
                good=[caption],
                expect=True,
            )
        else:  # good alt, spam title
            add_page(
                "article",
                site,
                n,
                photo=photo,
                alt=caption,
                img_title=SPAM_TEXT,
                figcaption=None,
                good=[caption],
                expect=True,
            )

    extra = 1000
    # Plain pages: the photo has no declared size and no article/figure around it (good alt text only).
    for i in range(10):
        caption = next(caption_iter)
        photo = new_photo(f"plain{i}")
        add_page(
            "plain",
            sites[i % len(sites)],
            900 + i,
            photo=photo,
            alt=caption,
            img_title=None,
            figcaption=None,
            good=[caption],
            expect=True,
            plain=True,
        )
    # The same photo bytes again on other pages (another URL on another site, and the same URL): kept once.
    for i in range(12):
        url, data = photo_bytes[i]
        sha = hashlib.sha256(data).hexdigest()
        same_url = i % 2 == 0
        photo_url = url if same_url else server.add(f"/img/copy{i}.jpg", data, "image/jpeg")
        caption = next(caption_iter)
        add_page(
            "duplicate",
            sites[(i + 3) % len(sites)],
            extra + i,
            photo=(photo_url, data, sha),
            alt=caption,
            img_title=None,
            figcaption=None,
            good=[caption],
            expect=True,
        )
    extra += 100
    for i in range(10):
        lang, body, captions_l = (
            ("de", GERMAN_BODY, GERMAN_CAPTIONS) if i % 2 == 0 else ("fr", FRENCH_BODY, FRENCH_CAPTIONS)
        )
        photo = new_photo(f"foreign{i}")
        add_page(
            "foreign",
            f"site{i}.example.de",
            extra + i,
            photo=photo,
            alt=captions_l[i % 2],
            img_title=None,
            figcaption=None,
            good=[],
            expect=False,
            lang=lang,
            body=body,
            title="Nachrichten" if lang == "de" else "Nouvelles",
        )
    extra += 100
    for i in range(8):
        photo = new_photo(f"spam{i}")
        add_page(
            "spam",
            sites[i % len(sites)],
            extra + i,
            photo=photo,
            alt=SPAM_TEXT,
            img_title=None,
            figcaption=None,
            good=[],
            expect=False,
        )
    extra += 100
    for i in range(14):
        photo = new_photo(f"shared{i}")
        add_page(
            "shared",
            sites[i % len(sites)],
            extra + i,
            photo=photo,
            alt=SHARED_TEXT,
            img_title=None,
            figcaption=None,
            good=[],
            expect=False,
        )
    extra += 100
    for i in range(6):
        photo = new_photo(f"small{i}", width=200, height=150)
        add_page(
            "small",
            sites[i % len(sites)],
            extra + i,
            photo=photo,
            alt=next(caption_iter),
            img_title=None,
            figcaption=None,
            good=[],
            expect=False,
        )
    extra += 100
    for kind, path in (
        ("missing", "/missing/x{}.jpg"),
        ("slow", "/slow/x{}.jpg"),
        ("loop", "/loop/a.jpg?{}"),
        ("html", "/html/x{}.jpg"),
    ):
        count = 2 if kind == "slow" else 4
        for i in range(count):
            url = server.base_url + path.format(i)
            add_page(
                kind,
                sites[i % len(sites)],
                extra + i,
                photo=(url, b"", None),
                alt=next(caption_iter),
                img_title=None,
                figcaption=None,
                good=[],
                expect=False,
            )
        extra += 100
    for i in range(5):
        add_page(
            "noimage",
            sites[i % len(sites)],
            extra + i,
            photo=None,
            alt=None,
            img_title=None,
            figcaption=None,
            good=[],
            expect=False,
        )
    extra += 100
    stored: list[tuple[str, bytes]] = []
    for i in range(6):
        photo = new_photo(f"stored{i}", host="http://static.unserved.example")
        stored.append((photo[0], photo[1]))
        caption = next(caption_iter)
        add_page(
            "warc_image",
            sites[i % len(sites)],
            extra + i,
            photo=photo,
            alt=caption,
            img_title=None,
            figcaption=None,
            good=[caption],
            expect=True,
        )
    for page in pages:
        if page.kind in ("missing", "slow", "loop", "html"):
            page.dominant_sha256 = None

    # Interleave kinds over the files (a crawl is not sorted by kind); stored images go in the file of their page.
    order = list(range(len(documents)))
    pyrng.shuffle(order)
    warc_files = [folder / f"crawl-{i}.warc.gz" for i in range(n_files)]
    stored_by_url = dict(stored)
    page_for_stored = {page.dominant_url: page.page_url for page in pages if page.kind == "warc_image"}
    files_docs: list[list[tuple[str, bytes, str]]] = [[] for _ in range(n_files)]
    for position, index in enumerate(order):
        url, body, content_type = documents[index]
        files_docs[position % n_files].append((url, body, content_type))
        for image_url, page_url in page_for_stored.items():
            if page_url == url:
                files_docs[position % n_files].append((image_url, stored_by_url[image_url], "image/jpeg"))
    for path, docs in zip(warc_files, files_docs, strict=True):
        with open(path, "wb") as stream:
            writer = WARCWriter(stream, gzip=True)
            for url, body, content_type in docs:
                _warc_response(writer, url, body, content_type)
    damaged = folder / "damaged.warc.gz"
    _write_damaged(damaged)
    return MiniWeb(warc_files=warc_files, pages=pages, damaged_warc=damaged)


def _write_damaged(path: Path) -> None:
    """The malformed WARC cases in one file, ending with a truncated record."""
    from warcio.warcwriter import WARCWriter

    stream = io.BytesIO()
    writer = WARCWriter(stream, gzip=True)
    latin = (
        "<html><head><title>Caf\xe9</title></head><body><p>" + ENGLISH_BODY + "</p></body></html>"
    ).encode("latin-1")
    _warc_response(writer, "http://damaged.example/latin1.html", latin, "text/html; charset=iso-8859-1")
    _warc_response(
        writer,
        "http://damaged.example/misdeclared.html",
        "<html><body><p>Caf\u00e9 na\u00efve r\u00e9sum\u00e9. ".encode()
        + ENGLISH_BODY.encode()
        + b"</p></body></html>",
        "text/html; charset=iso-8859-1",
    )
    _warc_response(
        writer,
        "http://damaged.example/noimages.html",
        f"<html><body><p>{ENGLISH_BODY}</p></body></html>".encode(),
        "text/html",
    )
    giant = ("<html><body>" + "<p>" + ENGLISH_BODY * 8000 + "</p>" + "</body></html>").encode()
    _warc_response(writer, "http://damaged.example/giant.html", giant, "text/html")
    # Broken HTTP headers: a response record whose payload is not an HTTP message (written by hand, since
    # warcio's writer refuses to build one).
    payload = b"THIS IS NOT HTTP\r\n\r\n<html></html>"
    raw = (
        b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://damaged.example/broken.html\r\n"
        b"WARC-Date: 2026-01-01T00:00:00Z\r\nWARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-000000000001>\r\n"
        b"Content-Type: application/http; msgtype=response\r\n"
        + f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
        + b"\r\n\r\n"
    )
    stream.write(gzip.compress(raw))
    _warc_response(
        writer,
        "http://damaged.example/last.html",
        f"<html><body><p>{ENGLISH_BODY}</p></body></html>".encode(),
        "text/html",
    )
    data = stream.getvalue()
    # Cut the last gzip member in half: a truncated download.
    last_member = data.rfind(b"\x1f\x8b\x08")
    path.write_bytes(data[: last_member + (len(data) - last_member) // 2])


__all__ = ["GroundTruthPage", "MiniWeb", "MiniWebServer", "build_mini_web"]
