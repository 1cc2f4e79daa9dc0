"""The end of a run: the loss curves, the answers after training, the summary (and a sweep's table), and the
commands that chat with and serve what was trained."""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from train import members as members_lib
from train.config import PROMPTS, RunConfig
from train.evaluation import Evaluator, best_path
from train.loop import log
from train.metrics import plot_loss
from train.prompts import answer
from train.summary import MemberSummary, RunSummary, summary_lines


def answers(job, adapter, tag: str) -> list[str]:
    """The greedy answers to --prompts with `adapter`, logged as `tag prompt -> answer`."""
    prompts = job.cfg.prompt_list
    out = answer(job.params, job.config, adapter, job.tokenizer, prompts, job.cfg.max_new_tokens, job.dtype)
    for q, a in zip(prompts, out):
        log(f"{tag} {q} -> {a!r}")
    return out


def finish(job, state, loop, steps: int, answers_before: list, t_start: float) -> RunSummary:
    """After the loop: the curves, each member's answers, the summary; logs where everything went."""
    cfg, train_s = job.cfg, time.time() - t_start
    compile_s = job.train_step.total_compile_s()
    log(f"train step compiled in {compile_s:.1f} s ({len(job.train_step.compile_s)} shape(s) of batch)"
        f"{job.train_step.cache_note()}")
    bad = np.asarray(jax.device_get(state.bad_step))
    adapters = members_lib.member_adapters(job.members, state)
    members = [MemberSummary(m.tag, m.name, m.settings, loop.history[i], adapters[i],
                             str(m.adapter_file) if m.adapter_file.exists() else None,  # diverged before a save
                             str(m.metrics_file), diverged_at=int(bad[i]) if bad[i] >= 0 else None)
               for i, m in enumerate(job.members)]
    ev = next((h for h in loop.hooks if isinstance(h, Evaluator)), None)
    if ev is not None:
        _add_evals(job, ev, members)
    _plot(job, members)
    for i, m in enumerate(members):
        if cfg.prompt_list and m.diverged_at is None:
            m.answers_after = answers(job, m.adapter, f"[after {m.tag}]" if m.tag else "[after] ")
    if ev is not None and cfg.max_new_tokens > 0:
        _held_out_answers(job, ev, members)
    summary = RunSummary(members, steps, int(np.asarray(jax.device_get(state.updates)).reshape(-1)[0]), compile_s,
                         train_s, answers_before, str(cfg.sweep) if cfg.sweep else None)
    if cfg.sweep:
        summary.summary_path = str(Path(cfg.save_dir) / f"{cfg.lora_name}_sweep_summary.json")
        if jax.process_index() == 0:
            Path(summary.summary_path).write_text(json.dumps(summary.table(), indent=2) + "\n", encoding="utf-8")
        for line in summary_lines(summary.table()):
            log(line)
        log(f"summary: {summary.summary_path}")
    _tell(cfg, members, time.time() - t_start)
    return summary


def _add_evals(job, ev: Evaluator, members: list) -> None:
    """Each member's evaluations, its best step and best file; logs the eval loss before -> after (best)."""
    for i, (m, mem) in enumerate(zip(members, job.members)):
        m.eval_history, m.best_eval_step = ev.history[i], ev.best_step[i]
        path = best_path(job, mem)
        m.best_path = str(path) if job.cfg.save_best and path.exists() else None
        evals = m.eval_losses
        if evals:
            kept = f"; kept {m.best_path}" if m.best_path else ""
            log(f"[eval] {m.tag + ': ' if m.tag else ''}eval loss {evals[0]:.4f} -> {evals[-1]:.4f} (lowest "
                f"{m.best_eval_loss:.4f} at step {m.best_eval_step}{kept})")


def _held_out_answers(job, ev: Evaluator, members: list) -> None:
    """Greedy answers to the first held-out questions by the member with the lowest eval loss, beside the
    reference: does the adapter answer what it was not shown?"""
    samples = ev.samples(2)
    ranked = [m for m in members if m.diverged_at is None and m.best_eval_loss is not None]
    if not samples or not ranked:
        return
    best = min(ranked, key=lambda m: m.best_eval_loss)
    got = answer(job.params, job.config, best.adapter, job.tokenizer, [q for q, _ in samples], job.cfg.max_new_tokens,
                 job.dtype)
    for (q, ref), a in zip(samples, got):
        log(f"[held-out{' ' + best.tag if best.tag else ''}] {q} -> {a!r} (reference: {ref!r})")


def _plot(job, members: list) -> None:
    """Process 0: each member's loss curve (and, for a sweep, all of them in one); without matplotlib the log says
    the plots were skipped."""
    if jax.process_index() != 0 or not any(m.history for m in members):
        return
    save_dir = Path(job.cfg.save_dir)
    notes = []
    for m, mem in zip(members, job.members):
        ranks = "/".join(map(str, sorted(set(mem.init.ranks.values()))))
        png = save_dir / f"{m.name}_loss.png"
        notes.append(plot_loss({"": m.metrics_path}, png, title=f"{m.name} (rank {ranks})") or f"loss curve: {png}")
    if job.cfg.sweep:
        png = save_dir / f"{job.cfg.lora_name}_sweep_loss.png"
        notes = [plot_loss({m.tag: m.metrics_path for m in members}, png, title=f"{job.cfg.lora_name}: "
                             f"{job.cfg.sweep}") or f"loss curves: {png} (and one per member)"]
    log(notes[0])


def _tell(cfg: RunConfig, members: list, total_s: float) -> None:
    """Where the adapters are, and the commands that chat with the best and serve them all."""
    saved = [m for m in members if m.adapter_path]
    if len(members) == 1:
        log(f"saved adapter {members[0].adapter_path}; metrics {members[0].metrics_path}; total time {total_s:.0f}s")
    else:
        log(f"saved {len(saved)} of {len(members)} adapters in {cfg.save_dir}; total time {total_s:.0f}s")
    finite = [m for m in saved if m.diverged_at is None and m.final_loss is not None]
    if not finite:
        return
    by_eval = all(m.best_eval_loss is not None for m in finite)
    best = min(finite, key=lambda m: m.best_eval_loss if by_eval else m.final_loss)
    which = "it" if len(members) == 1 else f"the lowest {'eval' if by_eval else 'final'} loss ({best.tag})"
    log(f"chat with {which}: {chat_command(cfg, Path(best.adapter_path))}")
    log(f"serve {'it' if len(members) == 1 else 'them'} (OpenAI API, model \"{best.name}\"; pip install -e "
        f"'.[serve]' first): {serve_command(cfg, {m.name: m.adapter_path for m in finite})}")


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


def serve_command(cfg: RunConfig, adapters: dict) -> str:
    """The serve.openai command that serves these adapters ({model name: file}) over the same base."""
    return " ".join(["python -m serve.openai", *(f"--lora {n}={p}" for n, p in adapters.items()), *_base_flags(cfg)])
