"""The pieces of a run, each built from its RunConfig: the base model, the tokenizer and data, the batch plan, the
adapter. Builders return plain values and a note for the log; train.trainer puts them together and logs the notes.
"""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np

import convert
import lora
from minimind_jax.tokenizer import load_tokenizer
from train import step as step_lib
from train.batch import prepare_batch
from train.config import ACCEL_CHUNK_TOKENS, CPU_CHUNK_TOKENS, ConfigError, RunConfig
from train.data import SFTLoader, load_sft_dataset, packed_row_len


def resolve_names(cfg: RunConfig) -> RunConfig:
    """--from_weight / --from_lora given as MiniMind names -> the same config with the paths they name (paths that
    exist are kept as they are; see convert.names). `--from_weight full_sft` is `<save_dir>/full_sft_<hidden>[_moe].pth`
    as in MiniMind's train_lora.py, which reads the base from `out` whatever its --save_dir: looked up in --save_dir,
    then in `out`. `--from_lora NAME` is looked up in --save_dir like serve.chat's --lora_weight. Raises
    FileNotFoundError naming the flag and every path tried."""
    changes = {}
    try:
        if not cfg.random_base:
            changes["from_weight"] = str(convert.resolve_weight(cfg.from_weight, [cfg.save_dir, "out"],
                                                                cfg.hidden_size, cfg.use_moe))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--from_weight: {e}") from None
    try:
        if cfg.from_lora:
            changes["from_lora"] = str(convert.resolve_lora(cfg.from_lora, cfg.save_dir, cfg.hidden_size, cfg.use_moe))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--from_lora: {e}") from None
    return dataclasses.replace(cfg, **changes) if changes else cfg


def load_base(cfg: RunConfig, shapes_only: bool = False):
    """-> (config, params, note): convert.load_base of --from_weight (a path: `resolve_names` first for MiniMind
    names), or of a random MiniMind2-small-shaped base (seed --seed). shapes_only: a random base's params as
    jax.ShapeDtypeStruct leaves, made later (train.trainer.Prepared.with_base), so that the train step can compile
    meanwhile."""
    weight = None if cfg.random_base else cfg.from_weight
    config, params, note = convert.load_base(weight, hidden_size=cfg.hidden_size,
                                             num_hidden_layers=cfg.num_hidden_layers, use_moe=cfg.use_moe,
                                             seed=cfg.seed, shapes_only=shapes_only)
    if weight is None:
        note = f"no --from_weight: {note}; answers before training are gibberish"
    return config, params, note


def make_adapter(cfg: RunConfig, params):
    """-> (adapter, note): --from_lora's adapter (checked against the base), or a new one (seed --seed + 1).
    `params` may be shapes: a new adapter is then made with jax.eval_shape by the caller."""
    if cfg.from_lora:
        adapter = convert.load_adapter(cfg.from_lora)
        try:
            jax.eval_shape(lora.merge, params, adapter)  # shapes checked against the base (arrays or shapes)
        except (KeyError, ValueError) as e:
            raise ConfigError(f"--from_lora {cfg.from_lora} does not fit the base model: {e}") from None
        ranks = sorted(set(adapter.ranks.values()))
        return adapter, f"adapter from --from_lora {cfg.from_lora} (ranks {ranks}, targets {adapter.targets})"
    adapter = lora.init(params, jax.random.PRNGKey(cfg.seed + 1), rank=cfg.rank, targets=cfg.targets, alpha=cfg.alpha)
    return adapter, f"new adapter: rank {cfg.rank}, targets {adapter.targets}, alpha {cfg.alpha}"


def data_fingerprint(ds) -> str:
    """The tokenized samples' identity (another file, or the same one edited, gives another): a resume must match."""
    h = hashlib.sha256(np.ascontiguousarray(ds.tokens).tobytes())
    h.update(np.ascontiguousarray(ds.keep_len).tobytes())
    return h.hexdigest()[:16]


def load_data(cfg: RunConfig, config):
    """-> (tokenizer, tokenized dataset); train.data's DataError names a bad file:line."""
    tokenizer = load_tokenizer(cfg.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                         f"is {config.vocab_size}")
    ds = load_sft_dataset(cfg.data_paths, tokenizer, max_seq_len=cfg.max_seq_len, cache_dir=cfg.cache_dir,
                          skip_bad_lines=cfg.skip_bad_lines)
    return tokenizer, ds


@dataclass(frozen=True, eq=False)
class Batches:
    """The run's batch plan: the loader, its steps per epoch, and `prepare` (a loader batch -> the step's chunks,
    train.batch.prepare_batch with this run's settings)."""
    loader: SFTLoader
    iters: tuple  # micro-steps of each epoch
    offsets: np.ndarray  # [epochs + 1] global micro-step before each epoch
    rows_per_device: int
    prepare: Callable
    accumulation_steps: int

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def positions(self, epoch0: int, step0: int) -> list[tuple[int, int]]:
        """(epoch, step) of every micro-step from (epoch0, step0) on, both 0-based."""
        return [(e, s) for e in range(epoch0, len(self.iters))
                for s in range(step0 if e == epoch0 else 0, self.iters[e])]

    def is_update(self, epoch: int, s: int) -> bool:
        """MiniMind: the optimizer steps every accumulation_steps micro-steps (s from 1) and at an epoch's end."""
        return s % self.accumulation_steps == 0 or s == self.iters[epoch]

    def where(self, g: int) -> str:
        """Global micro-step g (1-based) as MiniMind's 'step s/n of epoch e/E'."""
        e = int(np.searchsorted(self.offsets, g, side="left")) - 1
        return f"step {g - self.offsets[e]}/{self.iters[e]} of epoch {e + 1}/{len(self.iters)} (global step {g})"


def plan_batches(cfg: RunConfig, config, ds) -> Batches:
    devices = jax.local_device_count()
    host_rows = (cfg.batch_tokens // cfg.max_seq_len if cfg.batch_tokens else cfg.batch_size) // jax.process_count()
    # Packed sample batches: rows as long as the data's longest sample, and short rows of half that for what does
    # not divide evenly over the devices (and batches of short samples), a second loop in the same step. Not with
    # MoE, whose aux loss averages over MiniMind's full rows, nor --batch_tokens, whose budget counts such rows.
    sample_rows = cfg.pack and not cfg.batch_tokens and not config.use_moe
    row_len = packed_row_len(ds, cfg.add_system_ratio) if sample_rows else cfg.max_seq_len
    per_device = rows_per_device(cfg, config, max(host_rows, 1), devices, row_len, sample_rows)
    half = -(-row_len // 32) * 16
    tail = half if sample_rows and half >= 64 else None
    try:
        loader = SFTLoader(ds, cfg.batch_size, packed=cfg.pack, batch_tokens=cfg.batch_tokens,
                           seq_len=row_len if cfg.pack else None,
                           group_by_length=cfg.group_by_length, seed=cfg.seed, add_system_ratio=cfg.add_system_ratio,
                           empty_think_ratio=cfg.empty_think_ratio, num_epochs=cfg.epochs, tail_len=tail,
                           row_multiple=devices * per_device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    iters = tuple(loader.steps_in_epoch(e) for e in range(cfg.epochs))
    # Padded rows are cut after the batch's last label (packed rows are sized by the packer); not with MoE, whose
    # aux loss averages over every position of MiniMind's full length.
    trim = not config.use_moe and not cfg.pack
    labels_only = cfg.labels_only and not step_lib.blocked_vocabulary(config, cfg.labels_only)  # the step's own way
    prepare = lambda b: prepare_batch(b, devices=devices, rows_per_device=per_device, max_rows=loader.max_rows,
                                      trim=trim, labels_only=labels_only, pad_id=ds.pad_id, tail=loader.tail_len)
    return Batches(loader, iters, np.concatenate([[0], np.cumsum(iters)]).astype(int), per_device, prepare,
                   cfg.accumulation_steps)


def rows_per_device(cfg: RunConfig, config, host_rows: int, devices: int, row_len: int,
                    sample_rows: bool = False) -> int:
    """Rows each device runs per forward pass inside a step (train.step: the step loops over chunks of these).

    On a CPU one row of max_seq_len (more would leave padding rows in a step's last chunk, for no gain); packed
    sample rows shorter than that (short-sample data) come a power of two at a time, up to CPU_CHUNK_TOKENS tokens,
    since a chunk of one short row makes small matmuls. Powers of two split a step's rows into whole chunks more
    often than other counts do (3 rows of 96 left a third of the demo's chunks empty)."""
    if config.use_moe and not cfg.pack:  # one chunk: MiniMind's aux loss over the whole padded batch
        return -(-host_rows // devices)
    if cfg.rows_per_device > 0:
        return cfg.rows_per_device
    if jax.default_backend() == "cpu":
        k = 1
        while sample_rows and 2 * k * row_len <= CPU_CHUNK_TOKENS:
            k *= 2
        return k
    return max(1, min(ACCEL_CHUNK_TOKENS // row_len, -(-host_rows // devices)))


def describe(cfg: RunConfig, params, adapter, ds, batches: Batches, devices: int, dtype: str) -> list[str]:
    """The log lines on the sizes of the run: parameters, then data and steps."""
    n_base, n_lora = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), adapter.num_params()
    loader = batches.loader
    rows = (f"packed into rows of {loader.seq_len} tokens"
            + (f", {loader.tail_len} for the short ones" if loader.tail_len else "") if cfg.pack else
            f"padded to rows of {loader.seq_len}")
    per_step = (f"{loader.rows_per_step} rows of {loader.seq_len} tokens per step (--batch_tokens {cfg.batch_tokens}; "
                "--batch_size not used)" if cfg.batch_tokens else
                f"{cfg.batch_size} samples per step{', grouped by length' if cfg.group_by_length else ''}, {rows}")
    return [f"LLM total params: {(n_base + n_lora) / 1e6:.3f} M | LoRA params: {n_lora / 1e6:.3f} M | "
            f"LoRA ratio: {n_lora / (n_base + n_lora) * 100:.2f}%",
            f"data: {len(ds)} samples from {', '.join(cfg.data_paths)}; {per_step} (fill "
            f"{loader.fill_ratio(0) * 100:.0f}%); {batches.iters[0]} steps/epoch x {cfg.epochs} epochs on {devices} "
            f"device(s), accumulation {cfg.accumulation_steps}, dtype {dtype}"]
