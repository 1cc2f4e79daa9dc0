"""Several adapters trained together: `python -m train.lora --sweep learning_rate=1e-4,3e-4,1e-3`.

    summary = run_sweep(RunConfig(..., sweep="learning_rate=1e-4,3e-4 seed=1,2"))   # 4 members
    summary["members"], summary["adapters"]["lr3e-4_seed2"]

Each member is the run the flags describe with its own values of the swept keys: its own learning rate (and
schedule), its own adapter init and dropout key (`seed`), its own rank (`rank`). The members' adapters and optimizer
states are stacked on a leading axis and train.step's step is `jax.vmap`ped over it, with the base params and the
batch broadcast: one compiled step, one copy of the base, one pass over the data (the same batches in the same
order for every member: the sample order and a random base come from `--seed`, whatever `seed=` sweeps). Each
member keeps its own clipping (its own global norm), NaN freeze and metrics, so each equals its solo run
(tests/test_sweep.py: losses and adapters within 1e-5). A member that diverges is frozen and left out of later
logs and saves while the others go on; the run stops only when all have.

Ranks: members are zero-padded to the largest rank, and train.step.apply_gain multiplies A's columns and B's rows
by each member's gain: 0 on the padding (so it stays out of the forward pass and gets exactly zero gradient) and the
member's own scale (alpha / its rank) on B. Saves cut each adapter back to its own rank.

Output per member (tag = the values as typed, e.g. `lr3e-4_seed2`): `<lora_name>_<tag>_<hidden>.ckpt`,
`<lora_name>_<tag>_metrics.jsonl`, `<lora_name>_<tag>_loss.png`; for the sweep: `<lora_name>_sweep_loss.png` (all
curves), `<lora_name>_sweep_summary.json` (the table printed at the end) and, for `--from_resume 1` (same flags),
the stacked train state under `<save_dir>/checkpoints/<lora_name>_sweep_<hidden>_resume/`.

On a CPU the base matmuls still run once per member (each member's activations differ after its first adapted
layer); what is shared is the base weights in memory, one compile and one data pass (bench/sweep.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import lora as lora_lib
from train import job as job_lib, run as run_lib, sharding, step as step_lib
from train.config import RunConfig
from train.metrics import MetricsWriter, plot_loss, plot_losses
from train.resume import adapter_path

_is_ab = lambda x: isinstance(x, dict) and "A" in x and "B" in x


@dataclass(frozen=True, eq=False)
class Member:
    tag: str  # the swept values as typed: lr3e-4_seed2
    settings: dict  # the swept keys' values: {"learning_rate": 3e-4, "seed": 2}
    name: str  # <lora_name>_<tag>: its files' stem
    cfg: RunConfig  # the run's settings with this member's values
    init: lora_lib.Adapter  # its adapter before training, at its own rank: what saves cut the padded one back to
    adapter_file: Path
    metrics_file: Path


@dataclass(frozen=True, eq=False)
class SweepJob(run_lib.Job):
    """A Job whose state is the members' train states stacked on a leading axis [N, ...]."""
    members: tuple = ()

    def lr_at(self, g: int):
        return np.asarray([step_lib.get_lr(g, self.batches.total, m.cfg.learning_rate) for m in self.members],
                          np.float32)

    def member_adapter(self, state, i: int, host: bool = False) -> lora_lib.Adapter:
        """Member i's adapter at its own rank (from the padded stack)."""
        get = (lambda x: np.asarray(jax.device_get(x))) if host else (lambda x: x)
        init = self.members[i].init
        weights = jax.tree.map(lambda ab, ref: {"A": get(ab["A"][i, :, :ref["A"].shape[-1]]),
                                                "B": get(ab["B"][i, :ref["B"].shape[0]])},
                               state.adapter.weights, init.weights, is_leaf=_is_ab)
        return init.replace(weights=weights)

    def adapters(self, state) -> list:
        return [(m.name, self.member_adapter(state, i)) for i, m in enumerate(self.members)]

    def open_metrics(self, resumed_at: Optional[int]) -> "SweepMetrics":
        tb = Path(self.cfg.save_dir) / "tensorboard"
        return SweepMetrics([MetricsWriter(m.metrics_file, resume_step=resumed_at,
                                           tensorboard_dir=(tb / m.name) if self.cfg.tensorboard else None,
                                           enabled=jax.process_index() == 0) for m in self.members])

    def log_step(self, m: dict, at, lr, stats: dict, window: dict, last_saved) -> dict:
        """One record per member still training (None for one that diverged), and one log line with every loss."""
        epoch, s, g = at
        self.check_finite(m["bad_step"], last_saved)
        dt = time.time() - window["t0"]
        tokens_per_s = window["tokens"] / max(dt, 1e-9)
        window.update(tokens=0, t0=time.time())
        recs, shown = [], []
        for i, mem in enumerate(self.members):
            if int(m["bad_step"][i]) >= 0:
                recs.append(None)
                shown.append(f"{mem.tag} diverged@{int(m['bad_step'][i])}")
                continue
            recs.append({"step": g, "epoch": epoch + 1, "epoch_step": s, "loss": float(m["loss"][i]),
                         "aux_loss": float(m["aux_loss"][i]),
                         "lr": step_lib.get_lr(g, self.batches.total, mem.cfg.learning_rate),
                         "grad_norm": float(m["grad_norm"][i]), "tokens_per_s": tokens_per_s, "rows": stats["rows"],
                         "compile_s": round(self.train_step.total_compile_s(), 3)})
            shown.append(f"{mem.tag} {recs[-1]['loss']:.4f}")
        run_lib.log(f"Epoch:[{epoch + 1}/{self.cfg.epochs}]({s}/{self.batches.iters[epoch]}) loss: "
                    f"{' | '.join(shown)} tokens/s: {tokens_per_s:.0f}")
        return {"step": g, "members": recs, "tokens_per_s": tokens_per_s}

    def postfix(self, rec: dict) -> dict:
        losses = [r["loss"] for r in rec["members"] if r is not None]
        return {"loss": f"{min(losses):.4f}..{max(losses):.4f}", "tok_s": f"{rec['tokens_per_s']:.0f}"}

    def check_finite(self, bad_step, last_saved: Optional[str]) -> None:
        """Only when every member has diverged does the sweep stop (each froze at its last good state)."""
        bad = np.asarray(jax.device_get(bad_step))
        if (bad >= 0).all():
            kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint had been saved yet"
            where = ", ".join(f"{m.tag} at {self.batches.where(int(b))}" for m, b in zip(self.members, bad))
            raise run_lib.TrainingDiverged(f"every member of the sweep had a non-finite loss: {where}; {kept}")

    def to_save(self, state, epoch: int, step: int) -> list:
        """The members still training, each at its own rank; a diverged member's file keeps its last good save."""
        bad = np.asarray(jax.device_get(state.bad_step))
        return [(m.adapter_file, self.member_adapter(state, i, host=True), self.member_meta(m, epoch, step))
                for i, m in enumerate(self.members) if bad[i] < 0]

    def member_meta(self, m: Member, epoch: int, step: int) -> dict:
        return {**self.adapter_meta(epoch, step), "lora_name": m.name, "sweep": str(self.cfg.sweep),
                "sweep_member": m.settings, "learning_rate": m.cfg.learning_rate,
                "adapter_seed": m.cfg.seed}

    def finish(self, state, history: list, metrics, steps: int, answers_before: list, t_start: float) -> dict:
        return finish(self, state, history, steps, answers_before, t_start)


class SweepMetrics:
    """The members' metrics files, written as one: `log` takes a SweepJob.log_step record."""

    def __init__(self, writers: list):
        self.writers = writers
        self.note = writers[0].note

    def log(self, rec: dict) -> None:
        for w, r in zip(self.writers, rec["members"]):
            if r is not None:
                w.log(r)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def run_sweep(cfg: RunConfig, *, on_step: Optional[Callable[[int, Any], None]] = None) -> dict:
    """Train every member of `cfg.sweep` together; -> summary: "members" (the table's rows), "losses" and
    "adapters" by tag, "history", "steps", "compile_s", "summary_path", "answers_before", "answers_after" by tag.
    `on_step(global_step, state)` as in train.run.run, with the stacked state."""
    t_start = time.time()
    job, state = setup(cfg)
    return run_lib.drive(job, state, on_step, t_start)


def setup(cfg: RunConfig):
    """-> (SweepJob, the members' stacked fresh train states on the mesh)."""
    ready = run_lib.prepare(cfg)
    cfg = ready.cfg
    members = []
    for sm in cfg.sweep.members():
        mcfg = dataclasses.replace(cfg, sweep=None, **dict(sm.settings))
        init, _ = job_lib.make_adapter(mcfg, ready.params)
        name = f"{cfg.lora_name}_{sm.tag}"
        files = adapter_path(cfg.save_dir, name, ready.config), Path(cfg.save_dir) / f"{name}_metrics.jsonl"
        members.append(Member(sm.tag, dict(sm.settings), name, mcfg, init, *files))
    ranks = sorted({r for m in members for r in m.init.ranks.values()})
    widest = max(members, key=lambda m: m.init.num_params()).init
    run_lib.log(f"sweep: {len(members)} adapters trained together over one base and one pass of the data "
                f"({cfg.sweep}): {', '.join(m.tag for m in members)}; rank {'/'.join(map(str, ranks))}, "
                f"targets {widest.targets}, alpha {widest.alpha if len(ranks) == 1 else cfg.alpha}")
    ready.describe(widest)
    gain = member_gains([m.init for m in members])
    tx = step_lib.make_optimizer()
    # with a gain, each member's scale rides on it, so the stacked adapter itself has scale 1
    states = [step_lib.init_state(pad_to(m.init, widest, keep_scale=gain is None), tx, seed=m.cfg.seed)
              for m in members]
    state = sharding.replicate(jax.tree.map(lambda *xs: jnp.stack(xs), *states), ready.mesh)
    train_step = step_lib.CompiledSteps(make_sweep_step(
        ready.model, tx, gain, accumulation_steps=cfg.accumulation_steps, grad_clip=cfg.grad_clip,
        state_sharding=sharding.replicated(ready.mesh), labels_only=cfg.labels_only))
    stem = adapter_path(cfg.save_dir, f"{cfg.lora_name}_{{{','.join(m.tag for m in members)}}}", ready.config)
    job = ready.job(SweepJob, train_step, ready.run_meta(widest), f"{cfg.lora_name}_sweep", stem,
                    members=tuple(members))
    return job, state


def pad_to(adapter: lora_lib.Adapter, widest: lora_lib.Adapter, keep_scale: bool) -> lora_lib.Adapter:
    """`adapter` with A's columns and B's rows zero-padded to `widest`'s rank per module; keep_scale=False (members
    of several ranks) drops alpha: the stack's scale is 1 and each member's own rides on its gain."""
    def pad(ab, ref):
        extra = ref["A"].shape[-1] - ab["A"].shape[-1]
        return {"A": jnp.pad(ab["A"], ((0, 0), (0, extra))), "B": jnp.pad(ab["B"], ((0, extra), (0, 0)))}

    weights = jax.tree.map(pad, adapter.weights, widest.weights, is_leaf=_is_ab)
    return adapter.replace(weights=weights) if keep_scale else lora_lib.Adapter(weights, targets=adapter.targets)


def member_gains(adapters: list) -> Optional[dict]:
    """The step's per-rank gains, stacked [N, r_max] per module (train.step.apply_gain): 1 on a member's own ranks
    (times its scale on B), 0 on its padding. None when every member has the same ranks: nothing to mask, and the
    shared scale stays on the adapter as in a solo run."""
    if len({tuple(a.ranks.items()) for a in adapters}) == 1:
        return None
    r_max = jax.tree.map(lambda *abs_: max(ab["A"].shape[-1] for ab in abs_), *[a.weights for a in adapters],
                         is_leaf=_is_ab)

    def gains(a: lora_lib.Adapter):
        def one(ab, r):
            on = (jnp.arange(r) < ab["A"].shape[-1]).astype(jnp.float32)  # [r_max]
            return {"A": on, "B": on * a.scale(ab["A"].shape[-1])}

        return jax.tree.map(one, a.weights, r_max, is_leaf=_is_ab)

    return jax.tree.map(lambda *xs: jnp.stack(xs), *[gains(a) for a in adapters])


def make_sweep_step(model, tx, gain, *, accumulation_steps: int = 1, grad_clip: float = 1.0, state_sharding=None,
                    labels_only: bool = True):
    """train.step's step over N stacked train states: step(states, params, chunks, n_chunks, lrs [N], *, cap,
    update) -> (states, metrics [N] each); jitted, `states` donated. Base params and batch are shared (not mapped),
    so every member sees the same rows; each keeps its own optimizer, clipping and NaN freeze."""
    body = step_lib.step_body(model, tx, accumulation_steps=accumulation_steps, grad_clip=grad_clip,
                              mesh=getattr(state_sharding, "mesh", None), labels_only=labels_only)

    def step(states, params, chunks, n_chunks, lrs, *, cap, update):
        one = lambda state, lr, g: body(state, params, chunks, n_chunks, lr, cap=cap, update=update, gain=g)
        return jax.vmap(one)(states, lrs, gain)

    jit_kw = {} if state_sharding is None else {"out_shardings": (state_sharding, state_sharding)}
    return jax.jit(step, static_argnames=("cap", "update"), donate_argnums=(0,), **jit_kw)


def finish(job: SweepJob, state, history: list, steps: int, answers_before: list, t_start: float) -> dict:
    """After the loop: each member's loss curve, one plot of all, answers after, the summary table."""
    cfg, save_dir = job.cfg, Path(job.cfg.save_dir)
    train_s = time.time() - t_start
    compile_s = job.train_step.total_compile_s()
    run_lib.log(f"sweep step compiled in {compile_s:.1f} s ({len(job.train_step.compile_s)} shape(s) of batch)"
                f"{job.train_step.cache_note()}")
    bad = np.asarray(jax.device_get(state.bad_step))
    rows, losses, adapters = [], {}, {}
    for i, m in enumerate(job.members):
        recs = [rec["members"][i] for rec in history if rec["members"][i] is not None]
        losses[m.tag] = [r["loss"] for r in recs]
        adapters[m.tag] = job.member_adapter(state, i)
        best = min(recs, key=lambda r: r["loss"]) if recs else None
        rows.append({"member": m.tag, "settings": m.settings,
                     "final_loss": recs[-1]["loss"] if recs else None,
                     "best_loss": best["loss"] if best else None, "best_step": best["step"] if best else None,
                     "diverged_at": int(bad[i]) if bad[i] >= 0 else None, "time_s": round(train_s, 1),
                     "adapter": str(m.adapter_file) if m.adapter_file.exists() else None,  # diverged before a save
                     "metrics": str(m.metrics_file)})
    answers_after = {}
    if jax.process_index() == 0:
        for m in job.members:  # without matplotlib each says so: the combined plot's line below is enough
            plot_loss(m.metrics_file, save_dir / f"{m.name}_loss.png",
                      title=f"{m.name} (rank {'/'.join(map(str, sorted(set(m.init.ranks.values()))))})")
        png = save_dir / f"{cfg.lora_name}_sweep_loss.png"
        skipped = plot_losses({m.tag: m.metrics_file for m in job.members}, png, title=f"{cfg.lora_name}: {cfg.sweep}")
        run_lib.log(skipped or f"loss curves: {png} (and one per member)")
    if cfg.prompt_list:
        for i, m in enumerate(job.members):
            if bad[i] < 0:
                answers_after[m.tag] = run_lib._answers(job, adapters[m.tag], f"[after {m.tag}]")
    table = {"sweep": str(cfg.sweep), "steps": steps, "time_s": round(train_s, 1), "compile_s": round(compile_s, 2),
             "members": rows}
    summary_path = save_dir / f"{cfg.lora_name}_sweep_summary.json"
    if jax.process_index() == 0:
        summary_path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    for line in summary_lines(table):
        run_lib.log(line)
    run_lib.log(f"summary: {summary_path}; adapters {job.adapter_file}")
    finite = [r for r in rows if r["final_loss"] is not None and r["diverged_at"] is None and r["adapter"]]
    if finite:
        best = min(finite, key=lambda r: r["final_loss"])
        run_lib.log(f"chat with the lowest final loss ({best['member']}): "
                    f"{run_lib.chat_command(cfg, Path(best['adapter']))}")
    return {"members": rows, "losses": losses, "adapters": adapters, "history": history, "steps": steps,
            "compile_s": compile_s, "summary_path": str(summary_path), "answers_before": answers_before,
            "answers_after": answers_after, "updates": int(np.asarray(jax.device_get(state.updates))[0])}


def summary_lines(table: dict) -> list[str]:
    """The sweep's table as printed: member, final loss, best loss (its step), what happened."""
    fmt = lambda x: "-" if x is None else f"{x:.4f}"
    width = max(len("member"), *(len(r["member"]) for r in table["members"]))
    lines = [f"{'member':<{width}}  final loss  best loss (step)  status"]
    for r in table["members"]:
        status = "ok" if r["diverged_at"] is None else f"diverged at step {r['diverged_at']}"
        best = f"{fmt(r['best_loss'])} ({r['best_step']})" if r["best_step"] is not None else "-"
        lines.append(f"{r['member']:<{width}}  {fmt(r['final_loss']):>10}  {best:>16}  {status}")
    n = len(table["members"])
    lines.append(f"{n} adapters trained together in {table['time_s']:.0f} s ({table['steps']} steps, one compiled "
                 f"step: {table['compile_s']:.1f} s to compile)")
    return lines
