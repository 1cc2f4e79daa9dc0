"""The run's settings: `python -m train.lora`'s flags as one typed, frozen, checked value.

    cfg = RunConfig.from_argv(["--rank", "16"])     # the CLI's parser and defaults
    cfg = RunConfig(data_path="my.jsonl", from_weight="full_sft", epochs=2)   # the same, from code

The settings MiniMind's trainer and the bundled demo disagree on (DEMO / REAL) default to None = "this kind of
run's default": `__post_init__` fills them in from DEMO when the run is the bundled demo (random-init base,
bundled data), else from REAL. They stay filled in afterwards, so `dataclasses.replace(cfg, data_path=...)` keeps
them: pass them as None again to re-resolve. `dtype` None stays None until JAX is up (train.run picks float32 on
a CPU, bfloat16 on a GPU/TPU): asking JAX for its backend here would start it before the CPU split is chosen.
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

BUNDLED_DATA = Path(__file__).resolve().parent / "assets" / "lora_identity.jsonl"  # package data
PROMPTS = ("你是谁？", "Who are you?")
# The bundled demo (random-init base, bundled data): settings that make the adapter visibly take effect quickly.
# A random base has no language to build on, so the demo adapts every projection (MiniMind's square-kernel rule
# leaves too little capacity to learn answers from scratch in minutes) and renders conversations exactly like the
# generation prompt (no random system prompt, empty think block kept). 8 samples a step give twice the updates per
# epoch of 16: 6 epochs at 3e-3 learn the answers that 16 samples needed 10 epochs at 4e-3 for, in less time
# (at 6 epochs 2e-3 and 4e-3 answer less cleanly, 5 epochs are too few; 16 samples for 6 epochs do not learn them).
DEMO = {"epochs": 6, "learning_rate": 3e-3, "batch_size": 8, "targets": "all-linear",
        "add_system_ratio": 0.0, "empty_think_ratio": 1.0}
REAL = {"epochs": 10, "learning_rate": 1e-4, "batch_size": 32, "targets": "square",  # MiniMind's defaults
        "add_system_ratio": 0.2, "empty_think_ratio": 0.2}
ACCEL_CHUNK_TOKENS = 8192  # rows per forward pass on accelerators, which want large matmuls
CPU_CHUNK_TOKENS = 256  # the most tokens of short packed rows per device and pass on a CPU (job.rows_per_device)
_POSITIVE = ("epochs", "batch_size", "accumulation_steps", "log_interval", "save_interval", "max_seq_len", "rank")
# --sweep KEY: (the tag in members' file names, the value's type)
SWEEP_KEYS = {"learning_rate": ("lr", float), "seed": ("seed", int), "rank": ("rank", int)}


@dataclass(frozen=True)
class SweepMember:
    """One adapter of a sweep: its settings and the tag its files are named by (`lr3e-4_seed2`: the values as
    typed on the command line)."""
    tag: str
    settings: tuple  # ((key, value), ...) in --sweep's order

    def __str__(self) -> str:
        return self.tag


@dataclass(frozen=True)
class Sweep:
    """`--sweep learning_rate=1e-4,3e-4 --sweep seed=1,2`: the product of the keys' values, one adapter each,
    trained together over the shared base and the same batches (train.sweep). `axes` keeps the values as typed."""
    axes: tuple  # ((key, (value as typed, ...)), ...)

    def __post_init__(self):
        if not self.axes:
            raise SystemExit("error: --sweep needs KEY=V1,V2,... (e.g. learning_rate=1e-4,3e-4,1e-3)")
        keys = [k for k, _ in self.axes]
        for key, texts in self.axes:
            if key == "data_path":
                raise SystemExit("error: --sweep data_path=...: a data file per member is not supported yet; every "
                                 f"member trains on --data_path (sweep {', '.join(SWEEP_KEYS)})")
            if key not in SWEEP_KEYS:
                raise SystemExit(f"error: --sweep: unknown key {key!r}; supported: {', '.join(SWEEP_KEYS)}")
            if keys.count(key) > 1:
                raise SystemExit(f"error: --sweep: {key} given twice; list its values once: {key}=V1,V2,...")
            if not texts:
                raise SystemExit(f"error: --sweep {key}=: no values (e.g. {key}=V1,V2)")
            values = [self._value(key, t) for t in texts]
            for t, v in zip(texts, values):
                if values.count(v) > 1:
                    raise SystemExit(f"error: --sweep {key}={','.join(texts)}: {t} is given twice")

    @staticmethod
    def _value(key: str, text: str) -> Union[int, float]:
        kind = SWEEP_KEYS[key][1]
        try:
            v = kind(text)
        except ValueError:
            raise SystemExit(f"error: --sweep {key}: {text!r} is not {'a number' if kind is float else 'an integer'}")
        if key in ("learning_rate", "rank") and not (v > 0 and math.isfinite(v)):
            raise SystemExit(f"error: --sweep {key}: {text} must be positive")
        return v

    @classmethod
    def parse(cls, specs: Union[str, Sequence[str]]) -> "Sweep":
        """`--sweep` as given (each a 'KEY=V1,V2,...', or several of them separated by spaces) -> a Sweep."""
        items = [item for spec in ([specs] if isinstance(specs, str) else specs) for item in spec.split()]
        axes = []
        for item in items:
            key, eq, values = item.partition("=")
            if not eq or not key:
                raise SystemExit(f"error: --sweep {item!r}: expected KEY=V1,V2,... (e.g. learning_rate=1e-4,3e-4)")
            axes.append((key, tuple(v for v in values.split(",") if v)))
        return cls(tuple(axes))

    def members(self) -> list[SweepMember]:
        """The product of the keys' values, the last key varying fastest."""
        out = []
        for combo in itertools.product(*[texts for _, texts in self.axes]):
            keys = [k for k, _ in self.axes]
            out.append(SweepMember("_".join(f"{SWEEP_KEYS[k][0]}{t}" for k, t in zip(keys, combo)),
                                   tuple((k, self._value(k, t)) for k, t in zip(keys, combo))))
        return out

    def keys(self) -> list[str]:
        return [k for k, _ in self.axes]

    def __str__(self) -> str:
        return " ".join(f"{k}={','.join(texts)}" for k, texts in self.axes)


@dataclass(frozen=True)
class RunConfig:
    """One field per flag of `python -m train.lora` (see `build_parser` for what each means)."""
    save_dir: str = "out"
    lora_name: str = "lora_identity"
    epochs: Optional[int] = None  # None: DEMO / REAL
    batch_size: Optional[int] = None  # samples per step (global); None: DEMO / REAL
    learning_rate: Optional[float] = None  # None: DEMO / REAL
    dtype: Optional[str] = None  # "bfloat16" | "float32"; None: by backend, chosen once JAX is up
    accumulation_steps: int = 1
    grad_clip: float = 1.0
    log_interval: int = 10
    save_interval: int = 1000
    hidden_size: int = 512
    num_hidden_layers: int = 8
    max_seq_len: int = 340
    use_moe: bool = False
    data_path: str = str(BUNDLED_DATA)  # comma-separated for several files
    from_weight: Optional[str] = None
    from_resume: bool = False
    rank: int = 8
    alpha: Optional[float] = None
    targets: Optional[str] = None  # None: DEMO / REAL
    seed: int = 42
    tokenizer: Optional[str] = None
    from_lora: Optional[str] = None
    add_system_ratio: Optional[float] = None  # None: DEMO / REAL
    empty_think_ratio: Optional[float] = None  # None: DEMO / REAL
    skip_bad_lines: bool = False
    pack: bool = True
    group_by_length: bool = False
    batch_tokens: Optional[int] = None
    rows_per_device: int = 0  # 0 = auto
    labels_only: bool = True
    remat: bool = False  # recompute each layer's activations in the backward pass (less memory, more compute)
    tensorboard: bool = False
    cache_dir: Optional[str] = None
    compile_cache: str = "auto"  # JAX persistent compilation cache: auto, none or a directory (train.compile_cache)
    prompts: str = "|".join(PROMPTS)  # '|'-separated
    max_new_tokens: int = 64
    cpu_devices: int = 0  # 0 = auto
    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    sweep: Optional[Sweep] = None  # a str or list of them ('learning_rate=1e-4,3e-4') is parsed into a Sweep

    def __post_init__(self):
        for k, v in (DEMO if self.demo else REAL).items():
            if getattr(self, k) is None:
                object.__setattr__(self, k, v)  # frozen: the one place a field is filled in
        if self.sweep is not None and not isinstance(self.sweep, Sweep):
            object.__setattr__(self, "sweep", Sweep.parse(self.sweep))
        if self.sweep is not None:
            self._check_sweep()
        for k in _POSITIVE:
            if getattr(self, k) <= 0:
                raise SystemExit(f"--{k} must be positive, got {getattr(self, k)}")
        if not self.learning_rate > 0 or not self.grad_clip > 0:
            raise SystemExit("--learning_rate and --grad_clip must be positive")
        if self.batch_tokens is not None and self.batch_tokens < self.max_seq_len:
            raise SystemExit(f"--batch_tokens {self.batch_tokens} is less than one row of --max_seq_len "
                             f"{self.max_seq_len}")
        if self.rows_per_device < 0:
            raise SystemExit(f"--rows_per_device must be >= 0, got {self.rows_per_device}")
        if self.dtype not in (None, "bfloat16", "float32"):
            raise SystemExit(f"--dtype must be bfloat16 or float32, got {self.dtype!r}")

    def _check_sweep(self) -> None:
        if (self.num_processes or 1) > 1:
            raise SystemExit("error: --sweep runs in one process (its devices split the batch); --num_processes "
                             f"{self.num_processes} is not supported with it yet")
        if self.from_lora and {"seed", "rank"} & set(self.sweep.keys()):
            raise SystemExit(f"error: --sweep {self.sweep}: seed and rank choose each member's new adapter; with "
                             "--from_lora every member starts from that one (sweep learning_rate instead)")

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
        """Parse the command line (sys.argv[1:] when None); bad values exit with a one-line message."""
        ns = vars(build_parser(description).parse_args(argv))
        flags = {f.name: f.type for f in dataclasses.fields(cls)}  # "bool" for the 0/1 flags
        return cls(**{k: bool(v) if flags[k] == "bool" else v for k, v in ns.items()})


def build_parser(description: Optional[str] = None) -> argparse.ArgumentParser:
    """`python -m train.lora`'s flags; DEMO / REAL settings default to None (RunConfig resolves them). One table of
    flags, one entry each: longer than a function should be, shorter than any split of it would read."""
    p = argparse.ArgumentParser(prog="python -m train.lora", description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--save_dir", default="out", help="output directory (adapter .ckpt, metrics, resume checkpoints)")
    a("--lora_name", default="lora_identity", help="adapter name: <save_dir>/<lora_name>_<hidden>[_moe].ckpt")
    a("--epochs", type=int, default=None,
      help=f"default {REAL['epochs']} (MiniMind); {DEMO['epochs']} for the bundled random-init demo")
    a("--batch_size", type=int, default=None, help=f"samples per step (global, MiniMind's meaning in every mode); "
                                                   f"default {REAL['batch_size']}; {DEMO['batch_size']} for the demo")
    a("--learning_rate", type=float, default=None,
      help=f"peak lr; default {REAL['learning_rate']}; {DEMO['learning_rate']} for the demo")
    a("--dtype", choices=("bfloat16", "float32"), default=None,
      help="compute dtype (adapter master weights stay fp32); default float32 on CPU, bfloat16 on GPU/TPU")
    a("--accumulation_steps", type=int, default=1)
    a("--grad_clip", type=float, default=1.0)
    a("--log_interval", type=int, default=10)
    a("--save_interval", type=int, default=1000)
    a("--hidden_size", type=int, default=512, help="model width of the random-init base (no --from_weight), and "
                                                   "the <hidden> of MiniMind names in --from_weight / --from_lora")
    a("--num_hidden_layers", type=int, default=8)
    a("--max_seq_len", type=int, default=340)
    a("--use_moe", type=int, choices=(0, 1), default=0, help="1: MoE random-init base; the _moe suffix of names")
    a("--data_path", default=str(BUNDLED_DATA), help="MiniMind SFT jsonl (comma-separated for several)")
    a("--from_weight", default=None,
      help="base weights: a path (MiniMind .pth, .safetensors, orbax params dir) or a MiniMind name as in its "
           "train_lora.py: full_sft = <save_dir>/full_sft_<hidden>[_moe].pth, else out/...; none = random init")
    a("--from_resume", type=int, choices=(0, 1), default=0, help="1: continue from the latest full train state")
    a("--rank", type=int, default=8)
    a("--alpha", type=float, default=None, help="LoRA alpha (scale alpha/rank); default none = scale 1 like MiniMind")
    a("--targets", default=None, help="square (MiniMind's rule, the default), all-linear, attn, mlp, or "
                                      "comma-separated names/regexes; all-linear for the bundled random-init demo")
    a("--seed", type=int, default=42)
    a("--tokenizer", default=None, help="tokenizer directory (default: the bundled one)")
    a("--from_lora", default=None, help="start from an existing adapter: a path (.ckpt, MiniMind .pth, PEFT dir) "
                                        "or a name like serve.chat's --lora_weight (looked up in --save_dir)")
    a("--add_system_ratio", type=float, default=None,
      help="MiniMind's: prepend a random system prompt (default 0.2; demo 0)")
    a("--empty_think_ratio", type=float, default=None,
      help="MiniMind's: keep the empty think block (default 0.2; demo 1)")
    a("--skip_bad_lines", action="store_true", help="skip (and count) malformed jsonl lines instead of failing")
    a("--pack", type=int, choices=(0, 1), default=1, help="1: pack each step's samples into as few rows as they "
                                                          "need (same loss and gradients, less padding); 0: "
                                                          "MiniMind's padded rows")
    a("--group_by_length", type=int, choices=(0, 1), default=0,
      help="1: batches of samples of similar lengths (HF Trainer's; less padding, different batches)")
    a("--batch_tokens", type=int, default=None,
      help="token-budget steps instead of --batch_size samples (TRL-style): the epoch is packed into rows of "
           "--max_seq_len and each step takes this many tokens of rows; changes the optimisation (fewer, larger steps)")
    a("--rows_per_device", type=int, default=0, help="rows each device runs at once inside a step (0 = auto: 1 on a "
                                                     f"CPU, or up to {CPU_CHUNK_TOKENS} tokens of short packed rows; "
                                                     f"{ACCEL_CHUNK_TOKENS} tokens' worth on a GPU/TPU)")
    a("--labels_only", type=int, choices=(0, 1), default=1, help="1: vocab projection only at labelled positions")
    a("--remat", type=int, choices=(0, 1), default=0, help="1: gradient checkpointing per layer (each layer's "
                                                          "activations recomputed in the backward pass: same "
                                                          "losses, less memory, ~1/3 more compute)")
    a("--tensorboard", action="store_true", help="also log to <save_dir>/tensorboard/<lora_name> (needs tensorboardX)")
    a("--cache_dir", default=None, help="tokenized-data cache (default ~/.cache/minimind_jax/sft)")
    a("--compile_cache", default="auto", help="compiled programs kept for the next run with the same shapes and "
                                              "settings (JAX's persistent compilation cache): auto (default: "
                                              "$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/minimind_jax/xla), "
                                              "none, or a directory")
    a("--prompts", default="|".join(PROMPTS), help="'|'-separated prompts answered greedily before and after training")
    a("--max_new_tokens", type=int, default=64, help="answer length for --prompts; 0 skips the answers")
    a("--cpu_devices", type=int, default=0, help="CPU only: split the cores into this many data-parallel XLA "
                                                 "devices; 0 (default) = one per core (at most 8) dividing the "
                                                 "batch; 1 = off")
    a("--coordinator", default=None, help="multi-host: coordinator HOST:PORT (process 0's address)")
    a("--num_processes", type=int, default=None)
    a("--process_id", type=int, default=None)
    a("--sweep", action="append", default=None, metavar="KEY=V1,V2,...",
      help=f"train one adapter per value ({', '.join(SWEEP_KEYS)}) together in one compiled step over the shared "
           "base and batches; several --sweep flags make the product. Each writes "
           "<lora_name>_<tag>_<hidden>.ckpt (tag e.g. lr3e-4_seed2, the values as typed), its metrics and loss "
           "curve; plus <lora_name>_sweep_summary.json and <lora_name>_sweep_loss.png. seed: each member's adapter "
           "init; the base and the sample order stay --seed's")
    return p
