"""The LAIT pipeline's configuration: one YAML file, one section per stage, validated where people type it.

`configuration/lait/default.yaml` is both the defaults and the schema: a user file (or `--set key=value`
overrides) is merged over it, and any key the default file does not have is refused with a one-line error naming
the key and the closest known one (`images.min_widht: unknown key; did you mean images.min_width?`). A value
must have the default's type (an int is accepted where the default is a float; a key whose default is null takes
any value; a list keeps its items unchecked here, stage modules check their own lists).

The result is a plain dict of dicts of JSON-able values, so it pickles to Spark executors and pool workers, and
`config_fingerprint` gives a stable hash a resumed run compares with the one it started with.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..cli import short_repr
from ..package_data import data_path
from ..safe_loading import CONFIG_MAX_BYTES, NotRegularFileError, load_yaml, read_input_text

SECTIONS = ("pages", "images", "text", "scoring", "aggregation", "engine")

# Inside the package (package data), so an install from a wheel finds it from any folder.
DEFAULT_CONFIG_PATH = data_path("lait", "default.yaml", check=False)


class ConfigError(ValueError):
    """A LAIT config file or override is invalid; the message names the file, the key and what was expected."""


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = load_yaml(
            read_input_text(path, "a LAIT config (YAML)", CONFIG_MAX_BYTES), path, "LAIT configs"
        )
    except NotRegularFileError as error:
        raise ConfigError(str(error)) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the LAIT config ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(error, 'problem', error)})") from None
    except ValueError as error:  # YAML anchors or aliases, not UTF-8, too large: the message names the file
        raise ConfigError(str(error)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}"
        )
    return data


def default_config() -> dict[str, dict[str, Any]]:
    """The defaults: `configuration/lait/default.yaml` as a dict of sections (a fresh copy each call)."""
    data = _read_yaml(DEFAULT_CONFIG_PATH)
    missing = [s for s in SECTIONS if s not in data]
    if missing:
        raise ConfigError(f"{DEFAULT_CONFIG_PATH}: missing section(s) {', '.join(missing)}")
    return copy.deepcopy(data)


def _type_ok(default: Any, value: Any) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, list):
        return isinstance(value, list)
    if isinstance(default, dict):
        return isinstance(value, dict)
    return True


def _type_word(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}.get(
        type(value), "a mapping" if isinstance(value, dict) else type(value).__name__
    )


def _merge(defaults: dict[str, Any], user: Mapping[str, Any], where: str, source: str) -> None:
    """Merges `user` into `defaults` in place, refusing unknown keys and wrong types."""
    for key, value in user.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in defaults:
            close = difflib.get_close_matches(str(key), [str(k) for k in defaults], n=1, cutoff=0.5)
            hint = f"; did you mean {where + '.' if where else ''}{close[0]}?" if close else ""
            known = "" if close else f"; known keys: {', '.join(map(str, defaults))}"
            raise ConfigError(f"{source}: {dotted}: unknown key{hint}{known}")
        default = defaults[key]
        if isinstance(default, dict) and default and isinstance(value, Mapping):
            _merge(default, value, dotted, source)
            continue
        if not _type_ok(default, value):
            raise ConfigError(
                f"{source}: {dotted}: expected {_type_word(default)} like the default {default!r}, got {short_repr(value)}"
            )
        if isinstance(default, float) and value is not None:
            try:
                value = float(value)
            except (
                OverflowError
            ):  # an integer too large for a float (YAML reads 1e400 as inf, 10**400 as int)
                raise ConfigError(
                    f"{source}: {dotted}: {str(value)[:40]}... is not a finite number"
                ) from None
        defaults[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`"images.min_width=400"` -> `("images.min_width", 400)`; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {short_repr(text)}: expected SECTION.KEY=VALUE, e.g. images.min_width=400")
    try:
        value = load_yaml(raw, f"--set {short_repr(text)}", "LAIT configs") if raw.strip() else None
    except ValueError as error:  # an anchor or alias
        raise ConfigError(str(error)) from None
    except yaml.YAMLError:
        raise ConfigError(f"--set {short_repr(text)}: the value is not valid YAML") from None
    return key.strip(), value


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] | Mapping[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Loads the LAIT config: the defaults, then the file at `path` (if any), then `overrides`.

    Inputs: `path` a YAML file with any subset of the sections; `overrides` either `["images.min_width=400",
    ...]` (CLI `--set`) or a nested mapping like the file. Output: `{section: {key: value}}` with every key of
    the default file present. Raises `ConfigError` naming the unknown key and the closest known one.
    """
    config = default_config()
    if path is not None:
        path = Path(path)
        _merge(config, _read_yaml(path), "", str(path))
    if overrides:
        if isinstance(overrides, Mapping):
            _merge(config, overrides, "", "overrides")
        else:
            for text in overrides:
                dotted, value = parse_override(text)
                nested: Any = value
                for part in reversed(dotted.split(".")):
                    nested = {part: nested}
                _merge(config, nested, "", f"--set {text}")
    _check_sections(config)
    return config


# Every number of the config, with its range, checked once where the config enters (`load_config`): a NaN
# threshold would keep nothing, a negative timeout would make every fetch fail, a timeout of 1e308 overflows the
# socket layer, a huge process count forks without end; each is refused here with one line naming the key.
# (kind, low, high): "int" or "float", inclusive bounds (None = unbounded). A key whose default is null is
# checked only when set.
_DAY_S = 86400.0
NUMERIC_RANGES: dict[str, tuple[str, float | None, float | None]] = {
    "pages.max_page_bytes": ("int", 1, 2**30),
    "pages.max_depth": ("int", 1, 100000),
    "pages.max_replacement_ratio": ("float", 0.0, 1.0),
    "pages.max_language_rank": ("int", 0, None),
    "pages.language_sample_chars": ("int", 1, None),
    "pages.language_fill_chars": ("int", 0, None),
    "pages.min_text_chars": ("int", 0, None),
    "pages.max_non_latin_share": ("float", 0.0, 1.0),
    "pages.max_images_per_page": ("int", 1, None),
    "pages.content_min_chars": ("int", 0, None),
    "pages.content_min_score": ("float", None, None),
    "pages.content_region_levels": ("int", 0, None),
    "pages.content_region_fallback": ("int", 0, None),
    "pages.reference_side": ("float", 1e-9, None),
    "pages.small_side": ("int", 1, None),
    "pages.extreme_aspect": ("float", 1.0, None),
    "pages.word_levels": ("int", 0, None),
    "pages.bias": ("float", None, None),
    "pages.min_score": ("float", None, None),
    "pages.keep_margin": ("float", 0.0, None),
    "pages.max_dominant": ("int", 1, None),
    "pages.max_site_repeat": ("int", 1, None),
    "pages.nearby_max_levels": ("int", 0, None),
    "pages.nearby_min_words": ("int", 0, None),
    "pages.nearby_max_chars": ("int", 1, None),
    "text.min_words": ("int", 0, None),
    "text.max_words": ("int", 1, None),
    "text.max_oov_ratio": ("float", 0.0, 1.0),
    "text.max_candidates": ("int", 1, None),
    "images.min_width": ("int", 0, None),
    "images.min_height": ("int", 0, None),
    "images.timeout_s": ("float", 1e-3, _DAY_S),
    "images.total_timeout_s": ("float", 1e-3, _DAY_S),
    "images.min_bytes_per_s": ("float", 0.0, None),
    "images.max_redirects": ("int", 0, 100),
    "images.max_bytes": ("int", 1, 2**31),
    "images.max_pixels": ("int", 1, 10**10),
    "images.jpeg_quality": ("int", 1, 100),
    "scoring.threshold": ("float", 0.0, 1.0),
    "scoring.rule_threshold": ("float", 0.0, 1.0),
    "scoring.itm_batch_size": ("int", 1, 65536),
    "scoring.itm_threads": ("int", 0, 1024),
    "aggregation.max_images_per_text": ("int", 1, None),
    "engine.processes": ("int", 0, 4096),
    "engine.site_buckets": ("int", 1, 1_000_000),
    "engine.fetch_threads": ("int", 1, 1024),
    "engine.shard_size": ("int", 1, 10**7),
    "engine.contact_sheet_examples": ("int", 0, 10000),
    "engine.spark_partitions": ("int", 1, 10**6),
}


def _range_words(kind: str, low: float | None, high: float | None) -> str:
    noun = "an integer" if kind == "int" else "a finite number"
    if low is not None and high is not None:
        return f"{noun} in [{low:g}, {high:g}]"
    if low is not None:
        return f"{noun} >= {low:g}"
    if high is not None:
        return f"{noun} <= {high:g}"
    return noun


def check_number(key: str, value: Any, kind: str, low: float | None, high: float | None) -> None:
    """Raises ConfigError (`lait config: KEY: VALUE is not a finite number in [LOW, HIGH]`) unless `value` is a
    number of `kind` ("int" or "float"), finite and within the inclusive bounds."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    good = is_number and (isinstance(value, int) if kind == "int" else True)
    if good and isinstance(value, float):
        good = math.isfinite(value)
    if good:
        good = (low is None or value >= low) and (high is None or value <= high)
    if not good:
        shown = short_repr(value, limit=60)
        raise ConfigError(f"lait config: {key}: {shown} is not {_range_words(kind, low, high)}")


def _check_numbers(config: Mapping[str, Mapping[str, Any]]) -> None:
    for dotted, (kind, low, high) in NUMERIC_RANGES.items():
        section, key = dotted.split(".")
        value = config[section].get(key)
        if value is None and key in ("threshold", "spark_partitions"):
            continue  # null: the documented default (the model's own threshold; one partition per file)
        check_number(dotted, value, kind, low, high)
    for feature, weight in config["pages"]["weights"].items():
        check_number(f"pages.weights.{feature}", weight, "float", None, None)
    text = config["text"]
    if text["max_words"] < text["min_words"]:
        raise ConfigError(
            f"lait config: text.max_words: {short_repr(text['max_words'])} is below text.min_words "
            f"{short_repr(text['min_words'])}"
        )


def _check_sections(config: dict[str, dict[str, Any]]) -> None:
    """Checks that a stage module does for its own lists and ranges (kept here so errors come at load time)."""
    _check_numbers(config)
    from .images import check_classifier_specs

    try:
        check_classifier_specs(config["images"]["classifiers"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    scoring = config["scoring"]
    if scoring["region_features"] and not scoring["itm_checkpoint"]:
        raise ConfigError(
            "scoring.region_features: set without scoring.itm_checkpoint; the region features are only read for "
            "the ITM score (give the ImageBERT checkpoint too, or leave region_features null)"
        )


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A stable sha256 of the stage sections (sorted JSON), stored in an output folder so that a resumed run
    uses the stages it started with; the `engine` section is left out (processes, partitions and the engine
    itself do not change the pairs)."""
    stages = {k: v for k, v in config.items() if k != "engine"}
    return hashlib.sha256(json.dumps(stages, sort_keys=True, default=str).encode()).hexdigest()


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SECTIONS",
    "NUMERIC_RANGES",
    "ConfigError",
    "check_number",
    "config_fingerprint",
    "default_config",
    "load_config",
    "parse_override",
]
