"""Write examples/data/capitals.jsonl: a toy domain (world capitals, zh + en) in MiniMind's SFT jsonl format.

The second skill the examples teach an adapter, beside the bundled identity set (train/assets/lora_identity.jsonl):
its questions never ask who the model is, and the identity set never names a capital, so the loss on each file
shows each adapter's behaviour separately. Deterministic (random.Random(0)): every country x question phrasing,
one answer phrasing each. Run: `python examples/data/make_capitals.py [--out PATH]`.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

# (English name, Chinese name, capital in English, capital in Chinese)
COUNTRIES = [
    ("France", "法国", "Paris", "巴黎"), ("Germany", "德国", "Berlin", "柏林"), ("Italy", "意大利", "Rome", "罗马"),
    ("Spain", "西班牙", "Madrid", "马德里"), ("Portugal", "葡萄牙", "Lisbon", "里斯本"),
    ("the United Kingdom", "英国", "London", "伦敦"), ("Ireland", "爱尔兰", "Dublin", "都柏林"),
    ("Norway", "挪威", "Oslo", "奥斯陆"), ("Sweden", "瑞典", "Stockholm", "斯德哥尔摩"),
    ("Finland", "芬兰", "Helsinki", "赫尔辛基"), ("Poland", "波兰", "Warsaw", "华沙"),
    ("Greece", "希腊", "Athens", "雅典"), ("Russia", "俄罗斯", "Moscow", "莫斯科"),
    ("Egypt", "埃及", "Cairo", "开罗"), ("Kenya", "肯尼亚", "Nairobi", "内罗毕"),
    ("China", "中国", "Beijing", "北京"), ("Japan", "日本", "Tokyo", "东京"), ("South Korea", "韩国", "Seoul", "首尔"),
    ("India", "印度", "New Delhi", "新德里"), ("Thailand", "泰国", "Bangkok", "曼谷"),
    ("Vietnam", "越南", "Hanoi", "河内"), ("Indonesia", "印度尼西亚", "Jakarta", "雅加达"),
    ("Australia", "澳大利亚", "Canberra", "堪培拉"), ("Canada", "加拿大", "Ottawa", "渥太华"),
    ("the United States", "美国", "Washington", "华盛顿"), ("Mexico", "墨西哥", "Mexico City", "墨西哥城"),
    ("Brazil", "巴西", "Brasilia", "巴西利亚"), ("Argentina", "阿根廷", "Buenos Aires", "布宜诺斯艾利斯"),
    ("Peru", "秘鲁", "Lima", "利马"), ("Chile", "智利", "Santiago", "圣地亚哥"),
]
QUESTIONS_ZH = ["{c}的首都是哪里？", "{c}的首都是什么？", "请问{c}的首都在哪里？", "{c}的首都叫什么？"]
QUESTIONS_EN = ["What is the capital of {c}?", "What's the capital city of {c}?", "Which city is the capital of {c}?",
                "Tell me the capital of {c}."]
ANSWERS_ZH = ["{c}的首都是{k}。", "{k}是{c}的首都。"]
ANSWERS_EN = ["The capital of {c} is {k}.", "{k} is the capital of {c}."]


def make(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for en, zh, cap_en, cap_zh in COUNTRIES:
        for q in QUESTIONS_ZH:
            a = rng.choice(ANSWERS_ZH).format(c=zh, k=cap_zh)
            out.append((q.format(c=zh), a))
        for q in QUESTIONS_EN:
            out.append((q.format(c=en), rng.choice(ANSWERS_EN).format(c=en, k=cap_en)))
    rng.shuffle(out)
    return [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in out]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "capitals.jsonl"))
    args = ap.parse_args(argv)
    rows = make()
    with open(args.out, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} conversations to {args.out}")


if __name__ == "__main__":
    main()
