"""The OpenAI-compatible server, for real: `python -m serve.openai` on a free localhost port, driven by the `openai`
client and raw HTTP. Greedy answers for the base, two adapters and a mix must equal `generate` over the merged
weights token for token (alone, 12 at once in mixed order, and streamed); every bad request gets its 4xx; paths
outside --lora_dir and bad API keys are refused; loading and unloading adapters while requests run loses none."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from typing import Optional

import httpx
import jax
import numpy as np
import openai
import pytest

import convert
import lora
from conftest import free_port, subprocess_env
from minimind_jax import MiniMindConfig
from minimind_jax.generate import generate
from minimind_jax.model import init_params
from minimind_jax.tokenizer import load_tokenizer
from serve.tools import split

pytestmark = pytest.mark.slow  # a server (or a training run) in a subprocess behind every test
KEY = "sk-test-key"
CONFIG = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
QUESTIONS = ["你是谁？", "Who are you?", "讲个笑话", "What is 2+2?", "为什么天空是蓝色的", "hello"]


def _adapter(params, seed: int, rank: int, targets: str) -> lora.Adapter:
    """A random adapter with B != 0 (a fresh one is a no-op), so each model answers differently."""
    a = lora.init(params, jax.random.key(seed), rank=rank, targets=targets)
    w = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(seed + 1), x.shape)) * 0.3, a.weights)
    return lora.Adapter(w, alpha=a.alpha, rslora=False, targets=a.targets)


def _start(args: list, out, **env_extra) -> tuple[subprocess.Popen, str]:
    """`python -m serve.openai ARGS` on a free port, once /health answers -> (process, base url)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "serve.openai", *args, "--port", str(port)],
                            env=subprocess_env(**env_extra), stdout=out, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        time.sleep(0.5)
    proc.kill()
    raise AssertionError("server did not start in 300 s")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A running server: tiny base file, adapters alpha (.ckpt) and beta (MiniMind .pth) in --lora_dir, gamma
    outside it; -> dict(url, params, adapters, dir)."""
    d = tmp_path_factory.mktemp("serve")
    params = init_params(CONFIG, 3)
    # spread the logits (the N(0, 0.02) init gives near-ties that make greedy comparisons meaningless)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x * 8.0 if p[-1].key in ("kernel", "embedding") else x, params)
    convert.save_model(params, CONFIG, d / "base.safetensors")
    adapters = {"alpha": _adapter(params, 1, 4, "square"), "beta": _adapter(params, 5, 8, "all-linear"),
                "gamma": _adapter(params, 9, 8, "attn")}
    (d / "loras").mkdir()
    convert.save_adapter(adapters["alpha"], d / "loras" / "alpha_64.ckpt", config=CONFIG, params=params)
    convert.save_adapter(adapters["beta"], d / "loras" / "beta_64.pth")
    convert.save_adapter(adapters["gamma"], d / "gamma.ckpt", config=CONFIG, params=params)
    other_base = init_params(CONFIG, 4)  # an adapter trained on other base weights: served, with a warning
    convert.save_adapter(adapters["alpha"], d / "loras" / "other_64.ckpt", config=CONFIG, params=other_base,
                         metadata={"base_weight": "other_base.pth"})
    (d / "loras" / "escape.ckpt").symlink_to(d / "gamma.ckpt")
    (d / "loras" / "sub").mkdir()
    convert.save_adapter(adapters["gamma"], d / "loras" / "sub" / "gamma_64.ckpt", config=CONFIG, params=params)
    log = open(d / "server.log", "w")
    try:
        proc, url = _start(["--weight", str(d / "base.safetensors"), "--lora_dir", str(d / "loras"), "--hidden_size",
                            "64", "--max_batch", "4", "--max_seq_len", "256"], log, MINIMIND_API_KEY=KEY)
    except AssertionError as e:
        raise AssertionError(f"{e}: {(d / 'server.log').read_text()}") from None
    try:
        yield {"url": url, "params": params, "adapters": adapters, "dir": d, "proc": proc}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _expected(served, tokenizer, model: str, question: str, max_tokens: int) -> Optional[str]:
    """What `generate` answers greedily over the base with `model`'s adapters merged in."""
    params = served["params"]
    for part in model.split("+"):
        w, _, name = part.rpartition("*")
        if name in served["adapters"]:
            params = lora.merge(params, served["adapters"][name], float(w) if w else 1.0)
    ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                                         add_generation_prompt=True))
    out = generate(params, CONFIG, np.asarray([ids]), max_new_tokens=max_tokens, do_sample=False,
                   eos_token_id=tokenizer.eos_token_id)
    # the message's content: the text without a think block, whitespace trimmed (None if nothing is left)
    return split(tokenizer.decode(out[0, len(ids):].tolist(), skip_special_tokens=True), thinking=False).content


MODELS = ["minimind", "alpha", "beta", "alpha+0.5*beta"]


def test_greedy_answers_equal_generate_over_merged_weights(served, tokenizer):
    client = _client(served)
    answers = {}
    for model in MODELS:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                           temperature=0, max_tokens=24)
        answers[model] = r.choices[0].message.content
        assert r.choices[0].message.content == _expected(served, tokenizer, model, QUESTIONS[0], 24), model
        assert r.usage.completion_tokens <= 24 and r.usage.prompt_tokens > 0
    assert len(set(answers.values())) == len(MODELS), answers  # the adapters do change the answer


def test_twelve_concurrent_requests_in_mixed_order_and_streamed(served, tokenizer):
    jobs = [(MODELS[(i * 3) % 4], QUESTIONS[i % len(QUESTIONS)], 8 + 3 * i) for i in range(12)]

    async def one(client, model, question, n, stream):
        if not stream:
            r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                     temperature=0, max_tokens=n)
            return r.choices[0].message.content
        parts = []
        async for chunk in await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=n,
                stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
        return "".join(parts)

    async def run_all():
        client = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        return await asyncio.gather(*[one(client, m, q, n, stream=i % 2 == 1) for i, (m, q, n) in enumerate(jobs)])

    got = asyncio.run(run_all())
    for (model, question, n), answer in zip(jobs, got):
        assert (answer or None) == _expected(served, tokenizer, model, question, n), (model, question, n)


def _post(served, path: str, body, key=KEY, raw: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw:
        headers["Content-Type"] = "application/json"
        return httpx.post(served["url"] + path, content=body, headers=headers, timeout=60)
    return httpx.post(served["url"] + path, json=body, headers=headers, timeout=60)


CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body, status, words", [
    (b'{"model": "alpha", "messages": [', 400, "malformed JSON"),
    ({**CHAT, "model": "nope"}, 404, "not found"),
    ({**CHAT, "model": "alpha+0.5*nope"}, 404, "nope"),
    ({**CHAT, "max_tokens": -3}, 400, "max_tokens"),
    ({**CHAT, "max_tokens": "8"}, 400, "max_tokens"),
    ({**CHAT, "temperature": "hot"}, 400, "temperature"),
    ({**CHAT, "messages": "hi"}, 400, "messages"),
    ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ({**CHAT, "n": 0}, 400, "n"),
    ({**CHAT, "max_tokens": 300}, 400, "context"),
    ({**CHAT, "messages": [{"role": "user", "content": "很长 " * 400}]}, 400, "context"),
    ({"messages": CHAT["messages"]}, 400, "model"),
])
def test_bad_chat_requests_get_openai_errors(served, body, status, words):
    r = _post(served, "/v1/chat/completions", body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["type"] == "invalid_request_error"


def test_bad_completion_requests(served):
    assert _post(served, "/v1/completions", {"model": "minimind", "prompt": [1, 99999]}).status_code == 400
    assert _post(served, "/v1/completions", {"model": "minimind", "prompt": ""}).status_code == 400
    r = _post(served, "/v1/completions", {"model": "minimind", "prompt": ["a", ""]})
    assert r.status_code == 400 and "prompt[1]" in r.json()["error"]["message"]
    r = _post(served, "/v1/completions", {"model": "minimind", "prompt": [1, 2, 3], "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3
    assert httpx.get(served["url"] + "/health").json()["status"] == "ok"  # still alive after all of them


def test_api_key_is_required_except_for_health(served):
    assert httpx.get(served["url"] + "/health").status_code == 200
    for key in (None, "wrong"):
        r = _post(served, "/v1/chat/completions", CHAT, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        assert httpx.get(served["url"] + "/v1/models", headers=headers).status_code == 401
        assert httpx.get(served["url"] + "/metrics", headers=headers).status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served["url"] + "/v1", api_key="wrong", max_retries=0).models.list()


def test_models_lists_base_and_adapters(served):
    models = {m.id: m for m in _client(served).models.list().data}
    assert {"minimind", "alpha", "beta"} <= set(models) and "escape" not in models  # a link out of --lora_dir
    assert models["alpha"].model_extra["rank"] == 4 and models["beta"].model_extra["rank"] == 8


@pytest.mark.parametrize("path", ["../gamma.ckpt", "/etc/passwd", "escape.ckpt", "sub/../../gamma.ckpt", "none.ckpt"])
def test_adapter_paths_outside_lora_dir_are_refused(served, path):
    r = _post(served, "/v1/adapters", {"name": "evil", "path": path})
    assert r.status_code == 400, r.text
    assert "evil" not in {m.id for m in _client(served).models.list().data}


def test_load_and_unload_while_requests_run(served, tokenizer):
    """Requests keep running on alpha and beta while gamma is loaded, used and unloaded, and alpha unloaded and
    reloaded: every request completes with generate's answer."""
    async def ask(client, model, n):
        r = await client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[1]}],
                                                 temperature=0, max_tokens=n)
        return model, n, r.choices[0].message.content

    async def scenario():
        client = openai.AsyncOpenAI(base_url=served["url"] + "/v1", api_key=KEY, max_retries=0, timeout=300)
        http = httpx.AsyncClient(base_url=served["url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        running = [asyncio.create_task(ask(client, m, 40)) for m in ("alpha", "beta", "alpha", "beta")]
        await asyncio.sleep(0.5)
        r = await http.post("/v1/adapters", json={"name": "gamma", "path": "sub/gamma_64.ckpt"})
        assert r.status_code == 200, r.text
        used = await ask(client, "gamma", 12)
        assert (await http.delete("/v1/adapters/alpha")).status_code == 200  # alpha's requests still run
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 404
        assert (await http.post("/v1/adapters", json={"name": "alpha", "path": "alpha_64.ckpt"})).status_code == 200
        assert (await http.delete("/v1/adapters/gamma")).status_code == 200
        assert (await http.delete("/v1/adapters/gamma")).status_code == 404
        done = await asyncio.gather(*running)
        await http.aclose()
        return [used] + list(done)

    for model, n, answer in asyncio.run(scenario()):
        assert (answer or None) == _expected(served, tokenizer, model, QUESTIONS[1], n), model


def test_a_client_that_goes_away_frees_its_slot(served):
    """A streaming client that closes its connection after the first token: decoding for it stops within a few
    steps instead of running to max_tokens."""
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "beta", "prompt": [1, 2, 3], "max_tokens": 240, "temperature": 0}
    assert _post(served, "/v1/completions", body).json()["choices"][0]["finish_reason"] == "length"  # no early eos

    def steps():
        text = httpx.get(served["url"] + "/metrics", headers=auth).text
        return float(next(x.split()[-1] for x in text.splitlines() if x.startswith("minimind_decode_steps ")))

    before = steps()
    with httpx.stream("POST", served["url"] + "/v1/completions", json={**body, "stream": True}, headers=auth,
                      timeout=60) as r:
        next(line for line in r.iter_lines() if line.startswith("data: "))
    for _ in range(100):
        if httpx.get(served["url"] + "/health").json()["active"] == 0:
            break
        time.sleep(0.05)
    assert httpx.get(served["url"] + "/health").json()["active"] == 0
    assert steps() - before < 120, (before, steps())


def test_metrics_in_prometheus_text_format(served):
    text = httpx.get(served["url"] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("minimind_requests_total", "minimind_completion_tokens_total", "minimind_queue_length",
                 "minimind_batch_occupancy", "minimind_time_to_first_token_seconds_bucket"):
        assert name in text
    served_tokens = [float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("minimind_completion_tokens_total")]
    assert served_tokens and served_tokens[0] > 0


def test_stop_strings_cut_the_text(served, tokenizer):
    full = _post(served, "/v1/completions", {"model": "beta", "prompt": "hello", "max_tokens": 24,
                                             "temperature": 0}).json()["choices"][0]["text"]
    assert len(full) > 6
    stop = full[3:5]
    r = _post(served, "/v1/completions", {"model": "beta", "prompt": "hello", "max_tokens": 24, "temperature": 0,
                                          "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[:full.index(stop)] and r["choices"][0]["finish_reason"] == "stop"
    events = []
    with httpx.stream("POST", served["url"] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "beta", "prompt": "hello", "max_tokens": 24, "temperature": 0, "stop": stop,
                            "stream": True, "stream_options": {"include_usage": True}}, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == full[:full.index(stop)]
    assert events[-1]["usage"]["completion_tokens"] > 0


def test_an_adapter_trained_over_a_random_base_is_served_over_that_base(tmp_path, tokenizer):
    """No --weight: the server rebuilds the random base the first adapter records (train.lora's demo), so its
    greedy answer is generate's over that base with the adapter merged."""
    config = MiniMindConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    params = init_params(config, 42)
    adapter = _adapter(params, 3, 4, "all-linear")
    path = convert.save_adapter(adapter, tmp_path / "lora_identity_32.ckpt", config=config, params=params,
                                metadata={"base_random_seed": 42, "base_weight": None})
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc, url = _start(["--lora", str(path), "--hidden_size", "32", "--max_batch", "2", "--max_seq_len", "128",
                            "--warmup", "0"],
                           out)
    try:
        r = httpx.post(url + "/v1/chat/completions", json={"model": "lora_identity", "temperature": 0,
                                                           "max_tokens": 10,
                                                           "messages": [{"role": "user", "content": "你是谁？"}]},
                       timeout=300)  # --warmup 0: the first request compiles
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "你是谁？"}],
                                                             add_generation_prompt=True))
        ref = generate(lora.merge(params, adapter), config, np.asarray([ids]), max_new_tokens=10, do_sample=False,
                       eos_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(ref[0, len(ids):].tolist(), skip_special_tokens=True)
        assert r.json()["choices"][0]["message"]["content"] == split(text, thinking=False).content
    finally:
        proc.terminate()
        proc.wait(30)
    assert "the random-init base" in log.read_text() and "seed 42" in log.read_text()


def test_an_adapter_of_another_base_is_served_with_a_visible_warning(served, capsys):
    from serve import chat

    models = {m.id: m for m in _client(served).models.list().data}
    warning = models["other"].model_extra["warning"]
    assert "other_base.pth" in warning and warning.count("sha256:") == 2
    assert "warning" not in models["alpha"].model_extra
    assert "[serve] warning: " in (served["dir"] / "server.log").read_text()
    chat.main(["--weight", str(served["dir"] / "base.safetensors"), "--lora", str(served["dir"] / "loras" /
               "other_64.ckpt"), "--prompt", "hi", "--greedy", "--max_new_tokens", "2", "--show_speed", "0"])
    err = capsys.readouterr().err
    assert "[chat] warning: " in err and "other_base.pth" in err
