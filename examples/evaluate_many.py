"""Scoring many adapters at once: N adapters on one batch in one `jax.vmap` call, against N separate calls.

`lora.stack(adapters)` lays N adapters side by side (A [N, in, r_max], B [N, r_max, out]: each scale folded into
its B, smaller ranks zero-padded), so the loss of "base + adapter" vmapped over the stack's leading axis scores
all of them in one compiled call. The adapters: the identity adapter a, the capitals adapter b (rank 8) and
N - 2 mixes combine([a, b], [1 - t, t]) (rank 16); the batch: the evaluation rows of both datasets together.

    python examples/evaluate_many.py [--out out/examples] [--n_adapters 8]
"""
from __future__ import annotations

import time

import jax
import numpy as np

import lora
from common import Lab, parser, table


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

    timings = {}
    for name, fn in (("vmap", one_call), ("separate", separate)):
        fn()  # compile first: the timings compare running, not compiling
        t0 = time.perf_counter()
        scores = fn()
        timings[name] = (time.perf_counter() - t0, scores)
    vm, sep = timings["vmap"][1], timings["separate"][1]
    print(f"\n{len(adapters)} adapters, one batch of {batch['labels'].shape[0]} rows (loss = mean cross-entropy on "
          "its answer tokens)")
    print(table(["adapter", "one vmap call", "separate calls", "|difference|"],
                [[n, float(x), float(y), f"{abs(x - y):.1e}"] for n, x, y in zip(names, vm, sep)]))
    print(f"one vmap call: {timings['vmap'][0]:.2f} s; {len(adapters)} separate calls: {timings['separate'][0]:.2f} s")
    return {"names": names, "vmap": vm.tolist(), "separate": sep.tolist(), "max_diff": float(np.abs(vm - sep).max()),
            "seconds": {k: v[0] for k, v in timings.items()}}


if __name__ == "__main__":
    main()
