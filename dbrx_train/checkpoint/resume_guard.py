"""Refuse a resume whose config would make the continued run wrong; let harmless changes through.

A resumed run restores the model, optimizer, schedule position and data position from the
checkpoint. Changing the model shape, the global batch, the seed, the sequence length, the data
streams or the curriculum makes that state meaningless or silently different, and a changed
optimizer section would be silently ignored (the optimizer's hyperparameters come back from the
checkpoint). Those are refused, naming each key and both values. Everything else (logging,
callbacks, save interval, eval, microbatch size, world size, a longer max_duration) may change.
`allow_config_changes` lists keys (or key prefixes) the user accepts changing anyway.
"""

from __future__ import annotations

from typing import Any

GUARDED = (
    "model",
    "max_seq_len",
    "global_train_batch_size",
    "seed",
    "train_loader.name",
    "train_loader.dataset",
    "curriculum",
    "optimizer",
)
# Inside guarded sections: knobs that change how data is fetched or checked, not which data.
HARMLESS = (
    "model.init_device",
    "model.pretrained",
    "train_loader.dataset.download_timeout",
    "train_loader.dataset.predownload",
    "train_loader.dataset.validate_hash",
    "train_loader.dataset.keep_zip",
    "train_loader.dataset.verify_shards",
)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: tree}


def _under(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, current value) for every leaf that differs."""
    old, new = flatten(saved), flatten(current)
    missing = object()
    return [
        (key, old.get(key, missing), new.get(key, missing))
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]


def _show(value: Any) -> str:
    return "(absent)" if type(value) is object else repr(value)


def refused_changes(
    saved: dict[str, Any], current: dict[str, Any], allowed: list[str]
) -> tuple[list[str], list[str]]:
    """(refused, accepted) changes as readable lines."""
    refused, accepted = [], []
    for key, before, after in config_changes(saved, current):
        line = f"{key}: {_show(before)} -> {_show(after)}"
        if _under(key, GUARDED) and not _under(key, HARMLESS) and not _under(key, allowed):
            refused.append(line)
        else:
            accepted.append(line)
    return refused, accepted


def check_resume_config(
    saved: dict[str, Any], current: dict[str, Any], allowed: list[str], checkpoint_name: str
) -> list[str]:
    """Raise ValueError naming every refused change; return the accepted ones (for the log)."""
    refused, accepted = refused_changes(saved, current, allowed)
    if refused:
        raise ValueError(
            f"resuming from {checkpoint_name} with a changed config that would make the run wrong "
            f"({'; '.join(refused)}). Undo these changes to continue the run; or start a new run from its weights "
            "(load_path + load_weights_only: true, another save_folder); or, if you know the change is "
            "safe, list the keys in allow_config_changes. (A changed optimizer section would be ignored: "
            "a resumed optimizer keeps the checkpoint's hyperparameters.)"
        )
    return accepted
