"""Scores through the real server: `echo` + `logprobs` on /v1/completions (the way lm-evaluation-harness scores
choices), chat logprobs, batches of prompts and `n`, the tokenizer routes, and the refusals. The served logprob of a
chat sample's answer equals its training loss (MiniMind's own labels, the trainer's loss) for the base, an adapter,
an lm_head adapter and a mix; the real `lm_eval` CLI scores a task through the server as an in-process computation
does."""
from __future__ import annotations

import json
import subprocess
import sys

import httpx
import jax
import jax.numpy as jnp
import numpy as np
import openai
import pytest

import convert
import lora
import train
from conftest import fixture_dir, subprocess_env
from minimind_jax import MiniMindConfig, MiniMindForCausalLM
from minimind_jax.generate import generate
from minimind_jax.model import init_params
from minimind_jax.tokenizer import load_tokenizer
from serve.tools import split
from test_serve import _adapter, _start

pytestmark = pytest.mark.slow  # a server in a subprocess behind every test
CONFIG = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        tie_word_embeddings=False)  # an lm_head of its own, for an lm_head adapter
MODELS = ["minimind", "alpha", "head", "alpha+0.5*head"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("scores")
    params = jax.tree_util.tree_map_with_path(  # spread the logits: distinct answers per model
        lambda p, x: x * 8.0 if p[-1].key in ("kernel", "embedding") else x, init_params(CONFIG, 11))
    convert.save_model(params, CONFIG, d / "base.safetensors")
    adapters = {"alpha": _adapter(params, 1, 4, "square"), "head": _adapter(params, 5, 4, "q_proj,v_proj,lm_head")}
    (d / "loras").mkdir()  # empty: the tool-calling adapter is trained by a test and loaded while serving
    args = ["--weight", str(d / "base.safetensors"), "--hidden_size", "64", "--max_batch", "4", "--max_seq_len", "512",
            "--lora_dir", str(d / "loras")]  # 512: a prompt with a tool's schema is ~240 tokens
    for name, a in adapters.items():
        convert.save_adapter(a, d / f"{name}.ckpt", config=CONFIG, params=params)
        args += ["--lora", f"{name}={d / f'{name}.ckpt'}"]
    with open(d / "server.log", "w") as log:
        try:
            proc, url = _start(args, log)
        except AssertionError as e:
            raise AssertionError(f"{e}: {(d / 'server.log').read_text()}") from None
        try:
            yield {"url": url, "params": params, "adapters": adapters, "dir": d}
        finally:
            proc.terminate()
            proc.wait(30)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def _post(server, path, body, **kw) -> httpx.Response:
    return httpx.post(server["url"] + path, json=body, timeout=300, **kw)


def _mix(server, model: str):
    """The adapter a model name means (None: the base), as lora's exact algebra builds it."""
    if model == "minimind":
        return None
    parts = lora.parse_mix(model)
    return lora.combine([server["adapters"][n] for _, n in parts], [w for w, _ in parts])


def _log_softmax(server, model: str, ids) -> np.ndarray:
    logits = lora.apply(MiniMindForCausalLM(CONFIG), server["params"], _mix(server, model),
                        jnp.asarray([ids], jnp.int32)).logits[0]
    return np.asarray(jax.nn.log_softmax(logits, axis=-1))


def test_echoed_answer_logprobs_equal_the_training_loss(server, tokenizer):
    """MiniMind's SFT samples (ids and labels as its SFTDataset makes them), all 8 in one request."""
    fx = np.load(fixture_dir("sft_v3") / "expected.npz")
    n = np.minimum(fx["lengths"], fx["input_ids"].shape[1])
    samples = [(fx["input_ids"][i, :n[i]].tolist(), fx["labels"][i, :n[i]]) for i in range(len(n))]
    loss = train.make_eval_loss(MiniMindForCausalLM(CONFIG))
    for model in MODELS:
        r = _post(server, "/v1/completions", {"model": model, "prompt": [ids for ids, _ in samples], "echo": True,
                                              "max_tokens": 0, "logprobs": 0})
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert len(choices) == len(samples)
        for (ids, labels), choice in zip(samples, choices):
            lps = choice["logprobs"]["token_logprobs"]
            assert lps[0] is None and len(lps) == len(ids) and choice["finish_reason"] == "length"
            served = -np.mean([lps[t] for t in range(1, len(ids)) if labels[t] != -100])
            batch = {"input_ids": jnp.asarray([ids]), "labels": jnp.asarray([labels])}
            trained = float(loss(_mix(server, model), server["params"], batch)[1][0])
            assert served == pytest.approx(trained, rel=1e-4), model
    # a rendered chat as text scores as its ids: it starts with MiniMind's bos, so no second one is put in front
    text = json.loads((fixture_dir("sft_v3") / "rendered.txt").read_text().splitlines()[1])
    r = _post(server, "/v1/completions", {"model": "head", "prompt": text, "echo": True, "max_tokens": 0,
                                          "logprobs": 1}).json()["choices"][0]
    by_ids = _post(server, "/v1/completions", {"model": "head", "prompt": tokenizer.encode(text), "echo": True,
                                               "max_tokens": 0, "logprobs": 1}).json()["choices"][0]
    assert r["text"] == text and r["logprobs"] == by_ids["logprobs"]
    offsets = r["logprobs"]["text_offset"]
    assert "".join(r["logprobs"]["tokens"]) == text and offsets == sorted(offsets)


def test_generated_logprobs_agree_with_the_echo_of_the_answer(server, tokenizer):
    prompt = tokenizer.encode("Once upon a time")
    for model in MODELS:
        gen = _post(server, "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0,
                                                "logprobs": 3}).json()["choices"][0]
        lp, ids = gen["logprobs"], _ids(server, model, prompt, 8)
        assert gen["text"] == tokenizer.decode(ids, skip_special_tokens=True) and len(lp["tokens"]) == 8
        echo = _post(server, "/v1/completions", {"model": model, "prompt": prompt + ids, "max_tokens": 0,
                                                 "echo": True, "logprobs": 3}).json()["choices"][0]
        np.testing.assert_allclose(lp["token_logprobs"], echo["logprobs"]["token_logprobs"][len(prompt):],
                                   rtol=1e-4, atol=1e-5)
        for top, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]):
            assert max(top.values()) == chosen and len(top) <= 4  # greedy: the chosen is the best, exactly


def _ids(server, model: str, prompt: list, n: int) -> list:
    """The greedy continuation in process."""
    params = server["params"]
    mix = _mix(server, model)
    if mix is not None:
        params = lora.merge(params, mix)
    out = generate(params, CONFIG, np.asarray([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return out[0, len(prompt):].tolist()


def test_chat_logprobs_plain_and_streamed(server, tokenizer):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="-", max_retries=0, timeout=120)
    ask = dict(model="alpha+0.5*head", messages=[{"role": "user", "content": "你好"}], temperature=0, max_tokens=10,
               logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**ask)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.top_logprobs[0].token == entry.token
    raw = bytes(sum((e.bytes for e in content), [])).decode("utf-8", errors="replace")
    assert r.choices[0].message.content == split(raw, thinking=False).content
    streamed = [e for chunk in client.chat.completions.create(**ask, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for e in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_a_batch_with_n_choices(server, tokenizer):
    prompts = ["The sky is", "我们", "1, 2, 3,"]
    body = {"model": "alpha", "prompt": prompts, "n": 2, "seed": 5, "temperature": 1.0, "max_tokens": 6}
    r = _post(server, "/v1/completions", body).json()
    choices = sorted(r["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(6))
    for p, prompt in enumerate(prompts):
        for j in range(2):
            alone = _post(server, "/v1/completions", {**body, "prompt": prompt, "n": 1, "seed": 5 + j}).json()
            assert choices[2 * p + j]["text"] == alone["choices"][0]["text"], (prompt, j)
    assert any(choices[2 * p]["text"] != choices[2 * p + 1]["text"] for p in range(3))  # distinct samples
    assert r["usage"]["prompt_tokens"] == sum(1 + len(tokenizer.encode(p)) for p in prompts)
    assert r["usage"]["completion_tokens"] == 36
    # streamed: every choice's chunks, in order per choice, make its text
    texts = {}
    with httpx.stream("POST", server["url"] + "/v1/completions", json={**body, "stream": True}, timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(6)] == [c["text"] for c in choices]


def test_chat_with_n_choices_plain_and_streamed(server):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="-", max_retries=0, timeout=120)
    ask = dict(model="alpha", messages=[{"role": "user", "content": "讲个笑话"}], temperature=1.0, max_tokens=8,
               seed=11)
    r = client.chat.completions.create(**ask, n=3)
    texts = [c.message.content for c in sorted(r.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(r.choices, key=lambda c: c.index)] == [0, 1, 2] and len(set(texts)) > 1
    for j, text in enumerate(texts):
        assert client.chat.completions.create(**{**ask, "seed": 11 + j}).choices[0].message.content == text
    streamed = {}
    for chunk in client.chat.completions.create(**ask, n=3, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
    assert [streamed[j] or None for j in range(3)] == texts


def test_echo_and_logprobs_stream_as_they_come_whole(server, tokenizer):
    body = {"model": "head", "prompt": ["Hello there", "你好"], "echo": True, "logprobs": 2, "max_tokens": 5,
            "temperature": 0}
    whole = sorted(_post(server, "/v1/completions", body).json()["choices"], key=lambda c: c["index"])
    got = {0: {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []}, 1: None}
    got[1] = {k: type(v)() for k, v in got[0].items()}
    with httpx.stream("POST", server["url"] + "/v1/completions", json={**body, "stream": True}, timeout=300) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:])["choices"]:
                    got[c["index"]]["text"] += c["text"]
                    for key in ("tokens", "token_logprobs", "text_offset"):
                        got[c["index"]][key] += (c["logprobs"] or {}).get(key, [])
    for i, c in enumerate(whole):
        assert got[i] == {"text": c["text"], **{k: c["logprobs"][k] for k in ("tokens", "token_logprobs",
                                                                             "text_offset")}}
        assert c["text"].startswith(body["prompt"][i]) and c["logprobs"]["token_logprobs"][0] is None


def test_tokenizer_routes(server, tokenizer):
    ids = tokenizer.encode("你好 world")
    assert _post(server, "/tokenize", {"prompt": "你好 world"}).json()["tokens"] == [tokenizer.bos_token_id] + ids
    r = _post(server, "/tokenize", {"prompt": "你好 world", "add_special_tokens": False}).json()
    assert r["tokens"] == ids and r["count"] == len(ids) and r["max_model_len"] == 512
    messages = [{"role": "user", "content": "hi"}]
    chat = _post(server, "/v1/chat/completions", {"model": "minimind", "messages": messages, "max_tokens": 1}).json()
    assert _post(server, "/tokenize", {"messages": messages}).json()["count"] == chat["usage"]["prompt_tokens"]
    assert _post(server, "/detokenize", {"tokens": ids}).json()["prompt"] == "你好 world"
    info = httpx.get(server["url"] + "/tokenizer_info").json()
    assert info["eos_token"] == "<|im_end|>" and info["bos_token"] == "<|im_start|>" and "tools" in \
        info["chat_template"]
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support
    assert check_remote_tokenizer_support(server["url"] + "/v1/completions")
    remote = RemoteTokenizer(server["url"] + "/v1/completions")
    assert remote.encode("你好 world") == ids and remote.eos_token_id == tokenizer.eos_token_id


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "echo"),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 100}, 400, "256"),
    ("/v1/completions", {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "suffix": "!"}, 400, "suffix"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required",
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tool_choice"),
    ("/detokenize", {"tokens": [1, 10 ** 6]}, 400, "tokens"),
    ("/tokenize", {}, 400, "prompt"),
])
def test_what_the_server_does_not_do_is_refused(server, path, body, status, words):
    r = _post(server, path, {"model": "minimind", "max_tokens": 2, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_neutral_values_of_unsupported_fields_pass(server):
    r = _post(server, "/v1/completions", {"model": "minimind", "prompt": "hi", "max_tokens": 2, "logit_bias": {},
                                          "presence_penalty": 0, "frequency_penalty": 0.0, "best_of": 1})
    assert r.status_code == 200, r.text


def test_a_huge_body_is_refused_before_any_work(server):
    huge = json.dumps({"model": "minimind", "prompt": "字" * (10 << 20)}).encode()
    r = httpx.post(server["url"] + "/v1/completions", content=huge, timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "request body" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it streams in
        for i in range(0, len(huge), 1 << 16):
            yield huge[i:i + (1 << 16)]
    r = httpx.post(server["url"] + "/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


# ------------------------------------------------------------------------------------------- tools and reasoning
WEATHER = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                              "parameters": {"type": "object", "properties": {
                                                  "city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def _memorize(server, tokenizer, pairs: list[tuple[str, str]], steps: int = 300) -> lora.Adapter:
    """An adapter that makes the served base answer each prompt text with its answer text, greedily: trained here,
    on those answers' tokens only (a stand-in for a tool-calling, reasoning fine-tune of MiniMind-3)."""
    import optax
    model, params = MiniMindForCausalLM(CONFIG), server["params"]
    rows = [(tokenizer.encode(p), tokenizer.encode(a + "<|im_end|>")) for p, a in pairs]
    t = max(len(p) + len(a) for p, a in rows)
    ids = np.zeros((len(rows), t), np.int32)
    mask = np.zeros((len(rows), t), np.float32)
    for i, (p, a) in enumerate(rows):
        ids[i, :len(p) + len(a)] = p + a
        mask[i, len(p):len(p) + len(a)] = 1  # position t's target is ids[t]: predicted at t - 1
    # lm_head too: the spread base's logits are too steep for the projections alone to turn
    adapter = lora.init(params, jax.random.key(0), rank=16, alpha=32,
                        targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head")
    tx = optax.adam(3e-3)

    def loss(a):
        logits = lora.apply(model, params, a, jnp.asarray(ids)).logits[:, :-1]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(ids)[:, 1:, None], -1)[..., 0]
        return (nll * mask[:, 1:]).sum() / mask.sum()

    @jax.jit
    def step(a, opt):
        value, g = jax.value_and_grad(loss)(a)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(a, updates), opt, value
    opt = tx.init(adapter)
    for _ in range(steps):
        adapter, opt, value = step(adapter, opt)
    assert float(value) < 0.01, float(value)
    return adapter


def test_a_two_turn_tool_exchange_and_reasoning_with_the_openai_client(server, tokenizer):
    from transformers import AutoTokenizer
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    hello = [{"role": "user", "content": "Say hello."}]
    pairs = [(tokenizer.apply_chat_template(ask, tools=WEATHER, add_generation_prompt=True), CALL),
             (tokenizer.apply_chat_template(hello, add_generation_prompt=True, open_thinking=True),
              "The user wants a greeting.\n</think>\n\nHello! 你好!")]
    adapter = _memorize(server, tokenizer, pairs)
    convert.save_adapter(adapter, server["dir"] / "loras" / "caller.ckpt", config=CONFIG, params=server["params"])
    assert _post(server, "/v1/adapters", {"name": "caller", "path": "caller.ckpt"}).status_code == 200
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="-", max_retries=0, timeout=120)
    turn1 = client.chat.completions.create(model="caller", messages=ask, tools=WEATHER, temperature=0, max_tokens=40)
    choice = turn1.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the same call as a delta.tool_calls chunk, no tag in any content
    chunks = list(client.chat.completions.create(model="caller", messages=ask, tools=WEATHER, temperature=0,
                                                 max_tokens=40, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.function.name, tc.function.arguments) for tc in calls] == [(call.function.name,
                                                                          call.function.arguments)]
    assert not any(c.choices and c.choices[0].delta.content for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    # tool_choice "none": the tools are not offered, the same text is plain content
    plain = client.chat.completions.create(model="caller", messages=ask, tools=WEATHER, tool_choice="none",
                                           temperature=0, max_tokens=40)
    assert not plain.choices[0].message.tool_calls
    # turn 2: the call and its result go back; the prompt is what MiniMind's template renders through transformers
    turn2 = ask + [choice.message.to_dict(), {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]
    reply = client.chat.completions.create(model="caller", messages=turn2, tools=WEATHER, temperature=0,
                                           max_tokens=5)
    hf = AutoTokenizer.from_pretrained(str(fixture_dir("tokenizer_minimind")))
    want = hf.apply_chat_template(turn2, tools=WEATHER, tokenize=False, add_generation_prompt=True)
    assert reply.usage.prompt_tokens == len(tokenizer.encode(want))
    assert _post(server, "/tokenize", {"messages": turn2, "tools": WEATHER}).json()["tokens"] == \
        tokenizer.encode(want)
    # reasoning: the think block apart from the answer, plain and streamed
    kw = {"extra_body": {"chat_template_kwargs": {"enable_thinking": True}}}
    r = client.chat.completions.create(model="caller", messages=hello, temperature=0, max_tokens=40, **kw)
    message = r.choices[0].message
    assert message.reasoning_content == "The user wants a greeting." and message.content == "Hello! 你好!"
    parts = {"reasoning_content": "", "content": ""}
    for c in client.chat.completions.create(model="caller", messages=hello, temperature=0, max_tokens=40,
                                            stream=True, **kw):
        for key in parts:
            parts[key] += (c.choices and getattr(c.choices[0].delta, key, None)) or ""
    assert parts == {"reasoning_content": message.reasoning_content, "content": message.content}


# ---------------------------------------------------------------------------------------------------- lm-eval
CHOICE_DOCS = [{"question": "1 + 1 =", "choices": ["2", "3", "11"], "answer": 0},
               {"question": "The capital of France is", "choices": ["Paris", "Rome", "Berlin", "蓝色"], "answer": 0},
               {"question": "天空是什么颜色？", "choices": ["蓝色", "红色"], "answer": 0},
               {"question": "Water freezes at", "choices": ["0 degrees", "100 degrees"], "answer": 0},
               {"question": "MiniMind is a", "choices": ["language model", "car", "river"], "answer": 0}]
GEN_DOCS = [{"question": "你是谁？", "answer": "我是MiniMind"}, {"question": "Who are you?", "answer": "MiniMind"}]


def _task(d, name: str, docs: list, extra: str) -> None:
    (d / f"{name}.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in docs))
    (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                    f"    test: {d / f'{name}.jsonl'}\ntest_split: test\n"
                                    'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n' + extra)


def _lm_eval(d, model_type: str, args: str, task: str, *extra) -> list[dict]:
    """The real lm_eval CLI -> its logged samples, in doc order."""
    out = d / f"out_{task}_{abs(hash(args))}"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model_type, "--model_args", args, "--tasks", task,
           "--include_path", str(d), "--output_path", str(out), "--log_samples", *extra]
    run = subprocess.run(cmd, env=subprocess_env(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                                                 HF_DATASETS_CACHE=str(d / "hf")),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    [samples] = list(out.rglob(f"samples_{task}_*.jsonl"))
    return sorted((json.loads(x) for x in samples.read_text().splitlines()), key=lambda s: s["doc_id"])


@pytest.mark.parametrize("model", ["minimind", "alpha"])
def test_lm_eval_scores_through_the_server_as_in_process(server, tokenizer, tmp_path, model):
    _task(tmp_path, "mm_choice", CHOICE_DOCS, 'doc_to_choice: "{{choices}}"\noutput_type: multiple_choice\n'
                                              "metric_list:\n  - metric: acc\n")
    _task(tmp_path, "mm_gen", GEN_DOCS, "output_type: generate_until\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                                        "  max_gen_toks: 12\n  do_sample: false\n  temperature: 0\n"
                                        "metric_list:\n  - metric: exact_match\n")
    url = server["url"]
    # multiple choice: local-completions, echo + logprobs, batches of 4 prompts, the server's tokenizer (no argument)
    samples = _lm_eval(tmp_path, "local-completions", f"model={model},base_url={url}/v1/completions,"
                       "num_concurrent=2,max_retries=1", "mm_choice", "--batch_size", "4")
    right = []
    for doc, sample in zip(CHOICE_DOCS, samples):
        ours = []
        for choice in doc["choices"]:
            context, whole = tokenizer.encode(doc["question"]), tokenizer.encode(doc["question"] + " " + choice)
            lsm = _log_softmax(server, model, whole)
            ours.append(sum(lsm[t - 1, whole[t]] for t in range(len(context), len(whole))))
        served = [float(r[0][0]) for r in sample["resps"]]
        np.testing.assert_allclose(served, ours, rtol=1e-4, atol=1e-4)
        right.append(int(np.argmax(ours)) == doc["answer"])
    assert [s["acc"] for s in samples] == [float(x) for x in right]
    # generation: local-chat-completions, the server's chat template, greedy, stopped at the first newline
    samples = _lm_eval(tmp_path, "local-chat-completions", f"model={model},base_url={url}/v1/chat/completions,"
                       "max_retries=1", "mm_gen", "--apply_chat_template")
    for doc, sample in zip(GEN_DOCS, samples):
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": doc["question"]}],
                                                             add_generation_prompt=True))
        text = tokenizer.decode(_ids(server, model, ids, 12), skip_special_tokens=True).split("\n")[0]
        assert sample["resps"][0][0] == (split(text, thinking=False).content or "")
        assert sample["exact_match"] == float(sample["resps"][0][0] == doc["answer"])
