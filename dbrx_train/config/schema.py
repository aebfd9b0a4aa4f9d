"""The one dict -> dataclass converter: plain nested dicts in, typed dataclasses out, and every
problem found on the way (unknown key, wrong type, bad value) named by its full dotted key.

Used for every config section (run config, model config, data config). It does not stop at the
first problem: `convert` appends each one to a list and goes on with the next key, so a YAML with
five mistakes gets one message listing five lines, and `build` raises them together.

Value checks live beside the fields they check, in the dataclass itself (no Composer, no torch
needed, so `model/config.py` stays a plain module): a `problems()` method returning
`(dotted field, what is wrong)` pairs, called once the section has been built. A `__post_init__`
that raises ValueError is reported too, against the section.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NewType, TypeVar, Union

if TYPE_CHECKING:
    from composer.core import Time as ComposerTime

T = TypeVar("T")

# A Composer time string such as '100ba', '1ep', '1000000tok', '500sp' or '0.5dur'; checked as a type
# (by `parse_time`), so a bad one is reported whatever else is wrong in the file.
Time = NewType("Time", str)
TIME_EXAMPLES = "'100ba', '1ep', '1000000tok', '500sp' or '0.5dur'"


class ConfigError(ValueError):
    """User-facing configuration problems, each naming its key and what to do; `source` (a file)
    heads the message."""

    def __init__(self, problems: str | list[str], source: str | None = None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(describe(self.problems, source))


def describe(problems: list[str], source: str | None = None) -> str:
    if len(problems) == 1:
        first = problems[0]
        return f"{source}: {first}" if source and source not in first else first
    head = f"{source}: " if source else ""
    return f"{head}{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems)


def parse_time(
    value: object, key: str, units: tuple[str, ...] = ("ba", "ep", "tok", "sp", "dur")
) -> ComposerTime:
    """A time string read by Composer's own parser (`composer.core.Time.from_timestring`, what the
    Trainer reads it with), in one of `units` and not negative; a ConfigError naming the key and the
    value otherwise. Composer is imported here, not at the top: model/ builds its config with this
    module and never imports Composer (nor needs a time)."""
    from composer.core import Time as ComposerTime

    try:
        if not isinstance(value, str):
            raise TypeError(value)
        time = ComposerTime.from_timestring(value.strip())
    except (TypeError, ValueError):  # also a fractional count: '1.5ba' (TypeError)
        time = None
    if time is None or time.unit.value not in units or time.value < 0:
        examples = TIME_EXAMPLES if len(units) == 5 else " or ".join(f"'10{u}'" for u in units)
        raise ConfigError(
            f"config key '{key}' must be a Composer time string such as {examples}; got {value!r}"
        )
    return time


# Names people reach for that are spelled differently here, whatever the section: checked before
# the spelling-based guess, which cannot know that `learning_rate` means `lr`.
SYNONYMS = {
    "learning_rate": "lr",
    "warmup": "t_warmup",
    "num_experts": "moe_num_experts",
    "top_k": "moe_top_k",
    "batch_size": "global_train_batch_size",
    "train_batch_size": "global_train_batch_size",
    "seq_len": "max_seq_len",
    "hidden_size": "d_model",
    "num_layers": "n_layers",
    "num_heads": "n_heads",
}


def _edits(a: str, b: str) -> int:
    """Edit distance: insertions, deletions, substitutions and swaps of two neighbouring letters
    (`d_modle`), the commonest slips (optimal string alignment)."""
    rows = [list(range(len(b) + 1))]
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            best = min(rows[-1][j] + 1, current[j - 1] + 1, rows[-1][j - 1] + (ca != cb))
            if i > 1 and j > 1 and ca == b[j - 2] and a[i - 2] == cb:
                best = min(best, rows[-2][j - 2] + 1)
            current.append(best)
        rows.append(current)
    return rows[-1][-1]


def is_misspelling(typed: str, candidate: str) -> bool:
    """`candidate` is what `typed` was meant to be: the same words with a slip of the keyboard
    (`shufle`, `max_durration`, `moe_topk`) or a shortened word (`expert_parallelism_degree`).
    A whole word swapped (`save_weights_only` / `load_weights_only`, `peft_config` / `ffn_config`,
    `batch` / `microbatch`) is a different key, however close the letters, so it is never offered."""
    a, b = typed.lower(), candidate.lower()
    squashed_a, squashed_b = a.replace("_", ""), b.replace("_", "")
    allowed = 1 if min(len(squashed_a), len(squashed_b)) <= 6 else 2
    words_a, words_b = a.split("_"), b.split("_")
    if _edits(squashed_a, squashed_b) <= allowed:
        # ... unless that slip turns one short word into another (min_lr / max_lr).
        return len(words_a) != len(words_b) or not any(
            x != y and min(len(x), len(y)) <= 4 and _edits(x, y) >= 2
            for x, y in zip(words_a, words_b, strict=True)
        )
    if len(words_a) != len(words_b):
        return False
    return all(
        x == y or (min(len(x), len(y)) >= 4 and (x.startswith(y) or y.startswith(x)))
        for x, y in zip(words_a, words_b, strict=True)
    )


def closest_key(key: str, valid: Iterable[str]) -> str | None:
    """The valid key `key` was most likely meant to be, or None when no key is a plausible slip."""
    valid = list(valid)
    if SYNONYMS.get(key) in valid:
        return SYNONYMS[key]
    for candidate in difflib.get_close_matches(key, valid, n=5, cutoff=0.5):
        if is_misspelling(key, candidate):
            return candidate
    return None


def did_you_mean(hint: str | None) -> str:
    """How a message offers the likely meant name (`closest_key`), or nothing."""
    return f" (did you mean {hint!r}?)" if hint else ""


def unknown_key(path: str, key: str, valid: Iterable[str]) -> str:
    """The problem line for an unknown key: its dotted path, a hint, and the keys that are valid there."""
    valid = sorted(valid)
    where = f"{path}.{key}" if path else key
    msg = f"unknown config key '{where}'{did_you_mean(closest_key(key, valid))}"
    return f"{msg}; valid keys{' under ' + repr(path) if path else ''}: {', '.join(valid)}"


def _type_name(tp: Any) -> str:
    """How a message names what a key takes: 'an integer', "'auto'", 'null', 'a mapping'."""
    if tp is type(None):
        return "null"
    if tp is Time:
        return f"a Composer time string such as {TIME_EXAMPLES}"
    if tp in _SCALARS:
        return _SCALARS[tp][1]
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict or tp is dict:
        return "a mapping"
    if typing.get_origin(tp) in (list, tuple):
        return "a list"
    return str(tp).replace("typing.", "")


class _Invalid:
    """What `convert` returns for a value it reported a problem about."""

    def __repr__(self) -> str:
        return "<invalid>"


INVALID: Any = _Invalid()


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Dataclass ``cls`` from ``data`` (a mapping); raises ConfigError listing every problem."""
    problems: list[str] = []
    value = convert(cls, data, path, problems)
    if problems:
        raise ConfigError(problems)
    return value


def convert(tp: Any, value: Any, path: str, problems: list[str]) -> Any:
    """``value`` as type ``tp``; each problem is appended to ``problems``. The result is INVALID when
    ``value`` (or a part of it) has the wrong type; with only unknown keys or bad values it is built."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(args, value, path, problems)
    if origin is typing.Literal:
        if value not in args:
            problems.append(
                f"config key '{path}' must be one of {', '.join(repr(a) for a in args)}; got {value!r}"
                + did_you_mean(_closest_choice(value, args))
            )
            return INVALID
        return value
    if dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, value, path, problems)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.append(f"config key '{path}' must be a mapping; got {value!r}")
            return INVALID
        if not args:
            return dict(value)
        key_tp, val_tp = args
        out = {
            convert(key_tp, k, path, problems): convert(val_tp, v, f"{path}.{k}", problems)
            for k, v in value.items()
        }
        return INVALID if INVALID in out.values() or INVALID in out else out
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            problems.append(f"config key '{path}' must be a list; got {value!r}")
            return INVALID
        item_tp = args[0] if args else Any
        items = [convert(item_tp, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return INVALID if any(item is INVALID for item in items) else items
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            problems.append(f"config key '{path}' must be a list of {len(args)} values; got {value!r}")
            return INVALID
        items = [
            convert(a, v, f"{path}[{i}]", problems) for i, (a, v) in enumerate(zip(args, value, strict=True))
        ]
        return INVALID if any(item is INVALID for item in items) else tuple(items)
    if tp is Time:
        try:
            parse_time(value, path)
        except ConfigError as e:
            problems += e.problems
            return INVALID
        return value
    scalar = _SCALARS.get(tp)
    if scalar is None:
        raise TypeError(f"schema: unsupported annotation {tp!r} at '{path}'")
    accepts, what = scalar
    if not accepts(value):
        problems.append(f"config key '{path}' must be {what}; got {value!r}")
        return INVALID
    return float(value) if tp is float else value


_SCALARS = {
    float: (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _closest_choice(value: Any, choices: tuple) -> str | None:
    if not isinstance(value, str):
        return None
    strings = [c for c in choices if isinstance(c, str)]
    by_case = [c for c in strings if c.lower() == value.lower()]
    if by_case:
        return by_case[0]
    prefixed = [c for c in strings if c.lower().startswith(value.lower()) and len(value) >= 3]
    return prefixed[0] if len(prefixed) == 1 else closest_key(value, strings)


def _convert_union(args: tuple, value: Any, path: str, problems: list[str]) -> Any:
    if value is None and type(None) in args:
        return None
    arms = [a for a in args if a is not type(None)]
    tags = {_tag(arm): arm for arm in arms}
    if isinstance(value, dict) and None not in tags:
        # Sections told apart by their `name` (loaders: text | finetuning): a mistake is reported
        # against the one the name picks; no name picks the first.
        name = value.get("name", next(iter(tags)))
        if name not in tags:
            problems.append(
                f"config key '{path}.name' must be one of {', '.join(map(repr, tags))}; got {name!r}"
            )
            return INVALID
        return convert(tags[name], value, path, problems)
    tried: list[list[str]] = []
    for arm in arms:
        arm_problems: list[str] = []
        result = convert(arm, value, path, arm_problems)
        if not arm_problems:
            return result
        tried.append(arm_problems)
    if len(tried) == 1:
        problems.extend(tried[0])
    else:
        names = list(dict.fromkeys(_type_name(a) for a in args))
        choice = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else names[0]
        problems.append(f"config key '{path}' must be {choice}; got {value!r}")
    return INVALID


def _tag(tp: Any) -> Any:
    """The default of a section's `name` field, which tells it apart in a choice of sections."""
    if dataclasses.is_dataclass(tp):
        for f in dataclasses.fields(tp):
            if f.name == "name" and isinstance(f.default, str):
                return f.default
    return None


def _build_dataclass(cls: Any, value_in: Any, path: str, problems: list[str]) -> Any:
    if dataclasses.is_dataclass(value_in) and isinstance(value_in, cls):
        return value_in
    if value_in is None:
        value_in = {}
    if not isinstance(value_in, dict):
        problems.append(f"config key '{path or '<root>'}' must be a mapping; got {value_in!r}")
        return INVALID
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    # A `flatten` field's own keys are written at this level (model: holds DbrxConfig's keys).
    flat = {name: hints[name] for name, f in fields.items() if f.metadata.get("flatten")}
    flat_keys = {key: name for name, sub in flat.items() for key in _init_fields(sub)}
    valid = [*(name for name in fields if name not in flat), *flat_keys]
    # Unknown keys and bad values are reported but do not stop the section from being built, so
    # the checks of the sections around it still run. A value of the wrong type is replaced by
    # the field's default for the section's own checks (whose findings about that field, or
    # mentioning it, are dropped: they would be about the default), then the section is INVALID.
    for key in value_in:
        if key not in valid:
            problems.append(unknown_key(path, str(key), valid))
    value = {k: v for k, v in value_in.items() if k not in flat_keys}
    for name in flat:
        value[name] = {k: v for k, v in value_in.items() if flat_keys.get(k) == name}
    kwargs = {}
    failed: list[str] = []
    for name, field in fields.items():
        sub = path if name in flat else f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = convert(hints[name], value[name], sub, problems)
            if kwargs[name] is INVALID:
                failed.append(name)
                del kwargs[name]
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            problems.append(f"missing required config key '{sub}'")
            failed.append(name)
    if any(
        fields[name].default is dataclasses.MISSING and fields[name].default_factory is dataclasses.MISSING
        for name in failed
    ):
        return INVALID
    try:
        built = cls(**kwargs)
    except (ValueError, TypeError) as e:
        if not failed:
            problems.append(f"config section '{path or '<root>'}': {e}")
        return INVALID
    check = getattr(built, "problems", None)
    if callable(check):
        for key, message in check():
            if not any(re.search(rf"\b{name}\b", f"{key} {message}") for name in failed):
                problems.append(f"config key '{path + '.' if path else ''}{key}' {message}")
    return INVALID if failed else built


def _init_fields(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def has_key(tp: Any, dotted: str) -> bool:
    """Whether the schema rooted at `tp` defines the dotted key (a `<name>` part matches any name)."""
    if not dotted:
        return True
    head, _, rest = dotted.partition(".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is dict:
        return True
    if tp is Time:
        return not dotted
    if origin in (Union, types.UnionType):
        return any(has_key(arm, dotted) for arm in args)
    if origin is dict:
        return has_key(args[1], rest) if args else True
    if not dataclasses.is_dataclass(tp):
        return False
    hints = typing.get_type_hints(tp)
    for f in dataclasses.fields(tp):
        if f.init and f.metadata.get("flatten") and has_key(hints[f.name], dotted):
            return True
        if f.init and f.name == head and not f.metadata.get("flatten"):
            return has_key(hints[f.name], rest)
    return False


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serialisable nested dicts from dataclasses (`flatten` fields inlined)."""
    if dataclasses.is_dataclass(obj):
        out: dict[str, Any] = {}
        for f in dataclasses.fields(obj):
            if f.init and f.metadata.get("flatten"):
                out.update(to_dict(getattr(obj, f.name)))
            elif f.init:
                out[f.name] = to_dict(getattr(obj, f.name))
        return out
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
