"""Reading ICL task files: LLM Foundry's jsonl formats, checked line by line.

Every problem is reported in one line naming the file, the line and the field, before any model is
built (training/preflight.py calls `read_task_file` for every task).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Fields each example must have, and their JSON types (str, list of str, int).
REQUIRED_FIELDS: dict[str, dict[str, str]] = {
    "language_modeling": {"context": "str", "continuation": "str"},
    "multiple_choice": {"query": "str", "choices": "list[str]", "gold": "int"},
    "schema": {"context_options": "list[str]", "continuation": "str", "gold": "int"},
    "generation_task_with_answers": {"context": "str", "answer": "str"},
}
OPTIONAL_FIELDS: dict[str, dict[str, str]] = {
    "generation_task_with_answers": {"aliases": "list[str]", "chain_of_thought": "str"},
}
# The field whose list `gold` indexes.
GOLD_LIST = {"multiple_choice": "choices", "schema": "context_options"}


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names file, line and field."""


def _has_type(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def read_task_file(path: str | Path, task_type: str) -> list[dict[str, Any]]:
    """The examples of a local jsonl task file, in file order, each checked against `task_type`."""
    path = Path(path)
    if not path.is_file():
        raise TaskFileError(f"{path}: task file does not exist (icl_tasks dataset_uri)")
    required, optional = REQUIRED_FIELDS[task_type], OPTIONAL_FIELDS.get(task_type, {})
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskFileError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(example, dict):
                raise TaskFileError(f"{where}: not a JSON object")
            for name in required:
                if name not in example:
                    raise TaskFileError(
                        f"{where}: missing field '{name}' ({task_type} needs {', '.join(required)})"
                    )
            for name, kind in {**required, **optional}.items():
                if name in example and not _has_type(example[name], kind):
                    raise TaskFileError(f"{where}: field '{name}' must be {kind}; got {example[name]!r:.80}")
            options = GOLD_LIST.get(task_type)
            if options is not None:
                if len(example[options]) < 2:
                    raise TaskFileError(f"{where}: field '{options}' needs at least 2 entries")
                if not 0 <= example["gold"] < len(example[options]):
                    raise TaskFileError(
                        f"{where}: field 'gold' is {example['gold']}, not an index into '{options}' "
                        f"(0..{len(example[options]) - 1})"
                    )
            examples.append(example)
    if not examples:
        raise TaskFileError(f"{path}: no examples (an empty task file)")
    return examples
