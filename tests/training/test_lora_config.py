"""The dbrx-instruct recipes against the published config.json, and model.peft_config's checks: one
line naming the key before anything starts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from dbrx_train.config.run import load_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.model.hf import read_hf_config
from dbrx_train.model.moe import route
from dbrx_train.training.preflight import check_config
from tests.training.dbrx_instruct_fixture import PUBLISHED, published_config, tiny_instruct_folder

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {
    "full": ROOT / "yamls/finetune/dbrx-instruct.yaml",
    "lora": ROOT / "yamls/finetune/dbrx-instruct-lora.yaml",
}


def model_stats():
    spec = importlib.util.spec_from_file_location("model_stats", ROOT / "scripts/model_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_published_config_json_is_accepted_as_published():
    raw = published_config()
    assert raw["ffn_config"]["moe_jitter_eps"] == 0 and raw["attn_config"]["model_type"] == ""
    config = read_hf_config(PUBLISHED)  # HF-only keys (architectures, auto_map, torch_dtype, ...) ignored
    assert (config.d_model, config.n_layers, config.n_heads, config.attn_config.kv_n_heads) == (
        6144,
        40,
        48,
        8,
    )
    ffn = config.ffn_config
    assert (ffn.moe_num_experts, ffn.moe_top_k, ffn.ffn_hidden_size, ffn.moe_loss_weight) == (
        16,
        4,
        10752,
        0.05,
    )
    # Keys it leaves out take transformers' DbrxConfig defaults.
    assert ffn.ffn_act_fn == {"name": "silu"} and ffn.moe_normalize_expert_weights == 1.0
    # jitter 0 means no jitter: the router's input is left alone in training.
    x, router = torch.randn(5, 8), torch.randn(4, 8)
    torch.testing.assert_close(route(x, router, 2, jitter_eps=0).logits_NE, x @ router.t(), atol=0, rtol=0)


def test_the_recipes_size_the_published_model(capsys):
    stats = model_stats()
    sizes = {
        kind: stats.stats(str(y), [f"model.pretrained={PUBLISHED}"], 8, fit_gb=80)
        for kind, y in RECIPES.items()
    }
    for result in sizes.values():
        assert abs(result["total_params"] / 131.6e9 - 1) < 0.0005
        assert abs(result["active_params"] / 36.5e9 - 1) < 0.001
    assert sizes["full"]["trainable_params"] == sizes["full"]["total_params"]
    assert sizes["lora"]["fine_tuning"] == "lora" and sizes["lora"]["trainable_fraction"] < 0.01
    # What the README and the recipes' comments state: the fewest 8x80 GB nodes at 4k context.
    assert sizes["full"]["seq_len"] == sizes["lora"]["seq_len"] == 4096
    assert (sizes["full"]["fit"]["nodes"], sizes["lora"]["fit"]["nodes"]) == (5, 1)
    assert sizes["full"]["fit"]["batch_divides"] and sizes["lora"]["fit"]["batch_divides"]
    for kind, recipe in RECIPES.items():
        nodes = sizes[kind]["fit"]["nodes"]
        assert f"fits {nodes} node{'s' if nodes > 1 else ''} of 8x80 GB" in recipe.read_text()
    readme = (ROOT / "README.md").read_text()
    assert "| full fine-tune | 5 nodes" in readme and "| LoRA | 1 node" in readme
    # LoRA's frozen base in bf16, adapters + optimizer state fp32: well under half the full budget per GPU.
    assert (
        sizes["lora"]["memory_per_gpu_bytes"]["total"] < 0.4 * sizes["full"]["memory_per_gpu_bytes"]["total"]
    )
    stats.main([str(RECIPES["lora"]), f"model.pretrained={PUBLISHED}", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["trainable_params"] == sizes["lora"]["trainable_params"]


@pytest.mark.parametrize(
    ("peft_config", "message"),
    [
        ("{target_modules: [Wqkv, out_prj]}", "unknown target 'out_prj' (did you mean 'out_proj'?)"),
        ("{target_modules: [Wqkv], r: 0}", "r must be a positive rank; got 0"),
        ("{target_modules: []}", "target_modules is empty: with a frozen base LoRA would train nothing"),
        ("{target_modules: [Wqkv], peft_type: IA3}", "peft_type must be LORA"),
        ("{r: 8}", "missing required config key 'model.peft_config.target_modules'"),
    ],
)
def test_bad_peft_config_is_one_line_naming_the_key(peft_config, message):
    with pytest.raises(ConfigError) as error:
        load_config(RECIPES["full"], [f"model.pretrained={PUBLISHED}", f"model.peft_config={peft_config}"])
    assert message in str(error.value) and "model.peft_config" in str(error.value)


def test_foundry_keys_are_accepted():
    cfg = load_config(RECIPES["lora"], [f"model.pretrained={PUBLISHED}"])
    peft = cfg.model.peft_config
    assert (peft.peft_type, peft.task_type, peft.r, peft.lora_alpha) == ("LORA", "CAUSAL_LM", 16, 32.0)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return tiny_instruct_folder(tmp_path_factory.mktemp("base") / "base")


@pytest.mark.parametrize(
    ("overrides", "world_size", "message"),
    [
        (
            ["model.pretrained=null", "model.d_model=64"],
            1,
            "model.peft_config trains adapters on a frozen base",
        ),
        (
            ["model.init_device=cpu", "fsdp_config.expert_parallel_degree=2"],
            2,
            "fsdp_config.expert_parallel_degree does not work with model.peft_config",
        ),
        (
            ["model.init_device=meta"],
            2,
            "model.init_device: meta does not work with model.peft_config (LoRA) yet",
        ),
        (
            ["callbacks.hf_export.adapters=peft"],
            1,
            "callbacks.hf_export.adapters: peft: a PEFT adapter folder cannot",
        ),
    ],
)
def test_lora_runs_that_cannot_work_are_refused_before_starting(tiny_base, overrides, world_size, message):
    cfg = load_config(RECIPES["lora"], [f"model.pretrained={tiny_base}", "max_seq_len=64", *overrides])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_config(cfg, "cpu", world_size)
