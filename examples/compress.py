"""Compression: `lora.svd_truncate` to lower ranks, the error it reports and the loss it gives.

svd_truncate(adapter, k) is the closest rank-k adapter per module (Eckart-Young: the top k singular triplets of
each module's delta s*A@B) and reports the relative Frobenius error of the whole truncated delta. By default the
identity adapter (rank 8) is truncated, with its greedy answer at each rank; `--adapter merge` truncates
combine([identity, capitals]) (rank 16) instead: rank 8 there is what PEFT's "svd" combination keeps.

    python examples/compress.py [--out out/examples] [--adapter identity|capitals|merge] [--ranks 1,2,4,8]
"""
from __future__ import annotations

import lora
from common import PROMPTS, Lab, parser, table


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--adapter", choices=("identity", "capitals", "merge"), default="identity")
    p.add_argument("--ranks", default=None, help="comma-separated (default: 1, 2, 4, ... up to the adapter's rank)")
    args = p.parse_args(argv)
    lab = Lab(args)
    if args.adapter == "merge":
        adapter = lora.combine([lab.adapter("identity"), lab.adapter("capitals")])
    else:
        adapter = lab.adapter(args.adapter)
    full = max(adapter.ranks.values())
    ranks = [int(r) for r in args.ranks.split(",")] if args.ranks else [2 ** i for i in range(full.bit_length())]
    prompt = PROMPTS[args.adapter][0] if args.adapter != "merge" and args.max_new_tokens > 0 else None
    rows = []
    for k in [None] + ranks:  # None: the adapter itself
        small, err = (adapter, 0.0) if k is None else lora.svd_truncate(adapter, k)
        rows.append({"rank": k or full, "truncated": k is not None, "params": small.num_params(), "error": err,
                     **{d: lab.loss(small, d) for d in ("identity", "capitals")},
                     "answer": lab.answers(small, [prompt])[0] if prompt else None})
    base = {d: lab.loss(None, d) for d in ("identity", "capitals")}
    short = {"identity": "a", "capitals": "b", "merge": "a + b"}[args.adapter]
    print(f"\nthe {args.adapter} adapter (rank {full}) truncated by SVD; loss = mean cross-entropy on answer tokens")
    print(table(["adapter", "params", "rel. error", "loss identity", "loss capitals"],
                [["base", 0, "", base["identity"], base["capitals"]]]
                + [[f"svd_truncate({short}, {r['rank']})" if r["truncated"] else f"{short} (rank {r['rank']})",
                    r["params"], f"{r['error']:.2e}" if r["truncated"] else "-", r["identity"], r["capitals"]]
                   for r in rows]))
    if prompt:
        print(f"\n{prompt}")
        for r in rows:
            print(f"  rank {r['rank']:<2}{'' if r['truncated'] else ' (as trained)'}  {r['answer']!r}")
    return {"rows": rows, "base": base}


if __name__ == "__main__":
    main()
