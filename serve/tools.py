"""Tool calling and reasoning for the chat endpoint: an OpenAI chat request -> the prompt MiniMind's chat template
renders, and the model's text -> OpenAI's message parts (`reasoning_content`, `content`, `tool_calls`), whole or
streamed as `delta`s.

    prompt = render(tokenizer, messages, tools=..., tool_choice=..., template_kwargs=...)  # BadRequest: a 400
    think, calls = thinking(template_kwargs), offers_tools(tools, tool_choice)
    stream = ReplyStream(think, calls=calls); deltas = stream.feed(text) + ... + stream.end()  # OpenAI deltas
    parsed = split(text, think, calls=calls); parsed.message(); finish_reason(reason, parsed.tool_calls)

The model's text (decoded with skip_special_tokens: `<think>`, `</think>`, `<tool_call>` and `</tool_call>` are
ordinary added tokens, so they survive) is read as MiniMind's server reads it:
- with thinking on the prompt ends inside `<think>`, so the text is reasoning up to `</think>`; with it off the
  model may still open a `<think>` block. Every think block goes to `reasoning_content` (an unclosed one to the end
  of the text: a stream cannot wait for a `</think>` that may never come); a stray `</think>` in content is text.
- each `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` outside a think block is a tool call
  (arguments as a JSON string, `json.dumps(ensure_ascii=False)`, the template's own form); a malformed or unclosed
  block stays in `content` as it was written.
- `content` and `reasoning_content` are stripped of surrounding whitespace (and of the whitespace right after a
  think block), None when empty. A stream holds back a possible tag start and trailing whitespace until decided,
  so the streamed deltas concatenated equal `split()` of the whole text.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import jinja2
from jinja2.defaults import DEFAULT_NAMESPACE

THINK, END_THINK, CALL, END_CALL = "<think>", "</think>", "<tool_call>", "</tool_call>"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
# names a chat_template_kwargs key may not replace: apply_chat_template's arguments, the template's variables and
# globals (a key `namespace` would break the template itself)
RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "tokenize", "bos_token", "eos_token",
            "pad_token", "unk_token", "additional_special_tokens", "raise_exception", "strftime_now",
            *DEFAULT_NAMESPACE}


class BadRequest(ValueError):
    """A request the template cannot take; `param` is the top-level field (the message names the exact one)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# -- request -> prompt ------------------------------------------------------------------------------------------

def thinking(template_kwargs: Optional[dict] = None) -> bool:
    """Whether the prompt opens a think block: `open_thinking` (MiniMind's name) or `enable_thinking` (Qwen's) true,
    as MiniMind's server reads chat_template_kwargs."""
    kw = template_kwargs or {}
    for key in ("open_thinking", "enable_thinking"):
        if kw.get(key) is not None and not isinstance(kw[key], bool):
            raise BadRequest("chat_template_kwargs", f"chat_template_kwargs.{key}: must be true or false")
    return bool(kw.get("open_thinking") or kw.get("enable_thinking"))


def offers_tools(tools: Optional[list], tool_choice: Any = None) -> bool:
    """Whether the prompt lists tools, so that `<tool_call>` blocks in the answer are read as calls."""
    return bool(tools) and tool_choice != "none"


def render(tokenizer, messages: list, *, tools: Optional[list] = None, tool_choice: Any = None,
           template_kwargs: Optional[dict] = None) -> str:
    """OpenAI chat messages (dicts) + tools -> the prompt text, generation prompt included. Raises BadRequest."""
    tools = _check_tools(tools)
    _check_choice(tool_choice)
    kw = dict(template_kwargs or {})
    bad = sorted(k for k in kw if k in RESERVED)
    if bad:
        raise BadRequest("chat_template_kwargs", f"chat_template_kwargs.{bad[0]}: not a template option")
    kw["open_thinking"] = thinking(kw)
    kw.pop("enable_thinking", None)
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "messages: a non-empty list is required")
    convs = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    try:
        return tokenizer.apply_chat_template(convs, tools=tools if offers_tools(tools, tool_choice) else None,
                                             add_generation_prompt=True, **kw)
    except (jinja2.TemplateError, TypeError, ValueError) as e:
        raise BadRequest("messages", f"messages: the chat template rejected them ({e})") from None


def _check_tools(tools) -> Optional[list]:
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequest("tools", "tools: must be a list of {\"type\": \"function\", \"function\": {...}}")
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            got = tool.get("type") if isinstance(tool, dict) else type(tool).__name__
            raise BadRequest("tools", f"{at}.type: only \"function\" tools are supported (got {got!r})")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise BadRequest("tools", f"{at}.function: an object with a name is required")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest("tools", f"{at}.function.name: a non-empty string is required")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise BadRequest("tools", f"{at}.function.description: must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise BadRequest("tools", f"{at}.function.parameters: must be a JSON Schema object")
    return tools  # rendered as sent (tojson keeps the keys' order), as MiniMind's server passes them


def _check_choice(choice) -> None:
    if choice is None or choice in ("auto", "none"):
        return
    if choice == "required" or isinstance(choice, dict) and choice.get("type") in ("function", "allowed_tools"):
        raise BadRequest("tool_choice", "tool_choice: MiniMind's chat template cannot force a tool call; use "
                                        "\"auto\" (the model may call any listed tool) or \"none\"")
    raise BadRequest("tool_choice", f"tool_choice: must be \"none\", \"auto\", \"required\" or a named function "
                                    f"(got {choice!r})")


def _text(content, at: str) -> str:
    """OpenAI content (a string, null, or text parts) -> a string."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest("messages", f"{at}.content: must be a string or a list of text parts")


def _message(m, at: str) -> dict:
    if not isinstance(m, dict):
        raise BadRequest("messages", f"{at}: must be an object")
    role = ROLES.get(m.get("role"))
    if role is None:
        raise BadRequest("messages", f"{at}.role: must be one of {', '.join(ROLES)} (got {m.get('role')!r})")
    out = {"role": role, "content": _text(m.get("content"), at)}
    if role == "assistant":
        if m.get("reasoning_content") is not None:
            if not isinstance(m["reasoning_content"], str):
                raise BadRequest("messages", f"{at}.reasoning_content: must be a string")
            out["reasoning_content"] = m["reasoning_content"]
        calls = m.get("tool_calls")
        if calls:
            if not isinstance(calls, list):
                raise BadRequest("messages", f"{at}.tool_calls: must be a list")
            out["tool_calls"] = [_call(c, f"{at}.tool_calls[{j}]") for j, c in enumerate(calls)]
    elif role == "tool" and m.get("tool_call_id") is not None:
        out["tool_call_id"] = m["tool_call_id"]  # the template answers calls by position; kept for the record
    return out


def _call(c, at: str) -> dict:
    fn = c.get("function") if isinstance(c, dict) else None
    if not isinstance(fn, dict):
        raise BadRequest("messages", f"{at}.function: an object with name and arguments is required")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise BadRequest("messages", f"{at}.function.name: a non-empty string is required")
    args = fn.get("arguments")
    if args is None:
        args = "{}"
    if not isinstance(args, (str, dict)):
        raise BadRequest("messages", f"{at}.function.arguments: must be a JSON string")
    # A string goes into the prompt verbatim (the template's and MiniMind's server's way): the arguments this
    # server returned are already in the template's form.
    return {"id": c.get("id"), "type": "function", "function": {"name": fn["name"], "arguments": args}}


# -- model text -> message parts --------------------------------------------------------------------------------

@dataclass
class Parsed:
    reasoning: Optional[str] = None
    content: Optional[str] = None
    tool_calls: list = field(default_factory=list)  # OpenAI's: {"id", "type": "function", "function": {...}}

    def message(self) -> dict:
        """OpenAI's assistant message."""
        out = {"role": "assistant", "content": self.content}
        if self.reasoning is not None:
            out["reasoning_content"] = self.reasoning
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        return out


def finish_reason(reason: str, tool_calls) -> str:
    """The engine's "stop"/"length" -> OpenAI's finish_reason: "tool_calls" when a normal stop made calls."""
    return "tool_calls" if reason == "stop" and tool_calls else reason


def parse_call(block: str) -> Optional[dict]:
    """The text between <tool_call> and </tool_call> -> OpenAI's tool call, or None if it is not one."""
    try:
        call = json.loads(block)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        return None
    args = call.get("arguments")
    if isinstance(args, str):  # a JSON object written as a string: taken as that object
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if args is None:
        args = {}
    if not isinstance(args, dict):
        return None
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class ReplyStream:
    """Text deltas -> OpenAI chat deltas: {"reasoning_content": str}, {"content": str} and
    {"tool_calls": [{"index", "id", "type", "function": {"name", "arguments"}}]} (one whole call each).
    `calls=False` (no tools offered) reads <tool_call> as text."""

    def __init__(self, thinking: bool, *, calls: bool = True):
        self.calls = calls
        self.state = "reasoning" if thinking else "content"  # or "call": inside <tool_call>
        self.pending = ""  # text not yet decided
        self.held = {"reasoning": "", "content": ""}  # trailing whitespace, sent if more text follows
        self.lead = {"reasoning": True, "content": True}  # leading whitespace is dropped
        self.parsed = Parsed()
        self._out: list = []

    def feed(self, text: str) -> list[dict]:
        self.pending += text
        while True:
            if self.state == "call":
                i = self.pending.find(END_CALL)
                if i < 0:
                    break
                block, self.pending = self.pending[:i], self.pending[i + len(END_CALL):]
                self.state = "content"
                call = parse_call(block)
                if call is None:
                    self._put("content", CALL + block + END_CALL)
                else:
                    self._call(call)
                continue
            tags = (END_THINK,) if self.state == "reasoning" else (THINK, CALL) if self.calls else (THINK,)
            hits = [(i, t) for t in tags if (i := self.pending.find(t)) >= 0]
            if not hits:
                keep = _prefix_held(self.pending, tags)
                self._put(self.state, self.pending[:len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                break
            i, tag = min(hits)
            self._put(self.state, self.pending[:i])
            self.pending = self.pending[i + len(tag):]
            self.lead["content"] = tag == END_THINK or not self.parsed.content  # whitespace after </think> goes
            self.state = {THINK: "reasoning", END_THINK: "content", CALL: "call"}[tag]
        return self._take()

    def end(self) -> list[dict]:
        """The deltas left when the text is complete (an unclosed <tool_call> block goes to content as text)."""
        rest, self.pending = self.pending, ""
        self._put("content" if self.state == "call" else self.state, (CALL if self.state == "call" else "") + rest)
        self.held = {"reasoning": "", "content": ""}
        return self._take()

    def _put(self, channel: str, text: str) -> None:
        if self.lead[channel]:
            text = text.lstrip()
            if not text:
                return
            self.lead[channel] = False
        text = self.held[channel] + text
        body = text.rstrip()
        self.held[channel] = text[len(body):]
        if not body:
            return
        setattr(self.parsed, channel, (getattr(self.parsed, channel) or "") + body)
        key = "reasoning_content" if channel == "reasoning" else "content"
        if self._out and key in self._out[-1]:
            self._out[-1][key] += body
        else:
            self._out.append({key: body})

    def _call(self, call: dict) -> None:
        self._out.append({"tool_calls": [{"index": len(self.parsed.tool_calls), **call}]})
        self.parsed.tool_calls.append(call)

    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out


def _prefix_held(text: str, tags) -> int:
    """Length of the longest end of `text` that begins one of `tags`."""
    for n in range(min(max(map(len, tags)) - 1, len(text)), 0, -1):
        if any(t.startswith(text[-n:]) for t in tags):
            return n
    return 0


def split(text: str, thinking: bool, *, calls: bool = True) -> Parsed:
    """The whole model text -> its reasoning, content and tool calls (never raises)."""
    stream = ReplyStream(thinking, calls=calls)
    stream.feed(text)
    stream.end()
    return stream.parsed
