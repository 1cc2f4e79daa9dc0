"""The training loop, written once for any number of members: steps over prefetched host batches, log steps
(metrics, console, progress bar), the NaN check, save steps (resume state, then each member's adapter), stop
requests (SIGTERM / Ctrl-C save the last step) and the hooks a research script or a later feature adds.

The contract where the loop calls out is `Hook`: `after_step` runs after every micro-step (and after its log and
its save) and may ask the loop to stop, which then saves that step as a finished run does.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
from tqdm import tqdm

import convert
from train import members as members_lib, sharding
from train.batch import IGNORE, TAIL
from train.interrupt import Interrupted, StopRequests
from train.metrics import MetricsWriter
from train.prefetch import Prefetcher
from train.resume import disk_full


class TrainingDiverged(RuntimeError):
    pass


class DiskFull(RuntimeError):
    """No space left on the device (or quota) while the run wrote its checkpoints or logs: the message names what
    was being written and the last complete checkpoint, which a failed save leaves intact."""


def log(msg: str) -> None:
    if msg and jax.process_index() == 0:
        tqdm.write(msg)


@dataclass(frozen=True)
class StepPoint:
    """Where the loop is: after micro-step `step` (1-based, MiniMind's count) of `epoch` (0-based)."""
    epoch: int
    step: int
    global_step: int  # 1-based over the whole run
    end_of_epoch: bool


class Hook:
    """Where the training loop calls out. Subclass and override; the loop calls every hook in order."""

    def before_loop(self, loop: "Loop", state) -> None:
        """Before the first step (`loop.resumed_at` is the resumed global step, None for a fresh run)."""

    def after_step(self, loop: "Loop", state, at: StepPoint) -> bool:
        """After every micro-step and its log, before its save. `state` is the stacked train state, donated to the
        next step: copy what must outlive it. Return True to stop training here (saved as a finished run is)."""
        return False

    def state_dict(self) -> Optional[dict]:
        """What the hook must carry over a resume (saved with the resume state; JSON); None: nothing."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """A resumed run's: what `state_dict` returned when the state it resumes from was saved."""


class OnStep(Hook):
    """`run(cfg, on_step=f)`: f(global_step, state) after every micro-step."""

    def __init__(self, fn: Callable[[int, Any], None]):
        self.fn = fn

    def after_step(self, loop: "Loop", state, at: StepPoint) -> bool:
        self.fn(at.global_step, state)
        return False


class Loop:
    """One pass of the loop over a job's positions: its metrics files, the log steps' records per member
    (`history[i]`), and what was saved last. The train state itself stays an explicit value, passed through."""

    def __init__(self, job, resumed_at: Optional[int], hooks=(), hook_states: Optional[dict] = None):
        self.job, self.hooks, self.resumed_at = job, list(hooks), resumed_at
        for h in self.hooks:
            if (hook_states or {}).get(type(h).__name__) is not None:
                h.load_state_dict(hook_states[type(h).__name__])
        tb = lambda m: Path(job.cfg.save_dir) / "tensorboard" / m.name if job.cfg.tensorboard else None
        self.metrics = [MetricsWriter(m.metrics_file, resume_step=resumed_at, tensorboard_dir=tb(m),
                                      enabled=jax.process_index() == 0) for m in job.members]
        log(self.metrics[0].note)
        self.history = [[] for _ in job.members]
        self.last_saved = self.done = self.saved = None
        self.steps_run = 0
        self.postfix: dict = {}  # the progress bar's: the last log step's figures
        self.postfix_extra: dict = {}  # and what hooks add (the eval loss)
        self.window = {"tokens": 0, "t0": time.time(), "start": time.time()}  # throughput since the last log step

    def close(self) -> None:
        for w in self.metrics:
            w.close()

    def run(self, state, positions):
        """Run the micro-steps at `positions` [(epoch, step)], 0-based; -> the final state."""
        job, batches = self.job, self.job.batches
        bar = tqdm(total=len(positions), disable=jax.process_index() != 0, dynamic_ncols=True, desc="lora")
        stop = StopRequests().install()
        prefetch = Prefetcher(batches.loader, positions, batches.prepare)
        self.window.update(t0=time.time(), start=time.time())
        try:
            for h in self.hooks:
                h.before_loop(self, state)
            if not positions and self.resumed_at is not None:
                self._last_adapters(state)
            for epoch, s0, (arrays, n_chunks, cap, stats) in prefetch:
                s = s0 + 1  # MiniMind counts steps from 1 within the epoch
                at = StepPoint(epoch, s, int(batches.offsets[epoch]) + s, s == batches.iters[epoch])
                batch, n_chunks, cap, signum = device_batch(job.mesh, arrays, n_chunks, cap, stop.signal or 0)
                if signum:
                    self._stop(state, signum)
                state, m = job.train_step(state, job.params, batch, np.int32(n_chunks), job.lrs(at.global_step),
                                          cap=cap, update=batches.is_update(epoch, s))
                self.done, self.steps_run = at, self.steps_run + 1
                self.window["tokens"] += stats["tokens"] * jax.process_count()
                bar.update(1)
                if s % job.cfg.log_interval == 0 or at.end_of_epoch:
                    self._log(jax.device_get(m), at, stats)
                stoppers = [type(h).__name__ for h in self.hooks if h.after_step(self, state, at)]
                bar.set_postfix({**self.postfix, **self.postfix_extra}, refresh=False)
                if stoppers or s % job.cfg.save_interval == 0 or at.end_of_epoch:
                    self.save(state)
                if stoppers:  # saved as a finished run is
                    log(f"stopped by {', '.join(stoppers)} after {batches.where(at.global_step)}")
                    break
            self.check_finite(state.bad_step)
        except Exception as e:  # a full disk anywhere else (the metrics file): one line that says what is intact
            if isinstance(e, DiskFull) or not disk_full(e):
                raise
            raise DiskFull(f"no space left on device ({_first_line(e)}); {_intact(self.last_saved)}") from e
        finally:
            stop.uninstall()
            prefetch.close()
            bar.close()
        return state

    def _log(self, m: dict, at: StepPoint, stats: dict) -> None:
        """A log step: each training member's metrics record, one console line, the progress bar's postfix."""
        job = self.job
        self.check_finite(m["bad_step"])
        now = time.time()
        tokens_per_s = self.window["tokens"] / max(now - self.window["t0"], 1e-9)
        self.window.update(tokens=0, t0=now)
        shown, losses = [], []
        for i, mem in enumerate(job.members):
            if int(m["bad_step"][i]) >= 0:
                shown.append(f"{mem.tag} diverged@{int(m['bad_step'][i])}")
                continue
            rec = {"step": at.global_step, "epoch": at.epoch + 1, "epoch_step": at.step, "loss": float(m["loss"][i]),
                   "aux_loss": float(m["aux_loss"][i]), "lr": mem.lr(at.global_step, job.batches.total),
                   "grad_norm": float(m["grad_norm"][i]), "tokens_per_s": tokens_per_s, "rows": stats["rows"],
                   "positions": stats["positions"] * jax.process_count(),
                   "time_s": round(now - self.window["start"], 3),
                   "compile_s": round(job.train_step.total_compile_s(), 3)}
            self.history[i].append(rec)
            self.metrics[i].log(rec)
            shown.append(f"{mem.tag} {rec['loss']:.4f}")
            losses.append(rec["loss"])
        head = f"Epoch:[{at.epoch + 1}/{job.cfg.epochs}]({at.step}/{job.batches.iters[at.epoch]})"
        if len(job.members) == 1:  # MiniMind's own line
            r = self.history[0][-1]
            log(f"{head} loss: {r['loss']:.4f} aux_loss: {r['aux_loss']:.4f} lr: {r['lr']:.8f} grad_norm: "
                f"{r['grad_norm']:.4f} tokens/s: {tokens_per_s:.0f}")
            self.postfix = {"loss": f"{r['loss']:.4f}", "lr": f"{r['lr']:.2e}", "tok_s": f"{tokens_per_s:.0f}"}
            return
        log(f"{head} loss: {' | '.join(shown)} tokens/s: {tokens_per_s:.0f}")
        self.postfix = {"loss": f"{min(losses):.4f}..{max(losses):.4f}", "tok_s": f"{tokens_per_s:.0f}"}

    def check_finite(self, bad_step) -> None:
        """Raise TrainingDiverged once every member has had a non-finite loss (each froze at its last good state;
        a sweep goes on while any member trains)."""
        bad = np.asarray(jax.device_get(bad_step)).reshape(-1)
        if not (bad >= 0).all():
            return
        kept = f"the last good checkpoint is {self.last_saved}" if self.last_saved else \
            "no checkpoint had been saved yet"
        where = self.job.batches.where
        if len(bad) == 1:
            raise TrainingDiverged(f"non-finite loss at {where(int(bad[0]))}; stopped without saving that state; "
                                   f"{kept}")
        at = ", ".join(f"{m.tag} at {where(int(b))}" for m, b in zip(self.job.members, bad))
        raise TrainingDiverged(f"every member of the sweep had a non-finite loss: {at}; {kept}")

    def save(self, state) -> None:
        """Write the resume state (every process), then each training member's adapter (process 0), after the
        last finished step. Each is complete or absent (orbax and convert.save_adapter write into temporary
        directories and rename them), so a failed save leaves the last one as it was; a full disk raises DiskFull
        saying so. The resume state goes first: when it cannot be written, neither are the adapters."""
        job, at = self.job, self.done
        self.check_finite(state.bad_step)
        nxt = (at.epoch + 1, 0) if at.end_of_epoch else (at.epoch, at.step)  # where a resumed run starts
        state_dir = f"{job.resume.directory}/{at.global_step}"
        hooks = {type(h).__name__: st for h in self.hooks if (st := h.state_dict()) is not None}
        try:
            job.resume.save(at.global_step, state.to_tree(),
                            {"epoch": nxt[0], "step": nxt[1], "run": job.run_meta, "hooks": hooks,
                             "loader": {**job.batches.loader.state_dict(), "epoch": nxt[0], "step": nxt[1]}})
        except Exception as e:
            if not disk_full(e):
                raise
            raise DiskFull(f"no space left on device while saving {job.batches.where(at.global_step)} to {state_dir} "
                           f"(the partial save is removed); {_intact(self.last_saved)}") from e
        if jax.process_index() == 0:
            self._save_adapters(state, at, state_dir)
        files = job.members[0].adapter_file if len(job.members) == 1 else f"{len(job.members)} adapters"
        self.last_saved = f"{files} (epoch {at.epoch + 1}, step {at.step}; resume state {state_dir})"
        self.saved = at

    def _last_adapters(self, state) -> None:
        """A resumed run with no step left: its run was stopped after the last step's resume state and before that
        step's adapters (save writes them in that order), so they may be older than the state: written from it."""
        batches, g = self.job.batches, self.resumed_at
        e = int(np.searchsorted(batches.offsets, g, side="left")) - 1
        s = g - int(batches.offsets[e])
        if jax.process_index() == 0:
            self._save_adapters(state, StepPoint(e, s, g, s == batches.iters[e]), f"{self.job.resume.directory}/{g}")

    def _save_adapters(self, state, at: StepPoint, state_dir: str) -> None:
        """Process 0: each member still training, at its own rank; a diverged member's file keeps its last good
        save."""
        job = self.job
        bad = np.asarray(jax.device_get(state.bad_step))
        for i, (m, host) in enumerate(zip(job.members, members_lib.member_adapters(job.members, state, host=True))):
            if bad[i] >= 0:
                continue
            try:
                convert.save_adapter(host, m.adapter_file, metadata=job.adapter_meta(m, at.epoch + 1, at.step),
                                     overwrite=True)
            except Exception as e:
                if not disk_full(e):
                    raise
                kept = f"it still holds the last complete one ({self.last_saved})" if self.last_saved else \
                    "none is there yet"
                raise DiskFull(f"no space left on device while saving the adapter {m.adapter_file} (epoch "
                               f"{at.epoch + 1}, step {at.step}); {kept}, and the resume state of this step "
                               f"({state_dir}) is complete: free space, then --from_resume 1 continues from it") from e

    def _stop(self, state, signum: int) -> None:
        """SIGTERM / Ctrl-C: save the last finished step (unless just saved) and raise Interrupted."""
        if self.done is not None and self.done != self.saved:
            self.save(state)
        where = "no step" if self.done is None else self.job.batches.where(self.done.global_step)
        saved = f"saved {self.last_saved}; --from_resume 1 continues" if self.last_saved else "nothing saved"
        raise Interrupted(f"{signal.Signals(signum).name}: stopped after {where}; {saved}", signum)


def device_batch(mesh, arrays: dict, n_chunks: int, cap, signum: int):
    """This host's chunks -> global arrays on the mesh (and the step's n_chunks and cap), and the stop signal
    any process received (0 = none)."""
    if jax.process_count() > 1:  # every host must pick the same static shapes and loop length, and stop together
        t_need, c_need, n_chunks, signum = (int(x) for x in sharding.agree_max(
            [arrays["labels"].shape[-1], cap[1] if cap else 0, n_chunks, signum]))
        arrays = {k: v if k.startswith(TAIL) else _pad_to(v, t_need, k) for k, v in arrays.items()}  # tails: fixed
        cap = (mesh.devices.size, c_need) if cap is not None else None  # groups: every device
    return sharding.put_batch(arrays, mesh), n_chunks, cap, signum


def _pad_to(x: np.ndarray, t: int, key: str) -> np.ndarray:
    if x.shape[-1] >= t:
        return x
    fill = IGNORE if key == "labels" else 0
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])], constant_values=fill)


def _intact(last_saved: Optional[str]) -> str:
    if not last_saved:
        return "nothing had been saved yet: free space and run again"
    return f"the last complete checkpoint is intact: {last_saved}; free space, then --from_resume 1 continues from it"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
