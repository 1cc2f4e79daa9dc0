"""MiniMindConfig: one frozen dataclass for both MiniMind families.

Field names follow MiniMind's own `config.json` so a file written by either revision reads back unchanged.
The two families differ in a handful of switches, all derived from `family` unless given explicitly:

| family      | revision | q/k RMSNorm | eps  | intermediate              | MoE                                      |
|-------------|----------|-------------|------|---------------------------|------------------------------------------|
| "minimind2" | c090b69  | no          | 1e-5 | 64*ceil(int(8h/3)/64)     | top-2, renormalised, + shared experts    |
| "minimind3" | HEAD     | yes         | 1e-6 | ceil(h*pi/64)*64          | top-1, no shared experts, own aux loss   |
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Optional

import jax.numpy as jnp

FAMILIES = ("minimind2", "minimind3")

# MiniMind's YaRN block, written as-is into config.json when inference_rope_scaling is on.
DEFAULT_YARN = {
    "beta_fast": 32,
    "beta_slow": 1,
    "factor": 16,
    "original_max_position_embeddings": 2048,
    "attention_factor": 1.0,
    "type": "yarn",
}


@dataclasses.dataclass(frozen=True)
class MiniMindConfig:
    family: str = "minimind2"
    hidden_size: int = 512
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 2
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    intermediate_size: Optional[int] = None  # None: the family's rule
    vocab_size: int = 6400
    rms_norm_eps: Optional[float] = None  # None: 1e-5 (minimind2) / 1e-6 (minimind3)
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    inference_rope_scaling: bool = False
    rope_scaling: Optional[dict] = None  # None + inference_rope_scaling: MiniMind's YaRN defaults
    tie_word_embeddings: bool = True
    qk_norm: Optional[bool] = None  # None: family default (minimind3 only)
    dropout: float = 0.0
    hidden_act: str = "silu"
    bos_token_id: int = 1
    eos_token_id: int = 2
    # MoE (ignored unless use_moe)
    use_moe: bool = False
    n_routed_experts: int = 4  # MiniMind-3 calls it num_experts
    num_experts_per_tok: Optional[int] = None  # None: 2 (minimind2) / 1 (minimind3)
    n_shared_experts: Optional[int] = None  # None: 1 (minimind2) / 0 (minimind3)
    moe_intermediate_size: Optional[int] = None  # None: intermediate_size
    norm_topk_prob: bool = True
    scoring_func: str = "softmax"
    aux_loss_alpha: Optional[float] = None  # None: 0.01 (minimind2) / 5e-4 (minimind3 router_aux_loss_coef)
    seq_aux: bool = True  # minimind2 only

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen: derive defaults once, here
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        v3 = self.family == "minimind3"
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads}) unless head_dim is given")
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.intermediate_size is None:
            h = self.hidden_size
            set_("intermediate_size", math.ceil(h * math.pi / 64) * 64 if v3 else 64 * ((int(h * 8 / 3) + 63) // 64))
        if self.rms_norm_eps is None:
            set_("rms_norm_eps", 1e-6 if v3 else 1e-5)
        if self.qk_norm is None:
            set_("qk_norm", v3)
        if self.num_experts_per_tok is None:
            set_("num_experts_per_tok", 1 if v3 else 2)
        if self.n_shared_experts is None:
            set_("n_shared_experts", 0 if v3 else 1)
        if self.moe_intermediate_size is None:
            set_("moe_intermediate_size", self.intermediate_size)
        if self.aux_loss_alpha is None:
            set_("aux_loss_alpha", 5e-4 if v3 else 0.01)
        if self.rope_scaling is None and self.inference_rope_scaling:
            set_("rope_scaling", dict(DEFAULT_YARN))
        if self.rope_scaling is not None and not self.inference_rope_scaling:
            set_("rope_scaling", None)  # MiniMind ties the two: no flag, no YaRN
        if self.use_moe and not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                             f"[1, n_routed_experts={self.n_routed_experts}]")
        if self.scoring_func != "softmax":
            raise ValueError(f"only scoring_func='softmax' exists in MiniMind, got {self.scoring_func!r}")
        if self.hidden_act != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {self.hidden_act!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def __hash__(self):  # rope_scaling is a dict; hash by value so configs can be static jit args
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    # ---- presets -------------------------------------------------------------------------------------------
    @classmethod
    def minimind2_small(cls, **kw) -> "MiniMindConfig":
        """MiniMind2-Small, 26M: 512x8, 8 heads, 2 kv heads."""
        return cls(**{"family": "minimind2", "hidden_size": 512, "num_hidden_layers": 8, **kw})

    @classmethod
    def minimind3(cls, **kw) -> "MiniMindConfig":
        """MiniMind-3 defaults: 768x8, 8 heads, 4 kv heads, q/k-norm, tied embeddings."""
        return cls(**{"family": "minimind3", "hidden_size": 768, "num_hidden_layers": 8,
                      "num_key_value_heads": 4, **kw})

    def replace(self, **kw) -> "MiniMindConfig":
        return dataclasses.replace(self, **kw)

    # ---- MiniMind's config.json --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], family: Optional[str] = None) -> "MiniMindConfig":
        """Reads the dict of either revision's `config.json`; unknown keys (transformers' own) are ignored."""
        d = dict(d)
        if family is None:
            family = d.get("family") or detect_family_from_config(d)
        if "num_experts" in d and "n_routed_experts" not in d:
            d["n_routed_experts"] = d["num_experts"]
        if "router_aux_loss_coef" in d and "aux_loss_alpha" not in d:
            d["aux_loss_alpha"] = d["router_aux_loss_coef"]
        names = {f.name for f in dataclasses.fields(cls)} - {"family"}
        kw = {k: d[k] for k in names if k in d}
        if family == "minimind2":
            kw.pop("head_dim", None) if kw.get("head_dim") is None else None
        for k in ("rope_theta", "rms_norm_eps", "dropout", "aux_loss_alpha"):
            if kw.get(k) is not None:
                kw[k] = float(kw[k])
        return cls(family=family, **kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike, family: Optional[str] = None) -> "MiniMindConfig":
        d = read_json_object(path)
        try:
            return cls.from_dict(d, family)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """MiniMind's field names for this family, plus `family`; readable by MiniMind's MiniMindConfig(**d)."""
        d = dataclasses.asdict(self)
        d["model_type"] = "minimind"
        d["flash_attn"] = True
        if self.family == "minimind3":
            d["num_experts"] = d.pop("n_routed_experts")
            d["router_aux_loss_coef"] = d.pop("aux_loss_alpha")
            for k in ("n_shared_experts", "seq_aux", "scoring_func"):
                d.pop(k)
        else:
            d.pop("moe_intermediate_size")
            if self.head_dim == self.hidden_size // self.num_attention_heads:
                d.pop("head_dim")  # c090b69 has no head_dim; its presence would read as MiniMind-3
        return d

    def to_json(self, path: str | os.PathLike) -> None:
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)


_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def compute_dtype(dtype) -> jnp.dtype:
    """A dtype or its name ('float32', 'bfloat16', 'float16' or fp32 / bf16 / fp16 / half / float) -> jnp.dtype.

    The one parser of dtype flags and arguments (CLIs' --dtype, convert's dtype=): only the three float types
    a MiniMind model is computed or stored in; anything else is a ValueError naming them."""
    if isinstance(dtype, str):
        dtype = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    try:
        dt = jnp.dtype(dtype)
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, float16 or bfloat16") from e
    if dt.name not in FLOAT_DTYPES:
        raise ValueError(f"weights are stored and computed as float32, float16 or bfloat16, not {dt}")
    return dt


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file holding one object; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def detect_family_from_config(d: dict[str, Any]) -> str:
    """MiniMind-3's config carries head_dim / num_experts / router_aux_loss_coef; MiniMind2's does not."""
    if any(k in d for k in ("router_aux_loss_coef", "num_experts", "moe_intermediate_size", "head_dim")):
        return "minimind3"
    return "minimind2"
