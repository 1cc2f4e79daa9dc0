"""One LoRA SFT run, plain or a sweep: everything `python -m train.lora` does once its flags are parsed.

    summary = run(RunConfig(data_path="my.jsonl", from_weight="full_sft", epochs=2))
    summary.losses, summary.adapter                  # a plain run is a sweep of one member: summary.members[0]

setup (JAX and its devices, base, data, the members' adapters, mesh, stacked train state) -> resume -> answers
before -> train.loop (log steps, save steps, hooks) -> loss curves, answers after, the summary (train.finish).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

import convert
from minimind_jax import MiniMindForCausalLM
from minimind_jax.config import compute_dtype
from minimind_jax.model import init_params
from train import compile_cache, evaluation, finish, job as job_lib, members as members_lib, sharding, \
    step as step_lib
from train.config import RunConfig
from train.dataset import summary_line
from train.loop import Hook, Loop, OnStep, log
from train.resume import ResumeError, ResumeManager, resume_dir
from train.summary import RunSummary

# Settings a resumed run must share with the run that wrote the state (else its batches or base would differ).
RESUME_KEYS = ("batch_size", "pack", "batch_tokens", "group_by_length", "seed", "max_seq_len", "num_samples",
               "base_fingerprint", "accumulation_steps", "rank", "targets", "alpha", "data_fingerprint", "sweep",
               "members")


@dataclass(frozen=True, eq=False)
class Job:
    """What setup built: read by the loop and the end, never changed."""
    cfg: RunConfig  # MiniMind names resolved to paths
    config: Any  # MiniMindConfig of the base
    params: Any  # base params, replicated over the mesh
    dtype: Any  # compute dtype
    mesh: Mesh
    tokenizer: Any
    batches: job_lib.Batches
    train_step: step_lib.CompiledSteps
    resume: ResumeManager
    run_meta: dict  # settings saved with the resume state (RESUME_KEYS must match to resume)
    members: tuple  # train.members.Member, in --sweep's order (one for a plain run)
    model: Any  # the MiniMindForCausalLM the step runs
    eval_sets: tuple = ()  # train.evaluation.EvalSet: held-out, general (either may be None)

    def lrs(self, g: int) -> np.ndarray:
        """The members' learning rates at global micro-step g (1-based): MiniMind's schedule, [N]."""
        return np.asarray([m.lr(g, self.batches.total) for m in self.members], np.float32)

    def adapter_meta(self, m: members_lib.Member, epoch: int, step: int) -> dict:
        # base_random_seed: a random-init base is never saved, so its seed is what rebuilds it (serve.chat does)
        cfg = self.cfg
        meta = {"lora_name": m.name, "base_config": self.config.to_dict(),
                "base_fingerprint": self.run_meta["base_fingerprint"], "epoch": epoch, "step": step,
                "base_weight": None if cfg.random_base else cfg.from_weight,
                "base_random_seed": cfg.seed if cfg.random_base else None, "learning_rate": m.cfg.learning_rate,
                "adapter_seed": m.cfg.seed, "trained_with": "minimind-jax train.lora"}
        return {**meta, "sweep": str(cfg.sweep), "sweep_member": m.settings} if cfg.sweep else meta


def run(cfg: RunConfig, *, on_step: Optional[Callable[[int, Any], None]] = None,
        hooks: Sequence[Hook] = ()) -> RunSummary:
    """Train the adapter(s) `cfg` describes; -> RunSummary. `hooks` (train.loop.Hook) are called after every
    micro-step and may stop the run; `on_step(global_step, state)` is the short form of one such hook."""
    t_start = time.time()
    job, state = setup(cfg)
    return drive(job, state, [*hooks, OnStep(on_step)] if on_step else list(hooks), t_start)


def drive(job: Job, state, hooks: Sequence[Hook] = (), t_start: Optional[float] = None) -> RunSummary:
    """A set-up job from its fresh state to its summary: resume, answers before, the loop, the end."""
    t_start = time.time() if t_start is None else t_start
    if any(job.eval_sets):
        evaluator = evaluation.Evaluator(job, *job.eval_sets)
        evaluator.precompile(state)  # while the train step compiles, the prompts are answered, the state restored
        hooks = [evaluator, *hooks]
    try:
        state, (epoch0, step0), resumed_at, hook_states = restore(job, state)
        positions = job.batches.positions(epoch0, step0)
        if positions and jax.process_count() == 1:  # compile the first batch's step while the prompts are answered
            e, s = positions[0]
            _precompile(job.train_step, job.batches, job.mesh, state, job.params, positions[0],
                        job.lrs(int(job.batches.offsets[e]) + s + 1), job.batches.is_update(e, s + 1))
        answers_before = []
        if job.cfg.prompt_list and resumed_at is None:  # the members start alike (B = 0, or one --from_lora)
            answers_before = finish.answers(job, job.members[0].init, "[before]")
        loop = Loop(job, resumed_at, hooks, hook_states)
        try:
            state = loop.run(state, positions)
        finally:
            loop.close()
    finally:
        job.resume.close()
    return finish.finish(job, state, loop, loop.steps_run, answers_before, t_start)


def setup(cfg: RunConfig):
    """-> (Job, the members' fresh train states stacked on the mesh); logs what it built.

    A fresh run's first step starts compiling from shapes alone, before the base (a random one) and the adapters
    are made: their inits are compiles of their own, and a compile keeps one core busy while the others wait."""
    ready = prepare(cfg, shapes_only=True)
    cfg, mesh, tx = ready.cfg, ready.mesh, step_lib.make_optimizer()
    shapes, _ = members_lib.make_members(cfg, ready.params, ready.config)
    train_step = step_lib.CompiledSteps(step_lib.make_train_step(
        ready.model, tx, gain=members_lib.gains(shapes), accumulation_steps=cfg.accumulation_steps,
        grad_clip=cfg.grad_clip, state_sharding=sharding.replicated(mesh), labels_only=cfg.labels_only))
    if not (cfg.from_resume or cfg.from_lora) and jax.process_count() == 1:  # new adapters: shapes from lora.init
        _compile_first_step(ready, train_step, shapes, tx)
    ready = ready.with_base()
    members, note = members_lib.make_members(cfg, ready.params, ready.config)
    log(note)
    top = members_lib.widest(members)
    for line in job_lib.describe(cfg, ready.params, top, ready.ds, ready.batches, mesh.devices.size, ready.dtype):
        log(line)
    state = sharding.replicate(members_lib.init_states(members, tx), mesh)
    Path(cfg.save_dir).mkdir(parents=True, exist_ok=True)
    resume = ResumeManager(resume_dir(cfg.save_dir, f"{cfg.lora_name}_sweep" if cfg.sweep else cfg.lora_name,
                                      ready.config))
    job = Job(cfg, ready.config, sharding.replicate(ready.params, mesh), ready.model.dtype, mesh, ready.tokenizer,
              ready.batches, train_step, resume, ready.run_meta(top, len(members)), tuple(members), ready.model,
              ready.eval_sets)
    return job, state


def _compile_first_step(ready: "Prepared", train_step: step_lib.CompiledSteps, shapes: list, tx) -> None:
    """Start compiling a fresh run's first step from the shapes of its base and stacked state (see setup)."""
    rep = sharding.replicated(ready.mesh)
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
    state = jax.eval_shape(lambda inits: members_lib.init_states(
        [dataclasses.replace(m, init=a) for m, a in zip(shapes, inits)], tx), [m.init for m in shapes])
    lrs = np.asarray([m.lr(1, ready.batches.total) for m in shapes], np.float32)
    _precompile(train_step, ready.batches, ready.mesh, spec(state), spec(ready.params), (0, 0), lrs,
                ready.batches.is_update(0, 1))


@dataclass(frozen=True, eq=False)
class Prepared:
    """What a run builds before its adapters: JAX and its devices, the base, the data and its batch plan, the
    model."""
    cfg: RunConfig  # MiniMind names resolved to paths
    config: Any
    params: Any  # on the host
    mesh: Mesh
    dtype: str
    tokenizer: Any
    ds: Any
    batches: job_lib.Batches
    model: Any
    eval_sets: tuple  # (held-out, general): train.evaluation.EvalSet or None

    def with_base(self) -> "Prepared":
        """This with a random base given as shapes (prepare(shapes_only=True)) made; else this."""
        if not members_lib.is_shapes(self.params):
            return self
        return dataclasses.replace(self, params=init_params(self.config, self.cfg.seed))

    def run_meta(self, adapter, n_members: int) -> dict:
        """The settings saved with the resume state (RESUME_KEYS must match to resume)."""
        cfg, ds = self.cfg, self.ds
        return {"batch_size": cfg.batch_size, "pack": int(cfg.pack), "batch_tokens": cfg.batch_tokens,
                "group_by_length": int(cfg.group_by_length), "seed": cfg.seed, "max_seq_len": cfg.max_seq_len,
                "accumulation_steps": cfg.accumulation_steps, "epochs": cfg.epochs,
                "learning_rate": cfg.learning_rate, "rank": cfg.rank, "targets": adapter.targets,
                "alpha": adapter.alpha, "num_samples": len(ds), "base_fingerprint": convert.fingerprint(self.params),
                "data_fingerprint": job_lib.data_fingerprint(ds), "sweep": str(cfg.sweep) if cfg.sweep else None,
                "members": n_members, "eval_ratio": cfg.eval_ratio}


def prepare(cfg: RunConfig, shapes_only: bool = False) -> Prepared:
    """JAX, the base, the data and the batch plan for `cfg`; logs them. shapes_only: a random base's params are
    left as shapes (`with_base` makes them)."""
    cfg = job_lib.resolve_names(cfg)  # MiniMind names (--from_weight full_sft) -> paths; Job.cfg keeps the paths
    # before JAX starts: the device count is fixed when its backends come up
    cpu_split = sharding.configure_cpu_devices(cfg.cpu_devices, cfg.batch_size, cfg.num_processes)
    sharding.init_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    cache_note = compile_cache.configure(cfg.compile_cache)  # before the first compile (a random base's init)
    if cache_note:
        log(cache_note)
    config, params, base_note = job_lib.load_base(cfg, shapes_only)
    log(base_note)
    if cfg.demo:
        log(cfg.demo_note())
    mesh = sharding.make_mesh()
    if cpu_split and jax.default_backend() == "cpu":
        log(f"CPU split into {cpu_split} XLA devices for data parallelism (--cpu_devices 1 to keep one)")
    dtype = cfg.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    tokenizer, ds = job_lib.load_data(cfg, config)
    log(summary_line(ds, cfg.max_seq_len))  # a large share of samples cut, or answers lost to the cut
    ds, held, general = evaluation.held_out(cfg, tokenizer, ds)  # --eval_ratio's samples leave the training set
    batches = job_lib.plan_batches(cfg, config, ds)
    sets = tuple(evaluation.make_eval_set(name, d, cfg, jax.local_device_count(), batches.rows_per_device)
                 if d is not None else None
                 for name, d in (("eval", held), ("general", general)))
    model = MiniMindForCausalLM(config, dtype=compute_dtype(dtype), remat=cfg.remat)
    return Prepared(cfg, config, params, mesh, dtype, tokenizer, ds, batches, model, sets)


def restore(job: Job, state):
    """--from_resume 1: the saved state and where it stopped; a fresh run clears an earlier run's resume state.
    -> (state, (epoch, step) to start at, 0-based; the resumed global step or None; the hooks' saved states)."""
    resume = job.resume
    if not job.cfg.from_resume:
        if jax.process_index() == 0 and resume.latest_step() is not None:
            log(f"fresh run: replacing the earlier run's resume state in {resume.directory} (steps "
                f"{resume.clear()}); --from_resume 1 continues a run instead")
        return state, (0, 0), None, {}
    step = resume.latest_step()
    if step is None:
        log(f"--from_resume 1: no checkpoint in {resume.directory}; starting from scratch")
        return state, (0, 0), None, {}
    saved = resume.read_meta(step)["run"]
    for k in RESUME_KEYS:  # before reading the arrays: a state of another run is refused by name
        if saved.get(k) != job.run_meta[k]:
            raise ResumeError(f"cannot resume from {resume.directory}/{step}: it was written with {k}="
                              f"{saved.get(k)!r}, this run has {job.run_meta[k]!r} (a fresh run without "
                              "--from_resume replaces it)")
    tree, meta, resumed_at = resume.restore(state.to_tree(), step)
    rep = sharding.replicated(job.mesh)
    state = state.from_tree(jax.tree.map(lambda x: jax.device_put(x, rep), tree))
    epoch0, step0 = int(meta["epoch"]), int(meta["step"])
    log(f"resumed from {resume.directory}/{resumed_at}: epoch {epoch0 + 1}, step {step0 + 1}")
    return state, (epoch0, step0), resumed_at, meta.get("hooks", {})


def _precompile(train_step, batches: job_lib.Batches, mesh: Mesh, state, params, position, lrs, update: bool) -> None:
    """Start compiling the step of the batch at `position` (epoch, step) in the background (state and params may
    be arrays or jax.ShapeDtypeStructs with their shardings)."""
    e, s = position
    arrays, n_chunks, cap, _ = batches.prepare(batches.loader.get_batch(e, s))
    train_step.start(state, params, sharding.put_batch(arrays, mesh), np.int32(n_chunks), lrs, cap=cap, update=update)
