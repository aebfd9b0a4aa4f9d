"""The memory planner against a measured peak: the tiny model on CPU, full and LoRA fine-tuning.

    python scripts/bench/bench_planner.py [--quick]

Estimate: `scripts/model_stats.py`'s memory per GPU for yamls/finetune.yaml on one rank (full), and the
same with yamls/finetune-lora.yaml's model.peft_config (LoRA). Measured: a fresh process runs what that
YAML trains on one rank, FSDP2 over a 1-rank gloo group as train.py builds it (the adapters' units
included), fp32, its optimizer, three steps of one micro-batch; the peak is its peak resident memory
(ru_maxrss) minus its resident memory once torch, peft and the package are imported and before the
model exists. Goal: estimate / measured within 1 +- 0.15.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
FULL_YAML = ROOT / "yamls/finetune.yaml"
LORA_YAML = ROOT / "yamls/finetune-lora.yaml"
NO_CHECKPOINT = ["load_path=null", "load_weights_only=false"]  # sizing needs no weights
QUICK = ["max_seq_len=32", "device_train_microbatch_size=4", "global_train_batch_size=4", "model.d_model=64"]


def overrides(kind: str, quick: bool) -> list[str]:
    from dbrx_train.config.run import load_yaml

    extra = list(NO_CHECKPOINT) + (QUICK if quick else [])
    if kind == "lora":
        peft = load_yaml(LORA_YAML)["model"]["peft_config"]
        extra.append(f"model.peft_config={json.dumps(peft)}")
    return extra


def estimate(kind: str, quick: bool) -> tuple[int, int]:
    """(bytes per GPU the planner gives, trainable parameters)."""
    from model_stats import stats

    result = stats(str(FULL_YAML), overrides(kind, quick), world_size=1)
    return result["memory_per_gpu_bytes"]["total"], result["trainable_params"]


def resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(kind: str, quick: bool) -> None:
    """Train three steps as train.py builds the run; print the peak resident bytes above the start."""
    import datetime

    import peft  # noqa: F401  (imported before the baseline: LoRA imports it)
    import torch
    import torch.distributed as dist
    from composer.core import Precision
    from composer.distributed.fsdp2 import create_mixed_precision_policy
    from torch.distributed.fsdp import fully_shard

    from dbrx_train.config.run import load_config
    from dbrx_train.model import DbrxForCausalLM
    from dbrx_train.model.lora import apply_lora
    from dbrx_train.training.builders import build_optimizer
    from dbrx_train.training.parallelize import mark_fsdp_units

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("BENCH_PORT", "29511"))
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=datetime.timedelta(seconds=120))
    cfg = load_config(FULL_YAML, overrides(kind, quick))
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.model.dbrx.vocab_size, (cfg.device_train_microbatch_size, cfg.max_seq_len))
    start = resident_bytes()

    model = DbrxForCausalLM(cfg.model.dbrx)
    if cfg.model.peft_config is not None:
        apply_lora(model, cfg.model.peft_config.spec)
    mark_fsdp_units(model)
    mp_policy = create_mixed_precision_policy(Precision.FP32, cfg.fsdp.mixed_precision)
    units = [m for m in model.modules() if m is not model and model.fsdp_wrap_fn(m)]
    for unit in reversed(units):  # innermost first, as Composer wraps them
        fully_shard(unit, mp_policy=mp_policy)
    fully_shard(model, mp_policy=mp_policy)
    optimizer = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    for _ in range(3):
        out = model(ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dist.destroy_process_group()
    print(json.dumps({"peak_bytes": peak - start}))


def measure(kind: str, quick: bool, threads: int = 2) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--child", kind] + (["--quick"] if quick else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


def run(quick: bool = False, out=print) -> dict:
    sys.path.insert(0, str(ROOT / "scripts"))
    rows = {}
    out(f"\n== planner vs measured: peak memory of a training step, {FULL_YAML.name} on 1 CPU rank ==")
    for kind in ("full", "lora"):
        planned, trainable = estimate(kind, quick)
        measured = measure(kind, quick)
        ratio = planned / measured
        rows[kind] = {
            "planned_bytes": planned,
            "measured_bytes": measured,
            "ratio": ratio,
            "trainable": trainable,
        }
        out(
            f"  {kind:4s} {trainable:>11,} trainable  planned {planned / 2**20:7.0f} MiB  measured "
            f"{measured / 2**20:7.0f} MiB  planned/measured {ratio:.2f} (goal 0.85-1.15)"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    run(quick=args.quick)


if __name__ == "__main__":
    main()
