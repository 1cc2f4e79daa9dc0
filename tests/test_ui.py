"""The web playground of `serve.openai` (serve/ui): its routes and headers in process, and the page itself in a real
browser (Debian's headless Chromium driven by Playwright) against the real server: a tiny base and two tiny adapters,
behind an API key. The page asks for the key and keeps it in the tab's session storage; a mix set with the sliders
answers as the API answers that mix string at temperature 0; compare mode shows three columns equal to three API
answers; the stop button ends a long generation and frees its slot; markup in a prompt or an answer is shown as text;
adapters unload and load from the page; the labels switch to Chinese; a phone-sized screen has no horizontal
overflow; no console errors. A screenshot of each view is kept ($MINIMIND_UI_SCREENSHOTS, else a temporary folder:
the test prints where).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import jax
import numpy as np
import pytest

import convert
import lora
from conftest import free_port, subprocess_env
from minimind_jax import MiniMindConfig
from minimind_jax.model import init_params
from minimind_jax.tokenizer import load_tokenizer

CHROMIUM = Path("/usr/bin/chromium")
KEY = "sk-ui-test-key"
CONFIG = MiniMindConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
UI_DIR = Path(__file__).resolve().parents[1] / "serve" / "ui"
slow = pytest.mark.slow  # the browser tests: one server and one Chromium for all of them, ~35 s on 2 cores


def _tiny_base():
    params = init_params(CONFIG, 3)
    # spread the logits (the N(0, 0.02) init gives near-ties that make greedy comparisons meaningless)
    return jax.tree_util.tree_map_with_path(lambda p, x: x * 8.0 if p[-1].key in ("kernel", "embedding") else x,
                                            params)


def _adapter(params, seed: int, rank: int, targets: str) -> lora.Adapter:
    """A random adapter with B != 0 (a fresh one is a no-op), so each model answers differently."""
    a = lora.init(params, jax.random.key(seed), rank=rank, targets=targets)
    w = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(seed + 1), x.shape)) * 0.3, a.weights)
    return lora.Adapter(w, alpha=a.alpha, rslora=False, targets=a.targets)


def _lora_dir(d: Path, params) -> Path:
    (d / "loras").mkdir()
    convert.save_adapter(_adapter(params, 1, 4, "square"), d / "loras" / "identity_64.ckpt", config=CONFIG,
                         params=params)
    convert.save_adapter(_adapter(params, 5, 8, "all-linear"), d / "loras" / "capitals_64.ckpt", config=CONFIG,
                         params=params)
    return d / "loras"


# ------------------------------------------------------------------------------------------ in process: routes


@pytest.fixture(scope="module")
def make_app(tmp_path_factory):
    """build_app over an engine that is never started (the page's routes need no decoding)."""
    from serve.app import build_app
    from serve.engine import Engine

    engine = Engine(init_params(CONFIG, 3), CONFIG, max_batch=1, max_seq_len=64)
    d = tmp_path_factory.mktemp("ui_routes")
    for name in ("identity_64.pth", "capitals_64.pth", "notes.txt"):  # listed by name, never read here
        (d / name).write_bytes(b"")
    tokenizer = load_tokenizer()
    return lambda **kw: build_app(engine, tokenizer, lora_dir=str(d), **kw)


def test_the_page_needs_no_key_but_the_api_does(make_app):
    from fastapi.testclient import TestClient

    client = TestClient(make_app(api_key=KEY))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe" not in csp
    assert 'data-auth="1"' in page.text and KEY not in page.text  # the page asks for the key; it never holds it
    assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/ui/style.css").status_code == 200
    for path in ("/v1/models", "/v1/adapters", "/metrics", "/ui/other.js", "/ui/../serve/app.py"):
        assert client.get(path).status_code == 401, path
    auth = {"Authorization": f"Bearer {KEY}"}
    assert client.get("/ui/other.js", headers=auth).status_code == 404
    listing = client.get("/v1/adapters", headers=auth).json()
    assert listing["data"] == [] and listing["lora_dir"] is True
    assert [(f["path"], f["name"], f["loaded_as"]) for f in listing["available"]] == [
        ("capitals_64.pth", "capitals", None), ("identity_64.pth", "identity", None)]


def test_ui_0_leaves_the_page_out(make_app):
    from fastapi.testclient import TestClient

    open_client = TestClient(make_app(ui=False))
    assert open_client.get("/").status_code == 404 and open_client.get("/ui/app.js").status_code == 404
    assert open_client.get("/v1/adapters").status_code == 200  # the API route stays
    keyed = TestClient(make_app(ui=False, api_key=KEY))
    assert keyed.get("/").status_code == 401 and keyed.get("/ui/app.js").status_code == 401
    assert 'data-auth="0"' in TestClient(make_app()).get("/").text


def test_the_script_never_parses_text_as_html():
    """Model output, prompts and server messages reach the page only through textContent: the script has no HTML
    sink at all, and the page has no inline script or style for the CSP to allow."""
    script = (UI_DIR / "app.js").read_text()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "setAttribute(\"on", "srcdoc"):
        assert sink not in script, sink
    html = (UI_DIR / "index.html").read_text()
    assert re.findall(r"<script\b[^>]*>", html) == ['<script src="/ui/app.js" defer>']
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    assert "http://" not in html + script and "https://" not in html + script  # nothing from the network


# ------------------------------------------------------------------------------------------ in a browser


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m serve.openai` behind KEY: the tiny base, identity and capitals in --lora_dir -> dict(url, log)."""
    d = tmp_path_factory.mktemp("ui_server")
    params = _tiny_base()
    convert.save_model(params, CONFIG, d / "base.safetensors")
    loras = _lora_dir(d, params)
    port = free_port()
    log = open(d / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "serve.openai", "--weight", str(d / "base.safetensors"),
                             "--lora_dir", str(loras), "--hidden_size", "64", "--max_batch", "4", "--max_seq_len",
                             "1024", "--warmup", "0", "--port", str(port)],
                            env=subprocess_env(MINIMIND_API_KEY=KEY), stdout=log, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, f"server exited: {(d / 'server.log').read_text()}"
            time.sleep(0.5)
        else:
            raise AssertionError("server did not start in 300 s")
        yield {"url": url, "log": d / "server.log"}
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    assert f"playground: open http://127.0.0.1:{port}/" in (d / "server.log").read_text()


@pytest.fixture(scope="module")
def screens(tmp_path_factory) -> Path:
    d = Path(os.environ.get("MINIMIND_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui_screenshots"))
    d.mkdir(parents=True, exist_ok=True)
    print(f"\n[test_ui] screenshots in {d}")
    return d


@pytest.fixture(scope="module")
def browser_page(server):
    """One headless Chromium tab on the page for the whole module -> (page, errors: console errors and uncaught
    exceptions, in order)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    errors: list = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        context = browser.new_context(viewport={"width": 1280, "height": 820}, locale="en-US")
        page = context.new_page()
        page.set_default_timeout(60_000)
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        yield page, errors
        browser.close()


@pytest.fixture
def page(browser_page):
    page, errors = browser_page
    before = len(errors)
    yield page
    assert errors[before:] == [], errors[before:]  # every test: no console error, no uncaught exception


def _api(server, path: str, body=None):
    headers = {"Authorization": f"Bearer {KEY}"}
    if body is None:
        return httpx.get(server["url"] + path, headers=headers, timeout=60)
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=300)


def _answer(server, model: str, prompt: str, max_tokens: int) -> str:
    """The API's greedy answer, as the page asks for it."""
    r = _api(server, "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": prompt}],
                                              "temperature": 0, "top_p": 0.95, "max_tokens": max_tokens,
                                              "open_thinking": False})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def _metric(server, name: str) -> float:
    text = _api(server, "/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")))


def _wait_done(page, selector: str, n: int, timeout: float = 120_000) -> None:
    """Until n elements match `selector` and have ended (data-state done, stopped or error)."""
    page.wait_for_function(
        """([sel, n]) => { const e = document.querySelectorAll(sel);
                           return e.length >= n && [...e].every(x => x.dataset.state !== 'running'); }""",
        arg=[selector, n], timeout=timeout)


def _set(page, selector: str, value) -> None:
    page.locator(selector).fill(str(value))


@slow
def test_the_page_asks_for_the_key_and_keeps_it_in_the_tab(server, page, screens):
    raw = httpx.get(server["url"] + "/")  # no key needed for the page, and the page holds none
    assert raw.status_code == 200 and KEY not in raw.text
    page.goto(server["url"] + "/")
    page.locator("#key-dialog").wait_for(state="visible")
    assert page.locator(".model-row").count() == 0  # nothing was asked of the API without the key
    page.screenshot(path=str(screens / "key.png"))
    page.locator("#key-input").fill(KEY)
    page.locator("#key-submit").click()
    page.locator('.model-row[data-model="identity"]').wait_for()
    assert page.locator("#key-dialog").is_hidden()
    assert page.evaluate("sessionStorage.getItem('minimind.apiKey')") == KEY
    assert KEY not in page.evaluate("JSON.stringify(localStorage)") and page.context.cookies() == []
    rows = page.locator(".model-row")
    assert rows.count() == 3 and "minimind" in rows.nth(0).inner_text()  # the base, then both adapters
    assert "rank 4" in page.locator('.model-row[data-model="identity"]').inner_text()


@slow
def test_a_mix_set_with_the_sliders_answers_as_the_api(server, page, screens):
    page.locator('.model-row[data-model="identity"] input[type=range]').focus()
    for _ in range(20):  # 0 -> 1 in steps of 0.05, as a person with the arrow keys
        page.keyboard.press("ArrowRight")
    page.locator('.model-row[data-model="capitals"] input[type=range]').focus()
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    mix = page.locator("#mix").inner_text()
    assert mix == "0.5*capitals+identity", mix  # the adapters in the server's order (sorted file names)
    assert page.locator("#chat-model").inner_text() == mix
    _set(page, "#temperature", 0)
    _set(page, "#max_tokens", 24)
    for i, prompt in enumerate(["你是谁？", "Who are you?"]):
        page.locator("#prompt").fill(prompt)
        page.locator("#send").click()
        _wait_done(page, ".msg.assistant", i + 1)
        reply = page.locator(".msg.assistant").nth(i)
        assert reply.get_attribute("data-state") == "done"
        shown = reply.locator(".answer").text_content()
        assert shown == _answer(server, mix, prompt, 24), prompt
        assert shown != _answer(server, "minimind", prompt, 24)  # the mix is what answered
        assert re.search(r"\d+ tok · [\d.]+ tok/s · TTFT \d+ ms", reply.locator(".stats").inner_text())
    assert page.locator(".msg.user .answer").nth(0).text_content() == "你是谁？"
    page.screenshot(path=str(screens / "chat.png"))


def _fake_stream(*deltas) -> str:
    """A chat completion stream as the server sends it, with the given deltas."""
    def event(choices, **extra):
        return "data: " + json.dumps({"id": "chatcmpl-x", "object": "chat.completion.chunk", "created": 0,
                                      "model": "fake", "choices": choices, **extra}) + "\n\n"
    out = event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for d in deltas:
        out += event([{"index": 0, "delta": d, "finish_reason": None}])
    out += event([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    out += event([], usage={"prompt_tokens": 5, "completion_tokens": len(deltas), "total_tokens": 5 + len(deltas)})
    return out + "data: [DONE]\n\n"


@slow
def test_markup_in_prompts_and_answers_is_shown_as_text(page):
    """The model cannot be made to write markup, so the answers come from a stand-in stream (the page's own
    request, answered by the browser): reasoning_content, content, and a <think> block inside content."""
    prompt = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script><b>bold</b>'
    answer = '<script>window.__pwned=3</script><img src=x onerror="window.__pwned=4"> & <a href="x">link</a>'
    streams = [_fake_stream({"reasoning_content": "<i>weigh</i> it"}, {"content": answer[:20]},
                            {"content": answer[20:]}),
               _fake_stream({"content": "<think>\nplan <u>x</u>\n"}, {"content": "</think>\n\nfinal <s>y</s>"})]
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"content-type": "text/event-stream"}, body=streams.pop(0)))
    try:
        for i in range(2):
            page.locator("#prompt").fill(prompt)
            page.locator("#send").click()
            _wait_done(page, ".msg.assistant", 3 + i)
    finally:
        page.unroute("**/v1/chat/completions")
    users, replies = page.locator(".msg.user .answer"), page.locator(".msg.assistant")
    assert users.nth(2).text_content() == prompt and users.nth(3).text_content() == prompt
    assert replies.nth(2).locator(".answer").text_content() == answer
    assert replies.nth(2).locator(".reasoning .text").text_content() == "<i>weigh</i> it"
    assert replies.nth(3).locator(".reasoning .text").text_content() == "plan <u>x</u>"
    assert replies.nth(3).locator(".answer").text_content() == "final <s>y</s>"
    assert page.locator("#messages img, #messages script, #messages b, #messages i, #messages a, #messages u, "
                        "#messages s").count() == 0
    assert page.evaluate("window.__pwned") is None


@slow
def test_compare_shows_three_columns_equal_to_the_api(server, page, screens):
    page.locator("#tab-compare").click()
    while page.locator("#columns .col").count() < 3:
        page.locator("#add-column").click()
    models = ["minimind", "identity", "identity+0.5*capitals"]
    for i, model in enumerate(models):
        page.locator("#columns .col-model").nth(i).fill(model)
    page.locator("#compare-prompt").fill("讲个笑话")
    page.locator("#compare-send").click()
    _wait_done(page, "#columns .col-body", 3)
    answers = []
    for i, model in enumerate(models):
        body = page.locator("#columns .col-body").nth(i)
        assert body.get_attribute("data-state") == "done", body.inner_text()
        answers.append(body.locator(".answer").text_content())
        assert answers[-1] == _answer(server, model, "讲个笑话", 24), model
        assert re.search(r"tok/s · TTFT \d+ ms", body.locator(".stats").inner_text())
    assert len(set(answers)) == 3, answers
    page.screenshot(path=str(screens / "compare.png"))


@slow
def test_the_stop_button_ends_a_long_generation_and_frees_the_slot(server, page):
    page.locator("#tab-chat").click()
    page.locator("#clear").click()
    assert page.locator(".msg").count() == 0
    _set(page, "#max_tokens", 1000)  # a prompt of ~12 tokens: 1000 fit the 1024 context
    page.locator("#prompt").fill("hello")
    page.locator("#send").click()
    page.wait_for_function("() => (document.querySelector('.msg.assistant .answer') || {}).textContent")
    assert _metric(server, "minimind_active_slots") == 1  # still decoding
    page.locator("#stop").click()
    _wait_done(page, ".msg.assistant", 1)
    reply = page.locator(".msg.assistant")
    assert reply.get_attribute("data-state") == "stopped" and page.locator("#send").is_visible()
    for _ in range(100):  # the server cancels the request when the page drops the stream
        if _metric(server, "minimind_active_slots") == 0:
            break
        time.sleep(0.05)
    assert _metric(server, "minimind_active_slots") == 0
    steps = _metric(server, "minimind_decode_steps")
    time.sleep(0.5)
    assert _metric(server, "minimind_decode_steps") == steps  # nothing decodes any more
    tokens = int(re.match(r"(\d+) tok", reply.locator(".stats").inner_text()).group(1))
    assert 0 < tokens < 1000


@slow
def test_adapters_unload_and_load_from_the_page(server, page, screens):
    page.locator("#tab-adapters").click()
    page.wait_for_function("() => document.querySelector('[data-metric=active] .value').textContent === '0 / 4'")
    page.locator('#loaded .row[data-model="capitals"] .unload').click()
    page.locator('#available .row[data-path="capitals_64.ckpt"] .load').wait_for()
    assert "capitals" not in {m["id"] for m in _api(server, "/v1/models").json()["data"]}
    assert page.locator('.model-row[data-model="capitals"]').count() == 0  # gone from the sliders too
    assert page.locator('#available .row[data-path="capitals_64.ckpt"] .load-name').input_value() == "capitals"
    page.locator('#available .row[data-path="capitals_64.ckpt"] .load').click()
    page.locator('#loaded .row[data-model="capitals"]').wait_for()
    assert "capitals" in {m["id"] for m in _api(server, "/v1/models").json()["data"]}
    page.locator('.model-row[data-model="capitals"]').wait_for()
    assert "identity" in page.locator('#available .row[data-path="identity_64.ckpt"]').inner_text()  # loaded as
    page.wait_for_function("() => document.querySelector('[data-metric=requests] .value').textContent !== '–'")
    page.screenshot(path=str(screens / "adapters.png"))


@slow
def test_the_labels_switch_to_chinese_and_back(page, screens):
    page.locator("#tab-chat").click()
    page.locator("#lang").click()
    assert page.locator("#tab-chat").inner_text() == "对话" and page.locator("#send").inner_text() == "发送"
    assert page.evaluate("document.documentElement.lang") == "zh-CN"
    assert page.locator("#prompt").get_attribute("placeholder").startswith("给 MiniMind")
    page.screenshot(path=str(screens / "chat_zh.png"))
    page.locator("#lang").click()
    assert page.locator("#tab-chat").inner_text() == "Chat" and page.locator("#send").inner_text() == "Send"


@slow
def test_a_phone_screen_has_no_horizontal_overflow(server, page, screens):
    """Opened on a phone (the key survives the reload: it is the same tab), the side panels fold away above the
    conversation; no view is wider than the screen, with an answer shown and a 4-column comparison."""
    page.set_viewport_size({"width": 390, "height": 844})
    try:
        page.reload()
        page.locator('.model-row[data-model="identity"]').wait_for(state="attached")
        assert page.locator("#models-panel").get_attribute("open") is None  # folded on a narrow screen
        page.locator("#prompt").fill("你是谁？")
        page.locator("#send").click()
        _wait_done(page, ".msg.assistant", 1)
        for view in ("compare", "adapters", "chat"):
            page.locator(f"#tab-{view}").click()
            if view == "compare":
                while page.locator("#columns .col").count() < 4:
                    page.locator("#add-column").click()
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), view
            assert page.locator(f"#tab-{view}").is_visible()
        assert page.locator("#send").is_visible() and page.locator(".msg.assistant .answer").is_visible()
        page.screenshot(path=str(screens / "phone.png"))
    finally:
        page.set_viewport_size({"width": 1280, "height": 820})
