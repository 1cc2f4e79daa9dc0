"""SFT jsonl -> tokenized, cached `SFTDataset`: MiniMind's ids and labels, with its two augmentations.

Each line (format: train.records) is rendered with the tokenizer's chat template and tokenized exactly like
MiniMind's `SFTDataset`: `ids = tokenize(prompt)[:max_seq_len]`, labels = ids inside each assistant reply (from
just after the `<|im_start|>assistant\\n` token sequence through the next `<|im_end|>\\n` inclusive, or to the end
when truncated), -100 elsewhere. MiniMind's two random augmentations are kept, with its names and defaults:
`add_system_ratio` (prepend one of `SYSTEM_PROMPTS`, unless the first message is a system one or any message has
tools) and `empty_think_ratio` (probability of KEEPING the template's empty `<think>\\n\\n</think>\\n\\n`).
Their draws come from `np.random.default_rng([seed, epoch, 1])`, one row per sample index, so a sample's variant
depends only on (seed, epoch, index): reproducible, resumable, and identical in padded and packed mode.

Cache: tokenization happens once (streamed line by line, never the whole file in memory) into
`<cache_dir>/<name>-<key>.{tokens.bin,index.npz}`, key = sha256(file bytes, tokenizer files, max_seq_len,
skip_bad_lines, format version). Augmentations are random per epoch, so the cache stores, per sample, the ids of
the conversation as written with the empty think blocks kept AND dropped (the drop variant only when the text has
one; both truncated to max_seq_len). The system prompt variant is `prefix_ids[k] + base_ids`: the prefix ends with
`<|im_end|>\\n` and the conversation starts with the special token `<|im_start|>`, at which the tokenizer always
splits, so the concatenation equals tokenizing the whole text (checked at load time). Hence the ratios and the
seed are not part of the key.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from minimind_jax.model import IGNORE_INDEX
from train.records import EMPTY_THINK, SYSTEM_PROMPTS, DataError, decode_line, parse_record

logger = logging.getLogger(__name__)

IGNORE = IGNORE_INDEX
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("MINIMIND_JAX_CACHE", Path.home() / ".cache" / "minimind_jax")) / "sft"


# ------------------------------------------------------------------------------------------------ labels


def _find(ids: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Start positions where `pattern` occurs in full in `ids`."""
    n, m = len(ids), len(pattern)
    if n < m:
        return np.empty(0, np.int64)
    hit = ids[: n - m + 1] == pattern[0]
    for j in range(1, m):
        hit &= ids[j : n - m + 1 + j] == pattern[j]
    return np.flatnonzero(hit)


def assistant_labels(ids: np.ndarray, bos_ids: np.ndarray, eos_ids: np.ndarray) -> np.ndarray:
    """MiniMind's SFTDataset.generate_labels, vectorised: [L] ids (padded or not) -> [L] labels."""
    ids = np.asarray(ids)
    labels = np.full(len(ids), IGNORE, np.int32)
    starts, ends = _find(ids, bos_ids), _find(ids, eos_ids)
    scan = 0  # MiniMind resumes scanning for the next reply after the end of the current one
    for b in starts:
        if b < scan:
            continue
        s = b + len(bos_ids)
        k = np.searchsorted(ends, s)
        e = ends[k] + len(eos_ids) if k < len(ends) else len(ids)  # truncated reply: runs to the end
        labels[s:e] = ids[s:e]
        scan = e
    return labels


# -------------------------------------------------------------------------------------- tokenized dataset


@dataclass(repr=False)
class SFTDataset:
    """Tokenized conversations (memory-mapped when cached). Build with `load_sft_dataset`."""

    tokens: np.ndarray  # [total] int32, all variants end to end
    keep_off: np.ndarray  # [N] int64  ids with the empty think blocks kept
    keep_len: np.ndarray  # [N] int32  (truncated to max_seq_len)
    drop_off: np.ndarray  # [N] int64  ids with them dropped (== keep when the text has none)
    drop_len: np.ndarray  # [N] int32
    full_len: np.ndarray  # [N] int32  keep-variant length before truncation (MiniMind's "lengths")
    can_add_system: np.ndarray  # [N] bool
    has_empty_think: np.ndarray  # [N] bool
    file_idx: np.ndarray  # [N] int32  provenance, for messages
    line: np.ndarray  # [N] int64
    files: list
    max_seq_len: int
    pad_id: int
    bos_ids: np.ndarray  # token ids of "<|im_start|>assistant\n"
    eos_ids: np.ndarray  # token ids of "<|im_end|>\n"
    system_prefix_ids: list  # [10] of int32 arrays, one per SYSTEM_PROMPTS entry
    num_bad_lines: int = 0
    cache_path: Optional[Path] = None
    cache_hit: bool = False

    def __len__(self) -> int:
        return len(self.keep_off)

    def __repr__(self):
        return (f"SFTDataset({len(self)} samples from {self.files}, max_seq_len={self.max_seq_len}, "
                f"bad_lines={self.num_bad_lines}, cache={self.cache_path})")

    def subset(self, idx) -> "SFTDataset":
        """The samples at `idx` (an eval split): the same token store, the per-sample arrays indexed."""
        per_sample = ("keep_off", "keep_len", "drop_off", "drop_len", "full_len", "can_add_system", "has_empty_think",
                      "file_idx", "line")
        return dataclasses.replace(self, **{k: getattr(self, k)[idx] for k in per_sample})

    def source(self, i: int) -> str:
        return f"{self.files[self.file_idx[i]]}:{self.line[i]}"

    def draw_augmentations(self, seed: int, epoch: int, add_system_ratio: float, empty_think_ratio: float):
        """-> (system prompt index per sample, -1 = none: [N] int8; drop the empty think: [N] bool)."""
        u = np.random.default_rng([seed, epoch, 1]).random((len(self), 3))  # row i belongs to sample i
        add = self.can_add_system & (u[:, 0] < add_system_ratio)
        choice = np.minimum((u[:, 1] * len(SYSTEM_PROMPTS)).astype(np.int64), len(SYSTEM_PROMPTS) - 1)
        sys_choice = np.where(add, choice, -1).astype(np.int8)
        drop = self.has_empty_think & (u[:, 2] > empty_think_ratio)  # MiniMind: random() > ratio -> remove
        return sys_choice, drop

    def lengths(self, sys_choice: np.ndarray, drop: np.ndarray) -> np.ndarray:
        """[N] token counts of the chosen variants after truncation."""
        prefix = np.array([0] + [len(p) for p in self.system_prefix_ids])[sys_choice.astype(np.int64) + 1]
        return np.minimum(self.max_seq_len, prefix + np.where(drop, self.drop_len, self.keep_len))

    def longest(self, add_system_ratio: float) -> int:
        """The most tokens any sample can have in any epoch's drawn variant (`draw_augmentations`): the longer of
        its two think variants, plus the longest system prompt wherever one may be added (a ratio of 0 adds none),
        truncated to max_seq_len. 0 for an empty dataset."""
        if not len(self):
            return 0
        longer = np.maximum(self.keep_len, self.drop_len)
        prefix = max(len(p) for p in self.system_prefix_ids) if add_system_ratio > 0 else 0
        return int(np.minimum(self.max_seq_len, longer + np.where(self.can_add_system, prefix, 0)).max())

    def example(self, i: int, sys_choice: int = -1, drop: bool = False) -> np.ndarray:
        """[L <= max_seq_len] int32 ids of sample i in the chosen variant, unpadded."""
        off, n = (self.drop_off[i], self.drop_len[i]) if drop else (self.keep_off[i], self.keep_len[i])
        ids = np.asarray(self.tokens[off : off + n], dtype=np.int32)
        if sys_choice >= 0:
            ids = np.concatenate([self.system_prefix_ids[sys_choice], ids])[: self.max_seq_len]
        return ids

    def padded(self, i: int, sys_choice: int = -1, drop: bool = False):
        """MiniMind's SFTDataset.__getitem__ for the chosen variant: ([max_seq_len] ids, [max_seq_len] labels)."""
        ids = np.full(self.max_seq_len, self.pad_id, np.int32)
        x = self.example(i, sys_choice, drop)
        ids[: len(x)] = x
        return ids, assistant_labels(ids, self.bos_ids, self.eos_ids)


def _check_readable(path: Path) -> None:
    """DataError (one line for the CLI) instead of an OSError traceback later, before any tokenizing."""
    if not path.exists():
        raise DataError(f"no such data file: {path}")
    if not path.is_file():
        raise DataError(f"{path}: not a file (expected a .jsonl file)")
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _system_prefixes(tokenizer) -> list:
    """Token ids of the rendered system turn for each SYSTEM_PROMPTS entry, checked to concatenate exactly."""
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    base = tokenizer.apply_chat_template(probe)
    out = []
    for p in SYSTEM_PROMPTS:
        full = tokenizer.apply_chat_template([{"role": "system", "content": p}] + probe)
        ids = tokenizer.encode(full[: len(full) - len(base)])
        splits = (len(tokenizer.encode(tokenizer.bos_token)) == 1
                  and tokenizer.encode(full) == ids + tokenizer.encode(base))
        if not full.endswith(base) or not splits:
            raise ValueError("this tokenizer/chat template does not split at the system turn boundary; "
                             "the cached system-prompt augmentation assumes a single-token bos like <|im_start|>")
        out.append(np.asarray(ids, np.int32))
    return out


def load_sft_dataset(paths, tokenizer, max_seq_len: int = 340, cache_dir=None, use_cache: bool = True,
                     skip_bad_lines: bool = False, chunk_size: int = 1024) -> SFTDataset:
    """Tokenize MiniMind SFT jsonl file(s) once (or reuse the cache) and return an `SFTDataset`.

    Bad lines raise `DataError("file:line: ...")`; with skip_bad_lines=True they are counted, logged and skipped.
    A missing, unreadable or empty file raises DataError too (also with skip_bad_lines).
    """
    files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not files:
        raise DataError("no data files given (--data_path)")
    for f in files:
        _check_readable(f)
    common = dict(files=[str(f) for f in files], max_seq_len=max_seq_len, pad_id=tokenizer.pad_token_id,
                  bos_ids=np.asarray(tokenizer.encode(f"{tokenizer.bos_token}assistant\n"), np.int32),
                  eos_ids=np.asarray(tokenizer.encode(f"{tokenizer.eos_token}\n"), np.int32),
                  system_prefix_ids=_system_prefixes(tokenizer))
    if not use_cache:
        buf = io.BytesIO()
        index, num_bad = _tokenize_files(files, tokenizer, max_seq_len, skip_bad_lines, chunk_size, buf)
        tokens = np.frombuffer(buf.getvalue(), np.int32)
        return _report(SFTDataset(tokens=tokens, **index, num_bad_lines=num_bad, **common))

    key = hashlib.sha256(json.dumps([CACHE_VERSION, tokenizer.fingerprint, max_seq_len, skip_bad_lines]).encode())
    for f in files:
        key.update(_file_digest(f).encode())
    cache_dir = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    stem = cache_dir / f"{files[0].stem}-{key.hexdigest()[:24]}"
    tok_path, idx_path = Path(f"{stem}.tokens.bin"), Path(f"{stem}.index.npz")
    hit = idx_path.is_file() and tok_path.is_file()
    if not hit:  # write under unique temp names, then rename: safe against crashes and concurrent hosts
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_tok, tmp_idx = (Path(f"{p}.tmp-{uuid.uuid4().hex}") for p in (tok_path, idx_path))
        try:
            with open(tmp_tok, "wb") as out:
                index, num_bad = _tokenize_files(files, tokenizer, max_seq_len, skip_bad_lines, chunk_size, out)
            with open(tmp_idx, "wb") as out:
                np.savez(out, num_bad_lines=num_bad, **index)
            os.replace(tmp_tok, tok_path)
            os.replace(tmp_idx, idx_path)  # index last: its presence marks a complete cache
        finally:
            tmp_tok.unlink(missing_ok=True)
            tmp_idx.unlink(missing_ok=True)
    with np.load(idx_path) as z:
        index = {k: z[k] for k in z.files}
    num_bad = int(index.pop("num_bad_lines"))
    return _report(SFTDataset(tokens=np.memmap(tok_path, dtype=np.int32, mode="r"), **index, num_bad_lines=num_bad,
                              cache_path=stem, cache_hit=hit, **common))


def _report(ds: SFTDataset) -> SFTDataset:
    cache = "off" if ds.cache_path is None else f"{'hit' if ds.cache_hit else 'built'} {ds.cache_path}"
    logger.info("SFT data %s: %d samples, %d tokens, cache %s", ds.files, len(ds), int(ds.full_len.sum()), cache)
    if ds.num_bad_lines:
        logger.warning("SFT data %s: skipped %d bad line(s)", ds.files, ds.num_bad_lines)
    return ds


def _render(raw: bytes, where: str, tokenizer) -> Optional[tuple[str, Optional[str], bool]]:
    """One raw line -> (text with the empty think blocks kept, text with them dropped or None, can_add_system);
    None for a blank line. Raises DataError naming `where`."""
    line = decode_line(raw, where)
    if not line:
        return None
    messages, tools, has_tools = parse_record(line, where)
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools)
    except Exception as e:  # template errors, raise_exception(...), bad tool_calls shapes
        raise DataError(f"{where}: chat template failed: {' '.join(str(e).split())}") from None  # one line
    drop_text = text.replace(EMPTY_THINK, "") if EMPTY_THINK in text else None
    return text, drop_text, not has_tools and messages[0]["role"] != "system"


def _tokenize_files(files, tokenizer, max_seq_len, skip_bad_lines, chunk_size, out):
    """Stream, validate, render and tokenize; write int32 ids to `out`; return the index arrays and #bad lines."""
    cols = {k: [] for k in ("keep_off", "keep_len", "drop_off", "drop_len", "full_len", "can_add_system",
                            "has_empty_think", "file_idx", "line")}
    state = {"offset": 0, "bad": 0}
    pending = []  # (file index, line, keep text, drop text or None, can_add_system)

    def flush():
        texts = [t for p in pending for t in (p[2], p[3]) if t is not None]
        encoded = iter(tokenizer.encode_batch(texts))
        for fi, ln, _, drop_text, can_sys in pending:
            keep = next(encoded)
            variants = [keep, next(encoded)] if drop_text is not None else [keep]
            offs = []
            for ids in variants:
                arr = np.asarray(ids[:max_seq_len], np.int32)
                out.write(arr.tobytes())
                offs.append((state["offset"], len(arr)))
                state["offset"] += len(arr)
            row = dict(keep_off=offs[0][0], keep_len=offs[0][1], drop_off=offs[-1][0], drop_len=offs[-1][1],
                       full_len=len(keep), can_add_system=can_sys, has_empty_think=drop_text is not None,
                       file_idx=fi, line=ln)
            for k, v in row.items():
                cols[k].append(v)
        pending.clear()

    for fi, path in enumerate(files):
        seen = 0  # non-blank lines, bad ones included
        with open(path, "rb") as f:  # streamed: never the whole file in memory
            for lineno, raw in enumerate(f, 1):
                try:
                    sample = _render(raw, f"{path}:{lineno}", tokenizer)
                except DataError as e:
                    seen += 1
                    if not skip_bad_lines:
                        raise DataError(f"{e}; fix the line or pass --skip_bad_lines") from None
                    state["bad"] += 1
                    if state["bad"] <= 5:
                        logger.warning("skipping bad line: %s", e)
                    continue
                if sample is not None:
                    seen += 1
                    pending.append((fi, lineno, *sample))
                    if len(pending) >= chunk_size:
                        flush()
        if seen == 0:
            raise DataError(f"{path}: empty file, no samples")
    flush()
    if not cols["line"]:
        names = ", ".join(map(str, files))
        raise DataError(f"{names}: no valid samples ({state['bad']} bad line(s) skipped with --skip_bad_lines)")
    dtypes = dict(keep_off=np.int64, drop_off=np.int64, line=np.int64, can_add_system=bool, has_empty_think=bool)
    return {k: np.asarray(v, dtypes.get(k, np.int32)) for k, v in cols.items()}, state["bad"]


CUT_SHARE_WARN = 0.05  # summary_line speaks up from this share of cut samples (or any answerless one)


def cut_samples(ds: SFTDataset, max_seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (indices of the samples longer than max_seq_len, those of them left without a single supervised token
    once cut to max_seq_len: no label != -100 in labels[1:], as the loss shifts them). `ds` may be loaded at
    max_seq_len (a run's) or longer (the report's, whole)."""
    cut = np.flatnonzero(ds.full_len > max_seq_len)
    answerless = [i for i in cut
                  if not np.any(assistant_labels(ds.example(i)[:max_seq_len], ds.bos_ids, ds.eos_ids)[1:] != IGNORE)]
    return cut, np.asarray(answerless, np.int64)


def summary_line(ds: SFTDataset, max_seq_len: int) -> Optional[str]:
    """One line for a run's log when max_seq_len cuts a large share (>= 5%) of the samples or leaves any of them
    without an answer token to learn; else None."""
    n = len(ds)
    cut, answerless = cut_samples(ds, max_seq_len)
    if not n or (len(cut) < CUT_SHARE_WARN * n and not len(answerless)):
        return None
    line = (f"data: {len(cut)} of {n} samples ({len(cut) / n * 100:.1f}%) are longer than --max_seq_len "
            f"{max_seq_len} and are cut")
    if len(answerless):
        verb = "loses" if len(answerless) == 1 else "lose"
        line += f"; {len(answerless)} {verb} every answer token (first: {ds.source(answerless[0])})"
    return line + " (python -m train.data_report for more)"
