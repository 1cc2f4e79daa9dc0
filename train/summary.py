"""What a run returns: one typed record per member (a plain run is a sweep of one) and the run's own figures."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class MemberSummary:
    """One adapter of the run: its settings, curves, files and answers."""
    tag: str  # the swept values as typed (lr3e-4_seed2); "" for a plain run
    name: str  # its files' stem: <lora_name> or <lora_name>_<tag>
    settings: dict  # the swept keys' values ({} for a plain run)
    history: list  # the log steps' metrics records
    adapter: Any  # the trained lora.Adapter (its last good state if it diverged)
    adapter_path: Optional[str]  # None when it diverged before its first save
    metrics_path: str
    answers_after: list = field(default_factory=list)
    diverged_at: Optional[int] = None  # the first global step with a non-finite loss
    eval_history: list = field(default_factory=list)  # each evaluation's record (step 0: before training)
    best_eval_step: Optional[int] = None  # the step of the lowest eval loss
    best_path: Optional[str] = None  # --save_best's adapter

    @property
    def eval_losses(self) -> list:
        return [r["eval_loss"] for r in self.eval_history if "eval_loss" in r]

    @property
    def best_eval_loss(self) -> Optional[float]:
        return min(self.eval_losses) if self.eval_losses else None

    @property
    def losses(self) -> list:
        return [r["loss"] for r in self.history]

    @property
    def final_loss(self) -> Optional[float]:
        return self.history[-1]["loss"] if self.history else None

    @property
    def best(self) -> Optional[dict]:
        """The log step with the lowest training loss."""
        return min(self.history, key=lambda r: r["loss"]) if self.history else None

    def row(self, time_s: float) -> dict:
        """The member's row of the sweep table (and its JSON)."""
        best = self.best
        evals = self.eval_losses
        return {"member": self.tag, "settings": self.settings, "final_loss": self.final_loss,
                "best_loss": best["loss"] if best else None, "best_step": best["step"] if best else None,
                "eval_loss": evals[-1] if evals else None, "best_eval_loss": self.best_eval_loss,
                "best_eval_step": self.best_eval_step, "diverged_at": self.diverged_at, "time_s": round(time_s, 1),
                "adapter": self.adapter_path, "best_adapter": self.best_path, "metrics": self.metrics_path}


@dataclass
class RunSummary:
    """What `train.run` returns. A plain run has one member, whose fields the summary also answers: `summary.losses`,
    `.history`, `.adapter`, `.adapter_path`, `.metrics_path`, `.answers_after`, `.eval_losses`."""
    members: list  # [MemberSummary], in --sweep's order
    steps: int  # micro-steps run (this process's run, after a resume)
    updates: int  # optimizer steps taken in all
    compile_s: float
    time_s: float
    answers_before: list
    sweep: Optional[str] = None  # --sweep as given
    summary_path: Optional[str] = None  # the sweep table's JSON

    def _only(self) -> MemberSummary:
        if len(self.members) != 1:
            raise AttributeError(f"this run trained {len(self.members)} adapters: read summary.members[i]")
        return self.members[0]

    def member(self, tag: str) -> MemberSummary:
        return next(m for m in self.members if m.tag == tag)

    def ranked(self) -> list:
        """The members best first: by their lowest eval loss when the run has an eval set, else in --sweep's order
        (a training loss rewards the member that memorises most); diverged members last."""
        key = lambda m: (m.diverged_at is not None, m.best_eval_loss if m.best_eval_loss is not None else math.inf)
        return sorted(self.members, key=key) if any(m.eval_history for m in self.members) else list(self.members)

    def table(self) -> dict:
        """The sweep table: the run's figures and one row per member, best first (`ranked`)."""
        ranked = self.ranked()
        best = ranked[0].tag if ranked and ranked[0].best_eval_loss is not None else None
        return {"sweep": self.sweep, "steps": self.steps, "time_s": round(self.time_s, 1),
                "compile_s": round(self.compile_s, 2), "best_member": best,
                "members": [m.row(self.time_s) for m in ranked]}


def summary_lines(table: dict) -> list[str]:
    """A sweep's table as printed: member, final loss, best loss (its step), what happened."""
    fmt = lambda x: "-" if x is None else f"{x:.4f}"
    width = max(len("member"), *(len(r["member"]) for r in table["members"]))
    evals = table["best_member"] is not None
    head = f"{'member':<{width}}  final loss  best loss (step)" + ("  eval loss  best eval (step)" if evals else "")
    lines = [head + "  status"]
    for r in table["members"]:
        status = "ok" if r["diverged_at"] is None else f"diverged at step {r['diverged_at']}"
        best = f"{fmt(r['best_loss'])} ({r['best_step']})" if r["best_step"] is not None else "-"
        line = f"{r['member']:<{width}}  {fmt(r['final_loss']):>10}  {best:>16}"
        if evals:
            best_eval = "-" if r["best_eval_step"] is None else f"{fmt(r['best_eval_loss'])} ({r['best_eval_step']})"
            line += f"  {fmt(r['eval_loss']):>9}  {best_eval:>16}"
        lines.append(f"{line}  {status}")
    lines.append(f"{len(table['members'])} adapters trained together in {table['time_s']:.0f} s ({table['steps']} "
                 f"steps, one compiled step: {table['compile_s']:.1f} s to compile)"
                 + (f"; lowest eval loss: {table['best_member']}" if evals else ""))
    return lines


for _name in ("losses", "history", "adapter", "adapter_path", "metrics_path", "answers_after", "eval_losses"):
    setattr(RunSummary, _name, property(lambda self, n=_name: getattr(self._only(), n)))
