"""The LoRA SFT train step: loss, optimizer, learning-rate schedule and one jitted, pure, donated update.

Only the adapter's A/B factors are differentiated: the base params are an ordinary (non-donated, never updated)
argument of the step, so they hold no gradient and no optimizer state. The step reproduces MiniMind's
`train_lora.py` arithmetic:

- loss = mean cross-entropy over the labelled tokens of the micro-batch (logits[:, :-1] vs labels[:, 1:],
  -100 ignored) + MoE aux loss; gradients of `loss / accumulation_steps` are summed over micro-steps;
- on an update micro-step: torch's `clip_grad_norm_` (g * min(1, clip / (|g| + 1e-6))), then torch's AdamW
  (betas 0.9/0.999, eps 1e-8, decoupled weight decay 0.01) with the learning rate of that micro-step;
- lr = MiniMind's `get_lr(s, total, lr) = lr * (0.1 + 0.45 * (1 + cos(pi * s / total)))`, s counted from 1.

Batches of rows: a micro-batch is the rows of `--batch_size` samples (one per row padded, or packed several to a
row), laid out by `train.batch.prepare_batch` as chunks of P rows (one or a few per data device); the step loops
over the chunks that hold rows and sums their gradients of sum(nll) / (labelled tokens of the whole micro-batch),
which is the gradient of the micro-batch's mean loss. So the number of rows can change from step to step (it
follows the samples' lengths) under one compiled program, and activations are held for one chunk at a time.

Speed: the vocabulary projection is computed only at the positions whose shifted label is not -100. On a CPU
(dense model, frozen projection) `train.vocab_loss` projects each device's labelled positions in blocks, as many as
a chunk needs. Elsewhere each device's rows of a chunk are one group whose labelled positions are gathered into a
[groups, cap, D] buffer (`cap` static, bucketed by `prepare_batch`) before `lm_head`; `cap=None` is the MiniMind way
(logits at every position). Rows are cut after the last labelled token (bucketed too); with causal attention
nothing after it can change the loss.

NaN/inf: a non-finite loss (or gradient norm) freezes the state: that step and every later one leave the
adapter/optimizer untouched and `state.bad_step` records the first bad global micro-step, which the host checks
when it syncs anyway (log and save steps), so no step ever syncs just for this.
"""
from __future__ import annotations

import concurrent.futures
import math
import threading
import time
from functools import partial
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import PartitionSpec as P

import lora as lora_lib
from minimind_jax.model import nll_sum
from train import compile_cache, vocab_loss
from train.batch import IGNORE, TAIL
from train.sharding import AXIS


# ------------------------------------------------------------------------------------------- schedule


def get_lr(step: int, total_steps: int, lr: float, warmup_steps: int = 0) -> float:
    """MiniMind's cosine schedule with a 10% floor: lr at `step` (1-based) of `total_steps`; with warmup_steps, the
    first of them ramp linearly into it (lr * min(1, step / warmup_steps) * cosine)."""
    ramp = min(1.0, step / warmup_steps) if warmup_steps > 0 else 1.0
    return ramp * lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / total_steps)))


# ------------------------------------------------------------------------------------------- optimizer


def make_optimizer(weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """torch.optim.AdamW's defaults with unit learning rate; the step multiplies the update by the schedule's lr.

    optax.adamw(1.0) gives -(m_hat / (sqrt(v_hat) + eps) + wd * p), so lr * that is exactly torch's
    p <- p - lr*wd*p - lr*m_hat/(sqrt(v_hat)+eps). (optax's default weight_decay is 1e-4; torch's is 0.01.)
    """
    return optax.adamw(1.0, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


def clip_by_global_norm(grads, max_norm: float):
    """torch.nn.utils.clip_grad_norm_: -> (clipped grads, pre-clip global norm)."""
    norm = optax.tree.norm(grads)
    coef = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jax.tree.map(lambda g: g * coef.astype(g.dtype), grads), norm


# ------------------------------------------------------------------------------------------- state


@struct.dataclass
class TrainState:
    """Everything that changes during training (base params are not here: they never change)."""
    adapter: lora_lib.Adapter  # fp32 master weights
    opt_state: Any
    grad_acc: Any  # summed gradients of the current accumulation window (same tree as adapter.weights)
    micro: jax.Array  # int32, global micro-steps taken
    updates: jax.Array  # int32, optimizer steps taken
    grad_norm: jax.Array  # f32, pre-clip global norm of the last update
    bad_step: jax.Array  # int32, first global micro-step (1-based) with a non-finite loss; -1 = none
    rng: jax.Array  # uint32[2], dropout key (folded with `micro` each step)

    def to_tree(self) -> dict:
        """A plain dict for checkpointing."""
        return {"adapter": self.adapter.weights, "opt_state": self.opt_state, "grad_acc": self.grad_acc,
                "micro": self.micro, "updates": self.updates, "grad_norm": self.grad_norm,
                "bad_step": self.bad_step, "rng": self.rng}

    def from_tree(self, tree: dict) -> "TrainState":
        return self.replace(adapter=self.adapter.replace(weights=tree["adapter"]), opt_state=tree["opt_state"],
                            grad_acc=tree["grad_acc"], micro=tree["micro"], updates=tree["updates"],
                            grad_norm=tree["grad_norm"], bad_step=tree["bad_step"], rng=tree["rng"])


def init_state(adapter: lora_lib.Adapter, tx, seed: int = 42) -> TrainState:
    # the step donates the state: never alias the caller's arrays
    adapter = adapter.replace(weights=jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), adapter.weights))
    return TrainState(adapter=adapter, opt_state=tx.init(adapter.weights),
                      grad_acc=jax.tree.map(jnp.zeros_like, adapter.weights),
                      micro=jnp.zeros((), jnp.int32), updates=jnp.zeros((), jnp.int32),
                      grad_norm=jnp.zeros((), jnp.float32), bad_step=jnp.full((), -1, jnp.int32),
                      rng=jax.random.PRNGKey(seed))


# ------------------------------------------------------------------------------------------- loss


def labelled_nll(model, params, hidden, labels, cap: Optional[int], groups: int = 1, branch=None,
                 blocked: bool = False):
    """MiniMind's shifted cross-entropy terms from hidden states [B, T, D]: -> (sum of -log p over the labelled
    positions, their count); MiniMind's loss is sum / count over the whole batch.

    branch: the model's "lora" collection (lora.collection(adapter)); it must reach the vocabulary projection too,
    or an adapter on an untied `lm_head` (`--targets lm_head`) would get no gradient.

    cap=None: logits at all B*(T-1) positions (MiniMind). cap=C: the rows are split into `groups` equal groups
    (G, one per data device, so the gather stays on the device), the first C labelled positions of each group are
    gathered into [G, C, D] and only those are projected to the vocabulary; C must be >= the largest per-group
    count (prepare_batch guarantees it).
    """
    h, tgt = hidden[:, :-1], labels[:, 1:]
    valid = tgt != IGNORE  # [B, T-1]
    count = jnp.sum(valid)
    if blocked and (branch is None or "lm_head" not in branch):  # train.vocab_loss: a frozen projection only
        project = lambda p, x: model.apply({"params": p}, x, method="logits")
        n = valid.size
        return vocab_loss.labelled_nll_sum(project, params, h.reshape(n, -1), tgt.reshape(n), valid.reshape(n)), count
    if cap is not None:
        n = valid.shape[0] * valid.shape[1] // groups
        if cap < n:  # else every position is kept: nothing to gather
            h, tgt, valid = h.reshape(groups, n, -1), tgt.reshape(groups, n), valid.reshape(groups, n)
            idx = jax.vmap(lambda v: jnp.nonzero(v, size=cap, fill_value=0)[0])(valid)  # [G, C]
            keep = jnp.arange(cap)[None, :] < valid.sum(1, keepdims=True)  # [G, C]
            h = jnp.take_along_axis(h, idx[..., None], axis=1)  # [G, C, D]
            tgt = jnp.take_along_axis(tgt, idx, axis=1)
            valid = keep
    variables = {"params": params} if branch is None else {"params": params, "lora": branch}
    logits = model.apply(variables, h, method="logits")  # [B or G, T-1 or C, V]
    return nll_sum(logits, tgt, valid), count


def loss_terms(adapter, params, batch: dict, *, model, cap: Optional[int], rng=None, deterministic: bool = False,
               groups: int = 1, blocked: bool = False):
    """One forward pass over rows [B, T] -> (nll sum, labelled count, MoE aux loss)."""
    kw = {}
    if rng is not None and model.config.dropout > 0 and not deterministic:
        kw["rngs"] = {"dropout": rng}
    branch = lora_lib.collection(adapter)  # built once, for the layers and the vocabulary projection
    variables = {"params": params} if branch is None else {"params": params, "lora": branch}
    out = model.apply(variables, batch["input_ids"], positions=batch.get("positions"),
                      segment_ids=batch.get("segment_ids"), deterministic=deterministic, logits_to_keep=1, **kw)
    nll, count = labelled_nll(model, params, out.hidden_states, batch["labels"], cap, groups, branch, blocked)
    aux = out.aux_loss if out.aux_loss is not None else jnp.zeros((), jnp.float32)
    return nll, count, aux


def loss_fn(adapter, params, batch: dict, *, model, cap: Optional[int], rng=None, deterministic: bool = False,
            groups: int = 1, blocked: bool = False):
    """MiniMind's loss of one batch of rows [B, T]: -> (ce + aux, (ce, aux)), ce the mean over labelled tokens."""
    nll, count, aux = loss_terms(adapter, params, batch, model=model, cap=cap, rng=rng, deterministic=deterministic,
                                 groups=groups, blocked=blocked)
    ce = nll / jnp.maximum(count, 1)
    return ce + aux, (ce, aux)


# ------------------------------------------------------------------------------------------- step


def make_train_step(model, tx, *, gain=None, accumulation_steps: int = 1, grad_clip: float = 1.0,
                    state_sharding=None, labels_only: bool = True):
    """-> step(states, params, chunks, n_chunks, lrs, *, cap, update) -> (states, metrics); jitted, `states` donated.

    `states`: the members' train states stacked on a leading axis [N, ...] (a plain run is a sweep of N = 1), `lrs`
    [N] their learning rates; the metrics come back [N] each. The base params and the batch are shared, so every
    member sees the same rows; each keeps its own optimizer, clipping and NaN freeze: `step_body` vmapped over the
    member axis. With one member and no gain the axis is squeezed instead, so a plain run compiles exactly
    `step_body`'s program. `gain` (stacked [N, r]): see apply_gain. A `state_sharding` on a mesh gives the step that
    mesh (each device loops over its own rows)."""
    body = step_body(model, tx, accumulation_steps=accumulation_steps, grad_clip=grad_clip,
                     mesh=getattr(state_sharding, "mesh", None), labels_only=labels_only)

    def step(states, params, chunks, n_chunks, lrs, *, cap, update):
        return map_members(lambda state, lr, g: body(state, params, chunks, n_chunks, lr, cap=cap, update=update,
                                                     gain=g), gain, states, lrs)

    jit_kw = {} if state_sharding is None else {"out_shardings": (state_sharding, state_sharding)}
    return jax.jit(step, static_argnames=("cap", "update"), donate_argnums=(0,), **jit_kw)


def map_members(one, gain, *stacked):
    """one(*member's slices, member's gain) over the members' axis of `stacked` (trees [N, ...]): jax.vmap, or for
    one member and no gain the function itself on the squeezed trees (the program a single adapter compiles to)."""
    if gain is None and jax.tree.leaves(stacked[0])[0].shape[0] == 1:
        out = one(*jax.tree.map(lambda x: x[0], stacked), None)
        return jax.tree.map(lambda x: x[None], out)
    return jax.vmap(one)(*stacked, gain)


def stack_states(states: list) -> TrainState:
    """Train states -> one with a leading member axis [N, ...], what the step takes."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)


def apply_gain(adapter: lora_lib.Adapter, gain) -> lora_lib.Adapter:
    """The adapter with each rank column of A and row of B multiplied by `gain`'s factor ({module: {"A": [r],
    "B": [r]}}): a rank sweep pads its members to one rank, and a 0 there keeps the padded part out of the forward
    pass and its gradient at exactly 0; B's factor also carries the member's own scale."""
    weights = jax.tree.map(lambda ab, g: {"A": ab["A"] * g["A"][None, :], "B": ab["B"] * g["B"][:, None]},
                           adapter.weights, gain, is_leaf=lora_lib.is_factors)
    return adapter.replace(weights=weights)


def blocked_vocabulary(config, labels_only: bool = True) -> bool:
    """Whether the trainer's step (on a mesh) projects the vocabulary with train.vocab_loss: on a CPU, for a dense
    model, unless --labels_only 0 asks for MiniMind's full projection. prepare_batch's gather (its `cap`) is then
    not used, so the trainer asks for none (fewer compiled shapes). A GPU keeps one big projection or the gather,
    which suit it better than a loop of small matmuls; an adapter on lm_head falls back to the full projection."""
    return labels_only and not config.use_moe and jax.default_backend() == "cpu"


def last_labelled(chunks):
    """1 + the index of the last of chunks [C, ...] whose rows hold a label (0: none)."""
    labelled = jnp.any(chunks["labels"][..., 1:] != IGNORE, axis=tuple(range(1, chunks["labels"].ndim)))
    return jnp.max(jnp.where(labelled, jnp.arange(1, labelled.shape[0] + 1), 0))


def step_body(model, tx, *, accumulation_steps: int = 1, grad_clip: float = 1.0, mesh=None,
              labels_only: bool = True):
    """-> step(state, params, chunks, n_chunks, lr, *, cap, update, gain=None) -> (state, metrics), not jitted.

    chunks: prepare_batch's [C, P, T] arrays (the batch's rows, P per chunk); the step runs the model over the
    first `n_chunks` chunks one at a time (a loop with a traced trip count: one compiled program whatever the number
    of rows) and sums their gradients of sum(nll) / (labelled tokens of the whole batch) + aux / n_chunks, which is
    exactly the gradient of MiniMind's loss of the whole batch (mean over its labelled tokens); a MoE aux loss is
    the mean of the chunks' (MiniMind's over the whole batch when it is one chunk).
    `mesh` (the data mesh; dense models): each device loops over its own rows (`jax.shard_map`) up to its last
    chunk that holds a label, and the devices sum their gradients once, after the loop. Without it the loop runs
    SPMD over whole chunks, which all-reduces the gradients of every chunk and makes the devices wait for each
    other chunk by chunk; a MoE model keeps that way, because its aux loss is a mean over a chunk's rows on every
    device.
    `labels_only`: see blocked_vocabulary.
    Short rows (prepare_batch's "tail/" chunks, when present) run after the full ones as a second loop of their own
    shape, up to the last chunk that holds a label (per device on a mesh); their sums join the full rows'.
    `update` (static): apply the optimizer after adding this micro-batch's gradients (MiniMind: every
    `accumulation_steps` micro-steps and at the end of an epoch). `cap` (static): prepare_batch's (groups, C) or
    None, see labelled_nll.
    metrics: {"loss": ce + aux, "aux_loss", "grad_norm" (last update's), "bad_step"} as device scalars.
    `gain`: see apply_gain (None: the adapter as it is).
    """
    acc = float(accumulation_steps)
    per_device = mesh is not None and not model.config.use_moe
    blocked = per_device and blocked_vocabulary(model.config, labels_only)

    def chunk_sums(adapter, params, chunks, n_chunks, total, n, rng, gain, groups, c):
        """The loop over chunks -> (sum of nll, sum of aux, summed gradients) of these chunks."""
        def chunk_loss(adapter, i):
            rows = {k: jax.lax.dynamic_index_in_dim(v, i, 0, keepdims=False) for k, v in chunks.items()}
            seen = adapter if gain is None else apply_gain(adapter, gain)
            nll, _, aux = loss_terms(seen, params, rows, model=model, cap=c, rng=jax.random.fold_in(rng, i),
                                     groups=groups, blocked=blocked)
            return (nll / total + aux / n) / acc, (nll, aux)

        def body(i, carry):
            nll_sum, aux_sum, grads = carry
            (_, (nll, aux)), g = jax.value_and_grad(chunk_loss, has_aux=True)(adapter, i)
            return nll_sum + nll, aux_sum + aux, jax.tree.map(jnp.add, grads, g.weights)

        zero = jnp.zeros((), jnp.float32)
        return jax.lax.fori_loop(0, n_chunks, body, (zero, zero, jax.tree.map(jnp.zeros_like, adapter.weights)))

    def all_sums(adapter, params, chunks, n_chunks, total, n, rng, gain, groups, c, per_device_trips=False):
        """The full rows' loop, then the short rows' (if any) -> their summed (nll, aux, gradients). The full rows
        run n_chunks chunks, or on one device up to its last labelled chunk; the short rows to their last."""
        main = {k: v for k, v in chunks.items() if not k.startswith(TAIL)}
        tail = {k[len(TAIL):]: v for k, v in chunks.items() if k.startswith(TAIL)}
        trips = jnp.minimum(last_labelled(main), n_chunks) if per_device_trips else n_chunks
        sums = chunk_sums(adapter, params, main, trips, total, n, rng, gain, groups, c)
        if tail:
            more = chunk_sums(adapter, params, tail, last_labelled(tail), total, n, jax.random.fold_in(rng, 1 << 30),
                              gain, groups, c)
            sums = jax.tree.map(jnp.add, sums, more)
        return sums

    def device_sums(adapter, params, chunks, n_chunks, total, n, rng, gain, c):
        """One device's rows [C, P/devices, T]: its own trip counts, then one sum over the devices."""
        rng = jax.random.fold_in(rng, jax.lax.axis_index(AXIS))
        return jax.lax.psum(all_sums(adapter, params, chunks, n_chunks, total, n, rng, gain, 1, c, True), AXIS)

    def step(state: TrainState, params, chunks, n_chunks, lr, *, cap, update, gain=None):
        rng = jax.random.fold_in(state.rng, state.micro)
        total = sum(jnp.sum(v[..., 1:] != IGNORE) for k, v in chunks.items() if k.endswith("labels"))
        total = jnp.maximum(total, 1).astype(jnp.float32)
        n = jnp.maximum(n_chunks, 1).astype(jnp.float32)
        groups, c = cap if cap is not None else (1, None)
        if per_device:
            # check_vma off: with it, JAX would sum the replicated adapter's gradient over the devices inside the
            # loop (every chunk), which is what this path avoids; device_sums' one psum does it instead.
            specs = (P(), P(), P(None, AXIS)) + (P(),) * 5  # adapter, params, chunks (rows split), the rest
            sums = jax.shard_map(partial(device_sums, c=c), mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
            nll_sum, aux_sum, grads = sums(state.adapter, params, chunks, n_chunks, total, n, rng, gain)
        else:
            nll_sum, aux_sum, grads = all_sums(state.adapter, params, chunks, n_chunks, total, n, rng, gain, groups, c)
        ce, aux = nll_sum / total, aux_sum / n
        loss = ce + aux
        grad_acc = jax.tree.map(jnp.add, state.grad_acc, grads)
        new = state.replace(grad_acc=grad_acc, micro=state.micro + 1)
        finite = jnp.isfinite(loss)
        if update:
            clipped, norm = clip_by_global_norm(grad_acc, grad_clip)
            upd, opt_state = tx.update(clipped, state.opt_state, state.adapter.weights)
            upd = jax.tree.map(lambda u: (lr * u).astype(u.dtype), upd)
            weights = optax.apply_updates(state.adapter.weights, upd)
            new = new.replace(adapter=state.adapter.replace(weights=weights), opt_state=opt_state,
                              grad_acc=jax.tree.map(jnp.zeros_like, grad_acc), updates=state.updates + 1,
                              grad_norm=norm.astype(jnp.float32))
            finite &= jnp.isfinite(norm)
        ok = (state.bad_step < 0) & finite
        # Once bad, freeze everything except the counters: the host stops at its next sync with the good state.
        frozen = jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, state.replace(micro=new.micro))
        bad_step = jnp.where(state.bad_step >= 0, state.bad_step, jnp.where(finite, -1, new.micro))
        new = frozen.replace(bad_step=bad_step.astype(jnp.int32))
        return new, {"loss": loss, "aux_loss": aux, "grad_norm": new.grad_norm, "bad_step": new.bad_step}

    return step


class CompiledSteps:
    """The train step compiled ahead of time, once per (array shapes, cap, update), with the compile time of each.

    `start(...)` compiles a variant in a background thread (e.g. the first batch's while the trainer answers its
    prompts or loads data: XLA:CPU compiles on one core); `__call__` waits for it, or compiles what it has not seen.
    """

    def __init__(self, jitted):
        self.jitted, self.compiled, self.compile_s = jitted, {}, {}
        self._lock = threading.Lock()
        self._cache_mark = compile_cache.loaded()

    def cache_note(self) -> str:
        """What JAX's persistent compilation cache saved since this object was made (the step's programs and the
        run's generation), as a clause for the compile log line; "" when nothing came from it."""
        n, saved = compile_cache.loaded()
        n, saved = n - self._cache_mark[0], saved - self._cache_mark[1]
        return f"; {n} program(s) loaded from the compile cache, {saved:.0f} s of compiling saved" if n else ""

    @staticmethod
    def key(chunks, cap, update):
        return tuple((k, v.shape) for k, v in sorted(chunks.items())), cap, update

    def _compile(self, key, state, params, chunks, n_chunks, lr, cap, update):
        t0 = time.perf_counter()
        out = self.jitted.lower(state, params, chunks, n_chunks, lr, cap=cap, update=update).compile()
        with self._lock:
            self.compile_s[key] = time.perf_counter() - t0
        return out

    def total_compile_s(self) -> float:
        """Seconds spent compiling so far (background compiles included once they finish)."""
        with self._lock:
            return sum(self.compile_s.values())

    def start(self, state, params, chunks, n_chunks, lr, *, cap, update) -> None:
        key = self.key(chunks, cap, update)
        with self._lock:
            if key in self.compiled:
                return
            fut = concurrent.futures.Future()
            self.compiled[key] = fut
        threading.Thread(target=lambda: settle(fut, self._compile, key, state, params, chunks, n_chunks, lr, cap,
                                                update), daemon=True).start()

    def __call__(self, state, params, chunks, n_chunks, lr, *, cap, update):
        key = self.key(chunks, cap, update)
        with self._lock:
            fut = self.compiled.get(key)
            if fut is None:
                fut = self.compiled[key] = concurrent.futures.Future()
                owner = True
            else:
                owner = False
        if owner:
            settle(fut, self._compile, key, state, params, chunks, n_chunks, lr, cap, update)
        return fut.result()(state, params, chunks, n_chunks, lr)


def settle(fut, fn, *args) -> None:
    """fut <- fn(*args), or the exception it raised (surfaced by the waiter's fut.result()): a background compile."""
    try:
        fut.set_result(fn(*args))
    except BaseException as e:  # surfaced by the caller's fut.result()
        fut.set_exception(e)


def make_eval_loss(model, *, labels_only: bool = True):
    """-> loss(adapter, params, batch, cap) -> (ce + aux, (ce, aux)), deterministic, jitted (tests, eval)."""

    @partial(jax.jit, static_argnames=("cap",))
    def f(adapter, params, batch, cap=None):
        return loss_fn(adapter, params, batch, model=model, cap=cap if labels_only else None, deterministic=True)

    return f
