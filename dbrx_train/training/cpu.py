"""`precision: amp_bf16` on CPU: does this CPU multiply bf16 natively, and make Composer run it.

Composer 0.32.1 refuses amp_bf16 on CPU (`_validate_precision`: "not supported for CPU training"),
and its `get_precision_context` enters no autocast for it there. Yet CPUs with AVX512-BF16 or AMX
multiply bf16 several times faster than fp32 (issue 21: 4.4x on the Zen 4 it was measured
on), and torch's CPU autocast runs matmuls in bf16 and keeps softmax, norms and losses in fp32 exactly
as CUDA autocast does. `enable_amp_bf16_on_cpu` lets Composer's own amp_bf16 path run on CPU: the
Trainer keeps `precision=amp_bf16` (so FSDP2's mixed-precision policy gathers bf16 parameters and
reduces fp32 gradients, as on GPUs, and checkpoints record amp_bf16), and its forward, loss and eval
run under `torch.autocast("cpu", dtype=torch.bfloat16)`.
"""

from __future__ import annotations

import contextlib

import torch

from dbrx_train import compat


def native_bf16_matmul() -> bool:
    """True when this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX) that torch's
    oneDNN GEMMs use; without them bf16 matmuls are emulated and slower than fp32."""
    compat.check("torch_cpu_bf16_isa")
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def enable_amp_bf16_on_cpu() -> None:
    """Make Composer 0.32.1's Trainer accept amp_bf16 on CPU and run it under CPU autocast.

    Patches the two names Composer's FSDP2 path and Trainer look up at call time: the precision check
    (in `composer.trainer.trainer` and `composer.distributed.prepare_distributed`) and the precision
    context (in `composer.trainer.trainer`: train forward, loss, eval). Other precisions and devices
    keep Composer's own behaviour. Idempotent; call it only for a CPU run.
    """
    import composer.distributed.prepare_distributed as prepare_distributed
    import composer.trainer.trainer as trainer_module
    from composer.core import Precision
    from composer.devices import DeviceCPU

    def validate_precision(precision, device) -> None:
        if Precision(precision) == Precision.AMP_BF16 and isinstance(device, DeviceCPU):
            return
        validate(precision, device)

    @contextlib.contextmanager
    def cpu_precision_context(precision, precision_config=None, fp8_autocast_enabled=True):
        if Precision(precision) == Precision.AMP_BF16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                yield
        else:
            with precision_context(precision, precision_config, fp8_autocast_enabled):
                yield

    name = "composer_cpu_amp_bf16"
    validate = compat.replace(name, trainer_module, "_validate_precision", validate_precision)
    compat.replace(name, prepare_distributed, "_validate_precision", validate_precision)
    precision_context = compat.replace(name, trainer_module, "get_precision_context", cpu_precision_context)
