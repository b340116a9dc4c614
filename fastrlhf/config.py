"""YAML + ``key=value`` overrides into frozen dataclasses.

Every default lives once, in the dataclass. YAML and overrides only set fields; an unknown key is an
error naming the key and where it came from. Nested dataclasses are addressed with dots
(``rollout.backend=vllm``). Override values are parsed as YAML scalars (``lr=1e-5``, ``bf16=true``).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the dataclass."""


class RunError(RuntimeError):
    """A run that cannot go on for a reason the user must act on (e.g. a reward model giving NaN for most
    rows): the command line prints it as one line and exits 1, without a traceback."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: Iterable[str]) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw  # not a YAML scalar: the string itself (type checks name the key if it is wrong)
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a section (mapping), got {value!r}")
        return from_dict(tp, value, where)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where) if len(args) == 1 else value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan / inf would train silently into NaN weights
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if origin is tuple:
        # a bare string would otherwise be iterated letter by letter ("safe" -> s, a, f, e)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: every item an X
            return tuple(_coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if tp in (int, float, str, bool) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise ConfigError naming them and ``where``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """``cls`` from a YAML file (optional) with ``key=value`` overrides applied on top."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
        data = loaded
    extra = parse_overrides(overrides)
    _check_fields(cls, extra, "command line")  # a bad override is named as one, not as the file's
    where = str(path) if path is not None else "command line"
    return from_dict(cls, _merge(data, extra), f"{where} (with overrides)" if extra and path else where)


def _read_yaml(path: Path):
    """The YAML document in ``path``; a syntax error or undecodable bytes is a ConfigError naming the file
    and line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}, line {raw[:err.start].count(bytes([10])) + 1}: "
                          f"not UTF-8 text (byte 0x{raw[err.start]:02x})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{where}: YAML syntax error: {' '.join(str(problem).split())}") from None


def _check_fields(cls, data: dict, where: str) -> None:
    """Unknown keys and values of the wrong type in ``data`` (a partial config) raise ConfigError."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__}; known: {sorted(hints)}")
    for key, value in data.items():
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_fields(hints[key], value, f"{where}.{key}")
        else:
            _coerce(hints[key], value, f"{where}.{key}")


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
