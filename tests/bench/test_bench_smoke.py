"""`make bench`'s code paths at toy size: every figure is a finite positive number (no timing asserts)."""

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "scripts" / "bench"
sys.path.insert(0, str(BENCH))

import bench_cluster  # noqa: E402
import run  # noqa: E402


def positive(x) -> bool:
    return isinstance(x, float | int) and math.isfinite(x) and x > 0


@pytest.mark.extended  # CI time (pyproject: extended)
def test_quick_bench_prints_well_formed_numbers():
    lines = []
    results = run.run(quick=True, threads=2, out=lines.append)
    assert any(line.startswith("machine:") for line in lines)
    for row in results["train_step"]:
        keys = ("ours_s", "hf_s", "speedup", "mfu_ours", "mfu_hf", "compiled_s", "speedup_compiled")
        assert all(positive(row[k]) for k in keys)
    assert set(results["moe_layer"]) == {"ours", "ours unfused", "hf", "dense GLU"}
    assert all(positive(t) for t in results["moe_layer"].values())
    assert results["moe_layer_max_diff"] < 1e-4  # the peers compute the same thing
    for mem in results["memory"].values():
        for which in ("ours", "hf"):
            assert all(positive(mem[which][k]) for k in ("rest_mib", "total_mib", "step_mib"))
        assert positive(mem["step_ratio"])
    for table in (results["seq_scaling"], results["expert_scaling"]):
        assert all(positive(t) for times in table.values() for t in times.values())
    assert len(results["document_masking"]) == 2 and all(
        positive(t) for t in results["document_masking"].values()
    )
    assert set(results["balancing"]) == {"microbatch", "global", "z-loss", "bias"}
    assert all(positive(t) for t in results["balancing"].values())
    bf16 = results["bf16"]  # issue 21's rows: the same peers under bf16 autocast
    for row in bf16["train_step"]:
        assert all(
            positive(row[k]) for k in ("ours_s", "hf_s", "speedup", "mfu_ours", "mfu_hf", "peak_flops")
        )
    assert set(bf16["moe_layer"]) == {"ours", "hf", "dense GLU"}
    assert all(positive(t) for t in bf16["moe_layer"].values())
    assert bf16["moe_layer_max_diff"] < 0.1  # the same computation up to bf16 rounding
    assert all(positive(bf16["memory"][f"{k}_ratio"]) for k in ("total", "step", "saved"))
    for row in results["planner"].values():  # model_stats' estimate against a measured peak, full and LoRA
        assert all(positive(row[k]) for k in ("planned_bytes", "measured_bytes", "ratio"))
    assert results["planner"]["lora"]["trainable"] < results["planner"]["full"]["trainable"]
    assert len(results["cluster"]) == len(bench_cluster.GPU_COUNTS)


def test_cluster_estimate_is_consistent():
    from dbrx_train.config.schema import build
    from dbrx_train.model import DbrxConfig

    cfg = build(
        DbrxConfig,
        {
            "d_model": 6144,
            "n_heads": 48,
            "n_layers": 40,
            "max_seq_len": 32768,
            "vocab_size": 100352,
            "attn_config": {"kv_n_heads": 8},
            "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
        },
    )
    a = bench_cluster.Assumptions()
    small, large = bench_cluster.estimate(cfg, 64, a), bench_cluster.estimate(cfg, 512, a)
    # 8x the GPUs at the same batch: compute time / 8, MFU bounded by the assumed compute MFU.
    assert math.isclose(small.compute_s / large.compute_s, 8.0)
    for e in (small, large):
        assert e.mfu_serial <= e.mfu_overlapped <= a.compute_mfu + 1e-9
        assert e.overlapped_s == max(e.compute_s, e.comm_s)
    # Inside one node the ring runs on NVLink, faster than a group spanning nodes.
    assert bench_cluster.shard_group_bandwidth(8, a) > bench_cluster.shard_group_bandwidth(64, a)


# CI time (pyproject: extended): ~60 s of torch.compile on CPU; the next test runs the bench's torch peer
@pytest.mark.extended
def test_quick_gpu_bench_runs_every_peer_it_can():
    """bench_gpu's code paths at toy size on whatever device is here; peers that cannot run say why."""
    import bench_gpu
    import torch

    lines = []
    results = bench_gpu.run(quick=True, out=lines.append)
    rows = {row["peer"]: row for row in results["rows"]}
    assert set(rows) == {
        "ours torch",
        "ours compiled",
        "ours megablocks",
        "ours megablocks compiled",
        "transformers",
    }
    for name in ("ours torch", "ours compiled", "transformers"):
        assert all(
            positive(rows[name][k]) for k in ("s_per_step", "tokens_per_s", "mfu_measured", "first_loss")
        )
    # Same weights, same batch: the first losses agree up to bf16 rounding and our aux-loss term.
    assert abs(rows["ours torch"]["first_loss"] - rows["transformers"]["first_loss"]) < 0.05
    if not torch.cuda.is_available():
        assert (
            rows["ours megablocks"]["note"]
            == rows["ours megablocks compiled"]["note"]
            == "skipped: needs CUDA"
        )
        assert any("ours megablocks: skipped (needs CUDA)" in line for line in lines)


def test_quick_gpu_bench_times_only_the_peers_asked_for():
    """--peers: a second run can time megablocks against ours torch without redoing every peer."""
    import bench_gpu

    results = bench_gpu.run(quick=True, peers=("torch",), out=lambda line: None)
    (row,) = results["rows"]
    assert row["peer"] == "ours torch" and positive(row["tokens_per_s"])
    assert row["vs_hf"] != row["vs_hf"]  # NaN: transformers was not timed in this run
