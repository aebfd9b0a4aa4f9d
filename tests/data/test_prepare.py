"""Text -> MDS conversion on real text: exact token content, determinism, and its errors."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dbrx_train.data.prepare import TokenPacker, convert_text_to_mds, expand_inputs, iter_documents
from dbrx_train.data.token_mds import check_token_mds, iter_token_samples, read_index
from dbrx_train.data.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SEQ = 64


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, list[str]]:
    """Real documents in .txt, .jsonl and .parquet files; returns the folder and the documents
    in the order the converter must read them (sorted paths, then file order)."""
    root = tmp_path / "corpus"
    root.mkdir()
    by_file = {
        "a_topics.txt": [topics["if"]],
        "b_topics.jsonl": [
            topics["while"],
            "naïve café 🙂 <|endoftext|> stays text",
            "a lone \ud800 surrogate (JSON allows it) is repaired as tiktoken does",
            topics["for"],
        ],
        "c_more.txt": [topics["try"]],
        "d_table.parquet": [topics["with"], topics["assert"]],
    }
    for name, docs in by_file.items():
        path = root / name
        if path.suffix == ".txt":
            path.write_text(docs[0], encoding="utf-8")
        elif path.suffix == ".jsonl":
            path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
        else:
            pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    return root, [doc for name in sorted(by_file) for doc in by_file[name]]


def read_all_tokens(folder: Path) -> list[np.ndarray]:
    return [ids for _, ids in iter_token_samples(folder, read_index(folder, "test")["shards"], "test")]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_samples_are_the_concatenated_documents_cut_to_length(tmp_path, corpus, tokenizer):
    root, documents = corpus
    out = tmp_path / "mds"
    summary = convert_text_to_mds([str(root)], out, max_seq_len=SEQ, size_limit=4096, progress=False)

    stream = [t for doc in documents for t in [*tokenizer.encode(doc), tokenizer.eos_token_id]]
    num_samples = len(stream) // SEQ
    expected = np.array(stream[: num_samples * SEQ], np.int32).reshape(num_samples, SEQ)
    samples = read_all_tokens(out)
    assert all(s.dtype == np.int32 and s.shape == (SEQ,) for s in samples)
    np.testing.assert_array_equal(np.stack(samples), expected)
    assert (summary.documents, summary.tokens, summary.samples) == (len(documents), len(stream), num_samples)
    assert summary.dropped_tokens == len(stream) - num_samples * SEQ
    index = read_index(out, "test")
    assert len(index["shards"]) > 1  # size_limit split it, and order survives across shards
    assert index["shards"][0]["column_encodings"] == ["ndarray:int32"]
    assert index["shards"][0]["compression"] == "zstd"
    # The literal "<|endoftext|>" in one document stayed text: EOS ids mark document ends only.
    assert stream.count(tokenizer.eos_token_id) == len(documents)


def test_same_input_gives_byte_identical_shards_with_any_worker_count(tmp_path, corpus):
    root, _ = corpus
    one, two = tmp_path / "one", tmp_path / "two"
    convert_text_to_mds([f"{root}/*"], one, max_seq_len=SEQ, size_limit=4096, num_workers=1, progress=False)
    convert_text_to_mds([f"{root}/*"], two, max_seq_len=SEQ, size_limit=4096, num_workers=2, progress=False)
    assert folder_bytes(one) == folder_bytes(two)


def test_refuses_to_overwrite_unless_asked(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "mds"
    convert_text_to_mds([str(root)], out, max_seq_len=SEQ, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_text_to_mds([str(root)], out, max_seq_len=SEQ, progress=False)
    summary = convert_text_to_mds([str(root)], out, max_seq_len=2 * SEQ, overwrite=True, progress=False)
    assert check_token_mds(out, max_seq_len=2 * SEQ, vocab_size=100352).num_samples == summary.samples

    not_a_dataset = tmp_path / "notes"
    not_a_dataset.mkdir()
    (not_a_dataset / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not an MDS dataset"):
        convert_text_to_mds([str(root)], not_a_dataset, max_seq_len=SEQ, overwrite=True, progress=False)
    assert (not_a_dataset / "keep.txt").read_text() == "precious"


def test_bad_jsonl_line_names_file_and_line_and_leaves_no_dataset(tmp_path, corpus):
    root, _ = corpus
    bad = root / "b_topics.jsonl"
    lines = bad.read_text().splitlines()
    bad.write_text("\n".join([lines[0], lines[1], '{"text": "unterminated', lines[2]]) + "\n")
    out = tmp_path / "mds"
    with pytest.raises(ValueError, match=f"{bad}:3: not valid JSON"):
        convert_text_to_mds([str(root)], out, max_seq_len=SEQ, num_workers=2, progress=False)
    assert not (out / "index.json").exists()

    bad.write_text(json.dumps({"body": "no text field"}) + "\n")
    with pytest.raises(ValueError, match=f"{bad}:1: expected an object with a string field 'text'"):
        list(iter_documents([bad]))


def test_input_errors(tmp_path, corpus):
    root, _ = corpus
    with pytest.raises(FileNotFoundError, match="matches no file"):
        expand_inputs([str(tmp_path / "nothing*.txt")])
    with pytest.raises(ValueError, match="no column 'body'"):
        list(iter_documents([root / "d_table.parquet"], text_field="body"))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=f"{latin1}: not UTF-8"):
        list(iter_documents([latin1]))
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["fine", None]}), nulls)
    with pytest.raises(ValueError, match="row 1 of column 'text' is NoneType"):
        list(iter_documents([nulls]))
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("too short")
    with pytest.raises(ValueError, match="fewer than one sample"):
        convert_text_to_mds([str(tiny)], tmp_path / "out", max_seq_len=SEQ, progress=False)
    assert not (tmp_path / "out").exists()


def test_packer_cuts_exact_rows_across_pushes():
    rng = np.random.default_rng(0)
    chunks = [rng.integers(0, 1000, n).astype(np.int32) for n in [3, 10, 1, 0, 25, 7, 2]]
    packer = TokenPacker(8)
    rows = [row for chunk in chunks for row in packer.push(chunk)]
    stream = np.concatenate(chunks)
    np.testing.assert_array_equal(np.stack(rows), stream[:48].reshape(6, 8))
    assert packer.remainder == len(stream) - 48


def test_cli_converts_and_reports(tmp_path, corpus):
    root, _ = corpus
    out = tmp_path / "cli"
    result = run_script(
        "data_prep/convert_text_to_mds.py", "--input", f"{root}/*.txt", f"{root}/*.jsonl",
        "--out", str(out), "--max-seq-len", "32", "--num-workers", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "documents" in result.stdout and "tokens/s" in result.stdout
    assert check_token_mds(out, max_seq_len=32, vocab_size=100352, all_samples=True).num_samples > 0

    # A user error exits with the message alone, no traceback (run in-process: a second
    # interpreter start costs seconds).
    spec = importlib.util.spec_from_file_location(
        "convert_text_to_mds", REPO / "data_prep/convert_text_to_mds.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(SystemExit, match=r"^error: .*--overwrite"):
        script.main(["--input", str(root), "--out", str(out)])


def script_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"data_prep/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_foundry_flags_mean_ours_and_help_starts_without_torch(tmp_path, corpus, tokenizer, capsys):
    """LLM Foundry's convert_text_to_mds.py flags give the dataset our own flags give, byte for byte;
    --bos_text/--no_wrap change it as in Foundry; another tokenizer is refused in one line; and
    `--help` imports neither torch nor Streaming (it took seconds when it did)."""
    root, documents = corpus
    script = script_module("convert_text_to_mds")
    script.main(
        ["--input", str(root), "--out", str(tmp_path / "ours"), "--max-seq-len", "32", "--num-workers", "2"]
    )
    foundry = [
        "--input_folder",
        str(root),
        "--concat_tokens",
        "32",
        "--processes",
        "2",
        "--compression",
        "zstd",
    ]
    foundry += [
        "--tokenizer",
        "databricks/dbrx-instruct",
        "--eos_text",
        "<|endoftext|>",
        "--trust-remote-code",
        "False",
    ]
    script.main([*foundry, "--output_folder", str(tmp_path / "foundry")])
    assert folder_bytes(tmp_path / "foundry") == folder_bytes(tmp_path / "ours")
    script.main([*foundry, "--out_root", str(tmp_path / "bos"), "--bos_text", "<|im_start|>", "--no_wrap"])
    rows = read_all_tokens(tmp_path / "bos")
    first = tokenizer.encode(documents[0])
    np.testing.assert_array_equal(rows[0], [tokenizer.im_start_id, *first[:31]])  # bos, then the document
    assert int(rows[1][0]) == tokenizer.im_start_id  # no wrap: the next row starts at the next document
    with pytest.raises(SystemExit) as refused:
        script.main([*foundry[:-6], "--tokenizer", "EleutherAI/gpt-neox-20b", "--out", str(tmp_path / "x")])
    assert refused.value.code == 2 and "trains DBRX with DBRX's tokenizer" in capsys.readouterr().err
    for name in ("convert_text_to_mds", "convert_finetuning_dataset"):
        code = f"import runpy, sys\nsys.argv = ['{name}', '--help']\ntry:\n    runpy.run_path('data_prep/{name}.py', run_name='__main__')\nexcept SystemExit:\n    pass\nprint(sorted({{'torch', 'streaming'}} & set(sys.modules)))"
        result = run_script("-c", code)
        assert result.returncode == 0 and result.stdout.strip().endswith("[]"), (
            result.stdout[-300:],
            result.stderr,
        )


def test_build_default_corpus(tmp_path):
    out = tmp_path / "default"
    result = run_script(
        "data_prep/build_default_corpus.py",
        "--out",
        str(out),
        "--max-seq-len",
        "128",
        "--max-code-tokens",
        "60000",
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    for stream in ("prose", "code"):
        for split in ("train", "val"):
            info = check_token_mds(out / stream / split, max_seq_len=128, vocab_size=100352, all_samples=True)
            entry = manifest["streams"][stream][split]
            assert info.num_samples == entry["samples"] >= 8
            assert entry["tokens"] == 128 * entry["samples"] + entry["dropped_tokens"]
    code = manifest["streams"]["code"]
    assert 60000 <= code["train"]["tokens"] + code["val"]["tokens"] < 60000 + 200_000
    assert manifest["streams"]["prose"]["train"]["documents"] + manifest["streams"]["prose"]["val"][
        "documents"
    ] == len(topics)
