"""generate(): MiniMind's greedy/sampling decode against the PyTorch fixtures and against references written here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from conftest import TINY, fixture_dir
from minimind_jax import MiniMindForCausalLM, init_cache
from minimind_jax.generate import (Knobs, Static, _decode, _prefill, apply_penalty, filter_logits, generate,
                                   generate_stream, select_tokens)


def _load(case):
    from convert.model_io import load_model

    d = fixture_dir(case)
    config, params = load_model(d / "model.safetensors")
    return config, params, dict(np.load(d / "inputs.npz")), dict(np.load(d / "expected.npz"))


@pytest.fixture(scope="module", params=["v2_tiny", "v3_tiny"])
def fixture_case(request):
    return _load(request.param)


@pytest.fixture(scope="module")
def tiny():
    ids = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(lambda k: MiniMindForCausalLM(TINY).init(k, ids)["params"])(jax.random.key(0))
    # spread the logits (default init N(0, 0.02) gives near-ties that make argmax comparisons meaningless)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 12.0 if p[-1].key in ("kernel", "embedding") else x, params)
    return TINY, params


def _prompts(seed, b, t, v=TINY.vocab_size):
    return np.random.default_rng(seed).integers(3, v, (b, t)).astype(np.int32)


# --------------------------------------------------------------------------------------------- fixtures (PyTorch)
@pytest.mark.parametrize("bucket", [True, False])
def test_greedy_matches_pytorch_minimind(fixture_case, bucket):
    config, params, inp, exp = fixture_case
    out = generate(params, config, inp["input_ids"], max_new_tokens=8, do_sample=False, bucket=bucket)
    assert out.shape == (2, 24) and out.dtype == inp["input_ids"].dtype
    np.testing.assert_array_equal(out[:, :16], inp["input_ids"])
    np.testing.assert_array_equal(out[:, 16:], exp["greedy_ids"])


def test_kv_cache_logits_match_pytorch_steps(fixture_case):
    config, params, inp, exp = fixture_case
    ids = jnp.asarray(inp["input_ids"])
    mask = jnp.ones((2, 16))

    @jax.jit
    def step(cache, tokens):
        out = MiniMindForCausalLM(config).apply({"params": params}, tokens, attention_mask=mask, cache=cache)
        return out.cache, out.logits

    cache, first = jax.jit(lambda c, t: step(c, t))(init_cache(config, 2, 16), ids[:, :12])  # prefill 12
    logits = [first]
    for t in range(12, 16):  # then 4 single steps
        cache, lg = step(cache, ids[:, t:t + 1])
        logits.append(lg)
    np.testing.assert_allclose(np.concatenate(logits, axis=1), exp["logits_step"], atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------- greedy references
def _penalise(x, row, p):
    x = x.copy()
    for tok in np.unique(row):
        x[tok] = x[tok] / p if x[tok] > 0 else x[tok] * p
    return x


@jax.jit
def _full_logits(params, ids):
    return MiniMindForCausalLM(TINY).apply({"params": params}, ids).logits


GREEDY = dict(do_sample=False, eos_token_id=None)  # tests share one compiled (B=2, buckets 16+16) greedy loop


@pytest.mark.parametrize("penalty", [1.0, 1.7])
def test_greedy_equals_argmax_of_full_forwards(tiny, penalty):
    config, params = tiny
    ids = _prompts(1, 2, 7)
    out = generate(params, config, ids, max_new_tokens=6, repetition_penalty=penalty, **GREEDY)
    ref = np.zeros((2, 13), np.int32)
    ref[:, :7] = ids
    for t in range(7, 13):  # no cache: the whole sequence again every step (causal: right zeros do not matter)
        last = np.asarray(_full_logits(params, jnp.asarray(ref)))[:, t - 1]
        ref[:, t] = [np.argmax(_penalise(last[b] / 0.85, ref[b, :t], penalty)) for b in range(2)]
    np.testing.assert_array_equal(out, ref)


def test_left_padding_equals_unpadded_rows(tiny):
    """MiniMind does not shift positions for left pads: a row with k pads puts its tokens at positions k.. .
    RoPE depends only on position differences, so the padded row matches the unpadded one up to rounding."""
    config, params = tiny
    a, b = _prompts(2, 1, 9)[0], _prompts(3, 1, 5)[0]
    batch = np.stack([a, np.concatenate([np.zeros(4, np.int32), b])])
    mask = np.array([[1] * 9, [0] * 4 + [1] * 5])
    out = generate(params, config, batch, attention_mask=mask, max_new_tokens=7, **GREEDY)
    alone_a = generate(params, config, np.stack([a, a]), max_new_tokens=7, **GREEDY)
    alone_b = generate(params, config, np.stack([b, b]), max_new_tokens=7, **GREEDY)
    np.testing.assert_array_equal(out[0], alone_a[0])
    np.testing.assert_array_equal(out[1, 4:], alone_b[0])
    # logits agree to rounding
    full = np.asarray(MiniMindForCausalLM(config).apply(
        {"params": params}, jnp.asarray(batch), attention_mask=jnp.asarray(mask)).logits)
    one = np.asarray(_full_logits(params, jnp.asarray(np.stack([b, b]))))
    np.testing.assert_allclose(full[1, 4:], one[0], atol=2e-4, rtol=1e-4)


def test_eos_pads_rows_and_stops_when_all_finished(tiny):
    config, params = tiny
    ids = _prompts(4, 2, 6)
    free = generate(params, config, ids, max_new_tokens=10, **GREEDY)
    eos = int(free[0, 6 + 2])  # row 0's third new token
    one = generate(params, config, ids[[0, 0]], max_new_tokens=10, do_sample=False, eos_token_id=eos)
    first = int(np.argmax(free[0, 6:] == eos))
    assert one.shape == (2, 6 + first + 1) and (one[:, -1] == eos).all()  # stopped once every row finished
    both = generate(params, config, ids, max_new_tokens=10, do_sample=False, eos_token_id=eos)
    steps = [int(np.argmax(r == eos)) + 1 if (r == eos).any() else 10 for r in free[:, 6:]]
    assert both.shape == (2, 6 + max(steps))
    for r in range(2):  # each row: its own tokens up to its eos, then eos to the end
        k = steps[r]
        np.testing.assert_array_equal(both[r, :6 + k], free[r, :6 + k])
        assert (both[r, 6 + k:] == eos).all()


# --------------------------------------------------------------------------------------------- sampling
@pytest.mark.slow
def test_sampling_reproducible_per_seed_and_stream_matches(tiny):
    config, params = tiny
    ids = _prompts(5, 2, 5)
    kw = dict(max_new_tokens=21, temperature=1.3, top_p=0.9, top_k=20, eos_token_id=None)
    a = generate(params, config, ids, seed=7, **kw)
    np.testing.assert_array_equal(a, generate(params, config, ids, seed=7, **kw))
    assert not np.array_equal(a, generate(params, config, ids, seed=8, **kw))
    # streaming (cache grows 4 -> 8 -> 16 -> 32 new slots) yields the same tokens in pieces
    pieces = list(generate_stream(params, config, ids, seed=7, chunk=3, initial_new=4, **kw))
    assert all(1 <= p.shape[1] <= 3 for p in pieces)
    np.testing.assert_array_equal(np.concatenate([ids] + pieces, axis=1), a)


def _ref_filter(x, top_k, top_p):
    """MiniMind's top-k / top-p in numpy (stable descending sort)."""
    x = x.astype(np.float64).copy()
    if top_k > 0:
        kth = np.sort(x)[::-1][min(top_k, len(x)) - 1]
        x[x < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-x, kind="stable")
        s = x[order]
        p = np.exp(s - s.max())
        cum = np.cumsum(p / p.sum())
        rm = cum > top_p
        rm[1:], rm[0] = rm[:-1].copy(), False
        x[order[rm]] = -np.inf
    return x


CRAFTED = [  # (logits, top_k, top_p)
    (np.array([3.0, 1.0, 2.5, -1.0, 0.5, 2.9, -4.0, 0.0, 1.2, 2.0]), 0, 0.7),
    (np.array([3.0, 1.0, 2.5, -1.0, 0.5, 2.9, -4.0, 0.0, 1.2, 2.0]), 4, 1.0),
    (np.array([3.0, 1.0, 2.5, -1.0, 0.5, 2.9, -4.0, 0.0, 1.2, 2.0]), 5, 0.8),
    (np.array([1.0, 2.0, 2.0, 2.0, 0.0, -1.0, 2.0, 0.5]), 2, 1.0),  # tie at the k-th value: all ties kept
    (np.array([5.0, 0.0, 0.0, 0.0, 0.0, 0.0]), 3, 0.5),  # first token alone exceeds top_p: still kept
]


@pytest.mark.parametrize("logits, top_k, top_p", CRAFTED)
def test_filter_matches_minimind_definitions(logits, top_k, top_p):
    got = np.asarray(filter_logits(jnp.asarray(logits[None], jnp.float32), top_k, top_p))[0]
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(_ref_filter(logits, top_k, top_p)))


def test_repetition_penalty_and_temperature_order():
    x = jnp.array([[2.0, -2.0, 1.0, -0.5]])
    seen = jnp.array([[True, True, False, False]])
    got = apply_penalty(x, seen, 0.5, 2.0)  # /T first, then score>0 ? s/p : s*p on seen ids
    np.testing.assert_allclose(np.asarray(got), [[2.0, -8.0, 2.0, -1.0]])


def _sample_many(logits, top_k, top_p, n=6000, seen=None):
    x = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, len(logits)))
    seen = jnp.zeros(x.shape, bool) if seen is None else seen
    knobs = Knobs(jnp.float32(1.0), jnp.float32(top_p), jnp.float32(1.0), jnp.int32(-1))
    static = Static(True, top_k, top_p < 1.0, False)
    return np.asarray(jax.jit(select_tokens, static_argnums=4)(x, seen, jax.random.key(0), knobs, static))


@pytest.mark.parametrize("logits, top_k, top_p", CRAFTED + [
    (np.linspace(0.0, 0.3, 300), 0, 0.5),  # flat: the nucleus is wider than 128 candidates -> full-sort path
    (np.linspace(2.0, -2.0, 200), 150, 0.9),  # top_k above the candidate count
    (np.linspace(2.0, -2.0, 50), 0, 1.0),  # plain softmax
])
def test_sampling_distribution(logits, top_k, top_p):
    ref = _ref_filter(logits, top_k, top_p)
    p = np.exp(ref - ref[np.isfinite(ref)].max())
    p /= p.sum()
    got = _sample_many(logits, top_k, top_p)
    assert np.isfinite(ref[got]).all(), "sampled a removed token"
    freq = np.bincount(got, minlength=len(logits)) / len(got)
    assert np.abs(freq - p).max() < 0.03


def test_bucketing_reuses_compiled_code(tiny):
    config, params = tiny
    generate(params, config, _prompts(6, 2, 5), max_new_tokens=9, do_sample=False)
    n_pre, n_dec = _prefill._cache_size(), _decode._cache_size()
    for t, new in ((7, 12), (11, 16), (3, 10)):  # same buckets (16, 16): nothing new to compile
        generate(params, config, _prompts(t, 2, t), max_new_tokens=new, do_sample=False)
    assert (_prefill._cache_size(), _decode._cache_size()) == (n_pre, n_dec)


# --------------------------------------------------------------------------------------------- adapters
def _random_adapter(params, seed, rank, alpha=None):
    a = lora.init(params, jax.random.key(seed), rank=rank, alpha=alpha)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 64))
    w = jax.tree.map(lambda x: x, a.weights)
    for path, ab in a.modules():
        node = w
        for p in path:
            node = node[p]
        node["B"] = 1.5 * jax.random.normal(next(keys), ab["B"].shape)
        node["A"] = 1.5 * jax.random.normal(next(keys), ab["A"].shape)
    return a.replace(weights=w)


@pytest.mark.slow
def test_multi_adapter_rows_equal_single_adapter_runs(tiny):
    config, params = tiny
    a1, a2 = _random_adapter(params, 1, 3), _random_adapter(params, 2, 5, alpha=10.0)  # ranks/scales differ
    ids = _prompts(7, 2, 6)
    kw = dict(max_new_tokens=8, **GREEDY)
    base = generate(params, config, ids, **kw)
    r1 = generate(lora.merge(params, a1), config, ids, **kw)  # merged into params
    r2 = generate(params, config, ids, lora=lora.collection(a2), **kw)  # branch form, every row
    assert not np.array_equal(r1, base) and not np.array_equal(r2, base)  # the adapters matter
    mixed = generate(params, config, ids, lora=lora.collection([a1, a2], [0, 1], batch=2), **kw)  # shared base, per row
    np.testing.assert_array_equal(mixed, np.stack([r1[0], r2[1]]))
    mixed = generate(params, config, ids, lora=lora.collection([a1, a2], [1, -1], batch=2), **kw)
    np.testing.assert_array_equal(mixed, np.stack([r2[0], base[1]]))


def test_bad_inputs_have_clear_errors(tiny):
    config, params = tiny
    ids = _prompts(8, 2, 4)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(params, config, ids, attention_mask=np.ones((2, 5)), max_new_tokens=2)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(params, config, ids + 1000, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        generate(params, config, ids[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        generate(params, config, ids, max_new_tokens=2, temperature=0.0)
    a = _random_adapter(params, 1, 2)
    with pytest.raises(ValueError, match="adapter_ids"):
        lora.collection([a, a])
    with pytest.raises(ValueError, match=r"\[2\] out of range"):
        lora.collection([a, a], [0, 2], batch=2)
    with pytest.raises(ValueError, match="2 rows"):
        lora.collection([a, a], [0, 1, 1], batch=2)
    with pytest.raises(ValueError, match="holds 3 rows"):
        generate(params, config, ids, lora=lora.collection([a, a], [0, 1, 1]), max_new_tokens=2)
    assert generate(params, config, ids, max_new_tokens=0).shape == ids.shape


def test_chat_cli_runs_without_stdin(capsys, monkeypatch):
    from serve import chat

    monkeypatch.setattr("sys.stdin", None)
    chat.main(["--hidden_size", "48", "--num_hidden_layers", "1", "--prompt", "你好", "--max_new_tokens", "5",
               "--seed", "0", "--top_p", "0.9"])
    out = capsys.readouterr()
    assert "💬: 你好" in out.out and "🧠: " in out.out and "[Speed]" in out.out and "RANDOM-INIT" in out.err
