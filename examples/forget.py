"""Task arithmetic, subtraction: `lora.negate` removes what an adapter taught.

The identity adapter a lowers the loss on the identity set; base + negate(a) moves the model as far the other way
(task negation: worse on that set than the base ever was). Negation also takes one skill out of a merge: with a
and the capitals adapter b combined, adding negate(a) leaves exactly b's delta (rank 24: a, b, -a side by side),
so the identity loss goes back up while the capitals loss stays at b's. Prints the loss on each dataset's answer
tokens for each model.

    python examples/forget.py [--out out/examples]
"""
from __future__ import annotations

import lora
from common import Lab, parser, relative_delta_gap, table


def main(argv=None) -> dict:
    args = parser(__doc__).parse_args(argv)
    lab = Lab(args)
    a, b = lab.adapter("identity"), lab.adapter("capitals")
    merged = lora.combine([a, b])
    forgot = lora.add(merged, lora.negate(a))
    models = [("base", "base (before)", None), ("trained", "base + a (trained)", a),
              ("negated", "base + negate(a)", lora.negate(a)), ("merged", "base + a + b", merged),
              ("forgot", "base + a + b + negate(a)", forgot), ("b", "base + b", b)]
    losses = {k: {d: lab.loss(m, d) for d in ("identity", "capitals")} for k, _, m in models}
    print(f"\nmean cross-entropy on the answer tokens of the first {args.eval_samples} conversations of each set:")
    print(table(["model", "identity", "capitals"],
                [[label, losses[k]["identity"], losses[k]["capitals"]] for k, label, _ in models]))
    gap = relative_delta_gap(forgot, b)
    print(f"a + b + negate(a) vs b: relative delta difference {gap:.1e} (exact up to float32 rounding)")
    print(f"identity loss: {losses['base']['identity']:.4f} before, {losses['trained']['identity']:.4f} trained, "
          f"{losses['negated']['identity']:.4f} negated")
    return {"losses": losses, "forgot_vs_b_gap": gap}


if __name__ == "__main__":
    main()
