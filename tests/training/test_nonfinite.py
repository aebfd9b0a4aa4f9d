"""nonfinite_loss: a NaN/inf loss never changes the weights or the optimizer state; stop or skip.

The non-finite loss is real, not injected: one token's embedding row is +inf (a corrupted
checkpoint), so exactly the sequences holding that token get a NaN loss, on the rank and in the
microbatch that reads them.
"""

from __future__ import annotations

import copy
import logging
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.algorithms import GradientClipping
from composer.core import Callback, State
from composer.loggers import Logger
from composer.optim import DecoupledAdamW
from torch.utils.data import DataLoader

from dbrx_train.checkpoint.composer_weights import read_composer_checkpoint
from dbrx_train.config.run import load_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.token_mds import write_token_mds
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.hf import save_pretrained
from dbrx_train.training.composer_model import DbrxComposerModel
from dbrx_train.training.lion import DecoupledLionW
from dbrx_train.training.nonfinite import EXIT_CODE, NonFiniteLossGuard, describe, exit_if_stopped
from tests.launches import run_training
from tests.tiny_models import tiny_dbrx
from tests.training.test_train_e2e import SMALL, TINY, read_metrics

POISON = 7  # its embedding row is +inf: any sequence holding it has a NaN loss
MICRO, BATCH = 2, 4  # two microbatches per batch (gradient accumulation)
OPTIMIZERS = {
    "decoupled_adamw": lambda params: DecoupledAdamW(params, lr=1e-2),
    "decoupled_lionw": lambda params: DecoupledLionW(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2),
}


def poisoned_model() -> DbrxForCausalLM:
    model = tiny_dbrx()
    model.init_weights()
    with torch.no_grad():
        model.transformer.wte.weight[POISON] = math.inf
    return model


def samples(num_batches: int, poisoned: set[int]) -> list[dict[str, torch.Tensor]]:
    """Batches of BATCH sequences; each batch in `poisoned` (1-based) has POISON in its last microbatch."""
    ids = torch.randint(8, 64, (num_batches * BATCH, 16), generator=torch.Generator().manual_seed(0))
    for batch in poisoned:
        ids[batch * BATCH - 1, 5] = POISON
    return [{"input_ids": row} for row in ids]


class Snapshots(Callback):
    """Weights and optimizer state before training (index 0) and after each batch (index = batch)."""

    def __init__(self):
        self.weights: list[dict[str, torch.Tensor]] = []
        self.optimizer: list[dict] = []

    def _take(self, state: State) -> None:
        self.weights.append({k: v.detach().clone() for k, v in state.model.state_dict().items()})
        self.optimizer.append(copy.deepcopy(state.optimizers[0].state_dict()["state"]))

    def fit_start(self, state: State, logger: Logger) -> None:
        self._take(state)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._take(state)


def finite_except_poison(weights: dict[str, torch.Tensor]) -> list[bool]:
    """Per tensor: all finite (the embedding without its +inf row)."""
    out = []
    for name, value in weights.items():
        if name.endswith("wte.weight"):
            value = torch.cat([value[:POISON], value[POISON + 1 :]])
        out.append(bool(value.isfinite().all()))
    return out


def same(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def fit(
    guard: NonFiniteLossGuard | None,
    poisoned: set[int],
    *,
    batches: int = 5,
    optimizer: str = "decoupled_adamw",
    **trainer_kwargs,
) -> tuple[Trainer, Snapshots]:
    composer_model = DbrxComposerModel(poisoned_model())
    snapshots = Snapshots()
    trainer = Trainer(
        model=composer_model,
        train_dataloader=DataLoader(samples(batches, poisoned), batch_size=BATCH),
        max_duration=f"{batches}ba",
        optimizers=OPTIMIZERS[optimizer](composer_model.parameters()),
        device_train_microbatch_size=MICRO,
        algorithms=[GradientClipping("norm", 1.0)],  # as in dbrx-tiny.yaml: it sees the NaN gradients first
        callbacks=[c for c in (guard, snapshots) if c is not None],
        loggers=[],
        device="cpu",
        progress_bar=False,
        log_to_console=False,
        **trainer_kwargs,
    )
    trainer.fit()
    return trainer, snapshots


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_skipped_batch_changes_neither_weights_nor_optimizer_state(optimizer, caplog):
    guard = NonFiniteLossGuard("skip", max_consecutive_skips=10)
    with caplog.at_level(logging.WARNING, logger="dbrx_train.training.nonfinite"):
        trainer, snap = fit(guard, poisoned={3}, optimizer=optimizer)
    assert int(trainer.state.timestamp.batch) == 5  # the run went on
    assert same(snap.weights[3], snap.weights[2])
    assert same(snap.optimizer[3], snap.optimizer[2])  # moments and step counts untouched
    for batch in (1, 2, 4, 5):  # every other batch did train
        assert not same(snap.weights[batch], snap.weights[batch - 1])
    assert all(finite_except_poison(snap.weights[5]))
    assert guard.skipped_batches == 1 and guard.consecutive == 0 and guard.stopped_at_batch is None
    [warning] = [r.getMessage() for r in caplog.records]
    assert "non-finite loss at batch 3 (total=nan, lm_cross_entropy=nan" in warning
    assert "on rank 0" in warning and "1 skipped so far" in warning


def test_without_the_guard_the_nan_reaches_the_weights():
    _, snap = fit(None, poisoned={3}, batches=3)
    assert all(finite_except_poison(snap.weights[2]))
    assert not any(finite_except_poison(snap.weights[3]))


def test_stop_ends_the_run_at_the_batch_with_the_last_good_weights(capsys):
    guard = NonFiniteLossGuard("stop", save_folder="runs/x")
    trainer, snap = fit(guard, poisoned={3})
    assert int(trainer.state.timestamp.batch) == 3 and len(snap.weights) == 4
    assert same(snap.weights[3], snap.weights[2]) and same(snap.optimizer[3], snap.optimizer[2])
    assert guard.stopped_at_batch == 3 and guard.weights_from_before_batch == 3
    with pytest.raises(SystemExit) as exit_info:
        exit_if_stopped(trainer)
    assert exit_info.value.code == EXIT_CODE == 3
    message = capsys.readouterr().err
    assert message.count("\n") == 1  # one paragraph
    assert "stopped at batch 3: the loss was not finite (total=nan, lm_cross_entropy=nan" in message
    assert "(batch 3, in runs/x) holds the weights from before batch 3" in message
    assert "lower optimizer.lr" in message and "nonfinite_loss.policy: skip" in message


def test_skip_stops_after_too_many_in_a_row(capsys):
    # 2 is skipped, 3 resets the streak, 4 is skipped, 5 makes two in a row: more than the limit of 1.
    guard = NonFiniteLossGuard("skip", max_consecutive_skips=1)
    trainer, snap = fit(guard, poisoned={2, 4, 5}, batches=6)
    assert int(trainer.state.timestamp.batch) == 5
    assert same(snap.weights[5], snap.weights[3]) and same(snap.optimizer[5], snap.optimizer[3])
    assert guard.skipped_batches == 2 and guard.stopped_at_batch == 5
    with pytest.raises(SystemExit):
        exit_if_stopped(trainer)
    message = capsys.readouterr().err
    assert "for 2 batches in a row (batches 4-5, more than nonfinite_loss.max_consecutive_skips=1" in message
    assert "holds the weights from before batch 4" in message


def test_skip_count_survives_a_checkpoint(tmp_path):
    first = NonFiniteLossGuard("skip")
    fit(first, poisoned={2}, batches=3, save_folder=str(tmp_path), save_interval="3ba")
    assert first.skipped_batches == 1
    [checkpoint] = tmp_path.glob("ep*-ba3*")
    resumed = NonFiniteLossGuard("skip")
    trainer, _ = fit(resumed, poisoned={2, 5}, batches=5, load_path=str(checkpoint))
    assert int(trainer.state.timestamp.batch) == 5
    assert resumed.skipped_batches == 2  # batch 2 before the checkpoint, batch 5 after it


def test_describe_names_terms_and_ranks():
    names = ["total", "lm_cross_entropy", "load_balancing"]
    assert describe(names, [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]]) == "total=inf, load_balancing=inf on rank 0"
    table = [[0.0, 0.0, 0.0], [2.0, 2.0, 0.0], [1.0, 1.0, 0.0]]
    assert describe(names, table) == "total=nan, lm_cross_entropy=nan on ranks 1, 2"


def test_config_section():
    cfg = load_config(TINY)
    assert cfg.nonfinite_loss.policy == "stop" and cfg.nonfinite_loss.max_consecutive_skips == 10
    cfg = load_config(TINY, ["nonfinite_loss.policy=skip", "nonfinite_loss.max_consecutive_skips=null"])
    assert cfg.nonfinite_loss.policy == "skip" and cfg.nonfinite_loss.max_consecutive_skips is None
    with pytest.raises(ConfigError, match="nonfinite_loss.policy"):
        load_config(TINY, ["nonfinite_loss.policy=ignore"])
    with pytest.raises(ConfigError, match="max_consecutive_skips"):
        load_config(TINY, ["nonfinite_loss.max_consecutive_skips=-1"])


# ---------------------------------------------------------------------------------------------
# A real run: FSDP2 over 2 CPU ranks, each poisoned sequence on one rank only
# ---------------------------------------------------------------------------------------------
E2E_POISON = 5
# (global batch, position in it): 8 samples a batch in stored order; Streaming deals the 8 to the two
# ranks so that these three land on rank 1, rank 1 and rank 0.
POISONED = [(3, 5), (5, 1), (6, 6)]


def launch(nproc: int, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Like test_train_e2e.launch, but a failed run is returned, not raised."""
    return run_training(nproc, [str(TINY), f"save_folder={run_dir}", *SMALL, *overrides])


@pytest.mark.slow
def test_two_rank_run_skips_then_stops_with_the_last_good_checkpoint(tmp_path):
    """Batch 3 is skipped (rank 1's NaN, rank 0 agrees), 4 trains, 5 and 6 in a row exceed
    max_consecutive_skips=1: the run stops at 6, exit code 3, its checkpoint = the weights after 4."""
    config = load_config(TINY, ["variables.data_root=unused", *SMALL]).model.dbrx
    torch.manual_seed(0)
    model = DbrxForCausalLM(config)
    model.init_weights()
    with torch.no_grad():
        model.transformer.wte.weight[E2E_POISON] = math.inf
    save_pretrained(model, tmp_path / "pretrained", dtype=torch.float32, tokenizer=False)
    tokens = np.random.default_rng(0).integers(8, config.vocab_size, size=(8 * 8, 64), dtype=np.int32)
    for batch, position in POISONED:
        tokens[8 * (batch - 1) + position, 20] = E2E_POISON
    write_token_mds(list(tokens), tmp_path / "data")

    run_dir = tmp_path / "run"
    proc = launch(
        2,
        run_dir,
        f"model.pretrained={tmp_path / 'pretrained'}",
        "curriculum=null",
        "train_loader.dataset.streams=null",
        f"train_loader.dataset.local={tmp_path / 'data'}",
        "train_loader.dataset.shuffle=false",
        "eval_loader=null",
        "callbacks.expert_load=null",
        "loggers.wandb=null",
        "max_duration=8ba",
        "save_interval=4ba",
        "nonfinite_loss.policy=skip",
        "nonfinite_loss.max_consecutive_skips=1",
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out[-6000:]
    rows = read_metrics(run_dir)
    assert [r["batch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # Non-finite values are written as strings. Had a rank stepped with batch 3's NaN gradients, its
    # shard, and so batch 4's loss, would be NaN.
    assert [isinstance(r["loss/train/total"], float) for r in rows] == [True, True, False, True, False, False]
    assert [r.get("nonfinite/skipped_batches") for r in rows] == [None, None, 1, 1, 2, 2]
    terms = "total=nan, lm_cross_entropy=nan, load_balancing=nan"
    reported = re.findall(rf"non-finite loss at batch (\d) \({terms} on rank (\d)\): skipped its", out)
    assert [batch for batch, _ in reported] == ["3", "5", "6"], out[-6000:]
    assert {rank for _, rank in reported} == {"0", "1"}  # the NaN was on one rank, all ranks acted
    message = (
        "dbrx-train: stopped at batch 6: the loss was not finite for 2 batches in a row (batches 5-6, "
        "more than nonfinite_loss.max_consecutive_skips=1;"
    )
    assert message in proc.stderr
    assert "holds the weights from before batch 5; resuming from it continues with batch 7" in proc.stderr
    assert "Traceback" not in out
    assert "Global rank 1" not in out  # the launcher reports rank 0's exit code, not a killed rank's log
    # The final checkpoint (batch 6) holds the weights from after batch 4.
    before, final = (read_composer_checkpoint(run_dir / f"ep0-ba{b}") for b in (4, 6))
    assert before.shapes == final.shapes
    for name in final.shapes:
        assert torch.equal(before.get_tensor(name), final.get_tensor(name)), name
