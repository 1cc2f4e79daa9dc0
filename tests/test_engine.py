"""serve.engine in-process: continuous batching gives every request what `generate` gives it alone (greedy and
sampled with a seed, adapters and mixes per row, prompts of many lengths sharing slots), and the adapter stack keeps
an unloaded adapter for the requests that still use it."""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from conftest import TINY
from minimind_jax import MiniMindForCausalLM
from minimind_jax.generate import generate
from serve.adapters import AdapterStack
from serve.engine import ContextError, Engine, Sampling


@pytest.fixture(scope="module")
def tiny():
    params = jax.jit(lambda k: MiniMindForCausalLM(TINY).init(k, jnp.zeros((1, 4), jnp.int32))["params"])(
        jax.random.key(0))
    params = jax.tree_util.tree_map_with_path(  # spread the logits: no near-ties in greedy comparisons
        lambda p, x: x * 12.0 if p[-1].key in ("kernel", "embedding") else x, params)

    def adapter(seed, rank, targets):
        a = lora.init(params, jax.random.key(seed), rank=rank, targets=targets, alpha=2 * rank)
        w = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape) * 0.3, a.weights)
        return lora.Adapter(w, alpha=a.alpha, rslora=False, targets=a.targets)

    return params, {"a": adapter(1, 4, "square"), "b": adapter(5, 8, "all-linear")}


class Collect:
    def __init__(self, expected: int):
        self.tokens, self.reasons, self.left = {}, {}, threading.Semaphore(0)

    def sink(self, key):
        outer = self

        class Sink:
            def __call__(self, token):
                outer.tokens.setdefault(key, []).append(int(token))
                return True

            def done(self, reason):
                outer.reasons[key] = reason
                outer.left.release()
        return Sink()


@pytest.mark.slow
def test_every_request_gets_what_generate_gives_it_alone(tiny):
    params, adapters = tiny
    engine = Engine(params, TINY, max_batch=4, max_seq_len=128, eos_token_id=None)
    for name, a in adapters.items():
        engine.adapters.add(name, a)
    models = [None, "a", "b", "a+0.5*b"]
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(11):  # more requests than slots: slots are reused, the cache grows past 64 and shrinks again
        prompt = rng.integers(0, TINY.vocab_size, int(rng.integers(3, 70))).tolist()
        sampling = Sampling(max_tokens=int(rng.integers(5, 40)), temperature=0.0 if i % 2 == 0 else 0.9, seed=i,
                            top_k=[50, 0, 10][i % 3], top_p=[0.9, 1.0][i % 2], repetition_penalty=[1.0, 1.3][i % 2])
        jobs.append((prompt, models[i % 4], sampling))
    out = Collect(len(jobs))
    engine.start()
    try:
        for i, (prompt, model, sampling) in enumerate(jobs):
            engine.submit(prompt, model, sampling, out.sink(i))
        for _ in jobs:
            assert out.left.acquire(timeout=300)
    finally:
        engine.stop()
    merged = {None: params, "a": lora.merge(params, adapters["a"]), "b": lora.merge(params, adapters["b"]),
              "a+0.5*b": lora.merge(params, lora.combine([adapters["a"], adapters["b"]], [1.0, 0.5]))}
    for i, (prompt, model, s) in enumerate(jobs):
        ref = generate(merged[model], TINY, np.asarray([prompt]), max_new_tokens=s.max_tokens,
                       do_sample=s.temperature > 0, temperature=s.temperature or 1.0, top_p=s.top_p, top_k=s.top_k,
                       repetition_penalty=s.repetition_penalty, eos_token_id=None, seed=s.seed)
        assert out.tokens[i] == ref[0, len(prompt):].tolist(), (i, model, s)
        assert out.reasons[i] == "length"
    assert engine.stats["steps"] < sum(s.max_tokens for _, _, s in jobs)  # requests did share steps
    assert engine.adapters.compiles == 2  # the stack grew twice: b's modules, then the mix's rank (4 + 8 > 8)


def test_requests_that_do_not_fit_are_refused_before_queueing(tiny):
    params, _ = tiny
    engine = Engine(params, TINY, max_batch=2, max_seq_len=32)
    with pytest.raises(ContextError):
        engine.submit(list(range(32)))
    with pytest.raises(ContextError):
        engine.submit(list(range(10)), sampling=Sampling(max_tokens=23))
    with pytest.raises(KeyError):
        engine.submit([1, 2], adapter="missing")
    with pytest.raises(ValueError):
        engine.submit([1, 200])
    with pytest.raises(ValueError):
        Sampling(max_tokens=0)
    assert not engine.waiting


def test_an_unloaded_adapter_stays_for_the_requests_that_hold_it(tiny):
    params, adapters = tiny
    stack = AdapterStack(params, TINY, capacity=2)
    stack.add("a", adapters["a"])
    key, handle = stack.hold("a")
    stack.remove("a")
    with pytest.raises(KeyError):
        stack.hold("a")
    stack.add("a", adapters["b"])  # a new "a" takes another index; the held one keeps its own
    _, new = stack.hold("a")
    assert new.index != handle.index
    arrays = stack.arrays()
    q = arrays.weights["model"]["layers_0"]["self_attn"]["q_proj"]
    np.testing.assert_allclose(q["A"][handle.index, :, :4], adapters["a"].weights["model"]["layers_0"]["self_attn"]
                               ["q_proj"]["A"])
    stack.release(handle)  # its index is free now
    stack.add("c", adapters["a"])
    assert stack.hold("c")[1].index == handle.index


def test_mix_names():
    parse_mix = lambda spec: lora.parse_mix(spec, signed=True)  # what the engine reads a model string with
    assert parse_mix("a+0.5*b") == [(1.0, "a"), (0.5, "b")]
    assert parse_mix(" lora_x + 2e-1 * lora-y ") == [(1.0, "lora_x"), (0.2, "lora-y")]
    assert parse_mix("a+-1*b") == [(1.0, "a"), (-1.0, "b")]  # b taken away
    for bad in ("a+", "*b", "a--1*b", "a b"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_a_failing_prefill_ends_its_request_and_the_engine_keeps_serving(tiny, monkeypatch):
    from serve import programs

    params, _ = tiny
    engine = Engine(params, TINY, max_batch=2, max_seq_len=64, eos_token_id=None)
    real, calls = programs.prefill, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(*args, **kwargs)

    monkeypatch.setattr(programs, "prefill", flaky)
    out = Collect(2)
    engine.start()
    try:
        engine.submit([1, 2, 3], sampling=Sampling(max_tokens=3, temperature=0), sink=out.sink("first"))
        assert out.left.acquire(timeout=120)
        engine.submit([1, 2, 3], sampling=Sampling(max_tokens=3, temperature=0), sink=out.sink("second"))
        assert out.left.acquire(timeout=120)
    finally:
        engine.stop()
    assert out.reasons == {"first": "error", "second": "length"} and len(out.tokens["second"]) == 3
    assert "device lost" in repr(engine.error)


@pytest.mark.slow
def test_after_compile_all_serving_compiles_nothing(tiny):
    """compile_all covers every program a request can need (all row buckets, cache lengths, prompt buckets and the
    copies between them): requests of many lengths, adapters, sampling settings and arrival patterns compile
    nothing new."""
    from serve import programs

    params, adapters = tiny
    engine = Engine(params, TINY, max_batch=4, max_seq_len=128, eos_token_id=None)
    engine.adapters.add("a", adapters["a"])
    engine.adapters.add("b", adapters["b"])
    engine.compile_all()
    names = ("step", "prefill", "select", "insert", "move", "resize")
    before = {n: getattr(programs, n)._cache_size() for n in names}
    rng = np.random.default_rng(1)
    out = Collect(9)
    engine.start()
    try:
        for i in range(9):
            prompt = rng.integers(0, TINY.vocab_size, int(rng.integers(1, 100))).tolist()
            sampling = Sampling(max_tokens=int(rng.integers(1, 128 - len(prompt) + 1)), seed=i,
                                temperature=0.0 if i % 3 == 0 else 0.85)
            engine.submit(prompt, [None, "a", "b"][i % 3], sampling, out.sink(i))
        for _ in range(9):
            assert out.left.acquire(timeout=300)
    finally:
        engine.stop()
    assert {n: getattr(programs, n)._cache_size() for n in names} == before
    assert set(out.reasons.values()) == {"length"}


def test_requests_ending_in_one_step_for_different_reasons_all_end_right(tiny):
    """Four requests admitted together (one prefill). The first's sink says stop at its 3rd token, which the host
    learns only after the next step was dispatched for every row: that row's next token is dropped, the others'
    are theirs; in that step the last slot ends by max_tokens. Both end in one release: ending the first moves
    the last slot into its hole, and the last must still end as itself."""
    params, _ = tiny
    engine = Engine(params, TINY, max_batch=4, max_seq_len=64, eos_token_id=None)
    out = Collect(4)

    class StopAfter3:
        def __init__(self, inner):
            self.inner, self.n = inner, 0

        def __call__(self, token):
            self.n += 1
            self.inner(token)
            return self.n < 3

        def done(self, reason):
            self.inner.done(reason)

    greedy = lambda n: Sampling(max_tokens=n, temperature=0)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    engine.submit(prompts[0], sampling=greedy(10), sink=StopAfter3(out.sink(0)))
    engine.submit(prompts[1], sampling=greedy(10), sink=out.sink(1))
    engine.submit(prompts[2], sampling=greedy(10), sink=out.sink(2))
    engine.submit(prompts[3], sampling=greedy(4), sink=out.sink(3))
    engine.start()
    try:
        for _ in range(4):
            assert out.left.acquire(timeout=120)
    finally:
        engine.stop()
    assert engine.error is None
    assert out.reasons == {0: "stop", 1: "length", 2: "length", 3: "length"}
    assert engine.stats["prefills"] == 1  # the four were admitted together
    for i, n in enumerate([3, 10, 10, 4]):
        ref = generate(params, TINY, np.asarray([prompts[i]]), max_new_tokens=n, do_sample=False, eos_token_id=None)
        assert out.tokens[i] == ref[0, len(prompts[i]):].tolist(), i
