"""DBRX Instruct's ChatML conversation format: one definition for fine-tuning data and generation.

The layout is exactly what `databricks/dbrx-instruct`'s `tokenizer_config.json` chat template
renders (and `CHAT_TEMPLATE` below is that template, plus an optional `default_system_prompt`
switch), so a model fine-tuned here and exported to Hugging Face is prompted the same way by
`tokenizer.apply_chat_template`:

    <|im_start|>system\\n{system, stripped}<|im_end|>\\n<|im_start|>user\\n{content}<|im_end|>
    \\n<|im_start|>assistant\\n{content}<|im_end|>  [\\n<|im_start|>assistant\\n]

Turns are joined by a newline *before* each `<|im_start|>` (not after each `<|im_end|>`), so a
conversation ends right after the last `<|im_end|>`. Without a leading system message DBRX's
default system prompt is inserted (`default_system_prompt=False` leaves it out).
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_SYSTEM_PROMPT = (
    "You are DBRX, created by Databricks. You were last updated in December 2023. You answer "
    "questions based on information available up to that point.\n"
    "YOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses "
    "to more complex and open-ended questions.\n"
    "You assist with various tasks, from writing to coding (using markdown for code blocks \u2014 "
    "remember to use ``` with code, JSON, and tables).\n"
    "(You do not have real-time data access or code execution capabilities. You avoid stereotyping "
    "and provide balanced perspectives on controversial topics. You do not provide song lyrics, "
    "poems, or news articles and do not divulge details of your training data.)\n"
    "This is your system prompt, guiding your responses. Do not reference it, just respond to the "
    "user. If you find yourself talking about this message, stop. You should be responding "
    "appropriately and usually that means not mentioning this.\n"
    "YOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY "
    "PERTINENT TO THE USER'S QUERY."
)

ROLES = ("system", "user", "assistant")


class ChatSegment(NamedTuple):
    text: str
    trainable: bool  # True for an assistant turn's content and its closing <|im_end|>
    # (start, end) of each message's content within `text`: what the user wrote, encoded as plain text
    # (a "<|im_end|>" typed in a message must not end the turn); the rest is the template.
    content: tuple[tuple[int, int], ...] = ()


def validate_messages(messages: list[dict]) -> None:
    """Raise ValueError naming the first problem: a list of {"role", "content"} dicts, roles in
    ROLES, "system" only as the first message, non-empty string content, and at least one
    non-system message (DBRX's template renders nothing at all for a system message alone)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.80}")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {list(ROLES)}, got {role!r}")
        if role == "system" and i != 0:
            raise ValueError(
                f"messages[{i}] has role 'system': only the first message may be a system message"
            )
        if not isinstance(content, str) or not content:
            raise ValueError(f"messages[{i}]['content'] must be a non-empty string, got {content!r:.80}")
    if len(messages) == 1 and messages[0]["role"] == "system":
        raise ValueError("messages holds only a system message: add at least one user message")


def chat_segments(
    messages: list[dict], *, add_generation_prompt: bool = False, default_system_prompt: bool = True
) -> list[ChatSegment]:
    """The rendered conversation cut where trainability changes; `"".join(texts) == render_chat`.

    Every boundary between a trainable and a non-trainable segment sits next to a special token, so
    tokenizing each segment separately gives the ids of the whole text (unless an assistant reply
    begins with whitespace that BPE would merge with the preceding newline).
    """
    validate_messages(messages)
    if messages[0]["role"] == "system":
        system, turns = messages[0]["content"], messages[1:]
    else:
        system, turns = (DEFAULT_SYSTEM_PROMPT if default_system_prompt else None), messages
    segments: list[ChatSegment] = []
    prefix, spans = "", []  # the pending non-trainable text and its content spans

    def add_content(text: str) -> None:
        nonlocal prefix
        spans.append((len(prefix), len(prefix) + len(text)))
        prefix += text

    if system is not None:
        prefix = "<|im_start|>system\n"
        add_content(system.strip())
        prefix += "<|im_end|>\n"
    for i, message in enumerate(turns):
        prefix += f"{'' if i == 0 else chr(10)}<|im_start|>{message['role']}\n"
        if message["role"] == "assistant":
            segments.append(ChatSegment(prefix, False, tuple(spans)))
            content = message["content"]
            segments.append(ChatSegment(content + "<|im_end|>", True, ((0, len(content)),)))
            prefix, spans = "", []
        else:
            add_content(message["content"])
            prefix += "<|im_end|>"
    if add_generation_prompt:
        prefix += "\n<|im_start|>assistant\n"
    if prefix:
        segments.append(ChatSegment(prefix, False, tuple(spans)))
    return segments


def render_chat(
    messages: list[dict], *, add_generation_prompt: bool = False, default_system_prompt: bool = True
) -> str:
    segments = chat_segments(
        messages, add_generation_prompt=add_generation_prompt, default_system_prompt=default_system_prompt
    )
    return "".join(segment.text for segment in segments)


def _jinja_string(s: str) -> str:
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# DBRX Instruct's template, with `default_system_prompt` (undefined = true) as an extra switch that
# `apply_chat_template(..., default_system_prompt=False)` passes through.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% elif default_system_prompt is not defined or default_system_prompt %}"
    "{% set loop_messages = messages %}{% set system_message = "
    + _jinja_string(DEFAULT_SYSTEM_PROMPT)
    + " %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 %}"
    "{% if system_message != false %}{{ '<|im_start|>system\\n' + system_message | trim + '<|im_end|>\\n'}}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% else %}"
    "{{ '\\n' + '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
    "{% endif %}"
    "{% if (add_generation_prompt == true and loop.last) %}{{ '\\n' + '<|im_start|>' + 'assistant' + '\\n' }}{% endif %}"
    "{% endfor %}"
)
