"""The run's settings: `python -m train.lora`'s flags as one typed, frozen, checked value.

    cfg = RunConfig.from_argv(["--rank", "16"])     # the CLI's parser and defaults
    cfg = RunConfig(data_path="my.jsonl", from_weight="full_sft", epochs=2)   # the same, from code

Each field carries its flag's help text, so the parser is built from the fields (`build_parser`): a default lives
in one place. A bad value raises ConfigError (the CLI prints it as one `error:` line; Python callers catch it).

The settings MiniMind's trainer and the bundled demo disagree on (DEMO / REAL) default to None = "this kind of
run's default": `__post_init__` fills them in from DEMO when the run is the bundled demo (random-init base,
bundled data), else from REAL. They stay filled in afterwards, so `dataclasses.replace(cfg, data_path=...)` keeps
them: pass them as None again to re-resolve. `dtype` None stays None until JAX is up (train.trainer picks float32 on
a CPU, bfloat16 on a GPU/TPU): asking JAX for its backend here would start it before the CPU split is chosen.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

BUNDLED_DATA = Path(__file__).resolve().parent / "assets" / "lora_identity.jsonl"  # package data
BUNDLED_EVAL = BUNDLED_DATA.with_name("lora_identity_eval.jsonl")  # its held-out questions (train.make_identity)
PROMPTS = ("你是谁？", "Who are you?")
# The bundled demo (random-init base, bundled data): settings that make the adapter visibly take effect quickly.
# A random base has no language to build on, so the demo adapts every projection (MiniMind's square-kernel rule
# leaves too little capacity to learn answers from scratch in minutes) and renders conversations exactly like the
# generation prompt (no random system prompt, empty think block kept). 8 samples a step give twice the updates per
# epoch of 16, which is what lets 6 epochs learn the answers.
DEMO = {"epochs": 6, "learning_rate": 3e-3, "batch_size": 8, "targets": "all-linear",
        "add_system_ratio": 0.0, "empty_think_ratio": 1.0, "eval_data": str(BUNDLED_EVAL)}
REAL = {"epochs": 10, "learning_rate": 1e-4, "batch_size": 32, "targets": "square",  # MiniMind's defaults
        "add_system_ratio": 0.2, "empty_think_ratio": 0.2, "eval_data": ""}
ACCEL_CHUNK_TOKENS = 8192  # rows per forward pass on accelerators, which want large matmuls
CPU_CHUNK_TOKENS = 256  # the most tokens of short packed rows per device and pass on a CPU (job.rows_per_device)
_POSITIVE = ("epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "max_seq_len", "rank")
# --sweep KEY: (the tag in members' file names, the value's type)
SWEEP_KEYS = {"learning_rate": ("lr", float), "seed": ("seed", int), "rank": ("rank", int)}


class ConfigError(ValueError):
    """A bad setting: the CLI prints it as one `error:` line; from Python it is an ordinary exception."""


@dataclass(frozen=True)
class Sweep:
    """`--sweep learning_rate=1e-4,3e-4 --sweep seed=1,2`: the product of the keys' values, one adapter each,
    trained together over the shared base and the same batches. `axes` keeps the values as typed."""
    axes: tuple  # ((key, (value as typed, ...)), ...)

    def __post_init__(self):
        if not self.axes:
            raise ConfigError("--sweep needs KEY=V1,V2,... (e.g. learning_rate=1e-4,3e-4,1e-3)")
        keys = [k for k, _ in self.axes]
        for key, texts in self.axes:
            if key == "data_path":
                raise ConfigError("--sweep data_path=...: a data file per member is not supported yet; every "
                                  f"member trains on --data_path (sweep {', '.join(SWEEP_KEYS)})")
            if key not in SWEEP_KEYS:
                raise ConfigError(f"--sweep: unknown key {key!r}; supported: {', '.join(SWEEP_KEYS)}")
            if keys.count(key) > 1:
                raise ConfigError(f"--sweep: {key} given twice; list its values once: {key}=V1,V2,...")
            if not texts:
                raise ConfigError(f"--sweep {key}=: no values (e.g. {key}=V1,V2)")
            values = [self._value(key, t) for t in texts]
            for t, v in zip(texts, values):
                if values.count(v) > 1:
                    raise ConfigError(f"--sweep {key}={','.join(texts)}: {t} is given twice")

    @staticmethod
    def _value(key: str, text: str) -> Union[int, float]:
        kind = SWEEP_KEYS[key][1]
        try:
            v = kind(text)
        except ValueError:
            raise ConfigError(f"--sweep {key}: {text!r} is not {'a number' if kind is float else 'an integer'}")
        if key in ("learning_rate", "rank") and not (v > 0 and math.isfinite(v)):
            raise ConfigError(f"--sweep {key}: {text} must be positive")
        return v

    @classmethod
    def parse(cls, specs: Union[str, Sequence[str]]) -> "Sweep":
        """`--sweep` as given (each a 'KEY=V1,V2,...', or several of them separated by spaces) -> a Sweep."""
        items = [item for spec in ([specs] if isinstance(specs, str) else specs) for item in spec.split()]
        axes = []
        for item in items:
            key, eq, values = item.partition("=")
            if not eq or not key:
                raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,... (e.g. learning_rate=1e-4,3e-4)")
            axes.append((key, tuple(v for v in values.split(",") if v)))
        return cls(tuple(axes))

    def points(self) -> list[tuple[str, dict]]:
        """[(tag, {key: value})]: the product of the keys' values, the last key varying fastest; the tag names
        the member's files with the values as typed (`lr3e-4_seed2`)."""
        keys = self.keys()
        return [("_".join(f"{SWEEP_KEYS[k][0]}{t}" for k, t in zip(keys, combo)),
                 {k: self._value(k, t) for k, t in zip(keys, combo)})
                for combo in itertools.product(*[texts for _, texts in self.axes])]

    def keys(self) -> list[str]:
        return [k for k, _ in self.axes]

    def __str__(self) -> str:
        return " ".join(f"{k}={','.join(texts)}" for k, texts in self.axes)


def opt(default, help: Optional[str] = None, **flag):
    """A RunConfig field with its flag's help text (and argparse options: choices, metavar, action)."""
    return field(default=default, metadata={"help": help, **flag})


_01 = {"choices": (0, 1)}  # a 0/1 flag, as MiniMind spells its switches


@dataclass(frozen=True)
class RunConfig:
    """One field per flag of `python -m train.lora`, with its default and help text."""
    save_dir: str = opt("out", "output directory (adapter .ckpt, metrics, resume checkpoints)")
    lora_name: str = opt("lora_identity", "adapter name: <save_dir>/<lora_name>_<hidden>[_moe].ckpt")
    epochs: Optional[int] = opt(None, f"default {REAL['epochs']} (MiniMind); {DEMO['epochs']} for the bundled "
                                      "random-init demo")
    batch_size: Optional[int] = opt(None, "samples per step (global, MiniMind's meaning in every mode); default "
                                          f"{REAL['batch_size']}; {DEMO['batch_size']} for the demo")
    learning_rate: Optional[float] = opt(None, f"peak lr; default {REAL['learning_rate']}; "
                                               f"{DEMO['learning_rate']} for the demo")
    dtype: Optional[str] = opt(None, "compute dtype (adapter master weights stay fp32); default float32 on CPU, "
                                     "bfloat16 on GPU/TPU", choices=("bfloat16", "float32"))
    accumulation_steps: int = opt(1, "micro-steps per optimizer step (MiniMind's)")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (torch's clip_grad_norm_)")
    log_interval: int = opt(10, "log every N micro-steps (and at each epoch's end)")
    save_interval: int = opt(1000, "save the adapter and the resume state every N micro-steps (and at each "
                                   "epoch's end)")
    hidden_size: int = opt(512, "model width of the random-init base (no --from_weight), and the <hidden> of "
                                "MiniMind names in --from_weight / --from_lora")
    num_hidden_layers: int = opt(8, "layers of the random-init base")
    max_seq_len: int = opt(340, "tokens a sample is cut to (MiniMind's)")
    use_moe: bool = opt(False, "1: MoE random-init base; the _moe suffix of names", **_01)
    data_path: str = opt(str(BUNDLED_DATA), "MiniMind SFT jsonl (comma-separated for several)")
    from_weight: Optional[str] = opt(None, "base weights: a path (MiniMind .pth, .safetensors, orbax params dir) or "
                                           "a MiniMind name as in its train_lora.py: full_sft = "
                                           "<save_dir>/full_sft_<hidden>[_moe].pth, else out/...; none = random init")
    from_resume: bool = opt(False, "1: continue from the latest full train state", **_01)
    rank: int = opt(8, "LoRA rank")
    alpha: Optional[float] = opt(None, "LoRA alpha (scale alpha/rank); default none = scale 1 like MiniMind")
    targets: Optional[str] = opt(None, "square (MiniMind's rule, the default), all-linear, attn, mlp, or "
                                       "comma-separated names/regexes; all-linear for the bundled random-init demo")
    seed: int = opt(42, "the sample order, a random base, the adapter's init (seed + 1) and dropout")
    tokenizer: Optional[str] = opt(None, "tokenizer directory (default: the bundled one)")
    from_lora: Optional[str] = opt(None, "start from an existing adapter: a path (.ckpt, MiniMind .pth, PEFT dir) or "
                                         "a name like serve.chat's --lora_weight (looked up in --save_dir)")
    add_system_ratio: Optional[float] = opt(None, "MiniMind's: prepend a random system prompt (default 0.2; demo 0)")
    empty_think_ratio: Optional[float] = opt(None, "MiniMind's: keep the empty think block (default 0.2; demo 1)")
    skip_bad_lines: bool = opt(False, "skip (and count) malformed jsonl lines instead of failing", action="store_true")
    pack: bool = opt(True, "1: pack each step's samples into as few rows as they need (same loss and gradients, "
                           "less padding); 0: MiniMind's padded rows", **_01)
    group_by_length: bool = opt(False, "1: batches of samples of similar lengths (HF Trainer's; less padding, "
                                       "different batches)", **_01)
    batch_tokens: Optional[int] = opt(None, "token-budget steps instead of --batch_size samples (TRL-style): the "
                                            "epoch is packed into rows of --max_seq_len and each step takes this many "
                                            "tokens of rows; changes the optimisation (fewer, larger steps)")
    rows_per_device: int = opt(0, "rows each device runs at once inside a step (0 = auto: 1 on a CPU, or up to "
                                  f"{CPU_CHUNK_TOKENS} tokens of short packed rows; {ACCEL_CHUNK_TOKENS} tokens' "
                                  "worth on a GPU/TPU)")
    labels_only: bool = opt(True, "1: vocab projection only at labelled positions", **_01)
    remat: bool = opt(False, "1: gradient checkpointing per layer (each layer's activations recomputed in the "
                             "backward pass: same losses, less memory, ~1/3 more compute)", **_01)
    tensorboard: bool = opt(False, "also log to <save_dir>/tensorboard/<lora_name> (needs tensorboardX)",
                            action="store_true")
    cache_dir: Optional[str] = opt(None, "tokenized-data cache (default ~/.cache/minimind_jax/sft)")
    compile_cache: str = opt("auto", "compiled programs kept for the next run with the same shapes and settings "
                                     "(JAX's persistent compilation cache): auto (default: $JAX_COMPILATION_CACHE_DIR "
                                     "if set, else ~/.cache/minimind_jax/xla), none, or a directory")
    eval_data: Optional[str] = opt(None, "held-out chats (same jsonl format; comma-separated for several): the eval "
                                         "loss is measured on them at every --eval_interval; default none (the bundled "
                                         "demo: its held-out identity questions)")
    eval_ratio: float = opt(0.0, "hold out this share of --data_path's samples (chosen by --seed) as the eval set "
                                 "instead of --eval_data; they never reach a training batch")
    eval_interval: int = opt(0, "evaluate every N micro-steps and at the last step; 0 = at each epoch's end")
    general_data: Optional[str] = opt(None, "chats standing for what the base should keep: at each evaluation the "
                                            "base's and the adapted model's loss on them, their difference "
                                            "(forgetting) and the mean per-token KL(adapted || base)")
    save_best: bool = opt(False, "1: also keep the adapter with the lowest eval loss "
                                 "(<save_dir>/<lora_name>_best_<hidden>.ckpt)", **_01)
    early_stop: int = opt(0, "stop after this many evaluations without a lower eval loss, saving as a finished run "
                             "does (0 = never)")
    warmup_ratio: float = opt(0.0, "ramp the learning rate up linearly over this share of the steps, into "
                                   "MiniMind's cosine (0 = MiniMind's schedule)")
    prompts: str = opt("|".join(PROMPTS), "'|'-separated prompts answered greedily before and after training")
    max_new_tokens: int = opt(64, "answer length for --prompts; 0 skips the answers")
    cpu_devices: int = opt(0, "CPU only: split the cores into this many data-parallel XLA devices; 0 (default) = "
                              "one per core (at most 8, at most the samples per step); 1 = off")
    coordinator: Optional[str] = opt(None, "multi-host: coordinator HOST:PORT (process 0's address)")
    num_processes: Optional[int] = opt(None, "multi-host: how many processes the run has")
    process_id: Optional[int] = opt(None, "multi-host: this process's index (0 writes the files)")
    sweep: Optional[Sweep] = opt(None, f"train one adapter per value ({', '.join(SWEEP_KEYS)}) together in one "
                                       "compiled step over the shared base and batches; several --sweep flags make "
                                       "the product. Each writes <lora_name>_<tag>_<hidden>.ckpt (tag e.g. "
                                       "lr3e-4_seed2, the values as typed), its metrics and loss curve; plus "
                                       "<lora_name>_sweep_summary.json and <lora_name>_sweep_loss.png. seed: each "
                                       "member's adapter init; the base and the sample order stay --seed's",
                                 action="append", metavar="KEY=V1,V2,...")

    def __post_init__(self):
        if self.eval_data is None and self.eval_ratio > 0:
            object.__setattr__(self, "eval_data", "")  # the split is the eval set, not the demo's held-out file
        for k, v in (DEMO if self.demo else REAL).items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)  # frozen: the one place a field is filled in
        if self.sweep is not None and not isinstance(self.sweep, Sweep):  # 'learning_rate=1e-4,3e-4' or a list
            object.__setattr__(self, "sweep", Sweep.parse(self.sweep))
        for k in _POSITIVE:
            if getattr(self, k) <= 0:
                raise ConfigError(f"--{k} must be positive, got {getattr(self, k)}")
        if not self.learning_rate > 0 or not self.grad_clip > 0:
            raise ConfigError("--learning_rate and --grad_clip must be positive")
        if self.batch_tokens is not None and self.batch_tokens < self.max_seq_len:
            raise ConfigError(f"--batch_tokens {self.batch_tokens} is less than one row of --max_seq_len "
                              f"{self.max_seq_len}")
        if self.rows_per_device < 0:
            raise ConfigError(f"--rows_per_device must be >= 0, got {self.rows_per_device}")
        if self.dtype not in (None, "bfloat16", "float32"):
            raise ConfigError(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")
        self._check_eval()
        if self.sweep is not None and self.from_lora and {"seed", "rank"} & set(self.sweep.keys()):
            raise ConfigError(f"--sweep {self.sweep}: seed and rank choose each member's new adapter; with "
                              "--from_lora every member starts from that one (sweep learning_rate instead)")

    def _check_eval(self) -> None:
        if not 0 <= self.eval_ratio < 1:
            raise ConfigError(f"--eval_ratio must be in [0, 1), got {self.eval_ratio}")
        if self.eval_ratio > 0 and self.eval_paths:
            raise ConfigError("--eval_data and --eval_ratio both give an eval set: pass one")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"--warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        for k in ("eval_interval", "early_stop"):
            if getattr(self, k) < 0:
                raise ConfigError(f"--{k} must be >= 0, got {getattr(self, k)}")
        if (self.save_best or self.early_stop) and not self.evaluates:
            flag = "--save_best" if self.save_best else "--early_stop"
            raise ConfigError(f"{flag} needs an eval set: --eval_data PATH or --eval_ratio R")

    @property
    def eval_paths(self) -> list[str]:
        return [s for s in (self.eval_data or "").split(",") if s]

    @property
    def general_paths(self) -> list[str]:
        return [s for s in (self.general_data or "").split(",") if s]

    @property
    def evaluates(self) -> bool:
        """Whether the run measures an eval loss (an eval set: --eval_data or --eval_ratio)."""
        return self.eval_ratio > 0 or bool(self.eval_paths)

    @property
    def random_base(self) -> bool:
        return not (self.from_weight and self.from_weight.lower() != "none")

    @property
    def data_paths(self) -> list[str]:
        return [s for s in self.data_path.split(",") if s]

    @property
    def demo(self) -> bool:
        """The bundled demo: no --from_weight (random-init base) and only the bundled data."""
        return self.random_base and [Path(p).resolve() for p in self.data_paths] == [BUNDLED_DATA]

    @property
    def prompt_list(self) -> list[str]:
        """The prompts answered before and after training (none when --max_new_tokens is 0)."""
        return [p for p in self.prompts.split("|") if p] if self.max_new_tokens > 0 else []

    def demo_note(self) -> Optional[str]:
        if not self.demo:
            return None
        return (f"bundled demo defaults: epochs={self.epochs} batch_size={self.batch_size} "
                f"learning_rate={self.learning_rate:g} targets={self.targets} "
                f"add_system_ratio={self.add_system_ratio:g} empty_think_ratio={self.empty_think_ratio:g} "
                "(MiniMind's are 10 / 32 / 1e-4 / square / 0.2 / 0.2: a random base needs more to visibly learn "
                "the identity answers in minutes; pass any flag to override)")

    @classmethod
    def from_argv(cls, argv: Optional[Sequence[str]] = None, description: Optional[str] = None) -> "RunConfig":
        """Parse the command line (sys.argv[1:] when None). argparse exits on a malformed flag as usual; a bad
        value raises ConfigError."""
        ns = vars(build_parser(description).parse_args(argv))
        kinds = {f.name: _kind(f) for f in dataclasses.fields(cls)}
        return cls(**{k: bool(v) if kinds[k] is bool else v for k, v in ns.items()})


def _kind(f: dataclasses.Field):
    """The Python type of a field's values (annotations are strings here: `from __future__ import annotations`)."""
    name = f.type.removeprefix("Optional[").removesuffix("]")
    return {"int": int, "float": float, "bool": bool, "str": str, "Sweep": str}[name]


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """`python -m train.lora`'s flags, one per RunConfig field with its default and help; a 0/1 switch takes 0 or 1
    as MiniMind's flags do."""
    p = argparse.ArgumentParser(prog="python -m train.lora", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(RunConfig):
        meta, kind = dict(f.metadata), _kind(f)
        kw = {"default": int(f.default) if kind is bool and "choices" in meta else f.default, "help": meta.pop("help")}
        if meta.get("action") is None:
            kw["type"] = int if kind is bool else kind
        p.add_argument(f"--{f.name}", **kw, **meta)
    return p
