"""Tokenizer + chat template without `transformers`.

`load_tokenizer(dir)` reads `tokenizer.json` (HF `tokenizers`) and `tokenizer_config.json` (special tokens,
`chat_template`) and returns a `ChatTokenizer`. `apply_chat_template` reproduces what transformers'
`PreTrainedTokenizerBase.apply_chat_template(..., tokenize=False)` does for MiniMind's template:
an ImmutableSandboxedEnvironment with trim_blocks/lstrip_blocks and loopcontrols, a `tojson` filter that is
plain `json.dumps(ensure_ascii=False)` (Jinja's own one HTML-escapes), the `raise_exception` and
`strftime_now` globals, and the special-token strings (bos_token, eos_token, ...) as template variables.

MiniMind's template switches thinking with the variable `open_thinking` (only read when
add_generation_prompt=True); `enable_thinking` (Qwen's name) is accepted as an alias.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

ASSETS = Path(__file__).resolve().parent / "assets"  # package data: a wheel carries it
DEFAULT_TOKENIZER_DIR = ASSETS / "tokenizer"
CHAT_TEMPLATE_FILE = ASSETS / "chat_template.jinja"
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def compile_chat_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _token_str(value) -> Optional[str]:
    # tokenizer_config.json stores a special token either as a string or as a serialized AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value


class ChatTokenizer:
    """Thin wrapper over `tokenizers.Tokenizer` with HF-style special tokens and chat template."""

    def __init__(self, tokenizer: Tokenizer, config: dict, path: Optional[Path] = None,
                 chat_template: Optional[str] = None):
        self.tokenizer = tokenizer
        self.config = config
        self.path = path
        self.chat_template = chat_template
        for key in _SPECIAL_KEYS:
            setattr(self, key, _token_str(config.get(key)))
        self.additional_special_tokens = [_token_str(t) for t in config.get("additional_special_tokens", [])]
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        self.pad_token_id = self.token_to_id(self.pad_token)
        self.unk_token_id = self.token_to_id(self.unk_token)
        # Same as len(hf_tokenizer): base vocab plus added tokens (6400 for MiniMind).
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.fingerprint = hashlib.sha256(
            tokenizer.to_str().encode() + json.dumps(config, sort_keys=True).encode() + (chat_template or "").encode()
        ).hexdigest()

    def token_to_id(self, token: Optional[str]) -> Optional[int]:
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # MiniMind's tokenizer has no post-processor, so add_special_tokens changes nothing for it; default off
        # so a tokenizer that has one does not silently get an extra bos in SFT data.
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @property
    def special_tokens_map(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in _SPECIAL_KEYS if getattr(self, k) is not None}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    def apply_chat_template(
        self,
        messages: Sequence[dict],
        tools: Optional[Sequence[dict]] = None,
        add_generation_prompt: bool = False,
        open_thinking: Optional[bool] = None,
        tokenize: bool = False,
        **kwargs,
    ):
        """Render `messages` (list of {role, content, ...}) to the prompt string (or its ids if tokenize=True)."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer at {self.path} has no chat_template in tokenizer_config.json")
        if "enable_thinking" in kwargs and open_thinking is None:
            open_thinking = kwargs.pop("enable_thinking")
        if open_thinking is not None:
            kwargs["open_thinking"] = bool(open_thinking)
        if tools is not None:
            bad = [t for t in tools if not isinstance(t, dict)]
            if bad:
                raise TypeError(f"tools must be JSON-schema dicts, got {type(bad[0]).__name__}")
        text = compile_chat_template(self.chat_template).render(
            messages=list(messages), tools=tools, documents=None, add_generation_prompt=add_generation_prompt,
            **{**self.special_tokens_map, **kwargs},
        )
        return self.encode(text) if tokenize else text

    def __repr__(self):
        return f"ChatTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path_dir: Optional[str | Path] = None) -> ChatTokenizer:
    """Load `tokenizer.json` + `tokenizer_config.json` from a directory
    (default: the bundled minimind_jax/assets/tokenizer)."""
    path = Path(path_dir) if path_dir is not None else DEFAULT_TOKENIZER_DIR
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(
            f"no tokenizer.json in {path} (expected a HF tokenizers directory with tokenizer.json and "
            f"tokenizer_config.json; the bundled one is {DEFAULT_TOKENIZER_DIR})"
        )
    cfg_file = path / "tokenizer_config.json"
    config = json.loads(cfg_file.read_text(encoding="utf-8")) if cfg_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):  # HF's multi-template form: [{"name": ..., "template": ...}]
        named = {t["name"]: t["template"] for t in template}
        template = named.get("default")
    jinja_file = path / "chat_template.jinja"  # newer transformers save the template separately
    if template is None and jinja_file.is_file():
        template = jinja_file.read_text(encoding="utf-8")
    return ChatTokenizer(Tokenizer.from_file(str(tok_file)), config, path=path, chat_template=template)
