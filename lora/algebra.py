"""Adapters as values: exact sums, scalings, weighted combinations, stacking and optimal rank truncation.

Every operation here is defined by what it does to the per-module delta `Δ = s·A@B` ([I, O], s the adapter's
scale), and is exact in that sense (up to fp32 rounding of the factors):

    add(a, b)          Δ = Δa + Δb                 rank ra + rb  (= concat)
    scale(a, w)        Δ = w·Δa                    rank ra       (w folded into B)
    negate(a)          Δ = -Δa                     rank ra
    concat(a, b, ...)  Δ = Σ Δi                    rank Σ ri
    combine(ads, ws)   Δ = Σ wi·Δi                 rank Σ ri     (= concat of scaled adapters)
    svd_truncate(a, k) best rank-k approximation of Δa per module (Eckart–Young) + its relative error
    pad_ranks(a, r)    the same Δ at a higher rank (zero columns of A, zero rows of B)
    stack(ads)         N adapters side by side for multi-adapter batches (`lora.apply(..., adapter_ids=...)`)

Why concatenation: `[A1 | A2] @ [[s1·B1], [s2·B2]] = s1·A1@B1 + s2·A2@B2` — block matrix product, no cross terms.
PEFT's `add_weighted_adapter(combination_type="linear")` instead sums the factors, A = Σ √(wi·si)·Ai and
B = Σ √(wi·si)·Bi, whose product is Σ wi·si·Ai@Bi PLUS the cross terms Σ_{i≠j} √(wi·si·wj·sj)·Ai@Bj: it keeps the rank
fixed but is not the weighted sum of the adapters (tests/test_lora.py measures the difference). Use
`svd_truncate(combine(...), r)` when a fixed rank is wanted: it is the closest rank-r adapter to the exact sum.

Adapters may target different module sets: results cover the union, and a module absent from an adapter
contributes a zero delta there. Every result folds the scales into B, so it has `alpha=None` (scale 1) and
`merge`/`apply` with it are exactly the sum of its parts regardless of each input's alpha / rslora.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from . import targets as targets_lib
from .core import Adapter, Rank, _rank_for, get_path, set_path

_HI = jax.lax.Precision.HIGHEST


def _adapters(args) -> list[Adapter]:
    """concat(a, b, c) and concat([a, b, c]) are the same call."""
    if len(args) == 1 and not isinstance(args[0], Adapter):
        args = tuple(args[0])
    out = list(args)
    if not out:
        raise ValueError("need at least one adapter")
    for i, a in enumerate(out):
        if not isinstance(a, Adapter):
            raise TypeError(f"argument {i} is a {type(a).__name__}, not a lora.Adapter")
        if a.stacked:
            raise ValueError(f"adapter {i} is stacked (lora.stack); algebra works on single adapters")
    return out


def _union_paths(adapters: Sequence[Adapter]) -> list[tuple[str, ...]]:
    seen: dict[tuple[str, ...], None] = {}
    for a in adapters:
        for p, _ in a.modules():
            seen.setdefault(p, None)
    return list(seen)


def _targets_union(adapters: Sequence[Adapter]) -> str:
    items: list[str] = []
    for a in adapters:
        for t in a.targets.split(","):
            if t and t not in items:
                items.append(t)
    return ",".join(items) or "square"


def _check_shapes(path, pieces) -> None:
    shapes = {(ab["A"].shape[0], ab["B"].shape[-1]) for ab in pieces}
    if len(shapes) > 1:
        raise ValueError(f"adapters disagree on the kernel shape of {targets_lib.module_name(path)}: "
                         f"[in, out] = {sorted(shapes)}")


def _folded_b(adapter: Adapter, ab: dict, dtype) -> jax.Array:
    s = adapter.scale(ab["A"].shape[-1])
    b = ab["B"].astype(dtype)
    return b if s == 1.0 else (ab["B"].astype(jnp.float32) * s).astype(dtype)


def concat(*adapters: Union[Adapter, Sequence[Adapter]]) -> Adapter:
    """One adapter whose delta is exactly the sum of the inputs' deltas: A = [A1 | A2 | ...] (rank axis),
    B = [s1·B1; s2·B2; ...]. Rank per module is the sum of the ranks of the adapters that have that module.
    The result has alpha=None (scale 1): each input's scale is folded into its rows of B.
    """
    ads = _adapters(adapters)
    weights: dict = {}
    for path in _union_paths(ads):
        parts = [(a, ab) for a in ads if (ab := get_path(a.weights, path, None)) is not None]
        _check_shapes(path, [ab for _, ab in parts])
        dtype = jnp.result_type(*[ab["A"].dtype for _, ab in parts], *[ab["B"].dtype for _, ab in parts])
        A = jnp.concatenate([ab["A"].astype(dtype) for _, ab in parts], axis=-1)
        B = jnp.concatenate([_folded_b(a, ab, dtype) for a, ab in parts], axis=0)
        set_path(weights, path, {"A": A, "B": B})
    return Adapter(weights, alpha=None, rslora=False, targets=_targets_union(ads))


def add(a: Adapter, b: Adapter) -> Adapter:
    """The adapter whose delta is Δa + Δb, exactly: `concat(a, b)` (rank ra + rb).

    Summing the factors instead (A1+A2, B1+B2) would add the cross terms A1@B2 + A2@B1; see the module docstring.
    """
    return concat(a, b)


def scale(adapter: Adapter, w) -> Adapter:
    """The adapter whose delta is w·Δ: w is folded into every B (A untouched, so rank, alpha and rslora are kept).

    w may be any real scalar (negative too) or a 0-d array (traced values work, so `scale` can run under jit).
    """
    (adapter,) = _adapters((adapter,))
    if np.ndim(w) != 0:
        raise ValueError(f"scale weight must be a scalar, got shape {np.shape(w)}")
    weights: dict = {}
    for path, ab in adapter.modules():
        B = (ab["B"].astype(jnp.float32) * w).astype(ab["B"].dtype)
        set_path(weights, path, {"A": ab["A"], "B": B})
    return Adapter(weights, alpha=adapter.alpha, rslora=adapter.rslora, targets=adapter.targets)


def negate(adapter: Adapter) -> Adapter:
    """The adapter whose delta is -Δ (B negated: exact in every dtype). `add(a, negate(a))` has zero delta."""
    (adapter,) = _adapters((adapter,))
    weights: dict = {}
    for path, ab in adapter.modules():
        set_path(weights, path, {"A": ab["A"], "B": -ab["B"]})
    return Adapter(weights, alpha=adapter.alpha, rslora=adapter.rslora, targets=adapter.targets)


def combine(adapters: Sequence[Adapter], weights: Optional[Sequence[float]] = None) -> Adapter:
    """Weighted combination Δ = Σ wi·Δi, exactly (no cross terms): `concat(scale(a_i, w_i) ...)`, rank Σ ri.

    `weights=None` means all ones (plain sum). Unlike PEFT's "linear" combination (factors summed, rank kept,
    cross terms √(wi·si·wj·sj)·Ai@Bj added), this is the true weighted sum; follow with `svd_truncate` for a fixed rank.
    """
    ads = _adapters((adapters,))
    if weights is None:
        weights = [1.0] * len(ads)
    weights = list(weights)
    if len(weights) != len(ads):
        raise ValueError(f"combine: {len(ads)} adapters but {len(weights)} weights")
    return concat([scale(a, w) for a, w in zip(ads, weights)])


def svd_truncate(adapter: Adapter, rank: Rank) -> tuple[Adapter, float]:
    """(the best rank-`rank` adapter per module, relative Frobenius error of the whole truncated delta).

    Per module, with Δ = s·A@B: QR-factor A = Qa·Ra and Bᵀ = Qb·Rb (reduced), so Δ = Qa·(s·Ra·Rbᵀ)·Qbᵀ and
    the SVD of the small [r, r] core M = U·S·Vᵀ gives Δ's SVD (Qa·U)·S·(Qb·V)ᵀ in O((I+O)r²) instead of an
    [I, O] SVD. Keeping the top k = min(rank, r) singular triplets is optimal in Frobenius norm (Eckart–Young);
    the factors are balanced: A' = Qa·U_k·√S_k, B' = √S_k·V_kᵀ·Qbᵀ (scale folded in, alpha=None).

    `rank` is an int or a {pattern: rank} mapping as in `lora.init` (per-module ranks). A module whose rank is
    already <= `rank` is kept whole (re-factored). rel_error = sqrt(Σ_modules Σ_{j>k} σ_j²) / sqrt(Σ_modules
    Σ_j σ_j²) = ‖Δ' - Δ‖_F / ‖Δ‖_F over all modules together (0.0 when Δ is zero); a Python float, so this is an
    offline (un-jitted) operation.
    """
    (adapter,) = _adapters((adapter,))
    weights: dict = {}
    tail, total = 0.0, 0.0
    for path, ab in adapter.modules():
        k = _rank_for(rank, targets_lib.module_name(path))
        if k <= 0:
            raise ValueError(f"svd_truncate rank must be positive, got {k} for {targets_lib.module_name(path)}")
        A = ab["A"].astype(jnp.float32)
        B = ab["B"].astype(jnp.float32)
        s = adapter.scale(A.shape[-1])
        qa, ra = jnp.linalg.qr(A)  # [I, p], [p, r]
        qb, rb = jnp.linalg.qr(B.T)  # [O, q], [q, r]
        core = s * jnp.matmul(ra, rb.T, precision=_HI)  # [p, q]
        u, sv, vt = jnp.linalg.svd(core, full_matrices=False)  # sv descending
        k = min(k, sv.shape[0])
        sq = jnp.sqrt(sv[:k])
        new_a = jnp.matmul(qa, u[:, :k], precision=_HI) * sq  # [I, k]
        new_b = sq[:, None] * jnp.matmul(vt[:k], qb.T, precision=_HI)  # [k, O]
        set_path(weights, path, {"A": new_a.astype(ab["A"].dtype), "B": new_b.astype(ab["B"].dtype)})
        sv64 = np.asarray(sv, np.float64)
        tail += float(np.sum(sv64[k:] ** 2))
        total += float(np.sum(sv64 ** 2))
    rel = float(np.sqrt(tail / total)) if total > 0 else 0.0
    return Adapter(weights, alpha=None, rslora=False, targets=adapter.targets), rel


def _fold(adapter: Adapter, dtype_of=None) -> Adapter:
    """The same delta with each module's scale folded into B (alpha None); factors cast to `dtype_of(path)` if given."""
    weights: dict = {}
    for path, ab in adapter.modules():
        dtype = dtype_of(path) if dtype_of is not None else jnp.result_type(ab["B"].dtype)
        A = ab["A"] if dtype_of is None else ab["A"].astype(dtype)
        set_path(weights, path, {"A": A, "B": _folded_b(adapter, ab, dtype)})
    return Adapter(weights, alpha=None, rslora=False, targets=adapter.targets)


def pad_ranks(adapter: Adapter, ranks: Union[Rank, Adapter]) -> Adapter:
    """The same delta with each module's rank raised to `ranks`: A's columns and B's rows zero-padded (the padding
    adds exact zeros to A@B). Works on stacked adapters too (their rank axis is A's last and B's second to last).

    `ranks`: an int (every module), a {pattern: rank} mapping as in `lora.init` (an `Adapter.ranks` dict is one),
    or an Adapter, whose ranks are the targets (its modules must cover this one's). A module already at or above its
    target rank is kept; one below it is padded. The scale of an adapter with alpha depends on its rank, so when
    padding changes a rank its scales are first folded into B and the result has alpha=None (scale 1), like every
    result of this module; otherwise (alpha None, or nothing to pad) alpha, rslora and targets are kept. For the
    factors padded with the scale dropped instead (a trainer that applies each rank's scale itself):
    `pad_ranks(adapter.replace(alpha=None, rslora=False), ranks)`.
    """
    want = ranks.ranks if isinstance(ranks, Adapter) else ranks
    pads = {}
    for path, ab in adapter.modules():
        name = targets_lib.module_name(path)
        if isinstance(want, Mapping) and name in want:  # a module's own name: exact, before any pattern
            target = int(want[name])
        elif isinstance(ranks, Adapter):
            raise ValueError(f"pad_ranks: the reference adapter has no {name}")
        else:
            target = _rank_for(want, name)
        pads[path] = max(0, target - ab["A"].shape[-1])
    if not any(pads.values()):
        return adapter
    if adapter.alpha is not None:
        adapter = _fold(adapter)
    weights: dict = {}
    for path, ab in adapter.modules():
        A, B, n = ab["A"], ab["B"], pads[path]
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 1) + [(0, n)])
        B = jnp.pad(B, [(0, 0)] * (B.ndim - 2) + [(0, n), (0, 0)])
        set_path(weights, path, {"A": A, "B": B})
    return adapter.replace(weights=weights)


def stack(adapters: Sequence[Adapter]) -> Adapter:
    """N adapters -> one stacked adapter for multi-adapter batches: per module A [N, I, r_max], B [N, r_max, O].

    Each adapter's scale is folded into its B and ranks are zero-padded to the module's r_max (`pad_ranks`: padded
    columns of A and rows of B are 0, so they add exact zeros); a module absent from an adapter is all-zero in its
    slot. Use with `lora.apply(model, params, stacked, ids, adapter_ids=[...])`: row b gets adapter adapter_ids[b]
    (-1: base model), equal to running that adapter alone.
    """
    ads = _adapters((adapters,))
    paths = _union_paths(ads)
    r_max, dtypes = {}, {}
    for path in paths:
        present = [ab for a in ads if (ab := get_path(a.weights, path, None)) is not None]
        _check_shapes(path, present)
        r_max[targets_lib.module_name(path)] = max(ab["A"].shape[-1] for ab in present)
        dtypes[path] = jnp.result_type(*[ab["A"].dtype for ab in present], *[ab["B"].dtype for ab in present])
    padded = [pad_ranks(_fold(a, dtypes.__getitem__), r_max) for a in ads]
    weights: dict = {}
    for path in paths:
        name, dtype = targets_lib.module_name(path), dtypes[path]
        ref = next(ab for a in ads if (ab := get_path(a.weights, path, None)) is not None)
        i, o = ref["A"].shape[0], ref["B"].shape[-1]
        parts = [get_path(a.weights, path, None) for a in padded]
        As = [jnp.zeros((i, r_max[name]), dtype) if ab is None else ab["A"] for ab in parts]
        Bs = [jnp.zeros((r_max[name], o), dtype) if ab is None else ab["B"] for ab in parts]
        set_path(weights, path, {"A": jnp.stack(As), "B": jnp.stack(Bs)})
    return Adapter(weights, alpha=None, rslora=False, targets=_targets_union(ads))


def unstack(stacked: Adapter, index: int) -> Adapter:
    """Adapter `index` of a `lora.stack` result (scale folded, ranks padded with zeros: same delta)."""
    if not stacked.stacked:
        raise ValueError("unstack needs a stacked adapter (lora.stack)")
    weights: dict = {}
    for path, ab in stacked.modules():
        n = ab["A"].shape[0]
        if not -n <= index < n:
            raise IndexError(f"adapter index {index} out of range for a stack of {n}")
        set_path(weights, path, {"A": ab["A"][index], "B": ab["B"][index]})
    return Adapter(weights, alpha=None, rslora=False, targets=stacked.targets)


MIX_NAME = r"[A-Za-z0-9_.\-]+"  # an adapter's name in a mix


def parse_mix(spec: str, signed: bool = False) -> list[tuple[float, str]]:
    """The mix notation of serve.openai's `model` and train.evaluate's --mix: "a+0.5*b" -> [(1.0, "a"), (0.5, "b")]
    (NAME or WEIGHT*NAME terms joined by '+'; what `combine` takes as weights and adapters). signed: a weight may
    carry a sign ("a+-0.5*b"). ValueError when `spec` is not such a sum."""
    sign = "[-+]?" if signed else ""
    term = re.compile(r"^\s*(?:(" + sign + r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(" + MIX_NAME + r")\s*$")
    terms = []
    for part in spec.split("+") if spec.strip() else [""]:
        m = term.match(part)
        if not m:
            raise ValueError(f"cannot read {spec!r} as a mix: write name or weight*name terms joined by '+', "
                             "e.g. lora_identity+0.5*lora_medical")
        terms.append((float(m.group(1)) if m.group(1) else 1.0, m.group(2)))
    return terms
