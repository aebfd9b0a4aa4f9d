"""Convert a Composer checkpoint of this repo into an HF DBRX folder that transformers loads.

    python scripts/convert_to_hf.py runs/dbrx-tiny/ep0-ba120 runs/dbrx-tiny/hf-ba120 \\
        [--config runs/dbrx-tiny/config.yaml] [--dtype bf16|fp32|fp16] [--max-shard-size BYTES] [--no-tokenizer]
        [--no-verify] [--drop-expert-bias --heldout data/default/prose/val] [--adapters merged|peft] [--base FOLDER]

The checkpoint is a sharded folder (`ep0-baN/`, any number of ranks), `ep0-baN/rank0.pt`, or a run
folder (its newest checkpoint); the model config comes from the run folder's config.yaml unless
--config is given. Runs on one process, reading and writing one tensor at a time (see
dbrx_train/checkpoint/composer_weights.py).

The checkpoint is first checked against its manifest (sizes and sha256; --no-verify skips that).
The export is written beside the output folder and replaces it only when complete, so a failed
conversion leaves an earlier export there as it was. An output folder that holds something other
than an HF export, or that holds the checkpoint, is refused.

A model trained with bias balancing (model.ffn_config.moe_bias_update_rate) routes with per-expert
biases that HF DBRX has no place for: its export is refused unless --drop-expert-bias, which then
loads the whole model on this process, routes the first samples of --heldout (a pretraining MDS
folder of held-out text) with and without the biases and prints how much the top-k choices change.

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

import torch
from torch.distributed.checkpoint.api import CheckpointException

from dbrx_train.atomic import FolderKind, check_replaceable, replacing
from dbrx_train.checkpoint.adapters import load_adapters
from dbrx_train.checkpoint.composer_weights import (
    check_shapes,
    load_model,
    read_composer_checkpoint,
    read_model_config,
    run_config_path,
    verify_checkpoint,
)
from dbrx_train.checkpoint.saver import describe_error
from dbrx_train.config.run import RunModel
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.token_mds import iter_samples, read_index, sample_token_ids
from dbrx_train.model.dbrx import describe_topk_change, topk_change_without_expert_bias
from dbrx_train.model.hf import (
    CONFIG_FILE,
    DEFAULT_MAX_SHARD_BYTES,
    EXPORT_DTYPES,
    check_hf_folder,
    save_hf_folder,
    without_expert_bias,
)
from dbrx_train.model.lora_export import peft_unsupported, save_merged_folder, write_peft_folder

HF_EXPORT = FolderKind(
    f"an HF export (it has no {CONFIG_FILE})", lambda folder: (folder / CONFIG_FILE).is_file()
)

HELDOUT_SAMPLES = 8


def heldout_ids(folder: str) -> torch.Tensor:
    """The first HELDOUT_SAMPLES token rows of a pretraining MDS folder, (B, T) int64."""
    index = read_index(Path(folder), "--heldout")
    rows = []
    for _, sample in iter_samples(Path(folder), index["shards"], "--heldout"):
        rows.append(torch.from_numpy(sample_token_ids(sample).astype("int64")))
        if len(rows) == HELDOUT_SAMPLES:
            break
    return torch.stack(rows)


def report_topk_change(checkpoint: str, config_path: Path, heldout: str) -> None:
    model = load_model(checkpoint, config_path).eval()
    ids = heldout_ids(heldout)
    changed = topk_change_without_expert_bias(model, lambda: model(ids, router_only=True))
    print(f"convert_to_hf: {describe_topk_change(changed)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="Composer checkpoint: ep0-baN/ folder or ep0-baN/rank0.pt")
    parser.add_argument("out", help="HF folder to write (an earlier export there is replaced)")
    parser.add_argument("--config", help="the run's config.yaml (default: next to the checkpoint)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), default="bf16")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES, help="bytes per shard")
    parser.add_argument("--no-tokenizer", action="store_true", help="skip the tokenizer files")
    parser.add_argument("--no-verify", action="store_true", help="skip checking the checkpoint's manifest")
    parser.add_argument(
        "--drop-expert-bias",
        action="store_true",
        help="export a bias-balanced model without its expert biases",
    )
    parser.add_argument(
        "--heldout", help="pretraining MDS folder to measure what dropping the biases changes"
    )
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
    out = Path(args.out)
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
        if not args.no_verify and (warning := verify_checkpoint(args.checkpoint)) is not None:
            print(f"convert_to_hf: warning: {warning}", file=sys.stderr)
        weights = read_composer_checkpoint(args.checkpoint)
        check_shapes(weights, config, args.checkpoint)
        shapes = dict(weights.shapes)
        exported = without_expert_bias(shapes, weights.get_tensor, args.drop_expert_bias)
        if len(exported) < len(shapes) and args.drop_expert_bias:
            if args.heldout is None:
                raise ValueError(
                    "--drop-expert-bias measures what it changes on --heldout FOLDER (held-out MDS text)"
                )
            report_topk_change(args.checkpoint, config_path, args.heldout)
        check_replaceable(out, overwrite=True, kind=HF_EXPORT, inputs=[Path(args.checkpoint)])
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ConfigError,
    ) as e:  # CheckpointError: a ValueError
        print(f"convert_to_hf: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        with replacing(out, overwrite=True, kind=HF_EXPORT, inputs=[Path(args.checkpoint)]) as tmp:
            save_hf_folder(
                tmp,
                config,
                {name: weights.shapes[name] for name in weights.shapes},
                weights.get_tensor,
                EXPORT_DTYPES[args.dtype],
                args.max_shard_size,
                tokenizer=not args.no_tokenizer,
                drop_expert_bias=args.drop_expert_bias,
            )
    except (Exception, CheckpointException) as e:  # a full disk; a damaged tensor read with --no-verify
        print(f"convert_to_hf: could not write {out} ({describe_error(e)}); it is unchanged", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"convert_to_hf: wrote {out}")


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
