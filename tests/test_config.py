"""The run config: YAML + overrides -> TrainConfig, and every error names the key."""

from pathlib import Path

import pytest
import yaml

from dbrx_train.config.run import batch_layout, load_config, parse_config, resolved_dict
from dbrx_train.config.schema import ConfigError
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.stats import count_params

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls/pretrain/dbrx-tiny.yaml"
BIG = ROOT / "yamls/pretrain/dbrx-132b.yaml"


def tiny_dict() -> dict:
    return yaml.safe_load(TINY.read_text())


def test_shipped_yamls_validate():
    tiny = load_config(TINY)
    assert tiny.model.dbrx.ffn_config.moe_num_experts == 16
    assert tiny.model.dbrx.ffn_config.moe_top_k == 4
    assert tiny.model.dbrx.max_seq_len == tiny.max_seq_len == 128  # model inherits top-level max_seq_len
    assert tiny.train_loader.dataset.streams["prose"].local == "data/default/prose"  # ${variables} resolved
    big = load_config(BIG)
    assert big.model.dbrx.d_model == 6144 and big.model.dbrx.max_seq_len == 32768
    assert big.fsdp is not None and big.fsdp.sharding_strategy == "HYBRID_SHARD"


def test_132b_builds_on_meta_with_dbrx_sizes():
    cfg = load_config(BIG)
    import torch

    with torch.device("meta"):
        model = DbrxForCausalLM(cfg.model.dbrx)
    total = sum(p.numel() for p in model.parameters())
    counts = count_params(cfg.model.dbrx)
    assert total == counts.total
    assert abs(counts.total / 131.6e9 - 1) < 0.005
    assert abs(counts.active / 36.5e9 - 1) < 0.01


def test_cli_overrides_apply_and_are_typed():
    cfg = load_config(TINY, ["optimizer.lr=1e-3", "model.ffn_config.moe_top_k=2", "max_duration=3ba"])
    assert cfg.optimizer.lr == 1e-3
    assert cfg.model.dbrx.ffn_config.moe_top_k == 2
    assert cfg.max_duration == "3ba"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("optimizer.learning_rate=1", r"unknown config key 'optimizer.learning_rate'"),
        ("max_durration=3ba", r"did you mean 'max_duration'"),
        ("model.ffn_config.moe_topk=2", r"moe_top_k"),
        ("global_train_batch_size=abc", r"'global_train_batch_size' must be an integer"),
        ("optimizer.name=adam", r"'optimizer.name' must be one of .*decoupled_adamw"),
        ("max_duration=ten", r"'max_duration' must be a Composer time string"),
        ("model.n_heads=5", r"n_heads"),
        ("fsdp_config.sharding_strategy=FULL", r"FULL_SHARD"),
    ],
)
def test_bad_values_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY, [override])


def test_errors_name_the_file_and_missing_keys(tmp_path):
    data = tiny_dict()
    del data["max_duration"]
    path = tmp_path / "no-duration.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"no-duration.yaml.*missing required config key 'max_duration'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"does not exist"):
        load_config(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: {d_model: 64\nseed: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml.*not valid YAML"):
        load_config(broken)
    with pytest.raises(ConfigError, match=r"key=value"):
        load_config(TINY, ["seed"])


def test_batch_layout_divisibility():
    cfg = load_config(TINY, ["global_train_batch_size=16", "device_train_microbatch_size=4"])
    layout = batch_layout(cfg, world_size=2)
    assert (layout.device_train_batch_size, layout.device_train_microbatch_size, layout.grad_accum) == (
        8,
        4,
        2,
    )
    with pytest.raises(ConfigError, match=r"not divisible by the world size 3"):
        batch_layout(cfg, world_size=3)
    cfg = load_config(TINY, ["global_train_batch_size=12", "device_train_microbatch_size=4"])
    with pytest.raises(ConfigError, match=r"6 samples per device .* device_train_microbatch_size=4"):
        batch_layout(cfg, world_size=2)


def test_model_seq_len_must_cover_training_seq_len():
    with pytest.raises(ConfigError, match=r"model.max_seq_len \(64\) is smaller"):
        load_config(TINY, ["model.max_seq_len=64"])


def test_resolved_dict_round_trips():
    cfg = load_config(TINY)
    again = parse_config(resolved_dict(cfg))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "yamls").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yamls_continue_when_run_again_and_never_overwrite(path):
    """The same command after an interruption continues the run; no shipped default deletes one."""
    raw = yaml.safe_load(path.read_text())
    assert raw.get("autoresume") is True and raw.get("run_name"), path
    assert raw.get("save_overwrite", False) is False, path
