"""HF DBRX folders shaped like databricks/dbrx-instruct: its config.json as published (tests/fixtures),
and tiny models whose config.json carries the same keys (HF-only ones, `moe_jitter_eps: 0`) with small sizes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.hf import CONFIG_FILE, read_hf_config, save_pretrained

PUBLISHED = Path(__file__).resolve().parents[1] / "fixtures" / "dbrx-instruct"

# The tiny sizes the e2e tests use (dbrx-tiny's shape at d_model 64: 16 experts top-4, GQA, clip_qkv).
TINY_SIZES = {
    "d_model": 64,
    "n_heads": 4,
    "n_layers": 2,
    "max_seq_len": 128,
    "attn_config": {"kv_n_heads": 2},
    "ffn_config": {"ffn_hidden_size": 64},
}


def published_config() -> dict:
    return json.loads((PUBLISHED / CONFIG_FILE).read_text())


def tiny_instruct_folder(folder: Path, seed: int = 0, **sizes) -> Path:
    """Random tiny weights under a config.json with every key of the published one."""
    config = published_config()
    for key, value in {**TINY_SIZES, **sizes}.items():
        if isinstance(value, dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = DbrxForCausalLM(read_hf_config(folder))
    save_pretrained(model, folder, dtype=torch.float32, tokenizer=False)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))  # as published: HF-only keys included
    return folder
