"""serve.tools: chat requests with tools -> the prompt MiniMind's own template renders through `transformers`
(a two-turn tool exchange, thinking on and off), the model's text -> reasoning / content / tool calls equal to an
independent regex reading of it, streamed in any chunking to the same parts, in shapes the `openai` client
reads; bad tools, tool_choice and messages are errors naming the field."""
from __future__ import annotations

import json
import os
import random
import re

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from conftest import fixture_dir
from minimind_jax.tokenizer import load_tokenizer
from serve.tools import (CALL, END_CALL, THINK, BadRequest, ReplyStream, finish_reason, offers_tools, parse_call,
                         render, split, thinking)

os.environ["HF_HUB_OFFLINE"] = "1"  # the fixture folder has every file: transformers must not go online

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询城市的天气",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"}},
                   "required": ["city"]}}}
CALC = {"type": "function", "function": {
    "name": "calculate", "description": "Evaluate a math expression",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
    "strict": True}}
TOOLS = [WEATHER, CALC]
CALL_TEXT = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(fixture_dir("tokenizer_minimind"))


@pytest.fixture(scope="module")
def hf():
    """MiniMind's tokenizer as MiniMind's own code loads it (transformers.AutoTokenizer)."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(fixture_dir("tokenizer_minimind")))


def _hf(hf, messages, tools=None, think=False):
    return hf.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True,
                                  open_thinking=think)


# -- request -> prompt ------------------------------------------------------------------------------------------

def _exchange():
    """user -> assistant calls two tools -> two tool results -> assistant answers (reasoning kept) -> user."""
    return [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "北京天气怎么样？再算一下 256*37。"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}},
            {"id": "call_b", "type": "function",
             "function": {"name": "calculate", "arguments": '{"expression": "256*37"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temperature": "22°C", "condition": "晴"}'},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"result": 9472}'},
        {"role": "assistant", "content": "北京晴，22°C；256*37=9472。", "reasoning_content": "两个工具都返回了。"},
        {"role": "user", "content": "Thanks! And Shanghai?"},
    ]


@pytest.mark.parametrize("kwargs,think", [(None, False), ({"enable_thinking": False}, False),
                                          ({"enable_thinking": True}, True), ({"open_thinking": True}, True)])
@pytest.mark.parametrize("turns", [2, 3, 5, 7])
def test_prompt_equals_minimind_template_through_transformers(tok, hf, turns, kwargs, think):
    messages = _exchange()[:turns]
    got = render(tok, messages, tools=TOOLS, tool_choice="auto", template_kwargs=kwargs)
    assert got == _hf(hf, messages, TOOLS, think)
    assert got.endswith("<|im_start|>assistant\n" + ("<think>\n" if think else "<think>\n\n</think>\n\n"))
    if turns >= 5:
        assert ('<tool_call>\n{"name": "calculate", "arguments": {"expression": "256*37"}}\n</tool_call><|im_end|>\n'
                '<|im_start|>user\n<tool_response>\n{"temperature": "22°C", "condition": "晴"}\n</tool_response>\n'
                '<tool_response>\n{"result": 9472}\n</tool_response><|im_end|>\n') in got


def test_prompt_without_tools_and_with_openai_spellings(tok, hf):
    messages = _exchange()[:2]
    plain = _hf(hf, messages)
    assert render(tok, messages) == plain
    assert render(tok, messages, tools=TOOLS, tool_choice="none") == plain  # "none": the tools are not shown
    assert render(tok, messages, tools=[]) == plain
    dev = [{"role": "developer", "content": [{"type": "text", "text": "你是一个"}, {"type": "text", "text": "助手。"}]},
           {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert render(tok, dev, tools=TOOLS) == _hf(hf, [{"role": "system", "content": "你是一个助手。"},
                                                     {"role": "user", "content": "hi"}], TOOLS)
    inline = [*messages, {"role": "assistant", "content": "<think>\n想一想\n</think>\n\n好的"},
              {"role": "user", "content": "next"}]  # no reasoning_content: the template splits the think block
    assert render(tok, inline, template_kwargs={"open_thinking": True, "custom_flag": 1}) == \
        _hf(hf, inline, think=True)


def test_two_turn_tool_exchange_through_openai_client_types(tok, hf):
    """Turn 1's answer -> OpenAI's response as the `openai` client parses it -> the message the client sends back
    with the tool's result -> turn 2's prompt: MiniMind's template renders it the same, the call as written."""
    messages = [{"role": "user", "content": "北京天气怎么样？"}]
    assert render(tok, messages, tools=TOOLS) == _hf(hf, messages, TOOLS)
    parsed = split(CALL_TEXT, thinking=False)
    body = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": parsed.message(), "finish_reason": finish_reason("stop", parsed.tool_calls)}]}
    choice = ChatCompletion.model_validate(body).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京"}
    messages += [choice.message.to_dict(),
                 {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 22})}]
    second = render(tok, messages, tools=TOOLS)
    assert second == _hf(hf, messages, TOOLS)
    assert ("<|im_start|>assistant\n<think>\n\n</think>\n\n" + CALL_TEXT + "<|im_end|>\n<|im_start|>user\n"
            "<tool_response>\n{\"temperature\": 22}\n</tool_response><|im_end|>\n") in second

    # the same answer streamed, read as the client accumulates delta.tool_calls
    stream = ReplyStream(thinking=True)
    text = "用户问天气，调用工具。\n</think>\n\n" + CALL_TEXT
    deltas = [d for piece in re.findall(r".{1,3}", text, re.S) for d in stream.feed(piece)] + stream.end()
    reasoning, calls = "", {}
    for d in deltas:
        chunk = ChatCompletionChunk.model_validate({"id": "c", "object": "chat.completion.chunk", "created": 1,
                                                    "model": "m", "choices": [{"index": 0, "delta": d}]})
        delta = chunk.choices[0].delta
        reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
        assert not delta.content
        for tc in delta.tool_calls or []:
            calls.setdefault(tc.index, {"name": "", "arguments": ""})
            calls[tc.index]["name"] += tc.function.name or ""
            calls[tc.index]["arguments"] += tc.function.arguments or ""
    assert reasoning == "用户问天气，调用工具。"
    assert calls == {0: {"name": "get_weather", "arguments": '{"city": "北京"}'}}


@pytest.mark.parametrize("kwargs,where", [
    ({"tools": {"name": "f"}}, "tools:"),
    ({"tools": [{"name": "f"}]}, "tools[0].type"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [WEATHER, {"type": "function"}]}, "tools[1].function:"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice:"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice:"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice:"),
    ({"template_kwargs": {"enable_thinking": "yes"}}, "chat_template_kwargs.enable_thinking"),
    ({"template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ({"template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"template_kwargs": {"namespace": 1}}, "chat_template_kwargs.namespace"),
    ({"messages": []}, "messages:"),
    ({"messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [{"id": "c"}]}]},
     "messages[1].tool_calls[0].function"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"arguments": "{}"}}]}]}, "messages[1].tool_calls[0].function.name"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": 3}}]}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "assistant", "content": "a", "reasoning_content": 1}]}, "messages[0].reasoning_content"),
])
def test_bad_requests_name_the_field(tok, kwargs, where):
    kwargs = {"messages": [{"role": "user", "content": "hi"}], **kwargs}
    with pytest.raises(BadRequest) as e:
        render(tok, kwargs.pop("messages"), **kwargs)
    assert where in str(e.value) and isinstance(e.value, ValueError)
    assert e.value.param == where.split(".")[0].split("[")[0].rstrip(":")
    assert "\n" not in str(e.value)


def test_thinking_and_offers_tools():
    assert thinking(None) is False and thinking({"open_thinking": True}) and thinking({"enable_thinking": True})
    assert thinking({"open_thinking": False, "enable_thinking": True})  # either one, as MiniMind's server reads it
    assert offers_tools(TOOLS) and offers_tools(TOOLS, "auto") and not offers_tools(TOOLS, "none")
    assert not offers_tools(None) and not offers_tools([])


# -- model text -> message parts --------------------------------------------------------------------------------

def _reference(text: str, think: bool, calls: bool = True):
    """An independent reading (regexes, MiniMind's server's way): each think block -> reasoning (the whitespace
    after it dropped), each valid tool-call block -> a call, the rest -> content; both stripped."""
    text = (THINK if think else "") + text
    block = r"<think>.*?(?:</think>|\Z)" + (r"|<tool_call>.*?(?:</tool_call>|\Z)" if calls else "")
    reasoning, content, found, after_think = "", "", [], False
    for k, piece in enumerate(re.split(f"({block})", text, flags=re.S)):
        if k % 2 == 0:
            content += piece.lstrip() if after_think else piece
            after_think = False
        elif piece.startswith(THINK):
            reasoning += piece[len(THINK):].removesuffix("</think>")
            after_think = True
        else:
            call = parse_call(piece[len(CALL):-len(END_CALL)]) if piece.endswith(END_CALL) else None
            if call is None:
                content += piece
            else:
                found.append(call["function"])
    return reasoning.strip() or None, content.strip() or None, found


def _parts(parsed):
    return parsed.reasoning, parsed.content, [c["function"] for c in parsed.tool_calls]


def _streamed(chunks, think: bool, calls: bool = True):
    stream = ReplyStream(think, calls=calls)
    deltas = [d for c in chunks for d in stream.feed(c)] + stream.end()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    found = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [tc["index"] for tc in found] == list(range(len(found)))
    assert all(len(d) == 1 and all(d.values()) for d in deltas)  # one non-empty part per delta
    return reasoning or None, content or None, [tc["function"] for tc in found]


SPLIT_CASES = [  # (text, thinking, (reasoning, content, call names))
    ("你好！", False, (None, "你好！", [])),
    ("推理过程\n</think>\n\n答案", True, ("推理过程", "答案", [])),
    ("只想了一半", True, ("只想了一半", None, [])),  # ran out inside the think block
    ("<think>\n自己开了思考\n</think>\n\n答案", False, ("自己开了思考", "答案", [])),
    (CALL_TEXT, False, (None, None, ["get_weather"])),
    ("让我查一下。\n" + CALL_TEXT + "\n" + CALL_TEXT.replace("北京", "上海"), False,
     (None, "让我查一下。", ["get_weather", "get_weather"])),
    ("想\n</think>\n\n" + CALL_TEXT, True, ("想", None, ["get_weather"])),
    ("<tool_call>\n{bad json}\n</tool_call>", False, (None, "<tool_call>\n{bad json}\n</tool_call>", [])),
    ('<tool_call>{"arguments": {}}</tool_call>', False, (None, '<tool_call>{"arguments": {}}</tool_call>', [])),
    ('a <tool_call>{"name": "f"', False, (None, 'a <tool_call>{"name": "f"', [])),  # unclosed: text
    ("x</think>y", False, (None, "x</think>y", [])),  # a stray close tag in content is text
    ("想 " + CALL_TEXT + " </think>答", True, ("想 " + CALL_TEXT, "答", [])),  # a call inside reasoning is text
    ("a < b <thin k> c <tool_", False, (None, "a < b <thin k> c <tool_", [])),
]


@pytest.mark.parametrize("text,think,want", SPLIT_CASES)
def test_split_cases(text, think, want):
    got = split(text, think)
    assert _parts(got)[:2] == want[:2] and [f["name"] for f in _parts(got)[2]] == want[2]
    assert _parts(got) == _reference(text, think)
    assert finish_reason("stop", got.tool_calls) == ("tool_calls" if want[2] else "stop")
    assert finish_reason("length", got.tool_calls) == "length"


def test_parsed_calls_are_openai_tool_calls():
    calls = split(CALL_TEXT + '<tool_call>{"name": "calculate", "arguments": "{\\"expression\\": \\"1+1\\"}"}'
                  '</tool_call><tool_call>{"name": "now"}</tool_call>', False).tool_calls
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "北京"}'},
                                              {"name": "calculate", "arguments": '{"expression": "1+1"}'},
                                              {"name": "now", "arguments": "{}"}]
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", c["id"]) and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 3
    for bad in ['["get_weather"]', '{"name": ""}', '{"name": "f", "arguments": [1]}', '{"name": "f", "arguments": "x"}',
                '{"name": 3}', "", "null"]:
        assert parse_call(bad) is None, bad


def test_tags_survive_the_servers_decoding(tok):
    """<think>, </think>, <tool_call>, </tool_call> are ordinary added tokens: decode(skip_special_tokens=True), as
    the server's TextStream decodes, keeps them whole (one token each) and drops only <|im_end|>."""
    text = "想一想\n</think>\n\n" + CALL_TEXT
    ids = tok.encode(text + "<|im_end|>")
    assert [tok.token_to_id(t) for t in (THINK, "</think>", CALL, END_CALL)] == [25, 26, 21, 22]
    assert {25, 21, 22} <= set(tok.encode(THINK + CALL_TEXT)) and 26 in ids
    assert tok.decode(ids, skip_special_tokens=True) == text
    pieces = [tok.decode(ids[:i + 1], skip_special_tokens=True) for i in range(len(ids))]
    chunks = [b[len(a):] for a, b in zip(["", *pieces], pieces)]
    assert _streamed(chunks, True) == ("想一想", None, [{"name": "get_weather", "arguments": '{"city": "北京"}'}])


def test_calls_off_reads_tool_call_blocks_as_text():
    assert _parts(split(CALL_TEXT, False, calls=False)) == (None, CALL_TEXT, [])
    assert _streamed(list(CALL_TEXT), False, calls=False) == (None, CALL_TEXT, [])


@pytest.mark.parametrize("text,think", [(t, k) for t, k, _ in SPLIT_CASES])
def test_streamed_at_every_boundary_equals_split(text, think):
    want = _parts(split(text, think))
    assert _streamed(list(text), think) == want  # a character at a time
    for i in range(len(text) + 1):
        assert _streamed([text[:i], text[i:]], think) == want, i
        for j in range(i, len(text) + 1, 5):
            assert _streamed([text[:i], text[i:j], text[j:]], think) == want, (i, j)


WORDS = [THINK, "</think>", CALL, END_CALL, "\n", "\n\n", " ", "答案", "reason", "<", "</", "<tool", "<think",
         "</tool_call", '{"name": "f", "arguments": {"x": 1}}', '{"name": "天气"}', '{"arguments": {}}', "{bad",
         '"s"', '{"name": "g", "arguments": "{\\"y\\": [1, 2]}"}']


def test_random_texts_in_random_chunks_equal_the_reference():
    rng = random.Random(0)
    for n in range(3000):
        text = "".join(rng.choice(WORDS) for _ in range(rng.randint(0, 14)))
        think, calls = rng.random() < 0.5, rng.random() < 0.85
        want = _reference(text, think, calls)
        assert _parts(split(text, think, calls=calls)) == want, (text, think, calls)
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        assert _streamed(chunks, think, calls) == want, (chunks, think, calls)
