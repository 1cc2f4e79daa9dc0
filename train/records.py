"""MiniMind SFT jsonl records: one conversation per line, validated into chat-template messages.

Input: one `{"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}` per line
(optional MiniMind fields `reasoning_content`, `tools` (on the system message), `tool_calls`; JSON strings or
objects). Anything else is a `DataError` whose message is one line naming the file and the 1-based line, so the
CLI can print it as is instead of a traceback.
"""
from __future__ import annotations

import json
from typing import Optional

# MiniMind's pre_processing_chat system prompts (data, kept identical so the augmentation matches).
SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)
EMPTY_THINK = "<think>\n\n</think>\n\n"
ROLES = ("system", "user", "assistant", "tool")
SHAPE = '{"conversations": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}'


class DataError(ValueError):
    """Bad SFT input: one line, `file:line: what is wrong` (or `file: ...` for a whole file); the CLI prints it."""


def decode_line(raw: bytes, where: str) -> str:
    """One raw jsonl line -> its text without BOM and surrounding whitespace ('' for a blank line)."""
    try:
        return raw.decode("utf-8").lstrip("\ufeff").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None


def _json_field(m: dict, key: str, where: str, k: int):
    value = m.get(key)
    if isinstance(value, str):  # MiniMind stores tools / tool_calls as JSON strings
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: message {k}: '{key}' is not valid JSON ({e.msg})") from None
    return value


def _message(m, k: int, where: str) -> tuple[dict, Optional[list], bool]:
    """One conversation entry -> (template message, the tools it declares, whether it has any)."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: message {k} is not an object: {m!r:.60}")
    role = m.get("role")
    if role not in ROLES:
        raise DataError(f"{where}: message {k} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
    msg = {"role": role}
    tool_calls = _json_field(m, "tool_calls", where, k)
    content = m.get("content")
    if isinstance(content, str):
        msg["content"] = content
    elif content is not None or not tool_calls:  # only a tool-calling assistant turn may omit content
        raise DataError(f"{where}: message {k} ({role}): 'content' must be a string, got {content!r:.60}")
    reasoning = m.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise DataError(f"{where}: message {k}: 'reasoning_content' must be a string")
        msg["reasoning_content"] = reasoning
    if tool_calls:
        msg["tool_calls"] = tool_calls
    msg_tools = _json_field(m, "tools", where, k)
    tools = None
    if msg_tools and role == "system":  # MiniMind only passes a system message's tools to the template
        tools = msg_tools if isinstance(msg_tools, list) else [msg_tools]
    return msg, tools, bool(m.get("tools"))  # ... but never adds a system prompt to any tool data


def parse_record(line: str, where: str) -> tuple[list[dict], Optional[list], bool]:
    """One jsonl line -> (messages for the template, tools, has_tools). Raises DataError naming `where`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg}: column {e.colno})") from None
    if not isinstance(obj, dict) or "conversations" not in obj:
        raise DataError(f'{where}: no "conversations" key (expected {SHAPE})')
    convs = obj["conversations"]
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of messages, got {convs!r:.60}")
    messages, tools, has_tools = [], None, False
    for k, m in enumerate(convs):
        msg, msg_tools, msg_has_tools = _message(m, k, where)
        messages.append(msg)
        tools = msg_tools or tools  # the last system message with tools wins, as before
        has_tools |= msg_has_tools
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn to learn from")
    return messages, tools, has_tools
