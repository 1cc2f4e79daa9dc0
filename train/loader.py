"""Batches over an `SFTDataset`: padded (MiniMind-exact) or packed rows, host-sharded, resumable.

`SFTLoader`: `batch_size` samples per global step in every mode, as MiniMind's `--batch_size`
(ceil(N / batch_size) steps per epoch); host p takes the p-th contiguous share of each step's samples:
  padded mode (packed=False; MiniMind-exact), one sample per row:
    input_ids [B, max_seq_len] int32  right-padded with pad_token_id (B = the host's share; a short last batch
    labels    [B, max_seq_len] int32  keeps B rows, the missing ones empty); -100 = not supervised
  packed mode (packed=True): exactly the same samples, packed best-fit-decreasing into as few rows as they need
  (R varies from step to step; T = seq_len; with tail_len, the lightest rows may hold only tail_len tokens, see
  SFTLoader):
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

from dataclasses import dataclass
from typing import Iterator, Optional

import jax
import numpy as np

from train.dataset import IGNORE, SFTDataset, assistant_labels
from train.packing import group_by_length, pack_rows, pack_with_tail, step_cost


@dataclass
class _EpochPlan:
    epoch: int
    sys_choice: np.ndarray  # [N] int8
    drop: np.ndarray  # [N] bool
    lengths: np.ndarray  # [N] tokens of the chosen variants
    order: np.ndarray  # [N] sample order (sample batches: step s = order[s*B:(s+1)*B])
    rows: Optional[list] = None  # token-budget mode: sample indices per global row, packed over the epoch


def packed_row_len(dataset: SFTDataset, add_system_ratio: float) -> int:
    """The row length of packed sample batches: the dataset's longest sample (`SFTDataset.longest`) rounded up to a
    multiple of 16, at most max_seq_len. A row costs attention in proportion to its length, so short-sample data
    (MiniMind's LoRA sets, the bundled demo) packs into short rows instead of rows of max_seq_len; data with a
    sample of max_seq_len keeps rows of max_seq_len."""
    return min(dataset.max_seq_len, max(16, -(-dataset.longest(add_system_ratio) // 16) * 16))


class SFTLoader:
    """Deterministic, resumable, host-sharded batches over an `SFTDataset` (contract: module docstring).

    batch_size: samples per global step, MiniMind's meaning in every mode; padded (packed=False) gives each its own
      row, packed=True packs exactly those samples into as few rows of seq_len (at least the longest sample; see
      packed_row_len) as it can (best fit decreasing), so a step's loss and gradients are the padded step's.
      group_by_length: HF Trainer's batches of similar lengths (less packing waste, same number of samples per
      step, different batches).
    batch_tokens: the token-budget mode instead (TRL-style, changes the optimisation): the whole epoch is packed
      into rows of seq_len and each step takes batch_tokens // seq_len rows, however many samples they hold.
    tail_len / row_multiple (packed sample batches): rows of seq_len, and the lightest of them repacked into rows
      of tail_len where that shortens the step (packing.pack_with_tail: the busiest of row_multiple slots, e.g. one
      per data device, computes fewest positions), so a step whose rows do not divide evenly over the devices, or a
      batch of short samples, gets short rows (train.batch.prepare_batch runs them as a second, shorter shape).
    """

    def __init__(self, dataset: SFTDataset, batch_size: int, *, packed: bool = False,
                 batch_tokens: Optional[int] = None,
                 group_by_length: bool = False, seq_len: Optional[int] = None, seed: int = 42, shuffle: bool = True,
                 add_system_ratio: float = 0.2, empty_think_ratio: float = 0.2, drop_last: bool = False,
                 num_epochs: Optional[int] = None, process_index: Optional[int] = None,
                 process_count: Optional[int] = None, pack_window: int = 4096, tail_len: Optional[int] = None,
                 row_multiple: int = 1):
        if process_index is None or process_count is None:
            process_index, process_count = jax.process_index(), jax.process_count()
        packed = packed or batch_tokens is not None
        self.seq_len = dataset.max_seq_len if seq_len is None else seq_len
        longest = dataset.longest(add_system_ratio) if packed else 0
        if self.seq_len < longest:
            raise ValueError(f"packed seq_len {self.seq_len} is shorter than the dataset's longest sample "
                             f"({longest} tokens)")
        if not packed and self.seq_len != dataset.max_seq_len:
            raise ValueError("padded mode uses the dataset's max_seq_len; set seq_len only with packed=True")
        if batch_tokens is not None:
            if batch_tokens < self.seq_len * process_count:
                raise ValueError(f"batch_tokens {batch_tokens} is less than one row of {self.seq_len} tokens per "
                                 f"process ({process_count} process(es))")
            if group_by_length:
                raise ValueError("group_by_length groups samples into sample batches; "
                                 "batch_tokens packs the whole epoch")
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
        self.tail_len = tail_len if packed and batch_tokens is None and tail_len and tail_len < self.seq_len else None
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
            sys_choice, drop = self.ds.draw_augmentations(self.seed, epoch, self.add_system_ratio,
                                                          self.empty_think_ratio)
            lengths = self.ds.lengths(sys_choice, drop)
            plan = _EpochPlan(epoch, sys_choice, drop, lengths, order)
            if self.batch_tokens is not None:
                rows = pack_rows(order, lengths, self.seq_len, self.pack_window)
                if self.shuffle:  # BFD emits long-first rows; mix them so batches are not length-sorted
                    rows = [rows[j] for j in np.random.default_rng([self.seed, epoch, 2]).permutation(len(rows))]
                plan.rows = rows
            elif self.group_by_length:
                rng = np.random.default_rng([self.seed, epoch, 3])
                plan.order = group_by_length(order, lengths, self.batch_size, rng)
            self._plan = plan
        return self._plan

    def steps_in_epoch(self, epoch: int) -> int:
        if self.batch_tokens is not None:
            n, per = len(self.plan(epoch).rows), self.rows_per_step
        else:
            n, per = len(self.ds), self.batch_size
        return n // per if self.drop_last else -(-n // per)

    def _layout(self, epoch: int, step: int) -> tuple[list, int]:
        """-> (rows of sample indices, how many of them are full-length: the rest are tail_len rows, last) of this
        host's batch `step`: packed once per call."""
        p = self.plan(epoch)
        if self.batch_tokens is not None:
            first = step * self.rows_per_step + self.process_index * self.host_unit
            rows = [list(r) for r in p.rows[first : first + self.host_unit]]
            return rows, len(rows)
        first = step * self.batch_size + self.process_index * self.host_unit
        mine = p.order[first : first + self.host_unit]  # fewer (or none) in a short last batch
        if not self.packed:
            return [[int(i)] for i in mine], len(mine)
        return pack_with_tail(mine, p.lengths, self.seq_len, self.tail_len, self.row_multiple)

    def fill_ratio(self, epoch: int) -> float:
        """Fraction of real tokens in the positions this host's steps compute over an epoch (padding efficiency):
        packed rows as their busiest slot of row_multiple computes them (packing.step_cost: a device that waits for
        another costs as much)."""
        p, real, positions = self.plan(epoch), 0, 0
        m = self.row_multiple
        for s in range(self.steps_in_epoch(epoch)):
            host, n_main = self._layout(epoch, s)
            real += int(sum(p.lengths[i] for r in host for i in r))
            positions += (m * step_cost(n_main, len(host) - n_main, self.seq_len, self.tail_len or 0, m)
                          if self.packed else self.host_unit * self.seq_len)
        return real / max(positions, 1)

    # -- batches
    def get_batch(self, epoch: int, step: int) -> dict:
        """This host's slice of global step `step` of `epoch` (random access; does not move the state).

        Padded: [host batch, max_seq_len] (rows of a short last batch are empty). Packed: [rows, seq_len] with as
        many rows as the samples need (at least one) and segment_ids / positions.
        """
        p, ds = self.plan(epoch), self.ds
        T, (host, _) = self.seq_len, self._layout(epoch, step)
        B = max(len(host), 1) if self.packed else self.host_unit
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
