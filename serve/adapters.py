"""The served adapters: named, stacked for per-row gathering, loaded and unloaded while requests run.

    stack = AdapterStack(params, config)
    stack.add("identity", adapter); stack.add("medical", other)
    key = stack.resolve("identity+0.5*medical")   # a weighted mix: lora.combine (exact), built once, cached
    handle = stack.acquire(key) ... stack.release(handle)   # held by a request from submit to its end
    stack.arrays()                                  # the stacked lora.Adapter the engine's step gathers from

Every adapter keeps its index in the stack for as long as it is loaded, so a request decoding with index 3 keeps
decoding with it while others are loaded; an unloaded adapter disappears for new requests at once and frees its
index when its last request ends. The stack's shape (capacity: powers of two; rank: the largest rank rounded up to
a power of two; the union of adapted modules) only grows, and only a growth compiles new code: loading an adapter of
a rank and modules already covered, into a free index, costs no compilation.
"""
from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import lora

MIX_CACHE = 8  # weighted mixes kept built (least recently used dropped first, never one in use)


@dataclass(eq=False)  # a handle: compared by identity
class _Entry:
    adapter: lora.Adapter
    index: int
    info: dict
    users: int = 0
    parts: tuple = ()  # a mix: the names it was built from


def _pow2(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


class AdapterStack:
    def __init__(self, params, config, capacity: int = 8):
        self._params, self._config = params, config
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}  # the loaded adapters and built mixes, by name
        self._retired: list[_Entry] = []  # unloaded but still decoding for a request
        self._mixes: OrderedDict[str, None] = OrderedDict()
        self._capacity = _pow2(capacity, 1)
        self._rank = 0
        self._paths: set = set()
        self._arrays = None
        self._dirty = False
        self.compiles = 0  # how many times the stack's shape grew (each costs the engine a new compile)

    # -- names ---------------------------------------------------------------------------------------------------
    def add(self, name: str, adapter: lora.Adapter, info: Optional[dict] = None) -> None:
        """Serve `adapter` as `name` (replacing a loaded one of that name: running requests keep the old one)."""
        if not re.fullmatch(lora.MIX_NAME, name) or name.replace(".", "") == "":
            raise ValueError(f"adapter name {name!r}: use letters, digits, '_', '-', '.'")
        with self._lock:
            if name in self._entries:
                self.remove(name)
            info = dict(info or {}, rank=max(adapter.ranks.values()), targets=adapter.targets)
            self._put(name, _Entry(adapter, self._free_index(), info))

    def remove(self, name: str) -> None:
        """Unload `name` (KeyError if not loaded) and every cached mix built from it."""
        with self._lock:
            if name not in self._entries or self._entries[name].parts:
                raise KeyError(name)
            self._retire(name)
            for mix in [m for m, e in self._entries.items() if name in e.parts]:
                self._retire(mix)

    def names(self) -> dict[str, dict]:
        """Loaded adapters (not mixes) and their info."""
        with self._lock:
            return {n: dict(e.info) for n, e in self._entries.items() if not e.parts}

    def resolve(self, model: str) -> str:
        """An adapter's name, or a mix expression -> the key requests use (a mix is built and cached here).
        KeyError names the unknown adapter; ValueError a malformed mix."""
        with self._lock:
            entry = self._entries.get(model)
            if entry is not None:
                if entry.parts:
                    self._mixes.move_to_end(model)
                return model
            terms = lora.parse_mix(model, signed=True)  # "a+-0.5*b": an adapter taken away is a mix too
            for _, n in terms:
                e = self._entries.get(n)
                if e is None or e.parts:
                    raise KeyError(n)
            if len(terms) == 1 and terms[0][0] == 1.0:
                return terms[0][1]
            key = "+".join(n if w == 1.0 else f"{w:g}*{n}" for w, n in terms)
            if key in self._entries:
                self._mixes.move_to_end(key)
                return key
            mixed = lora.combine([self._entries[n].adapter for _, n in terms], [w for w, _ in terms])
            self._evict_mixes()
            info = {"rank": max(mixed.ranks.values()), "targets": mixed.targets, "mix": model}
            self._put(key, _Entry(mixed, self._free_index(), info, parts=tuple(n for _, n in terms)))
            self._mixes[key] = None
            return key

    # -- request lifetime ----------------------------------------------------------------------------------------
    def acquire(self, key: Optional[str]) -> Optional[_Entry]:
        """A handle on `key`'s adapter (None: the base) that keeps its index until `release`; KeyError if unknown."""
        if key is None:
            return None
        with self._lock:
            entry = self._entries[key]
            entry.users += 1
            return entry

    def hold(self, model: str) -> tuple[str, _Entry]:
        """resolve + acquire in one step (a mix cannot be evicted in between): -> (key, handle)."""
        with self._lock:
            key = self.resolve(model)
            return key, self.acquire(key)

    def release(self, handle: Optional[_Entry]) -> None:
        if handle is None:
            return
        with self._lock:
            handle.users -= 1
            if handle.users == 0 and handle in self._retired:
                self._retired.remove(handle)
                self._dirty = True

    def arrays(self) -> Optional[lora.Adapter]:
        """The stacked adapter [capacity, ...] (scales folded, ranks zero-padded), rebuilt after a change; None while
        nothing was ever loaded (the base alone: the engine's step then has no low-rank branch at all)."""
        with self._lock:
            if self._dirty:
                self._arrays = self._build()
                self._dirty = False
            return self._arrays

    # -- internals -----------------------------------------------------------------------------------------------
    def _put(self, key: str, entry: _Entry) -> None:
        self._entries[key] = entry
        grew = False
        if entry.index >= self._capacity:
            self._capacity *= 2
            grew = True
        rank = _pow2(entry.info["rank"], 8)
        if rank > self._rank:
            grew = grew or self._rank > 0
            self._rank = rank
        paths = {p for p, _ in entry.adapter.modules()}
        if not paths <= self._paths:
            grew = grew or bool(self._paths)
            self._paths |= paths
        self.compiles += grew
        self._dirty = True

    def _retire(self, key: str) -> None:
        entry = self._entries.pop(key)
        self._mixes.pop(key, None)
        if entry.users:
            self._retired.append(entry)
        self._dirty = True

    def _live(self) -> list[_Entry]:
        return list(self._entries.values()) + self._retired

    def _free_index(self) -> int:
        used = {e.index for e in self._live()}
        return next(i for i in range(len(used) + 1) if i not in used)

    def _evict_mixes(self) -> None:
        for key in list(self._mixes):
            if len(self._mixes) < MIX_CACHE:
                return
            if self._entries[key].users == 0:
                self._retire(key)

    def _build(self) -> lora.Adapter:
        weights: dict = {}
        for path in self._paths:  # every module ever adapted stays in the shape (zeros once unloaded)
            i, o = lora.get_path(self._params, path + ("kernel",)).shape
            lora.set_path(weights, path, {"A": np.zeros((self._capacity, i, self._rank), np.float32),
                                          "B": np.zeros((self._capacity, self._rank, o), np.float32)})
        for entry in self._live():
            for path, ab in lora.Adapter(lora.folded(entry.adapter)).modules():  # the scale rides on B
                r = ab["A"].shape[-1]
                node = lora.get_path(weights, path)
                node["A"][entry.index, :, :r] = np.asarray(ab["A"], np.float32)
                node["B"][entry.index, :r, :] = np.asarray(ab["B"], np.float32)
        return lora.Adapter(jax.tree.map(jnp.asarray, weights), targets="served")
