"""Rewrite docs/config.md from the config dataclasses: `python scripts/gen_config_docs.py [--check]`."""

from __future__ import annotations

import argparse
from pathlib import Path

from dbrx_train.config.docs import render
from dbrx_train.config.foundry import markdown_table
from dbrx_train.config.run import TrainConfig

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def config_markdown() -> tuple[str, list[str]]:
    return render(TrainConfig, appendix=markdown_table())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is stale")
    args = parser.parse_args()
    text, missing = config_markdown()
    if missing:
        raise SystemExit(f"config keys without a comment (add one beside the field): {', '.join(missing)}")
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            raise SystemExit(f"{DOC} is stale: run `python scripts/gen_config_docs.py`")
        return
    DOC.write_text(text)
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
