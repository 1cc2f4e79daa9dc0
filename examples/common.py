"""What the examples share: two adapters trained by the project's own trainer on the random demo base, the loss of
base + adapter on a dataset, greedy answers, and the flags every example takes.

    lab = Lab(parser(__doc__).parse_args(argv))
    a, b = lab.adapter("identity"), lab.adapter("capitals")      # trained once, then reused from --out
    lab.loss(lora.combine([a, b], [1, 1]), "capitals")           # mean cross-entropy over its answer tokens

Adapters are trained with `train.run` (what `python -m train.lora` runs) on the random-init MiniMind2-small base
of `--seed`, with a demo-like recipe (every projection adapted, lr 4e-3, 16 samples a step, 10 epochs, conversations
rendered as the generation prompt), so both adapters share one base and one recipe. The trained adapter is saved in
`--out` under a name that spells its settings; a later example with the same settings loads it instead of training.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

import convert
import lora
from minimind_jax import MiniMindForCausalLM, generate, load_tokenizer
from train import BUNDLED_DATA, IGNORE, RunConfig, adapter_path, answer, load_sft_dataset, make_eval_loss, run

HERE = Path(__file__).resolve().parent
DATA = {"identity": BUNDLED_DATA, "capitals": HERE / "data" / "capitals.jsonl"}
PROMPTS = {"identity": ["你是谁？", "Who are you?"],
           "capitals": ["法国的首都是哪里？", "What is the capital of Japan?"]}
_EVAL_LOSS: dict = {}


def parser(doc: str) -> argparse.ArgumentParser:
    """The flags every example takes: where to write, the base's size and the adapters' training recipe."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--out", default="out/examples", help="trained adapters, figures and the tokenized-data cache go here")
    a("--hidden_size", type=int, default=512, help="random-init base: MiniMind2-small is 512x8")
    a("--num_hidden_layers", type=int, default=8)
    a("--rank", type=int, default=8)
    a("--epochs", type=int, default=10, help="training epochs of each adapter")
    a("--batch_size", type=int, default=16)
    a("--learning_rate", type=float, default=4e-3)
    a("--seed", type=int, default=42, help="the random base (and the trainer's shuffle and adapter init)")
    a("--eval_samples", type=int, default=64, help="conversations of each dataset the losses are measured on")
    a("--max_new_tokens", type=int, default=40, help="greedy answer length; 0 prints no answers")
    return p


class Lab:
    """The base model, the tokenizer and the evaluation batches of one set of flags."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.out = args, Path(args.out)
        a = args  # the base every adapter of these flags is trained on (train.lora's, for a run without --from_weight)
        self.config, self.params, _ = convert.load_base(None, hidden_size=a.hidden_size,
                                                        num_hidden_layers=a.num_hidden_layers, seed=a.seed)
        self.model = MiniMindForCausalLM(self.config)
        self.tokenizer = load_tokenizer()
        key = json.dumps(self.config.to_dict(), sort_keys=True)
        # one compiled loss per base shape, shared by every Lab of the process (the tests run all examples in one)
        self._eval = _EVAL_LOSS.setdefault(key, make_eval_loss(self.model))
        self._batches: dict = {}
        self._datasets: dict = {}

    def run_config(self, name: str) -> RunConfig:
        a = self.args
        # The demo's settings spelled out: for a file other than the bundled one RunConfig would pick MiniMind's
        # real-base recipe (lr 1e-4, square kernels only), which barely moves a random base in minutes.
        return RunConfig(data_path=str(DATA[name]), save_dir=str(self.out), lora_name=self.tag(name),
                         hidden_size=a.hidden_size, num_hidden_layers=a.num_hidden_layers, rank=a.rank,
                         epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.learning_rate, seed=a.seed,
                         targets="all-linear", add_system_ratio=0.0, empty_think_ratio=1.0, dtype="float32",
                         max_new_tokens=0, cpu_devices=1, cache_dir=str(self.out / "cache"), log_interval=50,
                         eval_data="")  # no held-out eval while training: each example measures its own losses

    def tag(self, name: str) -> str:
        a = self.args
        return (f"{name}-{a.hidden_size}x{a.num_hidden_layers}-r{a.rank}-e{a.epochs}-b{a.batch_size}"
                f"-lr{a.learning_rate:g}-s{a.seed}")

    def adapter(self, name: str) -> lora.Adapter:
        """The adapter trained on DATA[name]: loaded from --out if a finished run with these settings saved it."""
        cfg = self.run_config(name)
        path = adapter_path(cfg.save_dir, cfg.lora_name, self.config)
        if not self._finished(path, name):
            print(f"training the {name} adapter ({DATA[name].name}, {self.args.epochs} epochs) -> {path}")
            run(cfg)
        else:
            print(f"reusing the {name} adapter trained earlier with these settings: {path}")
        # Loaded rather than taken from the run: host arrays, not the trainer's copies on its device mesh.
        return convert.load_adapter(path, self.params)

    def _finished(self, path: Path, name: str) -> bool:
        if not path.is_dir():
            return False
        meta = convert.read_adapter_metadata(path)
        steps = math.ceil(len(self.dataset(name)) / self.args.batch_size)
        return (meta.get("base_fingerprint") == convert.fingerprint(self.params)
                and (meta.get("epoch"), meta.get("step")) == (self.args.epochs, steps))

    def dataset(self, name: str):
        if name not in self._datasets:
            self._datasets[name] = load_sft_dataset(str(DATA[name]), self.tokenizer, max_seq_len=340,
                                                    cache_dir=self.out / "cache")
        return self._datasets[name]

    def batch(self, name: str) -> dict:
        """The first --eval_samples conversations of DATA[name] as MiniMind's padded rows, rendered as in training
        (no system prompt, empty think block kept), cut after the last answer token."""
        if name not in self._batches:
            ds = self.dataset(name)
            rows = [ds.padded(i) for i in range(min(self.args.eval_samples, len(ds)))]
            ids, labels = (np.stack(x) for x in zip(*rows))
            end = int(np.flatnonzero((labels != IGNORE).any(0))[-1]) + 1
            self._batches[name] = {"input_ids": ids[:, :end], "labels": labels[:, :end]}
        return self._batches[name]

    def joint_batch(self, names, rows: Optional[int] = None) -> dict:
        """The batches of several datasets (their first `rows` rows each, default all) as one, padded alike."""
        parts = [{k: v[:rows] for k, v in self.batch(n).items()} for n in names]
        t = max(p["labels"].shape[1] for p in parts)
        pad = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE}
        return {k: np.concatenate([np.pad(p[k], ((0, 0), (0, t - p[k].shape[1])), constant_values=pad[k])
                                   for p in parts]) for k in pad}

    def loss_fn(self, data):
        """-> f(adapter or None) -> the mean cross-entropy over the answer tokens of `data` (a dataset name or a
        batch); traceable, so jax.grad and jax.vmap go through it."""
        host = self.batch(data) if isinstance(data, str) else data
        batch = {k: jnp.asarray(v) for k, v in host.items()}
        cap = int((host["labels"][:, 1:] != IGNORE).sum())  # project only the answer positions to the vocabulary
        return lambda adapter: self._eval(adapter, self.params, batch, cap)[1][0]

    def loss(self, adapter, name: str) -> float:
        return float(self.loss_fn(name)(adapter))

    def answers(self, adapter: lora.Adapter, prompts: list[str]) -> list[str]:
        """Greedy answers (what `python -m train.lora` prints after training) of base + adapter."""
        if self.args.max_new_tokens <= 0:
            return []
        return answer(self.params, self.config, adapter, self.tokenizer, prompts, self.args.max_new_tokens,
                      jnp.float32)

    def answers_per_row(self, adapters: list, prompts: list[str]) -> list[str]:
        """Greedy answers of one batch in one generate call, row i over base + adapters[i] (the "lora" collection
        gathered per row, as the server batches requests): nothing is merged, so the adapters cannot interfere."""
        if self.args.max_new_tokens <= 0:
            return []
        ids = [self.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=True) for q in prompts]
        t = max(len(x) for x in ids)
        batch = np.full((len(ids), t), self.tokenizer.pad_token_id, np.int32)
        mask = np.zeros((len(ids), t), np.int32)
        for i, x in enumerate(ids):  # left-padded, as generate expects
            batch[i, t - len(x):], mask[i, t - len(x):] = x, 1
        out = generate(self.params, self.config, batch, attention_mask=mask, max_new_tokens=self.args.max_new_tokens,
                       do_sample=False, eos_token_id=self.tokenizer.eos_token_id,
                       lora=lora.collection(adapters, adapter_ids=list(range(len(adapters)))))
        return [self.tokenizer.decode(row[t:], skip_special_tokens=True).strip() for row in out]


def peft_linear(adapters, weights) -> lora.Adapter:
    """PEFT's `add_weighted_adapter(..., combination_type="linear")` (huggingface/peft, src/peft/tuners/lora/
    model.py, `_generalized_task_arithmetic_weighted_adapter`): every adapter must have the same rank; the new
    adapter has that rank and lora_alpha = r (scale 1), and each factor is summed on its own with the weight
    sqrt(w_i * scaling_i): A = sum_i sqrt(w_i s_i) A_i, B = sum_i sqrt(w_i s_i) B_i. Its delta A@B is therefore
    sum_i w_i s_i A_i@B_i plus the cross terms sqrt(w_i s_i w_j s_j) A_i@B_j (i != j); `lora.combine` is the sum
    alone. (Negative weights fail there: math.sqrt of a negative number.)"""
    def mix(path, *factors):  # A [I, r] or B [r, O] of every adapter at one module
        r = factors[0].shape[-1] if path[-1].key == "A" else factors[0].shape[0]
        return sum(math.sqrt(w * ad.scale(r)) * x for ad, w, x in zip(adapters, weights, factors))

    return lora.Adapter(jax.tree_util.tree_map_with_path(mix, *[ad.weights for ad in adapters]),
                        targets=adapters[0].targets)


def relative_delta_gap(x: lora.Adapter, y: lora.Adapter) -> float:
    """||delta(x) - delta(y)||_F / ||delta(y)||_F over all modules together."""
    dx, dy = lora.delta(x), lora.delta(y)
    num = sum(float(jnp.sum((dx[k] - dy[k]) ** 2)) for k in dy)
    return math.sqrt(num / sum(float(jnp.sum(v ** 2)) for v in dy.values()))


def table(header: list[str], rows: list[list]) -> str:
    """Rows of (label, numbers...) as aligned text."""
    cells = [header] + [[r[0]] + [f"{x:.4f}" if isinstance(x, float) else str(x) for x in r[1:]] for r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths))) for row in cells)
