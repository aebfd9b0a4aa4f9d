"""Real interrupted runs: SIGKILL at an arbitrary batch (a curriculum mid-segment on 2 ranks) and
mid-save, a size-limited disk, a damaged latest checkpoint, SIGTERM, Ctrl-C, elastic 2 <-> 1 resumes,
and changed configs on resume.

Every run uses dropout (all three kinds) and bias balancing (a router buffer that moves every step), so
bit-exact per-batch losses after a resume show that every RNG, the optimizer, the schedule, the data
position and the expert biases came back exactly; the 2-rank resumes also compare the biases of the
checkpoints written after the resume with the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from dbrx_train.checkpoint.composer_weights import read_composer_checkpoint
from dbrx_train.model.hf import is_expert_bias
from tests.launches import LAUNCHER, run_training
from tests.run_env import run_env
from tests.training.test_train_e2e import ROOT, SMALL, TINY, read_metrics

RELIABLE = [
    "run_name=reliable",
    "autoresume=true",
    "max_duration=8ba",
    "save_interval=3ba",
    "save_num_checkpoints_to_keep=2",
    "eval_interval=100ba",
    "curriculum=null",
    "callbacks.sample_log={}",
    "callbacks.expert_load=null",
    "icl_tasks=null",  # not about ICL: no evaluation rows in metrics.jsonl, no ICL time per run
    "eval_gauntlet=null",
    "model.resid_pdrop=0.1",
    "model.emb_pdrop=0.1",
    "model.attn_config.attn_pdrop=0.1",
    "model.ffn_config.moe_bias_update_rate=0.01",
]
# For the runs of RELIABLE that export to HF: HF DBRX has no place for expert biases (an export of a model
# with them is refused unless it drops them), and those tests are not about balancing.
NO_BIAS = "model.ffn_config.moe_bias_update_rate=0"


def train_args(run_dir: Path | str, data_root: Path, *overrides: str) -> list[str]:
    return [
        str(TINY),
        f"variables.data_root={data_root}",
        f"save_folder={run_dir}",
        *SMALL,
        *RELIABLE,
        *overrides,
    ]


def command(
    nproc: int, run_dir: Path | str, data_root: Path, *overrides: str, launcher_logs: Path | None = None
):
    launcher = [*LAUNCHER, "-n", str(nproc)]
    if launcher_logs is not None:
        launcher += [
            "--stdout",
            f"{launcher_logs}/rank{{rank}}.out",
            "--stderr",
            f"{launcher_logs}/rank{{rank}}.err",
        ]
    return [*launcher, str(ROOT / "train.py"), *train_args(run_dir, data_root, *overrides)]


def run(
    nproc: int, run_dir: Path | str, data_root: Path, *overrides: str, cwd: Path = ROOT, **kwargs
) -> subprocess.CompletedProcess:
    return run_training(nproc, train_args(run_dir, data_root, *overrides), cwd=cwd, **kwargs)


def run_ok(
    nproc: int, run_dir: Path | str, data_root: Path, *overrides: str, **kwargs
) -> subprocess.CompletedProcess:
    proc = run(nproc, run_dir, data_root, *overrides, **kwargs)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def start(nproc: int, run_dir: Path, data_root: Path, *overrides: str, logs: Path) -> subprocess.Popen:
    """A run in its own session, so the test can signal the launcher and all its ranks at once."""
    logs.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        command(nproc, run_dir, data_root, *overrides, launcher_logs=logs),
        cwd=ROOT,
        env=run_env(nproc),
        stdout=open(logs / "launcher.out", "w"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def last_batch(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return json.loads(line)["batch"]
        except ValueError:
            continue
    return 0


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before the condition held"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(poll)


def kill_session(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


def session_gone(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Every process of the run's session has exited (no rank left hanging)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError("processes of the run were still alive")


def copy_run(run_dir: Path, to: Path) -> Path:
    """A finished run's folder elsewhere, to resume without changing a run other tests read."""
    shutil.copytree(run_dir, to)
    return to


def kill_mid_save(run_dir: Path, name: str, data_root: Path, logs: Path, attempts: int = 3) -> None:
    """SIGKILL a 1-rank run while it writes checkpoint `name`. The test model saves in a fraction of a
    second, so a busy machine's poll can miss it: then the run is started again from nothing."""
    batch = int(name.split("-ba")[1])

    def saving_or_saved() -> bool:
        return any(run_dir.glob(f".tmp-{name}-*")) or last_batch(run_dir) > batch

    for attempt in range(attempts):
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = start(1, run_dir, data_root, logs=logs / str(attempt))
        wait_until(saving_or_saved, proc, poll=0.005)
        kill_session(proc)
        if name not in checkpoints(run_dir):
            return
    raise AssertionError(f"no kill landed while {name} was written ({attempts} runs)")


def losses(run_dir: Path) -> dict[int, float]:
    return {r["batch"]: r["loss/train/total"] for r in read_metrics(run_dir) if "loss/train/total" in r}


def samples(run_dir: Path) -> dict[int, list[int]]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return {r["batch"]: r["samples"] for r in rows}


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("ep"))


def assert_same_expert_biases(run_dir: Path, want_dir: Path) -> None:
    """Bias balancing resumed bit for bit: the checkpoints of `run_dir` at batches the uninterrupted run
    also saved, the last one included, hold its biases of that batch (non-zero: they moved)."""
    common = sorted(set(checkpoints(run_dir)) & set(checkpoints(want_dir)), key=batch_of)
    assert common and common[-1] == checkpoints(want_dir)[-1]
    for name in common:
        got, want = (read_composer_checkpoint(d / name) for d in (run_dir, want_dir))
        names = [n for n in want.shapes if is_expert_bias(n)]
        assert len(names) == 2  # SMALL's 2 MoE layers
        for n in names:
            bias = want.get_tensor(n)
            assert bias.abs().sum() > 0 and torch.equal(got.get_tensor(n), bias), (name, n)


@pytest.fixture(scope="module")
def reference(default_corpus, tmp_path_factory) -> dict[int, Path]:
    """Uninterrupted 8-batch runs on 1 and 2 ranks (every checkpoint kept, for the elastic tests)."""
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path_factory.mktemp("reference") / f"ranks{nproc}"
        run_ok(nproc, run_dir, default_corpus, "save_num_checkpoints_to_keep=-1")
        runs[nproc] = run_dir
    return runs


# The curriculum of dbrx-tiny.yaml in mix segments of 2 batches (each its own Streaming epoch): the
# checkpoint at batch 3 and a kill at batch 5 both fall mid-segment.
CURRICULUM = (
    "curriculum={interpolation: linear, step: 2ba, phases: [{start: 0dur, mix: {prose: 0.8, code: 0.2}}, "
    "{start: 0.25dur, mix: {prose: 0.8, code: 0.2}}, {start: 0.75dur, mix: {prose: 0.2, code: 0.8}}]}",
)


def batch_of(name: str) -> int:
    return int(name.split("-ba")[1])


@pytest.mark.slow
# CI time (pyproject: extended): the 2-rank curriculum kill is in make test-extended; the curriculum's
# own resume (test_curriculum_e2e) and the 1-rank kill run in make test.
@pytest.mark.parametrize(
    "nproc", [1, pytest.param(2, marks=pytest.mark.extended)], ids=["1-rank", "2-ranks-curriculum"]
)
def test_sigkill_at_any_batch_then_autoresume_is_bit_exact(nproc, reference, default_corpus, tmp_path):
    mix = CURRICULUM if nproc == 2 else ()
    want_dir = reference[nproc]
    if mix:  # its own uninterrupted reference
        want_dir = tmp_path / "reference"
        run_ok(nproc, want_dir, default_corpus, *mix)
    run_dir = tmp_path / "run"
    proc = start(nproc, run_dir, default_corpus, *mix, logs=tmp_path / "logs")
    wait_until(lambda: last_batch(run_dir) >= 5, proc)  # past the checkpoint at batch 3
    kill_session(proc)
    session_gone(proc)
    assert 3 in [batch_of(name) for name in checkpoints(run_dir)]

    proc = run_ok(nproc, run_dir, default_corpus, *mix)  # the same command again
    assert "resuming from" in proc.stdout + proc.stderr
    want = losses(want_dir)
    assert sorted(want) == list(range(1, 9))
    assert losses(run_dir) == want  # bit for bit, dropout included
    assert samples(run_dir) == samples(want_dir)
    if mix:  # the mix went on where it stopped, segment by segment
        mixes = [{k: v for k, v in r.items() if k.startswith("data/mix/")} for r in read_metrics(run_dir)]
        assert mixes == [
            {k: v for k, v in r.items() if k.startswith("data/mix/")} for r in read_metrics(want_dir)
        ]
        assert len({tuple(m.items()) for m in mixes}) > 1
    # rotation counted the first process's checkpoints too: only the newest two are left
    assert [batch_of(name) for name in checkpoints(run_dir)] == [6, 8]


@pytest.mark.slow
# CI time (pyproject: extended): 1 rank in make test-extended; 2 ranks (same launcher path) in make test
@pytest.mark.parametrize("nproc", [pytest.param(1, marks=pytest.mark.extended), 2])
def test_ctrl_c_saves_a_checkpoint_then_the_same_command_resumes_bit_exact(
    nproc, reference, default_corpus, tmp_path
):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    logs.mkdir()
    # The launcher `make` and `dbrx-train train` use: Composer's, with its Ctrl-C handling restored.
    cmd = command(nproc, run_dir, default_corpus, "save_interval=100ba", launcher_logs=logs)
    cmd[cmd.index("composer.cli.launcher")] = "dbrx_train.launch"
    out_file = (logs / "launcher.out").open("w")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=run_env(nproc),
        stdout=out_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_until(lambda: last_batch(run_dir) >= 2, proc)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends: the launcher and every rank
    assert proc.wait(timeout=120) == 130
    session_gone(proc)
    out = (logs / "launcher.out").read_text()
    ranks = "".join((logs / f"rank{r}.{s}").read_text() for r in range(1, nproc) for s in ("out", "err"))
    [saved] = checkpoints(run_dir)
    stopped = batch_of(saved)
    assert 2 <= stopped < 8
    assert f"stopped by Ctrl-C (SIGINT) after batch {stopped}; saved checkpoint {run_dir / saved}" in out, (
        out[-3000:]
    )
    assert "Ctrl-C received; terminating training processes." in out  # the launcher's own line
    # no end-of-run evaluation after a stop: the launcher SIGKILLs ranks still busy 30 s after Ctrl-C
    assert "[eval @ batch" not in out, out[-3000:]
    assert "Traceback" not in out + ranks and "KeyboardInterrupt" not in out + ranks

    run_ok(nproc, run_dir, default_corpus)
    assert losses(run_dir) == losses(reference[nproc])
    assert_same_expert_biases(run_dir, reference[nproc])


@pytest.mark.slow
def test_same_samples_on_any_world_size(reference):
    # num_canonical_nodes is pinned in dbrx-tiny.yaml: the sample order does not depend on the ranks
    assert samples(reference[1]) == samples(reference[2])


@pytest.mark.slow
@pytest.mark.parametrize(("saved_on", "resumed_on"), [(2, 1), (1, 2)])
def test_elastic_resume_sees_each_sample_exactly_once(
    saved_on, resumed_on, reference, default_corpus, tmp_path
):
    run_dir = tmp_path / "elastic"
    checkpoint = reference[saved_on] / "ep0-ba3"
    proc = run_ok(resumed_on, run_dir, default_corpus, f"load_path={checkpoint}")
    assert "resuming from" in proc.stdout + proc.stderr
    before = {b: s for b, s in samples(reference[saved_on]).items() if b <= 3}
    after = samples(run_dir)
    assert sorted(after) == [4, 5, 6, 7, 8]
    seen = [i for ids in [*before.values(), *after.values()] for i in ids]
    assert len(seen) == len(set(seen)) == 8 * 8  # every sample once, global batch 8 kept
    assert after == {b: s for b, s in samples(reference[saved_on]).items() if b > 3}


@pytest.mark.slow
def test_kill_mid_save_full_disk_and_damaged_latest_never_lose_the_good_checkpoint(
    reference, default_corpus, tmp_path
):
    run_dir = tmp_path / "run"
    # 1. SIGKILL while the checkpoint at batch 6 is being written.
    kill_mid_save(run_dir, "ep0-ba6", default_corpus, tmp_path / "logs")
    assert any(run_dir.glob(".tmp-ep0-ba6-*")), "the kill did not land mid-save"
    assert checkpoints(run_dir) == ["ep0-ba3"]

    # 2. A disk that cannot hold the next checkpoint (file size limit below one shard's size).
    limit = next((reference[1] / "ep0-ba3").glob("*.distcp")).stat().st_size // 2
    full = run(
        1,
        run_dir,
        default_corpus,
        preexec_fn=functools.partial(resource.setrlimit, resource.RLIMIT_FSIZE, (limit, limit)),
    )
    assert full.returncode != 0
    assert "checkpoint ep0-ba6 could not be written" in full.stderr, full.stderr[-3000:]
    assert (
        "Earlier checkpoints are intact" in full.stderr
        and "Traceback" not in full.stderr.split("dbrx-train:")[-1]
    )
    assert checkpoints(run_dir) == ["ep0-ba3"] and not list(run_dir.glob(".tmp-*"))

    # 3. Plenty of disk again: resumes from batch 3 and ends exactly like the uninterrupted run.
    run_ok(1, run_dir, default_corpus)
    assert losses(run_dir) == losses(reference[1])
    assert checkpoints(run_dir) == ["ep0-ba6", "ep0-ba8"]

    # 4. The latest checkpoint gets damaged on disk: reported, moved aside, the previous one is used.
    shard = next((run_dir / "ep0-ba8").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_ok(1, run_dir, default_corpus, "max_duration=10ba")  # extending the run is a harmless change
    out = proc.stdout + proc.stderr
    assert "checkpoint ep0-ba8 is damaged" in out and "does not match the sha256" in out
    assert "resuming from" in out and "ep0-ba6 (batch 6)" in out
    # moved aside, not deleted at once (rotated out with the checkpoints later: here by ba9 and ba10)
    assert "Moved it to ep0-ba8.corrupt" in out
    assert sorted(losses(run_dir)) == list(range(1, 11))
    # batches 7-8 were retrained on the longer schedule (cosine over 10 batches); 1-6 are the reference's
    assert all(losses(run_dir)[b] == losses(reference[1])[b] for b in range(1, 7))


@pytest.mark.slow
def test_changed_config_on_resume_is_refused_harmless_changes_pass(reference, default_corpus, tmp_path):
    run_dir = copy_run(reference[1], tmp_path / "run")  # checkpoints at batches 3, 6 and 8
    refused = run(1, run_dir, default_corpus, "seed=5", "global_train_batch_size=16", "model.n_layers=3")
    assert refused.returncode != 0
    for line in ("seed: 17 -> 5", "global_train_batch_size: 8 -> 16", "model.n_layers: 2 -> 3"):
        assert line in refused.stderr, refused.stderr[-3000:]
    assert checkpoints(run_dir) == ["ep0-ba3", "ep0-ba6", "ep0-ba8"]
    # logging, save interval and a longer max_duration may change
    proc = run_ok(
        1, run_dir, default_corpus, "console_log_interval=2ba", "save_interval=5ba", "max_duration=10ba"
    )
    assert "resuming from" in proc.stderr and "console_log_interval: '1ba' -> '2ba'" in proc.stderr
    assert sorted(losses(run_dir)) == list(range(1, 11))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly_then_resumes(reference, default_corpus, tmp_path):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    proc = start(2, run_dir, default_corpus, "save_interval=100ba", logs=logs)
    wait_until(lambda: last_batch(run_dir) >= 2, proc)
    os.kill(proc.pid, signal.SIGTERM)  # only the launcher, as a container runtime does
    proc.wait(timeout=60)
    session_gone(proc)
    # local rank 0 writes to the launcher's own output; the others to the --stdout/--stderr files
    out = {
        0: (logs / "launcher.out").read_text(),
        1: (logs / "rank1.out").read_text() + (logs / "rank1.err").read_text(),
    }
    assert "dbrx-train: stopped by SIGTERM after batch" in out[0], out[0][-3000:]
    # Composer's launcher turns SIGTERM into SystemExit(143) (its own traceback), then forwards SIGTERM to
    # the ranks and waits up to 30 s for them; the ranks themselves print no traceback.
    assert "Traceback" not in out[1] and out[0].count("Traceback") == out[0].count("SystemExit: 143") <= 1
    [saved] = checkpoints(run_dir)
    stopped = int(saved.split("-ba")[1])
    assert 2 <= stopped < 8 and f"after batch {stopped}" in out[0]
    assert "[eval @ batch" not in out[0]  # no end-of-run evaluation within the grace period

    run_ok(2, run_dir, default_corpus)
    assert losses(run_dir) == losses(reference[2])
    assert_same_expert_biases(run_dir, reference[2])


@pytest.mark.slow
def test_object_store_save_folder_uploads_and_a_fresh_machine_resumes_from_it(default_corpus, tmp_path):
    uri = f"file://{tmp_path / 'bucket'}/runs/reliable"  # a folder used as an object store
    first, second = tmp_path / "machine-a", tmp_path / "machine-b"
    first.mkdir(), second.mkdir()
    run_ok(1, uri, default_corpus, "max_duration=6ba", cwd=first)
    # written and committed locally in runs/{run_name}, then uploaded with the manifest last
    assert checkpoints(first / "runs/reliable") == ["ep0-ba3", "ep0-ba6"]
    bucket = tmp_path / "bucket/runs/reliable"
    assert checkpoints(bucket) == ["ep0-ba3", "ep0-ba6"]
    for name in ("ep0-ba3", "ep0-ba6"):
        assert (bucket / name / "manifest.json").is_file()
        assert sorted(p.name for p in (bucket / name).iterdir()) == sorted(
            p.name for p in (first / "runs/reliable" / name).iterdir()
        )
    # the newest copy in the store got damaged: a fresh machine reports it and resumes from the one before
    shard = next((bucket / "ep0-ba6").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-1000])
    proc = run_ok(1, uri, default_corpus, "max_duration=8ba", cwd=second)
    out = proc.stdout + proc.stderr
    assert "ep0-ba6 (downloaded)" in out and "(truncated?)" in out
    assert "downloaded checkpoint ep0-ba3" in out and "(batch 3)" in out
    assert sorted(losses(second / "runs/reliable")) == [4, 5, 6, 7, 8]
    assert checkpoints(bucket) == ["ep0-ba3", "ep0-ba6", "ep0-ba8"]


@pytest.mark.slow
def test_the_same_command_after_the_end_has_nothing_to_train(reference, default_corpus, tmp_path):
    run_dir = copy_run(reference[1], tmp_path / "run")
    # the reference's command again; Composer alone: a ValueError traceback
    again = run_ok(1, run_dir, default_corpus, "save_num_checkpoints_to_keep=-1")
    said = again.stdout[-2000:]
    assert "nothing to train" in said and "ep0-ba8 is at batch 8" in said, said
    assert "Traceback" not in again.stderr
    assert checkpoints(run_dir) == ["ep0-ba3", "ep0-ba6", "ep0-ba8"] and sorted(losses(run_dir)) == list(
        range(1, 9)
    )
