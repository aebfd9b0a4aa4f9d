"""Composer's progress bar, plus throughput, MFU and ETA (Composer's own shows only losses)."""

from __future__ import annotations

from composer.loggers import ProgressBarLogger

from dbrx_train import compat

# metric -> (label in the bar, formatter)
EXTRA = {
    "throughput/device/tokens_per_sec": ("tok/s", lambda v: f"{v:,.0f}"),
    "throughput/device/mfu": ("MFU", lambda v: f"{100 * v:.1f}%"),
    # RuntimeEstimator reports hours
    "time/remaining_estimate": ("ETA", lambda v: f"{int(v)}:{int(v * 60) % 60:02d}:{int(v * 3600) % 60:02d}"),
}


class TrainingProgressBar(ProgressBarLogger):
    def __init__(self, *args, **kwargs) -> None:
        compat.check("composer_progress_bar")  # its bars' private attributes, below
        super().__init__(*args, **kwargs)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, step)
        bar = self.train_pbar
        if bar is None or self.eval_pbar is not None:
            return
        extra = {label: fmt(metrics[key]) for key, (label, fmt) in EXTRA.items() if key in metrics}
        if extra:
            # First in the postfix: a bar in a log file is cut at 120 columns, losses come after.
            labels = [label for label, _ in EXTRA.values()]
            shown = {label: extra.get(label, bar.metrics.get(label)) for label in labels}
            rest = {k: v for k, v in bar.metrics.items() if k not in labels}
            bar.metrics.clear()
            bar.metrics.update({k: v for k, v in shown.items() if v is not None} | rest)
            bar.pbar.set_postfix(bar.metrics)
