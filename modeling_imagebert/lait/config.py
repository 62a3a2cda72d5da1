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
        defaults[key] = float(value) if isinstance(default, float) and value is not None else value


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


def _check_sections(config: dict[str, dict[str, Any]]) -> None:
    """Checks that a stage module does for its own lists and ranges (kept here so errors come at load time)."""
    images, aggregation, engine = config["images"], config["aggregation"], config["engine"]
    for key in ("min_width", "min_height"):
        if images[key] < 0:
            raise ConfigError(f"images.{key}: expected a non-negative integer, got {short_repr(images[key])}")
    for key in ("timeout_s", "max_bytes", "max_pixels"):
        if not images[key] or images[key] <= 0:
            raise ConfigError(f"images.{key}: expected a positive number, got {short_repr(images[key])}")
    if images["max_redirects"] < 0:
        raise ConfigError(f"images.max_redirects: expected >= 0, got {short_repr(images['max_redirects'])}")
    from .images import check_classifier_specs

    try:
        check_classifier_specs(images["classifiers"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if aggregation["max_images_per_text"] < 1:
        raise ConfigError(
            f"aggregation.max_images_per_text: expected an integer >= 1, got {short_repr(aggregation['max_images_per_text'])}"
        )
    scoring = config["scoring"]
    if scoring["itm_batch_size"] < 1:
        raise ConfigError(
            f"scoring.itm_batch_size: expected an integer >= 1, got {short_repr(scoring['itm_batch_size'])}"
        )
    if scoring["itm_threads"] < 0:
        raise ConfigError(
            f"scoring.itm_threads: expected an integer >= 0 (0 = torch's default), got {short_repr(scoring['itm_threads'])}"
        )
    if scoring["region_features"] and not scoring["itm_checkpoint"]:
        raise ConfigError(
            "scoring.region_features: set without scoring.itm_checkpoint; the region features are only read for "
            "the ITM score (give the ImageBERT checkpoint too, or leave region_features null)"
        )
    if engine["processes"] < 0:
        raise ConfigError(
            f"engine.processes: expected >= 0 (0 = one per core), got {short_repr(engine['processes'])}"
        )
    for key in ("shard_size", "site_buckets", "fetch_threads"):
        if engine[key] < 1:
            raise ConfigError(f"engine.{key}: expected an integer >= 1, got {short_repr(engine[key])}")


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """A stable sha256 of the stage sections (sorted JSON), stored in an output folder so that a resumed run
    uses the stages it started with; the `engine` section is left out (processes, partitions and the engine
    itself do not change the pairs)."""
    stages = {k: v for k, v in config.items() if k != "engine"}
    return hashlib.sha256(json.dumps(stages, sort_keys=True, default=str).encode()).hexdigest()


__all__ = [
    "DEFAULT_CONFIG_PATH",
    "SECTIONS",
    "ConfigError",
    "config_fingerprint",
    "default_config",
    "load_config",
    "parse_override",
]
