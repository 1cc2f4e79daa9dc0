"""Two skills at once: `lora.combine` of an identity adapter and a world-capitals adapter, vs PEFT's "linear" merge.

Trains (or reuses from --out) two adapters on the same random-init base: one on the bundled identity set, one on
examples/data/capitals.jsonl. `lora.combine([a, b], [wa, wb])` is exactly wa*delta_a + wb*delta_b (rank ra + rb);
PEFT's add_weighted_adapter(combination_type="linear") sums the factors instead and keeps rank r, which adds the
cross terms A_a@B_b and A_b@B_a (common.peft_linear). Prints the mean cross-entropy of each model on each dataset's
answer tokens (lower is better), the share of each adapter's own gain over the base that a merge keeps, then the
greedy answers of each adapter and of the combination to one question of each kind.

On the random demo base the two adapters are not small edits of a competent model: each also learns the chat
format and the common tokens from scratch, so their sum counts that twice and the two interfere (the table shows
by how much); grad_through_merge.py learns the weights, and the last lines answer both questions in one batch with
each row's own adapter (lora.collection, as the server batches requests), where nothing is merged.

    python examples/compose.py [--out out/examples] [--weights 1,1]
"""
from __future__ import annotations

import lora
from common import PROMPTS, Lab, parser, peft_linear, relative_delta_gap, table


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--weights", default="1,1", help="wa,wb: the combination's weights (1,1: task arithmetic's sum)")
    args = p.parse_args(argv)
    w = [float(x) for x in args.weights.split(",")]
    lab = Lab(args)
    a, b = lab.adapter("identity"), lab.adapter("capitals")
    # (key, label, adapter)
    models = [("base", "base", None), ("a", "identity adapter a", a), ("b", "capitals adapter b", b),
              ("combine", f"combine([a, b], [{w[0]:g}, {w[1]:g}])", lora.combine([a, b], w)),
              ("peft", f"PEFT linear([a, b], [{w[0]:g}, {w[1]:g}])", peft_linear([a, b], w))]
    losses = {k: {d: lab.loss(m, d) for d in ("identity", "capitals")} for k, _, m in models}
    print(f"\nmean cross-entropy on the answer tokens of the first {args.eval_samples} conversations of each set:")
    print(table(["model", "identity", "capitals"],
                [[label, losses[k]["identity"], losses[k]["capitals"]] for k, label, _ in models]))
    # How much of each adapter's own improvement over the base a merge keeps, on that adapter's own dataset.
    kept = {k: {d: (losses["base"][d] - losses[k][d]) / (losses["base"][d] - losses[own][d])
                for d, own in (("identity", "a"), ("capitals", "b"))} for k in ("combine", "peft")}
    for k, label, _ in models[3:]:
        print(f"{label} keeps {kept[k]['identity']:.0%} of a's gain on the identity set and "
              f"{kept[k]['capitals']:.0%} of b's on the capitals set")
    gap = relative_delta_gap(models[4][2], models[3][2])
    print(f"PEFT linear's delta differs from the exact weighted sum by {gap:.1%} of the sum's norm (the cross terms)")
    answers: dict = {}
    qs = [PROMPTS["identity"][0], PROMPTS["capitals"][1]] if args.max_new_tokens > 0 else []
    for q in qs:
        print(f"\n{q}")
        for k, label, m in models[1:4]:
            answers[(q, k)] = lab.answers(m, [q])[0]
            print(f"  {label:<24} {answers[(q, k)]!r}")
    if qs:
        answers["per_row"] = lab.answers_per_row([a, b], qs)
        print("\none batch, each row with its own adapter (lora.collection with adapter_ids, as the server does):")
        for q, ans in zip(qs, answers["per_row"]):
            print(f"  {q} -> {ans!r}")
    return {"losses": losses, "kept": kept, "cross_term_gap": gap, "answers": answers}


if __name__ == "__main__":
    main()
