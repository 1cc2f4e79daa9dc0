"""serve.engine's logprobs: a prompt scored by the prefill alone (max_tokens 0) and every generated token's logprob
equal the log-softmax of a plain forward pass through `lora.apply` (base, adapter, mix), whatever else shares the
batch; the alternatives are the model's most likely tokens, best first."""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora
from conftest import TINY
from minimind_jax import MiniMindForCausalLM
from serve.engine import Engine, Logprob, Sampling

CONFIG = TINY.replace(tie_word_embeddings=False)  # an lm_head of its own, to adapt
MODEL = MiniMindForCausalLM(CONFIG)


@pytest.fixture(scope="module")
def served():
    params = jax.jit(lambda k: MODEL.init(k, jnp.zeros((1, 4), jnp.int32))["params"])(jax.random.key(3))
    params = jax.tree_util.tree_map_with_path(lambda p, x: x * 8.0 if p[-1].key in ("kernel", "embedding") else x,
                                              params)

    def adapter(seed, rank, targets):
        a = lora.init(params, jax.random.key(seed), rank=rank, targets=targets, alpha=2 * rank)
        w = jax.tree.map(lambda x: jax.random.normal(jax.random.key(seed + 1), x.shape) * 0.3, a.weights)
        return lora.Adapter(w, alpha=a.alpha, rslora=False, targets=a.targets)

    adapters = {"a": adapter(1, 4, "square"), "head": adapter(7, 4, "q_proj,o_proj,lm_head")}
    engine = Engine(params, CONFIG, max_batch=4, max_seq_len=96, eos_token_id=None)
    for name, a in adapters.items():
        engine.adapters.add(name, a)
    engine.start()
    yield engine, params, adapters
    engine.stop()


def reference(params, adapters, model: str, ids) -> np.ndarray:
    """log-softmax [T, V] of a plain forward pass over `ids` (no cache), the adapter applied by lora.apply."""
    mix = None
    if model is not None:
        parts = lora.parse_mix(model, signed=True)
        mix = lora.combine([adapters[n] for _, n in parts], [w for w, _ in parts])
    logits = lora.apply(MODEL, params, mix, jnp.asarray([ids], jnp.int32)).logits[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


class Sink:
    def __init__(self):
        self.tokens, self.logprobs, self.prompt, self.reason = [], [], None, None
        self.finished = threading.Event()

    def __call__(self, token, logprob=None):
        self.tokens.append(int(token))
        self.logprobs.append(logprob)
        return True

    def prompt_logprobs(self, scores):
        self.prompt = scores

    def done(self, reason):
        self.reason = reason
        self.finished.set()


def run(engine, jobs):
    """[(prompt, model, sampling)] submitted together -> their sinks, all finished."""
    sinks = [Sink() for _ in jobs]
    for (prompt, model, sampling), sink in zip(jobs, sinks):
        engine.submit(prompt, model, sampling, sink)
    for sink in sinks:
        assert sink.finished.wait(120)
    return sinks


PROMPTS = [[1, 5, 9, 33, 2, 60, 7], list(range(3, 40)), [4, 4, 8, 15, 16, 23, 42, 11, 90]]


@pytest.mark.parametrize("model", [None, "a", "head", "a+0.5*head", "head+-0.5*a"])
def test_a_scored_prompt_is_the_forward_pass_log_softmax(served, model):
    engine, params, adapters = served
    # scored alongside requests of other adapters and lengths: a token's logprob must not depend on its batch
    jobs = [(p, model, Sampling(max_tokens=0, prompt_logprobs=3)) for p in PROMPTS]
    jobs += [(PROMPTS[1][:20], "a", Sampling(max_tokens=5, temperature=0)), (PROMPTS[0], None, Sampling(max_tokens=3))]
    sinks = run(engine, jobs)
    for prompt, sink in zip(PROMPTS, sinks):
        assert sink.reason == "length" and sink.tokens == []  # scored, never decoded
        ref = reference(params, adapters, model, prompt)
        assert sink.prompt[0] is None and len(sink.prompt) == len(prompt)
        got = np.array([lp.logprob for lp in sink.prompt[1:]])
        want = ref[np.arange(len(prompt) - 1), prompt[1:]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for t, lp in enumerate(sink.prompt[1:]):
            assert lp.token == prompt[t + 1]
            best = np.argsort(-ref[t])[:3]
            assert [i for i, _ in lp.top] == list(best)
            np.testing.assert_allclose([v for _, v in lp.top], ref[t, best], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model", [None, "head", "a+0.5*head"])
def test_generated_tokens_carry_their_logprobs(served, model):
    engine, params, adapters = served
    prompt = PROMPTS[2]
    greedy, sampled = run(engine, [(prompt, model, Sampling(max_tokens=12, temperature=0, logprobs=2)),
                                   (prompt, model, Sampling(max_tokens=12, temperature=1.3, seed=7, logprobs=0,
                                                            prompt_logprobs=0))])
    for sink in (greedy, sampled):
        ids = prompt + sink.tokens
        ref = reference(params, adapters, model, ids)
        at = np.arange(len(prompt) - 1, len(ids) - 1)
        np.testing.assert_allclose([lp.logprob for lp in sink.logprobs], ref[at, sink.tokens], rtol=1e-5,
                                   atol=1e-5)
        assert all(isinstance(lp, Logprob) and lp.token == t for lp, t in zip(sink.logprobs, sink.tokens))
    # greedy: each token is its position's best, with the same number (is_greedy in lm-eval compares them)
    assert all(lp.top[0] == (lp.token, lp.logprob) and len(lp.top) == 2 for lp in greedy.logprobs)
    assert all(lp.top == () for lp in sampled.logprobs)
    np.testing.assert_allclose([lp.logprob for lp in sampled.prompt[1:]],
                               reference(params, adapters, model, prompt)[np.arange(len(prompt) - 1), prompt[1:]],
                               rtol=1e-5, atol=1e-5)


def test_a_prompt_as_long_as_the_context_can_be_scored(served):
    engine, params, adapters = served
    prompt = [(7 * i) % 90 + 3 for i in range(engine.max_seq_len)]
    [sink] = run(engine, [(prompt, "a", Sampling(max_tokens=0, prompt_logprobs=0))])
    np.testing.assert_allclose([lp.logprob for lp in sink.prompt[1:]],
                               reference(params, adapters, "a", prompt)[np.arange(len(prompt) - 1), prompt[1:]],
                               rtol=1e-5, atol=1e-5)
    [again] = run(engine, [(prompt[:40], None, Sampling(max_tokens=4, temperature=0))])  # and it serves on
    assert again.reason == "length" and len(again.tokens) == 4


def test_bad_logprob_settings_are_refused():
    for bad in (dict(logprobs=21), dict(prompt_logprobs=-1), dict(max_tokens=0)):
        with pytest.raises(ValueError):
            Sampling(**bad)
