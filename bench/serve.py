"""Serving speed of the whole process: the real `python -m serve.openai` server on a free localhost port, driven over
HTTP by N concurrent streaming clients (each sends its requests one after another).

    PYTHONPATH=. python bench/serve.py                                  # 512x8 random base, N = 1,4,16,32
    PYTHONPATH=. python bench/serve.py --clients 1,4 --requests_per_client 1 --max_tokens 16 --reference 0  # smoke
    PYTHONPATH=. python bench/serve.py --minimind_server ../tb/c090b69  # + PyTorch MiniMind's own server, same loads

The default run is a few minutes on 2 CPU cores (the N=32 load and the warm-up pass dominate); MiniMind's server
does not batch, so its copy of the loads takes several times longer (--minimind_requests_per_client to shorten it).

The load: `--adapters` (4) random rank-`--rank` adapters with non-zero B, written against the served base into a
temporary --lora_dir; request i names adapter i % 4 in `model`. Each request is a /v1/completions call whose prompt is
a list of `--prompt_len` (32) random token ids (so its length is exact), `max_tokens` 128, `stream: true` with
`stream_options.include_usage` (the true completion token count). Sampling: MiniMind's / `generate`'s defaults
(temperature 0.85, top_p 0.85, top_k 50) with a fixed seed per request (request i has the same seed at every N);
`--greedy` sends temperature 0. The server has no ignore_eos: a request that draws eos ends early, and every figure
uses the tokens actually received (usage), never max_tokens.

Per N (after an untimed warm-up pass of the same loads with one request per client, so that the compiles happen
before the windows; any the server still logs inside a window are counted, JAX_LOG_COMPILES): aggregate tokens/s
over the window (first request sent -> last response complete), time to first token (first non-empty text chunk)
p50/p95, inter-chunk gap p50/p95 (the per-token latency a client sees; a chunk carries one token unless the
tokenizer held back a partial character or the token has no text), time per output token p50 ((last - first chunk)
/ (tokens - 1) per request), decode steps/s and mean rows per step (from /metrics), the server's and this client's
CPU seconds (both share this machine's cores). One `RESULT {json}` line per N, a table, and a summary `RESULT` line.

Reference (`--reference 1`): `minimind_jax.generate` in this process (the server stopped) at batch 16 with the same
4 adapters per row (`lora.collection`), 32-token prompts, 128 new tokens, eos off: bench/generate.py's
tokens_per_s_b16_multi4 measurement (one warm-up call, median of `--reference_repeats`). The summary prints
served N=16 / served N=1 (target >= 4) and served N=16 / generate B=16 (target >= 0.70). This machine's speed drifts
by tens of percent within minutes: `--rounds R` runs this server's loads R times, each round followed by the
reference while the server idles, and takes the ratio within each round (the summary: each round's and the median).

`--minimind_server TREE`: a PyTorch MiniMind checkout's scripts/serve_openai_api.py, run with `--torch_python` on the
same base (written as MiniMind's out/full_sft_<hidden>.pth, found by its own path rule from a scripts/ cwd) and,
with `--minimind_lora 1`, adapter 0 as its one --lora_weight (zero-padded to the rank its apply_lora makes: 8 at
c090b69, 16 at HEAD). It serves that one adapter to every request (`model` is ignored) and runs each request as its
own model.generate thread (no batching). It has only /v1/chat/completions, no usage, no seed, no top_k (its
generate's 50 applies): the clients send chat messages whose templated prompt is `--prompt_len` tokens by that
tree's tokenizer and template (c090b69 cuts the prompt text to its last max_tokens characters; the prompts are
chosen so the cut one is `--prompt_len` tokens). Its host and port are hard-coded (0.0.0.0:8998), so it is started
through a wrapper that patches uvicorn.run to bind 127.0.0.1 on a free port and hooks transformers.TextStreamer to
log each request's prompt and generated token counts (its stream carries no usage); nothing else is changed.
The tree decides the architecture: c090b69 is MiniMind2 (the default base), HEAD is MiniMind3 (`--family
minimind3`: a random 512x8 MiniMind3 base, 4 kv heads, written to a .pth that both servers load) and runs in fp16
(`.half()` in its server) where this server runs fp32.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import os
import re
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import httpx
import jax
import numpy as np

import convert
import lora
from minimind_jax import MiniMindConfig
from minimind_jax.generate import generate
from minimind_jax.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TB = ROOT.parent / "tb"
SAMPLING = {"temperature": 0.85, "top_p": 0.85, "top_k": 50}  # minimind_jax.generate's (and MiniMind's) defaults
MM_WRAPPER = """import hashlib, runpy, sys, transformers, uvicorn
script, port = sys.argv[1], int(sys.argv[2])
_run, _put, _end = uvicorn.run, transformers.TextStreamer.put, transformers.TextStreamer.end
uvicorn.run = lambda app, **kw: _run(app, host="127.0.0.1", port=port, log_level="warning")
def put(self, value):  # counts only: the first put is the prompt, every later one the step's new token
    if not hasattr(self, "_bench_n"):
        ids = value.reshape(-1).tolist()
        self._bench_key, self._bench_prompt, self._bench_n = hashlib.md5(str(ids).encode()).hexdigest(), len(ids), 0
    else:
        self._bench_n += value.numel()
    return _put(self, value)
def end(self):
    print("BENCH_TOKENS", self._bench_key, self._bench_prompt, self._bench_n, file=sys.stderr, flush=True)
    return _end(self)
transformers.TextStreamer.put, transformers.TextStreamer.end = put, end
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--weight", default=None, help="base weights for both servers (default: the server's random init, "
                                     "init_params(config, seed=0))")
    a("--config", default=None, help="config.json for --weight")
    a("--hidden_size", type=int, default=512)
    a("--num_hidden_layers", type=int, default=8)
    a("--family", default="minimind2", choices=["minimind2", "minimind3"],
      help="random base family (minimind3: written to a .pth and served as --weight; serve.openai's own random "
           "init is minimind2)")
    a("--max_batch", type=int, default=16, help="the server's slots")
    a("--clients", default="1,4,16,32", help="comma-separated concurrent client counts")
    a("--requests_per_client", type=int, default=4)
    a("--max_tokens", type=int, default=128)
    a("--prompt_len", type=int, default=32)
    a("--adapters", type=int, default=4, help="adapters mixed over the requests (0: the base alone)")
    a("--rank", type=int, default=8)
    a("--greedy", action="store_true", help="temperature 0 instead of seeded sampling")
    a("--seed", type=int, default=0)
    a("--endpoint", default="completions", choices=["completions", "chat"],
      help="this server's endpoint (chat: random CJK user messages, templated prompt --prompt_len tokens)")
    a("--warmup", type=int, default=1, choices=(0, 1), help="an untimed pass of every load first")
    a("--ours", type=int, default=1, choices=(0, 1), help="measure serve.openai (0: only MiniMind's server)")
    a("--reference", type=int, default=1, choices=(0, 1), help="also time generate at --reference_batch")
    a("--reference_batch", type=int, default=16)
    a("--reference_repeats", type=int, default=3)
    a("--rounds", type=int, default=1, help="rounds of this server's loads, each followed by the generate reference "
                                             "while the server idles (this machine drifts: a ratio is taken within "
                                             "a round)")
    a("--minimind_server", default=None, metavar="TREE", help="also measure this MiniMind checkout's "
                                                              "scripts/serve_openai_api.py (e.g. ../tb/c090b69)")
    a("--torch_python", default=str(TB / "venv" / "bin" / "python"), help="python with torch, transformers, "
                                                                           "fastapi, uvicorn for MiniMind's server")
    a("--minimind_lora", type=int, default=1, choices=(0, 1), help="serve adapter 0 with MiniMind's --lora_weight")
    a("--minimind_clients", default=None, help="client counts for MiniMind's server (default: --clients)")
    a("--minimind_requests_per_client", type=int, default=None, help="(default: --requests_per_client)")
    a("--work_dir", default=None, help="keep adapters, bases and server logs here (default: a temporary dir)")
    a("--startup_timeout", type=float, default=600)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------
# servers
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log: Path
    kind: str  # "ours" or "minimind"
    startup_s: float = 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log_size(self) -> int:
        return self.log.stat().st_size

    def compiles_since(self, offset: int) -> list[tuple[str, float]]:
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        return [(m[0], float(m[1])) for m in re.findall(r"Finished XLA compilation of (\S+) in ([0-9.]+) sec", text)]

    def counted_since(self, offset: int) -> dict:
        """MiniMind's server: {md5 of the prompt ids: [(prompt tokens, generated tokens)] in the order its streamer
        hook logged them (when each request ended)}."""
        with open(self.log, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        out: dict = {}
        for m in re.findall(r"^BENCH_TOKENS (\w+) (\d+) (\d+)$", text, re.M):
            out.setdefault(m[0], []).append((int(m[1]), int(m[2])))
        return out

    def metrics(self) -> dict:
        if self.kind != "ours":
            return {}
        text = httpx.get(self.url + "/metrics", timeout=10, trust_env=False).text
        out = {}
        for key in ("minimind_decode_steps", "minimind_completion_tokens_total", "minimind_prompt_tokens_total"):
            m = re.search(rf"^{key} (\S+)$", text, re.M)
            if m:
                out[key] = float(m[1])
        return out


def start_server(name: str, cmd: list, cwd: Path, env: dict, log: Path, port: int, kind: str,
                 probe: str, timeout: float) -> Server:
    f = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env)
    f.close()
    url = f"http://127.0.0.1:{port}"
    server = Server(name, proc, url, log, kind)
    t0 = time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{name} exited ({proc.returncode}) before answering:\n{tail(log)}")
        try:
            r = httpx.get(url + probe, timeout=2, trust_env=False)
            if kind != "ours" or (r.status_code == 200 and r.json().get("status") == "ok"):
                break
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > timeout:
            server.stop()
            raise SystemExit(f"{name} did not answer {probe} within {timeout:.0f} s:\n{tail(log)}")
        time.sleep(0.25)
    server.startup_s = time.perf_counter() - t0
    return server


def start_ours(args, work: Path, weight: Optional[Path], lora_dir: Optional[Path]) -> Server:
    port = free_port()
    cmd = [sys.executable, "-m", "serve.openai", "--port", str(port), "--max_batch", str(args.max_batch),
           "--dtype", "float32", "--hidden_size", str(args.hidden_size),
           "--num_hidden_layers", str(args.num_hidden_layers)]
    if weight is not None:
        cmd += ["--weight", str(weight)] + (["--config", args.config] if args.config else [])
    if lora_dir is not None:
        cmd += ["--lora_dir", str(lora_dir)]
    path = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = {**os.environ, "PYTHONPATH": path, "JAX_LOG_COMPILES": "1"}  # keeps packages installed with --target
    print("$ " + " ".join(cmd), flush=True)
    server = start_server("serve.openai", cmd, ROOT, env, work / "serve_openai.log", port, "ours", "/health",
                          args.startup_timeout)
    # the scoring programs compile in a background thread once the server serves: the windows start after them
    t0 = time.perf_counter()
    while "[serve] compiled" in tail(server.log, 10 ** 6) and "scoring programs" not in tail(server.log, 10 ** 6):
        if time.perf_counter() - t0 > args.startup_timeout or server.proc.poll() is not None:
            server.stop()
            raise SystemExit(f"serve.openai did not finish its scoring compiles:\n{tail(server.log)}")
        time.sleep(0.25)
    server.startup_s += time.perf_counter() - t0
    warnings = [line for line in tail(server.log, 10 ** 6).splitlines() if "warning:" in line]
    if warnings:  # an adapter recorded other base weights than the server loaded: not the base we meant
        server.stop()
        raise SystemExit("serve.openai warned about the adapters' base:\n" + "\n".join(warnings))
    return server


# ----------------------------------------------------------------------------------------------------------------
# base, adapters, prompts
# ----------------------------------------------------------------------------------------------------------------
def served_base(args, work: Path):
    """The base both servers serve, from --weight / --family and the sizes -> (config, params, the weight path the
    servers load, or None: serve.openai's own random init of the same config and seed 0, so no file is written)."""
    if args.weight is not None:
        weight = convert.resolve_weight(args.weight, "out", args.hidden_size, False)
        config, params, _ = convert.load_base(weight, config=args.config)
        return config, params, Path(weight).resolve()
    v3 = {"num_key_value_heads": 4} if args.family == "minimind3" else {}  # MiniMind HEAD's default (and ours)
    config = MiniMindConfig(family=args.family, hidden_size=args.hidden_size,
                            num_hidden_layers=args.num_hidden_layers, **v3)
    config, params, _ = convert.load_base(None, config=config, seed=0)  # serve.loading.load_serving_base's seed
    if args.family == "minimind2":
        return config, params, None
    weight = work / "base" / f"random_{args.family}_{args.hidden_size}.pth"
    convert.save_model(params, config, weight, dtype="float32", overwrite=True)
    return config, params, weight


def make_adapters(args, config, params, lora_dir: Path) -> list:
    """`args.adapters` rank-`args.rank` adapters (A: lora.init's, B: N(0, 0.02), so each changes the model), written
    as bench<i>.ckpt with the base's fingerprint (the server warns if it serves another base)."""


    ads = []
    lora_dir.mkdir(parents=True, exist_ok=True)
    for i in range(args.adapters):
        a = lora.init(params, jax.random.key(100 + i), rank=args.rank)
        key, n = jax.random.key(200 + i), itertools.count()
        weights = jax.tree_util.tree_map_with_path(
            lambda p, x: 0.02 * jax.random.normal(jax.random.fold_in(key, next(n)), x.shape, x.dtype)
            if getattr(p[-1], "key", None) == "B" else x, a.weights)
        a = a.replace(weights=weights)
        convert.save_adapter(a, lora_dir / f"bench{i}.ckpt", config=config, params=params, overwrite=True)
        ads.append(a)
    return ads


def id_prompts(n: int, length: int, tokenizer, seed: int) -> list[list[int]]:
    """Random token ids, special tokens left out."""
    specials = [tokenizer.token_to_id(t) for t in
                [tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token] + tokenizer.additional_special_tokens]
    low = 1 + max(i for i in specials if i is not None)
    rng = np.random.default_rng(seed)
    return rng.integers(low, tokenizer.vocab_size, (n, length)).tolist()


def chat_prompts(n: int, length: int, tokenizer, seed: int, cut_chars: Optional[int] = None) -> tuple[list, list]:
    """Chat messages of random CJK text whose templated prompt (after MiniMind's cut to its last `cut_chars`
    characters, when set) is `length` tokens by `tokenizer`, or the nearest below; -> (messages per request, the
    prompt ids the server feeds)."""
    chars = []
    for i in range(tokenizer.vocab_size):
        s = tokenizer.decode([i])
        if len(s) == 1 and "\u4e00" <= s <= "\u9fff" and tokenizer.encode(s) == [i]:
            chars.append(s)
    rng = np.random.default_rng(seed)
    fed_ids = lambda text: tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True)[-(cut_chars or 0):])
    messages, fed = [], []
    for _ in range(n):
        pool = "".join(rng.choice(chars, 4 * length))
        best = pool[:1]
        for k in range(1, len(pool)):
            if len(fed_ids(pool[:k])) > length:
                break
            best = pool[:k]
        messages.append([{"role": "user", "content": best}])
        fed.append(fed_ids(best))
    return messages, fed


# ----------------------------------------------------------------------------------------------------------------
# clients
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Load:
    server: Server
    endpoint: str  # "completions" or "chat"
    models: list  # request i names models[i % len(models)]
    prompts: list  # token id lists (completions) or message lists (chat)
    max_tokens: int
    sampling: dict
    seed: int
    tokenizer: object  # for the re-tokenized estimate
    usage: bool = True  # the server reports usage when asked
    keys: Optional[list] = None  # MiniMind's server: md5 of each prompt's ids, to find its count in the log


@dataclass
class Record:
    index: int
    sent: float
    first: Optional[float] = None
    end: Optional[float] = None
    stamps: list = field(default_factory=list)
    tokens: Optional[int] = None  # usage.completion_tokens, or MiniMind's logged count
    prompt_tokens: Optional[int] = None
    retok: int = 0  # len(tokenizer.encode(text received))
    text: str = ""
    finish: Optional[str] = None
    error: Optional[str] = None


def body_for(load: Load, i: int) -> dict:
    body = {"model": load.models[i % len(load.models)], "max_tokens": load.max_tokens, "stream": True,
            **load.sampling}
    if load.usage:
        body["stream_options"] = {"include_usage": True}
        body["seed"] = load.seed + i
    if load.endpoint == "chat":
        body["messages"] = load.prompts[i % len(load.prompts)]
    else:
        body["prompt"] = load.prompts[i % len(load.prompts)]
    return body


async def one_request(client: httpx.AsyncClient, load: Load, i: int) -> Record:
    path = "/v1/chat/completions" if load.endpoint == "chat" else "/v1/completions"
    rec = Record(i, time.perf_counter())
    parts = []
    try:
        async with client.stream("POST", load.server.url + path, json=body_for(load, i)) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    obj = json.loads(data)
                    if "error" in obj:
                        rec.error = str(obj["error"])[:300]
                        break
                    if obj.get("usage"):
                        rec.tokens = obj["usage"]["completion_tokens"]
                        rec.prompt_tokens = obj["usage"]["prompt_tokens"]
                    for ch in obj.get("choices") or []:
                        piece = ch.get("text") if load.endpoint == "completions" else (ch.get("delta") or {}).get(
                            "content")
                        if piece:
                            now = time.perf_counter()
                            if rec.first is None:
                                rec.first = now
                            rec.stamps.append(now)
                            parts.append(piece)
                        if ch.get("finish_reason"):
                            rec.finish = ch["finish_reason"]
                if rec.error is None and rec.finish is None:
                    rec.error = "the stream ended without a finish_reason"
    except (httpx.HTTPError, ValueError, KeyError) as e:  # ValueError: a data line that is not JSON
        rec.error = f"{type(e).__name__}: {e}"
    rec.end = time.perf_counter()
    rec.text = "".join(parts)
    rec.retok = len(load.tokenizer.encode(rec.text)) if load.tokenizer is not None else 0
    return rec


async def drive(load: Load, n_clients: int, per_client: int) -> list[Record]:
    """n_clients concurrent clients, each sending per_client requests one after another; request c + j*n_clients."""
    limits = httpx.Limits(max_connections=n_clients + 4, max_keepalive_connections=n_clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30), limits=limits, trust_env=False) as client:
        async def one_client(c):
            return [await one_request(client, load, c + j * n_clients) for j in range(per_client)]
        done = await asyncio.gather(*(one_client(c) for c in range(n_clients)))
    return [r for recs in done for r in recs]


def pct(xs, q) -> Optional[float]:
    return round(float(np.percentile(xs, q)) * 1e3, 2) if len(xs) else None


def measure(load: Load, n_clients: int, per_client: int, label: str) -> dict:
    server = load.server
    offset, m0 = server.log_size(), server.metrics()
    cpu0, client0 = cpu_seconds(server.proc.pid), time.process_time()
    recs = asyncio.run(drive(load, n_clients, per_client))
    cpu1, client1 = cpu_seconds(server.proc.pid), time.process_time()
    m1, compiles = server.metrics(), server.compiles_since(offset)
    ok = [r for r in recs if r.error is None]
    bad = [r for r in recs if r.error is not None]
    window = max(r.end for r in recs) - min(r.sent for r in recs)
    if load.keys is not None:
        counted = server.counted_since(offset)
        for r in sorted(ok, key=lambda r: r.end):  # equal prompts (MiniMind's character cut): in order of ending
            found = counted.get(load.keys[r.index % len(load.keys)])
            if found:
                r.prompt_tokens, r.tokens = found.pop(0)
    true = all(r.tokens is not None for r in ok)
    source = "re-tokenized estimate" if not true else "usage" if load.usage else "counted in the server process"
    tokens = sum((r.tokens if true else r.retok) for r in ok)
    ttft = [r.first - r.sent for r in ok if r.first is not None]
    gaps = [b - a for r in ok for a, b in zip(r.stamps, r.stamps[1:])]
    tpot = [(r.stamps[-1] - r.first) / (n - 1) for r in ok
            for n in [r.tokens if true else r.retok] if r.first is not None and n > 1]
    out = {"measure": "serve", "server": server.name, "endpoint": load.endpoint, "clients": n_clients,
           "requests_per_client": per_client, "requests_done": len(ok), "requests_failed": len(bad),
           "completion_tokens": tokens, "token_count": source,
           "window_s": round(window, 3), "tokens_per_s": round(tokens / window, 1),
           "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p95": pct(ttft, 95),
           "itl_ms_p50": pct(gaps, 50), "itl_ms_p95": pct(gaps, 95), "itl_ms_max": pct(gaps, 100),
           "tpot_ms_p50": pct(tpot, 50),
           "short_requests": sum((r.tokens if true else r.retok) < load.max_tokens for r in ok),
           "chunks_per_token": round(sum(len(r.stamps) for r in ok) / max(1, tokens), 3),
           "server_cpu_s": round(cpu1 - cpu0, 2), "client_cpu_s": round(client1 - client0, 2)}
    if true and load.tokenizer is not None:
        out["retok_per_token"] = round(sum(r.retok for r in ok) / max(1, tokens), 3)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    if prompt_tokens:
        out["prompt_tokens_mean"] = round(float(np.mean(prompt_tokens)), 1)
    if "minimind_decode_steps" in m1:
        steps = m1["minimind_decode_steps"] - m0.get("minimind_decode_steps", 0)
        out["decode_steps_per_s"] = round(steps / window, 1)
        out["rows_per_step"] = round((tokens - len(ok)) / max(1, steps), 2)  # the first token comes from a prefill
    if server.kind == "ours":
        out["compiles"] = len(compiles)
        out["compile_s"] = round(sum(s for _, s in compiles), 2)
        if compiles:
            out["compiled"] = sorted({name for name, _ in compiles})
    if bad:
        out["first_error"] = bad[0].error
    print(f"[{label}] N={n_clients:3d}: {len(ok)} requests, {tokens} tokens in {window:.2f} s = "
          f"{out['tokens_per_s']:.1f} tokens/s; TTFT p50 {out['ttft_ms_p50']} / p95 {out['ttft_ms_p95']} ms; "
          f"inter-chunk p50 {out['itl_ms_p50']} / p95 {out['itl_ms_p95']} ms"
          + (f"; {out['rows_per_step']} rows/step" if "rows_per_step" in out else "")
          + (f"; {len(bad)} FAILED ({bad[0].error})" if bad else ""), flush=True)
    print("RESULT " + json.dumps(out), flush=True)
    return out


def run_loads(load: Load, clients: list, per_client: int, warmup: bool, label: str) -> list[dict]:
    if warmup:  # the same loads once, untimed: every shape the windows meet is compiled before them
        t = time.perf_counter()
        for n in clients:
            recs = asyncio.run(drive(load, n, 1))
            errors = [r.error for r in recs if r.error]
            if errors:
                raise SystemExit(f"[{label}] warm-up at N={n} failed: {errors[0]}\n{tail(load.server.log)}")
        print(f"[{label}] warm-up (N = {clients}, one request per client): {time.perf_counter() - t:.1f} s",
              flush=True)
    return [measure(load, n, per_client, label) for n in clients]


# ----------------------------------------------------------------------------------------------------------------
# the generate reference
# ----------------------------------------------------------------------------------------------------------------
def generate_reference(args, config, params, ads, prompts) -> dict:


    b = args.reference_batch
    ids = np.asarray(prompts[:b], np.int32)
    kw = dict(max_new_tokens=args.max_tokens, eos_token_id=None, do_sample=not args.greedy)
    col = (lambda: lora.collection(ads, np.arange(b) % len(ads), batch=b)) if ads else (lambda: None)
    fn = lambda: generate(params, config, ids, lora=col(), **kw)
    t = time.perf_counter()
    out = fn()
    compile_s = time.perf_counter() - t
    assert out.shape == (b, args.prompt_len + args.max_tokens), out.shape
    times = []
    for _ in range(args.reference_repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    sec = statistics.median(times)
    res = {"measure": "generate", "batch": b, "adapters": len(ads), "new_tokens": args.max_tokens,
           "prompt_len": args.prompt_len, "sampling": not args.greedy, "s_per_call": round(sec, 3),
           "tokens_per_s": round(b * args.max_tokens / sec, 1), "first_call_s": round(compile_s, 2)}
    print(f"[generate] batch {b}, {len(ads)} adapters per row: {sec * 1e3:.1f} ms per call "
          f"(median of {len(times)}), {res['tokens_per_s']:.1f} tokens/s", flush=True)
    print("RESULT " + json.dumps(res), flush=True)
    return res


# ----------------------------------------------------------------------------------------------------------------
# MiniMind's server
# ----------------------------------------------------------------------------------------------------------------
def start_minimind(args, work: Path, config, params, weight: Optional[Path], ads) -> tuple[Server, dict]:


    tree = Path(args.minimind_server).resolve()
    script = tree / "scripts" / "serve_openai_api.py"
    if not script.is_file():
        raise SystemExit(f"--minimind_server {tree}: no scripts/serve_openai_api.py")
    model_src = (tree / "model" / "model_minimind.py").read_text()
    tree_family = "minimind3" if "q_norm" in model_src else "minimind2"
    if tree_family != config.family:
        raise SystemExit(f"{tree} builds a {tree_family} model but the base is {config.family}: pass --family "
                         f"{tree_family} (random base) or a {tree_family} --weight")
    src = script.read_text()
    root = work / "minimind"
    (root / "scripts").mkdir(parents=True, exist_ok=True)
    (root / "out" / "lora").mkdir(parents=True, exist_ok=True)
    base = root / "out" / f"full_sft_{config.hidden_size}.pth"  # its path: ../<save_dir>/<weight>_<hidden>.pth
    if base.exists() or base.is_symlink():
        base.unlink()
    if weight is not None and weight.suffix == ".pth":
        base.symlink_to(weight)
    else:
        convert.save_model(params, config, base, dtype="float32", overwrite=True)
    info = {"tree": str(tree), "family": tree_family, "half": ".half()" in src,
            "prompt_char_cut": bool(re.search(r"\[-(request\.)?max_tokens:\]", src))}
    cmd = [args.torch_python, "-c", MM_WRAPPER, str(script), "PORT", "--load_from", str(tree / "model"),
           "--save_dir", "out", "--weight", "full_sft", "--hidden_size", str(config.hidden_size),
           "--num_hidden_layers", str(config.num_hidden_layers), "--device", "cpu"]
    if args.minimind_lora and ads:
        m = re.search(r"def apply_lora\(model, rank=(\d+)\)", (tree / "model" / "model_lora.py").read_text())
        rank = int(m[1]) if m else args.rank
        a = ads[0]
        if rank < args.rank:
            raise SystemExit(f"{tree}'s apply_lora makes rank {rank} < --rank {args.rank}")
        a = lora.pad_ranks(a, rank)  # zero columns of A, rows of B: the same delta
        convert.save_adapter(a, root / "out" / "lora" / f"bench0_{config.hidden_size}.pth", dtype="float32",
                             overwrite=True)
        cmd += ["--lora_weight", "bench0"]
        info["lora"] = f"bench0 (adapter 0, zero-padded to its rank {rank})" if rank != args.rank else "bench0"
    port = free_port()
    cmd[cmd.index("PORT")] = str(port)
    shown = [c if c != MM_WRAPPER else "<wrapper: uvicorn.run -> 127.0.0.1:port>" for c in cmd]
    print(f"$ (cd {root / 'scripts'} && " + " ".join(shown) + ")", flush=True)
    server = start_server(f"minimind-torch ({tree.name})", cmd, root / "scripts", dict(os.environ),
                          work / "minimind_server.log", port, "minimind", "/docs", args.startup_timeout)
    return server, info


# ----------------------------------------------------------------------------------------------------------------
def table(rows: list[dict]) -> None:
    head = (f"{'server':28s} {'N':>3s} {'req':>4s} {'tokens':>7s} {'window s':>8s} {'tok/s':>8s} "
            f"{'TTFT p50':>8s} {'p95':>7s} {'gap p50':>7s} {'p95':>6s} {'TPOT':>6s} {'rows/step':>9s} {'compiles':>8s}")
    print(head)
    print("-" * len(head))
    f = lambda x, w: f"{x:>{w}}" if x is not None else f"{'-':>{w}}"
    for r in rows:
        print(f"{r['server'][:28]:28s} {r['clients']:3d} {r['requests_done']:4d} {r['completion_tokens']:7d} "
              f"{r['window_s']:8.2f} {r['tokens_per_s']:8.1f} {f(r['ttft_ms_p50'], 8)} {f(r['ttft_ms_p95'], 7)} "
              f"{f(r['itl_ms_p50'], 7)} {f(r['itl_ms_p95'], 6)} {f(r['tpot_ms_p50'], 6)} "
              f"{f(r.get('rows_per_step'), 9)} {f(r.get('compiles'), 8)}")
    print("(times in ms; gap: inter-chunk; TPOT: (last - first chunk) / (tokens - 1), median over requests)")


def main(argv=None):
    args = parse_args(argv)
    clients = [int(c) for c in args.clients.split(",") if c]
    mm_clients = [int(c) for c in (args.minimind_clients or args.clients).split(",") if c]
    mm_per_client = args.minimind_requests_per_client or args.requests_per_client
    work = Path(args.work_dir).resolve() if args.work_dir else Path(tempfile.mkdtemp(prefix="bench_serve_"))
    work.mkdir(parents=True, exist_ok=True)


    config, params, weight = served_base(args, work)
    tokenizer = load_tokenizer()
    sampling = {"temperature": 0.0} if args.greedy else dict(SAMPLING)
    print(f"{config.family} {config.hidden_size}x{config.num_hidden_layers} "
          f"({'weights ' + str(weight) if weight else 'random init, seed 0'}), fp32, backend "
          f"{jax.default_backend()}, {os.cpu_count()} CPU(s); {args.adapters} adapters rank {args.rank}, prompt "
          f"{args.prompt_len}, max_tokens {args.max_tokens}, {'greedy' if args.greedy else f'sampling {sampling}'}"
          f" (seed per request); --max_batch {args.max_batch}; work dir {work}", flush=True)
    ads = make_adapters(args, config, params, work / "lora") if args.adapters else []
    models = [f"bench{i}" for i in range(args.adapters)] or ["minimind"]
    n_prompts = max(clients + mm_clients + [args.reference_batch]) * max(args.requests_per_client, mm_per_client)
    ids = id_prompts(n_prompts, args.prompt_len, tokenizer, args.seed)
    rows, summary, servers = [], {"measure": "summary"}, []
    try:
        if args.ours:
            server = start_ours(args, work, weight, work / "lora" if ads else None)
            servers.append(server)
            print(f"[serve.openai] up in {server.startup_s:.1f} s (load, compile, warm-up request)", flush=True)
            prompts = ids if args.endpoint == "completions" else chat_prompts(
                n_prompts, args.prompt_len, tokenizer, args.seed)[0]
            load = Load(server, args.endpoint, models, prompts, args.max_tokens, sampling, args.seed * 1_000_003,
                        tokenizer)
            for r in range(args.rounds):
                got = run_loads(load, clients, args.requests_per_client, bool(args.warmup) and r == 0,
                                "serve.openai")
                if args.reference and args.rounds > 1:  # the server idles (its engine waits on a condition)
                    ref = generate_reference(args, config, params, ads, ids)["tokens_per_s"]
                    for row in got:
                        row.update(round=r, generate_tokens_per_s=ref)
                rows += got
            server.stop()
            servers.remove(server)
        if args.reference and args.rounds == 1:
            summary["generate_tokens_per_s"] = generate_reference(args, config, params, ads, ids)["tokens_per_s"]
        if args.minimind_server:
            server, info = start_minimind(args, work, config, params, weight, ads)
            servers.append(server)
            mm_tok = load_tokenizer(Path(info["tree"]) / "model")
            messages, fed = chat_prompts(n_prompts, args.prompt_len, mm_tok, args.seed,
                                         args.max_tokens if info["prompt_char_cut"] else None)
            info["prompt_tokens_fed_mean"] = round(float(np.mean([len(f) for f in fed])), 1)
            print(f"[minimind] up in {server.startup_s:.1f} s; {info}", flush=True)
            if args.greedy:
                print("[minimind] its server always samples (do_sample=True): sending MiniMind's sampling defaults")
            load = Load(server, "chat", ["minimind"], messages, args.max_tokens, {k: SAMPLING[k] for k in
                        ("temperature", "top_p")}, 0, mm_tok, usage=False,
                        keys=[hashlib.md5(str(f).encode()).hexdigest() for f in fed])
            if args.warmup:  # no compile to hide: one short request wakes the process up
                asyncio.run(drive(Load(server, "chat", ["minimind"], messages, 8, load.sampling, 0, None, False), 1, 1))
            mm_rows = run_loads(load, mm_clients, mm_per_client, False, "minimind")
            for r in mm_rows:
                r.update(minimind=info)
            rows += mm_rows
            server.stop()
            servers.remove(server)
    finally:
        for s in servers:
            s.stop()

    print()
    table(rows)
    ours = {r["clients"]: r for r in rows if r["server"] == "serve.openai" and r.get("round", 0) == 0}
    theirs = {r["clients"]: r for r in rows if r["server"] != "serve.openai"}
    b = args.reference_batch
    if 1 in ours and b in ours:
        summary[f"ratio_n{b}_n1"] = round(ours[b]["tokens_per_s"] / ours[1]["tokens_per_s"], 2)
        print(f"served N={b} / N=1: {summary[f'ratio_n{b}_n1']:.2f}x (target >= 4)")
    per_round = [(r["tokens_per_s"], r["generate_tokens_per_s"]) for r in rows
                 if r["server"] == "serve.openai" and r["clients"] == b and "round" in r]
    if per_round:
        ratios = [round(x / g, 3) for x, g in per_round]
        summary[f"ratios_served_n{b}_generate_b{b}_by_round"] = ratios
        summary[f"ratio_served_n{b}_generate_b{b}"] = statistics.median(ratios)
        print(f"served N={b} / generate batch {b}, each round's pair: "
              + ", ".join(f"{x:.1f} / {g:.1f} = {x / g:.2f}" for x, g in per_round)
              + f"; median {statistics.median(ratios):.2f} (target >= 0.70)")
    elif b in ours and "generate_tokens_per_s" in summary:
        summary[f"ratio_served_n{b}_generate_b{b}"] = round(ours[b]["tokens_per_s"]
                                                             / summary["generate_tokens_per_s"], 3)
        print(f"served N={b} / generate batch {b}: {ours[b]['tokens_per_s']:.1f} / "
              f"{summary['generate_tokens_per_s']:.1f} = {summary[f'ratio_served_n{b}_generate_b{b}']:.2f} "
              "(target >= 0.70)")
    for n in sorted(set(ours) & set(theirs)):
        summary[f"ratio_vs_minimind_n{n}"] = round(ours[n]["tokens_per_s"] / theirs[n]["tokens_per_s"], 2)
        print(f"N={n}: serve.openai {ours[n]['tokens_per_s']:.1f} tokens/s ({args.endpoint}) / "
              f"{theirs[n]['server']} {theirs[n]['tokens_per_s']:.1f} tokens/s (chat, {theirs[n]['token_count']}) = "
              f"{summary[f'ratio_vs_minimind_n{n}']:.2f}x")
    print("RESULT " + json.dumps(summary))
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
