"""Turn plain nested dicts into typed dataclasses, with errors that name the offending key.

Used for every config section (run config, model config, data config), so that all of them
reject unknown keys with a "did you mean" hint and report wrong types the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the key and what to do."""


def closest_key(key: str, valid: typing.Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_error(path: str, key: str, valid: typing.Iterable[str]) -> ConfigError:
    valid = sorted(valid)
    where = f"{path}.{key}" if path else key
    hint = closest_key(key, valid)
    msg = f"unknown config key '{where}'"
    msg += f" (did you mean '{hint}'?)" if hint else ""
    return ConfigError(f"{msg}; valid keys{' under ' + repr(path) if path else ''}: {', '.join(valid)}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (a mapping), recursively and with type checks."""
    return _convert(cls, data, path)


def _convert(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(
            f"config key '{path}' must be one of {', '.join(_type_name(a) for a in args)}; got {value!r}"
        )
    if origin is typing.Literal:
        if value not in args:
            hint = closest_key(str(value), [str(a) for a in args])
            raise ConfigError(
                f"config key '{path}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be a mapping; got {value!r}")
        if not args:
            return dict(value)
        key_tp, val_tp = args
        return {_convert(key_tp, k, path): _convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{path}' must be a list; got {value!r}")
        item_tp = args[0] if args else Any
        return [_convert(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key '{path}' must be a list of {len(args)} values; got {value!r}")
        return tuple(_convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{path}' must be a number; got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{path}' must be an integer; got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{path}' must be true or false; got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{path}' must be a string; got {value!r}")
        return value
    raise TypeError(f"schema: unsupported annotation {tp!r} at '{path}'")


def _build_dataclass(cls: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(value) and isinstance(value, cls):
        return value
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{path or '<root>'}' must be a mapping; got {value!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in value:
        if key not in fields:
            raise unknown_key_error(path, str(key), fields)
    kwargs = {}
    for name, field in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], sub)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required config key '{sub}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config section '{path or '<root>'}': {e}") from e


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serialisable nested dicts from dataclasses."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
