"""One LoRA SFT run: everything `python -m train.lora` does once its flags are parsed.

    summary = run(RunConfig(data_path="my.jsonl", from_weight="full_sft", epochs=2))
    summary["losses"], summary["adapter"]                   # the log steps' losses, the trained lora.Adapter

setup (JAX and its devices, base, data, adapter, mesh, train state, resume) -> answers before -> the loop over
prefetched host batches (log steps, save steps) -> loss curve, answers after, summary. `on_step(global_step,
state)`, if given, runs after every micro-step, its log and its save (research hooks; tests raise from it to
simulate a crash); `state` is the train.step.TrainState, donated to the next step: copy what must outlive it.
"""
from __future__ import annotations

import dataclasses
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

import convert
from minimind_jax import MiniMindForCausalLM
from minimind_jax.config import compute_dtype
from minimind_jax.model import init_params
from train import compile_cache, job as job_lib, sharding, step as step_lib
from train.batch import IGNORE, TAIL
from train.config import PROMPTS, RunConfig
from train.metrics import MetricsWriter, plot_loss
from train.interrupt import Interrupted, StopRequests
from train.prefetch import Prefetcher
from train.prompts import answer
from train.resume import ResumeError, ResumeManager, adapter_path, disk_full, resume_dir

# Settings a resumed run must share with the run that wrote the state (else its batches or base would differ).
RESUME_KEYS = ("batch_size", "pack", "batch_tokens", "group_by_length", "seed", "max_seq_len", "num_samples",
               "base_fingerprint", "accumulation_steps", "rank", "targets", "alpha", "data_fingerprint", "sweep")


class TrainingDiverged(RuntimeError):
    pass


class DiskFull(RuntimeError):
    """No space left on the device (or quota) while the run wrote its checkpoints or logs: the message names what
    was being written and the last complete checkpoint, which a failed save leaves intact."""


def log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


@dataclass(frozen=True, eq=False)
class Job:
    """What setup built: read by the loop and the end, never changed."""
    cfg: RunConfig
    config: Any  # MiniMindConfig of the base
    params: Any  # base params, replicated over the mesh
    dtype: Any  # compute dtype
    mesh: Mesh
    tokenizer: Any
    batches: job_lib.Batches
    train_step: step_lib.CompiledSteps
    resume: ResumeManager
    adapter_file: Path
    run_meta: dict  # settings saved with the resume state (RESUME_KEYS must match to resume)

    def adapter_meta(self, epoch: int, step: int) -> dict:
        # base_random_seed: a random-init base is never saved, so its seed is what rebuilds it (serve.chat does)
        return {"lora_name": self.cfg.lora_name, "base_config": self.config.to_dict(),
                "base_fingerprint": self.run_meta["base_fingerprint"], "epoch": epoch, "step": step,
                "base_weight": None if self.cfg.random_base else self.cfg.from_weight,
                "base_random_seed": self.cfg.seed if self.cfg.random_base else None,
                "trained_with": "minimind-jax train.lora"}

    # What the loop asks of its job; train.sweep.SweepJob answers each for several adapters trained together.
    def lr_at(self, g: int):
        """The learning rate of global micro-step g (1-based): MiniMind's schedule."""
        return step_lib.get_lr(g, self.batches.total, self.cfg.learning_rate)

    def adapters(self, state) -> list:
        """[(name, adapter)] that `state` trains."""
        return [(self.cfg.lora_name, state.adapter)]

    def open_metrics(self, resumed_at: Optional[int]) -> MetricsWriter:
        save_dir = Path(self.cfg.save_dir)
        return MetricsWriter(save_dir / f"{self.cfg.lora_name}_metrics.jsonl", resume_step=resumed_at,
                             tensorboard_dir=(save_dir / "tensorboard" / self.cfg.lora_name)
                             if self.cfg.tensorboard else None, enabled=jax.process_index() == 0)

    def log_step(self, m: dict, at, lr, stats: dict, window: dict, last_saved) -> dict:
        return _log_step(self, m, at, lr, stats, window, last_saved)

    def postfix(self, rec: dict) -> dict:
        return {"loss": f"{rec['loss']:.4f}", "lr": f"{rec['lr']:.2e}", "tok_s": f"{rec['tokens_per_s']:.0f}"}

    def check_finite(self, bad_step, last_saved: Optional[str]) -> None:
        _check_finite(self, bad_step, last_saved)

    def to_save(self, state, epoch: int, step: int) -> list:
        """[(path, adapter on the host, metadata)] that a save step writes (after the resume state)."""
        host = state.adapter.replace(weights=jax.tree.map(lambda x: np.asarray(jax.device_get(x)),
                                                          state.adapter.weights))
        return [(self.adapter_file, host, self.adapter_meta(epoch, step))]

    def finish(self, state, history: list, metrics, steps: int, answers_before: list, t_start: float) -> dict:
        return finish(self, state, history, metrics.path, steps, answers_before, t_start)


def run(cfg: RunConfig, *, on_step: Optional[Callable[[int, Any], None]] = None) -> dict:
    """Train an adapter as `cfg` says; -> summary: "losses" and "history" (the log steps'), "adapter",
    "updates" (optimizer steps), "steps" (micro-steps run), "adapter_path", "metrics_path", "answers_before",
    "answers_after", "compile_s"."""
    t_start = time.time()
    job, state = setup(cfg)
    return drive(job, state, on_step, t_start)


def drive(job: Job, state, on_step=None, t_start: Optional[float] = None) -> dict:
    """A set-up job from its fresh state to its summary: resume, answers before, the loop, `job.finish`."""
    t_start = time.time() if t_start is None else t_start
    try:
        state, (epoch0, step0), resumed_at = restore(job, state)
        positions = job.batches.positions(epoch0, step0)
        if positions and jax.process_count() == 1:  # compile the first batch's step while the prompts are answered
            e, s = positions[0]
            lr = job.lr_at(int(job.batches.offsets[e]) + s + 1)  # a sweep's is a vector: the compiled shape
            _precompile(job.train_step, job.batches, job.mesh, state, job.params, positions[0], lr,
                        _is_update(job.cfg, job.batches, e, s + 1))
        answers_before = []
        if job.cfg.prompt_list and resumed_at is None:  # a sweep's members start alike (B = 0, or one --from_lora)
            answers_before = _answers(job, job.adapters(state)[0][1], "[before]")
        metrics = job.open_metrics(resumed_at)
        if metrics.note:
            log(metrics.note)
        try:
            state, history = train_loop(job, state, positions, metrics, on_step)
        finally:
            metrics.close()
    finally:
        job.resume.close()
    return job.finish(state, history, metrics, len(positions), answers_before, t_start)


def setup(cfg: RunConfig):
    """-> (Job, fresh train state on the mesh); logs what it built.

    A fresh run's first step starts compiling from shapes alone, before the base (a random one) and the adapter
    are made: their inits are compiles of their own, and a compile keeps one core busy while the others wait."""
    ready = prepare(cfg, shapes_only=True)
    cfg, mesh = ready.cfg, ready.mesh
    tx = step_lib.make_optimizer()
    train_step = step_lib.CompiledSteps(step_lib.make_train_step(
        ready.model, tx, accumulation_steps=cfg.accumulation_steps, grad_clip=cfg.grad_clip,
        state_sharding=sharding.replicated(mesh), labels_only=cfg.labels_only))
    if not (cfg.from_resume or cfg.from_lora) and jax.process_count() == 1:  # a new adapter: shapes from lora.init
        _compile_first_step(ready, train_step, tx)
    ready = ready.with_base()
    adapter, adapter_note = job_lib.make_adapter(cfg, ready.params)
    log(adapter_note)
    ready.describe(adapter)
    state = sharding.replicate(step_lib.init_state(adapter, tx, seed=cfg.seed), mesh)
    return ready.job(Job, train_step, ready.run_meta(adapter), cfg.lora_name,
                     adapter_path(cfg.save_dir, cfg.lora_name, ready.config)), state


def _compile_first_step(ready: "Prepared", train_step: step_lib.CompiledSteps, tx) -> None:
    """Start compiling a fresh run's first step from the shapes of its base, adapter and state (see setup)."""
    cfg, rep = ready.cfg, sharding.replicated(ready.mesh)
    spec = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)
    adapter = jax.eval_shape(lambda p: job_lib.make_adapter(cfg, p)[0], ready.params)
    state = jax.eval_shape(lambda a: step_lib.init_state(a, tx, seed=cfg.seed), adapter)
    lr = step_lib.get_lr(1, ready.batches.total, cfg.learning_rate)
    _precompile(train_step, ready.batches, ready.mesh, spec(state), spec(ready.params), (0, 0), lr,
                _is_update(cfg, ready.batches, 0, 1))


@dataclass(frozen=True, eq=False)
class Prepared:
    """What a run builds before its adapters (train.sweep builds several over the same): JAX and its devices,
    the base, the data and its batch plan, the model."""
    cfg: RunConfig  # MiniMind names resolved to paths
    config: Any
    params: Any  # on the host
    mesh: Mesh
    dtype: str
    tokenizer: Any
    ds: Any
    batches: job_lib.Batches
    model: Any

    def with_base(self) -> "Prepared":
        """This with a random base given as shapes (prepare(shapes_only=True)) made; else this."""
        if not any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params)):
            return self
        return dataclasses.replace(self, params=init_params(self.config, self.cfg.seed))

    def describe(self, adapter) -> None:
        for line in job_lib.describe(self.cfg, self.params, adapter, self.ds, self.batches, self.mesh.devices.size,
                                     self.dtype):
            log(line)

    def run_meta(self, adapter) -> dict:
        """The settings saved with the resume state (RESUME_KEYS must match to resume)."""
        cfg, ds = self.cfg, self.ds
        return {"batch_size": cfg.batch_size, "pack": int(cfg.pack), "batch_tokens": cfg.batch_tokens,
                "group_by_length": int(cfg.group_by_length), "seed": cfg.seed, "max_seq_len": cfg.max_seq_len,
                "accumulation_steps": cfg.accumulation_steps, "epochs": cfg.epochs,
                "learning_rate": cfg.learning_rate, "rank": cfg.rank, "targets": adapter.targets,
                "alpha": adapter.alpha, "num_samples": len(ds), "base_fingerprint": convert.fingerprint(self.params),
                "data_fingerprint": job_lib.data_fingerprint(ds),
                "sweep": str(cfg.sweep) if cfg.sweep else None}

    def job(self, cls, train_step, run_meta: dict, resume_name: str, adapter_file, **extra):
        """A `cls` (Job or a subclass) over these parts; the save directory is created."""
        Path(self.cfg.save_dir).mkdir(parents=True, exist_ok=True)
        return cls(self.cfg, self.config, sharding.replicate(self.params, self.mesh), self.model.dtype, self.mesh,
                   self.tokenizer, self.batches, train_step,
                   ResumeManager(resume_dir(self.cfg.save_dir, resume_name, self.config)), adapter_file, run_meta,
                   **extra)


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
    batches = job_lib.plan_batches(cfg, config, ds)
    model = MiniMindForCausalLM(config, dtype=compute_dtype(dtype), remat=cfg.remat)
    return Prepared(cfg, config, params, mesh, dtype, tokenizer, ds, batches, model)


def restore(job: Job, state):
    """--from_resume 1: the saved state and where it stopped; a fresh run clears an earlier run's resume state.
    -> (state, (epoch, step) to start at, 0-based; the resumed global step or None)."""
    resume = job.resume
    if not job.cfg.from_resume:
        if jax.process_index() == 0 and resume.latest_step() is not None:
            log(f"fresh run: replacing the earlier run's resume state in {resume.directory} (steps "
                f"{resume.clear()}); --from_resume 1 continues a run instead")
        return state, (0, 0), None
    step = resume.latest_step()
    if step is None:
        log(f"--from_resume 1: no checkpoint in {resume.directory}; starting from scratch")
        return state, (0, 0), None
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
    return state, (epoch0, step0), resumed_at


def _is_update(cfg: RunConfig, batches: job_lib.Batches, epoch: int, s: int) -> bool:
    """MiniMind: the optimizer steps every accumulation_steps micro-steps (s from 1) and at the end of an epoch."""
    return s % cfg.accumulation_steps == 0 or s == batches.iters[epoch]


def _precompile(train_step, batches: job_lib.Batches, mesh: Mesh, state, params, position, lr, update: bool) -> None:
    """Start compiling the step of the batch at `position` (epoch, step) in the background (state and params may
    be arrays or jax.ShapeDtypeStructs with their shardings)."""
    e, s = position
    arrays, n_chunks, cap, _ = batches.prepare(batches.loader.get_batch(e, s))
    train_step.start(state, params, sharding.put_batch(arrays, mesh), np.int32(n_chunks), lr, cap=cap, update=update)


def _answers(job: Job, adapter, tag: str) -> list[str]:
    prompts = job.cfg.prompt_list
    out = answer(job.params, job.config, adapter, job.tokenizer, prompts, job.cfg.max_new_tokens, job.dtype)
    for q, a in zip(prompts, out):
        log(f"{tag} {q} -> {a!r}")
    return out


def train_loop(job: Job, state, positions, metrics: MetricsWriter, on_step):
    """Run the micro-steps at `positions` [(epoch, step)], 0-based; -> (final state, the log steps' records)."""
    cfg, batches = job.cfg, job.batches
    bar = tqdm(total=len(positions), disable=jax.process_index() != 0, dynamic_ncols=True, desc="lora")
    stop = StopRequests().install()
    prefetch = Prefetcher(batches.loader, positions, batches.prepare)
    history, last_saved, done, saved = [], None, None, None
    t0 = time.time()
    window = {"tokens": 0, "t0": t0, "start": t0}  # throughput since the last log step; the loop's start
    try:
        for epoch, s0, (arrays, n_chunks, cap, stats) in prefetch:
            s = s0 + 1  # MiniMind counts steps from 1 within the epoch
            g = int(batches.offsets[epoch]) + s
            lr = job.lr_at(g)
            batch, n_chunks, cap, signum = _device_batch(job.mesh, arrays, n_chunks, cap, stop.signal or 0)
            if signum:
                _stop(job, state, signum, done, saved, last_saved)
            state, m = job.train_step(state, job.params, batch, np.int32(n_chunks), lr, cap=cap,
                                      update=_is_update(cfg, batches, epoch, s))
            done = (epoch, s, g)
            window["tokens"] += stats["tokens"] * jax.process_count()
            bar.update(1)
            end = s == batches.iters[epoch]
            if s % cfg.log_interval == 0 or end:
                rec = job.log_step(jax.device_get(m), (epoch, s, g), lr, stats, window, last_saved)
                history.append(rec)
                metrics.log(rec)
                bar.set_postfix(job.postfix(rec))
            if s % cfg.save_interval == 0 or end:
                job.check_finite(state.bad_step, last_saved)
                last_saved, saved = _save(job, state, epoch, s, g, last_saved), done
            if on_step is not None:
                on_step(g, state)
        job.check_finite(state.bad_step, last_saved)
    except Exception as e:  # a full disk anywhere else (the metrics file): one line that says what is intact
        if isinstance(e, DiskFull) or not disk_full(e):
            raise
        raise DiskFull(f"no space left on device ({_first_line(e)}); {_intact(last_saved)}") from e
    finally:
        stop.uninstall()
        prefetch.close()
        bar.close()
    return state, history


def _device_batch(mesh: Mesh, arrays: dict, n_chunks: int, cap, signum: int):
    """This host's chunks -> global arrays on the mesh (and the step's n_chunks and cap), and the stop signal
    any process received (0 = none)."""
    if jax.process_count() > 1:  # every host must pick the same static shapes and loop length, and stop together
        t_need, c_need, n_chunks, signum = (int(x) for x in sharding.agree_max(
            [arrays["labels"].shape[-1], cap[1] if cap else 0, n_chunks, signum]))
        arrays = {k: v if k.startswith(TAIL) else _pad_to(v, t_need, k) for k, v in arrays.items()}  # tails: fixed
        cap = (mesh.devices.size, c_need) if cap is not None else None  # groups: every device
    return sharding.put_batch(arrays, mesh), n_chunks, cap, signum


def _stop(job: Job, state, signum: int, done, saved, last_saved) -> None:
    """SIGTERM / Ctrl-C: save the last finished step (unless just saved) and raise Interrupted."""
    if done is not None and done != saved:
        job.check_finite(state.bad_step, last_saved)
        last_saved = _save(job, state, *done, last_saved)
    name = signal.Signals(signum).name
    raise Interrupted(f"{name}: stopped after {'no step' if done is None else job.batches.where(done[2])}; "
                      + (f"saved {last_saved}; --from_resume 1 continues" if last_saved else "nothing saved"), signum)


def _pad_to(x: np.ndarray, t: int, key: str) -> np.ndarray:
    if x.shape[-1] >= t:
        return x
    fill = IGNORE if key == "labels" else 0
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])], constant_values=fill)


def _log_step(job: Job, m: dict, at, lr: float, stats: dict, window: dict, last_saved) -> dict:
    """A log step: the metrics record (also logged in MiniMind's format); restarts the throughput window."""
    epoch, s, g = at
    _check_finite(job, m["bad_step"], last_saved)
    dt = time.time() - window["t0"]
    rec = {"step": g, "epoch": epoch + 1, "epoch_step": s, "loss": float(m["loss"]),
           "aux_loss": float(m["aux_loss"]), "lr": lr, "grad_norm": float(m["grad_norm"]),
           "tokens_per_s": window["tokens"] / max(dt, 1e-9), "rows": stats["rows"],
           "positions": stats["positions"] * jax.process_count(), "time_s": round(time.time() - window["start"], 3),
           "compile_s": round(job.train_step.total_compile_s(), 3)}
    window.update(tokens=0, t0=time.time())
    log(f"Epoch:[{epoch + 1}/{job.cfg.epochs}]({s}/{job.batches.iters[epoch]}) loss: {rec['loss']:.4f} "
        f"aux_loss: {rec['aux_loss']:.4f} lr: {lr:.8f} grad_norm: {rec['grad_norm']:.4f} "
        f"tokens/s: {rec['tokens_per_s']:.0f}")
    return rec


def _check_finite(job: Job, bad_step, last_saved: Optional[str]) -> None:
    """Raise TrainingDiverged if the step recorded a non-finite loss (state.bad_step / metrics' bad_step >= 0)."""
    bad = int(jax.device_get(bad_step))
    if bad >= 0:
        kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint had been saved yet"
        raise TrainingDiverged(f"non-finite loss at {job.batches.where(bad)}; stopped without saving that state; "
                               f"{kept}")


def _save(job: Job, state, epoch: int, s: int, g: int, last_saved: Optional[str]) -> str:
    """Write the resume state (every process), then the adapter (process 0), after micro-step s of `epoch`; -> what
    was saved. Each is complete or absent (orbax and convert.save_adapter write into temporary directories and
    rename them), so a failed save leaves `last_saved` as it was; a full disk raises DiskFull saying so.
    The resume state goes first: when it cannot be written, neither is the adapter, and both stay at last_saved."""
    nxt = (epoch + 1, 0) if s == job.batches.iters[epoch] else (epoch, s)  # where a resumed run starts
    state_dir = f"{job.resume.directory}/{g}"
    try:
        job.resume.save(g, state.to_tree(), {"epoch": nxt[0], "step": nxt[1], "run": job.run_meta,
                                             "loader": {**job.batches.loader.state_dict(), "epoch": nxt[0],
                                                        "step": nxt[1]}})
    except Exception as e:
        if not disk_full(e):
            raise
        raise DiskFull(f"no space left on device while saving {job.batches.where(g)} to {state_dir} (the partial "
                       f"save is removed); {_intact(last_saved)}") from e
    for path, host, meta in job.to_save(state, epoch + 1, s) if jax.process_index() == 0 else []:
        try:
            convert.save_adapter(host, path, metadata=meta, overwrite=True)
        except Exception as e:
            if not disk_full(e):
                raise
            kept = f"it still holds the last complete one ({last_saved})" if last_saved else "none is there yet"
            raise DiskFull(f"no space left on device while saving the adapter {path} (epoch "
                           f"{epoch + 1}, step {s}); {kept}, and the resume state of this step ({state_dir}) is "
                           "complete: free space, then --from_resume 1 continues from it") from e
    return f"{job.adapter_file} (epoch {epoch + 1}, step {s}; resume state {state_dir})"


def _intact(last_saved: Optional[str]) -> str:
    if not last_saved:
        return "nothing had been saved yet: free space and run again"
    return f"the last complete checkpoint is intact: {last_saved}; free space, then --from_resume 1 continues from it"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _base_flags(cfg: RunConfig) -> list:
    """The flags that give serve.chat / serve.openai this run's base (a random base is rebuilt from the seed the
    adapter records, so it needs none)."""
    flags = [] if cfg.random_base else [f"--weight {cfg.from_weight}"]
    return flags + ([f"--tokenizer {cfg.tokenizer}"] if cfg.tokenizer else [])


def chat_command(cfg: RunConfig, adapter_file: Path) -> str:
    """The serve.chat command that answers with this adapter over the same base."""
    prompt = cfg.prompt_list[0] if cfg.prompt_list else PROMPTS[0]
    return " ".join(["python -m serve.chat", f"--lora {adapter_file}", *_base_flags(cfg), f"--prompt {prompt!r}",
                     "--greedy"])


def serve_command(cfg: RunConfig, adapter_file: Path) -> str:
    """The serve.openai command that serves this adapter (as `model: "<lora_name>"`) over the same base."""
    return " ".join(["python -m serve.openai", f"--lora {cfg.lora_name}={adapter_file}", *_base_flags(cfg)])


def finish(job: Job, state, history: list, metrics_path: Path, steps: int, answers_before: list,
           t_start: float) -> dict:
    """After the loop: loss curve, answers after, the summary."""
    cfg = job.cfg
    summary = {"losses": [r["loss"] for r in history], "history": history, "adapter_path": str(job.adapter_file),
               "metrics_path": str(metrics_path), "answers_before": answers_before, "steps": steps,
               "compile_s": job.train_step.total_compile_s()}
    log(f"train step compiled in {summary['compile_s']:.1f} s ({len(job.train_step.compile_s)} shape(s) of "
        f"batch){job.train_step.cache_note()}")
    if jax.process_index() == 0 and history:
        png = Path(cfg.save_dir) / f"{cfg.lora_name}_loss.png"
        skipped = plot_loss(metrics_path, png, title=f"{cfg.lora_name} (rank {cfg.rank})")
        log(skipped or f"loss curve: {png}")
    summary["answers_after"] = _answers(job, state.adapter, "[after] ") if cfg.prompt_list else []
    log(f"saved adapter {job.adapter_file}; metrics {metrics_path}; total time {time.time() - t_start:.0f}s")
    log(f"chat with it: {chat_command(cfg, job.adapter_file)}")
    log(f"serve it (OpenAI API, model \"{cfg.lora_name}\"; pip install -e '.[serve]' first): "
        f"{serve_command(cfg, job.adapter_file)}")
    summary.update(adapter=state.adapter, updates=int(jax.device_get(state.updates)))
    return summary
