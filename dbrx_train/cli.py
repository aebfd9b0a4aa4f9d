"""`dbrx-train <command> ...`: one entry point over the project's scripts.

Each command runs the same script a user can call directly, with the same flags, so the two ways
never diverge. The scripts live beside the package in the repository (editable install).
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS: dict[str, tuple[str, str]] = {
    "prep": ("data_prep/convert_text_to_mds.py", "text/jsonl/parquet files -> pretraining MDS shards"),
    "prep-chat": (
        "data_prep/convert_finetuning_dataset.py",
        "prompt/response or messages jsonl -> fine-tuning MDS",
    ),
    "prep-default": ("data_prep/build_default_corpus.py", "build the embedded default corpus (no network)"),
    "export": ("scripts/convert_to_hf.py", "Composer checkpoint -> Hugging Face DBRX folder"),
    "generate": ("scripts/generate.py", "sample text from an HF folder or a Composer checkpoint"),
    "eval": ("scripts/eval.py", "lm-eval-harness or ICL tasks on an HF folder, checkpoint or run folder"),
    "stats": ("scripts/model_stats.py", "parameters, FLOPs, KV cache and memory of a YAML's model"),
    "report": ("scripts/plot_run.py", "PNG plots and an HTML report of a run folder"),
}

USAGE = """usage: dbrx-train <command> [args ...]   (dbrx-train <command> --help for its flags)

commands:
  train [-n NPROC] <yaml> [key=value ...]   train with Composer on NPROC local ranks (default 1)
{commands}
"""


def usage() -> str:
    lines = "\n".join(f"  {name:<13} {help_text}" for name, (_, help_text) in COMMANDS.items())
    return USAGE.format(commands=lines)


def train(args: list[str]) -> None:
    nproc = "1"
    if args[:1] in (["-n"], ["--nproc"]):
        if len(args) < 2:
            raise SystemExit("dbrx-train train: -n needs a number of processes")
        nproc, args = args[1], args[2:]
    if not args or args[0] in ("-h", "--help"):
        print("usage: dbrx-train train [-n NPROC] <yaml> [key=value ...]")
        raise SystemExit(0 if args else 2)
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", nproc, str(REPO / "train.py"), *args]
    os.execv(sys.executable, launcher)  # the launcher owns the rank processes and their exit code


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    command, args = argv[0], argv[1:]
    if command == "train":
        train(args)
        return
    if command not in COMMANDS:
        raise SystemExit(f"dbrx-train: unknown command {command!r}\n\n{usage()}")
    script = REPO / COMMANDS[command][0]
    if not script.is_file():
        raise SystemExit(f"dbrx-train: {script} is missing; dbrx-train runs from a clone (pip install -e .)")
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
