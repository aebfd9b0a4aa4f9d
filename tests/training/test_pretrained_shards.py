"""`model.pretrained` with `init_device: meta`: every rank reads only its FSDP shard of each tensor.

Real `composer` runs (2 gloo ranks, then 1) on a 300 MB folder whose weights dominate the processes'
memory: each rank's peak host RSS while loading, and the loaded weights and logits against the
rank-0 `mixed` load (`build_model`, the code rank 0 runs for it). Fast checks: the row arithmetic
against torch.chunk, and the errors before any process starts."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Replicate, Shard

from dbrx_train.checkpoint.composer_weights import DCP_MODEL_PREFIX, read_composer_checkpoint
from dbrx_train.checkpoint.safe_load import SafeFileSystemReader
from dbrx_train.config.run import load_config
from dbrx_train.model import DbrxForCausalLM
from dbrx_train.model.hf import INDEX_FILE, SINGLE_FILE, expected_shapes, load_pretrained, save_pretrained
from dbrx_train.model.moe import TorchBackend
from dbrx_train.training.pretrained_shards import shard_rows
from dbrx_train.training.train import build_model
from dbrx_train.training.train import main as train_main
from tests.launches import run_training
from tests.training.test_hf_export import small_export
from tests.training.test_train_e2e import NO_MFU, TINY, read_metrics

# ~76M parameters (300 MB in fp32), 2/3 of them in 63 experts per layer of which each token uses 1:
# weights dominate memory, a step stays cheap. The odd vocabulary (100353) and expert count give
# uneven shards on 2 ranks: wte, lm_head and the routers' last rank holds one row fewer.
MODEL = [
    "max_seq_len=64",
    "model.d_model=128",
    "model.n_heads=4",
    "model.n_layers=2",
    "model.vocab_size=100353",
    "model.attn_config.kv_n_heads=2",
    "model.ffn_config.ffn_hidden_size=1024",
    "model.ffn_config.moe_num_experts=63",
    "model.ffn_config.moe_top_k=1",
]
LOADED = re.compile(
    r"model\.pretrained: rank (\d) read its shard, ([\d.]+) MB .* host RSS peak ([+-][\d.]+) MB"
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A sharded HF folder (4 files + index), fp32: its bytes are the model's bytes."""
    out = tmp_path_factory.mktemp("pretrained") / "dbrx"
    torch.manual_seed(0)
    model = DbrxForCausalLM(load_config(TINY, MODEL).model.dbrx)
    save_pretrained(model, out, max_shard_bytes=100_000_000, tokenizer=False)
    return out


def launch_meta(
    nproc: int, run_dir: Path, data_root: Path, folder: Path, *overrides: str
) -> dict[int, tuple]:
    """A meta-init run from `folder`; returns {rank: (MB read, host RSS peak rise in MB)} from its logs."""
    logs = run_dir.parent / f"{run_dir.name}-logs"
    logs.mkdir(parents=True)
    per_rank_logs = (
        "--stdout",
        str(logs / "rank{rank}.stdout.txt"),
        "--stderr",
        str(logs / "rank{rank}.stderr.txt"),
    )
    args = [
        str(TINY),
        f"variables.data_root={data_root}",
        f"save_folder={run_dir}",
        *MODEL,
        f"model.pretrained={folder}",
        "model.init_device=meta",
        "global_train_batch_size=2",  # 128 tokens a step: the run's cost is its start and checkpoints
        "device_train_microbatch_size=1",
        "curriculum=null",
        "eval_loader=null",
        "loggers.wandb=null",
        NO_MFU,
        "optimizer.name=decoupled_lionw",
        "optimizer.lr=1e-3",
        # Warmup from lr 0, and Composer's scheduler runs a step behind: the first two steps leave
        # the weights as loaded, so their checkpoint holds exactly what was read.
        "scheduler.t_warmup=1ba",
        "save_interval=2ba",
        *overrides,
    ]
    proc = run_training(nproc, args, launcher_args=per_rank_logs if nproc > 1 else ())
    if proc.returncode != 0:
        raise AssertionError(f"run failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    text = proc.stderr + "".join(p.read_text() for p in logs.glob("rank*.std*.txt"))
    return {int(m[1]): (float(m[2]), float(m[3])) for m in LOADED.finditer(text)}


def checkpoint_weights(run_dir: Path, batch: int) -> dict[str, torch.Tensor]:
    """The model tensors of a sharded checkpoint, read in one pass (not tensor by tensor)."""
    (folder,) = run_dir.glob(f"ep*-ba{batch}")
    shapes = read_composer_checkpoint(folder).shapes
    state = {DCP_MODEL_PREFIX + name: torch.empty(shape) for name, shape in shapes.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=SafeFileSystemReader(str(folder)), no_dist=True)
    return {name[len(DCP_MODEL_PREFIX) :]: tensor for name, tensor in state.items()}


def assert_equal_weights(weights: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name


@pytest.mark.slow
def test_meta_load_reads_each_ranks_shard_and_equals_the_mixed_load(folder, default_corpus, tmp_path):
    model_mb = sum(
        shape.numel() * 4 for shape in expected_shapes(load_config(TINY, MODEL).model.dbrx).values()
    )
    model_mb /= 1e6
    # The reference: what rank 0 builds for `init_device: mixed` (FSDP then broadcasts it as is).
    mixed_cfg = load_config(TINY, [*MODEL, f"model.pretrained={folder}", "model.init_device=mixed"])
    model = build_model(mixed_cfg, TorchBackend()).eval()
    tokens = torch.randint(0, 100352, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed_logits = model(tokens).logits
    mixed_state = {name: t.clone() for name, t in model.state_dict().items()}

    # 2 ranks, 3 batches: each rank reads half the rows and never holds the whole model.
    run2 = tmp_path / "meta2"
    # With activation checkpointing: its wrappers rename the blocks, the loader must still find them.
    loaded = launch_meta(
        2, run2, default_corpus, folder, "max_duration=3ba", "fsdp_config.activation_checkpointing=true"
    )
    assert sorted(loaded) == [0, 1], loaded
    for rank, (read_mb, peak_mb) in loaded.items():
        assert read_mb == pytest.approx(model_mb / 2, rel=0.01), (rank, read_mb, model_mb)
        assert peak_mb <= 0.6 * model_mb, f"rank {rank}: peak host RSS +{peak_mb} MB, model {model_mb:.1f} MB"
    print(f"2 ranks: peak host RSS rise {loaded} MB (MB read, MB), model {model_mb:.1f} MB")
    # Steps 1-2 ran at lr 0: their checkpoint holds exactly what was loaded; logits equal the mixed load's.
    loaded_weights = checkpoint_weights(run2, 2)
    assert_equal_weights(loaded_weights, mixed_state)
    model.load_state_dict(loaded_weights)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, mixed_logits)
    del model, loaded_weights
    # Step 3 trained those same tensors: Lion moves each weight with a gradient by exactly lr (the
    # dense ones all have one); an optimizer left holding other tensors would move none of them.
    lr = read_metrics(run2)[1]["lr-DecoupledLionW/group0"]  # logged at batch 2: the lr of step 3
    assert lr > 0
    stepped = checkpoint_weights(run2, 3)
    for name in (
        "transformer.wte.weight",
        "lm_head.weight",
        "transformer.blocks.1.norm_attn_norm.attn.Wqkv.weight",
    ):
        delta = (stepped[name] - mixed_state[name]).abs()
        moved = delta > 0
        # wte: only the rows of the batch's tokens get a gradient
        assert moved.float().mean() > (0.001 if name == "transformer.wte.weight" else 0.99), name
        torch.testing.assert_close(delta[moved], torch.full_like(delta[moved], lr), rtol=0, atol=1e-7)

    # 1 rank: the whole model (the figure for docs/hf.md), equal to the mixed load too.
    run1 = tmp_path / "meta1"
    loaded = launch_meta(1, run1, default_corpus, folder, "max_duration=1ba")
    read_mb, peak_mb = loaded[0]
    assert read_mb == pytest.approx(model_mb, rel=0.01)
    print(f"1 rank: peak host RSS rise {peak_mb} MB, model {model_mb:.1f} MB")
    assert_equal_weights(checkpoint_weights(run1, 1), mixed_state)


def test_shard_rows_split_like_fsdp2():
    # FSDP2 shards dim 0 as torch.chunk: the reference here, including uneven and empty pieces.
    for rows in range(0, 9):
        for ranks in range(1, 5):
            pieces = torch.arange(rows).chunk(ranks) if rows else ()
            for rank in range(ranks):
                piece = pieces[rank].tolist() if rank < len(pieces) else []
                start, stop = shard_rows(rows, [Shard(0)], [ranks], [rank])
                assert list(range(start, stop)) == piece, (rows, ranks, rank)
                # HSDP: replicated over the first mesh dimension, sharded over the second.
                hybrid = shard_rows(rows, [Replicate(), Shard(0)], [3, ranks], [2, rank])
                assert hybrid == (start, stop)
    with pytest.raises(ValueError, match="dim-0"):
        shard_rows(4, [Shard(1)], [2], [0])


def test_meta_pretrained_errors_before_any_process_group(tmp_path, capsys, default_corpus):
    from safetensors.torch import load_file, save_file

    folder = small_export(tmp_path)  # d_model 64, one model.safetensors

    def refused(*extra: str) -> str:
        args = [str(TINY), f"variables.data_root={default_corpus}", "model.init_device=meta", *extra]
        with pytest.raises(SystemExit) as exit_info:
            train_main([*args, "model.d_model=64", "model.ffn_config.ffn_hidden_size=32"])
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    # Without pretrained weights there is nothing to read: random init of shards needs CUDA.
    err = refused()
    assert "model.init_device: meta" in err and "CUDA" in err and "model.pretrained" in err
    # A tensor with another shape: the file and the tensor are named.
    router = "transformer.blocks.1.ffn.router.layer.weight"
    weights = load_file(folder / SINGLE_FILE)
    save_file({**weights, router: torch.zeros(3, 64)}, folder / SINGLE_FILE, metadata={"format": "pt"})
    err = refused(f"model.pretrained={folder}")
    assert f"{folder / SINGLE_FILE}: tensor '{router}' has shape (3, 64)" in err
    # A tensor missing from a sharded folder's index: the index and the tensor are named.
    save_file(weights, folder / SINGLE_FILE, metadata={"format": "pt"})
    sharded = tmp_path / "sharded"
    save_pretrained(load_pretrained(folder), sharded, max_shard_bytes=200_000, tokenizer=False)
    index = json.loads((sharded / INDEX_FILE).read_text())
    del index["weight_map"]["lm_head.weight"]
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    err = refused(f"model.pretrained={sharded}")
    assert f"{sharded / INDEX_FILE} does not match config.json: missing tensors ['lm_head.weight']" in err
