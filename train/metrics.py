"""Training logs: `<save_dir>/<lora_name>_metrics.jsonl`, optional TensorBoard, a loss-curve PNG at the end."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


class MetricsWriter:
    """One JSON object per log step, flushed as written. A fresh run starts a new file; a resumed run keeps the
    lines up to the resumed step (rewritten atomically) and appends after them, so the file has no duplicates."""

    def __init__(self, path, resume_step: Optional[int] = None, tensorboard_dir=None, enabled: bool = True):
        self.path, self.enabled, self.tb = Path(path), enabled, None
        self.note = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step is not None and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    break  # a torn last line from a killed run
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard_dir is not None:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                self.note = ("--tensorboard: tensorboardX is not installed (pip install tensorboardX); "
                             "TensorBoard logging is off")
            else:
                self.tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch") and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]


def plot_loss(metrics_paths: dict, png_path, title: str = "") -> Optional[str]:
    """The curves of one run or a sweep's members ({label: metrics file}; a plain run's label is ""): training loss at
    each log step, eval loss at each evaluation (dashed, with markers), and, when the run measured forgetting, a
    second panel with what the adapter costs the base (adapted minus base loss on the general data, and the KL).
    -> None, or the one-line reason the PNG was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipped the loss-curve PNG (pip install matplotlib)"
    runs = {label: read_metrics(p) for label, p in metrics_paths.items()}
    if not any(runs.values()):
        return "no metrics logged; skipped the loss-curve PNG"
    general = any("kl" in r for rows in runs.values() for r in rows)
    fig, axes = plt.subplots(2 if general else 1, 1, figsize=(7, 6.5 if general else 4), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for n, (label, rows) in enumerate(runs.items()):
        color, name = f"C{n % 10}", (label + " ") if label else ""
        train = [r for r in rows if "loss" in r]
        _line(ax, train, "loss", f"{name}train", color, "-", len(train) <= 30)
        if any(r.get("aux_loss") for r in train) and len(runs) == 1:
            _line(ax, train, "aux_loss", "aux_loss", "C7", "-", len(train) <= 30)
        _line(ax, [r for r in rows if "eval_loss" in r], "eval_loss", f"{name}eval", color, "--", True)
        if general:
            gen = [r for r in rows if "kl" in r]
            _line(axes[1, 0], gen, "forgetting", f"{name}general loss - base", color, "-", True)
            _line(axes[1, 0], gen, "kl", f"{name}KL(adapted || base)", color, ":", True)
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize="medium" if len(title) < 70 else "small")  # a sweep's title lists its values
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
        a.legend(fontsize="small")
    if general:
        axes[1, 0].axhline(0, color="k", lw=0.5)
        axes[1, 0].set_ylabel("cost to the base (nats/token)")
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return None


def _line(ax, rows: list, key: str, label: str, color: str, style: str, markers: bool) -> None:
    if rows:
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], style, color=color, label=label,
                marker="o" if markers else None, markersize=3)
