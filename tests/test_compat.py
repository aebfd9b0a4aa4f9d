"""dbrx_train/compat.py: every private patch's guard, and, for each, that the upstream behaviour it
assumes (or the bug it works around) is still there on the pinned versions. A failure here after an
upgrade says which patch to recheck before widening its `verified` versions."""

from __future__ import annotations

import inspect
import io
import pickle

import numpy as np
import pytest
import torch

from dbrx_train import compat


@pytest.mark.parametrize("name", sorted(compat.PATCHES))
def test_every_patch_is_verified_on_the_installed_versions(name):
    patch = compat.check(name)
    assert patch.user.startswith("dbrx_train/") and patch.why


def test_another_version_stops_with_one_line_naming_the_patch(monkeypatch):
    monkeypatch.setattr(compat, "_installed", lambda package: "99.0")
    with pytest.raises(compat.CompatError) as error:
        compat.check("fsdp2_gloo_average")
    message = str(error.value)
    assert "\n" not in message
    for part in ("torch 99.0", "fsdp2_gloo_average", "_get_gradient_divide_factors", "torch==2.7.0"):
        assert part in message, message
    owner = type("Owner", (), {"f": staticmethod(len)})
    with pytest.raises(compat.CompatError):
        compat.replace("fsdp2_gloo_average", owner, "f", abs)
    assert owner.f is len  # nothing replaced


def test_replace_is_idempotent_and_swapped_restores():
    owner = type("Owner", (), {"f": staticmethod(len)})

    def first(x):
        return 1

    def second(x):
        return 2

    assert compat.replace("fsdp2_gloo_average", owner, "f", first) is len
    assert compat.replace("fsdp2_gloo_average", owner, "f", second) is len  # the first one stays
    assert owner.f is first
    with compat.swapped("fsdp2_gloo_average", owner, f=second):
        assert owner.f is second
    assert owner.f is first


def test_fsdp2_divide_factors_use_avg_for_fp32_and_divide_around_sum_for_fp16():
    """The patch sends gloo groups down FSDP2's fp16 path: pre/post divide factors around a SUM,
    because for fp32 FSDP2 returns no factors and reduces with ReduceOp.AVG, which gloo lacks
    (tests/training/test_fsdp_gloo.py shows the 2-rank gradients are the mean with the patch)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as collectives

    original = getattr(
        collectives._get_gradient_divide_factors,
        "_dbrx_compat_original",
        collectives._get_gradient_divide_factors,
    )
    params = list(inspect.signature(original).parameters)
    assert params == ["reduce_scatter_group", "all_reduce_group", "reduce_dtype", "device_type"]
    group = type("Group", (), {"size": lambda self: 2})()
    assert original(group, None, torch.float32, "cpu") == (None, None)
    pre, post = original(group, None, torch.float16, "cpu")
    assert pre * post == 2


def test_dcp_unpickles_metadata_with_the_pickle_module_global():
    """restricted_loading swaps `filesystem.pickle`: DCP's read_metadata must still call
    `pickle.load` through that module global, and set storage_meta.load_id as our reader does."""
    from torch.distributed.checkpoint import FileSystemReader, filesystem

    assert filesystem.pickle is pickle
    source = inspect.getsource(FileSystemReader.read_metadata)
    assert "pickle.load(" in source and "load_id" in source


def test_dcp_metadata_can_run_code_without_the_restricted_reader(tmp_path):
    """The bug the restricted loading exists for: DCP's own reader executes a .metadata pickle."""
    from torch.distributed.checkpoint import FileSystemReader

    from dbrx_train.checkpoint.safe_load import SafeFileSystemReader
    from dbrx_train.checkpoint.store import CheckpointError

    ran = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(ran), "w"))

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Payload()))
    try:
        FileSystemReader(tmp_path).read_metadata()
    except Exception:  # noqa: BLE001, S110 (whatever DCP makes of the result: the code has run)
        pass
    assert ran.exists()
    ran.unlink()
    with pytest.raises((pickle.UnpicklingError, CheckpointError)):
        SafeFileSystemReader(tmp_path).read_metadata()
    assert not ran.exists()


def test_numpy_arrays_pickle_through_the_reconstruct_the_safe_list_names():
    from dbrx_train.checkpoint.safe_load import allowed_globals

    buffer = io.BytesIO()
    torch.save({"rng": np.arange(3, dtype=np.uint32)}, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(allowed_globals()):
        loaded = torch.load(buffer, weights_only=True)
    assert loaded["rng"].tolist() == [0, 1, 2]
    assert b"numpy._core.multiarray" in pickle.dumps(np.arange(3))


def test_streaming_builds_its_prefix_through_the_module_global_we_swap():
    import streaming.base.dataset as streaming_dataset
    from streaming.base.shared import prefix

    from dbrx_train.data.streaming_shm import register_shm_prefix

    source = inspect.getsource(streaming_dataset.StreamingDataset.__init__)
    assert "get_shm_prefix(" in source
    assert inspect.signature(register_shm_prefix).parameters.keys() == (
        inspect.signature(prefix.get_shm_prefix).parameters.keys()
    )
    for helper in ("_check_and_find_retrying", "_get_path", "_pack_locals", "_unpack_locals", "_check_self"):
        assert callable(getattr(prefix, helper)), helper


def test_composer_progress_bar_keeps_the_attributes_the_bar_uses(tmp_path):
    from composer.loggers.progress_bar_logger import _ProgressBar

    from dbrx_train.training.progress import TrainingProgressBar

    bar = TrainingProgressBar()
    assert bar.train_pbar is None and bar.eval_pbar is None
    file = open(tmp_path / "bar.txt", "w")  # noqa: SIM115 (a real file: Composer asks for its fileno)
    inner = _ProgressBar(4, 0, "{n}", file, {"loss": 1.0}, keys_to_log=[], timestamp_key="ba")
    assert inner.metrics == {"loss": 1.0} and hasattr(inner.pbar, "set_postfix")
    inner.pbar.set_postfix(inner.metrics)  # what TrainingProgressBar.log_metrics calls
    inner.close()
    file.close()


def test_composer_meta_init_allocates_on_cuda_only():
    """Per-shard loading replaces Composer's meta init, which is hard-coded to 'cuda'."""
    from composer.distributed import param_init, prepare_distributed

    assert "parallelize_composer_model" in dir(prepare_distributed)
    assert "'cuda'" in inspect.getsource(param_init.meta_init) or '"cuda"' in inspect.getsource(
        param_init.meta_init
    )
    assert prepare_distributed.meta_init in (
        param_init.meta_init,
        getattr(prepare_distributed.meta_init, "_dbrx_compat_original", None)
        and prepare_distributed.meta_init,
    )


def test_tiktoken_keeps_the_bpe_ranks_the_hf_export_reads():
    from dbrx_train.data.tokenizer import load_tokenizer

    ranks = load_tokenizer().encoding._mergeable_ranks
    assert len(ranks) == 100256 and ranks[b"!"] == 0


def test_flex_attention_block_mask_takes_the_private_compile_switch():
    from torch.nn.attention.flex_attention import create_block_mask

    assert "_compile" in inspect.signature(create_block_mask).parameters


def test_composer_refuses_amp_bf16_on_cpu_and_looks_its_precision_names_up_at_call_time():
    """training/cpu.py replaces these module globals: Composer's own check refuses amp_bf16 on CPU
    (when it stops, the patch can go), and the Trainer and FSDP2 path call them by module name."""
    from composer.core import Precision
    from composer.core.precision import _validate_precision
    from composer.devices import DeviceCPU
    from composer.distributed import prepare_distributed
    from composer.trainer import trainer

    with pytest.raises(ValueError, match="not supported for CPU training"):
        _validate_precision(Precision.AMP_BF16, DeviceCPU())
    assert "_validate_precision(" in inspect.getsource(trainer.Trainer.__init__)
    assert "get_precision_context(" in inspect.getsource(trainer.Trainer._train_microbatch)
    assert "_validate_precision(" in inspect.getsource(prepare_distributed)


def test_torch_reports_the_cpu_bf16_instructions():
    assert isinstance(torch.cpu._is_avx512_bf16_supported(), bool)
    assert isinstance(torch.cpu._is_amx_tile_supported(), bool)


def test_composer_env_dict_starts_a_cpuinfo_process_the_trainer_reads_two_keys_of(monkeypatch):
    import re
    import subprocess

    import composer.trainer.trainer as trainer_module
    from composer.utils import collect_env

    from dbrx_train.training.composer_env import skip_cpu_model_probe

    # What the Trainer reads of the dict: two keys, from a name it looks up at call time.
    source = inspect.getsource(trainer_module.Trainer.__init__)
    assert "composer_env_dict = get_composer_env_dict()" in source
    assert set(re.findall(r"composer_env_dict\['(\w+)'\]", source)) == {
        "composer_version",
        "composer_commit_hash",
    }
    started = []

    class Recorded(subprocess.Popen):  # the real Popen; the test only notes what it starts
        def __init__(self, args, *rest, **kwargs):
            started.append(list(args))
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", Recorded)
    collect_env.get_cpu_model.cache_clear()  # once per process: a Trainer of an earlier test asked
    upstream = collect_env.get_composer_env_dict()  # the bug the patch works around: a subprocess
    assert any(str(arg).endswith("cpuinfo.py") for args in started for arg in args), started
    started.clear()
    skip_cpu_model_probe()
    skip_cpu_model_probe()  # idempotent
    env = trainer_module.get_composer_env_dict()
    assert env == {key: upstream[key] for key in ("composer_version", "composer_commit_hash")}
    assert started == []
