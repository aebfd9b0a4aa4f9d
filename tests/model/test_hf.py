"""HF interoperability: our folders load in transformers and back, logits equal both ways; the
exported tokenizer equals our tiktoken tokenizer id for id; folder errors name the file/key."""

from __future__ import annotations

import json
import pydoc_data.topics
import warnings

import pytest
import torch
import transformers

from dbrx_train.data.chat import render_chat
from dbrx_train.data.tokenizer import load_tokenizer
from dbrx_train.model import DbrxConfig, DbrxForCausalLM
from dbrx_train.model.hf import (
    INDEX_FILE,
    SINGLE_FILE,
    check_hf_folder,
    load_pretrained,
    read_hf_config,
    save_pretrained,
)

V = 512
CASES = {
    # (kv_n_heads, clip_qkv, top_k, normalize p, act)
    "gqa-clip-top2-p1": (2, 0.5, 2, 1.0, "silu"),
    "mha-noclip-top1-p2": (4, None, 1, 2.0, "silu"),
    "mqa-clip-top4-p2-gelu": (1, 0.3, 4, 2.0, "gelu"),
    "gqa-noclip-top4-nonorm": (2, None, 4, None, "silu"),
}


def config_for(case: str) -> DbrxConfig:
    kv, clip, top_k, p, act = CASES[case]
    return DbrxConfig.from_dict(
        {
            "d_model": 64,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 64,
            "vocab_size": V,
            "attn_config": {"kv_n_heads": kv, "clip_qkv": clip, "rope_theta": 5000.0},
            "ffn_config": {
                "ffn_hidden_size": 48,
                "moe_num_experts": 4,
                "moe_top_k": top_k,
                "moe_normalize_expert_weights": p,
                "ffn_act_fn": {"name": act},
            },
        }
    )


def tokens(B=2, T=24, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_load(folder) -> transformers.PreTrainedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any loading warning fails the test
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True
        )
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []
    assert type(model).__name__ == "DbrxForCausalLM"
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_hf_and_back_logits_equal(case, tmp_path):
    torch.manual_seed(0)
    ours = DbrxForCausalLM(config_for(case)).eval()
    with torch.no_grad():  # make clip_qkv bite
        for block in ours.transformer.blocks:
            block.norm_attn_norm.attn.Wqkv.weight.mul_(10)
    # Small shards: the sharded layout with an index is exercised on every case.
    save_pretrained(ours, tmp_path, max_shard_bytes=200_000, tokenizer=False)
    assert (tmp_path / INDEX_FILE).is_file() and not (tmp_path / SINGLE_FILE).exists()
    hf = hf_load(tmp_path)
    x = tokens()
    with torch.no_grad():
        diff = max_diff(ours(x).logits, hf(x).logits)
        assert diff <= 1e-4, diff
        back = load_pretrained(tmp_path)
        assert max_diff(back(x).logits, ours(x).logits) == 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_ours_logits_equal(case, tmp_path):
    torch.manual_seed(1)
    hf_config = transformers.DbrxConfig(**config_for(case).to_hf_dict())
    hf = transformers.DbrxForCausalLM(hf_config).eval()
    hf.save_pretrained(tmp_path)  # transformers' own single-file layout
    assert (tmp_path / SINGLE_FILE).is_file()
    ours = load_pretrained(tmp_path).eval()
    assert ours.config.to_hf_dict() == config_for(case).to_hf_dict()
    x = tokens(seed=3)
    with torch.no_grad():
        diff = max_diff(ours(x).logits, hf(x).logits)
    assert diff <= 1e-4, diff


def test_bf16_export_and_single_file(tmp_path):
    ours = DbrxForCausalLM(config_for("gqa-clip-top2-p1"))
    save_pretrained(ours, tmp_path, dtype=torch.bfloat16, tokenizer=False)
    assert (tmp_path / SINGLE_FILE).is_file() and not (tmp_path / INDEX_FILE).exists()
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = load_pretrained(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values(), strict=False):
        torch.testing.assert_close(b, a.to(torch.bfloat16).float(), atol=0, rtol=0, msg=name)


def test_tied_embeddings_cannot_be_exported(tmp_path):
    config = config_for("gqa-clip-top2-p1")
    config.tie_word_embeddings = True
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        save_pretrained(DbrxForCausalLM(config), tmp_path, tokenizer=False)


def test_folder_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        check_hf_folder(tmp_path)
    model = DbrxForCausalLM(config_for("gqa-clip-top2-p1"))
    save_pretrained(model, tmp_path, max_shard_bytes=200_000, tokenizer=False)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / shard).rename(tmp_path / "moved.bin")
    with pytest.raises(FileNotFoundError, match=shard):
        check_hf_folder(tmp_path)
    (tmp_path / "moved.bin").rename(tmp_path / shard)
    key = "transformer.blocks.1.ffn.router.layer.weight"
    incomplete = {**index, "weight_map": {k: v for k, v in index["weight_map"].items() if k != key}}
    (tmp_path / INDEX_FILE).write_text(json.dumps(incomplete))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_pretrained(tmp_path)
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    config = json.loads((tmp_path / "config.json").read_text())
    config["d_model"] = 32
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_hf_config(tmp_path).d_model == 32
    with pytest.raises(ValueError, match="shape"):
        check_hf_folder(tmp_path)


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported_tokenizer(tmp_path_factory):
    from dbrx_train.data.hf_tokenizer import save_hf_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    save_hf_tokenizer(folder)
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def corpus_texts() -> list[str]:
    import argparse
    import inspect
    import json as json_module
    import typing

    texts = list(pydoc_data.topics.topics.values())
    texts += [open(m.__file__, encoding="utf-8").read() for m in (argparse, inspect, json_module, typing)]
    texts += [
        "héllo wörld 世界 🎉  \n\n\t x 12345678 1,000.5 3.14159",
        "don't I'LL you've WE'RE  \r\n\r\n   trailing   ",
        "a" * 3000,
        " " * 17,
    ]
    return texts


def test_tokenizer_ids_equal_tiktoken_on_corpus(exported_tokenizer):
    _, hf_tok = exported_tokenizer
    ours = load_tokenizer()
    texts = corpus_texts()
    assert sum(len(t) for t in texts) > 500_000
    for text in texts:
        ids = ours.encode(text)
        assert hf_tok.encode(text, add_special_tokens=False) == ids
        assert hf_tok.decode(ids) == text


def test_tokenizer_special_tokens_and_chat_template(exported_tokenizer):
    folder, hf_tok = exported_tokenizer
    ours = load_tokenizer()
    for token, token_id in ours.special_tokens.items():
        assert hf_tok.convert_tokens_to_ids(token) == token_id
        assert hf_tok.encode(f"a{token}b", add_special_tokens=False) == ours.encode_with_special(f"a{token}b")
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.pad_token == "<|pad|>"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|endoftext|>" and config["pad_token"] == "<|pad|>"
    assert (folder / "special_tokens_map.json").is_file()
    messages = [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Leaves fall."},
        {"role": "user", "content": "Another?"},
    ]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(messages, add_generation_prompt=True)
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert list(ids) == ours.encode_chat(messages, add_generation_prompt=True)[0]


def test_read_hf_rows_reads_row_ranges_in_chunks_and_casts(tmp_path):
    from safetensors.torch import save_file

    from dbrx_train.model.hf import read_hf_rows, weight_files

    full = torch.randn(10, 3).to(torch.bfloat16)
    save_file({"w": full}, tmp_path / SINGLE_FILE)
    files = weight_files(tmp_path)
    out = torch.full((7, 3), float("nan"))
    # 2 rows (12 bytes) per chunk: 4 chunks, the last one short.
    assert read_hf_rows(files, "w", 2, 9, out, chunk_bytes=12) == 7 * 3 * 2
    assert torch.equal(out, full[2:9].float())
    assert read_hf_rows(files, "w", 10, 10, torch.empty(0, 3)) == 0  # an empty last shard
    with pytest.raises(
        ValueError, match=r"model\.safetensors: tensor 'w' has shape \(10, 3\); its rows \[8, 11\)"
    ):
        read_hf_rows(files, "w", 8, 11, torch.empty(3, 3))
