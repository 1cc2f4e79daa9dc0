"""LoRA SFT for MiniMind: `python -m train.lora --rank 8`.

With no arguments it trains a rank-8 adapter on the bundled train/assets/lora_identity.jsonl with the bundled tokenizer
over a freshly initialised MiniMind2-small-shaped base (512x8), in a few minutes on a CPU, and prints the greedy
answers to two prompts before and after training. Real use mirrors MiniMind's trainer/train_lora.py:

    python -m train.lora --from_weight out/full_sft_512.pth --data_path dataset/lora_identity.jsonl \\
        --lora_name lora_identity --epochs 10 --batch_size 32 --learning_rate 1e-4

writes `<save_dir>/<lora_name>_<hidden>[_moe].ckpt` (orbax adapter + metadata; `python -m convert` turns it into
MiniMind's .pth), `<save_dir>/<lora_name>_metrics.jsonl`, `<save_dir>/<lora_name>_loss.png`, and, for
`--from_resume 1`, the full train state under `<save_dir>/checkpoints/<lora_name>_<hidden>_resume/`.

Data parallel over every local device (batch split on a `data` mesh axis). Multi-host: one process per host,

    python -m train.lora ... --coordinator host0:1234 --num_processes 2 --process_id 0   # on host 0
    python -m train.lora ... --coordinator host0:1234 --num_processes 2 --process_id 1   # on host 1

(or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID); --batch_size is the global batch.
On a CPU, the cores are split into several XLA devices by default (`--cpu_devices 0`: one per core, at most 8, a
divisor of the batch), which makes steps faster; `--cpu_devices 1` keeps one device.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

BUNDLED_DATA = Path(__file__).resolve().parent / "assets" / "lora_identity.jsonl"  # package data
PROMPTS = ("你是谁？", "Who are you?")
# The bundled demo (random-init base, bundled data): settings that make the adapter visibly take effect quickly.
# A random base has no language to build on, so the demo adapts every projection (MiniMind's square-kernel rule
# leaves too little capacity to learn answers from scratch in minutes) and renders conversations exactly like the
# generation prompt (no random system prompt, empty think block kept).
DEMO = {"epochs": 10, "learning_rate": 4e-3, "batch_size": 16, "targets": "all-linear",
        "add_system_ratio": 0.0, "empty_think_ratio": 1.0}
ACCEL_CHUNK_TOKENS = 8192  # rows per forward pass on accelerators, which want large matmuls
REAL = {"epochs": 10, "learning_rate": 1e-4, "batch_size": 32, "targets": "square",  # MiniMind's defaults
        "add_system_ratio": 0.2, "empty_think_ratio": 0.2}


class TrainingDiverged(RuntimeError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.lora", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--save_dir", default="out", help="output directory (adapter .ckpt, metrics, resume checkpoints)")
    a("--lora_name", default="lora_identity", help="adapter name: <save_dir>/<lora_name>_<hidden>[_moe].ckpt")
    a("--epochs", type=int, default=None, help=f"default {REAL['epochs']} (MiniMind); {DEMO['epochs']} for the bundled random-init demo")
    a("--batch_size", type=int, default=None, help=f"samples per step (global, MiniMind's meaning in every mode); default "
                                                   f"{REAL['batch_size']}; {DEMO['batch_size']} for the demo")
    a("--learning_rate", type=float, default=None, help=f"peak lr; default {REAL['learning_rate']}; {DEMO['learning_rate']} for the demo")
    a("--dtype", choices=("bfloat16", "float32"), default=None, help="compute dtype (adapter master weights stay fp32); default float32 on CPU, bfloat16 on GPU/TPU")
    a("--accumulation_steps", type=int, default=1)
    a("--grad_clip", type=float, default=1.0)
    a("--log_interval", type=int, default=10)
    a("--save_interval", type=int, default=1000)
    a("--hidden_size", type=int, default=512, help="model width when no --from_weight (random init)")
    a("--num_hidden_layers", type=int, default=8)
    a("--max_seq_len", type=int, default=340)
    a("--use_moe", type=int, choices=(0, 1), default=0)
    a("--data_path", default=str(BUNDLED_DATA), help="MiniMind SFT jsonl (comma-separated for several)")
    a("--from_weight", default=None, help="base weights: MiniMind .pth, .safetensors or an orbax params dir; none = random init")
    a("--from_resume", type=int, choices=(0, 1), default=0, help="1: continue from the latest full train state")
    a("--rank", type=int, default=8)
    a("--alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank); default none = scale 1 like MiniMind")
    a("--targets", default=None, help="square (MiniMind's rule, the default), all-linear, attn, mlp, or comma-separated "
                                      "names/regexes; all-linear for the bundled random-init demo")
    a("--seed", type=int, default=42)
    a("--tokenizer", default=None, help="tokenizer directory (default: the bundled one)")
    a("--from_lora", default=None, help="start from an existing adapter (.ckpt, MiniMind .pth, PEFT dir, ...)")
    a("--add_system_ratio", type=float, default=None, help="MiniMind's: prepend a random system prompt (default 0.2; demo 0)")
    a("--empty_think_ratio", type=float, default=None, help="MiniMind's: keep the empty think block (default 0.2; demo 1)")
    a("--skip_bad_lines", action="store_true", help="skip (and count) malformed jsonl lines instead of failing")
    a("--pack", type=int, choices=(0, 1), default=1, help="1: pack each step's samples into as few rows as they need "
                                                          "(same loss and gradients, less padding); 0: MiniMind's padded rows")
    a("--group_by_length", type=int, choices=(0, 1), default=0,
      help="1: batches of samples of similar lengths (HF Trainer's; less padding, different batches)")
    a("--batch_tokens", type=int, default=None,
      help="token-budget steps instead of --batch_size samples (TRL-style): the epoch is packed into rows of "
           "--max_seq_len and each step takes this many tokens of rows; changes the optimisation (fewer, larger steps)")
    a("--rows_per_device", type=int, default=0, help="rows each device runs at once inside a step (0 = auto: 1 on a CPU, "
                                                     f"{ACCEL_CHUNK_TOKENS} tokens' worth on a GPU/TPU)")
    a("--labels_only", type=int, choices=(0, 1), default=1, help="1: vocab projection only at labelled positions")
    a("--tensorboard", action="store_true", help="also log to <save_dir>/tensorboard/<lora_name> (needs tensorboardX)")
    a("--cache_dir", default=None, help="tokenized-data cache (default ~/.cache/minimind_jax/sft)")
    a("--prompts", default="|".join(PROMPTS), help="'|'-separated prompts answered greedily before and after training")
    a("--max_new_tokens", type=int, default=64, help="answer length for --prompts; 0 skips the answers")
    a("--stop_after", type=int, default=None, help=argparse.SUPPRESS)  # tests: simulate a crash after N micro-steps
    a("--cpu_devices", type=int, default=0, help="CPU only: split the cores into this many data-parallel XLA devices; "
                                                 "0 (default) = one per core (at most 8) dividing the batch; 1 = off")
    a("--coordinator", default=None, help="multi-host: coordinator HOST:PORT (process 0's address)")
    a("--num_processes", type=int, default=None)
    a("--process_id", type=int, default=None)
    return p


# ------------------------------------------------------------------------------------------- setup


def log(msg: str) -> None:
    import jax

    if jax.process_index() == 0:
        from tqdm import tqdm

        tqdm.write(msg)


def resolve_defaults(args) -> list[str]:
    demo = is_demo(args)
    notes = []
    for k in REAL:
        if getattr(args, k) is None:
            setattr(args, k, (DEMO if demo else REAL)[k])
    if demo:
        notes.append(f"bundled demo defaults: epochs={args.epochs} batch_size={args.batch_size} "
                     f"learning_rate={args.learning_rate:g} targets={args.targets} "
                     f"add_system_ratio={args.add_system_ratio:g} empty_think_ratio={args.empty_think_ratio:g} "
                     "(MiniMind's are 10 / 32 / 1e-4 / square / 0.2 / 0.2: a random base needs more to visibly learn "
                     "the identity answers in minutes; pass any flag to override)")
    if args.dtype is None:
        import jax

        args.dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    for k in ("epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "max_seq_len", "rank"):
        if getattr(args, k) <= 0:
            raise SystemExit(f"--{k} must be positive, got {getattr(args, k)}")
    if not args.learning_rate > 0 or not args.grad_clip > 0:
        raise SystemExit("--learning_rate and --grad_clip must be positive")
    if args.batch_tokens is not None and args.batch_tokens < args.max_seq_len:
        raise SystemExit(f"--batch_tokens {args.batch_tokens} is less than one row of --max_seq_len {args.max_seq_len}")
    if args.rows_per_device < 0:
        raise SystemExit(f"--rows_per_device must be >= 0, got {args.rows_per_device}")
    return notes


def is_demo(args) -> bool:
    """The bundled demo: no --from_weight (random-init base) and only the bundled data."""
    random_base = not (args.from_weight and args.from_weight.lower() != "none")
    return random_base and [Path(p).resolve() for p in args.data_path.split(",") if p] == [BUNDLED_DATA]


def _planned_batch(args) -> int:
    """The global batch as resolve_defaults will set it (known before JAX starts)."""
    return args.batch_size or (DEMO if is_demo(args) else REAL)["batch_size"]


def load_base(args):
    """-> (config, params, note)."""
    import jax
    import jax.numpy as jnp

    from minimind_jax import MiniMindConfig, MiniMindForCausalLM

    if args.from_weight and args.from_weight.lower() != "none":
        from train.checkpoint import load_model

        config, params = load_model(args.from_weight)
        return config, params, f"base weights: {args.from_weight} ({config.family}, {config.hidden_size}x{config.num_hidden_layers}{', MoE' if config.use_moe else ''})"
    config = MiniMindConfig.minimind2_small(hidden_size=args.hidden_size, num_hidden_layers=args.num_hidden_layers,
                                            use_moe=bool(args.use_moe))
    model = MiniMindForCausalLM(config)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"])(jax.random.PRNGKey(args.seed))
    return config, params, (f"no --from_weight: random-init base (MiniMind2-small-shaped, {config.hidden_size}x"
                            f"{config.num_hidden_layers}{', MoE' if config.use_moe else ''}, seed {args.seed}); "
                            "answers before training are gibberish")


def make_adapter(args, params):
    import jax

    import lora

    if args.from_lora:
        from train.checkpoint import load_adapter

        adapter = load_adapter(args.from_lora)
        try:
            lora.merge(params, adapter)  # shape check against the base (cheap for the sizes involved)
        except (KeyError, ValueError) as e:
            raise SystemExit(f"--from_lora {args.from_lora} does not fit the base model: {e}")
        ranks = sorted(set(adapter.ranks.values()))
        return adapter, f"adapter from --from_lora {args.from_lora} (ranks {ranks}, targets {adapter.targets})"
    adapter = lora.init(params, jax.random.PRNGKey(args.seed + 1), rank=args.rank, targets=args.targets, alpha=args.alpha)
    return adapter, f"new adapter: rank {args.rank}, targets {adapter.targets}, alpha {args.alpha}"


def count_params(tree) -> int:
    import jax

    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------- batches


class Prefetcher:
    """Builds the host batches of positions [(epoch, step), ...] in a background thread (queue of 2)."""

    def __init__(self, loader, positions, prepare):
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.positions, self.loader, self.prepare = positions, loader, prepare
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            for epoch, step in self.positions:
                if self.stop:
                    return
                self.q.put((epoch, step, self.prepare(self.loader.get_batch(epoch, step))))
        except BaseException as e:  # surface data errors in the main thread
            self.q.put(e)
        self.q.put(None)

    def __iter__(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        self.stop = True
        while self.thread.is_alive():
            try:
                self.q.get(timeout=0.1)
            except queue.Empty:
                pass


# ------------------------------------------------------------------------------------------- answers


def answer(params, config, adapter, tokenizer, prompts, max_new_tokens: int, dtype) -> list[str]:
    """Greedy answers (MiniMind's generate, do_sample=False) through minimind_jax.generate, on one device: the
    replicated training copies would make every device of the mesh decode the same tokens."""
    import jax

    import lora
    from minimind_jax.generate import generate

    params, adapter = jax.tree.map(lambda a: a.addressable_data(0) if isinstance(a, jax.Array) else a, (params, adapter))
    params = lora.merge(params, adapter)
    outs = []
    for q in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True)
        out = generate(params, config, np.asarray([ids], np.int32), max_new_tokens=max_new_tokens, do_sample=False,
                       eos_token_id=tokenizer.eos_token_id, dtype=dtype)
        outs.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip())
    return outs


# ------------------------------------------------------------------------------------------- training


def train(args) -> dict:
    """Run the whole job; returns a summary dict (losses of the log steps, paths, answers)."""
    import jax
    import jax.numpy as jnp

    from minimind_jax import MiniMindForCausalLM
    from train import checkpoint as ckpt
    from train import sharding, step as step_lib
    from train.data import SFTLoader, load_sft_dataset
    from train.metrics import MetricsWriter, plot_loss
    from minimind_jax.tokenizer import load_tokenizer

    t_start = time.time()
    # before JAX starts: the device count is fixed when its backends come up
    cpu_split = sharding.configure_cpu_devices(args.cpu_devices, _planned_batch(args), args.num_processes)
    sharding.init_distributed(args.coordinator, args.num_processes, args.process_id)
    main_proc = jax.process_index() == 0
    config, params, base_note = load_base(args)
    data_paths = [s for s in args.data_path.split(",") if s]
    notes = resolve_defaults(args)
    log(base_note)
    for n in notes:
        log(n)
    mesh = sharding.make_mesh()
    if cpu_split and jax.default_backend() == "cpu":
        log(f"CPU split into {cpu_split} XLA devices for data parallelism (--cpu_devices 1 to keep one)")
    dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
    model = MiniMindForCausalLM(config, dtype=dtype)

    tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                         f"{config.vocab_size}")
    ds = load_sft_dataset(data_paths, tokenizer, max_seq_len=args.max_seq_len, cache_dir=args.cache_dir,
                          skip_bad_lines=args.skip_bad_lines)
    devices = jax.local_device_count()
    host_rows = (args.batch_tokens // args.max_seq_len if args.batch_tokens else args.batch_size) // jax.process_count()
    rows_per_device = _rows_per_device(args, config, max(host_rows, 1), devices)
    half = -(-args.max_seq_len // 32) * 16  # a second row length for batches of short samples (one more compile)
    try:
        loader = SFTLoader(ds, args.batch_size, packed=bool(args.pack), batch_tokens=args.batch_tokens,
                           group_by_length=bool(args.group_by_length), seed=args.seed,
                           add_system_ratio=args.add_system_ratio, empty_think_ratio=args.empty_think_ratio,
                           num_epochs=args.epochs, row_lengths=(half,) if half >= 64 else (),
                           row_multiple=devices * rows_per_device)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    iters = [loader.steps_in_epoch(e) for e in range(args.epochs)]
    offsets = np.concatenate([[0], np.cumsum(iters)]).astype(int)  # global micro-step before each epoch
    total = int(offsets[-1])

    adapter, adapter_note = make_adapter(args, params)
    n_base, n_lora = count_params(params), adapter.num_params()
    log(adapter_note)
    log(f"LLM total params: {(n_base + n_lora) / 1e6:.3f} M | LoRA params: {n_lora / 1e6:.3f} M | "
        f"LoRA ratio: {n_lora / (n_base + n_lora) * 100:.2f}%")
    rows = (f"packed into rows of {' or '.join(map(str, loader.row_lengths[::-1]))} tokens" if args.pack else
            f"padded to rows of {loader.seq_len}")
    per_step = (f"{loader.rows_per_step} rows of {loader.seq_len} tokens per step (--batch_tokens {args.batch_tokens}; "
                "--batch_size not used)" if args.batch_tokens else
                f"{args.batch_size} samples per step{', grouped by length' if args.group_by_length else ''}, {rows}")
    log(f"data: {len(ds)} samples from {', '.join(data_paths)}; {per_step} (fill {loader.fill_ratio(0) * 100:.0f}%); "
        f"{iters[0]} steps/epoch x {args.epochs} epochs on {mesh.devices.size} device(s), "
        f"accumulation {args.accumulation_steps}, dtype {args.dtype}")

    fingerprint = ckpt.fingerprint(params)
    rep = sharding.replicated(mesh)
    params = sharding.replicate(params, mesh)
    tx = step_lib.make_optimizer()
    state = step_lib.init_state(adapter, tx, seed=args.seed)
    state = sharding.replicate(state, mesh)
    train_step = _train_step(model, tx, args.accumulation_steps, args.grad_clip, rep)
    compiled_before = sum(train_step.compile_s.values())  # the step's cache outlives a run (repeated main() calls)
    compile_s = lambda: sum(train_step.compile_s.values()) - compiled_before  # noqa: E731

    save_dir = Path(args.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    adapter_file = ckpt.adapter_path(save_dir, args.lora_name, config)
    resume = ckpt.ResumeManager(ckpt.resume_dir(save_dir, args.lora_name, config))
    run_meta = {"batch_size": args.batch_size, "pack": args.pack, "batch_tokens": args.batch_tokens,
                "group_by_length": args.group_by_length, "seed": args.seed, "max_seq_len": args.max_seq_len,
                "accumulation_steps": args.accumulation_steps, "epochs": args.epochs,
                "learning_rate": args.learning_rate, "rank": args.rank, "targets": adapter.targets,
                "alpha": adapter.alpha, "num_samples": len(ds), "base_fingerprint": fingerprint}
    epoch0, step0, resumed_at = 0, 0, None
    if not args.from_resume and main_proc and resume.latest_step() is not None:
        log(f"fresh run: replacing the earlier run's resume state in {resume.directory} (steps "
            f"{resume.clear()}); --from_resume 1 continues a run instead")
    if args.from_resume:
        got = resume.restore(state.to_tree())
        if got is None:
            log(f"--from_resume 1: no checkpoint in {resume.directory}; starting from scratch")
        else:
            tree, meta, resumed_at = got
            for k in ("batch_size", "pack", "batch_tokens", "group_by_length", "seed", "max_seq_len", "num_samples",
                      "base_fingerprint", "accumulation_steps"):
                if meta["run"].get(k) != run_meta[k]:
                    raise SystemExit(f"cannot resume from {resume.directory}/{resumed_at}: it was written with "
                                     f"{k}={meta['run'].get(k)!r}, this run has {run_meta[k]!r}")
            state = state.from_tree(jax.tree.map(lambda x: jax.device_put(x, rep), tree))
            epoch0, step0 = int(meta["epoch"]), int(meta["step"])
            log(f"resumed from {resume.directory}/{resumed_at}: epoch {epoch0 + 1}, step {step0 + 1}")

    # Padded rows are cut after the batch's last label (packed rows are sized by the packer); not with MoE, whose
    # aux loss averages over every position of MiniMind's full length.
    trim = not config.use_moe and not args.pack
    prepare = lambda b: step_lib.prepare_batch(b, devices=devices, rows_per_device=rows_per_device,
                                               max_rows=loader.max_rows, trim=trim, labels_only=bool(args.labels_only),
                                               pad_id=ds.pad_id)
    positions = [(e, s) for e in range(epoch0, args.epochs) for s in range(step0 if e == epoch0 else 0, iters[e])]
    if positions and jax.process_count() == 1:  # compile the first batch's step while the prompts are answered
        arrays, n_chunks, cap, _ = prepare(loader.get_batch(*positions[0]))
        e, s = positions[0]
        train_step.start(state, params, sharding.put_batch(arrays, mesh), np.int32(n_chunks), 0.0, cap=cap,
                         update=(s + 1) % args.accumulation_steps == 0 or s + 1 == iters[e])

    prompts = [p for p in args.prompts.split("|") if p] if args.max_new_tokens > 0 else []
    answers_before = []
    if prompts and resumed_at is None:
        answers_before = answer(params, config, state.adapter, tokenizer, prompts, args.max_new_tokens, dtype)
        for q, a in zip(prompts, answers_before):
            log(f"[before] {q} -> {a!r}")

    metrics = MetricsWriter(save_dir / f"{args.lora_name}_metrics.jsonl", resume_step=resumed_at,
                            tensorboard_dir=(save_dir / "tensorboard" / args.lora_name) if args.tensorboard else None,
                            enabled=main_proc)
    if metrics.note:
        log(metrics.note)
    from tqdm import tqdm

    bar = tqdm(total=len(positions), disable=not main_proc, dynamic_ncols=True, desc="lora")
    history, done, last_saved = [], 0, None
    window_tokens, window_t0 = 0, time.time()
    adapter_meta = lambda e, s: {"lora_name": args.lora_name, "base_config": config.to_dict(),
                                 "base_fingerprint": fingerprint, "epoch": e, "step": s,
                                 "trained_with": "minimind-jax train.lora"}

    def check_bad(m) -> None:
        bad = int(m["bad_step"])
        if bad >= 0:
            e = int(np.searchsorted(offsets, bad, side="left")) - 1
            s = bad - offsets[e]
            where = f"step {s}/{iters[e]} of epoch {e + 1}/{args.epochs} (global step {bad})"
            kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint had been saved yet"
            raise TrainingDiverged(f"non-finite loss at {where}; stopped without saving that state; {kept}")

    prefetch = Prefetcher(loader, positions, prepare)
    try:
        for epoch, s0, (arrays, n_chunks, cap, stats) in prefetch:
            s = s0 + 1  # MiniMind counts steps from 1 within the epoch
            g = int(offsets[epoch]) + s
            lr = step_lib.get_lr(g, total, args.learning_rate)
            update = s % args.accumulation_steps == 0 or s == iters[epoch]
            if jax.process_count() > 1:  # every host must pick the same static shapes and loop length
                t_need, c_need, n_chunks = (int(x) for x in sharding.agree_max([arrays["labels"].shape[-1],
                                                                                 cap[1] if cap else 0, n_chunks]))
                arrays = {k: _pad_to(v, t_need, k) for k, v in arrays.items()}
                cap = (mesh.devices.size, c_need) if cap is not None else None  # groups: every device
            batch = sharding.put_batch(arrays, mesh)
            if args.stop_after is not None and done >= args.stop_after:
                raise _Interrupted()
            state, m = train_step(state, params, batch, np.int32(n_chunks), lr, cap=cap, update=update)
            done += 1
            window_tokens += stats["tokens"] * jax.process_count()
            bar.update(1)
            if s % args.log_interval == 0 or s == iters[epoch]:
                m = jax.device_get(m)
                check_bad(m)
                dt = time.time() - window_t0
                rec = {"step": g, "epoch": epoch + 1, "epoch_step": s, "loss": float(m["loss"]),
                       "aux_loss": float(m["aux_loss"]), "lr": lr, "grad_norm": float(m["grad_norm"]),
                       "tokens_per_s": window_tokens / max(dt, 1e-9), "rows": stats["rows"],
                       "compile_s": round(compile_s(), 3)}
                window_tokens, window_t0 = 0, time.time()
                history.append(rec)
                metrics.log(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{rec['tokens_per_s']:.0f}")
                log(f"Epoch:[{epoch + 1}/{args.epochs}]({s}/{iters[epoch]}) loss: {rec['loss']:.4f} "
                    f"aux_loss: {rec['aux_loss']:.4f} lr: {lr:.8f} grad_norm: {rec['grad_norm']:.4f} "
                    f"tokens/s: {rec['tokens_per_s']:.0f}")
            if s % args.save_interval == 0 or s == iters[epoch]:
                check_bad(jax.device_get({"bad_step": state.bad_step}))
                nxt = (epoch + 1, 0) if s == iters[epoch] else (epoch, s)
                ckpt.save_adapter(state.adapter, adapter_file, adapter_meta(epoch + 1, s))
                resume.save(g, state.to_tree(), {"epoch": nxt[0], "step": nxt[1], "run": run_meta,
                                                 "loader": {**loader.state_dict(), "epoch": nxt[0], "step": nxt[1]}})
                last_saved = f"{adapter_file} (epoch {epoch + 1}, step {s}; resume state {resume.directory}/{g})"
        check_bad(jax.device_get({"bad_step": state.bad_step}))
    finally:
        prefetch.close()
        bar.close()
        metrics.close()
        resume.close()

    summary = {"losses": [r["loss"] for r in history], "history": history, "adapter_path": str(adapter_file),
               "metrics_path": str(metrics.path), "answers_before": answers_before, "steps": len(positions),
               "compile_s": compile_s()}
    log(f"train step compiled in {summary['compile_s']:.1f} s ({len(train_step.compile_s)} shape(s) of batch)")
    if main_proc and history:
        png = save_dir / f"{args.lora_name}_loss.png"
        skipped = plot_loss(metrics.path, png, title=f"{args.lora_name} (rank {args.rank})")
        log(skipped or f"loss curve: {png}")
    if prompts:
        summary["answers_after"] = answer(params, config, state.adapter, tokenizer, prompts, args.max_new_tokens, dtype)
        for q, a in zip(prompts, summary["answers_after"]):
            log(f"[after]  {q} -> {a!r}")
    log(f"saved adapter {adapter_file}; metrics {metrics.path}; total time {time.time() - t_start:.0f}s")
    summary["state"] = state
    return summary


class _Interrupted(Exception):
    pass


_STEP_CACHE: dict = {}


def _train_step(model, tx, accumulation_steps, grad_clip, sharding):
    """One compiled step per (model, settings, mesh) in this process (repeated main() calls reuse it)."""
    from train import step as step_lib

    key = (model.config, str(model.dtype), accumulation_steps, grad_clip, tuple(d.id for d in sharding.mesh.devices.flat))
    if key not in _STEP_CACHE:
        _STEP_CACHE[key] = step_lib.CompiledSteps(step_lib.make_train_step(
            model, tx, accumulation_steps=accumulation_steps, grad_clip=grad_clip, state_sharding=sharding))
    return _STEP_CACHE[key]


def _pad_to(x: np.ndarray, t: int, key: str) -> np.ndarray:
    if x.shape[-1] >= t:
        return x
    fill = -100 if key == "labels" else 0
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, t - x.shape[-1])], constant_values=fill)


def _rows_per_device(args, config, host_rows: int, devices: int) -> int:
    """Rows each device runs per forward pass inside a step (train.step: the step loops over chunks of these)."""
    import jax

    if config.use_moe and not args.pack:  # one chunk: MiniMind's aux loss over the whole padded batch
        return -(-host_rows // devices)
    if args.rows_per_device > 0:
        return args.rows_per_device
    if jax.default_backend() == "cpu":  # one row keeps the last chunk's padding rows few; bigger gains nothing here
        return 1
    return max(1, min(ACCEL_CHUNK_TOKENS // args.max_seq_len, -(-host_rows // devices)))


def main(argv: Optional[list] = None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return train(args)
    except _Interrupted:
        return {"interrupted": True}
    except TrainingDiverged as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
