"""Generate text from an HF DBRX folder or a Composer checkpoint.

    python scripts/generate.py --model runs/dbrx-tiny/hf/ba120 --prompt "def main():" [--prompt ...]
    python scripts/generate.py --model runs/dbrx-tiny/ep0-ba120 --chat --prompt "What is Python?"
        [--max-new-tokens 64] [--temperature 0.8 --top-p 0.95 --top-k 50] [--seed 0] [--no-cache] [--json]

Several --prompt flags decode as one left-padded batch. --chat wraps each prompt as a user turn in
DBRX's ChatML (with its default system prompt unless --no-system-prompt) and adds the assistant
header. A Composer checkpoint (sharded folder `ep0-baN/` or `ep0-baN/rank0.pt`) takes its model
config from the run folder's config.yaml, or from --config, and is first checked against its
manifest (sizes and sha256; --no-verify skips that).

A LoRA run's checkpoint holds adapters only: they are applied on the fly to the run's base
(model.pretrained, or --base), or folded into its weights first with --merge-adapters (faster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dbrx_train.checkpoint.adapters import load_adapted_model
from dbrx_train.checkpoint.composer_weights import load_model, run_config_path, verify_checkpoint
from dbrx_train.config.run import RunModel
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.tokenizer import load_tokenizer
from dbrx_train.model.generate import SamplingConfig, generate
from dbrx_train.model.hf import CONFIG_FILE


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF DBRX folder or Composer checkpoint")
    parser.add_argument("--config", help="run config.yaml for a Composer checkpoint (default: next to it)")
    parser.add_argument("--prompt", action="append", required=True, help="may be given several times")
    parser.add_argument("--chat", action="store_true", help="format each prompt as a ChatML user turn")
    parser.add_argument(
        "--no-system-prompt", action="store_true", help="with --chat: no default system prompt"
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip checking a Composer checkpoint against its manifest"
    )
    parser.add_argument(
        "--merge-adapters", action="store_true", help="LoRA: fold the adapters into the weights"
    )
    parser.add_argument("--base", help="LoRA: the base HF folder (default: the run's model.pretrained)")
    args = parser.parse_args(argv)

    try:
        cfg = SamplingConfig(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            use_cache=not args.no_cache,
        )
        if not args.no_verify and not (Path(args.model) / "config.json").is_file():
            warning = verify_checkpoint(args.model)
            if warning is not None:
                print(f"generate: warning: {warning}", file=sys.stderr)
        model = load(args)
    except (ValueError, FileNotFoundError, ConfigError) as e:  # CheckpointError is a ValueError
        print(f"generate: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    tokenizer = load_tokenizer()
    if args.chat:
        # A prompt is a message: special-token strings in it are text, not ChatML control tokens.
        prompts = [
            tokenizer.encode_chat(
                [{"role": "user", "content": p}],
                add_generation_prompt=True,
                default_system_prompt=not args.no_system_prompt,
            )[0]
            for p in args.prompt
        ]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompt]
    try:
        outputs = generate(model, prompts, cfg, torch.Generator().manual_seed(args.seed))
    except ValueError as e:  # e.g. prompt + max_new_tokens longer than max_seq_len
        print(f"generate: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    for prompt, ids in zip(args.prompt, outputs, strict=False):
        text = tokenizer.decode(i for i in ids if i not in cfg.eos_token_ids)
        if args.json:
            print(json.dumps({"prompt": prompt, "completion": text, "ids": ids}))
        else:
            print(f"--- {prompt}\n{text}")


def load(args: argparse.Namespace) -> torch.nn.Module:
    """An HF folder, a Composer checkpoint, or a LoRA run's checkpoint on its base."""
    path = Path(args.model)
    if not (path.is_dir() and (path / CONFIG_FILE).is_file()):
        config = Path(args.config) if args.config else run_config_path(path)
        run = RunModel(config) if config.is_file() else None
        if run is not None and run.peft is not None:
            return load_adapted_model(path, run, args.base, merge=args.merge_adapters)
    return load_model(args.model, args.config)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
