"""LLM Foundry's YAMLs as they are: its DBRX fine-tune files (our own copies in its shape, tests/foundry/)
validate, size the 132B model and pass every pre-run check; renamed keys are translated and said
once, keys with no effect are listed in one line, a model that is not DBRX is refused in one line."""

import importlib.util
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from dbrx_train.config.foundry import FOUNDRY_KEYS, expanded_keys
from dbrx_train.config.run import TrainConfig, batch_layout, load_config, parse_config
from dbrx_train.config.schema import ConfigError, has_key
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.hf import save_pretrained
from dbrx_train.training.preflight import check_config
from tests.launches import run_training

ROOT = Path(__file__).resolve().parents[1]
FULL, LORA = ROOT / "tests/foundry/dbrx-full-ft.yaml", ROOT / "tests/foundry/dbrx-lora-ft.yaml"
TINY = ROOT / "yamls/pretrain/dbrx-tiny.yaml"
# config.json of databricks/dbrx-instruct (the 132B model), as the Hub ships it
DBRX_INSTRUCT = {
    "architectures": ["DbrxForCausalLM"],
    "attn_config": {"clip_qkv": 8, "kv_n_heads": 8, "model_type": "", "rope_theta": 500000},
    "d_model": 6144,
    "ffn_config": {
        "ffn_hidden_size": 10752,
        "model_type": "",
        "moe_jitter_eps": 0.01,
        "moe_loss_weight": 0.05,
        "moe_num_experts": 16,
        "moe_top_k": 4,
    },
    "max_seq_len": 32768,
    "model_type": "dbrx",
    "n_heads": 48,
    "n_layers": 40,
    "torch_dtype": "bfloat16",
    "vocab_size": 100352,
}


def model_stats():
    spec = importlib.util.spec_from_file_location("model_stats", ROOT / "scripts/model_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A local copy shaped as the Hub's dolly_hhrlhf: data/{train,test}-00000-of-00001.parquet."""
    folder = tmp_path_factory.mktemp("dolly")
    (folder / "data").mkdir()
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(40)]
    pq.write_table(pa.Table.from_pylist(rows[:32]), folder / "data/train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[32:]), folder / "data/test-00000-of-00001.parquet")
    return folder


@pytest.fixture(scope="module")
def dbrx_132b(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dbrx-instruct")
    (folder / "config.json").write_text(json.dumps(DBRX_INSTRUCT))
    return folder


def paths(model_dir: Path, data_dir: Path, cache: Path) -> list[str]:
    return [
        f"variables.model_dir={model_dir}",
        f"variables.data_dir={data_dir}",
        f"train_loader.dataset.cache_dir={cache}",
        f"eval_loader.dataset.cache_dir={cache}",
    ]


def test_foundry_dbrx_full_ft_yaml_validates_and_sizes_the_132b_model(dbrx_132b, data_dir, tmp_path):
    cfg = load_config(FULL, paths(dbrx_132b, data_dir, tmp_path))
    assert cfg.model.pretrained == str(dbrx_132b) and cfg.model.init_device == "mixed"
    assert (cfg.model.dbrx.d_model, cfg.model.dbrx.n_layers, cfg.model.dbrx.ffn_config.moe_top_k) == (
        6144,
        40,
        4,
    )
    assert cfg.tokenizer.name == "dbrx" and cfg.optimizer.name == "decoupled_lionw"
    hf = cfg.callbacks.hf_export
    assert (hf.folder, hf.dtype, hf.save_interval) == ("./{run_name}/checkpoints/huggingface", "bf16", "1dur")
    assert cfg.train_loader.dataset.packing_ratio == "auto" and cfg.eval_loader.dataset.split == "test"
    renamed, ignored = cfg.foundry.notes()
    assert renamed.startswith(
        "LLM Foundry keys translated: model.pretrained_model_name_or_path -> model.pretrained"
    )
    assert "callbacks.hf_checkpointer -> callbacks.hf_export" in renamed
    for key in (
        "fsdp_config.limit_all_gathers",
        "expandable_segments",
        "model.use_flash_attention_2",
        "train_loader.dataset.eos_token_id",  # Foundry's collator does not use it either
    ):
        assert key in ignored
    assert cfg.icl_seq_len == 1024 and "icl_seq_len" not in ignored  # ICL evaluation's key: honoured
    assert batch_layout(cfg, 64, "gpu").device_train_batch_size == 1
    stats = model_stats().stats(str(FULL), paths(dbrx_132b, data_dir, tmp_path), 64)
    assert (
        abs(stats["total_params"] / 131.6e9 - 1) < 0.005 and abs(stats["active_params"] / 36.5e9 - 1) < 0.01
    )


def test_foundry_dbrx_lora_ft_yaml_validates(dbrx_132b, data_dir, tmp_path):
    cfg = load_config(LORA, paths(dbrx_132b, data_dir, tmp_path))
    assert cfg.model.peft_config is not None and cfg.optimizer.lr == 1e-4
    stats = model_stats().stats(str(LORA), paths(dbrx_132b, data_dir, tmp_path), 16)
    assert abs(stats["total_params"] / 131.6e9 - 1) < 0.005
    assert stats["fine_tuning"] == "lora" and 0 < stats["trainable_fraction"] < 0.01, stats


@pytest.fixture(scope="module")
def tiny_dbrx(tmp_path_factory) -> Path:
    """A small real HF DBRX folder (weights and all), for the checks and the launch that read weights."""
    cfg = load_config(TINY, ["model.d_model=64", "model.ffn_config.ffn_hidden_size=64", "max_seq_len=128"])
    folder = tmp_path_factory.mktemp("tiny-dbrx")
    save_pretrained(DbrxForCausalLM(cfg.model.dbrx).eval(), folder, tokenizer=False)
    return folder


def small(tmp_path: Path, tiny: Path, data_dir: Path) -> list[str]:
    """The full-ft YAML with only paths, sizes and a CPU's precision changed."""
    return [
        *paths(tiny, data_dir, tmp_path / "cache"),
        "variables.max_seq_len=128",
        "global_train_batch_size=4",
        "device_train_microbatch_size=2",
        "device_eval_batch_size=2",
        "max_duration=2ba",
        "precision=fp32",
        "train_loader.num_workers=0",
        "train_loader.prefetch_factor=null",
        "train_loader.persistent_workers=false",
        "eval_loader.num_workers=0",
        "eval_loader.prefetch_factor=null",
        "eval_loader.persistent_workers=false",
        f"callbacks.hf_checkpointer.save_folder={tmp_path / 'run'}",
        f"save_folder={tmp_path / 'run'}",
    ]


def test_foundry_yaml_passes_every_pre_run_check(tiny_dbrx, data_dir, tmp_path):
    """What a launch checks before it starts (weights, data tokenized from the parquet files, FSDP...)."""
    cfg = load_config(FULL, small(tmp_path, tiny_dbrx, data_dir))
    check_config(cfg, "cpu", 2)
    assert len(list((tmp_path / "cache" / "finetuning").glob("*/index.json"))) == 2  # train and test


@pytest.mark.slow
def test_foundry_yaml_trains_on_two_ranks_from_parquet_files(tiny_dbrx, data_dir, tmp_path):
    """A real 2-rank launch: rank 0 tokenizes each split once, the translation is said once, the run
    trains and writes the HF export where Foundry's hf_checkpointer would (save_folder/huggingface)."""
    proc = run_training(2, [str(FULL), *small(tmp_path, tiny_dbrx, data_dir), "run_name=foundry-ft"])
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert output.count("tokenizing 1 file(s)") == 2, output[-6000:]  # train and test, by local rank 0 only
    assert output.count("LLM Foundry keys translated") == 1 and output.count("(ignored)") == 1
    assert "[batch 2/2] loss " in output and "[eval @ batch 2] eval loss " in output, output[-5000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["batch"] for r in rows}) == [1, 2]
    assert (tmp_path / "run" / "huggingface" / "ba2" / "config.json").is_file()


def foundry_mpt(**model) -> dict:
    """Foundry's pretrain/testing.yaml's shape."""
    data = yaml.safe_load(TINY.read_text())
    data["model"] = {"name": "mpt_causal_lm", "d_model": 128, "n_heads": 2, "expansion_ratio": 4, **model}
    data["tokenizer"] = {"name": "EleutherAI/gpt-neox-20b", "kwargs": {"model_max_length": 128}}
    return data


def test_a_model_that_is_not_dbrx_is_refused_in_one_line():
    for data in (
        foundry_mpt(),
        {**foundry_mpt(), "model": {"name": "dbrx", "expansion_ratio": 4}},
        {
            **foundry_mpt(),
            "model": {
                "name": "hf_causal_lm",
                "pretrained": True,
                "pretrained_model_name_or_path": "mosaicml/mpt-7b",
            },
        },
    ):
        with pytest.raises(ConfigError) as raised:
            parse_config(data)
        [line] = raised.value.problems
        assert "this framework trains DBRX" in line, line


def test_renamed_and_unsupported_foundry_keys():
    data = yaml.safe_load(TINY.read_text())
    data["model"]["ffn_config"]["moe_world_size"] = 2
    data["callbacks"]["speed_monitor"]["gpu_flops_available"] = 1.0e12
    data["tokenizer"] = {"name": "databricks/dbrx-instruct", "kwargs": {"model_max_length": 128}}
    data["fsdp_config"]["sync_module_states"] = True
    cfg = parse_config(data)
    assert cfg.fsdp_config.expert_parallel_degree == 2
    assert cfg.callbacks.speed_monitor.peak_flops == 1.0e12 and cfg.tokenizer.name == "dbrx"
    renamed, ignored = cfg.foundry.notes()
    assert "model.ffn_config.moe_world_size -> fsdp_config.expert_parallel_degree" in renamed
    assert ignored == (
        "warning: LLM Foundry keys with no effect here (ignored): tokenizer.kwargs.model_max_length, "
        "fsdp_config.sync_module_states"
    )
    data = yaml.safe_load(TINY.read_text())
    data["model"] = {
        "name": "hf_causal_lm",
        "pretrained": True,
        "pretrained_model_name_or_path": "databricks/dbrx-instruct",
    }
    data.update(save_weights_only=False, load_strict_model_weights=True)  # Foundry's defaults: no effect
    data["tp_config"] = {"strategy": "ffn", "tensor_parallel_degree": 2}
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    assert raised.value.problems == [
        "config key 'model.pretrained_model_name_or_path' is 'databricks/dbrx-instruct', a Hugging Face Hub id, "
        "and nothing is downloaded here: download it where the hub is reachable (`huggingface-cli download "
        "databricks/dbrx-instruct --local-dir DIR`) and give the local DIR",
        "config key 'tp_config' (LLM Foundry) is not supported here: no tensor parallelism: use FSDP (fsdp_config) "
        "and expert_parallel_degree",
    ]


def test_foundry_curriculum_learning_becomes_a_curriculum_or_shows_the_equivalent():
    data = yaml.safe_load(TINY.read_text())
    del data["curriculum"]
    streams = data["train_loader"]["dataset"]["streams"]
    data["train_loader"]["dataset"]["streams"] = {
        "prose": {**streams["prose"], "proportion": 0.8},
        "code": {**streams["code"], "proportion": 0.2},
    }
    swap = {"prose": {**streams["prose"], "proportion": 0.3}, "code": {**streams["code"], "proportion": 0.7}}
    data["max_duration"] = "100ba"
    data["callbacks"]["curriculum_learning"] = {
        "duration": "40ba",
        "schedule": [{"duration": "60ba", "dataset": {"streams": swap}}],
    }
    cfg = parse_config(data)
    phases = [(p.start, p.mix) for p in cfg.curriculum.phases]
    assert phases == [("0ba", {"prose": 0.8, "code": 0.2}), ("40ba", {"prose": 0.3, "code": 0.7})]
    assert all(s.proportion is None for s in cfg.train_loader.dataset.streams.values())
    data["callbacks"]["curriculum_learning"]["schedule"][0]["dataset"]["shuffle"] = False
    with pytest.raises(ConfigError) as raised:
        parse_config(data)
    [line] = raised.value.problems
    assert "cannot be translated (datamix 1 changes more than its streams (shuffle, streams))" in line
    assert '"curriculum": {"interpolation": "step", "phases": [{"start": "0ba"' in line


def test_the_foundry_table_agrees_with_the_schema():
    """`same` keys exist here; `ignored` and `unsupported` ones do not (else they would be dropped or
    refused while the schema means them); every outcome is one of the four."""
    for key, entry in expanded_keys().items():
        assert entry.outcome in ("same", "ignored", "renamed", "unsupported")
        if entry.outcome == "same" and not key.endswith(".dataset.max_seq_len"):
            assert has_key(TrainConfig, key), (
                key
            )  # (a dataset's max_seq_len must equal the run's: checked, dropped)
        if entry.outcome in ("ignored", "unsupported"):
            assert not has_key(TrainConfig, key), key
    assert len(FOUNDRY_KEYS) == len({e.key for e in FOUNDRY_KEYS})
