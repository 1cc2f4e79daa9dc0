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


def plot_loss(metrics_path, png_path, title: str = "") -> Optional[str]:
    """Write the loss curve; returns None on success, else a one-line reason it was skipped."""
    rows = read_metrics(metrics_path)
    curves = {"loss": rows}
    if any(r.get("aux_loss") for r in rows):
        curves["aux_loss"] = [{"step": r["step"], "loss": r["aux_loss"]} for r in rows]
    return _plot(curves, png_path, title)


def plot_losses(metrics_paths: dict, png_path, title: str = "") -> Optional[str]:
    """Several runs' loss curves in one plot ({label: metrics file}, a sweep's members); None or why skipped."""
    return _plot({label: read_metrics(p) for label, p in metrics_paths.items()}, png_path, title)


def _plot(curves: dict, png_path, title: str) -> Optional[str]:
    """{label: [{"step", "loss"}, ...]} -> one PNG, written atomically (a legend when there are several)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed; skipped the loss-curve PNG (pip install matplotlib)"
    if not any(curves.values()):
        return "no metrics logged; skipped the loss-curve PNG"
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, rows in curves.items():
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
    if len(curves) > 1:
        ax.legend(fontsize="small")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize="medium" if len(title) < 70 else "small")  # a sweep's title lists its values
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    tmp = png_path.with_name(png_path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return None
