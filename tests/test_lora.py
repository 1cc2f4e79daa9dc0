"""lora/: targets, exact adapter algebra, multi-adapter batches, training masks, and PyTorch MiniMind LoRA parity.

Tiny odd-sized configs (hidden 48, 6 heads / 2 kv heads, vocab 97) keep every compile small; compiled forwards
are shared through module-level caches.
"""
from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora
from minimind_jax.keys import LORA_KEY_RE, module_path, torch_to_flax
from conftest import fixture_dir
from minimind_jax.config import MiniMindConfig
from minimind_jax.layers import lora_delta
from minimind_jax.model import MiniMindForCausalLM

SMALL = dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, vocab_size=97)
CONFIGS = {
    "v2": MiniMindConfig(family="minimind2", **SMALL),
    "v3": MiniMindConfig(family="minimind3", **SMALL),
    "moe": MiniMindConfig(family="minimind2", **{**SMALL, "num_hidden_layers": 2}, use_moe=True, n_routed_experts=3,
                          tie_word_embeddings=False),
}
IDS = jnp.asarray(np.random.default_rng(0).integers(0, 97, (3, 11)), jnp.int32)


@functools.lru_cache(maxsize=None)
def setup(name):
    """Model + random params (shapes from an abstract init: no compile; norms ~1, kernels ~N(0, 0.02))."""
    cfg = CONFIGS[name]
    model = MiniMindForCausalLM(cfg)
    shapes = jax.eval_shape(model.init, jax.random.key(0), IDS[:1, :4])["params"]
    rng = np.random.default_rng(sum(map(ord, name)))

    def fill(path, x):
        if jax.tree_util.keystr(path).endswith("['weight']"):
            return jnp.asarray(1 + 0.1 * rng.standard_normal(x.shape), x.dtype)
        return jnp.asarray(0.02 * rng.standard_normal(x.shape), x.dtype)

    return model, jax.tree_util.tree_map_with_path(fill, shapes)


@functools.lru_cache(maxsize=None)
def base_fn(name):
    model, _ = setup(name)
    return jax.jit(lambda p, ids: model.apply({"params": p}, ids).logits)


@functools.lru_cache(maxsize=None)
def lora_fn(name):
    model, _ = setup(name)
    return jax.jit(lambda p, a, ids: lora.apply(model, p, a, ids).logits)


@functools.lru_cache(maxsize=None)
def multi_fn(name):
    model, _ = setup(name)
    return jax.jit(lambda p, a, ids, aid: lora.apply(model, p, a, ids, adapter_ids=aid).logits)


def randomize_b(adapter, seed, std=0.05):
    """A trained-looking adapter: non-zero B everywhere (a fresh one has B = 0)."""
    leaves, tree = jax.tree.flatten(adapter)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [std * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
    return jax.tree.unflatten(tree, new)


def names(adapter):
    return sorted(adapter.ranks)


def deltas(adapter):
    """{module: s*A@B} computed independently in float64 numpy (reference for lora.delta / the algebra)."""
    return {"/".join(p): adapter.scale(ab["A"].shape[-1]) * (np.asarray(ab["A"], np.float64)
                                                            @ np.asarray(ab["B"], np.float64))
            for p, ab in adapter.modules()}


def assert_deltas(got, want, atol=1e-6):
    """Per-module deltas over the union of modules (absent = zero)."""
    for k in set(got) | set(want):
        g = got.get(k, 0.0)
        w = want.get(k, 0.0)
        np.testing.assert_allclose(np.asarray(g + 0 * w), np.asarray(w + 0 * g), atol=atol, rtol=1e-5, err_msg=k)


def add_deltas(*weighted):
    out = {}
    for w, d in weighted:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + w * v
    return out


# ---------------------------------------------------------------------------------------------------- targets
def test_default_targets_are_square_kernels_q_and_o_with_gqa():
    _, params = setup("v2")
    a = lora.init(params, jax.random.key(0), rank=3)
    assert names(a) == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(3) for m in ("q_proj", "o_proj"))
    for p, ab in a.modules():
        assert ab["A"].shape == (48, 3) and ab["B"].shape == (3, 48)
        assert not np.any(np.asarray(ab["B"]))  # MiniMind init: B = 0
    assert a.alpha is None and a.scale(3) == 1.0 and a.targets == "square"
    assert a.num_params() == 6 * 2 * 48 * 3


def test_targets_by_name_regex_all_linear_and_experts():
    _, params = setup("moe")
    a = lora.init(params, jax.random.key(0), rank=2, targets="q_proj,v_proj")
    assert names(a) == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj"))
    assert a.ranks["model.layers.0.self_attn.v_proj"] == 2
    assert a.modules()[1][1]["B"].shape == (2, 16)  # v_proj: 2 kv heads x 8
    everything = lora.init(params, jax.random.key(0), rank=2, targets="all-linear")
    n = names(everything)
    assert "lm_head" not in n and not any(x.endswith("mlp.gate") for x in n)
    assert "model.layers.1.mlp.experts.2.down_proj" in n and "model.layers.0.mlp.shared_experts.0.up_proj" in n
    experts = lora.init(params, jax.random.key(0), rank=2, targets=r"model\.layers\.\d+\.mlp\.experts\.\d+\..*")
    assert len(experts.modules()) == 2 * 3 * 3
    regex = lora.init(params, jax.random.key(0), rank=2, targets=[r"model\.layers\.1\.self_attn\.[qk]_proj"])
    assert names(regex) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.q_proj"]
    with pytest.raises(ValueError, match="q_porj.*matches no kernel"):
        lora.init(params, jax.random.key(0), targets="q_porj")


def test_per_target_rank_and_scales():
    _, params = setup("v3")
    a = lora.init(params, jax.random.key(0), rank={"q_proj": 2, r"model\.layers\.2\..*": 5, "*": 3},
                  targets="q_proj,o_proj,v_proj", alpha=6.0)
    assert a.ranks["model.layers.0.self_attn.q_proj"] == 2
    assert a.ranks["model.layers.2.self_attn.q_proj"] == 2  # first matching pattern wins
    assert a.ranks["model.layers.2.self_attn.o_proj"] == 5
    assert a.ranks["model.layers.1.self_attn.v_proj"] == 3
    assert a.scale(3) == 2.0 and lora.init(params, jax.random.key(0), rank=4, alpha=6.0, rslora=True).scale(4) == 3.0
    with pytest.raises(ValueError, match="no rank given"):
        lora.init(params, jax.random.key(0), rank={"q_proj": 2})
    with pytest.raises(ValueError, match="rank must be positive"):
        lora.init(params, jax.random.key(0), rank=0)


# ----------------------------------------------------------------------------------- forward, merge, unmerge
@pytest.mark.parametrize("name,targets", [("v2", None), ("v3", None), ("moe", "all-linear")])
def test_fresh_adapter_is_bit_identical_to_base(name, targets):
    """B = 0: the branch adds exact zeros. Checked op by op (un-jitted), where the base ops are the very same;
    under jit XLA CPU may fuse/tile the base matmuls differently once the branch exists (1-ulp differences),
    so there the check is allclose. Merging a fresh adapter leaves every kernel bit-identical."""
    model, params = setup(name)
    a = lora.init(params, jax.random.key(1), rank=3, targets=targets, alpha=16.0)
    x = IDS[:2, :7]
    base = model.apply({"params": params}, x).logits
    np.testing.assert_array_equal(np.asarray(lora.apply(model, params, a, x).logits), np.asarray(base))
    merged = lora.merge(params, a)
    chex.assert_trees_all_equal(merged, params)
    jbase = base_fn(name)(params, IDS)
    np.testing.assert_array_equal(np.asarray(base_fn(name)(merged, IDS)), np.asarray(jbase))
    chex.assert_trees_all_close(lora_fn(name)(params, a, IDS), jbase, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name,targets", [("v2", None), ("v3", None), ("moe", "all-linear")])
def test_low_rank_forward_equals_merged_forward(name, targets):
    _, params = setup(name)  # same adapter structure as the fresh-adapter test: reuses its compiled forward
    a = randomize_b(lora.init(params, jax.random.key(2), rank=3, targets=targets, alpha=16.0), 3)
    got = lora_fn(name)(params, a, IDS)
    merged = base_fn(name)(lora.merge(params, a), IDS)
    chex.assert_trees_all_close(got, merged, atol=2e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(got - base_fn(name)(params, IDS)))) > 1e-3  # the adapter does something


def test_merge_unmerge_and_merge_of_sum_is_sequential_merge():
    _, params = setup("v3")
    a = randomize_b(lora.init(params, jax.random.key(4), rank=3, alpha=8.0), 5)
    b = randomize_b(lora.init(params, jax.random.key(6), rank=2, targets="q_proj,v_proj", alpha=4.0, rslora=True), 7)
    merged = lora.merge(params, a)
    chex.assert_trees_all_close(lora.unmerge(merged, a), params, atol=1e-6)
    chex.assert_trees_all_close(lora.merge(params, lora.add(a, b)), lora.merge(merged, b), atol=1e-6)
    # merge computes W + s*A@B in fp32 and changes exactly the adapted kernels
    w = params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    ab = a.weights["model"]["layers_1"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(merged["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"],
                               np.asarray(w) + (8.0 / 3) * np.asarray(ab["A"]) @ np.asarray(ab["B"]), atol=1e-6)
    assert (merged["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"]
            is params["model"]["layers_1"]["self_attn"]["k_proj"]["kernel"])
    # bf16 params: fp32 arithmetic, cast back to the kernel dtype
    p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    m16 = lora.merge(p16, a)
    assert m16["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(
        np.asarray(m16["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]),
        np.asarray((w.astype(jnp.bfloat16).astype(jnp.float32)
                    + lora.delta(a)[("model", "layers_1", "self_attn", "q_proj")]).astype(jnp.bfloat16)))


def test_merge_rejects_mismatched_adapter():
    _, p2 = setup("v2")
    _, pm = setup("moe")
    a = lora.init(pm, jax.random.key(0), rank=2, targets="v_proj")
    bad = lora.Adapter({"model": {"layers_0": {"self_attn": {"v_proj": {"A": jnp.zeros((48, 2)),
                                                                        "B": jnp.zeros((2, 17))}}}}})
    with pytest.raises(ValueError, match="v_proj.*does not fit kernel"):
        lora.merge(p2, bad)
    with pytest.raises(KeyError, match="experts"):
        lora.merge(p2, lora.init(pm, jax.random.key(0), rank=2, targets=r".*\.experts\..*"))
    assert lora.merge(p2, a) is not None  # same shapes (2 kv heads) -> fine


# ----------------------------------------------------------------------------------------------- algebra
@functools.lru_cache(maxsize=None)
def two_adapters():
    _, params = setup("v2")
    a = randomize_b(lora.init(params, jax.random.key(10), rank=3, alpha=12.0), 11)
    b = randomize_b(lora.init(params, jax.random.key(12), rank=2, targets="q_proj,v_proj", alpha=3.0,
                              rslora=True), 13)
    return a, b


def test_concat_is_exact_sum_over_module_union():
    a, b = two_adapters()
    c = lora.concat(a, b)
    assert c.alpha is None and c.targets == "square,q_proj,v_proj"
    assert c.ranks["model.layers.0.self_attn.q_proj"] == 5
    assert c.ranks["model.layers.0.self_attn.o_proj"] == 3 and c.ranks["model.layers.0.self_attn.v_proj"] == 2
    assert_deltas(deltas(c), add_deltas((1, deltas(a)), (1, deltas(b))))
    assert_deltas(deltas(lora.concat([a, b, a])), add_deltas((2, deltas(a)), (1, deltas(b))))
    assert_deltas(deltas(lora.add(a, b)), deltas(c), atol=0)


def test_scale_negate():
    a, _ = two_adapters()
    assert_deltas({"/".join(p): d for p, d in lora.delta(a).items()}, deltas(a))
    s = lora.scale(a, -0.375)
    assert s.alpha == a.alpha and s.ranks == a.ranks
    assert_deltas(deltas(s), add_deltas((-0.375, deltas(a))))
    assert_deltas(deltas(lora.negate(a)), add_deltas((-1, deltas(a))), atol=0)
    zero = deltas(lora.add(a, lora.negate(a)))
    assert max(float(jnp.max(jnp.abs(v))) for v in zero.values()) < 1e-7
    traced = jax.jit(lambda ad, w: lora.scale(ad, w))(a, jnp.float32(2.0))
    assert_deltas(deltas(traced), add_deltas((2, deltas(a))))


def peft_linear(adapters, weights):
    """PEFT's add_weighted_adapter(combination_type="linear") (its _generalized_task_arithmetic_weighted_adapter):
    factors summed (same ranks required), each weighted by sqrt(w_i * scaling_i): A = sum sqrt(w_i s_i) A_i,
    B = sum sqrt(w_i s_i) B_i, the new adapter's alpha = its rank (scaling 1)."""
    out = {}
    for p, _ in adapters[0].modules():
        abs_ = [lora.get_path(ad.weights, p) for ad in adapters]
        g = [np.sqrt(w * ad.scale(ab["A"].shape[-1])) for ad, ab, w in zip(adapters, abs_, weights)]
        A = sum(gi * ab["A"] for gi, ab in zip(g, abs_))
        B = sum(gi * ab["B"] for gi, ab in zip(g, abs_))
        lora.set_path(out, p, {"A": A, "B": B})
    return lora.Adapter(out)


def test_combine_has_no_cross_terms_unlike_peft_linear():
    _, params = setup("v2")
    a = randomize_b(lora.init(params, jax.random.key(20), rank=3, alpha=6.0), 21)
    b = randomize_b(lora.init(params, jax.random.key(22), rank=3, alpha=1.5), 23)  # other scales: 2 and 0.5
    w = [0.7, 0.3]
    exact = add_deltas((w[0], deltas(a)), (w[1], deltas(b)))
    c = lora.combine([a, b], w)
    assert c.ranks["model.layers.0.self_attn.q_proj"] == 6
    assert_deltas(deltas(c), exact)
    peft = deltas(peft_linear([a, b], w))
    s = np.sqrt(w[0] * a.scale(3) * w[1] * b.scale(3))
    for k in exact:  # PEFT's delta = exact + sqrt(w0 s_a w1 s_b) * (A_a @ B_b + A_b @ B_a)
        ab_a = lora.get_path(a.weights, k)
        ab_b = lora.get_path(b.weights, k)
        cross = s * (np.asarray(ab_a["A"]) @ np.asarray(ab_b["B"]) + np.asarray(ab_b["A"]) @ np.asarray(ab_a["B"]))
        np.testing.assert_allclose(np.asarray(peft[k]) - np.asarray(exact[k]), cross, atol=1e-6)
        assert np.linalg.norm(cross) > 0.1 * np.linalg.norm(np.asarray(exact[k]))
    with pytest.raises(ValueError, match="2 adapters but 1 weights"):
        lora.combine([a, b], [1.0])
    assert_deltas(deltas(lora.combine([a, b])), add_deltas((1, deltas(a)), (1, deltas(b))))


def test_svd_truncate_full_rank_and_eckart_young():
    a, b = two_adapters()
    c = lora.combine([a, b], [1.0, -0.5])  # ranks 5 (q), 3 (o), 2 (v)
    full, err = lora.svd_truncate(c, 8)
    assert err < 1e-6 and full.ranks == c.ranks and full.alpha is None
    assert_deltas(deltas(full), deltas(c), atol=2e-6)
    k = 2
    t, err = lora.svd_truncate(c, k)
    assert all(r <= k for r in t.ranks.values())
    dense = {key: np.asarray(v, np.float64) for key, v in deltas(c).items()}
    tail = total = 0.0
    for key, d in dense.items():  # reference: d x d SVD, best rank-k approximation
        u, sv, vt = np.linalg.svd(d)
        best = (u[:, :k] * sv[:k]) @ vt[:k]
        np.testing.assert_allclose(np.asarray(deltas(t)[key]), best, atol=2e-6, err_msg=key)
        tail += np.sum(sv[k:] ** 2)
        total += np.sum(sv ** 2)
    assert err == pytest.approx(np.sqrt(tail / total), rel=1e-4) and err > 0.05
    frob = np.sqrt(sum(np.sum((np.asarray(deltas(t)[key]) - d) ** 2) for key, d in dense.items()))
    assert err == pytest.approx(frob / np.sqrt(total), rel=1e-3)
    scaled, err = lora.svd_truncate(a, 3)  # alpha=12, rank 3: the scale is folded into the factors
    assert err < 1e-6 and scaled.alpha is None
    assert_deltas(deltas(scaled), deltas(a), atol=2e-6)
    zero, err = lora.svd_truncate(lora.init(setup("v2")[1], jax.random.key(0), rank=2), 1)  # B = 0
    assert err == 0.0 and all(not np.any(np.asarray(x)) for x in jax.tree.leaves(zero))
    per = lora.svd_truncate(c, {"q_proj": 1, "*": 8})[0]
    assert per.ranks["model.layers.0.self_attn.q_proj"] == 1 and per.ranks["model.layers.0.self_attn.o_proj"] == 3


# ------------------------------------------------------------------------------------ multi-adapter batches
def test_stack_rows_equal_each_adapter_alone():
    name = "v3"
    _, params = setup(name)
    a = randomize_b(lora.init(params, jax.random.key(30), rank=3, alpha=16.0), 31)
    b = randomize_b(lora.init(params, jax.random.key(32), rank=1, targets="q_proj,v_proj,down_proj"), 33)
    st = lora.stack([a, b])
    ab = st.weights["model"]["layers_0"]["self_attn"]["q_proj"]
    assert ab["A"].shape == (2, 48, 3) and ab["B"].shape == (2, 3, 48)
    assert st.weights["model"]["layers_0"]["mlp"]["down_proj"]["A"].shape == (2, 128 + 64, 1)
    assert_deltas(deltas(lora.unstack(st, 0)), deltas(a))
    assert_deltas(deltas(lora.unstack(st, 1)), deltas(b))
    ids = IDS  # same shapes as the other tests: reuses their compiled single-adapter forwards
    aid = jnp.asarray([1, -1, 0], jnp.int32)
    got = multi_fn(name)(params, st, ids, aid)
    alone = {0: lora_fn(name)(params, a, ids), 1: base_fn(name)(lora.merge(params, b), ids),
             -1: base_fn(name)(params, ids)}
    for row, i in enumerate(aid.tolist()):
        chex.assert_trees_all_close(got[row], alone[i][row], atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(alone[0] - alone[1]))) > 1e-3
    model, _ = setup(name)
    with pytest.raises(ValueError, match="out of range"):
        lora.apply(model, params, st, ids, adapter_ids=[0, 2, -1])
    with pytest.raises(ValueError, match="adapter_ids needs several adapters"):
        lora.apply(model, params, a, ids, adapter_ids=[0, 0, 0])
    with pytest.raises(ValueError, match="needs adapter_ids"):
        lora.apply(model, params, st, ids)
    with pytest.raises(ValueError, match="2 entries but the batch has 3"):
        lora.apply(model, params, st, ids, adapter_ids=[0, 0])
    with pytest.raises(ValueError, match="cannot merge a stacked"):
        lora.merge(params, st)


def test_stack_on_moe_experts_rows_equal_each_adapter_alone():
    """Experts and the router see [B, T, D], so per-row adapters reach expert and router kernels too."""
    model, params = setup("moe")
    a = randomize_b(lora.init(params, jax.random.key(0), rank=2, targets="all-linear"), 1)
    b = randomize_b(lora.init(params, jax.random.key(2), rank=1, targets=r".*\.mlp\.gate"), 3)
    got = lora.apply(model, params, lora.stack([a, b]), IDS, adapter_ids=[0, 1, -1]).logits
    want = [lora.apply(model, params, a, IDS).logits[0], lora.apply(model, params, b, IDS).logits[1],
            model.apply({"params": params}, IDS).logits[2]]
    chex.assert_trees_all_close(got, jnp.stack(want), atol=1e-5, rtol=1e-5)


def test_pad_ranks_keeps_the_delta():
    _, params = setup("v2")
    plain = randomize_b(lora.init(params, jax.random.key(50), rank={"q_proj": 2, "*": 3}), 51)
    p = lora.pad_ranks(plain, 5)
    assert set(p.ranks.values()) == {5} and p.alpha is None and p.targets == plain.targets
    q = "model/layers_0/self_attn/q_proj"
    ab, ref = lora.get_path(p.weights, q), lora.get_path(plain.weights, q)
    assert not np.any(np.asarray(ab["A"][:, 2:])) and not np.any(np.asarray(ab["B"][2:]))
    np.testing.assert_array_equal(np.asarray(ab["A"][:, :2]), np.asarray(ref["A"]))
    assert_deltas(deltas(p), deltas(plain), atol=0)
    # an alpha: its scale alpha/r follows the rank, so padding folds it into B (alpha None, the same delta)
    scaled = randomize_b(lora.init(params, jax.random.key(52), rank=2, alpha=8.0), 53)
    widest = lora.init(params, jax.random.key(54), rank={"q_proj": 4, "*": 2})
    f = lora.pad_ranks(scaled, widest)
    assert f.ranks == widest.ranks and f.alpha is None
    assert_deltas(deltas(f), deltas(scaled), atol=1e-7)
    assert lora.pad_ranks(scaled, 2) is scaled and lora.pad_ranks(scaled, 1) is scaled  # nothing to pad: kept
    raw = lora.pad_ranks(scaled.replace(alpha=None), widest)  # the factors padded, the scale dropped
    assert raw.alpha is None and raw.ranks == widest.ranks
    o = "model/layers_0/self_attn/o_proj"
    np.testing.assert_array_equal(np.asarray(lora.get_path(raw.weights, o)["B"]),
                                  np.asarray(lora.get_path(scaled.weights, o)["B"]))
    with pytest.raises(ValueError, match="no rank given"):
        lora.pad_ranks(plain, {"q_proj": 4})
    with pytest.raises(ValueError, match="reference adapter has no"):
        lora.pad_ranks(lora.init(params, jax.random.key(0), targets="all-linear"), widest)
    st = lora.pad_ranks(lora.stack([plain, scaled]), 6)  # stacked: the rank axis is A's last, B's second to last
    assert lora.get_path(st.weights, "model/layers_1/self_attn/o_proj")["B"].shape == (2, 6, 48)
    assert_deltas(deltas(lora.unstack(st, 1)), deltas(scaled), atol=1e-7)


def test_tree_helpers():
    a = lora.init(setup("v2")[1], jax.random.key(0), rank=2)
    ab = lora.get_path(a.weights, "model/layers_0/self_attn/q_proj")
    assert lora.is_factors(ab) and not lora.is_factors(ab["A"]) and not lora.is_factors({"A": 1})
    assert lora.get_path(a.weights, ("model", "layers_0", "self_attn", "q_proj")) is ab
    assert jax.tree.leaves(jax.tree.map(lambda x: x["A"].shape[-1], a.weights, is_leaf=lora.is_factors)) == [2] * 6
    assert lora.get_path(a.weights, "model/layers_9", None) is None
    assert lora.get_path(a.weights, "model/layers_0/self_attn/q_proj/A/x", "none") == "none"  # a leaf on the way
    with pytest.raises(KeyError, match="model/layers_9/mlp is not in the tree .missing 'layers_9'"):
        lora.get_path(a.weights, "model/layers_9/mlp")
    tree: dict = {}
    lora.set_path(tree, "a/b", 1)
    lora.set_path(tree, ("a", "c"), 2)
    assert tree == {"a": {"b": 1, "c": 2}}
    assert all(type(r) is int for r in a.ranks.values())


# --------------------------------------------------------------------------------------- training masks
def test_trainable_mask_and_optimizer_never_touch_frozen():
    name = "v3"
    model, params = setup(name)
    a = lora.init(params, jax.random.key(40), rank=2)
    tree = {"lora": a, "params": params}
    mask = lora.trainable_mask(tree, extra="norm")
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    norm_keys = [k for k in flat if "norm" in k and "'params'" in k]
    assert norm_keys and all(flat[k] for k in norm_keys)  # input/post-attention/q/k/final norms
    assert any("q_norm" in k for k in norm_keys)
    assert not any(m for k, m in flat.items() if "'params'" in k and "norm" not in k)
    assert all(jax.tree.leaves(mask["lora"]))
    assert all(jax.tree.leaves(lora.trainable_mask(a)))
    with pytest.raises(ValueError, match="nrom.*match no base parameter"):
        lora.trainable_mask(tree, extra="nrom")

    grad_fn = jax.jit(jax.grad(lambda t: lora.apply(model, t["params"], t["lora"], IDS, labels=IDS).loss))
    tx = lora.make_optimizer(optax.adamw(1e-2, weight_decay=0.1), mask)
    opt_state = tx.init(tree)
    update = jax.jit(tx.update)

    new, state = tree, opt_state
    for _ in range(3):
        u, state = update(grad_fn(new), state, new)
        new = optax.apply_updates(new, u)
    for (p, m), x0, x1 in zip(jax.tree_util.tree_flatten_with_path(mask)[0], jax.tree.leaves(tree),
                              jax.tree.leaves(new)):
        if m:
            assert not np.array_equal(np.asarray(x0), np.asarray(x1)), jax.tree_util.keystr(p)
        else:
            np.testing.assert_array_equal(np.asarray(x1), np.asarray(x0), err_msg=jax.tree_util.keystr(p))
    # optimizer state: adam moments only for the trainable leaves
    n_train = sum(int(x.size) for x, m in zip(jax.tree.leaves(tree), jax.tree.leaves(mask)) if m)
    n_state = sum(int(x.size) for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0)
    assert n_state == 2 * n_train
    # why not optax.masked: it passes frozen leaves' raw gradients through unchanged
    masked = optax.masked(optax.adamw(1e-2), mask)
    u, _ = masked.update(grad_fn(tree), masked.init(tree), tree)
    leaked = optax.apply_updates(tree, u)
    assert not np.array_equal(leaked["params"]["model"]["embed_tokens"]["embedding"],
                              params["model"]["embed_tokens"]["embedding"])


def test_partition_roundtrip_and_adapter_only_grad():
    model, params = setup("v2")
    a = randomize_b(lora.init(params, jax.random.key(50), rank=2), 51)
    tree = {"lora": a, "params": params}
    mask = lora.trainable_mask(tree, extra=[r"model\.norm\.weight"])
    trainable, frozen = lora.partition(tree, mask)
    assert trainable["params"]["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"] is None
    chex.assert_trees_all_equal(lora.unpartition(trainable, frozen), tree)
    g = jax.jit(jax.grad(lambda t, f: loss(model, lora.unpartition(t, f))))(trainable, frozen)
    assert g["params"]["model"]["norm"]["weight"].shape == (48,)
    assert len(jax.tree.leaves(g)) == len(jax.tree.leaves(a)) + 1


def loss(model, t):
    return lora.apply(model, t["params"], t["lora"], IDS, labels=IDS).loss


@pytest.mark.parametrize("lead", [(5,), (2, 5), (3, 1, 4)])
def test_lora_delta_gradients_equal_autodiffs(lead):
    """layers.lora_delta's own backward (A's gradient laid out [R, I], then transposed) gives autodiff's gradients
    of (x @ A) @ B for tokens of any leading shape, jitted and vmapped over adapters (a --sweep's members)."""
    ks = jax.random.split(jax.random.key(7), 4)
    x = jax.random.normal(ks[0], lead + (7,))
    a, b = jax.random.normal(ks[1], (7, 3)), jax.random.normal(ks[2], (3, 6))
    w = jax.random.normal(ks[3], lead + (6,))  # a cotangent that is not all ones
    ours = jax.jit(jax.grad(lambda x, a, b: jnp.sum(lora_delta(x, a, b) * w), argnums=(0, 1, 2)))(x, a, b)
    ref = jax.grad(lambda x, a, b: jnp.sum((x @ a) @ b * w), argnums=(0, 1, 2))(x, a, b)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(lora_delta(x, a, b), (x @ a) @ b, rtol=1e-6, atol=1e-6)
    stack = lambda t: jnp.stack([t, 2 * t + 1])
    per = jax.vmap(jax.grad(lambda a, b: jnp.sum(lora_delta(x, a, b) * w), argnums=(0, 1)))(stack(a), stack(b))
    for i in range(2):
        one = jax.grad(lambda a, b: jnp.sum((x @ a) @ b * w), argnums=(0, 1))(stack(a)[i], stack(b)[i])
        chex.assert_trees_all_close(jax.tree.map(lambda g: g[i], per), one, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- PyTorch MiniMind fixtures
def _read_state_dict(path):
    import torch
    return {k: v.float().numpy() for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}


def _params_from_state_dict(sd, cfg):
    params = {}
    for key, v in sd.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        path, transpose = torch_to_flax(key, v.ndim)
        lora.set_path(params, path, jnp.asarray(v.T if transpose else v))
    return params


def _adapter_from_minimind(sd):
    weights = {}
    for key, v in sd.items():
        m = LORA_KEY_RE.match(key)
        assert m, key
        lora.set_path(weights, module_path(m["module"]) + (m["factor"],), jnp.asarray(v.T))
    return lora.Adapter(weights)


@pytest.mark.parametrize("case", ["v2_tiny", "v3_tiny"])
def test_minimind_lora_fixture_logits_and_merge(case):
    base_dir, lora_dir = fixture_dir(case), fixture_dir(case + "_lora")
    cfg = MiniMindConfig.from_json(base_dir / "config.json")
    model = MiniMindForCausalLM(cfg)
    params = _params_from_state_dict(_read_state_dict(base_dir / "model.pth"), cfg)
    adapter = _adapter_from_minimind(_read_state_dict(lora_dir / "lora.pth"))
    # MiniMind's apply_lora rule is ours: same modules as the file (square kernels), rank 4, B non-zero
    assert sorted(lora.select_targets(params)) == sorted(p for p, _ in adapter.modules())
    inputs, expected = np.load(lora_dir / "inputs.npz"), np.load(lora_dir / "expected.npz")
    ids = jnp.asarray(inputs["input_ids"])
    out = jax.jit(lambda p, a, x, y: lora.apply(model, p, a, x, labels=y))(params, adapter, ids,
                                                                          jnp.asarray(inputs["labels"]))
    chex.assert_trees_all_close(out.logits, expected["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(float(out.loss), float(expected["loss"]), rtol=1e-5)
    merged = lora.merge(params, adapter)
    want = _params_from_state_dict(_read_state_dict(lora_dir / "merged.pth"), cfg)
    chex.assert_trees_all_close(merged, want, atol=1e-6, rtol=1e-6)
    chex.assert_trees_all_close(lora.unmerge(merged, adapter), params, atol=1e-6)


def test_optimizer_on_adapter_alone_and_bad_trees():
    _, params = setup("v2")
    a = randomize_b(lora.init(params, jax.random.key(60), rank=2), 61)
    tx = lora.make_optimizer(optax.sgd(0.5), lora.trainable_mask(a))
    g = jax.tree.map(jnp.ones_like, a)
    u, _ = tx.update(g, tx.init(a))
    chex.assert_trees_all_close(optax.apply_updates(a, u), jax.tree.map(lambda x: x - 0.5, a))
    tree = {"lora": a.weights, "params": params}  # a weights dict works too; a callable mask as well
    tx = lora.make_optimizer(optax.sgd(0.5), lambda t: lora.trainable_mask(t, extra=r"^model\.norm\."))
    u, _ = tx.update(jax.tree.map(jnp.ones_like, tree), tx.init(tree))
    new = optax.apply_updates(tree, u)
    np.testing.assert_array_equal(new["params"]["lm_head"]["kernel"] if "lm_head" in params else
                                  new["params"]["model"]["embed_tokens"]["embedding"],
                                  params["model"]["embed_tokens"]["embedding"])
    chex.assert_trees_all_close(new["params"]["model"]["norm"]["weight"], params["model"]["norm"]["weight"] - 0.5)
    with pytest.raises(TypeError, match="expects an Adapter or a dict"):
        lora.trainable_mask(params)
    with pytest.raises(ValueError, match="unexpected top-level keys"):
        lora.trainable_mask({"lora": a, "params": params, "opt": 1})
    with pytest.raises(ValueError, match="not a valid regex"):
        lora.trainable_mask(tree, extra="norm(")
