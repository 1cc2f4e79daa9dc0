"""Held-out evaluation while training: is the adapter learning its ability, and what does it cost the base?

- eval loss (`--eval_data` files, or `--eval_ratio` of the training files, split by --seed): the training loss's
  definition (mean cross-entropy over the assistant tokens) with no dropout, over every held-out sample once;
- forgetting (`--general_data`, chats that stand for what the base should keep): the base's loss on them, the
  adapted model's, their difference, and the mean per-token KL divergence KL(adapted || base) of the next-token
  distributions at the assistant tokens, the base's taken from the same params without the adapter (no second copy);
- `--save_best` keeps each member's adapter with the lowest eval loss, `--early_stop K` stops the run once no member
  has improved in K evaluations (saved as a finished run is).

Held-out chats are rendered as the generation prompt renders a chat (no random system prompt, the empty think block
kept), so every evaluation sees the same tokens. `Evaluator` is a train.loop.Hook: it runs before the first step of
a fresh run (the adapter's starting point) and at every `--eval_interval` (default: each epoch's end, which includes
the last step); every member of a sweep is evaluated in one vmapped program on the same batches.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import convert
import lora as lora_lib
from train import members as members_lib, step as step_lib
from train.batch import IGNORE, prepare_batch
from train.config import ConfigError, RunConfig
from train.data import SFTLoader, load_sft_dataset, packed_row_len
from train.loop import Hook, StepPoint, device_batch, log
from train.resume import adapter_path


def split(ds, ratio: float, seed: int):
    """--eval_ratio: -> (training samples, held-out samples), a split fixed by the seed (so a resumed run holds out
    the same samples)."""
    n_eval = max(1, int(round(ratio * len(ds))))
    if n_eval >= len(ds):
        raise ConfigError(f"--eval_ratio {ratio} holds out every one of the {len(ds)} samples")
    order = np.random.default_rng([seed, 7]).permutation(len(ds))
    return ds.subset(np.sort(order[n_eval:])), ds.subset(np.sort(order[:n_eval]))


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Held-out chats laid out once as the eval step's chunks: [(arrays, n_chunks)] on the host."""
    name: str  # "eval" | "general"
    ds: object
    batches: list
    tokens: int  # assistant tokens (what the loss averages over)


def make_eval_set(name: str, ds, cfg: RunConfig, devices: int, rows_per_device: int) -> EvalSet:
    row_len = packed_row_len(ds, 0.0)
    loader = SFTLoader(ds, cfg.batch_size, packed=True, seq_len=row_len, shuffle=False, add_system_ratio=0.0,
                       empty_think_ratio=1.0, num_epochs=1, row_multiple=devices * rows_per_device)
    batches, tokens = [], 0
    for s in range(loader.steps_in_epoch(0)):
        chunks, n_chunks, _, stats = prepare_batch(loader.get_batch(0, s), devices=devices,
                                                   rows_per_device=rows_per_device, max_rows=loader.max_rows,
                                                   trim=False, labels_only=False, pad_id=ds.pad_id)
        batches.append((chunks, n_chunks))
        tokens += stats["labelled"]
    return EvalSet(name, ds, batches, int(tokens))


def held_out(cfg: RunConfig, tokenizer, ds):
    """-> (training samples, held-out samples or None, general samples or None) as the flags ask."""
    read = lambda paths: load_sft_dataset(paths, tokenizer, max_seq_len=cfg.max_seq_len, cache_dir=cfg.cache_dir,
                                          skip_bad_lines=cfg.skip_bad_lines)
    held = None
    if cfg.eval_ratio > 0:
        ds, held = split(ds, cfg.eval_ratio, cfg.seed)
    elif cfg.eval_paths:
        held = read(cfg.eval_paths)
    return ds, held, read(cfg.general_paths) if cfg.general_paths else None


def eval_terms(model, params, adapter, rows: dict, with_base: bool, with_accuracy: bool = False) -> dict:
    """One chunk of rows [P, T]: the sums of -log p(assistant token) with the adapter, their count, (with_base)
    the base's sum and the summed KL(adapted || base) over the same tokens, and (with_accuracy) "correct": how many
    of them are the adapted model's argmax (next-token accuracy's numerator)."""
    fwd = lambda variables: model.apply(variables, rows["input_ids"], positions=rows.get("positions"),
                                        segment_ids=rows.get("segment_ids"), deterministic=True).logits
    tgt = rows["labels"][:, 1:]
    valid = tgt != IGNORE  # [P, T-1]
    branch = lora_lib.collection(adapter)
    lp = jax.nn.log_softmax(fwd({"params": params, "lora": branch})[:, :-1].astype(jnp.float32))  # [P, T-1, V]
    token = lambda logp: jnp.take_along_axis(logp, jnp.where(valid, tgt, 0)[..., None], -1)[..., 0]
    out = {"nll": -jnp.sum(jnp.where(valid, token(lp), 0.0)), "count": jnp.sum(valid).astype(jnp.float32)}
    if with_accuracy:
        out["correct"] = jnp.sum(valid & (jnp.argmax(lp, -1) == tgt)).astype(jnp.float32)
    if with_base:
        base = jax.nn.log_softmax(fwd({"params": params})[:, :-1].astype(jnp.float32))
        out["base_nll"] = -jnp.sum(jnp.where(valid, token(base), 0.0))
        out["kl"] = jnp.sum(jnp.where(valid, jnp.sum(jnp.exp(lp) * (lp - base), -1), 0.0))
    return out


def make_eval_step(model, gain=None, with_base: bool = False, with_accuracy: bool = False):
    """-> eval(adapters, params, chunks, n_chunks) -> {"nll", "count"[, "base_nll", "kl"][, "correct"]} each [N],
    jitted: the members' stacked adapters [N, ...] over the first n_chunks chunks (train.step.map_members)."""
    def member(adapter, params, chunks, n_chunks, g):
        seen = adapter if g is None else step_lib.apply_gain(adapter, g)

        def body(i, acc):
            rows = {k: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) for k, v in chunks.items()}
            return jax.tree.map(jnp.add, acc, eval_terms(model, params, seen, rows, with_base, with_accuracy))

        keys = ["nll", "count", *(["base_nll", "kl"] if with_base else []), *(["correct"] if with_accuracy else [])]
        zero = dict.fromkeys(keys, jnp.zeros((), jnp.float32))
        return jax.lax.fori_loop(0, n_chunks, body, zero)

    def run(adapters, params, chunks, n_chunks):
        return step_lib.map_members(lambda a, g: member(a, params, chunks, n_chunks, g), gain, adapters)

    return jax.jit(run)


class Evaluator(Hook):
    """train.loop.Hook: evaluates the members at the start of a fresh run and at every due step; logs, keeps the
    best adapters and asks the loop to stop early. Its best losses and patience travel in the resume state."""

    def __init__(self, job, eval_set: Optional[EvalSet], general: Optional[EvalSet]):
        self.job, self.sets = job, [s for s in (eval_set, general) if s is not None]
        gain, n = members_lib.gains(list(job.members)), len(job.members)
        self.steps = {s.name: make_eval_step(job.model, gain, with_base=s.name == "general") for s in self.sets}
        self.has_eval = eval_set is not None
        self.best = [math.inf] * n
        self.best_step: list = [None] * n
        self.stale = [0] * n  # evaluations since the member last improved
        self.history: list = [[] for _ in range(n)]
        self.compiled: dict = {}  # set name -> (batch shapes, Future of the compiled program)

    def precompile(self, state) -> None:
        """Start compiling each set's program in the background from the shapes of `state` and the set's first
        batch (XLA:CPU compiles on one core): the first evaluation then finds it ready, or nearly. Not with several
        processes, whose programs must be compiled in step with each other: they compile at the first call."""
        if jax.process_count() > 1:
            return
        spec = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        adapters = jax.tree.map(spec, state.adapter)
        for s in self.sets:
            batch, n, _, _ = device_batch(self.job.mesh, *s.batches[0], None, 0)
            jitted, fut = self.steps[s.name], concurrent.futures.Future()
            self.compiled[s.name] = (_shapes(batch), fut)
            compile_ = lambda j=jitted, b=jax.tree.map(spec, batch): j.lower(adapters, self.job.params, b,
                                                                             np.int32(n)).compile()
            threading.Thread(target=step_lib.settle, args=(fut, compile_), daemon=True).start()

    def _program(self, name: str, batch: dict):
        """The set's compiled program when `batch` has the shapes it was compiled for, else the jitted function."""
        shapes, fut = self.compiled.get(name, (None, None))
        return fut.result() if fut is not None and shapes == _shapes(batch) else self.steps[name]

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.stale = state["best"], state["best_step"], state["stale"]

    def before_loop(self, loop, state) -> None:
        if loop.resumed_at is None:
            self.evaluate(loop, state, StepPoint(0, 0, 0, False))

    def after_step(self, loop, state, at: StepPoint) -> bool:
        cfg = self.job.cfg
        due = at.global_step % cfg.eval_interval == 0 if cfg.eval_interval else at.end_of_epoch
        if not (due or at.global_step == self.job.batches.total):
            return False
        return self.evaluate(loop, state, at)

    def measure(self, state) -> list[dict]:
        """Each member's figures on every set: {"eval_loss", "general_loss", "base_general_loss", "forgetting",
        "kl"} (those the run has)."""
        job = self.job
        out = [{} for _ in job.members]
        for s in self.sets:
            sums = None
            for arrays, n_chunks in s.batches:
                batch, n_chunks, _, _ = device_batch(job.mesh, arrays, n_chunks, None, 0)
                got = self._program(s.name, batch)(state.adapter, job.params, batch, np.int32(n_chunks))
                sums = got if sums is None else jax.tree.map(jnp.add, sums, got)
            sums = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float64), sums)
            count = np.maximum(sums["count"], 1)
            for i, rec in enumerate(out):
                if s.name == "eval":
                    rec["eval_loss"] = float(sums["nll"][i] / count[i])
                else:
                    loss, base = float(sums["nll"][i] / count[i]), float(sums["base_nll"][i] / count[i])
                    rec.update(general_loss=loss, base_general_loss=base, forgetting=loss - base,
                               kl=float(sums["kl"][i] / count[i]))
        return out

    def evaluate(self, loop, state, at: StepPoint) -> bool:
        """Measure, log, keep the best; -> whether to stop (--early_stop)."""
        job, cfg = self.job, self.job.cfg
        jax.block_until_ready(state.adapter)  # the step in flight is not the evaluation's time
        t0 = time.perf_counter()
        results = self.measure(state)
        took = round(time.perf_counter() - t0, 3)
        improved = []
        for i, rec in enumerate(results):
            rec = {"step": at.global_step, "epoch": at.epoch + (1 if at.step else 0), **rec, "eval_s": took}
            self.history[i].append(rec)
            loop.metrics[i].log(rec)
            if self.has_eval and rec["eval_loss"] < self.best[i]:
                self.best[i], self.best_step[i], self.stale[i] = rec["eval_loss"], at.global_step, 0
                improved.append(i)
            elif self.has_eval and at.global_step:
                self.stale[i] += 1
        log(self._line(results, at))
        if self.has_eval:
            loop.postfix_extra["eval"] = f"{min(r['eval_loss'] for r in results):.4f}"
        if cfg.save_best and at.global_step and improved and jax.process_index() == 0:
            self._save_best(state, improved, at)
        if cfg.early_stop and all(s >= cfg.early_stop for s in self.stale):
            log(f"early stop: no lower eval loss in {cfg.early_stop} evaluation(s); best "
                + ", ".join(f"{m.tag or 'eval'} {b:.4f} at step {s}" for m, b, s in
                            zip(job.members, self.best, self.best_step)))
            return True
        return False

    def _line(self, results: list, at: StepPoint) -> str:
        job = self.job
        when = "before training" if not at.global_step else f"at step {at.global_step}"
        parts = []
        for m, r in zip(job.members, results):
            figures = []
            if "eval_loss" in r:
                figures.append(f"eval loss {r['eval_loss']:.4f}")
            if "general_loss" in r:
                figures.append(f"general loss {r['general_loss']:.4f} (base {r['base_general_loss']:.4f}, "
                               f"{r['forgetting']:+.4f}) KL {r['kl']:.3g}")
            parts.append((f"{m.tag}: " if m.tag else "") + " ".join(figures))
        return f"[eval] {when}: " + " | ".join(parts)

    def _save_best(self, state, improved: list, at: StepPoint) -> None:
        """Process 0: the improved members' adapters as <name>_best_<hidden>.ckpt."""
        job = self.job
        adapters = members_lib.member_adapters(list(job.members), state, host=True)
        for i in improved:
            m = job.members[i]
            meta = {**job.adapter_meta(m, at.epoch + 1, at.step), "eval_loss": self.best[i],
                    "best_step": at.global_step}
            convert.save_adapter(adapters[i], best_path(job, m), metadata=meta, overwrite=True)
        log("[eval] lowest eval loss so far, kept: " + ", ".join(
            f"{best_path(job, job.members[i]).name} ({self.best[i]:.4f})" for i in improved))

    def samples(self, k: int = 2) -> list[tuple[str, str]]:
        """[(question, reference answer)] of the first k held-out chats (the last user turn and the reply)."""
        if not self.has_eval:
            return []
        ds, out = self.sets[0].ds, []
        for i in range(min(k, len(ds))):
            path, line = ds.source(i).rsplit(":", 1)
            with open(path, encoding="utf-8") as f:
                turns = json.loads(next(x for n, x in enumerate(f, 1) if n == int(line)))["conversations"]
            users = [t["content"] for t in turns if t["role"] == "user"]
            out.append((users[-1], turns[-1]["content"] if turns[-1]["role"] == "assistant" else ""))
        return out


def _shapes(batch: dict) -> tuple:
    return tuple((k, v.shape) for k, v in sorted(batch.items()))


def best_path(job, m) -> Path:
    return adapter_path(job.cfg.save_dir, f"{m.name}_best", job.config)
