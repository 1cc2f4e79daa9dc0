"""OpenAI's request bodies (the fields this server reads; unknown fields are accepted and ignored, as OpenAI-
compatible servers do) and its error body. Types are strict: `"max_tokens": "8"` is a 400, not a coercion."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Number = Union[StrictInt, StrictFloat]


MAX_LOGPROBS = 20  # OpenAI's limit on alternatives per token

# fields that would change the output and that this server does not implement: refused, never ignored (sent with
# their neutral value, 0 / {} / null, they change nothing and pass)
UNSUPPORTED = {"logit_bias": "logit_bias", "presence_penalty": "presence_penalty (MiniMind's knob is "
               "repetition_penalty)", "frequency_penalty": "frequency_penalty (MiniMind's knob is repetition_penalty)",
               "suffix": "suffix (insertion)", "best_of": "best_of (ask for n choices and rank them yourself)"}


class Sampled(BaseModel):
    """The decoding fields both endpoints share (top_k and repetition_penalty are extensions, MiniMind's knobs)."""
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=0)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=0)
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    repetition_penalty: Optional[Number] = Field(None, gt=0)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    n: StrictInt = Field(1, ge=1, le=128, description="choices per prompt")
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None

    @model_validator(mode="after")
    def _supported(self):
        for name, what in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if not (value in (None, 0, {}, "") or (name == "best_of" and value in (1, self.n))):
                raise ValueError(f"{what} is not supported by this server")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 strings")
        if self.new_tokens == 0 and not getattr(self, "echo", False):
            raise ValueError("max_tokens 0 generates nothing: it scores the prompt with echo: true (completions)")
        return self

    @property
    def new_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: StrictStr
    arguments: StrictStr  # JSON, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Optional[StrictStr] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, list[TextPart]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's earlier calls
    tool_call_id: Optional[StrictStr] = None  # a tool's answer to one of them
    reasoning_content: Optional[StrictStr] = None


class Chat(BaseModel):
    """A conversation to render: messages, tools and the template's switches (serve.tools renders it)."""
    model_config = ConfigDict(extra="allow")
    messages: list[Message] = Field(min_length=1)
    tools: Optional[list[dict[str, Any]]] = None  # raw: rendered with tojson in the key order sent
    tool_choice: Optional[Union[StrictStr, dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None  # accepted, not enforced (MiniMind's server neither)
    chat_template_kwargs: Optional[dict[str, Any]] = None  # enable_thinking / open_thinking
    open_thinking: StrictBool = False  # extension: MiniMind's chat template switch

    @property
    def template_kwargs(self) -> dict:
        kw = dict(self.chat_template_kwargs or {})
        if self.open_thinking:
            kw["open_thinking"] = True
        return kw


class ChatRequest(Chat, Sampled):
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def k(self) -> Optional[int]:
        """Alternatives per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Sampled):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]
    echo: StrictBool = False
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _prompts(self):
        prompts = self.prompts
        if not prompts:
            raise ValueError("prompt: no prompt given")
        empty = next((i for i, p in enumerate(prompts) if not p), None)
        if empty is not None:
            raise ValueError(f"prompt[{empty}] is empty" if len(prompts) > 1 else "the prompt is empty")
        return self

    @property
    def prompts(self) -> list[Union[str, list[int]]]:
        """The batch: one text or token-id list per prompt."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    @property
    def k(self) -> Optional[int]:
        return self.logprobs


class Tokenize(BaseModel):
    """vLLM's /tokenize: a text (with what /v1/completions puts before it, unless add_special_tokens is false) or a
    chat rendered as /v1/chat/completions renders it (`Chat`'s fields)."""
    model_config = ConfigDict(extra="allow")
    prompt: Optional[StrictStr] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True
    return_token_strs: StrictBool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either prompt or messages")
        return self


class Detokenize(BaseModel):
    model_config = ConfigDict(extra="allow")
    tokens: list[StrictInt]


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr  # inside --lora_dir


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
