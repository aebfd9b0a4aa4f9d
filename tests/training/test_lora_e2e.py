"""LoRA fine-tuning of a DBRX shaped like the published dbrx-instruct, by real runs of the README's
recipe commands (`yamls/finetune/dbrx-instruct[-lora].yaml model.pretrained=<folder>`, tiny sizes):
FSDP2 on 2 and 1 gloo ranks with activation checkpointing, checkpoints that hold only the adapters,
SIGKILL + autoresume, an elastic 2 -> 1 resume, refused resumes, merged and PEFT exports loaded by
transformers and PEFT, and sampling with the adapters."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers

from dbrx_train.checkpoint.adapters import load_adapted_model
from dbrx_train.checkpoint.composer_weights import read_composer_checkpoint
from dbrx_train.checkpoint.store import list_checkpoints, verify_files
from dbrx_train.config.run import RunModel
from dbrx_train.model.hf import CONFIG_FILE
from dbrx_train.model.lora import adapter_shapes, is_adapter
from dbrx_train.model.lora_export import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE
from dbrx_train.training.train import main as train_main
from tests.launches import LAUNCHER, run_training
from tests.run_env import run_env
from tests.training.dbrx_instruct_fixture import tiny_instruct_folder
from tests.training.test_hf_export import assert_same_weights, hf_tensors
from tests.training.test_resume_e2e import kill_session, last_batch, session_gone, wait_until
from tests.training.test_train_e2e import NO_MFU, read_metrics

ROOT = Path(__file__).resolve().parents[2]
LORA_RECIPE = ROOT / "yamls/finetune/dbrx-instruct-lora.yaml"
FULL_RECIPE = ROOT / "yamls/finetune/dbrx-instruct.yaml"

# The recipes' GPU-cluster settings, scaled to a CPU: 64-token samples, 8 per batch, no loader workers.
ON_CPU = [
    "max_seq_len=64",
    "global_train_batch_size=8",
    "device_train_microbatch_size=4",
    "device_eval_batch_size=8",
    "eval_subset_num_batches=1",
    "train_loader.dataset.num_canonical_nodes=1",  # the same samples on any number of ranks
    *(
        f"{loader}.{key}"
        for loader in ("train_loader", "eval_loader")
        for key in ("num_workers=0", "prefetch_factor=null", "persistent_workers=false", "pin_memory=false")
    ),
    "loggers.wandb=null",
    NO_MFU,
    "callbacks.memory_monitor=null",
    "console_log_interval=1ba",
    "callbacks.hf_export.dtype=fp32",
    "scheduler.t_warmup=1ba",
    "optimizer.lr=2e-3",
]
RELIABLE = [
    "max_duration=6ba",
    "save_interval=3ba",
    "save_num_checkpoints_to_keep=-1",
    "callbacks.sample_log={}",
]


def train_args(recipe: Path, base: Path, data_root: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        str(recipe),
        f"model.pretrained={base}",  # the README's command
        f"variables.data_root={data_root / 'chat'}",
        f"save_folder={run_dir}",
        *ON_CPU,
        *overrides,
    ]


def run_ok(nproc: int, *args, **kwargs) -> subprocess.CompletedProcess:
    proc = run_training(nproc, train_args(*args, **kwargs))
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    return {r["batch"]: r["loss/train/total"] for r in read_metrics(run_dir)}


def samples(run_dir: Path) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {r["batch"]: r["samples"] for r in rows}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checkpoint_bytes(checkpoint: Path) -> int:
    return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {
        "base": tiny_instruct_folder(root / "base"),
        "other": tiny_instruct_folder(root / "other", seed=1),  # same shapes, other weights
        "narrow": tiny_instruct_folder(root / "narrow", ffn_config={"ffn_hidden_size": 32}),
    }


@pytest.fixture(scope="module")
def reference(bases, default_corpus, tmp_path_factory) -> Path:
    """The LoRA recipe on 2 ranks: every target, adapter dropout, activation checkpointing, mixed init."""
    run_dir = tmp_path_factory.mktemp("lora") / "reference"
    run_ok(2, LORA_RECIPE, bases["base"], default_corpus, run_dir, *RELIABLE)
    return run_dir


@pytest.mark.slow
def test_two_rank_lora_run_checkpoints_adapters_and_exports_what_transformers_computes(
    reference, bases, tmp_path
):
    rows = read_metrics(reference)
    assert [r["batch"] for r in rows] == list(range(1, 7))
    first, last = (sum(r["loss/train/lm_cross_entropy"] for r in part) / 2 for part in (rows[:2], rows[-2:]))
    assert last < first - 0.01, [r["loss/train/lm_cross_entropy"] for r in rows]
    run = RunModel(reference / "config.yaml")
    spec = run.peft.spec
    assert spec.targets == ("Wqkv", "out_proj", "w1", "v1", "w2") and spec.dropout == 0.05

    # Checkpoints: the adapters and their optimizer state only, committed with a sha256 manifest.
    checkpoints = list_checkpoints(reference)
    assert [c.name for c in checkpoints] == ["ep0-ba3", "ep0-ba6"]
    for checkpoint in checkpoints:
        verify_files(checkpoint)
        assert len(list(checkpoint.path.glob("*.distcp"))) == 2
        assert checkpoint.manifest["base_model"]["folder"] == str(bases["base"])
    weights = read_composer_checkpoint(checkpoints[-1].path)
    assert dict(weights.shapes) == dict(adapter_shapes(run.dbrx, spec))
    from dbrx_train.checkpoint.safe_load import SafeFileSystemReader

    stored = SafeFileSystemReader(str(checkpoints[-1].path)).read_metadata().state_dict_metadata
    optimizer_state = [k for k in stored if k.startswith("state.optimizers.") and "transformer." in k]
    assert optimizer_state and all(is_adapter(k) for k in optimizer_state)
    assert not [k for k in stored if "transformer." in k and not is_adapter(k)]  # no base tensor at all

    # The merged export (callback, end of training) = the base with the adapters folded in; transformers
    # computes with it what our model computes with the adapters applied.
    export = reference / "hf/ba6"
    assert not (export / ADAPTER_CONFIG_FILE).exists()
    merged, base = hf_tensors(export), hf_tensors(bases["base"])
    assert torch.equal(merged["transformer.wte.weight"], base["transformer.wte.weight"])
    for target in ("norm_attn_norm.attn.Wqkv.weight", "ffn.experts.mlp.w2"):
        assert not torch.equal(
            merged[f"transformer.blocks.1.{target}"], base[f"transformer.blocks.1.{target}"]
        )
    ours = load_adapted_model(checkpoints[-1].path, run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.randint(0, 100352, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=0)
        base_hf = transformers.AutoModelForCausalLM.from_pretrained(bases["base"], dtype=torch.float32).eval()
        assert (base_hf(ids).logits - ours(ids).logits).abs().max() > 1e-3  # the adapters changed it

    # The script writes the same merged folder from the 2-rank checkpoint; a PEFT folder it refuses.
    convert = script("convert_to_hf")
    convert.main([str(checkpoints[-1].path), str(tmp_path / "merged"), "--dtype", "fp32"])
    assert_same_weights(export, tmp_path / "merged")
    with pytest.raises(SystemExit) as refused:
        convert.main([str(reference), str(tmp_path / "peft"), "--adapters", "peft"])
    assert refused.value.code == 2 and not (tmp_path / "peft").exists()

    # Sampling with the adapters applied on the fly, and merged first: the same tokens as transformers.
    prompt = [[100278, 882, 198, 3923, 374, 264, 1160, 30]]  # <|im_start|>user\nWhat is a list?
    prompt_ids = torch.tensor(prompt)
    expected = hf.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False, max_new_tokens=6
    )
    expected = expected[0, len(prompt[0]) :].tolist()
    from dbrx_train.model.generate import SamplingConfig, generate

    for merge in (False, True):
        model = load_adapted_model(reference, run, merge=merge)  # a run folder: its newest checkpoint
        got = generate(model, prompt, SamplingConfig(max_new_tokens=6), torch.Generator().manual_seed(0))[0]
        assert got == expected[: len(got)] and got, (merge, got, expected)


@pytest.mark.slow
# CI time (pyproject: extended): test_elastic_resume_on_one_rank_sees_each_sample_once resumes adapter
# checkpoints in make test; test_resume_e2e's SIGKILL test covers the kill and autoresume
@pytest.mark.extended
def test_sigkill_then_autoresume_gives_the_same_losses_bit_for_bit(
    reference, bases, default_corpus, tmp_path
):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    proc = subprocess.Popen(
        [
            *LAUNCHER,
            "-n",
            "2",
            str(ROOT / "train.py"),
            *train_args(LORA_RECIPE, bases["base"], default_corpus, run_dir, *RELIABLE),
        ],
        cwd=ROOT,
        env=run_env(2),
        stdout=open(logs / "out.txt", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until(lambda: last_batch(run_dir) >= 4, proc)  # past the checkpoint at batch 3
    kill_session(proc)
    session_gone(proc)
    resumed = run_ok(2, LORA_RECIPE, bases["base"], default_corpus, run_dir, *RELIABLE)  # the same command
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert losses(run_dir) == losses(reference)  # bit for bit: adapter dropout, optimizer, data, schedule
    assert samples(run_dir) == samples(reference)


@pytest.mark.slow
def test_elastic_resume_on_one_rank_sees_each_sample_once(reference, bases, default_corpus, tmp_path):
    run_dir = tmp_path / "elastic"
    proc = run_ok(
        1,
        LORA_RECIPE,
        bases["base"],
        default_corpus,
        run_dir,
        *RELIABLE,
        f"load_path={reference / 'ep0-ba3'}",
    )
    assert "resuming from" in proc.stdout + proc.stderr
    before = {b: s for b, s in samples(reference).items() if b <= 3}
    after = samples(run_dir)
    assert sorted(after) == [4, 5, 6]
    seen = [i for ids in [*before.values(), *after.values()] for i in ids]
    assert len(seen) == len(set(seen)) == 6 * 8
    assert after == {b: s for b, s in samples(reference).items() if b > 3}


def refused(capsys, *args: str) -> str:
    """train.py in this process (no FSDP, so no process group): exit code 2 and its one line."""
    with pytest.raises(SystemExit) as exit_info:
        train_main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip(), err
    return err


@pytest.mark.slow
def test_resumes_on_another_base_or_targets_and_mismatched_adapters_are_refused(
    reference, bases, default_corpus, tmp_path, capsys
):
    run_dir = tmp_path / "copy"
    shutil.copytree(reference, run_dir)
    common = [
        str(LORA_RECIPE),
        f"variables.data_root={default_corpus / 'chat'}",
        f"save_folder={run_dir}",
        *ON_CPU,
        *RELIABLE,
        "fsdp_config=null",
        "model.init_device=cpu",
    ]
    err = refused(
        capsys, *common, f"model.pretrained={bases['base']}", "model.peft_config.target_modules=[Wqkv]"
    )
    assert "model.peft_config.target_modules" in err and "'w1'" in err
    err = refused(capsys, *common, f"model.pretrained={bases['other']}")
    assert f"model.pretrained {bases['other']} holds other weights" in err and str(bases["base"]) in err
    # Adapters onto a base of other shapes (a new run from the checkpoint's weights): the first tensor named.
    fresh = [c if not c.startswith("save_folder=") else f"save_folder={tmp_path / 'new'}" for c in common]
    err = refused(
        capsys,
        *fresh,
        f"model.pretrained={bases['narrow']}",
        f"load_path={reference / 'ep0-ba3'}",
        "load_weights_only=true",
    )
    assert (
        "transformer.blocks.0.ffn.experts.lora.w1.lora_B" in err
        and "(16, 64, 16)" in err
        and "(16, 32, 16)" in err
    )
    # A LoRA checkpoint is no full model: a run without model.peft_config cannot start from it.
    no_lora = [
        *fresh,
        f"model.pretrained={bases['base']}",
        "model.peft_config=null",
        f"load_path={reference}",
    ]
    assert "holds only LoRA adapters" in refused(capsys, *no_lora)
    assert list_checkpoints(run_dir)[-1].name == "ep0-ba6"  # nothing was touched


@pytest.fixture(scope="module")
def attention_only(bases, default_corpus, tmp_path_factory) -> Path:
    """The LoRA recipe on 1 rank with attention targets only, exporting merged and PEFT folders."""
    run_dir = tmp_path_factory.mktemp("lora") / "attention"
    run_ok(
        1,
        LORA_RECIPE,
        bases["base"],
        default_corpus,
        run_dir,
        "max_duration=3ba",
        "save_interval=3ba",
        "model.peft_config.target_modules=[Wqkv,out_proj]",
        "model.peft_config.lora_dropout=0.0",
        "callbacks.hf_export.adapters=both",
    )
    return run_dir


@pytest.mark.slow
def test_peft_loads_the_exported_adapters_onto_transformers_dbrx(attention_only, bases, tmp_path):
    from peft import PeftModel

    export = attention_only / "hf/ba3"
    peft_folder = export / "adapters"
    assert {p.name for p in peft_folder.iterdir()} >= {ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE}
    assert (export / CONFIG_FILE).is_file()  # and the merged folder beside it
    base = transformers.AutoModelForCausalLM.from_pretrained(bases["base"], dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, peft_folder).eval()
    loaded = peft_model.load_adapter(peft_folder, adapter_name="check")
    assert not loaded.unexpected_keys and not [k for k in loaded.missing_keys if "lora_" in k]
    peft_model.set_adapter("default")
    run = RunModel(attention_only / "config.yaml")
    ours = load_adapted_model(attention_only, run)
    merged = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    ids = torch.randint(0, 100352, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ours(ids).logits
        torch.testing.assert_close(peft_model(ids).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)
    # The script writes the same PEFT folder from the checkpoint.
    script("convert_to_hf").main(
        [str(attention_only), str(tmp_path / "peft"), "--adapters", "peft", "--dtype", "fp32"]
    )
    assert json.loads((tmp_path / "peft" / ADAPTER_CONFIG_FILE).read_text())["target_modules"] in (
        ["Wqkv", "out_proj"],
        ["out_proj", "Wqkv"],
    )
    from safetensors.torch import load_file

    a, b = (load_file(f / ADAPTER_WEIGHTS_FILE) for f in (peft_folder, tmp_path / "peft"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_full_recipe_readme_command_and_checkpoint_sizes(reference, bases, default_corpus, tmp_path):
    run_dir = tmp_path / "full"
    run_ok(1, FULL_RECIPE, bases["base"], default_corpus, run_dir, "max_duration=2ba", "save_interval=2ba")
    assert [r["batch"] for r in read_metrics(run_dir)] == [1, 2]
    (full,) = list_checkpoints(run_dir)
    full_shapes = read_composer_checkpoint(full.path).shapes
    assert not any(is_adapter(n) for n in full_shapes) and "transformer.wte.weight" in full_shapes
    lora = list_checkpoints(reference)[-1]
    # The same tiny base: the LoRA checkpoint (adapters + their Lion moment) is a small part of the full one.
    assert checkpoint_bytes(lora.path) < 0.1 * checkpoint_bytes(full.path)
    print(f"checkpoint bytes: full {checkpoint_bytes(full.path):,}, LoRA {checkpoint_bytes(lora.path):,}")
