"""OpenAI's request bodies (the fields this server reads; unknown fields are accepted and ignored, as OpenAI-
compatible servers do) and its error body. Types are strict: `"max_tokens": "8"` is a 400, not a coercion."""
from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator

Number = Union[StrictInt, StrictFloat]


class Sampled(BaseModel):
    """The decoding fields both endpoints share (top_k and repetition_penalty are extensions, MiniMind's knobs)."""
    model_config = ConfigDict(extra="allow")

    model: StrictStr
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1)
    temperature: Optional[Number] = Field(None, ge=0, le=2)
    top_p: Optional[Number] = Field(None, gt=0, le=1)
    top_k: Optional[StrictInt] = Field(None, ge=0)
    repetition_penalty: Optional[Number] = Field(None, gt=0)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    n: StrictInt = Field(1, ge=1, le=1, description="one choice per request")
    stream: StrictBool = False
    stream_options: Optional[dict[str, Any]] = None
    logprobs: Optional[Union[StrictBool, StrictInt]] = None

    @model_validator(mode="after")
    def _supported(self):
        if self.logprobs not in (None, False):
            raise ValueError("logprobs are not supported by this server")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop takes at most 4 strings")
        return self

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


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, list[TextPart]]] = None

    def as_template(self) -> dict:
        content = self.content if isinstance(self.content, str) or self.content is None else \
            "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(Sampled):
    messages: list[Message] = Field(min_length=1)
    open_thinking: StrictBool = False  # extension: MiniMind's chat template switch


class CompletionRequest(Sampled):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]]

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                raise ValueError("one prompt per request (a list of prompts is a batch: send them as separate "
                                 "requests; they are batched here anyway)")
            self.prompt = self.prompt[0]
        if not self.prompt:
            raise ValueError("the prompt is empty")
        return self


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: StrictStr
    path: StrictStr  # inside --lora_dir


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
