"""Convert a Composer checkpoint of this repo into an HF DBRX folder that transformers loads.

    python scripts/convert_to_hf.py runs/dbrx-tiny/ep0-ba120 runs/dbrx-tiny/hf-ba120 \\
        [--config runs/dbrx-tiny/config.yaml] [--dtype bf16|fp32|fp16] [--max-shard-size BYTES] [--no-tokenizer]
        [--adapters merged|peft] [--base FOLDER]

The checkpoint is a sharded folder (`ep0-baN/`, any number of ranks), `ep0-baN/rank0.pt`, or a run
folder (its newest checkpoint); the model config comes from the run folder's config.yaml unless
--config is given. Runs on one process, reading and writing one tensor at a time (see
dbrx_train/checkpoint/composer_weights.py).

A LoRA run's checkpoint (model.peft_config) holds only adapters; its base is the run's
model.pretrained (or --base). --adapters merged (default) writes a plain DBRX folder with the adapters
folded in; --adapters peft writes a PEFT adapter folder (adapter_config.json +
adapter_model.safetensors) for `peft.PeftModel.from_pretrained(<the base in transformers>, OUT)`,
which can hold attention adapters (Wqkv, out_proj) only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dbrx_train.checkpoint.adapters import load_adapters
from dbrx_train.checkpoint.composer_weights import (
    check_shapes,
    read_composer_checkpoint,
    read_model_config,
    run_config_path,
)
from dbrx_train.config.peft import RunModel
from dbrx_train.config.schema import ConfigError
from dbrx_train.model.hf import DEFAULT_MAX_SHARD_BYTES, EXPORT_DTYPES, check_hf_folder, save_hf_folder
from dbrx_train.model.lora_export import peft_unsupported, save_merged_folder, write_peft_folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="Composer checkpoint: ep0-baN/ folder or ep0-baN/rank0.pt")
    parser.add_argument("out", help="HF folder to write")
    parser.add_argument("--config", help="the run's config.yaml (default: next to the checkpoint)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="bytes per shard")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer files")
    parser.add_argument(
        "--adapters",
        choices=("merged", "peft"),
        default="merged",
        help="LoRA checkpoints: a DBRX folder with the adapters folded in, or a PEFT adapter folder",
    )
    parser.add_argument(
        "--base", help="LoRA checkpoints: the base HF folder (default: the run's model.pretrained)"
    )
    args = parser.parse_args(argv)
    try:
        config_path = Path(args.config) if args.config else run_config_path(args.checkpoint)
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} does not exist; pass the run's config.yaml with --config")
        run = RunModel(config_path)
        if run.peft is not None:
            convert_adapters(args, run)
            return
        if args.adapters == "peft":
            raise ValueError(f"{args.checkpoint} is not a LoRA checkpoint (its run has no model.peft_config)")
        config = read_model_config(config_path)
        weights = read_composer_checkpoint(args.checkpoint)
        check_shapes(weights, config, args.checkpoint)
    except (ValueError, FileNotFoundError, ConfigError) as e:
        print(f"convert_to_hf: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    save_hf_folder(
        args.out,
        config,
        {name: weights.shapes[name] for name in weights.shapes},
        weights.get_tensor,
        EXPORT_DTYPES[args.dtype],
        args.max_shard_size,
        tokenizer=not args.no_tokenizer,
    )
    print(f"convert_to_hf: wrote {args.out}")


def convert_adapters(args: argparse.Namespace, run: RunModel) -> None:
    """A LoRA checkpoint: merged into its base, or as a PEFT folder; refusals before anything is written."""
    spec = run.peft.spec
    base = args.base or run.pretrained
    if args.adapters == "peft" and (problem := peft_unsupported(spec)) is not None:
        raise ValueError(f"--adapters peft: {problem} (--adapters merged)")
    check_hf_folder(
        base, run.dbrx
    )  # the base must have the run's shapes: names the first tensor that differs
    adapters = load_adapters(args.checkpoint, run.dbrx, spec)
    dtype = EXPORT_DTYPES[args.dtype]
    if args.adapters == "peft":
        write_peft_folder(args.out, spec, adapters, str(base), dtype)
    else:
        save_merged_folder(
            args.out,
            run.dbrx,
            base,
            spec,
            adapters,
            dtype,
            args.max_shard_size,
            tokenizer=not args.no_tokenizer,
        )
    print(f"convert_to_hf: wrote {args.out} ({args.adapters}, base {base})")


if __name__ == "__main__":
    main()
