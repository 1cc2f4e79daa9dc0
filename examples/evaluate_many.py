"""Scoring many adapters at once: N adapters on one batch in one `jax.vmap` call, against N separate calls.

`lora.stack(adapters)` lays N adapters side by side (A [N, in, r_max], B [N, r_max, out]: each scale folded into
its B, smaller ranks zero-padded), so the loss of "base + adapter" vmapped over the stack's leading axis scores
all of them in one compiled call. The same stack also scores them the way the server batches requests: the batch
repeated N times, one adapter per row (`lora.collection(stack, adapter_ids)`), in one forward pass. The adapters:
the identity adapter a, the capitals adapter b (rank 8) and N - 2 mixes combine([a, b], [1 - t, t]) (rank 16);
the batch: the first --eval_samples conversations of both datasets together.

    python examples/evaluate_many.py [--out out/examples] [--n_adapters 8]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

import lora
from common import Lab, parser, table
from minimind_jax import nll_sum
from train import IGNORE


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--n_adapters", type=int, default=8, help="a, b and n - 2 mixes of them (n >= 2)")
    p.set_defaults(eval_samples=16)  # the vmapped call holds N copies of the activations at once
    args = p.parse_args(argv)
    lab = Lab(args)
    a, b = lab.adapter("identity"), lab.adapter("capitals")
    ts = np.linspace(0.0, 1.0, args.n_adapters)[1:-1]
    names = ["a (identity)", "b (capitals)"] + [f"combine([a, b], [{1 - t:.2f}, {t:.2f}])" for t in ts]
    adapters = [a, b] + [lora.combine([a, b], [1 - t, t]) for t in ts]
    batch = lab.joint_batch(["identity", "capitals"])
    f = lab.loss_fn(batch)
    stacked = lora.stack(adapters)
    many = jax.jit(jax.vmap(lambda weights: f(lora.Adapter(weights))))

    def one_call():
        return np.asarray(many(stacked.weights))

    def separate():
        return np.asarray([float(f(ad)) for ad in adapters])

    rows = per_row_loss(lab, batch, len(adapters))

    def per_row():
        return np.asarray(rows(stacked.weights, lab.params))

    timings = {}
    for name, fn in (("vmap", one_call), ("per_row", per_row), ("separate", separate)):
        fn()  # compile first: the timings compare running, not compiling
        t0 = time.perf_counter()
        scores = fn()
        timings[name] = (time.perf_counter() - t0, scores)
    vm, pr, sep = (timings[k][1] for k in ("vmap", "per_row", "separate"))
    print(f"\n{len(adapters)} adapters, one batch of {batch['labels'].shape[0]} rows (loss = mean cross-entropy on "
          "its answer tokens)")
    print(table(["adapter", "one vmap call", "one per-row batch", "separate calls", "max |difference|"],
                [[n, float(x), float(y), float(z), f"{max(abs(x - z), abs(y - z)):.1e}"]
                 for n, x, y, z in zip(names, vm, pr, sep)]))
    print(f"one vmap call: {timings['vmap'][0]:.2f} s; one per-row batch: {timings['per_row'][0]:.2f} s; "
          f"{len(adapters)} separate calls: {timings['separate'][0]:.2f} s")
    return {"names": names, "vmap": vm.tolist(), "per_row": pr.tolist(), "separate": sep.tolist(),
            "max_diff": float(max(np.abs(vm - sep).max(), np.abs(pr - sep).max())),
            "seconds": {k: v[0] for k, v in timings.items()}}


def per_row_loss(lab, batch: dict, n: int):
    """-> f(stacked weights, params) -> [n] losses: `batch` repeated n times, rows of copy k over base + adapter k,
    in one forward pass; then, as the trainer does, only the positions followed by an answer token are projected
    to the vocabulary (row k of those over adapter k again: its vocabulary projection may be adapted too)."""
    r, ids, labels = batch["labels"].shape[0], batch["input_ids"], batch["labels"]
    ri, ci = np.nonzero(labels[:, 1:] != IGNORE)  # position (ri, ci) predicts the answer token labels[ri, ci + 1]
    targets = jnp.asarray(np.tile(labels[ri, ci + 1], (n, 1)))  # [n, C]
    tiled = jnp.asarray(np.tile(ids, (n, 1)))  # [n * r, T]

    @jax.jit
    def f(weights, params):
        stack = lora.Adapter(weights)
        rows = {"params": params, "lora": lora.collection(stack, adapter_ids=np.repeat(np.arange(n), r))}
        hidden = lab.model.apply(rows, tiled, logits_to_keep=1).hidden_states  # [n * r, T, D]
        h = hidden.reshape(n, r, *hidden.shape[1:])[:, ri, ci]  # [n, C, D]
        copies = {"params": params, "lora": lora.collection(stack, adapter_ids=np.arange(n))}
        logits = lab.model.apply(copies, h, method="logits")  # [n, C, V]
        return jax.vmap(nll_sum)(logits, targets, jnp.ones(targets.shape, bool)) / len(ri)

    return f


if __name__ == "__main__":
    main()
