"""Host-side (numpy) shaping of one loader batch for the train step: rows -> fixed-shape chunks.

The step (train.step) compiles once per array shape, so the shapes here are chosen from few sizes: the row count
is padded to a whole number of chunks of the run's largest batch, the row length and the count of labelled
positions gathered for the vocabulary projection are bucketed (`minimind_jax.buckets.bucket_length`, as generate's
lengths). Packed sample batches may also carry short rows, run as a second, fixed shape ("tail/" keys).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from minimind_jax.buckets import bucket_length
from minimind_jax.model import IGNORE_INDEX
from train.packing import step_cost

IGNORE = IGNORE_INDEX
TAIL = "tail/"  # key prefix of the short rows' chunks


def prepare_batch(batch: dict, *, devices: int = 1, rows_per_device: int = 1, max_rows: Optional[int] = None,
                  trim: bool = True, labels_only: bool = True, pad_id: Optional[int] = None,
                  tail: Optional[int] = None) -> tuple[dict, int, Optional[tuple[int, int]], dict]:
    """Host side (numpy) shaping of one loader batch [R, T] -> (chunks, n_chunks, label cap, stats).

    chunks: every array as [C, P, T'] with P = devices * rows_per_device rows per chunk (rows_per_device per data
      device) and C = ceil(max_rows / P) (static: max_rows is the most rows a batch of this run can have, so the
      compiled shape never changes); only the first n_chunks = ceil(R / P) chunks hold rows, the step's loop runs
      over those alone. Padding rows are empty (labels -100, segment 0).
    trim: cut every row after the last labelled token of the batch, to a bucketed length T' (exact for the loss of
      a causal model; NOT for a MoE aux loss, which averages over every position, so callers pass trim=False then).
    labels_only: cap = (devices, C): C the largest count of labelled (shifted) positions of any device's rows in
      any chunk, bucketed (16, 24, 32, 48, ...); the step projects only those to the vocabulary, gathering per
      device (labelled_nll's groups). None (full logits) when labels_only is False or C is over half the positions.
    tail: the rows whose labels all lie in their first `tail` tokens are taken out, cut to that length and laid out
      as "tail/<key>" chunks [C, P, tail] (packing.slots_of: after the full rows, round robin from the slot where
      they stopped), which the step runs as a second shape; the full rows keep their slots in order. Exact for a
      causal model's loss (nothing after the last label can change it); a MoE aux loss is not, so no tail there.
      n_chunks then counts the full rows' chunks (0 when every row is short).
    stats: {"tokens": non-padding tokens, "labelled": labelled tokens, "rows": R, "positions": the positions the step
      computes (n_chunks * P * T': padding rows of the last chunk and padding tails included; with a tail, the
      busiest slot's positions times P), "need_t", "need_cap"}.
    """
    labels = batch["labels"]
    r, t = labels.shape
    per = devices * rows_per_device
    max_rows = r if max_rows is None else max(max_rows, r)
    c_max = -(-max_rows // per)
    valid = labels[:, 1:] != IGNORE  # [R, T-1]
    short = np.zeros(r, bool)
    if tail is not None and tail < t:
        last = np.where(valid.any(1), t - 1 - np.argmax(valid[:, ::-1], axis=1), 0)  # last labelled column + 1
        short = last < tail
    main = np.flatnonzero(~short)
    n_chunks = max(1, -(-len(main) // per)) if tail is None else -(-len(main) // per)
    if "segment_ids" in batch:
        tokens = int(np.count_nonzero(batch["segment_ids"]))
    elif pad_id is not None:
        tokens = int(np.count_nonzero(batch["input_ids"] != pad_id))
    else:
        tokens = r * t
    cols = np.flatnonzero(valid[main].any(0))
    need_t = int(cols[-1]) + 2 if len(cols) else 2  # last labelled shifted column c is label position c+1
    tb = bucket_length(need_t, maximum=t) if trim else t
    out = {}
    tail_at = len(main) % per + np.arange(short.sum())  # flat index of each short row: packing.slots_of's layout
    for k, v in batch.items():
        fill = IGNORE if k == "labels" else (pad_id or 0) if k == "input_ids" else 0
        full = np.full((c_max * per, tb), fill, v.dtype)
        full[:len(main)] = v[main, :tb]
        out[k] = full.reshape(c_max, per, tb)
        if tail is not None:
            part = np.full((c_max * per, tail), fill, v.dtype)
            part[tail_at] = v[short, :tail]
            out[TAIL + k] = part.reshape(c_max, per, tail)
    counts = [(out[key][:, :, 1:] != IGNORE).reshape(c_max, devices, -1).sum(-1) for key in out if
              key.endswith("labels")]  # [C, devices] each
    need_cap = int(max(c.max() for c in counts))
    positions = rows_per_device * (tb - 1)
    cap = bucket_length(need_cap, maximum=positions)
    # Gathering pays only when it drops most positions; short of that, full logits keep the compiled shapes few.
    cap = (devices, cap) if labels_only and cap <= positions // 2 else None
    computed = n_chunks * per * tb if tail is None else step_cost(len(main), int(short.sum()), tb, tail, per) * per
    stats = {"tokens": tokens, "labelled": int(valid.sum()), "rows": r, "positions": computed,
             "need_t": need_t, "need_cap": need_cap}
    return out, n_chunks, cap, stats
