"""Real runs of the router balancing (training/router_balance.py) and the imbalance monitor.

Two launches share the work: a 2-rank FSDP2 gloo run with `moe_loss_scope: global` and bias
balancing, microbatches of 2 rows (2 per rank per step), checkpointed at batch 3; and a 1-rank run
resumed from that checkpoint with the whole step (8 rows) as one microbatch. Dropout is off, so the
two world sizes and microbatch splits train the same model:
- global scope: the 1-rank run's losses equal the 2-rank run's at every batch (per-microbatch
  balancing would differ here: its statistics would come from 2 rows instead of 8);
- bias balancing: the biases are equal integers-times-rate at the same batch, so they were restored
  from the checkpoint and both world sizes counted the same global loads;
- the expert-load monitor logs max/mean load and the tokens over capacity over the global batch, and
  the run report draws them in its expert overload panel.
"""

from __future__ import annotations

import pytest

from dbrx_train.report.run_report import write_report
from tests.training.test_resume_e2e import run_ok
from tests.training.test_train_e2e import read_metrics

RATE = 0.01
BALANCE = [
    "model.ffn_config.moe_loss_scope=global",
    f"model.ffn_config.moe_bias_update_rate={RATE}",
    "model.ffn_config.moe_z_loss_weight=0.001",
    "model.resid_pdrop=0.0",
    "model.emb_pdrop=0.0",
    "model.attn_config.attn_pdrop=0.0",
    "callbacks.expert_load={log_interval: 3}",
    "icl_tasks=null",
    "eval_gauntlet=null",
    "max_duration=6ba",
    "save_num_checkpoints_to_keep=-1",
]


def rows_by_batch(run_dir) -> dict[int, dict]:
    """Every key logged at each batch (Composer may write a batch's metrics over several rows)."""
    merged: dict[int, dict] = {}
    for row in read_metrics(run_dir):
        merged.setdefault(row["batch"], {}).update(row)
    return merged


def biases(row: dict) -> dict[str, float]:
    return {k: v for k, v in row.items() if "/expert_bias/" in k}


@pytest.mark.slow
def test_global_scope_and_bias_balancing_agree_across_world_sizes_and_resume(default_corpus, tmp_path):
    two = tmp_path / "two-ranks"
    run_ok(2, two, default_corpus, *BALANCE, "device_train_microbatch_size=2")
    one = tmp_path / "one-rank"
    proc = run_ok(
        1, one, default_corpus, *BALANCE, "device_train_microbatch_size=8", f"load_path={two / 'ep0-ba3'}"
    )
    assert "resuming from" in proc.stdout + proc.stderr
    want, got = rows_by_batch(two), rows_by_batch(one)
    assert [b for b in range(4, 7) if "loss/train/total" in got.get(b, {})] == [4, 5, 6]
    for batch in (4, 5, 6):
        for key in ("loss/train/total", "loss/train/load_balancing", "loss/train/router_z_loss"):
            assert got[batch][key] == pytest.approx(want[batch][key], rel=1e-5, abs=1e-7), (batch, key)

    # Bias balancing: logged at batches 3 and 6, moved by +-rate per step, the same on both runs.
    bias3, bias6 = biases(want[3]), biases(want[6])
    assert len(bias3) == 2 * 16  # 2 layers x 16 experts (the tiny YAML's MoE)
    assert any(v != 0 for v in bias3.values())
    for value in bias3.values():
        assert abs(value) <= 3 * RATE + 1e-9 and round(value / RATE) == pytest.approx(value / RATE, abs=1e-4)
    assert biases(got[6]) == pytest.approx(bias6, abs=1e-7)

    # The imbalance monitor: per-layer max/mean load over the global batch and the overflow shares.
    row = want[6]
    for layer in (0, 1):
        assert row[f"moe/layer_{layer}/max_over_mean"] >= 1.0
        assert (
            0.0 <= row[f"moe/layer_{layer}/over_capacity_1.25"] <= row[f"moe/layer_{layer}/over_capacity_1.0"]
        )
    assert got[6]["moe/layer_0/max_over_mean"] == pytest.approx(row["moe/layer_0/max_over_mean"], rel=1e-6)
    report = write_report(two, tmp_path / "report")
    assert report.folder / "expert_overload.png" in report.pngs
    assert report.summary["final_max_over_mean_load"] == pytest.approx(row["moe/max_over_mean"])
