"""Row building for SFT batches: best-fit-decreasing packing of samples into rows, and length grouping.

Both work on sample indices and token counts only (no tokens), so the loader can plan a step or a whole epoch
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
