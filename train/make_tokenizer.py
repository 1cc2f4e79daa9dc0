"""Train the project's bundled byte-level BPE tokenizer -> \
minimind_jax/assets/tokenizer/{tokenizer.json,tokenizer_config.json}.

Same recipe as MiniMind's trainer/train_tokenizer.py (byte-level BPE, 6400 tokens, the 36 reserved tokens of
MiniMind-3 at ids 0..35 with the same `special` flags, pad/unk `<|endoftext|>`=0, bos `<|im_start|>`=1,
eos `<|im_end|>`=2, MiniMind's chat template), but trained only on text available offline:
  - train/assets/lora_identity.jsonl rendered with the chat template (so the template's pieces become tokens),
  - MiniMind's system prompts,
  - English prose from the Python stdlib's pydoc topics (`pydoc_data.topics`),
  - the 3755 GB2312 level-1 hanzi and CJK punctuation, one per line (so common Chinese characters get tokens).
Ids are NOT compatible with MiniMind's own tokenizer: use that one (tokenizer.json from a MiniMind checkpoint)
for MiniMind weights. Run: `python -m train.make_tokenizer [--out minimind_jax/assets/tokenizer]`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind_jax.tokenizer import ASSETS, CHAT_TEMPLATE_FILE, compile_chat_template, load_tokenizer
from train.data import SYSTEM_PROMPTS

IDENTITY = Path(__file__).resolve().parent / "assets" / "lora_identity.jsonl"
VOCAB_SIZE = 6400
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
           "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
           "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>", "<tts_text_bos_single>"]
# Added but not "special": they survive decode(skip_special_tokens=True), as in MiniMind.
NON_SPECIAL = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"] + [
    f"<|buffer{i}|>" for i in range(1, 10)]


def _gb2312(first: int, last: int, rows=range(0xB0, 0xD8)) -> str:
    chars = []
    for hi in rows:
        for lo in range(first, last + 1):
            try:
                chars.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:  # gaps at the end of row 0xD7
                pass
    return "\n".join(chars)


def corpus(template: str) -> list[str]:
    import pydoc_data.topics


    render = compile_chat_template(template)
    texts = []
    with open(IDENTITY, encoding="utf-8") as f:
        for line in f:
            msgs = json.loads(line)["conversations"]
            texts.append(render.render(messages=msgs, add_generation_prompt=False))
            texts.append("\n".join(m["content"] for m in msgs))
    texts += list(SYSTEM_PROMPTS)
    texts += [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    # level-1 hanzi, repeated so that each becomes a token before rare English pieces do
    texts += [_gb2312(0xA1, 0xFE)] * 16
    texts.append(_gb2312(0xA1, 0xFE, rows=[0xA1, 0xA3]))  # CJK punctuation and full-width forms
    return texts


def tokenizer_config(template: str, tok: Tokenizer) -> dict:
    decoder = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                         "single_word": False, "special": t in SPECIAL} for t in SPECIAL + NON_SPECIAL}
    return {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIAL[1:],
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 131072, "sp_model_kwargs": {},
        "spaces_between_special_tokens": False,
        "chat_template": template,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def train(out_dir: Path) -> Tokenizer:
    template = CHAT_TEMPLATE_FILE.read_text(encoding="utf-8").rstrip("\n")
    tok = Tokenizer(models.BPE())
    # Every "\n" is its own pre-token, so no merge spans a newline run. Otherwise "\n\n" becomes one token at the
    # end of a generation prompt ("</think>\n\n") but two tokens before text in training data ("\n", "\n我"),
    # and a model fine-tuned on the latter starts its answers off-distribution. MiniMind's tokenizer has no
    # "\n\n" token either.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split("\n", behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, show_progress=False, special_tokens=SPECIAL + NON_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(template), trainer=trainer)
    # The trainer registers all 36 reserved tokens as special; mark the tool/think/buffer ones non-special.
    spec = json.loads(tok.to_str())
    for t in spec["added_tokens"]:
        t["special"] = t["content"] in SPECIAL
    tok = Tokenizer.from_str(json.dumps(spec))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(template, tok), ensure_ascii=False, indent=2), encoding="utf-8")
    return tok


def check(out_dir: Path) -> None:
    """The ids the pipeline relies on, single-token template pieces, and a lossless round trip."""
    t = load_tokenizer(out_dir)
    assert t.vocab_size == VOCAB_SIZE, t.vocab_size
    assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
    for i, s in enumerate(SPECIAL + NON_SPECIAL):
        assert t.encode(s) == [i], (s, t.encode(s))
    prompt = t.encode(t.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    full = t.encode(t.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "我"}]))
    assert full[:len(prompt)] == prompt, "generation prompt must tokenize as a prefix of the training text"
    n_chars = n_tokens = 0
    with open(IDENTITY, encoding="utf-8") as f:
        for line in f:
            text = t.apply_chat_template(json.loads(line)["conversations"])
            ids = t.encode(text)
            assert t.decode(ids) == text, text
            n_chars, n_tokens = n_chars + len(text), n_tokens + len(ids)
    print(f"{out_dir}: vocab {t.vocab_size}, identity data {n_chars / n_tokens:.2f} chars/token, round trip ok")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ASSETS / "tokenizer")
    out = ap.parse_args().out
    train(out)
    check(out)


if __name__ == "__main__":
    main()
