"""Loss landscapes of adapter algebra: along `lora.scale(a, t)` and along `lora.combine([a, b], [1 - t, t])`.

scale(a, t) walks from the base (t = 0) to the identity adapter a (t = 1); combine([a, b], [1 - t, t]) walks from a
to the capitals adapter b. Each point is one jitted loss call (the adapters along a path have one shape, so one
compile per path and dataset). Prints the losses and writes them as a PNG (needs matplotlib).

    python examples/interpolate.py [--out out/examples] [--points 11]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import lora
from common import Lab, parser


def main(argv=None) -> dict:
    p = parser(__doc__)
    p.add_argument("--points", type=int, default=11, help="values of t in [0, 1]")
    args = p.parse_args(argv)
    lab = Lab(args)
    a, b = lab.adapter("identity"), lab.adapter("capitals")
    ts = np.linspace(0.0, 1.0, args.points)
    f = {d: lab.loss_fn(d) for d in ("identity", "capitals")}
    curves = {
        ("scale", d): [float(f[d](lora.scale(a, t))) for t in ts] for d in ("identity", "capitals")}
    curves.update({
        ("mix", d): [float(f[d](lora.combine([a, b], [1 - t, t]))) for t in ts] for d in ("identity", "capitals")})
    ends = {"base": {d: lab.loss(None, d) for d in f}, "a": {d: lab.loss(a, d) for d in f},
            "b": {d: lab.loss(b, d) for d in f}}
    print("\n   t   scale(a,t): identity  capitals   combine([a,b],[1-t,t]): identity  capitals")
    for i, t in enumerate(ts):
        print(f"{t:5.2f}   {curves['scale', 'identity'][i]:20.4f}  {curves['scale', 'capitals'][i]:8.4f}   "
              f"{curves['mix', 'identity'][i]:32.4f}  {curves['mix', 'capitals'][i]:8.4f}")
    png = plot(ts, curves, Path(args.out) / "interpolate.png")
    print(png or "matplotlib is not installed: no PNG (pip install matplotlib)")
    return {"t": ts.tolist(), "curves": {f"{k[0]}/{k[1]}": v for k, v in curves.items()}, "ends": ends,
            "png": png}


def plot(ts, curves, png: Path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, kind, title, xlabel in ((axes[0], "scale", "scale(a, t): base -> identity adapter a", "t"),
                                    (axes[1], "mix", "combine([a, b], [1-t, t]): a -> capitals adapter b", "t")):
        for d, style in (("identity", "-o"), ("capitals", "-s")):
            ax.plot(ts, curves[kind, d], style, ms=3, label=f"loss on {d} set")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean cross-entropy (answer tokens)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return str(png)


if __name__ == "__main__":
    main()
