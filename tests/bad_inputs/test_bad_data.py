"""Bad data gets a clear error naming stream, shard and what to do: never a hang, never a silently
wrong run. Every case of shard_cases.py is met the way a user meets it: `train.py`'s check before
any process group starts (one line, exit code 2), or the training loader as the damaged shard is
read; real `composer` runs on 1 and 2 ranks; and Streaming shared memory left by a killed run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from streaming import MDSWriter

from dbrx_train.data.finetuning import FinetuningDatasetConfig, FinetuningLoaderConfig
from dbrx_train.data.loaders import build_dataloader, validate_loader_config
from dbrx_train.data.streaming_shm import SHM_DIR, release_stale_shared_memory
from dbrx_train.data.text import TextDatasetConfig, TextLoaderConfig
from dbrx_train.training.train import main
from tests.bad_inputs import shard_cases as cases
from tests.bad_inputs.shard_cases import BAD, SEQ, VOCAB
from tests.run_env import run_env
from tests.training.test_train_e2e import ROOT, SMALL, TINY

PROSE = "train_loader.dataset.streams.prose"
NO_ICL = ["icl_tasks=null", "eval_gauntlet=null"]  # the data root holds no ICL task files


@pytest.fixture(scope="module")
def rows(default_corpus) -> list:
    return cases.good_rows(default_corpus)


@pytest.fixture(scope="module")
def good_root(default_corpus, rows, tmp_path_factory) -> Path:
    """A data root for dbrx-tiny.yaml (prose/code x train/val) whose prose/train is ~13 zstd shards."""
    root = tmp_path_factory.mktemp("good") / "root"
    for stream in ("prose", "code"):
        shutil.copytree(default_corpus / stream, root / stream)
    shutil.rmtree(root / "prose" / "train")
    cases.write_good(root / "prose" / "train", rows)
    return root


def damaged_root(good_root: Path, tmp_path: Path, case: cases.Case, rows: list) -> Path:
    root = tmp_path / "root"
    shutil.copytree(good_root, root)
    case.damage(root / "prose" / "train", rows)
    return root


def preflight_error(root: Path, tmp_path: Path, capsys, *overrides: str) -> str:
    """What `python train.py dbrx-tiny.yaml ...` prints (in this process): the config error line."""
    args = [str(TINY), f"variables.data_root={root}", f"save_folder={tmp_path / 'run'}", *SMALL, *NO_ICL]
    with pytest.raises(SystemExit) as exited:
        main([*args, "max_duration=2ba", *overrides])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if line.startswith("dbrx-train: config error: ")]
    return line


def read_error(cfg: TextLoaderConfig | FinetuningLoaderConfig, timeout: float = 60) -> Exception:
    """The error of reading one epoch through the training loader; the check before training passes."""
    validate_loader_config(cfg, SEQ, VOCAB)
    outcome: dict[str, Exception | None] = {}

    def read() -> None:
        try:
            for _ in build_dataloader(cfg, device_batch_size=8, max_seq_len=SEQ, vocab_size=VOCAB, seed=17):
                pass
            outcome["error"] = None
        except Exception as error:
            outcome["error"] = error

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), f"reading the damaged data still runs after {timeout} s (a hang)"
    assert outcome["error"] is not None, "the damaged data was read to the end without an error"
    return outcome["error"]


def assert_names(message: str, expected: tuple[str, ...]) -> None:
    for part in expected:
        assert part in message, f"{part!r} not in: {message}"


@pytest.mark.parametrize("name", sorted(cases.TEXT_CASES))
def test_damaged_pretraining_data(name, good_root, rows, tmp_path, capsys):
    case = cases.TEXT_CASES[name]
    root = damaged_root(good_root, tmp_path, case, rows)
    if case.when == "preflight":
        line = preflight_error(
            root, tmp_path, capsys, f"train_loader.dataset.verify_shards={case.verify_shards}"
        )
        assert_names(line, (PROSE, *case.expect))
    else:
        folder = root / "prose" / "train"
        dataset = TextDatasetConfig(local=str(folder), shuffle=False, verify_shards=case.verify_shards)
        error = read_error(TextLoaderConfig(dataset=dataset))
        assert_names(str(error), ("train_loader.dataset", str(folder), *case.expect))
    assert not (root / "prose" / "pwned").exists()  # the pickle case's payload never ran


@pytest.mark.parametrize("name", sorted(cases.FINETUNING_CASES))
def test_damaged_finetuning_data(name, rows, tmp_path):
    case = cases.FINETUNING_CASES[name]
    folder = cases.write_good_finetuning(tmp_path / "chat", rows)
    case.damage(folder, rows)
    cfg = FinetuningLoaderConfig(dataset=FinetuningDatasetConfig(local=str(folder), shuffle=False))
    if case.when == "preflight":
        # What check_data turns into the one-line config error (the fine-tuning YAML also needs a
        # pretrained checkpoint, which is checked first).
        with pytest.raises((ValueError, FileNotFoundError)) as error:
            validate_loader_config(cfg, SEQ, VOCAB)
        message = str(error.value)
    else:
        message = str(read_error(cfg))
    assert_names(message, ("train_loader.dataset", str(folder), *case.expect))


def test_int64_tokens_are_not_an_error(rows, tmp_path):
    """Any integer ndarray holds ids exactly (the loader makes them int64); only the values matter."""
    folder = tmp_path / "int64"
    with MDSWriter(columns={"tokens": "ndarray:int64"}, out=str(folder), compression="zstd") as writer:
        for row in rows[:64]:
            writer.write({"tokens": row.astype("int64")})
    cfg = TextLoaderConfig(dataset=TextDatasetConfig(local=str(folder), shuffle=False, verify_shards="full"))
    validate_loader_config(cfg, SEQ, VOCAB)
    loader = build_dataloader(cfg, device_batch_size=8, max_seq_len=SEQ, vocab_size=VOCAB, seed=17)
    read = [row.tolist() for batch in loader for row in batch["input_ids"]]
    assert read == [row.tolist() for row in rows[:64]]


def test_missing_folder_and_missing_local_remote(good_root, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(good_root, root)
    shutil.rmtree(root / "prose" / "train")
    line = preflight_error(root, tmp_path, capsys)
    assert_names(line, (PROSE, f"dataset folder {root / 'prose' / 'train'} does not exist", "make data"))
    missing = tmp_path / "no-such-bucket"
    line = preflight_error(good_root, tmp_path, capsys, f"{PROSE}.remote={missing}")
    assert_names(line, (f"{PROSE}.remote: dataset folder {missing / 'train'} does not exist",))


def run_to_exit(cmd: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    """Run `cmd` in its own session; it must exit within `timeout` and leave no process behind."""
    env = run_env(2)  # one or two ranks
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"no exit within {timeout} s (a hang):\n{out[-3000:]}\n{err[-3000:]}")
    seconds = time.monotonic() - start
    deadline = time.monotonic() + 10  # resource trackers exit right after their rank
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for leftover in left:
        leftover.kill()
    assert not left, f"processes left running: {[p.info['cmdline'] for p in left]}"
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), seconds


def session_processes(sid: int) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if os.getsid(process.pid) == sid:
                found.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return found


@pytest.mark.slow
def test_two_rank_run_stops_at_a_same_size_corrupt_shard(good_root, rows, tmp_path):
    """Only reading shard 3 can find it (size matches, the first sample is fine): both ranks stop
    with the error instead of a short epoch on one rank and a wait without end on the other."""
    root = damaged_root(good_root, tmp_path, cases.TEXT_CASES["garbage-zstd"], rows)
    cmd = [sys.executable, "-m", "composer.cli.launcher", "-n", "2", str(ROOT / "train.py"), str(TINY)]
    cmd += [
        f"variables.data_root={root}",
        f"save_folder={tmp_path / 'run'}",
        *SMALL,
        *NO_ICL,
        "max_duration=40ba",
    ]
    # A rank left waiting would wait for dist_timeout (600 s); 300 s leaves a busy machine (two test
    # workers, two ranks starting up) room to start both ranks, fail and stop.
    proc, seconds = run_to_exit(cmd, timeout=300)
    # Rank 0 writes to stderr, the launcher prints another rank's output to stdout; whichever rank
    # fails first, the launcher stops the other (see test_bad_yaml.py).
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert_names(
        output, ("dbrx-train: ", PROSE, f"shard {BAD}.mds / {BAD}.mds.zstd", "could not be prepared")
    )
    assert seconds < 300


@pytest.mark.slow
def test_one_rank_run_refuses_a_truncated_shard_before_starting(good_root, rows, tmp_path):
    root = damaged_root(good_root, tmp_path, cases.TEXT_CASES["truncated-zstd"], rows)
    cmd = [sys.executable, str(ROOT / "train.py"), str(TINY), f"variables.data_root={root}"]
    proc, seconds = run_to_exit([*cmd, f"save_folder={tmp_path / 'run'}", *SMALL])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"dbrx-train: config error: {PROSE}: shard file ")
    assert f"{BAD}.mds.zstd has " in proc.stderr and "Traceback" not in proc.stderr
    assert seconds < 60


HOLD_SHARED_MEMORY = """
import sys
from dbrx_train.data.text import TextDatasetConfig, TextLoaderConfig, build_text_dataloader
config = TextLoaderConfig(dataset=TextDatasetConfig(local=sys.argv[1]))
loader = build_text_dataloader(config, device_batch_size=4, max_seq_len=64, vocab_size=100352, seed=0)
next(iter(loader))
print(f"{loader.dataset._shm_prefix_int:06}", flush=True)
sys.stdin.read()  # hold the dataset (and its shared memory) until stdin closes
"""


def segments(prefix: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{prefix}_*"))


@pytest.mark.slow
@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory in /dev/shm (Linux)")
def test_shared_memory_of_a_killed_reader_is_released_and_a_live_one_kept(good_root, rows):
    folder = good_root / "prose" / "train"
    holders: list[subprocess.Popen] = []
    prefixes: list[str] = []
    try:
        # One after the other (starting in the same instant is the next test's subject).
        for _ in range(2):
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLD_SHARED_MEMORY, str(folder)],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            holders.append(holder)
            prefixes.append(holder.stdout.readline().strip())
        killed, live = holders
        assert all(prefixes) and prefixes[0] != prefixes[1], prefixes
        os.killpg(killed.pid, signal.SIGKILL)  # the whole group: its resource tracker cannot clean up
        killed.wait()
        assert segments(prefixes[0]), "a SIGKILLed reader leaves its shared memory behind"
        release_stale_shared_memory()
        assert segments(prefixes[0]) == []
        assert segments(prefixes[1]), "the live reader's shared memory must be kept"
        # and the data reads as before
        config = TextLoaderConfig(dataset=TextDatasetConfig(local=str(folder)))
        loader = build_dataloader(config, device_batch_size=8, max_seq_len=SEQ, vocab_size=VOCAB, seed=1)
        assert sum(len(batch["input_ids"]) for batch in loader) == len(rows) // 8 * 8
    finally:
        for holder in holders:
            holder.stdin.close()  # a live reader exits normally, releasing its memory itself
        for holder in holders:
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()


START_TOGETHER = """
import sys
from dbrx_train.data.text import TextDatasetConfig, TextLoaderConfig, build_text_dataloader
config = TextLoaderConfig(dataset=TextDatasetConfig(local=sys.argv[1]))
print("ready", flush=True)
sys.stdin.readline()  # "go": every reader builds its dataset in the same instant
loader = build_text_dataloader(config, device_batch_size=4, max_seq_len=64, vocab_size=100352, seed=0)
next(iter(loader))
print(f"{loader.dataset._shm_prefix_int:06}", flush=True)
sys.stdin.read()
"""


@pytest.mark.slow
@pytest.mark.skipif(not SHM_DIR.is_dir(), reason="POSIX shared memory in /dev/shm (Linux)")
def test_readers_started_in_the_same_instant_get_distinct_prefixes(good_root, tmp_path):
    """Streaming alone picks one prefix for several of them (FileExistsError, or two datasets
    sharing state); exclusive_shm_prefix() registers each prefix with O_EXCL."""
    folder = good_root / "prose" / "train"
    readers = [
        subprocess.Popen(
            [sys.executable, "-c", START_TOGETHER, str(folder)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(tmp_path / f"reader{i}.err", "w"),  # noqa: SIM115 (closed with the process)
            text=True,
        )
        for i in range(6)
    ]
    try:
        assert [reader.stdout.readline().strip() for reader in readers] == ["ready"] * 6
        for reader in readers:
            reader.stdin.write("go\n")
        for reader in readers:
            reader.stdin.flush()
        prefixes = [reader.stdout.readline().strip() for reader in readers]
        failed = [(tmp_path / f"reader{i}.err").read_text()[-2000:] for i, p in enumerate(prefixes) if not p]
        assert not failed, failed[0]
        assert len(set(prefixes)) == 6, prefixes
    finally:
        for reader in readers:
            reader.stdin.close()
        for reader in readers:
            try:
                reader.wait(timeout=30)
            except subprocess.TimeoutExpired:
                reader.kill()
