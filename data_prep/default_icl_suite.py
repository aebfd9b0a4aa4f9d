"""The default ICL suite: in-context-learning tasks in LLM Foundry's jsonl formats, built offline from
text that ships with Python, held out from the default pretraining corpus.

Used by build_default_corpus.py (`make data`), which removes the held-out paragraphs from the prose
stream and tells this module which standard-library files its code stream trained on.

Tasks (OUT/icl/<task>.jsonl):
  pydoc_topic        multiple_choice: a held-out help-topic paragraph; which of four topic titles is it from?
  pydoc_keyword      schema: a held-out help-topic sentence quoting a Python keyword; which of four
                     keywords makes the rest of the sentence likeliest?
  stdlib_line_end    language_modeling: standard-library code (files pretraining never saw: the code
                     stream's val split and the files past its token cap) up to a line's last word;
                     the model must produce that word greedily
  stdlib_line_end_qa generation_task_with_answers: the same kind of line, answered by generation
                     (greedy, KV cache, cut at the end of the line), exact match
"""

from __future__ import annotations

import hashlib
import json
import keyword
import random
import re
from collections.abc import Iterable
from pathlib import Path

HELD_OUT_PER_TOPIC = 2  # help-topic paragraphs per topic kept out of pretraining (from the third on)
MIN_PARAGRAPH_WORDS = 12
MAX_PARAGRAPH_WORDS = 60  # the tiny model's sequences are 128 tokens
NUM_CHOICES = 4
CODE_FILES = 40  # held-out standard-library files lines are drawn from
LINES_PER_FILE = 2
CODE_CONTEXT_LINES = 4
LINE_END = re.compile(r"^(?P<head>\s*\S.*?) (?P<word>[A-Za-z_][A-Za-z0-9_.]*:?)$")
QUOTED_KEYWORD = re.compile(r'"(' + "|".join(k for k in keyword.kwlist if k.isalpha()) + r')"')


def _hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


# ------------------------------------------------------------------------------------ help topics
def topic_blocks(text: str) -> list[str]:
    """The blank-line separated blocks of a help topic's text, each as its original lines."""
    blocks, current = [], []
    for line in text.strip().splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


def is_prose(block: str) -> bool:
    """A paragraph: not a heading (underlined), not indented code or grammar."""
    lines = block.splitlines()
    underlined = len(lines) >= 2 and set(lines[-1].strip()) <= set("=-*~^")
    return not underlined and not lines[0].startswith(" ")


def held_out_blocks(name: str, text: str) -> list[int]:
    """Indices of the topic's held-out prose blocks: never its title or first two paragraphs (the chat
    set answers with those), long enough to name a topic, chosen by hash so the choice is stable."""
    blocks = topic_blocks(text)
    prose = [i for i, b in enumerate(blocks) if i > 0 and is_prose(b)]
    candidates = [i for i in prose[2:] if len(blocks[i].split()) >= MIN_PARAGRAPH_WORDS]
    candidates.sort(key=lambda i: _hash(f"icl/{name}/{i}"))
    return sorted(candidates[:HELD_OUT_PER_TOPIC])


def without_held_out(name: str, text: str) -> str:
    """The topic's text as pretraining sees it: its held-out paragraphs removed."""
    drop = set(held_out_blocks(name, text))
    return "\n\n".join(b for i, b in enumerate(topic_blocks(text)) if i not in drop) + "\n"


def _reflow(block: str) -> str:
    return " ".join(line.strip() for line in block.splitlines())


def _clip_words(text: str, limit: int) -> str:
    words = text.split()
    return text if len(words) <= limit else " ".join(words[:limit]) + " ..."


def topic_questions(topics: dict[str, str]) -> list[dict]:
    """multiple_choice rows: a topic's first held-out paragraph (one question per topic keeps the
    suite cheap to score), four distinct topic titles, the right one's index."""
    titles = {name: topic_blocks(text)[0].splitlines()[0].strip() for name, text in topics.items()}
    distinct = sorted(set(titles.values()))
    rows = []
    for name in sorted(topics):
        blocks = topic_blocks(topics[name])
        for i in held_out_blocks(name, topics[name])[:1]:
            rng = random.Random(_hash(f"icl/topic/{name}/{i}"))
            choices = [titles[name], *rng.sample([t for t in distinct if t != titles[name]], NUM_CHOICES - 1)]
            rng.shuffle(choices)
            paragraph = _clip_words(_reflow(blocks[i]), MAX_PARAGRAPH_WORDS)
            query = f"Paragraph: {paragraph}\nHelp topic:"
            rows.append({"query": query, "choices": choices, "gold": choices.index(titles[name])})
    return rows


def keyword_questions(topics: dict[str, str]) -> list[dict]:
    """schema rows: a held-out sentence up to its first quoted keyword, with that keyword or three
    others; the rest of the sentence is the continuation."""
    keywords = sorted(k for k in keyword.kwlist if k.isalpha())
    rows = []
    for name in sorted(topics):
        blocks = topic_blocks(topics[name])
        for i in held_out_blocks(name, topics[name]):
            for n, sentence in enumerate(re.split(r"(?<=\.)\s+", _reflow(blocks[i]))):
                match = QUOTED_KEYWORD.search(sentence)
                rest = sentence[match.end() :] if match else ""
                if not match or len(rest.split()) < 4 or len(sentence.split()) > MAX_PARAGRAPH_WORDS:
                    continue
                rng = random.Random(_hash(f"icl/keyword/{name}/{i}/{n}"))
                options = [
                    match.group(1),
                    *rng.sample([k for k in keywords if k != match.group(1)], NUM_CHOICES - 1),
                ]
                rng.shuffle(options)
                head = sentence[: match.start()]
                rows.append(
                    {
                        "context_options": [f'{head}"{k}"' for k in options],
                        "continuation": rest.strip(),
                        "gold": options.index(match.group(1)),
                    }
                )
                break  # one sentence per paragraph
    return rows


# ------------------------------------------------------------------------------------ stdlib code
def line_end_rows(documents: Iterable[tuple[str, str]], trained: set[str]) -> list[dict]:
    """language_modeling rows from standard-library files pretraining did not see: a few lines of
    context and a line up to its last word, which is the continuation (with its leading space)."""
    held_out = sorted(
        ((name, text) for name, text in documents if name not in trained), key=lambda d: _hash(d[0])
    )
    rows = []
    for name, text in held_out[:CODE_FILES]:
        lines = text.splitlines()
        candidates, in_string = [], False
        for n, line in enumerate(lines):
            quotes = line.count('"""') + line.count("'''")
            if in_string or quotes:  # docstrings are prose, not code
                in_string = in_string != (quotes % 2 == 1)
                continue
            match = LINE_END.match(line.rstrip())
            if match and n >= CODE_CONTEXT_LINES and not line.strip().startswith("#") and '"' not in line:
                candidates.append((n, match))
        candidates.sort(key=lambda c: _hash(f"icl/code/{name}/{c[0]}"))
        for n, match in sorted(candidates[:LINES_PER_FILE], key=lambda c: c[0]):
            context = "\n".join([*lines[n - CODE_CONTEXT_LINES : n], match.group("head")])
            rows.append({"context": context, "continuation": f" {match.group('word')}"})
    return rows


def write_suite(
    out: Path, topics: dict[str, str], code: Iterable[tuple[str, str]], trained_code: set[str]
) -> dict:
    """OUT/<task>.jsonl for every task; returns the manifest entry (task -> rows, type)."""
    line_ends = line_end_rows(code, trained_code)
    generation = [{"context": r["context"], "answer": r["continuation"].strip()} for r in line_ends[1::3]]
    tasks = {
        "pydoc_topic": ("multiple_choice", topic_questions(topics)),
        "pydoc_keyword": ("schema", keyword_questions(topics)),
        "stdlib_line_end": ("language_modeling", line_ends[0::2]),
        "stdlib_line_end_qa": ("generation_task_with_answers", generation),
    }
    out.mkdir(parents=True, exist_ok=True)
    entry = {}
    for task, (kind, rows) in tasks.items():
        if not rows:
            raise ValueError(f"ICL task {task}: no examples could be built")
        path = out / f"{task}.jsonl"
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        entry[task] = {"file": f"icl/{path.name}", "icl_task_type": kind, "examples": len(rows)}
    return entry
