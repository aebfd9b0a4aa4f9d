"""Evaluate a model outside training: lm-eval-harness tasks, or our ICL tasks (LLM Foundry format).

    python scripts/eval.py --model runs/dbrx-tiny/hf/ba120 --tasks my_task --include-path eval/tasks
    python scripts/eval.py --model runs/dbrx-tiny/hf/ba120 --icl-tasks yamls/pretrain/dbrx-tiny.yaml
        [--batch-size 8] [--device cpu|cuda] [--dtype fp32|bf16] [--limit N] [--num-fewshot N]
        [--log-samples] [--output results.json]

--model: an HF DBRX folder, a Composer checkpoint (sharded folder or .pt, any world size) or a run
folder (its newest checkpoint; the model config comes from the run's config.yaml, or --config).
--tasks: lm-eval task names (needs the `[eval]` extra); the task data must be local (a task YAML over
jsonl files, found through --include-path): nothing downloads. --icl-tasks: a YAML with an
`icl_tasks:` list (a training config works: its icl_tasks, icl_seq_len and eval_gauntlet are used),
scored by the same code as during training. Also `dbrx-train eval ...`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

import torch

# Before lm-eval imports `datasets`/`huggingface_hub`: a task that needs the hub fails at once,
# offline, instead of trying the network.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from dbrx_train.checkpoint.composer_weights import load_model  # noqa: E402
from dbrx_train.config.icl import EvalGauntletConfig, ICLTaskConfig, expand_file_reference  # noqa: E402
from dbrx_train.config.run import load_yaml  # noqa: E402
from dbrx_train.config.schema import ConfigError, build  # noqa: E402
from dbrx_train.data.tokenizer import load_tokenizer  # noqa: E402
from dbrx_train.eval.icl_suite import (  # noqa: E402
    build_icl_suite,
    evaluate_suite,
    model_generate_fn,
    model_logits_fn,
)

ADAPTER_FILE = "adapter_config.json"


def load_eval_model(path: str, config: str | None, device: str) -> torch.nn.Module:
    """Our fp32 model from an HF folder, a Composer checkpoint or a run folder."""
    if (Path(path) / ADAPTER_FILE).is_file():
        # The seam for LoRA: a PEFT adapter folder would load its base model, then the adapter on it.
        raise ValueError(
            f"{path} is a LoRA adapter folder ({ADAPTER_FILE}); loading adapters is not wired yet: "
            "evaluate the merged export instead"
        )
    return load_model(path, config).to(device).eval()


def precision(device: str, dtype: str):
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)


def run_icl(args, model) -> dict[str, float]:
    data = load_yaml(args.icl_tasks)
    for key in ("icl_tasks", "eval_gauntlet"):
        expand_file_reference(data, key)
    tasks = [build(ICLTaskConfig, t, f"icl_tasks[{i}]") for i, t in enumerate(data.get("icl_tasks") or [])]
    if not tasks:
        raise ConfigError(f"{args.icl_tasks}: no icl_tasks")
    gauntlet = data.get("eval_gauntlet")
    tokenizer = load_tokenizer()
    suite = build_icl_suite(
        tasks,
        tokenizer,
        default_batch_size=args.batch_size,
        icl_seq_len=args.icl_seq_len
        or data.get("icl_seq_len")
        or data.get("max_seq_len")
        or model.config.max_seq_len,
        subset_num_batches=data.get("icl_subset_num_batches"),
        gauntlet=build(EvalGauntletConfig, gauntlet, "eval_gauntlet") if gauntlet else None,
    )
    with torch.no_grad(), precision(args.device, args.dtype):
        scores = evaluate_suite(
            suite, model_logits_fn(model, args.device), model_generate_fn(model), tokenizer
        )
    for task in suite.tasks:
        print(f"{task.key:<32} {scores.accuracies[task.key]:.4f}  (chance {suite.chance(task):.4f})")
    for name, value in (scores.gauntlet or {}).items():
        print(f"gauntlet {name:<23} {value:+.4f}")
    return scores.logged()


def run_lm_eval(args, model) -> dict:
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager

        from dbrx_train.eval.lm_eval_model import DbrxLM
    except ImportError as e:
        raise SystemExit(f"eval: lm-eval is not installed ({e}); pip install -e '.[eval]'") from None
    names = [t for t in args.tasks.split(",") if t]
    manager = TaskManager(include_path=args.include_path)
    try:
        with precision(args.device, args.dtype):
            results = lm_eval.simple_evaluate(
                model=DbrxLM(model, batch_size=args.batch_size),
                tasks=names,
                task_manager=manager,
                num_fewshot=args.num_fewshot,
                limit=args.limit,
                log_samples=args.log_samples,
                bootstrap_iters=0,
            )
    except Exception as e:  # lm-eval wraps dataset errors in many types; name the cause in one line
        text = f"{type(e).__name__}: {e}".splitlines()[0]
        if any(s in text.lower() for s in ("offline", "connection", "hub", "couldn't reach", "not found on")):
            raise SystemExit(
                f"eval: a task in {names} needs the Hugging Face hub to load its data ({text}); nothing downloads "
                "here: give lm-eval a task YAML over local files (dataset_path: json, dataset_kwargs.data_files) "
                "and pass --include-path"
            ) from None
        raise SystemExit(f"eval: lm-eval failed on {names}: {text}") from None
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not name.endswith("_stderr,none"):
                print(f"{task:<24} {name:<24} {value:.4f}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="HF DBRX folder, Composer checkpoint or run folder")
    parser.add_argument("--config", help="run config.yaml for a Composer checkpoint (default: next to it)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--tasks", help="comma-separated lm-eval task names")
    which.add_argument("--icl-tasks", help="YAML with icl_tasks (LLM Foundry format)")
    parser.add_argument("--include-path", help="folder of lm-eval task YAMLs")
    parser.add_argument("--num-fewshot", type=int, help="lm-eval: few-shot examples (default: the task's)")
    parser.add_argument("--limit", type=int, help="lm-eval: examples per task")
    parser.add_argument(
        "--log-samples", action="store_true", help="lm-eval: keep per-sample results in --output"
    )
    parser.add_argument(
        "--icl-seq-len", type=int, help="ICL: tokens per sequence (default: the YAML's or the model's)"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward (default 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)

    try:
        model = load_eval_model(args.model, args.config, args.device)
        results = run_icl(args, model) if args.icl_tasks else run_lm_eval(args, model)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"eval: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
