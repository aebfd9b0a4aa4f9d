"""Generation: KV cache against full recomputation, batched left padding against one prompt at a
time, our greedy decoding against transformers' `generate`, sampling filters, the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from dbrx_train.config.schema import build
from dbrx_train.model import DbrxConfig, DbrxForCausalLM
from dbrx_train.model.dbrx import KVCache
from dbrx_train.model.generate import SamplingConfig, generate, next_token
from dbrx_train.model.hf import save_pretrained

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(seed=0, V=2048) -> DbrxForCausalLM:
    config = build(
        DbrxConfig,
        {
            "d_model": 32,
            "n_heads": 4,
            "n_layers": 2,
            "max_seq_len": 64,
            "vocab_size": V,
            "attn_config": {"kv_n_heads": 2, "clip_qkv": 4.0},
            "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
        },
    )
    model = DbrxForCausalLM(config)
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger logits: fewer near-ties, so greedy choices are robust
        model.lm_head.weight.mul_(20)
    return model.eval()


PROMPTS = [[5, 17, 300, 42, 9, 1000], [77, 3], [12, 12, 12, 1900]]


def test_cached_forward_equals_full_forward():
    model = tiny_model()
    x = torch.tensor([PROMPTS[0] + [1, 2, 3]])
    with torch.no_grad():
        full = model(x).logits
        cache = KVCache(model.config, 1, 16)
        first = model(x[:, :6], past_key_values=cache).logits
        rest = [model(x[:, t : t + 1], past_key_values=cache).logits for t in range(6, 9)]
        out = model(x[:, :4], use_cache=True)
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=0)
    assert out.past_key_values is not None and out.past_key_values.length == 4


@pytest.mark.parametrize(
    "cfg",
    [
        SamplingConfig(max_new_tokens=12),
        SamplingConfig(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9),
    ],
)
def test_cached_and_uncached_decoding_give_identical_tokens(cfg):
    model = tiny_model()
    cached = generate(model, PROMPTS, cfg, torch.Generator().manual_seed(0))
    uncached_cfg = SamplingConfig(**{**cfg.__dict__, "use_cache": False})
    uncached = generate(model, PROMPTS, uncached_cfg, torch.Generator().manual_seed(0))
    assert cached == uncached
    assert all(len(seq) == 12 or seq[-1] in cfg.eos_token_ids for seq in cached)


def test_batched_left_padding_equals_one_prompt_at_a_time():
    model = tiny_model()
    cfg = SamplingConfig(max_new_tokens=10)
    batched = generate(model, PROMPTS, cfg)
    assert batched == [generate(model, [p], cfg)[0] for p in PROMPTS]


def test_stops_at_eos():
    model = tiny_model()
    free = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8))
    stop = free[1][2]
    stopped = generate(model, PROMPTS, SamplingConfig(max_new_tokens=8, eos_token_ids=(stop,)))
    assert stopped[1] == free[1][: free[1].index(stop) + 1]
    assert SamplingConfig().eos_token_ids == (100257, 100279)


def test_greedy_equals_transformers_generate(tmp_path):
    model = tiny_model(seed=3)
    save_pretrained(model, tmp_path, tokenizer=False, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    cfg = SamplingConfig(max_new_tokens=15)
    ours = generate(model, PROMPTS, cfg)
    for prompt, got in zip(PROMPTS, ours, strict=False):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                do_sample=False,
                max_new_tokens=15,
            )[0, len(prompt) :].tolist()
        assert got == expected
    # Batched with left padding too.
    T0 = max(len(p) for p in PROMPTS)
    ids = torch.tensor([[0] * (T0 - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (T0 - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        hf_batched = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=15)[:, T0:]
    for got, row in zip(ours, hf_batched.tolist(), strict=False):
        assert row[: len(got)] == got


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -5.0]])
    gen = torch.Generator().manual_seed(0)
    draws = {int(next_token(logits, SamplingConfig(temperature=1.0, top_k=2), gen)) for _ in range(200)}
    assert draws == {0, 1}
    # softmax ~ [.66, .24, .09, ...]: top_p=0.8 keeps the first two tokens only.
    draws = {int(next_token(logits, SamplingConfig(temperature=1.0, top_p=0.8), gen)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(next_token(logits, SamplingConfig(temperature=1.0, top_p=0.01), gen)) == 0
    assert int(next_token(logits, SamplingConfig(), gen)) == 0
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_generate_script_on_hf_folder(tmp_path):
    save_pretrained(tiny_model(V=100352), tmp_path, dtype=torch.float32, tokenizer=False)  # DBRX's vocabulary
    cmd = [
        sys.executable,
        str(ROOT / "scripts/generate.py"),
        "--model",
        str(tmp_path),
        "--max-new-tokens",
        "5",
    ]
    proc = subprocess.run(
        [*cmd, "--prompt", "def main():", "--prompt", "Hello", "--chat", "--no-system-prompt", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    import json

    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["def main():", "Hello"]
    assert all(1 <= len(r["ids"]) <= 5 for r in rows)
