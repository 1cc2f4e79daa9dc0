"""Attention's implementations against each other: jax.nn.dot_product_attention ("xla", and "cudnn" on a GPU) against
the blocked `_attend`, forward and gradient, with MiniMind's padding, packed segments, GQA and the KV-cache paths.

fp32 parity is 1e-5 (absolute, on values of order 1; run with jax_default_matmul_precision=highest on a GPU, whose
default fp32 matmuls are TF32). Measured on a 2-core x86 CPU: 2e-7 to 6e-7 for the attention alone (forward and
gradient), 6e-7 to 1.2e-6 through the whole model (logits, param gradients, caches). cuDNN's flash attention runs
only in bf16/fp16 on an NVIDIA GPU: its tests skip on a CPU and compare it in bf16 with the "xla" implementation in
bf16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import TINY  # GQA: 3 query heads per kv head
from minimind_jax import MiniMindForCausalLM, init_cache
from minimind_jax import attention as A

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason=f"cuDNN flash attention needs an NVIDIA GPU; the backend is "
                                                  f"{jax.default_backend()}")
TOL = 1e-5


def _close(got, ref, tol=TOL):
    """Every leaf: max |got - ref| <= tol * max(1, max |ref|) (1e-5 absolute on values of order 1, relative to the
    leaf's largest value above that: float32 sums of many terms in another order)."""
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        assert g.shape == r.shape
        err, scale = np.abs(g - r).max(), max(1.0, np.abs(r).max())
        assert err <= tol * scale, f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def _mask(b, t, seed, pad=True, segments=True):
    """Causal + packed segments (3 samples a row, unequal) + left padding as MiniMind's attention_mask."""
    rng = np.random.default_rng(seed)
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = None
    if segments:
        cuts = np.sort(rng.choice(np.arange(1, t), size=(b, 2), replace=False), axis=1)
        seg = jnp.asarray((np.arange(t)[None, :, None] >= cuts[:, None, :]).sum(-1) + 1)
    am = None
    if pad:
        am = jnp.asarray(np.arange(t)[None, :] >= np.array([3, 0])[:b, None]).astype(jnp.int32)  # row 0: 3 pads
    return A.attention_mask_for(idx, idx, am, seg, seg)


@pytest.mark.parametrize("t", [20, 150], ids=["one_block", "query_blocks"])
def test_dot_product_xla_matches_blocked_attend(t):
    """jax.nn.dot_product_attention(implementation="xla") on [B, T, N, H] equals the blocked `_attend` on the
    heads-major layout (one block, and T > QUERY_BLOCK as the Attention module splits it), forward and the
    gradient w.r.t. q, k and v under a random cotangent; GQA, padding (-1e9 bias) and segments."""
    b, n, k, h = 2, 6, 2, 16
    kq, kk, kv, kc = jax.random.split(jax.random.key(t), 4)
    q = jax.random.normal(kq, (b, t, n, h))
    key, val = jax.random.normal(kk, (b, t, k, h)), jax.random.normal(kv, (b, t, k, h))
    cot = jax.random.normal(kc, (b, t, n, h))
    mask = _mask(b, t, seed=t)

    def blocked(q, key, val):
        qg = q.reshape(b, t, k, n // k, h)
        outs = []
        for s0 in range(0, t, A.QUERY_BLOCK):
            e = min(t, s0 + A.QUERY_BLOCK)
            outs.append(A._attend(qg[:, s0:e], *A.heads_major(key[:, :e], val[:, :e]), mask.block(s0, e, e),
                                  jnp.float32))
        return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)

    def xla(q, key, val):
        return A.dot_product(q, key, val, mask, "xla", causal=True)

    outs, grads = {}, {}
    for name, f in (("blocked", blocked), ("xla", xla)):
        out, vjp = jax.vjp(jax.jit(f), q, key, val)
        outs[name], grads[name] = out, vjp(cot)
    _close(outs["xla"], outs["blocked"])
    _close(grads["xla"], grads["blocked"])


@pytest.fixture(scope="module")
def tiny():
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(lambda key: MiniMindForCausalLM(TINY).init(key, ids)["params"])(jax.random.key(0))
    return jax.tree.map(lambda x: x * 2.0, params)  # logits spread (std 0.56), not near-uniform


def _model_loss_and_grads(params, impl, ids, **kw):
    model = MiniMindForCausalLM(TINY, attention=impl)

    @jax.jit
    def f(p):
        out = model.apply({"params": p}, ids, labels=ids, **kw)
        return out.loss, out.logits

    (loss, logits), g = jax.value_and_grad(f, has_aux=True)(params)
    return loss, logits, g


def test_model_packed_rows_xla_matches_blocked(tiny):
    """The whole model on packed training rows (T=150 > QUERY_BLOCK, 3 samples a row, positions restarting):
    logits, loss and the gradient of every param agree between "xla" and "blocked"."""
    b, t = 2, 150
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 97, (b, t)), jnp.int32)
    seg = jnp.asarray(np.repeat([[1] * 40 + [2] * 70 + [3] * 40], b, 0))
    pos = jnp.asarray(np.repeat([list(range(40)) + list(range(70)) + list(range(40))], b, 0))
    ref = _model_loss_and_grads(tiny, "blocked", ids, positions=pos, segment_ids=seg)
    got = _model_loss_and_grads(tiny, "xla", ids, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(float(got[0]), float(ref[0]), rtol=1e-6)
    _close(got[1], ref[1])
    _close(got[2], ref[2])


def test_model_padded_rows_xla_matches_blocked(tiny):
    """MiniMind's left padding (attention_mask: the additive -1e9 term as the bias), every position compared,
    the padded ones too (they attend only to pads: MiniMind's constant decides what they compute)."""
    ids = jnp.asarray(np.random.default_rng(2).integers(3, 97, (2, 17)), jnp.int32)
    am = jnp.asarray([[0] * 5 + [1] * 12, [1] * 17], jnp.int32)
    ref, got = (jax.jit(MiniMindForCausalLM(TINY, attention=impl).apply)({"params": tiny}, ids, am).logits
                for impl in ("blocked", "xla"))
    _close(got, ref)


def _decode(params, impl, ids, am, prefill: int, cache_len: int):
    """Prefill `prefill` tokens into a cache of `cache_len`, then one token at a time: -> (logits, cache)."""
    model = MiniMindForCausalLM(TINY, attention=impl)
    step = jax.jit(lambda c, x: model.apply({"params": params}, x, attention_mask=am, cache=c))
    out = step(init_cache(TINY, ids.shape[0], cache_len), ids[:, :prefill])
    logits, cache = [out.logits], out.cache
    for i in range(prefill, ids.shape[1]):
        out = step(cache, ids[:, i:i + 1])
        logits.append(out.logits)
        cache = out.cache
    return jnp.concatenate(logits, axis=1), cache


def test_kv_cache_decode_xla_matches_blocked(tiny):
    """generate's path: a left-padded prefill into the cache, then single-token steps reading the cache
    (heads-major [B*K, H, S], read as [B, S, K, H] by the xla implementation); logits and cache agree."""
    ids = jnp.asarray(np.random.default_rng(3).integers(3, 97, (2, 14)), jnp.int32)
    am = jnp.asarray([[0] * 3 + [1] * 17, [1] * 20], jnp.int32)  # covers all 20 cache slots, as generate's
    ref = _decode(tiny, "blocked", ids, am, prefill=9, cache_len=20)
    got = _decode(tiny, "xla", ids, am, prefill=9, cache_len=20)
    _close(got, ref)


def test_per_row_cache_index_xla_matches_blocked(tiny):
    """The serving engine's step: every row at its own cache position (index [B]), one new token each."""
    ids = jnp.asarray(np.random.default_rng(4).integers(3, 97, (3, 10)), jnp.int32)
    _, cache = _decode(tiny, "blocked", ids, None, prefill=10, cache_len=16)
    cache = {**cache, "index": jnp.asarray([4, 10, 7], jnp.int32)}  # rows 0 and 2 continue from shorter prompts
    new = jnp.asarray([[5], [6], [7]], jnp.int32)
    outs = {impl: jax.jit(lambda c, x, impl=impl: MiniMindForCausalLM(TINY, attention=impl).apply(
        {"params": tiny}, x, cache=c))(cache, new) for impl in ("blocked", "xla")}
    ref, got = outs["blocked"], outs["xla"]
    _close((got.logits, got.cache), (ref.logits, ref.cache))


def test_choose_implementation(monkeypatch):
    """auto: blocked on a CPU; on a GPU cuDNN for bf16/fp16 rows without a cache and with even lengths, else xla;
    dropout needs the blocked form; $MINIMIND_ATTENTION is the default of modules built without a choice."""
    kw = dict(head_dim=64, t=340, s=340, cached=False, dropout=False)
    monkeypatch.delenv(A.ENV, raising=False)
    monkeypatch.setattr(A.jax, "default_backend", lambda: "cpu")
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **kw) == "blocked"
    assert A.choose_implementation("xla", dtype=jnp.float32, **kw) == "xla"
    monkeypatch.setattr(A.jax, "default_backend", lambda: "gpu")
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **kw) == "cudnn"
    assert A.choose_implementation("auto", dtype=jnp.float32, **kw) == "xla"  # cuDNN's flash attention: 16-bit
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **{**kw, "t": 1, "s": 64, "cached": True}) == "xla"
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **{**kw, "t": 339, "s": 339}) == "xla"
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **{**kw, "head_dim": 12}) == "xla"
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **{**kw, "dropout": True}) == "blocked"
    monkeypatch.setenv(A.ENV, "blocked")
    assert A.choose_implementation(None, dtype=jnp.bfloat16, **kw) == "blocked"
    assert A.choose_implementation("xla", dtype=jnp.bfloat16, **kw) == "xla"  # an explicit choice wins
    with pytest.raises(ValueError, match="dropout"):
        A.choose_implementation("cudnn", dtype=jnp.bfloat16, **{**kw, "dropout": True})
    monkeypatch.setenv(A.ENV, "flash")
    with pytest.raises(ValueError, match="MINIMIND_ATTENTION"):
        A.choose_implementation(None, dtype=jnp.bfloat16, **kw)


# ------------------------------------------------------------------------------------------- cuDNN (GPU only)
def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


@needs_gpu
def test_cudnn_matches_xla_in_bf16():
    """cuDNN's flash attention (causal, GQA, padding bias, segment mask) against the "xla" implementation, both
    in bf16, forward and gradient: max error within 2% of the largest value (bf16 has 8 significant bits; the
    bound is not yet measured on a GPU, loose by design)."""
    b, t, n, k, h = 2, 128, 8, 2, 64
    kq, kk, kv, kc = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (b, t, n, h), jnp.bfloat16)
    key, val = jax.random.normal(kk, (b, t, k, h), jnp.bfloat16), jax.random.normal(kv, (b, t, k, h), jnp.bfloat16)
    cot = jax.random.normal(kc, (b, t, n, h), jnp.bfloat16)
    mask = _mask(b, t, seed=5)
    res = {}
    for impl in ("xla", "cudnn"):
        f = jax.jit(lambda q, key, val, impl=impl: A.dot_product(q, key, val, mask, impl, causal=True))
        out, vjp = jax.vjp(f, q, key, val)
        res[impl] = (out, *vjp(cot))
    for got, ref in zip(res["cudnn"], res["xla"]):
        assert _rel_err(got, ref) < 2e-2


@needs_gpu
def test_cudnn_model_matches_pytorch_fixture():
    """The fixture model (head_dim 8, T=16) in bf16 with cuDNN's attention: logits within the bf16 bound of
    test_model's bf16 test (0.1) of PyTorch MiniMind's fp32 logits, and auto picks cuDNN for these rows."""
    from conftest import fixture_dir
    from convert import load_model

    for case in ("v2_tiny", "v3_tiny"):
        d = fixture_dir(case)
        config, params = load_model(d / "model.safetensors")
        inp, exp = dict(np.load(d / "inputs.npz")), dict(np.load(d / "expected.npz"))
        assert A.choose_implementation(None, dtype=jnp.bfloat16, head_dim=config.head_dim, t=16, s=16,
                                       cached=False, dropout=False) == "cudnn"
        out = MiniMindForCausalLM(config, dtype=jnp.bfloat16, attention="cudnn").apply(
            {"params": params}, inp["input_ids"])
        assert np.abs(np.asarray(out.logits) - exp["logits"]).max() < 0.1
