"""The adapters a run trains: one member for a plain run, one per point of `--sweep` (learning_rate x seed x rank).

Every member is the run the flags describe with its own values of the swept keys: its own learning rate (and
schedule), its own adapter init and dropout key (`seed`), its own rank (`rank`). Their train states are stacked on a
leading axis and train.step's step runs them together: one compiled step, one copy of the base, one pass over the
data (the same batches in the same order for every member: the sample order and a random base stay --seed's). Each
keeps its own clipping, NaN freeze and metrics, so each equals its solo run (tests/test_sweep.py).

Ranks: members are zero-padded to the largest rank, and train.step.apply_gain multiplies A's columns and B's rows by
each member's gain: 0 on the padding (so it stays out of the forward pass and gets exactly zero gradient) and the
member's own scale (alpha / its rank) on B. Saves cut each adapter back to its own rank.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import lora as lora_lib
from train import job as job_lib, step as step_lib
from train.config import RunConfig
from train.resume import adapter_path

@dataclass(frozen=True, eq=False)
class Member:
    """One adapter of the run."""
    tag: str  # the swept values as typed (lr3e-4_seed2); "" for a plain run
    settings: dict  # the swept keys' values: {"learning_rate": 3e-4, "seed": 2}
    name: str  # its files' stem: <lora_name> or <lora_name>_<tag>
    cfg: RunConfig  # the run's settings with this member's values
    init: lora_lib.Adapter  # its adapter before training, at its own rank (shapes only before the base is made)
    adapter_file: Path
    metrics_file: Path

    def lr(self, g: int, total: int) -> float:
        """Its learning rate at global micro-step g (1-based): MiniMind's schedule (after --warmup_ratio's ramp)."""
        return step_lib.get_lr(g, total, self.cfg.learning_rate, round(self.cfg.warmup_ratio * total))


def make_members(cfg: RunConfig, params, config) -> tuple[list[Member], str]:
    """-> (the run's members, a note for the log). `params` may be shapes (jax.ShapeDtypeStruct leaves): the
    members' adapters are then shapes too (what the first step compiles from)."""
    points = cfg.sweep.points() if cfg.sweep else [("", {})]
    members, note = [], ""
    for tag, settings in points:
        mcfg = dataclasses.replace(cfg, sweep=None, **settings)
        if is_shapes(params) and not cfg.from_lora:  # a new adapter's shapes, without making it
            init = jax.eval_shape(lambda p: job_lib.make_adapter(mcfg, p)[0], params)
        else:
            init, note = job_lib.make_adapter(mcfg, params)
        name = f"{cfg.lora_name}_{tag}" if tag else cfg.lora_name
        members.append(Member(tag, settings, name, mcfg, init, adapter_path(cfg.save_dir, name, config),
                              Path(cfg.save_dir) / f"{name}_metrics.jsonl"))
    if cfg.sweep:
        ranks = sorted({r for m in members for r in m.init.ranks.values()})
        note = (f"sweep: {len(members)} adapters trained together over one base and one pass of the data "
                f"({cfg.sweep}): {', '.join(m.tag for m in members)}; rank {'/'.join(map(str, ranks))}, targets "
                f"{widest(members).targets}, alpha {widest(members).alpha if len(ranks) == 1 else cfg.alpha}")
    return members, note


def is_shapes(tree) -> bool:
    """Whether `tree` holds shapes (jax.ShapeDtypeStruct leaves) rather than arrays."""
    return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def widest(members: list[Member]) -> lora_lib.Adapter:
    """The member adapter with the most parameters (the largest rank): the stack's shape."""
    return max(members, key=lambda m: m.init.num_params()).init


def gains(members: list[Member]) -> Optional[dict]:
    """The step's per-rank gains, stacked [N, r_max] per module (train.step.apply_gain): 1 on a member's own ranks
    (times its scale on B), 0 on its padding. None when every member has the same ranks: nothing to mask, and the
    shared scale stays on the adapter as in a plain run. Built from shapes alone."""
    adapters = [m.init for m in members]
    if len({tuple(a.ranks.items()) for a in adapters}) == 1:
        return None
    top = widest(members).weights

    def one(a: lora_lib.Adapter):
        def module(ab, ref):
            r, r_max = ab["A"].shape[-1], ref["A"].shape[-1]
            on = (np.arange(r_max) < r).astype(np.float32)
            return {"A": on, "B": on * np.float32(a.scale(r))}

        return jax.tree.map(module, a.weights, top, is_leaf=lora_lib.is_factors)

    return jax.tree.map(lambda *xs: jnp.asarray(np.stack(xs)), *[one(a) for a in adapters])


def init_states(members: list[Member], tx):
    """The members' fresh train states stacked [N, ...], each adapter zero-padded to the widest rank. With gains
    (members of several ranks) each member's scale rides on its gain, so the stacked adapter has scale 1."""
    top, masked = widest(members), gains(members) is not None
    return step_lib.stack_states([step_lib.init_state(_pad(m.init, top, keep_scale=not masked), tx, seed=m.cfg.seed)
                                  for m in members])


def _pad(adapter: lora_lib.Adapter, top: lora_lib.Adapter, keep_scale: bool) -> lora_lib.Adapter:
    return lora_lib.pad_ranks(adapter if keep_scale else adapter.replace(alpha=None, rslora=False), top)


def member_adapters(members: list[Member], state, host: bool = False) -> list[lora_lib.Adapter]:
    """Each member's adapter at its own rank, cut from the stacked state. host: numpy copies (what process 0
    saves: slicing the global arrays there would be a computation the other processes do not join)."""
    weights = state.adapter.weights
    if host:
        weights = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), weights)
    return [m.init.replace(weights=jax.tree.map(lambda ab, ref: {"A": ab["A"][i, :, :ref["A"].shape[-1]],
                                                                 "B": ab["B"][i, :ref["B"].shape[0]]},
                                                weights, m.init.weights, is_leaf=lora_lib.is_factors))
            for i, m in enumerate(members)]
