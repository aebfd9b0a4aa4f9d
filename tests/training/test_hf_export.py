"""Export during and after training, conversion of Composer checkpoints, training from an HF folder,
and fine-tuning from a pretraining run: real `composer` runs of a small DBRX at DBRX's vocabulary
(1 rank without FSDP, 2 ranks FSDP2 + mixed init)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from dbrx_train.checkpoint.composer_weights import read_composer_checkpoint
from dbrx_train.config.run import load_config, load_model_config
from dbrx_train.config.schema import ConfigError
from dbrx_train.data.loaders import build_dataloader
from dbrx_train.data.tokenizer import load_tokenizer
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.dbrx import causal_lm_loss
from dbrx_train.model.hf import load_pretrained, save_hf_folder, save_pretrained, weight_files
from dbrx_train.training.train import main as train_main
from tests.training.test_curriculum_e2e import finetune
from tests.training.test_train_e2e import REAL_VOCAB, ROOT, TINY, launch, read_metrics


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    out = {}
    for name, path in weight_files(folder).items():
        with safe_open(path, framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


def convert(checkpoint: Path, out: Path, *extra: str) -> None:
    cmd = [sys.executable, str(ROOT / "scripts/convert_to_hf.py"), str(checkpoint), str(out), *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def pretrained_runs(real_vocab_corpus, tmp_path_factory) -> tuple[Path, Path]:
    """At DBRX's vocabulary (the exports carry its tokenizer, and text is generated from them):
    Run A: 1 rank, no FSDP (checkpoints are ep0-baN/rank0.pt), HF export every 3 batches + end.
    Run B: 2 ranks, FSDP2, starts from A's export; rank 0 loads, rank 1 stays on meta and gets
    the weights from FSDP's broadcast. A zero learning rate keeps them: the export at the end must
    equal the folder it started from."""
    root = tmp_path_factory.mktemp("pretrained")
    run_a, run_b = root / "a", root / "b"
    common = ("max_duration=4ba", "save_interval=4ba", "eval_interval=4ba", REAL_VOCAB)
    launch(
        1,
        run_a,
        real_vocab_corpus,
        *common,
        "fsdp_config=null",
        "callbacks.hf_export.save_interval=3ba",
        "callbacks.hf_export.dtype=fp32",
    )
    launch(
        2,
        run_b,
        real_vocab_corpus,
        *common,  # max_duration 4ba: the YAML's curriculum needs phases >= 1 batch apart
        f"model.pretrained={run_a / 'hf/ba4'}",
        "model.init_device=mixed",
        "optimizer.lr=1e-30",
        "callbacks.hf_export.save_interval=100ba",
        "callbacks.hf_export.dtype=fp32",
        "callbacks.hf_export.max_shard_size=20000000",
    )
    return run_a, run_b


@pytest.mark.slow
def test_export_convert_pretrained_start_and_generate(pretrained_runs, tmp_path):
    run_a, run_b = pretrained_runs
    assert sorted(p.name for p in (run_a / "hf").iterdir()) == ["ba3", "ba4"]
    export_a = run_a / "hf/ba4"
    (checkpoint_a,) = run_a.glob("ep*-ba4/rank0.pt")  # the tiny data set can end epochs early
    weights = read_composer_checkpoint(checkpoint_a)  # in-process; the CLI is run on run B below
    config = load_model_config(run_a / "config.yaml")
    save_hf_folder(
        tmp_path / "a-converted", config, weights.shapes, weights.get_tensor, torch.float32, tokenizer=False
    )
    assert_same_weights(export_a, tmp_path / "a-converted")

    # Run B started from A's export and kept its weights.
    export_b = run_b / "hf/ba4"
    assert (export_b / "model.safetensors.index.json").is_file()  # sharded
    assert_same_weights(export_a, export_b, atol=1e-6)
    # The 2-rank sharded Composer checkpoint converts to the same folder as the callback wrote.
    (checkpoint_b,) = run_b.glob("ep*-ba4")
    assert (checkpoint_b / ".metadata").is_file() and len(list(checkpoint_b.glob("*.distcp"))) == 2
    convert(checkpoint_b, tmp_path / "b-converted", "--dtype", "fp32")
    assert_same_weights(export_b, tmp_path / "b-converted")

    # transformers loads it without warnings and generates what our script generates.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf, info = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "b-converted", dtype=torch.float32, output_loading_info=True
        )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "b-converted")
    prompt = "def parse_args(argv):\n"
    ids = hf_tok(prompt, return_tensors="pt").input_ids
    assert ids[0].tolist() == load_tokenizer().encode(prompt)
    with torch.no_grad():
        expected = hf.eval().generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12
        )
    expected_ids = expected[0, ids.shape[1] :].tolist()
    cmd = [
        sys.executable,
        str(ROOT / "scripts/generate.py"),
        "--model",
        str(checkpoint_b),  # the Composer checkpoint itself
        "--prompt",
        prompt,
        "--max-new-tokens",
        "12",
        "--json",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ours = json.loads(proc.stdout.splitlines()[-1])["ids"]
    assert ours == expected_ids[: len(ours)] and len(ours) >= 1
    assert hf_tok.decode(expected_ids) == hf_tok.decode(ours) or len(ours) < 12


@pytest.mark.slow
def test_finetune_starts_from_the_weights_of_a_pretraining_run(pretrained_runs, real_vocab_corpus, tmp_path):
    """yamls/finetune.yaml on the default chat set, from a pretraining run folder (its newest
    checkpoint, 2-rank FSDP2 sharded) on 1 rank: weights only, a fresh schedule."""
    _, run_b = pretrained_runs
    tuned = tmp_path / "finetuned"
    proc = finetune(
        real_vocab_corpus,
        tuned,
        f"load_path={run_b}",
        "max_duration=4ba",
        "eval_interval=4ba",
        "eval_first=true",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    tuned_rows = read_metrics(tuned)
    assert [r["batch"] for r in tuned_rows] == [1, 2, 3, 4]
    assert all("metrics/eval/LanguageCrossEntropy" in tuned_rows[i] for i in (0, 3))
    # Started from exactly the pretrained weights (B's equal its export): the evaluation before the first
    # step (on batch 1's line) is theirs on the first chat val batch, to float rounding.
    cfg = load_config(
        ROOT / "yamls/finetune.yaml", [f"variables.data_root={real_vocab_corpus}", "max_seq_len=64"]
    )
    loader = build_dataloader(
        cfg.eval_loader,
        device_batch_size=8,
        max_seq_len=64,
        vocab_size=cfg.model.dbrx.vocab_size,
        seed=cfg.seed,
    )
    batch = next(iter(loader))
    with torch.no_grad():
        pretrained = load_pretrained(run_b / "hf/ba4").eval()
        expected = causal_lm_loss(pretrained(batch["input_ids"]).logits, batch["labels"]).item()
    assert tuned_rows[0]["metrics/eval/LanguageCrossEntropy"] == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Fast checks: config, errors, safe unpickling
# ---------------------------------------------------------------------------------------------
def small_export(tmp_path: Path) -> Path:
    cfg = load_config(TINY, ["model.d_model=64", "model.n_heads=4", "model.ffn_config.ffn_hidden_size=32"])
    folder = tmp_path / "pretrained"
    save_pretrained(DbrxForCausalLM(cfg.model.dbrx), folder, tokenizer=False)
    return folder


def test_pretrained_config_takes_architecture_and_refuses_shape_mismatch(tmp_path):
    folder = small_export(tmp_path)
    # The YAML's d_model=128 disagrees with config.json's 64: refused, naming the key.
    with pytest.raises(ConfigError, match=r"model\.d_model is 128 .* has 64"):
        load_config(TINY, [f"model.pretrained={folder}"])
    cfg = load_config(
        TINY,
        [
            f"model.pretrained={folder}",
            "model.d_model=64",
            "model.ffn_config.ffn_hidden_size=32",
            "model.ffn_config.moe_loss_weight=0.5",  # not a shape key: the YAML overrides
        ],
    )
    assert cfg.model.dbrx.d_model == 64 and cfg.model.dbrx.ffn_config.moe_loss_weight == 0.5
    with pytest.raises(ConfigError, match=r"model\.pretrained: .*config\.json"):
        load_config(TINY, [f"model.pretrained={tmp_path / 'nowhere'}"])


def test_incomplete_pretrained_folder_is_a_config_error_naming_the_file(tmp_path, capsys, default_corpus):
    folder = small_export(tmp_path)
    (folder / "model.safetensors").unlink()
    args = [
        str(TINY),
        f"variables.data_root={default_corpus}",
        f"model.pretrained={folder}",
        "model.d_model=64",
        "model.ffn_config.ffn_hidden_size=32",
    ]
    with pytest.raises(SystemExit) as exit_info:
        train_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.pretrained" in err and "model.safetensors" in err and str(folder) in err


class _Evil:
    def __reduce__(self):
        return (print, ("EXECUTED",))


def test_pt_checkpoint_is_read_without_running_pickled_code(tmp_path, capsys):
    weights = {"model.transformer.wte.weight": torch.arange(6.0).view(2, 3)}
    torch.save(
        {"state": {"model": weights, "timestamp": _Evil(), "rng": [{"x": _Evil()}]}}, tmp_path / "c.pt"
    )
    read = read_composer_checkpoint(tmp_path / "c.pt")
    assert "EXECUTED" not in capsys.readouterr().out
    assert dict(read.shapes) == {"transformer.wte.weight": torch.Size([2, 3])}
    torch.testing.assert_close(
        read.get_tensor("transformer.wte.weight"), weights["model.transformer.wte.weight"]
    )
    # A .metadata that names anything but DCP's own classes is refused.
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp/.metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        read_composer_checkpoint(tmp_path / "dcp")
