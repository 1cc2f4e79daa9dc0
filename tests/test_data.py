"""SFT data pipeline: MiniMind parity, augmentations, bad data, cache, padded/packed batches, resume, sharding."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, IDENTITY
from train.data import (EMPTY_THINK, IGNORE, SYSTEM_PROMPTS, DataError, SFTLoader, assistant_labels,
                        load_sft_dataset, packed_row_len, parse_record)
from minimind_jax.tokenizer import load_tokenizer

SFT_V3 = FIXTURES / "sft_v3"
MM_TOKENIZER = FIXTURES / "tokenizer_minimind"
needs_fixtures = pytest.mark.skipif(not (SFT_V3 / "expected.npz").is_file()
                                    or not (MM_TOKENIZER / "tokenizer.json").is_file(),
                                    reason=f"MiniMind fixtures not found under {FIXTURES}")

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "查询天气",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()  # the bundled tokenizer


@pytest.fixture(scope="module")
def mm_tok():
    if not (MM_TOKENIZER / "tokenizer.json").is_file():
        pytest.skip(f"MiniMind tokenizer fixture not found at {MM_TOKENIZER}")
    return load_tokenizer(MM_TOKENIZER)


def make_convs(n: int = 40) -> list[dict]:
    """Varied conversations: plain, system, multi-turn, reasoning, tools, long (truncated)."""
    rng = np.random.default_rng(0)
    words = ["hello", "world", "模型", "数据", "train", "你好", "LoRA", "token", "学习", "jax"]
    out = []
    for i in range(n):
        say = lambda k: " ".join(rng.choice(words, k))  # noqa: E731
        kind = i % 6
        c = [{"role": "user", "content": f"q{i} " + say(3)},
             {"role": "assistant", "content": f"a{i} " + say(int(rng.integers(2, 30)))}]
        if kind == 1:
            c.insert(0, {"role": "system", "content": "You are terse."})
        elif kind == 2:
            c += [{"role": "user", "content": say(4)}, {"role": "assistant", "content": say(6)}]
        elif kind == 3:
            c[1]["reasoning_content"] = "think " + say(3)
        elif kind == 4:
            c = [{"role": "system", "content": f"tools {i}", "tools": json.dumps(TOOLS, ensure_ascii=False)},
                 {"role": "user", "content": f"北京天气? {i}"},
                 {"role": "assistant", "content": "",
                  "tool_calls": json.dumps([{"name": "get_weather", "arguments": {"city": "北京"}}])},
                 {"role": "tool", "content": "晴"}, {"role": "assistant", "content": "晴天。"}]
        elif kind == 5:
            c[1]["content"] = say(120)  # longer than max_seq_len below
        out.append({"conversations": c})
    return out


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def ds(tok, tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    return load_sft_dataset(write_jsonl(d / "convs.jsonl", make_convs()), tok, max_seq_len=96, cache_dir=d / "cache")


def loader(ds, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return SFTLoader(ds, kw.pop("batch", 4), **kw)


# ------------------------------------------------------------------------------------------- MiniMind parity


@needs_fixtures
def test_fixture_parity(mm_tok, tmp_path):
    expected = np.load(SFT_V3 / "expected.npz")
    ids_info = json.loads((SFT_V3 / "tokenizer_ids.json").read_text())
    ds = load_sft_dataset(SFT_V3 / "conversations.jsonl", mm_tok, max_seq_len=64, cache_dir=tmp_path)
    assert (ds.bos_ids.tolist() == ids_info["sft_bos_id_sequence"]
            and ds.eos_ids.tolist() == ids_info["sft_eos_id_sequence"])
    assert (mm_tok.pad_token_id, mm_tok.bos_token_id, mm_tok.eos_token_id, mm_tok.vocab_size) == (0, 1, 2, 6400)
    batch = next(iter(loader(ds, batch=8, shuffle=False, add_system_ratio=0.0, empty_think_ratio=1.0)))
    np.testing.assert_array_equal(batch["input_ids"], expected["input_ids"])
    np.testing.assert_array_equal(batch["labels"], expected["labels"])
    np.testing.assert_array_equal(ds.full_len, expected["lengths"])
    rendered = [json.loads(line) for line in (SFT_V3 / "rendered.txt").read_text(encoding="utf-8").splitlines()
                if line.startswith('"')]
    convs = [json.loads(line)["conversations"]
             for line in (SFT_V3 / "conversations.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [mm_tok.apply_chat_template(c) for c in convs] == rendered


def test_labels_match_minimind_loop():
    """The vectorised labels equal a direct transcription of MiniMind's generate_labels loop."""
    bos, eos = [1, 7, 3], [2, 5]

    def reference(ids, max_len):
        labels, i = [-100] * len(ids), 0
        while i < len(ids):
            if ids[i:i + len(bos)] == bos:
                start = end = i + len(bos)
                while end < len(ids) and ids[end:end + len(eos)] != eos:
                    end += 1
                for j in range(start, min(end + len(eos), max_len)):
                    labels[j] = ids[j]
                i = end + len(eos) if end < len(ids) else len(ids)
            else:
                i += 1
        return labels

    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.choice([0, 1, 2, 3, 5, 7, 9], size=int(rng.integers(1, 40)),
                         p=[.1, .2, .2, .15, .15, .15, .05]).tolist()
        got = assistant_labels(np.array(ids), np.array(bos), np.array(eos)).tolist()
        assert got == reference(ids, len(ids)), ids


# ----------------------------------------------------------------------------------------------- tokenizer


def test_bundled_tokenizer(tok):
    assert tok.vocab_size == 6400 and (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]):
        assert tok.encode(s) == [i]
    assert [tok.encode(s) for s in ("<think>", "</think>", "<tool_call>", "</tool_call>")] == [[25], [26], [21], [22]]
    assert tok.encode("<|im_start|>assistant\n")[0] == 1 and tok.encode("<|im_end|>\n")[0] == 2
    for line in IDENTITY.read_text(encoding="utf-8").splitlines():
        text = tok.apply_chat_template(json.loads(line)["conversations"])
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("<think>x</think>"), skip_special_tokens=True) == "<think>x</think>"  # not special


def test_chat_template_features(tok):
    msgs = [{"role": "user", "content": "你是谁？"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, open_thinking=True).endswith(
        "assistant\n<think>\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=True).endswith(
        "assistant\n<think>\n")
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)[-1] == tok.encode("\n\n")[-1]
    with_tools = tok.apply_chat_template(msgs, tools=TOOLS)
    assert (with_tools.startswith("<|im_start|>system\n# Tools")
            and json.dumps(TOOLS[0], ensure_ascii=False) in with_tools)
    # "查询天气" stays unescaped (transformers' tojson), and reasoning_content lands inside <think>
    r = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "A", "reasoning_content": "R"}])
    assert r.endswith("<|im_start|>assistant\n<think>\nR\n</think>\n\nA<|im_end|>\n")


def test_missing_tokenizer_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------- augmentations


def _decoded_rows(tok, batch):
    return [tok.decode(row[row != tok.pad_token_id]) for row in batch["input_ids"]]


def test_augmentation_ratios(tok, ds):
    n = len(ds)
    never = loader(ds, batch=n, shuffle=False, add_system_ratio=0.0, empty_think_ratio=1.0).get_batch(0, 0)
    always = loader(ds, batch=n, shuffle=False, add_system_ratio=1.0, empty_think_ratio=0.0).get_batch(0, 0)
    convs = make_convs()
    for i, (c, plain, aug) in enumerate(zip(convs, _decoded_rows(tok, never), _decoded_rows(tok, always))):
        msgs, tools, _ = parse_record(json.dumps(c), "test")  # tools / tool_calls JSON strings parsed, like MiniMind
        c = c["conversations"]
        # the bundled tokenizer is byte-level, so decode(encode(x)) is x: compare text
        assert plain == tok.apply_chat_template(msgs, tools=tools)[: len(plain)]
        assert EMPTY_THINK not in aug
        if c[0]["role"] == "system" or any(m.get("tools") for m in c):
            assert not any(aug.startswith(f"<|im_start|>system\n{p}<|im_end|>") for p in SYSTEM_PROMPTS)
        else:
            assert any(aug.startswith(f"<|im_start|>system\n{p}<|im_end|>\n<|im_start|>user") for p in SYSTEM_PROMPTS)
        if "reasoning_content" not in c[1] and ds.full_len[i] <= ds.max_seq_len:
            assert EMPTY_THINK in plain
    # cached pieces == rendering the augmented conversation directly, as MiniMind does
    i = 0
    assert len(set(_decoded_rows(tok, always))) == n  # (each sample is distinct)
    sys_choice, drop = ds.draw_augmentations(42, 0, 1.0, 0.0)
    direct = tok.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPTS[sys_choice[i]]}]
                                     + convs[i]["conversations"])
    assert ds.example(i, sys_choice[i], drop[i]).tolist() == tok.encode(direct.replace(EMPTY_THINK, ""))[:96]


@needs_fixtures
def test_augmented_tokens_equal_direct_tokenization_minimind(mm_tok, tmp_path):
    ds = load_sft_dataset(SFT_V3 / "conversations.jsonl", mm_tok, max_seq_len=200, use_cache=False)
    convs = [json.loads(line)["conversations"]
             for line in (SFT_V3 / "conversations.jsonl").read_text(encoding="utf-8").splitlines()]
    for i, c in enumerate(convs):
        for k in range(len(SYSTEM_PROMPTS)):
            for drop in (False, True):
                sys_k = -1 if c[0]["role"] == "system" else k
                msgs = c if sys_k < 0 else [{"role": "system", "content": SYSTEM_PROMPTS[k]}] + c
                text = mm_tok.apply_chat_template(msgs)
                text = text.replace(EMPTY_THINK, "") if drop else text
                assert ds.example(i, sys_k, drop).tolist() == mm_tok.encode(text)[:200]


def test_augmentation_seeded(ds):
    a = [b["input_ids"] for b in loader(ds, seed=7, num_epochs=2)]
    b = [b["input_ids"] for b in loader(ds, seed=7, num_epochs=2)]
    c = [b["input_ids"] for b in loader(ds, seed=8, num_epochs=2)]
    assert all((x == y).all() for x, y in zip(a, b)) and len(a) == len(b)
    assert not all((x == y).all() for x, y in zip(a, c))
    half = len(a) // 2
    assert not all((x == y).all() for x, y in zip(a[:half], a[half:]))  # epochs differ
    s1, d1 = ds.draw_augmentations(7, 0, 0.5, 0.5)
    s2, d2 = ds.draw_augmentations(7, 0, 0.5, 0.5)
    assert (s1 == s2).all() and (d1 == d2).all() and (s1 >= 0).any() and (s1 < 0).any() and d1.any() and (~d1).any()


# ----------------------------------------------------------------------------------------------- bad data


GOOD = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
FIX = "; fix the line or pass --skip_bad_lines"
BAD_LINES = {  # regex of the message -> the bad line
    "not valid JSON": '{"conversations": [',
    'no "conversations" key': json.dumps({"messages": GOOD["conversations"]}),
    "non-empty list": json.dumps({"conversations": "hi"}),
    "no assistant turn": json.dumps({"conversations": [{"role": "user", "content": "hi"}]}),
    "unknown role": json.dumps({"conversations": [{"role": "bot", "content": "hi"},
                                                  {"role": "assistant", "content": "ok"}]}),
    "'tools' is not valid JSON": json.dumps({"conversations": [{"role": "system", "content": "s", "tools": "[{"},
                                                               *GOOD["conversations"]]}),
    "'content' must be a string": json.dumps({"conversations": [{"role": "user", "content": 3},
                                                                {"role": "assistant", "content": "ok"}]}),
}


@pytest.mark.parametrize("what", list(BAD_LINES))
def test_bad_line_errors(tok, tmp_path, what):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, "", GOOD, BAD_LINES[what], GOOD])
    with pytest.raises(DataError, match="bad.jsonl:4: .*" + what + ".*; fix the line or pass --skip_bad_lines$"):
        load_sft_dataset(path, tok, 32, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").iterdir())  # no partial cache left behind


def _data_error(path, tok, **kw) -> str:
    """The one-line message load_sft_dataset raises for `path` (what `python -m train.lora` prints after 'error: ')."""
    with pytest.raises(DataError) as e:
        load_sft_dataset(path, tok, 32, use_cache=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_error_malformed_line(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, GOOD, '{"conversations": [{"role": "user" "content": "hi"}]}'])
    assert _data_error(path, tok) == f"{path}:3: not valid JSON (Expecting ',' delimiter: column 36){FIX}"


def test_error_missing_conversations(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, GOOD, GOOD, GOOD, {"messages": []}])
    assert _data_error(path, tok).startswith(f'{path}:5: no "conversations" key (expected {{"conversations": [')


def test_error_empty_file(tok, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text("\n  \n")  # blank lines only: as empty as no bytes at all
    assert _data_error(path, tok) == f"{path}: empty file, no samples"
    assert _data_error(path, tok, skip_bad_lines=True) == f"{path}: empty file, no samples"


def test_error_no_assistant_turn(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, {"conversations": [{"role": "user", "content": "hi"}]}])
    assert _data_error(path, tok) == f"{path}:2: no assistant turn to learn from{FIX}"


def test_error_missing_file(tok, tmp_path):
    path = tmp_path / "x.jsonl"
    assert _data_error(path, tok) == f"no such data file: {path}"
    assert _data_error([write_jsonl(tmp_path / "ok.jsonl", [GOOD]), path], tok) == f"no such data file: {path}"
    assert _data_error(tmp_path, tok) == f"{tmp_path}: not a file (expected a .jsonl file)"
    assert _data_error([], tok) == "no data files given (--data_path)"


def test_error_not_utf8(tok, tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"conversations": "\xff"}\n')
    assert _data_error(path, tok) == f"{path}:2: not UTF-8 (invalid start byte at byte 19){FIX}"
    assert len(load_sft_dataset(path, tok, 32, use_cache=False, skip_bad_lines=True)) == 1  # skipped, not fatal


def test_error_every_line_skipped(tok, tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["{", {"conversations": []}])
    assert _data_error(path, tok, skip_bad_lines=True) == (f"{path}: no valid samples (2 bad line(s) skipped with "
                                                           "--skip_bad_lines)")


def test_skip_bad_lines(tok, tmp_path, caplog):
    path = write_jsonl(tmp_path / "mixed.jsonl", [GOOD] + list(BAD_LINES.values()) + [GOOD])
    with caplog.at_level("WARNING", logger="train.dataset"):
        ds = load_sft_dataset(path, tok, 32, cache_dir=tmp_path, skip_bad_lines=True)
    assert len(ds) == 2 and ds.num_bad_lines == len(BAD_LINES)
    assert f"skipped {len(BAD_LINES)} bad line(s)" in caplog.text and "mixed.jsonl:2: not valid JSON" in caplog.text
    assert "fix the line" not in caplog.text  # the hint is for the failing case only
    assert ds.source(1).endswith(f"mixed.jsonl:{len(BAD_LINES) + 2}")
    assert load_sft_dataset(path, tok, 32, cache_dir=tmp_path,
                            skip_bad_lines=True).num_bad_lines == len(BAD_LINES)  # cached


# ----------------------------------------------------------------------------------------------- cache


def test_cache_reuse(tok, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", make_convs(12))
    first = load_sft_dataset(path, tok, 64, cache_dir=tmp_path / "cache")
    assert not first.cache_hit and len(list((tmp_path / "cache").iterdir())) == 2
    with monkeypatch.context() as m:
        m.setattr(type(tok), "encode_batch", lambda *a, **k: pytest.fail("cache hit must not re-tokenize"))
        again = load_sft_dataset(path, tok, 64, cache_dir=tmp_path / "cache")
    assert again.cache_hit and again.cache_path == first.cache_path
    fresh = load_sft_dataset(path, tok, 64, use_cache=False)
    for k in ("keep_off", "keep_len", "drop_off", "drop_len", "full_len", "can_add_system", "has_empty_think"):
        np.testing.assert_array_equal(getattr(again, k), getattr(fresh, k))
    np.testing.assert_array_equal(np.asarray(again.tokens), fresh.tokens)
    assert not load_sft_dataset(path, tok, 48, cache_dir=tmp_path / "cache").cache_hit  # max_seq_len is in the key
    write_jsonl(path, make_convs(13))
    assert not load_sft_dataset(path, tok, 64, cache_dir=tmp_path / "cache").cache_hit  # so is the content


# ----------------------------------------------------------------------------------------------- packing


def _samples(b, pad_id):
    """The (ids, labels) of every sample in a padded or packed batch, as a sorted list of tuples."""
    out = []
    if "segment_ids" not in b:
        for ids, lab in zip(b["input_ids"], b["labels"]):
            n = int((ids != pad_id).sum())  # the bundled tokenizer never emits pad (id 0) inside text
            if n:
                out.append((tuple(ids[:n]), tuple(lab[:n])))
        return sorted(out)
    for ids, lab, seg in zip(b["input_ids"], b["labels"], b["segment_ids"]):
        for k in range(1, seg.max() + 1):
            m = seg == k
            lab_k = lab[m].copy()
            lab_k[0] = IGNORE  # a packed sample's first label is masked; a padded row's first label is never used
            out.append((tuple(ids[m]), tuple(lab_k)))
    return sorted(out)


def _first_label_ignored(b):
    return {k: v if k != "labels" else np.where(np.arange(v.shape[1]) == 0, IGNORE, v) for k, v in b.items()}


def test_packing_keeps_the_samples_of_each_step(ds):
    """--batch_size counts samples in both modes: step s of the packed loader holds exactly step s's samples."""
    padded = loader(ds, batch=6, num_epochs=1, seed=3)
    packed = loader(ds, batch=6, num_epochs=1, seed=3, packed=True, seq_len=256)
    assert padded.steps_in_epoch(0) == packed.steps_in_epoch(0) == -(-len(ds) // 6)
    rows = real = 0
    for pb, kb in zip(padded, packed):
        real += int(np.count_nonzero(kb["segment_ids"]))
        assert _samples(_first_label_ignored(pb), ds.pad_id) == _samples(kb, ds.pad_id)
        ids, lab, seg, pos = kb["input_ids"], kb["labels"], kb["segment_ids"], kb["positions"]
        assert ids.shape == lab.shape == seg.shape == pos.shape and ids.shape[1] == 256 and ids.dtype == np.int32
        assert ids.shape[0] <= packed.max_rows == 6
        rows += ids.shape[0]
        for r in range(ids.shape[0]):
            pad = seg[r] == 0
            assert (ids[r][pad] == ds.pad_id).all() and (lab[r][pad] == IGNORE).all() and (pos[r][pad] == 0).all()
            assert not pad[: (~pad).sum()].any()  # padding only at the end
            for s in np.flatnonzero(np.diff(seg[r], prepend=0) > 0):
                assert pos[r, s] == 0 and lab[r, s] == IGNORE  # no prediction across samples after the shift
            for k in range(1, seg[r].max() + 1):
                assert (pos[r][seg[r] == k] == np.arange((seg[r] == k).sum())).all()
    assert rows < len(ds) / 2  # packing actually packs
    assert packed.fill_ratio(0) == pytest.approx(real / (rows * 256))


def test_group_by_length(ds):
    """Same samples per step and per epoch, batches of similar lengths, order seeded."""
    plain = loader(ds, batch=4, num_epochs=1, seed=3)
    grouped = loader(ds, batch=4, num_epochs=1, seed=3, group_by_length=True)
    p0, g0 = plain.plan(0), grouped.plan(0)
    assert sorted(g0.order) == list(range(len(ds))) and plain.steps_in_epoch(0) == grouped.steps_in_epoch(0)
    spread = lambda plan: np.mean([np.ptp(plan.lengths[plan.order[s:s + 4]]) for s in range(0, len(ds) - 3, 4)])  # noqa: E731
    assert spread(g0) < 0.5 * spread(p0)
    again = loader(ds, batch=4, num_epochs=1, seed=3, group_by_length=True).plan(0).order
    assert ((again == g0.order).all()
            and not (loader(ds, batch=4, seed=4, group_by_length=True).plan(0).order == g0.order).all())


@pytest.mark.parametrize("seed", range(6))
def test_pack_with_tail_keeps_every_sample_and_never_costs_more(seed):
    """pack_with_tail: every sample once, full rows then short ones within their lengths, and the busiest of the
    slots never computes more than with full rows only; the odd row of 2 devices goes short when it can."""
    from train.packing import pack_rows, pack_with_tail, step_cost

    rs = np.random.RandomState(seed)
    lengths = np.concatenate([rs.randint(20, 80, 40), rs.randint(80, 340, 20)])
    samples = rs.permutation(len(lengths))[:16]
    for slots in (1, 2, 3):
        rows, n_main = pack_with_tail(samples, lengths, 340, 176, slots)
        assert sorted(i for r in rows for i in r) == sorted(samples.tolist())
        assert all(lengths[r].sum() <= 340 for r in rows[:n_main])
        assert all(lengths[r].sum() <= 176 for r in rows[n_main:])
        plain = pack_rows(samples, lengths, 340)
        assert step_cost(n_main, len(rows) - n_main, 340, 176, slots) <= step_cost(len(plain), 0, 340, 176, slots)
    rows, n_main = pack_with_tail(np.arange(5), np.array([300, 300, 300, 30, 20]), 340, 176, 2)
    assert n_main == len(rows) == 3  # the odd row holds a sample too long for a short row: nothing changes
    rows, n_main = pack_with_tail(np.arange(4), np.array([300, 300, 150, 20]), 340, 176, 2)
    assert (n_main, len(rows)) == (2, 3) and rows[2] == [2]  # the odd row (150) goes short, to the other device
    assert step_cost(2, 1, 340, 176, 2) == 340 + 176 < step_cost(3, 0, 340, 176, 2) == 2 * 340


def test_packed_tail_rows(ds):
    """A loader with tail_len: the same samples per step as without, rows of seq_len whose lightest ones hold at
    most tail_len tokens, and a fill ratio at least as good."""
    plain = loader(ds, batch=6, num_epochs=1, seed=3, packed=True, seq_len=192, row_multiple=2)
    tailed = loader(ds, batch=6, num_epochs=1, seed=3, packed=True, seq_len=192, row_multiple=2, tail_len=96)
    short = 0
    for a, b in zip(plain, tailed):
        assert sorted(_samples(a, ds.pad_id)) == sorted(_samples(b, ds.pad_id)) and b["input_ids"].shape[1] == 192
        short += int(((b["segment_ids"] > 0).sum(1) <= 96).sum())
    assert short > 0 and tailed.fill_ratio(0) >= plain.fill_ratio(0)


def test_packed_rows_are_as_long_as_the_longest_sample(tok, tmp_path):
    """SFTDataset.longest is the longest variant any epoch can draw (built token by token with `example`: the longer
    think variant, the longest system prompt where one may be added); packed rows are that rounded up to 16, capped
    at max_seq_len; a packed seq_len under it is refused."""
    ds = load_sft_dataset(write_jsonl(tmp_path / "c.jsonl", make_convs()), tok, max_seq_len=1024, use_cache=False)
    kept = max(len(ds.example(i)) for i in range(len(ds)))
    variants = [len(ds.example(i, k, drop)) for i in range(len(ds)) for drop in (False, True)
                for k in ([-1] + list(range(len(SYSTEM_PROMPTS))) if ds.can_add_system[i] else [-1])]
    assert ds.longest(0.0) == kept < ds.longest(0.2) == max(variants) <= ds.max_seq_len
    for seed in range(3):  # what the epochs draw stays within it
        assert ds.lengths(*ds.draw_augmentations(seed, 0, 1.0, 0.5)).max() <= ds.longest(1.0)
    assert packed_row_len(ds, 0.0) == -(-kept // 16) * 16 < ds.max_seq_len
    short = load_sft_dataset(tmp_path / "c.jsonl", tok, max_seq_len=40, use_cache=False)
    assert short.longest(0.2) == packed_row_len(short, 0.2) == 40  # truncated samples: rows of max_seq_len
    assert loader(ds, packed=True, seq_len=packed_row_len(ds, 0.2), add_system_ratio=0.2).seq_len >= max(variants)
    with pytest.raises(ValueError, match=f"longest sample \\({kept} tokens\\)"):
        loader(ds, packed=True, seq_len=kept - 1, add_system_ratio=0.0)


def test_batch_tokens_packs_the_epoch(ds):
    """The explicit token-budget mode: rows packed over the epoch, batch_tokens // seq_len rows a step."""
    tok = loader(ds, batch=4, num_epochs=1, seed=3, batch_tokens=4 * 256 + 100, seq_len=256)
    assert tok.rows_per_step == 4 and tok.packed
    got = [s for b in tok for s in _samples(b, ds.pad_id)]
    want = [s for b in loader(ds, batch=4, num_epochs=1, seed=3) for s in _samples(_first_label_ignored(b), ds.pad_id)]
    assert sorted(got) == sorted(want)  # every sample once
    assert tok.steps_in_epoch(0) == -(-len(tok.plan(0).rows) // 4) < loader(ds, batch=4).steps_in_epoch(0) / 2
    with pytest.raises(ValueError, match="less than one row"):
        loader(ds, batch=4, batch_tokens=100, seq_len=128)


# ----------------------------------------------------------------------------------------------- resume, shards


@pytest.mark.parametrize("packed", [False, True])
def test_resume(ds, packed):
    kw = dict(batch=4, seed=5, num_epochs=3, packed=packed)
    full = list(loader(ds, **kw))
    it = loader(ds, **kw)
    stream = iter(it)
    k = it.steps_in_epoch(0) + 2  # stop inside epoch 1
    for _ in range(k):
        next(stream)
    state = it.state_dict()
    assert (state["epoch"], state["step"]) == (1, 2)
    resumed = loader(ds, **kw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = list(resumed)
    assert len(full) == k + len(rest)
    for a, b in zip(full[k:], rest):
        assert a.keys() == b.keys() and all((a[x] == b[x]).all() for x in a)
    with pytest.raises(ValueError, match="seed"):
        loader(ds, **{**kw, "seed": 6}).load_state_dict(state)


@pytest.mark.parametrize("packed", [False, True])
def test_sharding(ds, packed):
    """Each host takes its contiguous share of every step's samples; padded host rows stack into the global batch."""
    kw = dict(batch=4, seed=1, num_epochs=1, packed=packed)
    whole = list(loader(ds, **kw))
    shards = [list(loader(ds, process_index=p, process_count=2, **kw)) for p in range(2)]
    assert len(shards[0]) == len(shards[1]) == len(whole)
    for g, s0, s1 in zip(whole, *shards):
        if not packed:
            assert s0["input_ids"].shape[0] == 2
            for key in g:  # host slices stack, in process order, into the global batch
                np.testing.assert_array_equal(np.concatenate([s0[key], s1[key]]), g[key])
        both = _samples(s0, ds.pad_id) + _samples(s1, ds.pad_id)
        assert sorted(both) == _samples(g, ds.pad_id)  # the step's samples, each on one host
        assert not set(_samples(s0, ds.pad_id)) & set(_samples(s1, ds.pad_id))
    with pytest.raises(ValueError, match="divisible"):
        loader(ds, batch=3, process_index=0, process_count=2)
