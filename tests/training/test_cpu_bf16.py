"""precision: amp_bf16 on CPU (training/cpu.py): Composer's own amp_bf16 path under CPU autocast.

In-process: a Composer Trainer on a tiny model trains and evaluates under bf16 autocast with fp32
weights, its first loss equal to a hand-run autocast forward of the same weights. Real runs: 2-rank
FSDP2 on gloo with a checkpoint, resumed bit for bit on 2 ranks and elastically on 1, HF exports in
bf16 and fp32 with the same final weights. Also `precision: auto`.
"""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.core import Callback, Precision, State
from composer.loggers import Logger
from torch.utils.data import DataLoader

from dbrx_train.config.run import load_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.training import cpu
from dbrx_train.training.composer_model import DbrxComposerModel
from dbrx_train.training.preflight import check_precision, resolve_precision
from tests.tiny_models import tiny_dbrx
from tests.training.test_hf_export import hf_tensors
from tests.training.test_resume_e2e import NO_BIAS, run_ok
from tests.training.test_train_e2e import TINY, read_metrics


class Dtypes(Callback):
    """The logits' dtype in each training and eval forward, the loss of the first batch."""

    def __init__(self):
        self.train: list[torch.dtype] = []
        self.eval: list[torch.dtype] = []
        self.first_loss: float | None = None

    def after_forward(self, state: State, logger: Logger) -> None:
        self.train.append(state.outputs.logits.dtype)

    def after_loss(self, state: State, logger: Logger) -> None:
        if self.first_loss is None:
            self.first_loss = state.loss["total"].item()

    def eval_after_forward(self, state: State, logger: Logger) -> None:
        self.eval.append(state.outputs.dtype)


def test_composer_trains_and_evaluates_amp_bf16_on_cpu_under_autocast():
    cpu.enable_amp_bf16_on_cpu()
    cpu.enable_amp_bf16_on_cpu()  # idempotent
    model = tiny_dbrx()
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected_first_loss = model(ids[:4], labels=ids[:4]).loss.item()
    samples = [{"input_ids": row} for row in ids]
    dtypes = Dtypes()
    trainer = Trainer(
        model=DbrxComposerModel(model),
        train_dataloader=DataLoader(samples, batch_size=4),
        eval_dataloader=DataLoader(samples, batch_size=4),
        eval_interval="2ba",
        max_duration="2ba",
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
        precision="amp_bf16",
        device="cpu",
        callbacks=[dtypes],
        loggers=[],
        progress_bar=False,
        log_to_console=False,
    )
    assert trainer.state.precision == Precision.AMP_BF16
    trainer.fit()
    assert dtypes.train == [torch.bfloat16] * 2 and dtypes.eval and set(dtypes.eval) == {torch.bfloat16}
    assert dtypes.first_loss == expected_first_loss  # the same autocast forward, bit for bit
    assert all(p.dtype == torch.float32 for p in model.parameters())  # fp32 master weights
    metrics = trainer.state.eval_metrics["eval"]["LanguageCrossEntropy"].compute()
    assert torch.isfinite(metrics)


def test_auto_precision_is_bf16_on_cpus_with_native_bf16_and_amp_fp16_is_refused(monkeypatch):
    """auto is amp_bf16 on a CPU with native bf16 matmul (make train's bf16 pretraining ends within 2%
    of fp32's eval loss, docs/performance.md), fp32 on one without; amp_bf16 on GPUs."""
    cfg = load_config(str(TINY), [])
    assert cfg.precision == "auto"
    monkeypatch.setattr(cpu, "native_bf16_matmul", lambda: True)
    assert resolve_precision(cfg, "cpu") == "amp_bf16"
    monkeypatch.setattr(cpu, "native_bf16_matmul", lambda: False)
    assert resolve_precision(cfg, "cpu") == "fp32"
    assert resolve_precision(cfg, "gpu") == "amp_bf16"
    for asked in ("fp32", "amp_bf16"):
        assert resolve_precision(load_config(str(TINY), [f"precision={asked}"]), "cpu") == asked
    with pytest.raises(ConfigError, match="precision: amp_fp16 needs a GPU"):
        check_precision(load_config(str(TINY), ["precision=amp_fp16"]), "cpu")


# ---------------------------------------------------------------------------------------------
# Real runs: 2-rank FSDP2 on gloo, resumed on 2 ranks (bit for bit) and on 1 (elastic)
# ---------------------------------------------------------------------------------------------
BF16 = [
    NO_BIAS,  # these runs export to HF
    "precision=amp_bf16",
    "save_num_checkpoints_to_keep=-1",
    "max_duration=6ba",
    "icl_tasks=null",
    "eval_gauntlet=null",
]


def losses(run_dir) -> dict[int, float]:
    """The training loss of each batch (eval rows carry none)."""
    return {r["batch"]: r["loss/train/total"] for r in read_metrics(run_dir) if "loss/train/total" in r}


@pytest.fixture(scope="module")
def bf16_run(default_corpus, tmp_path_factory):
    """Uninterrupted 2-rank amp_bf16 run (dropout on, see RELIABLE), checkpoints at 3 and 6, HF export in bf16."""
    run_dir = tmp_path_factory.mktemp("bf16") / "run"
    run_ok(2, run_dir, default_corpus, *BF16, "callbacks.hf_export={dtype: bf16, tokenizer: false}")
    return run_dir


@pytest.mark.slow
def test_amp_bf16_on_two_ranks_resumes_bit_exact_and_exports_both_dtypes(bf16_run, default_corpus, tmp_path):
    want = losses(bf16_run)
    assert sorted(want) == list(range(1, 7)) and all(torch.isfinite(torch.tensor(list(want.values()))))
    resumed = tmp_path / "resumed"
    proc = run_ok(
        2,
        resumed,
        default_corpus,
        *BF16,
        f"load_path={bf16_run / 'ep0-ba3'}",
        "callbacks.hf_export={dtype: fp32, tokenizer: false}",
    )
    assert "resuming from" in proc.stdout + proc.stderr
    assert losses(resumed) == {b: loss for b, loss in want.items() if b > 3}  # bit for bit, dropout included
    # The same final weights, exported as asked: fp32 (resumed run) and bf16 (uninterrupted run).
    bf16, fp32 = hf_tensors(bf16_run / "hf/ba6"), hf_tensors(resumed / "hf/ba6")
    assert bf16.keys() == fp32.keys()
    for name in bf16:
        assert bf16[name].dtype == torch.bfloat16 and fp32[name].dtype == torch.float32, name
        assert torch.equal(fp32[name].to(torch.bfloat16), bf16[name]), name


@pytest.mark.slow
def test_amp_bf16_checkpoint_of_two_ranks_resumes_on_one(bf16_run, default_corpus, tmp_path):
    resumed = tmp_path / "one-rank"
    proc = run_ok(1, resumed, default_corpus, *BF16, f"load_path={bf16_run / 'ep0-ba3'}")
    assert "resuming from" in proc.stdout + proc.stderr and "precision: amp_bf16" in proc.stderr
    got, want = losses(resumed), losses(bf16_run)
    assert sorted(got) == [4, 5, 6]
    # Not bitwise (1 rank sums the microbatches in another order), but the same training.
    for batch, loss in got.items():
        assert abs(loss - want[batch]) < 0.05 * want[batch], (got, want)
