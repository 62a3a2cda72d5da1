"""The labelled real-page set (`tests/data/real_pages/`): loading, measuring LAIT on it, and the report.

140 saved pages from public test corpora of article-extraction libraries (sources and licences in
`manifest.json`), labelled by hand (`labels.json`; the rules are in `tests/data/real_pages/README.md`): each page's
language, its dominant image(s), the other content images that are acceptable picks, and the acceptable captions
of each image. The measures, on pages and images nobody here generated:

- language accuracy, English vs not, over every page (stage 1's language decision);
- dominant-image precision and recall of stage 1 (with the site step) on the English pages: a pick is right when
  it is one of the page's labelled pictures (dominant or acceptable); recall counts the labelled dominant
  pictures found (at most `pages.max_dominant` per page);
- text precision of the kept pairs of a whole local-engine run over a WARC of the pages, whose images are
  generated locally at their labelled size and stored in the WARC (nothing is fetched): a kept pair is right
  when its image is a labelled picture of the page and its text is one of that picture's acceptable captions.

`python tests/lait_real_pages.py` prints the whole report (per source, and the per-signal ablation of stage 1)
as the markdown tables docs/lait.md shows.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import lzma
import re
import sys
import unicodedata
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA = Path(__file__).parent / "data" / "real_pages"
SOURCES = {
    "mozilla/readability": "readability",
    "adbar/trafilatura": "trafilatura",
    "scrapinghub/article-extraction-benchmark": "zyte-articles",
    "scrapinghub/product-extraction-benchmark": "zyte-products",
    "postlight/parser": "postlight",
}
DEFAULT_IMAGE_SIZE = (640, 480)  # an image stage 1 proposes that nobody labelled: large, so stage 2 keeps it


@dataclass
class RealPage:
    """One labelled page: provenance, raw bytes and the hand labels."""

    id: str
    url: str
    source: str
    kind: str
    language: str
    html: bytes
    images: list[dict[str, Any]]
    note: str = ""

    @property
    def english(self) -> bool:
        return self.language == "en"

    def picture_of(self, url: str) -> dict[str, Any] | None:
        """The labelled picture `url` names (any of its URLs), or None."""
        for image in self.images:
            if url in image["urls"]:
                return image
        return None


def load_real_pages() -> list[RealPage]:
    """The labelled pages, in manifest order."""
    manifest = json.loads((DATA / "manifest.json").read_text(encoding="utf-8"))
    labels = {entry["id"]: entry for entry in json.loads((DATA / "labels.json").read_text(encoding="utf-8"))}
    pages = []
    for entry in manifest:
        label = labels[entry["id"]]
        html = lzma.decompress((DATA / entry["file"]).read_bytes())
        if hashlib.sha256(html).hexdigest() != entry["sha256"]:
            raise ValueError(f"{entry['file']}: content differs from the manifest's sha256")
        pages.append(
            RealPage(
                id=entry["id"],
                url=entry["url"],
                source=SOURCES[entry["source_repository"]],
                kind=label["kind"],
                language=label["language"],
                html=html,
                images=label["images"],
                note=label["note"],
            )
        )
    return pages


# ---------------------------------------------------------------------------------------------------------------
# caption matching


def _norm_words(text: str) -> list[str]:
    text = unicodedata.normalize("NFKD", text.lower())
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    return re.findall(r"[^\W_]+", text)


def caption_matches(text: str, captions: list[str]) -> bool:
    """True when `text` (a cleaned candidate) is one of `captions` as the labelling rules define it: its words
    are a contiguous run of an acceptable caption's words (cleaning and cutting only remove parts), or a caption's
    words are a contiguous run of it that covers at least 60% of it (a caption with a little extra)."""
    words = _norm_words(text)
    if not words:
        return False
    joined = " " + " ".join(words) + " "
    for caption in captions:
        cwords = _norm_words(caption)
        if not cwords:
            continue
        cjoined = " " + " ".join(cwords) + " "
        if joined in cjoined:
            return True
        if cjoined in joined and len(cwords) >= 0.6 * len(words):
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------
# stage 1 on the pages


@dataclass
class PageResult:
    page: RealPage
    kept_english: bool  # stage 1's language decision: the page goes on
    picks: list[str] = field(default_factory=list)  # image URLs of the kept candidates, best first


def _page_record(page: RealPage):
    from modeling_imagebert.lait.records import DropCounter, PageRecord
    from modeling_imagebert.lait.warc import decode_body

    text, codec, source = decode_body(page.html, None, DropCounter())
    return PageRecord(
        warc_file="real_pages.warc.gz",
        warc_offset=0,
        page_url=page.url,
        html=text,
        status=200,
        content_type="text/html",
        charset=codec,
        charset_source=source,
    )


def run_stage1(pages: list[RealPage], pages_config: Mapping[str, Any]) -> list[PageResult]:
    """Stage 1 and its site step on every page with `pages_config` (the config section `pages`): the language
    decision and the kept candidates of each page."""
    from modeling_imagebert.lait.page_content import page_language
    from modeling_imagebert.lait.pages import apply_site_repetition, stage1_pages
    from modeling_imagebert.lait.records import DropCounter

    results, by_site = [], defaultdict(list)
    for page in pages:
        record = _page_record(page)
        language = page_language(record.html, pages_config)
        result = PageResult(page=page, kept_english=language.kept)
        candidates = stage1_pages(record, pages_config, DropCounter())
        for candidate in candidates:
            by_site[candidate.site].append((result, candidate))
        results.append(result)
    for site_candidates in by_site.values():
        kept = apply_site_repetition([c for _, c in site_candidates], pages_config, DropCounter())
        kept_ids = {(c.page_url, c.image_url) for c in kept}
        for result, candidate in site_candidates:
            if (candidate.page_url, candidate.image_url) in kept_ids:
                result.picks.append(candidate.image_url)
    return results


@dataclass
class Counts:
    pages: int = 0
    language_right: int = 0
    picks: int = 0
    picks_right: int = 0
    dominant: int = 0
    dominant_found: int = 0

    def add(self, other: Counts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def language_accuracy(self) -> float:
        return self.language_right / self.pages if self.pages else float("nan")

    @property
    def precision(self) -> float:
        return self.picks_right / self.picks if self.picks else 1.0

    @property
    def recall(self) -> float:
        return self.dominant_found / self.dominant if self.dominant else 1.0


def score_page(result: PageResult, max_dominant: int, *, all_languages: bool = False) -> Counts:
    """Counts of one page. Image counts only for English pages (the pages LAIT keeps), unless `all_languages`."""
    page = result.page
    counts = Counts(pages=1, language_right=int(result.kept_english == page.english))
    if page.english or all_languages:
        counts.picks = len(result.picks)
        counts.picks_right = sum(page.picture_of(url) is not None for url in result.picks)
        dominant = [image for image in page.images if image["role"] == "dominant"]
        counts.dominant = min(len(dominant), max_dominant)
        found = {id(page.picture_of(url)) for url in result.picks}
        counts.dominant_found = min(sum(id(image) in found for image in dominant), counts.dominant)
    return counts


def stage1_counts(
    results: list[PageResult], max_dominant: int, *, all_languages: bool = False
) -> dict[str, Counts]:
    """Counts per source and in total ("all")."""
    table: dict[str, Counts] = defaultdict(Counts)
    for result in results:
        counts = score_page(result, max_dominant, all_languages=all_languages)
        table[result.page.source].add(counts)
        table["all"].add(counts)
    return dict(table)


# ---------------------------------------------------------------------------------------------------------------
# the whole pipeline on a WARC of the pages


def _image_bytes(url: str, size: tuple[int, int]) -> bytes:
    """A JPEG of `size` whose pixels depend on the URL (distinct content hashes, so aggregation keeps each)."""
    from PIL import Image, ImageDraw

    digest = hashlib.sha512(url.encode()).digest()
    image = Image.new("RGB", size, tuple(digest[:3]))
    draw = ImageDraw.Draw(image)
    for k in range(6):
        x, y = digest[3 + k] * size[0] // 256, digest[9 + k] * size[1] // 256
        draw.rectangle(
            [x, y, x + size[0] // 5, y + size[1] // 5], fill=tuple(digest[15 + 3 * k : 18 + 3 * k])
        )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=80)
    return out.getvalue()


def write_real_pages_warc(pages: list[RealPage], path: Path, image_urls: set[str]) -> None:
    """One WARC.gz: a 200 text/html response per page (the saved bytes, no charset header, as a crawler that saw
    none would store them), then an image/jpeg response for every URL in `image_urls`, at its labelled size
    (`DEFAULT_IMAGE_SIZE` when no label names it)."""
    from warcio.statusandheaders import StatusAndHeaders
    from warcio.warcwriter import WARCWriter

    sizes = {}
    for page in pages:
        for image in page.images:
            for url in image["urls"]:
                sizes[url] = tuple(image["size"])

    def response(writer, url: str, body: bytes, content_type: str) -> None:
        headers = StatusAndHeaders(
            "200 OK",
            [("Content-Type", content_type), ("Content-Length", str(len(body)))],
            protocol="HTTP/1.1",
        )
        writer.write_record(
            writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers)
        )

    with open(path, "wb") as handle:
        writer = WARCWriter(handle, gzip=True)
        for page in pages:
            response(writer, page.url, page.html, "text/html")
        for url in sorted(image_urls):
            response(writer, url, _image_bytes(url, sizes.get(url, DEFAULT_IMAGE_SIZE)), "image/jpeg")


E2E_OVERRIDES = {
    "images": {"fetch_http": False, "warc_images": True},
    "engine": {"processes": 1, "site_buckets": 4, "fetch_threads": 1},
}


@dataclass
class PairCounts:
    kept: int = 0
    image_right: int = 0
    text_right: int = 0  # image right and text one of its captions

    def add(self, other: PairCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def text_precision(self) -> float:
        """Text precision on the kept pairs whose image is a labelled picture of the page."""
        return self.text_right / self.image_right if self.image_right else 1.0

    @property
    def pair_precision(self) -> float:
        """Share of all kept pairs whose image and text are both right."""
        return self.text_right / self.kept if self.kept else 1.0


def run_pipeline(pages: list[RealPage], folder: Path, config: Mapping[str, Any] | None = None):
    """The local engine over a WARC of `pages` (images stored in it). Output: (kept rows of pairs.parquet,
    stats dict)."""
    import pyarrow.parquet as pq

    from modeling_imagebert.lait.config import load_config
    from modeling_imagebert.lait.engine_local import run_local

    config = copy.deepcopy(config) if config is not None else load_config(overrides=E2E_OVERRIDES)
    # Which images stage 2 will ask for: those stage 1 proposes. Every other <img> is never fetched, so it
    # needs no stored copy.
    proposed = {url for result in run_stage1(pages, config["pages"]) for url in result.picks}
    folder.mkdir(parents=True, exist_ok=True)
    warc = folder / "real_pages.warc.gz"
    write_real_pages_warc(pages, warc, proposed)
    stats = run_local([str(warc)], folder / "pairs", config)
    rows = pq.read_table(folder / "pairs" / "pairs.parquet").to_pylist()
    return [row for row in rows if row["kept"]], stats


def pair_counts(pages: list[RealPage], kept_rows: list[dict[str, Any]]) -> dict[str, PairCounts]:
    by_url = {page.url: page for page in pages}
    table: dict[str, PairCounts] = defaultdict(PairCounts)
    for row in kept_rows:
        page = by_url[row["page_url"]]
        picture = page.picture_of(row["image_url"])
        counts = PairCounts(kept=1)
        if picture is not None:
            counts.image_right = 1
            counts.text_right = int(caption_matches(row["text"], picture["captions"]))
        table[page.source].add(counts)
        table["all"].add(counts)
    return dict(table)


def wrong_pairs(pages: list[RealPage], kept_rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(page id, image URL, text source, text) of the kept pairs whose image or text is wrong."""
    by_url = {page.url: page for page in pages}
    out = []
    for row in kept_rows:
        page = by_url[row["page_url"]]
        picture = page.picture_of(row["image_url"])
        if picture is None or not caption_matches(row["text"], picture["captions"]):
            out.append((page.id, row["image_url"], row["text_source"], row["text"]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# the report


ORDER = ["readability", "trafilatura", "zyte-articles", "zyte-products", "postlight", "all"]


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def every_language(pages_config: Mapping[str, Any]) -> dict[str, Any]:
    """`pages_config` with the language filter off: dominant images judged on every page."""
    return {**copy.deepcopy(dict(pages_config)), "languages": ["*"]}


def stage1_table(
    results: list[PageResult], every_results: list[PageResult], max_dominant: int, pages: list[RealPage]
) -> str:
    """Per source: language accuracy, and stage 1's precision and recall on the English pages (`results`) and on
    every page with the language filter off (`every_results`)."""
    table = stage1_counts(results, max_dominant)
    every = stage1_counts(every_results, max_dominant, all_languages=True)
    english = defaultdict(int)
    for page in pages:
        english[page.source] += page.english
        english["all"] += page.english
    lines = [
        "| source | pages (English) | language accuracy | picks | precision | dominant | recall "
        "| precision, all languages | recall, all languages |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for source in ORDER:
        c, a = table[source], every[source]
        lines.append(
            f"| {source} | {c.pages} ({english[source]}) | {_fmt(c.language_accuracy)} | {c.picks} | "
            f"{_fmt(c.precision)} | {c.dominant} | {_fmt(c.recall)} | {_fmt(a.precision)} | {_fmt(a.recall)} |"
        )
    return "\n".join(lines)


def pair_table(counts: dict[str, PairCounts]) -> str:
    lines = [
        "| source | kept pairs | image right | text right | text precision | pair precision |",
        "|---|---|---|---|---|---|",
    ]
    for source in ORDER:
        c = counts.get(source, PairCounts())
        lines.append(
            f"| {source} | {c.kept} | {c.image_right} | {c.text_right} | {_fmt(c.text_precision)} | "
            f"{_fmt(c.pair_precision)} |"
        )
    return "\n".join(lines)


def ablations(pages_config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each stage-1 signal switched off alone: name -> overrides of the config section `pages`."""
    weights = pages_config["weights"]

    def zero(*names: str) -> dict[str, Any]:
        return {"weights": {**weights, **{name: 0.0 for name in names}}}

    return {
        "all signals (the defaults)": {},
        "no main content (no content root or region)": {"main_content": False},
        "no content root / region features": zero("in_content", "in_content_region"),
        "no position in the content": zero("content_position"),
        "no og:image / twitter:image / schema.org image": zero("meta_image"),
        "no teaser links": zero("in_teaser"),
        "no page furniture (classes, nav/aside/header/footer)": zero("in_boilerplate"),
        "no figure / figcaption": zero("in_figure", "has_figcaption"),
        "no declared size (attributes, srcset, CSS, URL)": zero("log_side_ratio", "small", "extreme_aspect"),
        "no class/id/alt/src words": zero("negative_word_hits", "positive_word_hits"),
        "no file type": zero("ext_jpg", "ext_png", "ext_gif", "ext_webp", "ext_svg", "ext_ico", "ext_other"),
        "no <main>/<article> tags": zero("in_main", "in_article"),
        "language: no <html lang> fallback": {"use_html_lang": False},
        "language: no mixed-script rule": {"max_non_latin_share": 1.0},
    }


def ablation_table(pages: list[RealPage]) -> str:
    """Stage 1 on the real pages with each signal switched off alone (`ablations`)."""
    from modeling_imagebert.lait.config import load_config

    base = load_config()["pages"]
    lines = [
        "| stage 1 without | language accuracy | precision | recall | F1 | change in F1 |",
        "|---|---|---|---|---|---|",
    ]
    reference = None
    for name, overrides in ablations(base).items():
        config = {**copy.deepcopy(base), **overrides}
        counts = stage1_counts(run_stage1(pages, config), int(base["max_dominant"]))["all"]
        f1 = 2 * counts.precision * counts.recall / max(counts.precision + counts.recall, 1e-9)
        reference = f1 if reference is None else reference
        lines.append(
            f"| {name} | {_fmt(counts.language_accuracy)} | {_fmt(counts.precision)} | {_fmt(counts.recall)} | "
            f"{_fmt(f1)} | {f1 - reference:+.3f} |"
        )
    return "\n".join(lines)


def text_ablation_table(pages: list[RealPage], folder: Path) -> str:
    """Kept pairs of whole runs with stage 3's text rules switched off one at a time."""
    from modeling_imagebert.lait.config import load_config

    variants = {
        "all rules (the defaults)": {},
        "nearby text without the headline-word rule": {"pages": {"nearby_title_overlap": False}},
        "no nearby text at all": {"text": {"sources": ["alt", "title", "figcaption"]}},
    }
    lines = ["| stage 3 with | kept pairs | text precision |", "|---|---|---|"]
    for index, (name, overrides) in enumerate(variants.items()):
        config = load_config(overrides={**E2E_OVERRIDES, **overrides})
        kept, _ = run_pipeline(pages, folder / f"variant-{index}", config)
        counts = pair_counts(pages, kept)["all"]
        lines.append(f"| {name} | {counts.kept} | {_fmt(counts.text_precision)} |")
    return "\n".join(lines)


def main() -> None:
    import tempfile

    from modeling_imagebert.lait.config import load_config

    pages = load_real_pages()
    config = load_config(overrides=E2E_OVERRIDES)
    results = run_stage1(pages, config["pages"])
    print("## Stage 1 (language, dominant images)\n")
    every_results = run_stage1(pages, every_language(config["pages"]))
    print(stage1_table(results, every_results, int(config["pages"]["max_dominant"]), pages))
    with tempfile.TemporaryDirectory() as tmp:
        kept, _ = run_pipeline(pages, Path(tmp), config)
    print("\n## Kept pairs of a local-engine run\n")
    print(pair_table(pair_counts(pages, kept)))
    if "--wrong" in sys.argv:
        for item in wrong_pairs(pages, kept):
            print("  wrong:", *item)
        for result in results:
            page = result.page
            bad = [u for u in result.picks if page.picture_of(u) is None]
            missed = [
                im["urls"][0]
                for im in page.images
                if im["role"] == "dominant" and not any(u in im["urls"] for u in result.picks)
            ]
            if page.english and (bad or missed):
                print(
                    "  stage1:", page.id, "wrong:", [u[:90] for u in bad], "missed:", [u[:90] for u in missed]
                )
            if result.kept_english != page.english:
                print("  language:", page.id, page.language, "kept" if result.kept_english else "dropped")
    if "--ablation" in sys.argv:
        print("\n## Ablation of stage 1\n")
        print(ablation_table(pages))
        with tempfile.TemporaryDirectory() as tmp:
            print("\n## Ablation of the text rules\n")
            print(text_ablation_table(pages, Path(tmp)))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
