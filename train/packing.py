"""Row building for SFT batches: best-fit-decreasing packing of samples into rows, the layout of a step's rows over
the data devices, and length grouping.

All work on sample indices and token counts only (no tokens), so the loader can plan a step or a whole epoch
before touching any data.
"""
from __future__ import annotations

import bisect
from typing import Optional

import numpy as np


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


def slots_of(n_main: int, n_tail: int, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """The slot (data device) of each of a step's rows, as train.batch.prepare_batch lays them out: full-length
    rows round robin from slot 0, then the short (tail) rows round robin from where they stopped, so the slots
    left one full row short take the short rows first. -> (slot of each full row, slot of each short row)."""
    return np.arange(n_main) % slots, (n_main % slots + np.arange(n_tail)) % slots


def step_cost(n_main: int, n_tail: int, main_len: int, tail_len: int, slots: int) -> int:
    """Positions the busiest slot computes for n_main rows of main_len and n_tail of tail_len laid out by
    `slots_of`: the step takes as long as that slot (each device loops over its own rows)."""
    main, tail = slots_of(n_main, n_tail, slots)
    load = np.bincount(main, minlength=slots) * main_len + np.bincount(tail, minlength=slots) * tail_len
    return int(load.max())


def pack_with_tail(samples: np.ndarray, lengths: np.ndarray, row_len: int, tail_len: Optional[int],
                   slots: int = 1) -> tuple[list, int]:
    """Best-fit-decreasing rows of row_len, then the k lightest of them repacked into rows of tail_len, for the k
    whose layout costs the busiest slot the fewest positions (step_cost; k = 0 on a tie). -> (rows, n_main): the
    n_main full-length rows first, then the short ones. tail_len None: plain pack_rows."""
    rows = pack_rows(samples, lengths, row_len)
    if not tail_len or tail_len >= row_len:
        return rows, len(rows)
    order = sorted(range(len(rows)), key=lambda r: int(lengths[rows[r]].sum()))  # lightest first
    best = (step_cost(len(rows), 0, row_len, tail_len, slots), rows, len(rows))
    for k in range(1, len(rows) + 1):
        light = [i for r in order[:k] for i in rows[r]]
        if int(lengths[light].max()) > tail_len:  # a sample too long for a short row: so for every larger k
            break
        short = pack_rows(np.asarray(light), lengths, tail_len)
        cost = step_cost(len(rows) - k, len(short), row_len, tail_len, slots)
        if cost < best[0]:
            best = (cost, [rows[r] for r in sorted(order[k:])] + short, len(rows) - k)
    return best[1], best[2]


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
