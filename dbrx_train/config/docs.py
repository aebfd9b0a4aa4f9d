"""docs/config.md, generated from the config dataclasses so the reference cannot drift.

Each key's meaning is the comment written beside (or just above) its field in the source, so the
documentation lives next to the code that defines the key. `python scripts/gen_config_docs.py`
rewrites the file; a test fails when it is stale or when a key has no comment.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import textwrap
import tokenize
import types
import typing
from typing import Any

from dbrx_train.config.schema import Time

HEADER = """# Configuration reference

Generated from the config dataclasses by `python scripts/gen_config_docs.py`; do not edit by hand.
Keys are YAML paths (`a.b.c`), settable from the command line as `a.b.c=value`. Keys follow LLM
Foundry's `train.py` where the concept is the same; the table at the end says what each of LLM
Foundry's other keys means here. `<name>` stands for a name you choose. `time` is a Composer time
string such as `100ba`, `1ep`, `1000000tok`, `500sp` or `0.5dur`.
"""


def field_comments(cls: type) -> dict[str, str]:
    """Comment text for each field of dataclass ``cls`` (or of the base it inherits the field from):
    trailing ``# ...`` or comment lines above."""
    inherited = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            inherited.update(field_comments(base))
    return {**inherited, **_own_field_comments(cls)}


def _own_field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    result: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        stripped = line.strip()
        name = stripped.split(":", 1)[0].strip()
        if name not in names or name in result or ":" not in stripped or stripped.startswith("#"):
            continue
        text = []
        above = number - 1
        while above >= 1 and lines[above - 1].strip().startswith("#"):
            text.insert(0, comments.get(above, ""))
            above -= 1
        if number in comments:
            text.append(comments[number])
        result[name] = " ".join(t for t in text if t)
    return result


def type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Time:
        return "time"
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (list, tuple):
        return f"list[{', '.join(type_name(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"map of {type_name(args[1])}" if args else "map"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        if dataclasses.is_dataclass(value):
            return "(section)"
    else:
        return "**required**"
    return f"`{value!r}`" if value is not None else "`null`"


def section_types(tp: Any) -> list[type]:
    """Dataclasses reachable from an annotation (through Optional/Union/dict values)."""
    if dataclasses.is_dataclass(tp):
        return [tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return [c for a in args for c in section_types(a)]
    if origin is dict and args:
        return section_types(args[1])
    return []


def rows(cls: type, prefix: str, missing: list[str]) -> list[tuple[str, str, str, str]]:
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name.startswith("_"):
            continue
        tp = hints[f.name]
        if f.metadata.get("flatten"):  # its keys sit at this level (model: holds DbrxConfig's)
            out += [row for row in rows(tp, prefix, missing) if row not in out]
            continue
        key = f"{prefix}{f.name}"
        subs = section_types(tp)
        is_map = typing.get_origin(tp) is dict or any(
            typing.get_origin(a) is dict for a in typing.get_args(tp)
        )
        if not subs or len(subs) > 1 or comments.get(f.name):
            meaning = comments.get(f.name, "")
            if not meaning and not subs:
                missing.append(key)
            out.append((key, type_name(tp), default_text(f), meaning))
        per_variant = [rows(sub, f"{key}.<name>." if is_map else f"{key}.", missing) for sub in subs]
        for sub, sub_rows in zip(subs, per_variant, strict=True):
            for row in sub_rows:
                # A key that reads the same in every variant (e.g. loader `text` / `finetuning`) is
                # listed once; one that differs says which `name:` it belongs to.
                shared = all(row in other for other in per_variant)
                if not shared and not row[0].endswith(".name"):
                    row = (row[0], row[1], row[2], f"(`name: {variant_name(sub)}`) {row[3]}")
                if row not in out:
                    out.append(row)
    return out


def variant_name(cls: type) -> str | None:
    """The tag of one member of a choice of sections: the default of its `name` field."""
    for f in dataclasses.fields(cls):
        if f.name == "name" and isinstance(f.default, str):
            return f.default
    return None


def cell(text: str) -> str:
    """A markdown table cell: a literal | would end the cell."""
    return text.replace("|", "\\|")


def render(root: type, appendix: str = "") -> tuple[str, list[str]]:
    """Markdown for ``root``, then ``appendix``; and the keys that have no comment."""
    missing: list[str] = []
    table = rows(root, "", missing)
    lines = [HEADER, "| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {t} | {cell(d)} | {cell(m)} |" for k, t, d, m in table]
    text = "\n".join(lines) + "\n"
    return (text + "\n" + appendix if appendix else text), missing
