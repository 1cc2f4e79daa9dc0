"""SFT data for LoRA fine-tuning: MiniMind jsonl -> tokenized cache -> padded or packed numpy batches.

Input: one `{"conversations": [{"role": "system"|"user"|"assistant"|"tool", "content": ...}, ...]}` per line
(optional MiniMind fields `reasoning_content`, `tools` (on the system message), `tool_calls`; JSON strings or
objects). Each line is rendered with the tokenizer's chat template and tokenized exactly like MiniMind's
`SFTDataset`: `ids = tokenize(prompt)[:max_seq_len]`, labels = ids inside each assistant reply (from just after
the `<|im_start|>assistant\\n` token sequence through the next `<|im_end|>\\n` inclusive, or to the end when
truncated), -100 elsewhere. MiniMind's two random augmentations are kept, with its names and defaults:
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

Batches (`SFTLoader`): `batch_size` samples per global step in every mode, as MiniMind's `--batch_size`
(ceil(N / batch_size) steps per epoch); host p takes the p-th contiguous share of each step's samples:
  padded mode (packed=False; MiniMind-exact), one sample per row:
    input_ids [B, max_seq_len] int32  right-padded with pad_token_id (B = the host's share; a short last batch
    labels    [B, max_seq_len] int32  keeps B rows, the missing ones empty); -100 = not supervised
  packed mode (packed=True): exactly the same samples, packed best-fit-decreasing into as few rows as they need
  (R varies from step to step; T = the candidate row length that wastes least, see SFTLoader):
    input_ids   [R, T] int32  samples laid end to end, then pad_token_id
    labels      [R, T] int32  each sample's own labels; the first token of every sample is -100
    segment_ids [R, T] int32  1..n for the samples of a row, 0 for padding
    positions   [R, T] int32  0, 1, 2, ... restarting at each sample (RoPE), 0 on padding
  token-budget mode (batch_tokens=...; explicit, TRL-style): the whole epoch is packed into rows (best fit within
  windows of the shuffled order) and each step takes batch_tokens // seq_len of them: fewer, larger steps, so it
  changes the optimisation; never the default.
Label convention (all modes, as in MiniMind): the MODEL shifts: loss = CE(logits[:, :-1], labels[:, 1:]) over
labels != -100, i.e. position t predicts token t+1. Because every segment starts with label -100, no position
ever predicts a token of the next sample; attention must be causal AND within equal, non-zero segment_ids. So a
packed step has the padded step's labelled tokens, and its mean loss and gradients (train.step sums over rows).
group_by_length (HF Trainer's): batches of samples of similar lengths (less padding, same samples per step).
Resume: `loader.state_dict()` / `load_state_dict` with {"epoch", "step"}: a resumed loader yields exactly the
batches an uninterrupted one would.
Plain numpy rather than grain: a step's rows are a function of all its samples' lengths (and the token-budget plan
of the whole epoch's), which does not fit grain's per-record sampler, and random access by (epoch, step) makes
resume trivial.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

logger = logging.getLogger(__name__)

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
IGNORE = -100
CACHE_VERSION = 1
DEFAULT_CACHE_DIR = Path(os.environ.get("MINIMIND_JAX_CACHE", Path.home() / ".cache" / "minimind_jax")) / "sft"


class DataError(ValueError):
    """A bad SFT record; the message starts with `file:line:`."""


# ----------------------------------------------------------------------------------------------- parsing


def _json_field(m: dict, key: str, where: str, k: int):
    value = m.get(key)
    if isinstance(value, str):  # MiniMind stores tools / tool_calls as JSON strings
        try:
            return json.loads(value) if value.strip() else None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: message {k}: '{key}' is not valid JSON ({e.msg})") from None
    return value


def parse_record(line: str, where: str) -> tuple[list[dict], Optional[list], bool]:
    """One jsonl line -> (messages for the template, tools, has_tools). Raises DataError naming `where`."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(obj, dict) or "conversations" not in obj:
        raise DataError(f"{where}: missing 'conversations' (expected {{\"conversations\": [{{\"role\": ..., \"content\": ...}}]}})")
    convs = obj["conversations"]
    if not isinstance(convs, list) or not convs:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of messages, got {convs!r:.60}")
    messages, tools, has_tools = [], None, False
    for k, m in enumerate(convs):
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
        has_tools |= bool(m.get("tools"))  # MiniMind never adds a system prompt to tool data
        msg_tools = _json_field(m, "tools", where, k)
        if msg_tools and role == "system":  # ... and only passes a system message's tools to the template
            tools = msg_tools if isinstance(msg_tools, list) else [msg_tools]
        messages.append(msg)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant turn (nothing to train on)")
    return messages, tools, has_tools


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines, streamed."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").lstrip("\ufeff").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({e.reason})") from None
            if line:
                yield lineno, line


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
        splits = len(tokenizer.encode(tokenizer.bos_token)) == 1 and tokenizer.encode(full) == ids + tokenizer.encode(base)
        if not full.endswith(base) or not splits:
            raise ValueError("this tokenizer/chat template does not split at the system turn boundary; "
                             "the cached system-prompt augmentation assumes a single-token bos like <|im_start|>")
        out.append(np.asarray(ids, np.int32))
    return out


def load_sft_dataset(paths, tokenizer, max_seq_len: int = 340, cache_dir=None, use_cache: bool = True,
                     skip_bad_lines: bool = False, chunk_size: int = 1024) -> SFTDataset:
    """Tokenize MiniMind SFT jsonl file(s) once (or reuse the cache) and return an `SFTDataset`.

    Bad lines raise `DataError("file:line: ...")`; with skip_bad_lines=True they are counted, logged and skipped.
    """
    files = [Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"SFT data file not found: {f}")
    common = dict(files=[str(f) for f in files], max_seq_len=max_seq_len, pad_id=tokenizer.pad_token_id,
                  bos_ids=np.asarray(tokenizer.encode(f"{tokenizer.bos_token}assistant\n"), np.int32),
                  eos_ids=np.asarray(tokenizer.encode(f"{tokenizer.eos_token}\n"), np.int32),
                  system_prefix_ids=_system_prefixes(tokenizer))
    if not use_cache:
        buf = io.BytesIO()
        index, num_bad = _tokenize_files(files, tokenizer, max_seq_len, skip_bad_lines, chunk_size, buf)
        return _report(SFTDataset(tokens=np.frombuffer(buf.getvalue(), np.int32), **index, num_bad_lines=num_bad, **common))

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
            cols["keep_off"].append(offs[0][0]); cols["keep_len"].append(offs[0][1])
            cols["drop_off"].append(offs[-1][0]); cols["drop_len"].append(offs[-1][1])
            cols["full_len"].append(len(keep)); cols["can_add_system"].append(can_sys)
            cols["has_empty_think"].append(drop_text is not None)
            cols["file_idx"].append(fi); cols["line"].append(ln)
        pending.clear()

    for fi, path in enumerate(files):
        seen = 0
        for lineno, line in iter_lines(path):
            seen += 1
            where = f"{path}:{lineno}"
            try:
                messages, tools, has_tools = parse_record(line, where)
                try:
                    text = tokenizer.apply_chat_template(messages, tools=tools)
                except Exception as e:  # template errors, raise_exception(...), bad tool_calls shapes
                    raise DataError(f"{where}: chat template failed: {e}") from None
            except DataError as e:
                if not skip_bad_lines:
                    raise
                state["bad"] += 1
                if state["bad"] <= 5:
                    logger.warning("skipping bad line: %s", e)
                continue
            can_sys = not has_tools and messages[0]["role"] != "system"
            drop_text = text.replace(EMPTY_THINK, "") if EMPTY_THINK in text else None
            pending.append((fi, lineno, text, drop_text, can_sys))
            if len(pending) >= chunk_size:
                flush()
        if seen == 0:
            raise DataError(f"{path}:0: empty file (no conversations)")
    flush()
    if not cols["line"]:
        raise DataError(f"{files[0]}:0: no valid conversations ({state['bad']} bad line(s) skipped)")
    dtypes = dict(keep_off=np.int64, drop_off=np.int64, line=np.int64, can_add_system=bool, has_empty_think=bool)
    return {k: np.asarray(v, dtypes.get(k, np.int32)) for k, v in cols.items()}, state["bad"]


# ----------------------------------------------------------------------------------------------- batches


def pack_rows(order: np.ndarray, lengths: np.ndarray, row_len: int, window: Optional[int] = None) -> list:
    """Best-fit-decreasing packing of samples (in `order`) into rows of `row_len` tokens, window by window
    (so packing stays local to the shuffled order; None = all at once). -> list of rows, each a list of indices."""
    rows = []
    window = window or max(len(order), 1)
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        free, wrows = [], []  # free: sorted (remaining capacity, row number)
        for i in chunk:
            n = int(lengths[i])
            k = bisect.bisect_left(free, (n, -1))  # tightest row that still fits
            if k < len(free):
                cap, r = free.pop(k)
            else:
                cap, r = row_len, len(wrows)
                wrows.append([])
            wrows[r].append(int(i))
            bisect.insort(free, (cap - n, r))
        rows.extend(wrows)
    return rows


def group_by_length(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                    mult: int = 50) -> np.ndarray:
    """HF Trainer's LengthGroupedSampler: megabatches of `mult` * batch_size samples of the shuffled order, each
    sorted longest first and cut into batches; the batches are then shuffled (seeded), so that an epoch does not
    sweep from long to short samples inside every megabatch. -> the reordered sample order (same samples)."""
    batches = []
    for m in range(0, len(order), mult * batch_size):
        mega = order[m : m + mult * batch_size]
        mega = mega[np.argsort(-lengths[mega], kind="stable")]
        batches.extend(mega[b : b + batch_size] for b in range(0, len(mega), batch_size))
    last = batches.pop() if len(batches) > 1 and len(batches[-1]) < batch_size else None  # a short batch stays last
    batches = [batches[j] for j in rng.permutation(len(batches))] + ([last] if last is not None else [])
    return np.concatenate(batches) if batches else order


@dataclass
class _EpochPlan:
    epoch: int
    sys_choice: np.ndarray  # [N] int8
    drop: np.ndarray  # [N] bool
    lengths: np.ndarray  # [N] tokens of the chosen variants
    order: np.ndarray  # [N] sample order (sample batches: step s = order[s*B:(s+1)*B])
    rows: Optional[list] = None  # token-budget mode: sample indices per global row, packed over the epoch


class SFTLoader:
    """Deterministic, resumable, host-sharded batches over an `SFTDataset` (contract: module docstring).

    batch_size: samples per global step, MiniMind's meaning in every mode; padded (packed=False) gives each its own
      row, packed=True packs exactly those samples into as few rows of seq_len as it can (best fit decreasing), so
      a step's loss and gradients are the padded step's. group_by_length: HF Trainer's batches of similar lengths
      (less packing waste, same number of samples per step, different batches).
    batch_tokens: the token-budget mode instead (TRL-style, changes the optimisation): the whole epoch is packed
      into rows of seq_len and each step takes batch_tokens // seq_len rows, however many samples they hold.
    row_lengths / row_multiple (packed sample batches): the row length follows the batch: each step's samples are
      packed at every candidate length that holds its longest sample (default: seq_len only) and the one with the
      fewest tokens in ceil(rows / row_multiple) * row_multiple rows wins (row_multiple: the rows a forward pass
      runs at once, e.g. one per data device), so a batch of short samples gets short rows.
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, *, packed: bool = False, batch_tokens: Optional[int] = None,
                 group_by_length: bool = False, seq_len: Optional[int] = None, seed: int = 42, shuffle: bool = True,
                 add_system_ratio: float = 0.2, empty_think_ratio: float = 0.2, drop_last: bool = False,
                 num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, pack_window: int = 4096, row_lengths: Sequence[int] = (),
                 row_multiple: int = 1):
        if process_index is None or process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        packed = packed or batch_tokens is not None
        self.seq_len = dataset.max_seq_len if seq_len is None else seq_len
        if packed and self.seq_len < dataset.max_seq_len:
            raise ValueError(f"packed seq_len {self.seq_len} must be >= the dataset's max_seq_len {dataset.max_seq_len}")
        if not packed and self.seq_len != dataset.max_seq_len:
            raise ValueError("padded mode uses the dataset's max_seq_len; set seq_len only with packed=True")
        if batch_tokens is not None:
            if batch_tokens < self.seq_len * process_count:
                raise ValueError(f"batch_tokens {batch_tokens} is less than one row of {self.seq_len} tokens per process "
                                 f"({process_count} process(es))")
            if group_by_length:
                raise ValueError("group_by_length groups samples into sample batches; batch_tokens packs the whole epoch")
            self.rows_per_step = batch_tokens // self.seq_len
            self.rows_per_step -= self.rows_per_step % process_count  # whole rows, equal on every host
            unit = self.rows_per_step
        else:
            if batch_size <= 0:
                raise ValueError(f"batch_size must be positive, got {batch_size}")
            self.rows_per_step = None
            unit = batch_size
        if unit % process_count:
            raise ValueError(f"batch_size {unit} is not divisible by process_count {process_count}")
        self.ds, self.batch_size, self.packed, self.batch_tokens = dataset, batch_size, packed, batch_tokens
        self.group_by_length, self.seed, self.shuffle = group_by_length, seed, shuffle
        self.add_system_ratio, self.empty_think_ratio, self.drop_last = add_system_ratio, empty_think_ratio, drop_last
        self.num_epochs, self.pack_window = num_epochs, pack_window
        self.row_lengths = sorted({min(int(t), self.seq_len) for t in row_lengths} | {self.seq_len})
        self.row_multiple = max(1, int(row_multiple))
        self.process_index, self.process_count = process_index, process_count
        self.host_unit = unit // process_count  # samples (or token-mode rows) of each host per step
        self.epoch, self.step = 0, 0  # next batch to produce
        self._plan: Optional[_EpochPlan] = None

    @property
    def max_rows(self) -> int:
        """The most rows a host batch can have (its static upper bound: one sample per row)."""
        return self.host_unit

    # -- epoch plan (identical on every host)
    def plan(self, epoch: int) -> _EpochPlan:
        if self._plan is None or self._plan.epoch != epoch:
            n = len(self.ds)
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(n) if self.shuffle else np.arange(n)
            sys_choice, drop = self.ds.draw_augmentations(self.seed, epoch, self.add_system_ratio, self.empty_think_ratio)
            lengths = self.ds.lengths(sys_choice, drop)
            plan = _EpochPlan(epoch, sys_choice, drop, lengths, order)
            if self.batch_tokens is not None:
                rows = pack_rows(order, lengths, self.seq_len, self.pack_window)
                if self.shuffle:  # BFD emits long-first rows; mix them so batches are not length-sorted
                    rows = [rows[j] for j in np.random.default_rng([self.seed, epoch, 2]).permutation(len(rows))]
                plan.rows = rows
            elif self.group_by_length:
                plan.order = group_by_length(order, lengths, self.batch_size, np.random.default_rng([self.seed, epoch, 3]))
            self._plan = plan
        return self._plan

    def steps_in_epoch(self, epoch: int) -> int:
        if self.batch_tokens is not None:
            n, per = len(self.plan(epoch).rows), self.rows_per_step
        else:
            n, per = len(self.ds), self.batch_size
        return n // per if self.drop_last else -(-n // per)

    def host_samples(self, epoch: int, step: int) -> list:
        """This host's share of global step `step`: a list of rows, each a list of sample indices."""
        p = self.plan(epoch)
        if self.batch_tokens is not None:
            first = step * self.rows_per_step + self.process_index * self.host_unit
            return [list(r) for r in p.rows[first : first + self.host_unit]]
        first = step * self.batch_size + self.process_index * self.host_unit
        mine = p.order[first : first + self.host_unit]  # fewer (or none) in a short last batch
        if not self.packed:
            return [[int(i)] for i in mine]
        return self._pack(mine, p.lengths)[1]

    def _pack(self, samples: np.ndarray, lengths: np.ndarray) -> tuple[int, list]:
        """-> (row length, rows): the candidate length whose packing needs the fewest padded tokens."""
        longest = int(lengths[samples].max()) if len(samples) else 1
        best = None
        for t in self.row_lengths:
            if t < longest:
                continue
            rows = pack_rows(samples, lengths, t)
            cost = -(-max(len(rows), 1) // self.row_multiple) * t
            if best is None or cost < best[0]:
                best = (cost, t, rows)
        return best[1], best[2]

    def row_length(self, epoch: int, step: int) -> int:
        """The row length of this host's batch `step` (seq_len but in packed sample batches of short samples)."""
        if not self.packed or self.batch_tokens is not None or len(self.row_lengths) == 1:
            return self.seq_len
        p = self.plan(epoch)
        first = step * self.batch_size + self.process_index * self.host_unit
        return self._pack(p.order[first : first + self.host_unit], p.lengths)[0]

    def fill_ratio(self, epoch: int) -> float:
        """Fraction of real tokens in the rows this host's batches hold over an epoch (padding efficiency)."""
        p, real, rows = self.plan(epoch), 0, 0
        for s in range(self.steps_in_epoch(epoch)):
            host = self.host_samples(epoch, s)
            real += int(sum(p.lengths[i] for r in host for i in r))
            rows += (max(len(host), 1) if self.packed else self.host_unit) * self.row_length(epoch, s)
        return real / max(rows, 1)

    # -- batches
    def get_batch(self, epoch: int, step: int) -> dict:
        """This host's slice of global step `step` of `epoch` (random access; does not move the state).

        Padded: [host batch, max_seq_len] (rows of a short last batch are empty). Packed: [rows, seq_len] with as
        many rows as the samples need (at least one) and segment_ids / positions.
        """
        p, ds = self.plan(epoch), self.ds
        host = self.host_samples(epoch, step)
        B, T = (max(len(host), 1) if self.packed else self.host_unit), self.row_length(epoch, step)
        ids = np.full((B, T), ds.pad_id, np.int32)  # [B, T]
        labels = np.full((B, T), IGNORE, np.int32)  # [B, T]
        if not self.packed:
            for r, (i,) in enumerate(host):
                ids[r], labels[r] = ds.padded(i, p.sys_choice[i], p.drop[i])
            return {"input_ids": ids, "labels": labels}
        segment_ids = np.zeros((B, T), np.int32)  # [B, T]
        positions = np.zeros((B, T), np.int32)  # [B, T]
        for r, samples in enumerate(host):
            t = 0
            for seg, i in enumerate(samples, 1):
                x = ds.example(i, p.sys_choice[i], p.drop[i])
                n = len(x)
                ids[r, t : t + n] = x
                labels[r, t : t + n] = assistant_labels(x, ds.bos_ids, ds.eos_ids)
                labels[r, t] = IGNORE  # the previous sample's last position must not predict this token
                segment_ids[r, t : t + n] = seg
                positions[r, t : t + n] = np.arange(n)
                t += n
        return {"input_ids": ids, "labels": labels, "segment_ids": segment_ids, "positions": positions}

    def __iter__(self) -> Iterator[dict]:
        while self.num_epochs is None or self.epoch < self.num_epochs:
            epoch, step = self.epoch, self.step
            n = self.steps_in_epoch(epoch)
            if step >= n:
                self.epoch, self.step = epoch + 1, 0
                continue
            batch = self.get_batch(epoch, step)
            self.epoch, self.step = (epoch, step + 1) if step + 1 < n else (epoch + 1, 0)  # state = next batch
            yield batch

    # -- resume
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_samples": len(self.ds),
                "batch_size": self.batch_size, "packed": self.packed, "batch_tokens": self.batch_tokens,
                "group_by_length": self.group_by_length}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "batch_size", "packed", "batch_tokens", "group_by_length"):
            mine = self.state_dict()[key]
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume: saved {key}={state[key]!r} but this loader has {mine!r}")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
