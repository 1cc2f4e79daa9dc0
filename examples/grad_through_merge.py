"""Learning how much of each adapter to mix: `jax.grad` of the loss with respect to `lora.combine`'s weights.

`lora.combine([a, b], w)` folds w into the factors with plain jnp arithmetic, so the loss of base + combine([a, b],
w) is differentiable in w. Starting from the average (0.5, 0.5), Adam on the two weights alone (the adapters and
the base stay fixed) minimises the loss on the first --fit_samples conversations of both datasets together, i.e.
asks for both skills at once. Prints the weights and the loss along the way, then each dataset's loss (on
--eval_samples conversations) at the start, at the learned weights and at the plain sum (1, 1).

    python examples/grad_through_merge.py [--out out/examples] [--steps 30] [--lr 0.05]
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import lora
from common import Lab, parser, table


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--steps", type=int, default=30, help="Adam steps on the two weights")
    p.add_argument("--lr", type=float, default=0.05, help="Adam's learning rate for the weights")
    p.add_argument("--init", default="0.5,0.5", help="starting weights wa,wb")
    p.add_argument("--fit_samples", type=int, default=16, help="conversations of each set in the objective (the "
                                                               "final table reports --eval_samples of each)")
    args = p.parse_args(argv)
    lab = Lab(args)
    a, b = lab.adapter("identity"), lab.adapter("capitals")
    f = lab.loss_fn(lab.joint_batch(["identity", "capitals"], rows=args.fit_samples))
    value_and_grad = jax.jit(jax.value_and_grad(lambda w: f(lora.combine([a, b], [w[0], w[1]]))))
    opt = optax.adam(args.lr)
    w = jnp.asarray([float(x) for x in args.init.split(",")], jnp.float32)
    state = opt.init(w)
    trace = []
    print("\nstep   w_identity  w_capitals   loss (both sets)   d loss / d w")
    for step in range(args.steps + 1):
        loss, g = value_and_grad(w)
        trace.append((step, w.tolist(), float(loss)))
        if step % max(1, args.steps // 8) == 0 or step == args.steps:
            print(f"{step:4d}   {float(w[0]):10.4f}  {float(w[1]):10.4f}   {float(loss):16.4f}   "
                  f"[{float(g[0]):+.4f}, {float(g[1]):+.4f}]")
        if step < args.steps:
            updates, state = opt.update(g, state)
            w = optax.apply_updates(w, updates)
    points = {"start": trace[0][1], "learned": trace[-1][1], "sum (1, 1)": [1.0, 1.0]}
    losses = {k: {d: lab.loss(lora.combine([a, b], v), d) for d in ("identity", "capitals")}
              for k, v in points.items()}
    print(table(["weights", "w_identity", "w_capitals", "loss identity", "loss capitals"],
                [[k, v[0], v[1], losses[k]["identity"], losses[k]["capitals"]] for k, v in points.items()]))
    return {"trace": trace, "weights": points, "losses": losses}


if __name__ == "__main__":
    main()
