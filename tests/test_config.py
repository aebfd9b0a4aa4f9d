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
        ("model.d_modle=64", r"did you mean 'd_model'"),  # two letters swapped
        ("global_train_batch_size=abc", r"'global_train_batch_size' must be an integer"),
        ("optimizer.name=adam", r"'optimizer.name' must be one of .*decoupled_adamw"),
        ("max_duration=ten", r"'max_duration' must be a Composer time string"),
        # Composer's own parser reads every time string: whole counts, no negative, no wall-clock units.
        (
            "max_duration=1.5ba",
            r"'max_duration' must be a Composer time string such as '100ba'.*; got '1.5ba'",
        ),
        ("save_interval=-5ba", r"'save_interval' must be a Composer time string"),
        ("eval_interval=2h", r"'eval_interval' must be a Composer time string"),
        (
            "console_log_interval=10sp",
            r"'console_log_interval' must be a Composer time string such as '10ba' or '10ep'",
        ),
        ("console_log_interval=0ep", r"'console_log_interval' must be more than 0"),
        ("model.n_heads=5", r"'model.d_model' must be divisible by n_heads \(5\)"),
        ("fsdp_config.sharding_strategy=FULL", r"FULL_SHARD"),
        (
            "model.ffn_config.moe_loss_scope=step",
            r"'model.ffn_config.moe_loss_scope' must be one of 'microbatch'",
        ),
        ("model.ffn_config.moe_balance_tokens=all", r"'model.ffn_config.moe_balance_tokens' must be one of"),
        ("model.ffn_config.moe_z_loss_weight=-1", r"'model.ffn_config.moe_z_loss_weight' must be >= 0"),
        (
            "model.ffn_config.moe_bias_update_rate=-0.1",
            r"'model.ffn_config.moe_bias_update_rate' must be >= 0",
        ),
        (
            "model.attn_config.attn_uses_sequence_id=maybe",
            r"'model.attn_config.attn_uses_sequence_id' must be true",
        ),
        (
            "callbacks.expert_load.imbalance_rise=x",
            r"'callbacks.expert_load.imbalance_rise' must be a number",
        ),
        ("precision=bf16", r"'precision' must be one of .*'amp_bf16'"),
    ],
)
def test_bad_values_are_named(override, expected):
    with pytest.raises(ConfigError, match=expected):
        load_config(TINY, [override])


def test_main_keys_pass_the_converter_and_the_foundry_table():
    """Router balancing, document masking, bf16, run safety and HF export keys are ours: typed, and
    not taken for Foundry's (attn_uses_sequence_id is no MPT key here, eos_token_id is not dropped)."""
    cfg = load_config(
        TINY,
        [
            "model.ffn_config.moe_loss_scope=global",
            "model.ffn_config.moe_balance_tokens=targets",
            "model.ffn_config.moe_z_loss_weight=0",
            "model.ffn_config.moe_bias_update_rate=0.001",
            "model.attn_config.attn_uses_sequence_id=false",
            "train_loader.dataset.eos_token_id=100257",
            "callbacks.expert_load.imbalance_window=50",
            "callbacks.hf_export={drop_expert_bias: true}",
            "precision=amp_bf16",
            "save_overwrite=runs/old",
        ],
    )
    ffn = cfg.model.dbrx.ffn_config
    assert (ffn.moe_loss_scope, ffn.moe_balance_tokens, ffn.moe_bias_update_rate) == (
        "global",
        "targets",
        0.001,
    )
    assert ffn.moe_z_loss_weight == 0.0 and isinstance(ffn.moe_z_loss_weight, float)
    assert cfg.model.dbrx.attn_config.attn_uses_sequence_id is False
    assert cfg.train_loader.dataset.eos_token_id == 100257
    assert cfg.callbacks.expert_load.imbalance_window == 50 and cfg.callbacks.hf_export.drop_expert_bias
    assert (cfg.precision, cfg.save_overwrite) == ("amp_bf16", "runs/old")


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
    assert (layout.device_train_batch_size, layout.device_train_microbatch_size, layout.notes) == (8, 4, ())
    with pytest.raises(ConfigError, match=r"not divisible by the world size 3"):
        batch_layout(cfg, world_size=3)
    cfg = load_config(TINY, ["global_train_batch_size=12", "device_train_microbatch_size=4"])
    with pytest.raises(ConfigError, match=r"6 samples per device .* device_train_microbatch_size=4"):
        batch_layout(cfg, world_size=2)


def test_microbatch_larger_than_the_device_batch_and_auto_are_composers():
    """As LLM Foundry and Composer: a microbatch above the device batch becomes the device batch
    (one warning); `auto` is Composer's automatic microbatching on GPU and the whole device batch on CPU."""
    cfg = load_config(TINY)  # global 16, microbatch 16: on 2 ranks each gets 8
    layout = batch_layout(cfg, world_size=2)
    assert layout.device_train_microbatch_size == 8
    [note] = layout.notes
    assert (
        "device_train_microbatch_size=16 is more than the 8 samples" in note and "microbatches of 8" in note
    )
    auto = load_config(TINY, ["device_train_microbatch_size=auto"])
    assert batch_layout(auto, world_size=2, device="cpu").device_train_microbatch_size == 8
    assert batch_layout(auto, world_size=2, device="gpu").device_train_microbatch_size == "auto"
    with pytest.raises(
        ConfigError, match=r"'device_train_microbatch_size' must be an integer, 'auto' or null; got 'big'"
    ):
        load_config(TINY, ["device_train_microbatch_size=big"])


def test_every_problem_of_a_config_is_listed_in_one_error():
    """Unknown keys, wrong types and bad values anywhere in the file, each with its dotted path, in
    one message; hints never offer a key of another meaning; Foundry's renames come first."""
    overrides = [
        "optimizer.learning_rate=1",
        "model.ffn_config.moe_top_k=99",
        "model.attn_config.kv_heads=2",
        "train_loader.dataset.shuffle=maybe",
        "save_weights_only=true",
        "peft_config={r: 4}",
        "device_train_batch_size=8",
        "max_duration=ten",
    ]
    with pytest.raises(ConfigError) as raised:
        load_config(TINY, overrides)
    message = str(raised.value)
    assert message.startswith(f"{TINY}: 8 problems:\n"), message
    lines = raised.value.problems
    assert len(lines) == 8 and len(message.splitlines()) == 9
    expect = [
        "unknown config key 'optimizer.learning_rate' (did you mean 'lr'?)",
        "config key 'model.ffn_config.moe_top_k' must be in [1, moe_num_experts=16]; got 99",
        "unknown config key 'model.attn_config.kv_heads' (did you mean 'kv_n_heads'?); valid keys under "
        "'model.attn_config': attn_pdrop, attn_uses_sequence_id, clip_qkv, kv_n_heads, rope_theta",
        "config key 'train_loader.dataset.shuffle' must be true or false; got 'maybe'",
        "config key 'save_weights_only' (LLM Foundry) is not supported here: checkpoints always hold the whole",
        "unknown config key 'peft_config'; valid keys:",  # not 'ffn_config' or anything else
        "config key 'device_train_batch_size' (LLM Foundry) is not supported here: set global_train_batch_size",
        "config key 'max_duration' must be a Composer time string",
    ]
    for text in expect:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert "did you mean 'load_weights_only'" not in message and "did you mean 'ffn_config'" not in message


def test_nested_model_errors_keep_the_model_prefix_and_the_valid_keys():
    with pytest.raises(ConfigError) as raised:
        load_config(TINY, ["model.n_layer=2"])
    assert str(raised.value) == (
        f"{TINY}: unknown config key 'model.n_layer' (did you mean 'n_layers'?); valid keys under 'model': "
        "attn_config, d_model, emb_pdrop, ffn_config, init_device, initializer_range, max_seq_len, n_heads, "
        "n_layers, name, output_router_logits, peft_config, pretrained, resid_pdrop, tie_word_embeddings, vocab_size"
    )


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
