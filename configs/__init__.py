"""Load a `TrainConfig` from YAML plus dotted `key=value` overrides, with one-line errors."""

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from configs.schema import TrainConfig

CONFIG_DIR = Path(__file__).resolve().parent
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line for the user."""


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "config"
    if error["type"] == "extra_forbidden":
        return f"unknown config key '{key}'"
    got = error.get("input")
    if error["type"] == "model_type":  # `train: 5`: a value where a section belongs
        example = _example_key(key)
        return f"'{key}' is a section of keys (such as {example}), not a value: got {got!r}"
    message = error["msg"].removeprefix("Value error, ")
    allowed = (error.get("ctx") or {}).get("expected")
    if allowed:
        return f"bad value {got!r} for '{key}': expected {allowed}"
    if error["type"] == "value_error":
        return message
    return f"bad value {got!r} for '{key}': {message}"


def validate(data: dict[str, Any]) -> "TrainConfig":
    """Validate a nested dict into a TrainConfig or raise a one-line ConfigError."""
    from configs.schema import TrainConfig

    try:
        return TrainConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError("; ".join(_describe(e) for e in err.errors())) from None


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _known_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _example_key(section: str) -> str:
    """The first key of `section` (`train` -> `train.max_steps`), for messages."""
    from configs.schema import TrainConfig

    return next(k for k in _known_keys(TrainConfig) if k.startswith(section + "."))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (['optim', 'lr'], 3e-4); values are parsed as YAML scalars or lists."""
    from configs.schema import TrainConfig

    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    path = key.strip().split(".")
    known = _known_keys(TrainConfig)
    if any(k.startswith(key.strip() + ".") for k in known):
        raise ConfigError(
            f"'{key.strip()}' is a section of keys, not a value: set one of its keys, "
            f"such as {_example_key(key.strip())}=..."
        )
    if key.strip() not in known and path[:2] != ["deepspeed", "extra"]:
        close = difflib.get_close_matches(key.strip(), known, n=3, cutoff=0.6)
        sections = ", ".join(sorted({k.split(".")[0] for k in known}))
        hint = f" (did you mean {' or '.join(close)}?)" if close else f" (sections: {sections})"
        raise ConfigError(f"unknown config key '{key}'{hint}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def with_changes(cfg: "TrainConfig", changes: dict[str, Any]) -> "TrainConfig":
    """`cfg` with each dotted key of `changes` (`optim.lr`) set to its value, validated; the
    keys the user left unset stay unset (a default chosen at start-up, as the ZeRO stage, is
    still chosen)."""
    data = cfg.model_dump(mode="json", exclude_unset=True)
    for key, value in changes.items():
        _set(data, key.split("."), value)
    return validate(data)


def _set(tree: dict[str, Any], path: list[str], value: Any) -> None:
    for part in path[:-1]:
        node = tree.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{part}' is a value, not a section")
        tree = node
    tree[path[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML config file into a dict, with one-line errors for missing or broken files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist (see configs/ for presets)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise ConfigError(f"config file '{path}' is empty")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}' is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections")
    return data


# The model keys a `model.size` preset sets (model/config.py's PRESETS).
PRESET_KEYS = ("n_layer", "n_head", "n_embd")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> "TrainConfig":
    """The default config (or `path`), with `section.key=value` overrides applied in order.

    `model.size` given as an override replaces the shape the file spells out: the file's
    `model.n_layer`, `n_head` and `n_embd` are dropped (those given as overrides still apply on
    top of the preset), so that `model.size=gpt2` on any config trains GPT-2's shape.
    """
    data = read_yaml(path if path is not None else DEFAULT_CONFIG)
    keys = [parse_override(text) for text in overrides]
    if ["model", "size"] in (key for key, _ in keys) and isinstance(data.get("model"), dict):
        for name in PRESET_KEYS:
            data["model"].pop(name, None)
    for key, value in keys:
        _set(data, key, value)
    return validate(data)


def flatten_config(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's sections as dotted keys (`optim.lr`); `deepspeed.extra` stays one value."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "extra":
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def to_yaml(config: "TrainConfig") -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def key_table() -> str:
    """Every config key as a table (`train.py --help`), generated from the schema: never stale."""
    from configs.schema import TrainConfig

    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(model: type[BaseModel], instance: BaseModel, prefix: str) -> None:
        for name, field in model.model_fields.items():
            value = getattr(instance, name)
            if isinstance(value, BaseModel):
                walk(type(value), value, f"{prefix}{name}.")
                continue
            default = "`" + yaml.safe_dump(value, default_flow_style=True).strip()
            default = default.removesuffix("...").strip() + "`"
            rows.append(f"| `{prefix}{name}` | {default} | {field.description or ''} |")

    walk(TrainConfig, TrainConfig(), "")
    return "\n".join(rows)
