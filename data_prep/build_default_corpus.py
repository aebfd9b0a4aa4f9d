"""Build the default pretraining corpus from text that ships with Python: no download needed.

    python data_prep/build_default_corpus.py --out data/default

Streams (each split into train/val and written as MDS, like convert_text_to_mds.py):
  prose  the help topics of `pydoc_data.topics` (the text of `help("if")` etc.), one document
         per topic
  code   the standard library's .py sources in sorted path order (no site-packages, no test
         suites, no files that are not UTF-8), up to --max-code-tokens tokens

Fine-tuning set (written like convert_finetuning_dataset.py, same --max-seq-len):
  chat   one question per help topic and phrasing ("Explain the "if" statement in Python.")
         answered with the topic's opening prose, cut at a sentence so the conversation fits

ICL suite (default_icl_suite.py; LLM Foundry's icl_tasks jsonl formats): help-topic paragraphs held
out of the prose stream (never a topic's first two, which the chat set uses) and standard-library
files the code stream never reached.

Output: OUT/{prose,code}/{train,val}/ (pretraining MDS folders), OUT/chat/{train,val}/
(fine-tuning MDS folders) next to the conversations as OUT/chat/{train,val}.jsonl, OUT/icl/*.jsonl
(ICL tasks), and OUT/manifest.json (sizes and sources). The content depends on the Python version, which the
manifest records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from default_icl_suite import without_held_out, write_suite

from dbrx_train.data.finetuning import convert_conversations
from dbrx_train.data.prepare import pack_to_mds, prepare_output_folder, tokenize_documents
from dbrx_train.data.tokenizer import DbrxTokenizer, load_tokenizer

VAL_FRACTION = 0.05
MIN_VAL_SAMPLES = 8
SKIPPED_STDLIB_PARTS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
CHAT_QUESTIONS = (
    "Explain {title} in Python.",
    "What does the Python documentation say about {title}?",
    "Tell me about {title}.",
)
CHAT_VAL_FRACTION = 0.1
MIN_CHAT_VAL_TOPICS = 8


def prose_documents() -> Iterator[tuple[str, str]]:
    """Each help topic without the paragraphs the ICL suite holds out."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield name, without_held_out(name, topics[name])


def code_documents() -> Iterator[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(stdlib.rglob("*.py")):
        relative = path.relative_to(stdlib)
        if SKIPPED_STDLIB_PARTS.intersection(relative.parts[:-1]):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # a few stdlib files are deliberately in other encodings
        yield relative.as_posix(), text


@dataclass
class StreamSource:
    description: str
    documents: Callable[[], Iterator[tuple[str, str]]]


STREAMS = {
    "prose": StreamSource(
        "pydoc_data.topics.topics: Python's help() topics, one document per topic, without the ICL suite's "
        "held-out paragraphs",
        prose_documents,
    ),
    "code": StreamSource(
        "the Python standard library's .py files, sorted by path, tests excluded", code_documents
    ),
}


def tokenize_capped(
    documents: Iterator[tuple[str, str]], *, max_tokens: int | None, num_workers: int
) -> list[tuple[str, np.ndarray]]:
    """(name, tokens + EOS) per document, in order, stopping once max_tokens is reached."""
    named = list(documents)
    token_arrays = tokenize_documents((text for _, text in named), num_workers=num_workers)
    result, total = [], 0
    try:
        for (name, _), tokens in zip(named, token_arrays, strict=True):
            result.append((name, tokens))
            total += len(tokens)
            if max_tokens is not None and total >= max_tokens:
                break
    finally:
        token_arrays.close()  # stops the worker pool, which may be ahead of the cap
    return result


def split_train_val(
    stream: str, documents: list[tuple[str, np.ndarray]], max_seq_len: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Val takes the documents whose name hashes lowest until it holds VAL_FRACTION of the
    tokens and at least MIN_VAL_SAMPLES samples. Hashing names (not positions) keeps a
    document on the same side when other documents come or go."""
    total = sum(len(tokens) for _, tokens in documents)
    val_target = max(VAL_FRACTION * total, (MIN_VAL_SAMPLES + 1) * max_seq_len)
    by_hash = sorted(documents, key=lambda doc: hashlib.sha256(f"{stream}/{doc[0]}".encode()).digest())
    val_names, val_tokens = set(), 0
    for name, tokens in by_hash:
        if val_tokens >= val_target:
            break
        val_names.add(name)
        val_tokens += len(tokens)
    train = [tokens for name, tokens in documents if name not in val_names]
    val = [tokens for name, tokens in documents if name in val_names]
    if sum(map(len, train)) < val_tokens:
        raise ValueError(
            f"stream {stream!r}: only {total} tokens, too few for a train split next to a val split of "
            f"{MIN_VAL_SAMPLES} samples of {max_seq_len} tokens; raise the token cap or lower --max-seq-len"
        )
    return train, val


def topic_title_and_prose(text: str) -> tuple[str, list[str]]:
    """A help topic's title and its prose paragraphs (reflowed), without headings, grammar or code."""
    lines = text.strip().splitlines()
    title = lines[0].strip()
    paragraphs, current = [], []
    for line in [*lines[2:], ""]:
        if line.strip():
            current.append(line)
            continue
        if current:
            underlined = len(current) >= 2 and set(current[-1].strip()) <= set("=-*~^")
            if not underlined and not current[0].startswith(" "):
                paragraphs.append(" ".join(part.strip() for part in current))
            current = []
    return title, paragraphs


def _leading_prose(paragraphs: list[str]) -> list[str]:
    """The first two paragraphs, stopping after one that introduces code or grammar (ends in ':'),
    whose colon becomes a full stop: the answer must not point at a block it does not contain."""
    kept = []
    for paragraph in paragraphs[:2]:
        if paragraph.endswith(":"):
            kept.append(paragraph[:-1] + ".")
            break
        kept.append(paragraph)
    return kept


def _fit_answer(tokenizer: DbrxTokenizer, paragraphs: list[str], budget: int) -> str:
    """The longest run of whole sentences from the first paragraphs that fits in `budget` tokens
    (whole words if even the first sentence does not)."""
    answer = ""
    for paragraph in _leading_prose(paragraphs):
        for sentence in paragraph.replace(". ", ".\0").split("\0"):
            candidate = f"{answer}{' ' if answer else ''}{sentence}"
            if len(tokenizer.encode(candidate)) > budget:
                if not answer:
                    for word in sentence.split():
                        if len(tokenizer.encode(f"{answer} {word}".strip())) > budget:
                            break
                        answer = f"{answer} {word}".strip()
                return answer
            answer = candidate
    return answer


def chat_conversations(max_seq_len: int) -> dict[str, list[dict]]:
    """{"train": [...], "val": [...]} of {"messages": [user, assistant]} rows from the help topics.
    Val takes the topics whose names hash lowest; all phrasings of a topic stay on one side."""
    from pydoc_data.topics import topics

    tokenizer = load_tokenizer()
    names = sorted(topics)
    by_hash = sorted(names, key=lambda name: hashlib.sha256(f"chat/{name}".encode()).digest())
    val_names = set(by_hash[: max(MIN_CHAT_VAL_TOPICS, round(CHAT_VAL_FRACTION * len(names)))])
    rows: dict[str, list[dict]] = {"train": [], "val": []}
    titles = set()
    for name in names:
        title, paragraphs = topic_title_and_prose(topics[name])
        if not paragraphs or title in titles:
            continue  # two topics can share a title ("if", "elif"): one question, one answer
        titles.add(title)
        subject = title if title[:2].isupper() else title[0].lower() + title[1:]
        for template in CHAT_QUESTIONS:
            question = template.format(title=subject)
            prompt_ids, _ = tokenizer.encode_chat(
                [{"role": "user", "content": question}],
                add_generation_prompt=True,
                default_system_prompt=False,
            )
            answer = _fit_answer(tokenizer, paragraphs, max_seq_len - len(prompt_ids) - 1)  # 1: <|im_end|>
            if answer:
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                rows["val" if name in val_names else "train"].append({"messages": messages})
    return rows


def build_chat_set(out: Path, *, max_seq_len: int) -> dict:
    """OUT/chat/{train,val}.jsonl and their fine-tuning MDS folders; returns the manifest entry."""
    entry: dict = {
        "source": "pydoc_data.topics.topics: one question per topic and phrasing, answered with its prose"
    }
    for split, rows in chat_conversations(max_seq_len).items():
        jsonl = out / "chat" / f"{split}.jsonl"
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        jsonl.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        conversations = ((f"{jsonl}:{i + 1}", row["messages"]) for i, row in enumerate(rows))
        summary = convert_conversations(
            conversations, out / "chat" / split, max_seq_len=max_seq_len, truncation="error"
        )
        entry[split] = {
            "folder": f"chat/{split}",
            "jsonl": f"chat/{split}.jsonl",
            "conversations": summary.rows,
            "samples": summary.samples,
            "tokens": summary.tokens,
            "trained_tokens": summary.trained_tokens,
        }
    return entry


def build_default_corpus(
    out: Path, *, max_seq_len: int, max_code_tokens: int, num_workers: int, overwrite: bool
) -> dict:
    """Write every stream's train/val MDS folders under `out`; return the manifest."""
    folders = [out / stream / split for stream in [*STREAMS, "chat"] for split in ("train", "val")]
    for folder in folders:  # refuse (or clear) all of them before spending time tokenizing
        prepare_output_folder(folder, overwrite)
    caps = {"code": max_code_tokens}
    trained: dict[str, set[str]] = {}
    manifest = {
        "description": "Default dbrx-train pretraining corpus, built offline by data_prep/build_default_corpus.py",
        "python": platform.python_version(),
        "tokenizer": "cl100k_base + DBRX special tokens (dbrx_train.data.tokenizer), EOS after each document",
        "max_seq_len": max_seq_len,
        "streams": {},
    }
    for stream, source in STREAMS.items():
        documents = tokenize_capped(source.documents(), max_tokens=caps.get(stream), num_workers=num_workers)
        train, val = split_train_val(stream, documents, max_seq_len)
        # What the ICL suite must avoid: the train split's documents (val is never trained on).
        val_arrays = {id(tokens) for tokens in val}
        trained[stream] = {name for name, tokens in documents if id(tokens) not in val_arrays}
        entry: dict = {"source": source.description, "token_cap": caps.get(stream)}
        for split, arrays in (("train", train), ("val", val)):
            # Already tokenized: a progress bar here would only time the packing.
            summary = pack_to_mds(arrays, out / stream / split, max_seq_len=max_seq_len, progress=False)
            entry[split] = {
                "folder": f"{stream}/{split}",
                **{key: value for key, value in asdict(summary).items() if key != "seconds"},
            }
        manifest["streams"][stream] = entry
    manifest["finetuning"] = {"chat": build_chat_set(out, max_seq_len=max_seq_len)}
    from pydoc_data.topics import topics

    manifest["icl"] = write_suite(out / "icl", topics, code_documents(), trained["code"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="data/default", help="output folder (default: data/default)")
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens per sample (default: 256)")
    parser.add_argument(
        "--max-code-tokens", type=int, default=3_000_000, help="cap on the code stream (default: 3000000)"
    )
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="tokenizer threads")
    parser.add_argument("--overwrite", action="store_true", help="replace existing MDS folders under --out")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    try:
        manifest = build_default_corpus(
            Path(args.out),
            max_seq_len=args.max_seq_len,
            max_code_tokens=args.max_code_tokens,
            num_workers=args.num_workers,
            overwrite=args.overwrite,
        )
    except (OSError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    print(f"default corpus in {args.out} ({time.perf_counter() - start:.1f} s, Python {manifest['python']}):")
    for stream, entry in manifest["streams"].items():
        for split in ("train", "val"):
            info = entry[split]
            print(
                f"  {stream}/{split}: {info['documents']:,} documents, {info['tokens']:,} tokens, "
                f"{info['samples']:,} samples of {args.max_seq_len}"
            )
    for split in ("train", "val"):
        info = manifest["finetuning"]["chat"][split]
        print(
            f"  chat/{split}: {info['conversations']:,} conversations, {info['tokens']:,} tokens "
            f"({info['trained_tokens']:,} trained), padded to {args.max_seq_len}"
        )
    for task, info in manifest["icl"].items():
        print(f"  {info['file']}: {info['examples']} {info['icl_task_type']} examples (ICL task {task})")


if __name__ == "__main__":
    main()
