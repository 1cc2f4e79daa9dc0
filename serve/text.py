"""Token ids -> text as they come, for streaming: whole characters only, and OpenAI's `stop` strings.

A byte-level BPE splits a character over several tokens, so text ending in U+FFFD waits for the rest; text that
could be the start of a stop string waits until it is not (a stop string is never sent, even in part).
"""
from __future__ import annotations

import functools
from typing import Sequence


class TextStream:
    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the text handed out so far
        self.stopped = False  # a stop string was found: the text ends before it

    def put(self, token: int) -> str:
        """The new text that is safe to send after `token` ('' while it waits)."""
        if self.stopped:
            return ""
        self.ids.append(int(token))
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        cut = self._stop_at(text)
        if cut is not None:
            self.stopped = True
            return self._send(text[:cut])
        return self._send(text[:len(text) - self._held(text)])

    def end(self) -> str:
        """The rest of the text when generation ended (held characters included, unless a stop string cut it)."""
        if self.stopped:
            return ""
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        self.stopped = cut is not None
        return self._send(text if cut is None else text[:cut])

    def _send(self, upto: str) -> str:
        new = upto[len(self.text):]
        if len(upto) > len(self.text):
            self.text = upto
        return new

    def _stop_at(self, text: str):
        hits = [i for i in (text.find(s, max(0, len(self.text) - len(s))) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held(self, text: str) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best


@functools.lru_cache(maxsize=1)
def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the character a byte-level BPE writes for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class Pieces:
    """Each token's own text and bytes (logprobs name tokens by them): the text is what decoding the token alone
    gives (U+FFFD for part of a character: a byte-level BPE splits characters), the bytes are exact."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.text = functools.lru_cache(maxsize=None)(lambda i: tokenizer.decode([i]))

    def bytes(self, token: int) -> list[int]:
        raw, byte_of = self.tok.tokenizer.id_to_token(int(token)) or "", _byte_of()
        if raw and all(ch in byte_of for ch in raw):
            return [byte_of[ch] for ch in raw]
        return list(self.text(token).encode())
